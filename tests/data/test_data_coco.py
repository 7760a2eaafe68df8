"""dataset=coco: users' own lesion data as COCO JSON + an image folder, and the message for each kind of bad input.

The equivalence test converts the tiny synthetic DeepLesion set to COCO JSON (16-bit slices with their neighbours
named in the JSON) and checks that training and evaluation on it give exactly the numbers of the DeepLesion layout.
"""
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from hydra import compose, initialize_config_dir

from fsd_d2.config import base_cfg, build_cfg
from fsd_d2.data.coco import CocoEntryError, CocoOptions, load_coco_split, register_coco
from fsd_d2.data.deeplesion import LESION_TYPES
from fsd_d2.data.mapper import DeepLesionMapper
from fsd_d2.data.prepare import cache_images
from fsd_d2.data.setup import setup_datasets
from fsd_d2.engine.runner import run_stage
from fsd_d2.engine.sweep import Job
from fsd_d2.engine.tables import lesion_types
from fsd_d2.engine.visualize import choose_images
from fsd_d2.errors import CheckpointError, ConfigError, DataError

CONF = str(Path(__file__).resolve().parents[2] / "conf")


def deeplesion_to_coco(root: str, out: Path) -> dict:
    """The registered DeepLesion splits as COCO JSON files in ``out`` (images stay where they are, under ``root``):
    key slice as file_name, its two neighbours as neighbour_slices, the lesion types as categories (the training
    split, whose rows have no type, gets one category, "lesion"); returns split -> JSON path."""
    paths = {}
    for split in ("train", "val", "test"):
        typed = split != "train"
        records = DatasetCatalog.get(f"deeplesion_types_{split}" if typed else f"deeplesion_{split}")
        categories = ([{"id": i + 1, "name": n} for i, n in enumerate(LESION_TYPES)] if typed else
                      [{"id": 1, "name": "lesion"}])
        images, annotations = [], []
        for k, r in enumerate(records, 1):
            (previous, _), = r["slices"][0]
            (following, _), = r["slices"][2]
            images.append({"id": k, "file_name": os.path.relpath(r["file_name"], root), "width": r["width"],
                           "height": r["height"], "neighbour_slices": [os.path.relpath(p, root) for p in
                                                                       (previous, following)],
                           "spacing_mm": r["spacing_mm"], "dicom_window": r["dicom_window"]})
            for a in r["annotations"]:
                x1, y1, x2, y2 = a["bbox"]
                annotations.append({"id": len(annotations) + 1, "image_id": k, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                    "category_id": a["lesion_type"] if typed else 1, "recist": a["recist"],
                                    "noisy": a["noisy"]})
        paths[split] = out / f"{split}.json"
        paths[split].write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return paths


@pytest.fixture(scope="module")
def converted(synthetic_root, tmp_path_factory):
    """The tiny synthetic set (+experiment=tiny's parameters) and its COCO JSON files."""
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        cfg = build_cfg(compose("config", overrides=["+stage=train", "+experiment=tiny", "output_dir=/tmp/unused",
                                                     f"dataset.root={synthetic_root}"]))
    setup_datasets(cfg)
    return deeplesion_to_coco(synthetic_root, tmp_path_factory.mktemp("coco"))


def _coco_overrides(paths, root):
    return ["dataset=coco", f"dataset.root={root}", *(f"dataset.{s}_json={p}" for s, p in paths.items())]


def _bbox_metrics(results):
    return {split: r["bbox"] for split, r in results.items() if split != "wall_seconds"}


def test_training_evaluation_and_graph_finetuning_on_the_coco_json_give_the_deeplesion_numbers(
        compose_cfg, converted, synthetic_root, tmp_path):
    # every detection kept (a tiny epoch's scores are low), so that the numbers are not all 0
    keep_all = "model.score_thresh_test=0"
    layouts = {"deeplesion": ([keep_all], "deeplesion_", "deeplesion_types_"),
               "coco": ([keep_all, *_coco_overrides(converted, synthetic_root)], "coco_", "coco_")}
    metrics, losses = {}, {}
    for layout, (overrides, binary, typed) in layouts.items():
        out = tmp_path / layout
        test = f"dataset.test=[{binary}test,{binary}val]"
        trained = run_stage(compose_cfg("train", *overrides, test, output_dir=out / "train"))
        checkpoint = f"checkpoint={out / 'train' / 'model_final.pth'}"
        evaluated = run_stage(compose_cfg("eval", *overrides, test, checkpoint, "evaluation.protocol=coco",
                                          output_dir=out / "eval"))
        suffix = "_types" if layout == "coco" else ""
        finetuned = run_stage(compose_cfg("finetune_graph", *overrides, checkpoint,
                                          f"dataset.train=[{typed}val{suffix}]", f"dataset.test=[{typed}test{suffix}]",
                                          output_dir=out / "finetune_graph"))
        metrics[layout] = [list(_bbox_metrics(r).values()) for r in (trained, evaluated, finetuned)]
        losses[layout] = [json.loads(x)["total_loss"] for stage in ("train", "finetune_graph")
                          for x in (out / stage / "metrics.json").read_text().splitlines() if "total_loss" in x]
    trained, evaluated, finetuned = metrics["coco"]
    assert len(trained) == len(evaluated) == 2 and "AP-LU" in finetuned[0]  # per-type metrics of the JSON's types
    assert trained[0]["AP"] > 0 and trained[1]["sens@16"] > 0  # numbers that would tell a difference
    # cadlab and coco protocol, binary and per type; JSON text, as NaN (a type without lesions) != NaN
    assert json.dumps(metrics["coco"]) == json.dumps(metrics["deeplesion"])
    assert losses["coco"] == losses["deeplesion"] and len(losses["coco"]) >= 2


def test_the_backbone_search_on_the_coco_json_finds_the_deeplesion_genotype(compose_cfg, converted, synthetic_root,
                                                                             tmp_path):
    genotypes = [Path(run_stage(compose_cfg("search_bone", "search.order=1", *overrides,
                                            output_dir=tmp_path / layout))["genotype"]).read_text()
                 for layout, overrides in [("deeplesion", []), ("coco", _coco_overrides(converted, synthetic_root))]]
    alphas = [torch.load(tmp_path / layout / "model_final.pth", map_location="cpu")["model"]
              ["backbone.bottom_up.arch.logits.reduce"] for layout in ("deeplesion", "coco")]
    assert genotypes[0] == genotypes[1] and torch.equal(*alphas)


def _setup_coco(paths, root, **keys):
    cfg = base_cfg()
    cfg.DEEPLESION.SOURCE, cfg.DEEPLESION.ROOT = "coco", str(root)
    for split, path in paths.items():
        cfg.DEEPLESION.COCO[f"{split.upper()}_JSON"] = str(path)
    for k, v in keys.items():
        cfg.DEEPLESION[k] = v
    return cfg, setup_datasets(cfg)


def test_coco_records_have_the_deeplesion_form_and_the_categories_are_the_lesion_types(converted, synthetic_root,
                                                                                      tmp_path):
    cfg, names = _setup_coco(converted, synthetic_root, CACHE_DIR=str(tmp_path / "cache"))
    assert names == ["coco_train", "coco_train_types", "coco_val", "coco_val_types", "coco_test", "coco_test_types"]
    for deeplesion, coco in [("deeplesion_val", "coco_val"), ("deeplesion_types_test", "coco_test_types")]:
        expected, got = DatasetCatalog.get(deeplesion), DatasetCatalog.get(coco)
        for a, b in zip(expected, got):
            assert {k: b[k] for k in a if k != "image_id"} == {k: v for k, v in a.items() if k != "image_id"}
        assert len(expected) == len(got) and MetadataCatalog.get(coco).thing_classes == \
            MetadataCatalog.get(deeplesion).thing_classes
    assert MetadataCatalog.get("coco_val_types").thing_classes == list(LESION_TYPES)
    cfg.INPUT.MIN_SIZE_TEST = 64
    mapper = DeepLesionMapper(cfg, is_train=False)
    record = DatasetCatalog.get("coco_val")[0]
    assert torch.equal(mapper(record)["image"], mapper(DatasetCatalog.get("deeplesion_val")[0])["image"])
    assert record["slices"][0] != record["slices"][1]  # the neighbours named in the JSON make the outer channels
    on_the_fly = mapper(record)["image"]
    cached = cache_images(cfg)  # +stage=prepare: one file per split and id (ids repeat across the JSON files)
    assert cached["written"] == sum(len(DatasetCatalog.get(n)) for n in ("coco_train", "coco_val", "coco_test"))
    assert (tmp_path / "cache" / "hu_-1024_3071" / "coco_val" / f"{record['image_id']}.npy").is_file()
    assert torch.equal(DeepLesionMapper(cfg, is_train=False)(record)["image"], on_the_fly)
    assert choose_images(DatasetCatalog.get("coco_val"), ["1"], 4, "coco_val")[0]["image_id"] == 1  # visualize


def test_per_type_tables_take_the_types_the_jobs_were_evaluated_on():
    coco = Job(name="0", overrides={}, metrics={"AP": 1.0, "AP-LI": 2.0, "AP_iobb-LI": 2.0,
                                                                  "AP-KC": 3.0, "sens@4-KC": 1.0})
    assert lesion_types([coco]) == ["LI", "KC"]
    assert lesion_types([]) == ["BN", "AB", "ME", "LV", "LU", "KD", "ST", "PV"]


# --- small hand-written sets for the errors -------------------------------------------------------------------

def _write_set(folder: Path, *, pixels="ct16", offset=32768, images=None, annotations=None, categories=None):
    """Two 16x16 images (16-bit CT of HU + offset, or 8-bit colour) and a valid JSON naming them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "a_prev.png", "a_next.png"):
        hu = rng.integers(-1000, 400, (16, 16))
        image = (hu + offset).astype(np.uint16) if pixels == "ct16" else rng.integers(0, 255, (16, 16, 3), np.uint8)
        cv2.imwrite(str(folder / name), image)
    content = {"images": images or [{"id": 7, "file_name": "a.png", "width": 16, "height": 16,
                                     "neighbour_slices": ["a_prev.png", "a_next.png"]} if pixels == "ct16" else
                                    {"id": 7, "file_name": "a.png", "width": 16, "height": 16},
                                    {"id": 9, "file_name": "b.png", "width": 16, "height": 16}],
               "annotations": annotations or [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [2, 3, 5, 6]},
                                              {"id": 2, "image_id": 9, "category_id": 5, "bbox": [0, 0, 16, 16],
                                               "noisy": True}],
               "categories": categories or [{"id": 5, "name": "lung"}, {"id": 3, "name": "liver"}]}
    path = folder / "set.json"
    path.write_text(json.dumps(content, indent=1))
    return path, content


def _load(path, root, multi_type=True, **options):
    register_coco({"mine": str(path)}, str(root), options=CocoOptions(**options))
    return load_coco_split(str(path), str(root), "mine", multi_type=multi_type, options=CocoOptions(**options))


def test_a_small_set_registers_with_its_categories_boxes_and_flags(tmp_path):
    path, _ = _write_set(tmp_path)
    records = _load(path, tmp_path)
    assert MetadataCatalog.get("mine_types").thing_classes == ["liver", "lung"]  # sorted by id, as Detectron2 does
    assert MetadataCatalog.get("mine").thing_classes == ["lesion"]
    a, b = records
    assert a["annotations"][0]["bbox"] == [2.0, 3.0, 7.0, 9.0] and a["annotations"][0]["category_id"] == 0
    assert a["annotations"][0]["recist"] == [2.0, 6.0, 7.0, 6.0, 4.5, 3.0, 4.5, 9.0]  # the box's mid-lines
    assert b["annotations"][0]["category_id"] == 1 and b["annotations"][0]["noisy"]
    assert [c[0][0] for c in a["slices"]] == [str(tmp_path / n) for n in ("a_prev.png", "a.png", "a_next.png")]
    assert [c[0][0] for c in b["slices"]] == [str(tmp_path / "b.png")] * 3  # no neighbours: the key slice thrice
    assert all(a["category_id"] == 0 for r in _load(path, tmp_path, multi_type=False) for a in r["annotations"])
    assert [r["image_id"] for r in _load(path, tmp_path, drop_noisy=True)] == [7]


def test_the_hu_offset_and_8bit_colour_images_reach_the_mapper(tmp_path):
    cfg = base_cfg()
    cfg.INPUT.MIN_SIZE_TEST = 16
    mapper = DeepLesionMapper(cfg, is_train=False)
    images = {}
    for offset in (32768, 1024):
        path, _ = _write_set(tmp_path / str(offset), offset=offset)
        images[offset] = mapper(_load(path, tmp_path / str(offset), hu_offset=offset)[0])["image"]
    assert torch.equal(images[32768], images[1024]) and images[1024].float().std() > 0
    with pytest.raises(CocoEntryError, match=r"is not a CT slice storing HU \+ 1024.*dataset.hu_offset"):
        _load(tmp_path / "32768" / "set.json", tmp_path / "32768", hu_offset=1024)
    path, _ = _write_set(tmp_path / "rgb", pixels="rgb8")
    record = _load(path, tmp_path / "rgb", pixels="rgb8")[0]
    assert "slices" not in record
    assert torch.equal(mapper(record)["image"].permute(1, 2, 0), torch.as_tensor(cv2.imread(record["file_name"])))
    with pytest.raises(CocoEntryError, match=r"(?s)16-bit CT slices.*8-bit RGB PNG.*set dataset.pixels=rgb8"):
        _load(path, tmp_path / "rgb")


def _error(path, root, **options) -> str:
    with pytest.raises(DataError) as err:
        _load(path, root, **options)
    return str(err.value)


def test_malformed_json_names_the_file_line_and_fix(tmp_path):
    path, _ = _write_set(tmp_path)
    text = path.read_text()
    path.write_text(text.replace('"width": 16,', '"width": 16', 1))
    message = _error(path, tmp_path)
    assert str(path) in message and "not valid JSON: Expecting ',' delimiter at line" in message
    assert "Fix the file there" in message
    path.write_text(json.dumps({"images": [], "annotations": []}))
    assert "lacks the list(s) ['categories']" in _error(path, tmp_path)
    _write_set(tmp_path, images=[{"id": 7, "file_name": "a.png", "width": 16, "height": "16"}])
    message = _error(path, tmp_path)
    assert f"{path}: images[0] (id 7) height '16' is not a positive integer. Fix: set height" in message


def test_a_missing_image_names_the_file_entry_and_fix(tmp_path):
    path, _ = _write_set(tmp_path)
    os.remove(tmp_path / "b.png")
    os.remove(tmp_path / "a_next.png")
    message = _error(path, tmp_path)
    assert f"2 image file(s) of {path} are missing" in message
    assert f"images[0] (id 7) neighbour_slices[1] 'a_next.png': {tmp_path / 'a_next.png'} does not exist" in message
    assert f"images[1] (id 9) file_name 'b.png': {tmp_path / 'b.png'} does not exist" in message
    assert f"Fix: correct the file names (they are relative to dataset.root={tmp_path}), or restore" in message


def test_a_box_outside_its_image_names_the_file_entry_and_fix(tmp_path):
    path, content = _write_set(tmp_path)
    content["annotations"][0]["bbox"] = [10, 3, 8, 6]
    path.write_text(json.dumps(content))
    message = _error(path, tmp_path)
    assert message == (f"{path}: annotations[0] (id 1) bbox [10, 3, 8, 6] ([x, y, width, height]) reaches outside the "
                       f"16x16 image images[0] (id 7). Fix: correct the box (or the image's width/height), or set "
                       f"dataset.check_boxes=false to clip it")
    assert _load(path, tmp_path, check_boxes=False)[0]["annotations"][0]["bbox"] == [10.0, 3.0, 16.0, 9.0]
    content["annotations"][0]["bbox"] = [3, 3, 0, 6]
    path.write_text(json.dumps(content))
    assert "is not [x, y, width, height] with width and height > 0" in _error(path, tmp_path, check_boxes=False)


def test_an_unknown_category_or_image_names_the_file_entry_and_fix(tmp_path):
    path, content = _write_set(tmp_path)
    content["annotations"][1]["category_id"] = 4
    path.write_text(json.dumps(content))
    assert _error(path, tmp_path) == (f"{path}: annotations[1] (id 2) has the unknown category_id 4 (the categories' "
                                      f"ids: 3, 5). Fix: correct category_id, or add the category to categories")
    content["annotations"][1].update(category_id=5, image_id=8)
    path.write_text(json.dumps(content))
    assert "annotations[1] (id 2) refers to image_id 8, which no entry of images has" in _error(path, tmp_path)
    content["annotations"][1]["image_id"] = 9
    content["categories"] = [{"id": 5, "name": "kidney cyst"}, {"id": 3, "name": "kidney stone"}]
    path.write_text(json.dumps(content))
    assert 'need unique short names for the per-type metrics' in _error(path, tmp_path)
    for c, abbr in zip(content["categories"], ("KC", "KS")):
        c["abbr"] = abbr
    path.write_text(json.dumps(content))
    _load(path, tmp_path)
    assert MetadataCatalog.get("mine_types").thing_abbr == ["KS", "KC"]


@pytest.mark.parametrize("entry, edit, message", [
    (("images", 1), {"id": 7}, "images[1] (id 7) repeats the id of images[0]. Fix: give every image its own id"),
    (("annotations", 1), {"id": 1}, "annotations[1] (id 1) repeats the id of annotations[0]. Fix: give every "
                                    "annotation its own id"),
    (("annotations", 1), {"id": "2"}, "annotations[1] (id '2') has no integer id. Fix: give each annotation {\"id\": "
                                      "<integer>, \"image_id\""),
])
def test_a_repeated_or_missing_id_names_the_entry_it_repeats(tmp_path, entry, edit, message):
    path, content = _write_set(tmp_path)
    content[entry[0]][entry[1]].update(edit)
    path.write_text(json.dumps(content))
    assert f"{path}: {message}" in _error(path, tmp_path)


def test_coco_settings_are_checked_against_the_dataset(tmp_path, compose_cfg):
    path, _ = _write_set(tmp_path)
    only_test = _coco_overrides({"test": path}, tmp_path)
    with pytest.raises(ConfigError, match=r"no split is named 'coco_train'; the dataset's splits are \['coco_test', "
                                          r"'coco_test_types'\] \(set dataset.train_json=/path/to/train.json"):
        run_stage(compose_cfg("train", *only_test, output_dir=tmp_path / "train"))
    with pytest.raises(CheckpointError, match="/nonexistent.pth does not exist"):  # eval reads no training split
        run_stage(compose_cfg("eval", *only_test, "checkpoint=/nonexistent.pth", output_dir=tmp_path / "eval"))
    with pytest.raises(ConfigError, match=r"dataset.slice_interval_mm=2.0 apply to DeepLesion's DL_info.csv"):
        _setup_coco({"test": path}, tmp_path, SLICE_INTERVAL_MM=2.0)
    cfg = build_cfg(compose_cfg("train", f"dataset.test_json={path}"))
    with pytest.raises(ConfigError, match=r"dataset.test_json='.*set.json' apply to dataset=coco only; add "
                                          r"dataset=coco"):
        setup_datasets(cfg)
    with pytest.raises(ConfigError, match=r"no split is named 'deeplesion_types_test'.*\['mine', 'mine_types'\] .*"
                                          r"dataset.train=\[coco_val_types\] dataset.test=\[mine_types\]"):
        run_stage(compose_cfg("finetune_graph", *only_test, "dataset.test_name=mine", "checkpoint=/nonexistent.pth",
                              output_dir=tmp_path / "finetune"))
