"""+stage=export end to end at smoke-test size: FPN-R50 and FSD with the graph leave Python as TorchScript and ONNX
files whose detections, run through the example (predict.py, the ONNX file in ONNX Runtime), are the eager model's."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model

from fsd_d2.config import build_cfg
from fsd_d2.data.mapper import DeepLesionMapper
from fsd_d2.engine.checkpoint import AtomicCheckpointer
from fsd_d2.engine.runner import run_stage
from fsd_d2.errors import ConfigError
from fsd_d2.modeling.deploy import deploy_
from fsd_d2.modeling.export import detections, parity, parity_problems

GENOTYPES = Path(__file__).resolve().parents[2] / "projects" / "DeepLesion" / "genotypes"
FSD = [f"model.genotype_bone={GENOTYPES / 'example_bone.yaml'}",
       f"model.genotype_head={GENOTYPES / 'example_head.yaml'}"]
GRAPH = ["model.roi_heads=GraphROIHeads", "model.graph_enabled=true"]
CASES = {
    # FPN-R50 at a short side below the images' 64 px: the example resizes and maps the boxes back.
    "fpn_r50": ["model=fpn_r50", "dataset.short_side=48"],
    "fsd_graph": ["model=fsd", *FSD, *GRAPH],  # the searched cells, the FSD head and the graph module
}


def _random_checkpoint(compose_cfg, tmp_path: Path, name: str, overrides) -> str:
    """A randomly initialised model saved as a checkpoint, with what a trained one has and a new one lacks: BatchNorm
    statistics away from (0, 1), so folding them matters, and a graph whose classifier part is not zero."""
    cfg = build_cfg(compose_cfg("train", *overrides, output_dir=tmp_path / name))
    torch.manual_seed(0)
    model = build_model(cfg)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    if getattr(model.roi_heads, "graph", None) is not None:
        torch.nn.init.normal_(model.roi_heads.graph_cls_score.weight, std=0.3)
    (tmp_path / name).mkdir(exist_ok=True)
    AtomicCheckpointer(model, str(tmp_path / name)).save("model_final")
    return str(tmp_path / name / "model_final.pth")


def _example(folder: Path):
    """The export folder's predict.py, imported from its file as a user's script would import it."""
    spec = importlib.util.spec_from_file_location("predict", folder / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_the_eager_model_in_torchscript_and_onnx_runtime(compose_cfg, tmp_path, case):
    checkpoint = _random_checkpoint(compose_cfg, tmp_path, "trained", CASES[case])
    out = tmp_path / "export"
    # The training split: the tiny test split has one image.
    hcfg = compose_cfg("export", *CASES[case], f"checkpoint={checkpoint}", "stage.num_images=2",
                       "dataset.test=[deeplesion_train]", output_dir=out)
    results = run_stage(hcfg)
    saved = json.loads((out / "results.json").read_text())
    for fmt, name in (("torchscript", "model.ts"), ("onnx", "model.onnx")):
        check = saved[fmt]
        assert check["ok"] and check["counts_equal"] and check["classes_equal"] and check["images"] == 2, check
        assert check["detections"] > 0  # a random model still detects (scores ~0.5): the counts are compared
        assert check["max_box_rel_diff"] <= 1e-3 and check["max_score_diff"] <= 1e-4, check
        assert Path(check["file"]) == out / name
    if case == "fsd_graph":
        assert results["onnx"]["max_relation_diff"] <= 1e-4
        assert json.loads((out / "export.json").read_text())["graph"] is True

    # The example, as a user runs it: its own folder, an image file, no FSD-D2 import.
    source = (out / "predict.py").read_text()
    assert "fsd_d2" not in source.replace("fsd_export", "")
    cfg = build_cfg(compose_cfg("export", *CASES[case], output_dir=tmp_path / "probe"))
    record = DatasetCatalog.get(cfg.DATASETS.TEST[0])[0]
    mapper = DeepLesionMapper(cfg, is_train=False)
    image = mapper.load_image(record)
    if case == "fsd_graph":  # an image of the prepare cache
        image_file = tmp_path / "slice.npy"
        np.save(image_file, image)
    else:
        image_file = tmp_path / "slice.png"
        cv2.imwrite(str(image_file), image)
    proc = subprocess.run([sys.executable, "predict.py", "model.onnx", str(image_file)], cwd=out,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    example = _example(out)
    found = example.ExportedDetector(str(out / "model.ts"))(image)
    assert [r["score"] for r in rows] == pytest.approx(found["scores"].tolist(), abs=1e-4)
    assert np.allclose([r["box"] for r in rows], found["boxes"], atol=0.01)
    assert {r["class"] for r in rows} <= {"lesion"}

    # Another image size than the traced one (a crop, 64 x 40): the files keep its height and width free.
    model = build_model(cfg)
    AtomicCheckpointer(model).load_matching(checkpoint)
    deploy_(model)
    crop = np.ascontiguousarray(image[:, :40])
    resized = T.AugInput(crop)
    T.AugmentationList(mapper.augmentations)(resized)
    with torch.no_grad():
        eager = model([{"image": torch.as_tensor(resized.image.transpose(2, 0, 1).copy()), "height": 64,
                        "width": 40}])[0]["instances"]
    for name in ("model.ts", "model.onnx"):
        check = parity([detections(eager)], [example.ExportedDetector(str(out / name))(crop)])
        assert not parity_problems(check) and check["detections"] > 0, (name, check)


def test_export_refuses_what_it_cannot_do(compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match="needs checkpoint="):
        run_stage(compose_cfg("export", output_dir=tmp_path / "a"))
    with pytest.raises(ConfigError, match=r"stage.formats=\['tflite'\]: choose from"):
        run_stage(compose_cfg("export", "checkpoint=x.pth", "stage.formats=[tflite]", output_dir=tmp_path / "b"))
