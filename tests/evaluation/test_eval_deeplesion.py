"""DeepLesionEvaluator end to end through DatasetCatalog: metric keys, bad input, files, W&B; parameter counts."""
import json
import logging

import matplotlib.image
import numpy as np
import pytest
import torch
import wandb
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances

from fsd_d2.config import build_cfg
from fsd_d2.engine.train import FSDTrainer
from fsd_d2.engine.wandb import log_evaluation
from fsd_d2.errors import ConfigError
from fsd_d2.data.deeplesion import type_abbreviations
from fsd_d2.evaluation.deeplesion import DeepLesionEvaluator
from fsd_d2.evaluation.params import count_parameters

TYPES = ["bone", "abdomen", "mediastinum", "liver", "lung", "kidney", "soft tissue", "pelvis"]
ABBR = ["BN", "AB", "ME", "LV", "LU", "KD", "ST", "PV"]


def register(name, records, classes):
    """records: {image_id: [(XYXY box, category_id[, noisy]), ...]}; replaces an earlier registration."""
    DatasetCatalog.pop(name, None)
    MetadataCatalog.pop(name, None)
    dicts = [{"image_id": i, "file_name": f"{i}.png", "height": 128, "width": 128,
              "annotations": [{"bbox": [x1, y1, x2 - x1, y2 - y1], "bbox_mode": BoxMode.XYWH_ABS, "category_id": c,
                               "noisy": bool(noisy)} for (x1, y1, x2, y2), c, *noisy in anns]}
             for i, anns in records.items()]
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(thing_classes=classes)
    return name


def output(dets):
    """dets: [(XYXY box, score, class)] -> a GeneralizedRCNN-style output dict."""
    inst = Instances((128, 128))
    inst.pred_boxes = Boxes(torch.tensor([d[0] for d in dets], dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.tensor([d[1] for d in dets], dtype=torch.float32)
    inst.pred_classes = torch.tensor([d[2] for d in dets], dtype=torch.int64)
    return {"instances": inst}


def run(evaluator, dets_by_image):
    evaluator.reset()
    for image_id, dets in dets_by_image.items():
        evaluator.process([{"image_id": image_id}], [output(dets)])
    return evaluator.evaluate()["bbox"]


class TinyDetector(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Conv2d(3, 10, 3)  # 280 parameters
        self.proposal_generator = torch.nn.Linear(10, 10)  # 110
        self.roi_heads = torch.nn.Linear(10, 2, bias=False)  # 20


LESION_A, LESION_B = [10, 10, 40, 40], [60, 60, 100, 90]


def test_binary_split_end_to_end_writes_json_md_png(tmp_path):
    name = register("test_eval_binary", {"a": [(LESION_A, 0)], "b": [(LESION_B, 0)], "empty": []}, ["lesion"])
    evaluator = DeepLesionEvaluator(name, str(tmp_path), model=TinyDetector())
    m = run(evaluator, {"a": [(LESION_A, 0.9, 0)], "b": [(LESION_B, 0.8, 0), ([0, 0, 5, 5], 0.1, 0)],
                        "empty": [([20, 20, 30, 30], 0.2, 0)]})
    assert m["AP"] == pytest.approx(100.0) and m["AP_iobb"] == pytest.approx(100.0)
    assert m["recall"] == pytest.approx(100.0) and m["sens_iobb@16"] == pytest.approx(100.0)
    assert [m[f"sens@{f}"] for f in ["0.5", "1", "2", "4", "8", "16"]] == [100.0] * 6
    assert not any("-" in k for k in m)  # no per-type keys on a binary split
    assert m["params_total"] == pytest.approx(410e-6) and m["params_backbone"] == pytest.approx(280e-6)
    assert m["params_head"] == pytest.approx(130e-6) and m["dropped_invalid"] == 0
    saved = json.loads((tmp_path / f"metrics_{name}.json").read_text())
    assert saved["num_images"] == 3 and saved["num_lesions"] == 2 and saved["bbox"] == m
    md = (tmp_path / f"metrics_{name}.md").read_text()
    assert "|  | 0.5 | 1 | 2 | 4 | 8 | 16 |" in md and "| IoBB | 100.00 | 100.00 |" in md
    assert (tmp_path / f"froc_{name}.png").read_bytes()[:4] == b"\x89PNG"
    detections = {d["image_id"]: d for d in json.loads((tmp_path / f"detections_{name}.json").read_text())}
    assert list(detections) == ["a", "b", "empty"]
    assert detections["b"] == {"image_id": "b", "boxes_xyxy": [LESION_B, [0, 0, 5, 5]], "scores": [0.8, 0.1],
                               "classes": ["lesion", "lesion"]}


def test_multitype_split_has_the_columns_of_tables_iii_and_iv(tmp_path):
    name = register("test_eval_types", {"a": [(LESION_A, 3), (LESION_B, 4)], "b": [(LESION_A, 0)]}, TYPES)
    evaluator = DeepLesionEvaluator(name, str(tmp_path))
    # liver found; the lung lesion only by a "kidney" detection (a FP of type KD); the bone lesion missed
    m = run(evaluator, {"a": [(LESION_A, 0.9, 3), (LESION_B, 0.8, 5)], "b": []})
    assert m["AP-LV"] == pytest.approx(100.0) and m["AP-LU"] == 0.0 and m["AP_iobb-BN"] == 0.0
    assert np.isnan(m["AP-KD"])  # no kidney lesion: excluded from mAP, as COCO does
    assert m["AP"] == pytest.approx(100 / 3)  # mean over the 3 types with lesions
    assert m["sens@4-LV"] == 100.0 and m["sens@4-LU"] == 0.0 and m["sens_iobb@4-BN"] == 0.0
    assert m["sens@0.5"] == pytest.approx(100 / 3)  # pooled, class-aware: 1 of 3 lesions
    md = (tmp_path / f"metrics_{name}.md").read_text()
    assert "| BN | AB | ME | LV | LU | KD | ST | PV | mAP |" in md
    assert "| BN | AB | ME | LV | LU | KD | ST | PV | Recall |" in md
    with pytest.raises(ValueError, match=r"pred_classes \[9\] outside 0..7"):
        run(evaluator, {"a": [(LESION_A, 0.9, 9)]})


def test_invalid_boxes_are_dropped_counted_and_logged(caplog):
    name = register("test_eval_invalid", {"a": [(LESION_A, 0)]}, ["lesion"])
    dets = [([float("nan"), 10, 40, 40], 0.99, 0), ([40, 10, 10, 40], 0.98, 0), ([10, 10, 40, 40], 0.5, 0)]
    with caplog.at_level(logging.WARNING, logger="fsd_d2.evaluation.deeplesion"):
        m = run(DeepLesionEvaluator(name), {"a": dets})
    assert m["dropped_invalid"] == 2 and m["AP"] == pytest.approx(100.0) and m["sens@0.5"] == 100.0
    assert ("dropped 2 invalid detections (1 with a NaN/inf box or score, 1 with an inverted or empty box)"
            in caplog.text)


def test_images_without_lesions_count_in_fppi():
    name = register("test_eval_empty_gt", {"a": [(LESION_A, 0)], "empty": []}, ["lesion"])
    m = run(DeepLesionEvaluator(name), {"a": [(LESION_A, 0.5, 0)], "empty": [([0, 0, 5, 5], 0.9, 0)]})
    assert m["sens@0.5"] == 100.0 and m["AP"] == pytest.approx(50.0)  # 1 FP / 2 images; ranked FP then TP


def test_protocols_differ_in_sensitivities_only(tmp_path):
    # "n" holds only a noisy lesion (a FP on it), "m" a clean and a noisy one; on "s" a 3x3 box one pixel off a
    # 3x4 lesion, a hit with CADLab's "+1" areas (IoU 0.5), a false positive with pycocotools' (0.4)
    name = register("test_eval_protocols", {"a": [(LESION_A, 0)], "n": [(LESION_B, 0, True)],
                                            "m": [(LESION_A, 0), (LESION_B, 0, True)], "s": [([1, 0, 4, 4], 0)]},
                    ["lesion"])
    dets = {"a": [(LESION_A, 0.9, 0)], "n": [([0, 0, 5, 5], 0.8, 0)], "m": [(LESION_A, 0.7, 0)],
            "s": [([0, 0, 3, 3], 0.6, 0)]}
    m, saved, md = {}, {}, {}
    for protocol in ("cadlab", "coco"):
        out = tmp_path / protocol
        m[protocol] = run(DeepLesionEvaluator(name, str(out), protocol=protocol), dets)
        saved[protocol] = json.loads((out / f"metrics_{name}.json").read_text())
        md[protocol] = (out / f"metrics_{name}.md").read_text()
    # cadlab: "n" and the noisy lesion of "m" are gone; 3 lesions, all hit, no false positive left
    assert [m["cadlab"][f"sens@{f}"] for f in ["0.5", "1", "4"]] == [100.0] * 3
    # coco: 5 lesions on 4 images, 2 hit; 2 false positives = 0.5 FPPI
    assert [m["coco"][f"sens@{f}"] for f in ["0.5", "1", "4"]] == [40.0] * 3
    for key in ("AP", "recall", "AP_iobb", "recall_iobb"):
        assert m["cadlab"][key] == m["coco"][key]  # pycocotools on every image and lesion, in both protocols
    assert saved["cadlab"]["num_images"] == saved["coco"]["num_images"] == 4
    assert (saved["cadlab"]["sensitivity_protocol"], saved["cadlab"]["sensitivity_images"],
            saved["cadlab"]["sensitivity_lesions"]) == ("cadlab", 3, 3)
    assert (saved["coco"]["sensitivity_protocol"], saved["coco"]["sensitivity_images"],
            saved["coco"]["sensitivity_lesions"]) == ("coco", 4, 5)
    assert "Sensitivities by the CADLab protocol" in md["cadlab"] and "3 of 4 images, 3 of 5 lesions" in md["cadlab"]
    assert "Sensitivities by the coco protocol" in md["coco"]


def test_config_key_reaches_the_evaluator(compose_cfg):
    name = register("test_eval_protocol_key", {"a": [(LESION_A, 0)]}, ["lesion"])
    for overrides, protocol in (((), "cadlab"), (("evaluation.protocol=coco",), "coco")):
        cfg = build_cfg(compose_cfg("eval", *overrides))
        assert cfg.TEST.SENSITIVITY_PROTOCOL == protocol
        assert FSDTrainer.build_evaluator(cfg, name)._protocol == protocol
    with pytest.raises(ConfigError, match="evaluation.protocol='voc': must be cadlab or coco"):
        build_cfg(compose_cfg("eval", "evaluation.protocol=voc"))


def test_bad_requests_fail_with_clear_messages():
    binary = register("test_eval_bad", {"a": [(LESION_A, 0)]}, ["lesion"])
    with pytest.raises(ValueError, match="binary split"):
        DeepLesionEvaluator(binary, per_type=True)
    typed = register("test_eval_bad_t", {"a": [(LESION_A, 3)]}, TYPES)
    pooled = run(DeepLesionEvaluator(typed, per_type=False), {"a": [(LESION_A, 0.9, 3)]})
    assert pooled["sens@4"] == 100.0 and not any("-" in k for k in pooled)  # a typed split without per-type keys
    with pytest.raises(ValueError, match="not in the dataset"):
        run(DeepLesionEvaluator(binary), {"zzz": []})
    evaluator = DeepLesionEvaluator(binary)
    for _ in range(2):
        evaluator.process([{"image_id": "a"}], [output([])])
    with pytest.raises(ValueError, match="processed twice"):
        evaluator.evaluate()


def test_type_abbreviations_from_metadata_names_or_first_letters():
    assert type_abbreviations(register("test_eval_abbr", {}, TYPES)) == ABBR
    assert type_abbreviations(register("test_eval_abbr2", {}, ["liver", "cyst"])) == ["LV", "CY"]
    MetadataCatalog.get("test_eval_abbr2").thing_abbr = ["L", "C"]
    assert type_abbreviations("test_eval_abbr2") == ["L", "C"]
    with pytest.raises(ValueError, match="must be unique"):
        type_abbreviations(register("test_eval_abbr3", {}, ["lung", "lumbar"]))


def test_results_go_to_wandb_when_a_run_is_active(monkeypatch):
    logged = []
    monkeypatch.setattr(wandb, "run", object())
    monkeypatch.setattr(wandb, "log", logged.append)
    name = register("test_eval_wandb", {"a": [(LESION_A, 3)]}, TYPES)
    evaluator = DeepLesionEvaluator(name)
    m = run(evaluator, {"a": [(LESION_A, 0.9, 3)]})
    assert not logged  # the evaluator reports; the engine's W&B module logs
    log_evaluation(f"eval/{name}", m, evaluator.report)
    (data,) = logged
    assert data[f"eval/{name}/AP"] == m["AP"] and data[f"eval/{name}/sens_iobb@4-LV"] == 100.0
    assert isinstance(data[f"eval/{name}/table3"], wandb.Table) and isinstance(data[f"eval/{name}/froc"], wandb.Image)


def test_first_images_are_drawn_with_ground_truth_and_detections(tmp_path, monkeypatch):
    logged = []
    monkeypatch.setattr(wandb, "run", object())
    monkeypatch.setattr(wandb, "log", logged.append)
    name = register("test_eval_draw", {"a": [(LESION_A, 0)], "b": [(LESION_B, 0)]}, ["lesion"])
    evaluator = DeepLesionEvaluator(name, str(tmp_path), num_drawn=1)
    evaluator.reset()
    for image_id, dets in {"a": [(LESION_A, 0.9, 0)], "b": [(LESION_B, 0.8, 0)]}.items():
        image = torch.full((3, 64, 64), 128, dtype=torch.uint8)  # the model's input, at half the original size
        evaluator.process([{"image_id": image_id, "image": image, "height": 128, "width": 128}], [output(dets)])
    metrics = evaluator.evaluate()["bbox"]
    drawn = sorted((tmp_path / f"detections_{name}").iterdir())
    assert [p.name for p in drawn] == ["a.png"]
    assert matplotlib.image.imread(drawn[0]).shape[:2] == (512, 512)  # the original 128 px, enlarged 4x
    assert evaluator.report.drawings == [str(drawn[0])]
    log_evaluation(f"eval/{name}", metrics, evaluator.report)
    assert len(logged[0][f"eval/{name}/detections"]) == 1


def test_count_parameters_unwraps_ddp(tmp_path):
    model = TinyDetector()
    assert count_parameters(model) == pytest.approx({"total": 410e-6, "backbone": 280e-6, "head": 130e-6})
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        assert count_parameters(ddp) == count_parameters(model)
    finally:
        torch.distributed.destroy_process_group()
    with pytest.raises(ValueError, match="has no .backbone"):
        count_parameters(model.roi_heads)
