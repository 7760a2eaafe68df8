"""deploy_: the inference form of a trained detector gives the trained form's outputs, with the BatchNorms of its
FSD cells folded into their convolutions, and the eval stage reports the same numbers with it on or off."""
import copy
import json
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model
from torch import nn

from fsd_d2.config import build_cfg
from fsd_d2.engine.checkpoint import AtomicCheckpointer
from fsd_d2.engine.runner import run_stage
from fsd_d2.modeling.deploy import deploy_, fold_batchnorm_
from fsd_d2.nas.cells import DerivedCell
from fsd_d2.nas.genotype import CellGenotype
from fsd_d2.nas.ops import PoolBN

EXAMPLES = Path(__file__).resolve().parents[2] / "projects" / "DeepLesion" / "genotypes"
FSD = [f"model.genotype_bone={EXAMPLES / 'example_bone.yaml'}", f"model.genotype_head={EXAMPLES / 'example_head.yaml'}"]
# Between them, every operation of both pools; at inputs 0 and 1 of a reduction cell non_local, se and
# skip_connect reduce with a FactorizedReduce (whose BN is folded per half).
CELLS = {
    "a": CellGenotype([[("non_local", 0), ("se", 1)], [("skip_connect", 0), ("res2conv_3x3", 1)],
                       [("fac_conv_5x5", 2), ("avg_pool_3x3", 1)], [("dil_conv_3x3_d5", 3), ("max_pool_3x3", 0)]]),
    "b": CellGenotype([[("conv_3x3", 0), ("dw_sep_conv_3x3", 1)], [("dw_sep_conv_5x5", 1), ("dil_conv_3x3_d3", 0)],
                       [("skip_connect", 2), ("non_local", 3)], [("se", 4), ("res2conv_3x3", 0)]]),
}


def randomize_batchnorms(model: nn.Module, seed: int = 0) -> None:
    """Statistics and affine parameters far from the identity, so that a wrong fold shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        c = bn.num_features
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(0.25 + 2 * torch.rand(c, generator=g))
        bn.weight.data.copy_(torch.randn(c, generator=g))
        bn.bias.data.copy_(torch.randn(c, generator=g))


def cell_batchnorms(model: nn.Module):
    return [m for cell in model.modules() if isinstance(cell, DerivedCell) for m in cell.modules()
            if isinstance(m, nn.BatchNorm2d)]


def pool_batchnorms(model: nn.Module):
    return [m for op in model.modules() if isinstance(op, PoolBN) for m in op if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize("reduction, reduction_prev", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("genotype", list(CELLS))
def test_folded_cell_gives_the_trained_cells_output(genotype, reduction, reduction_prev):
    torch.manual_seed(0)
    cell = DerivedCell(CELLS[genotype], C_prev_prev=12, C_prev=10, C=8, reduction=reduction,
                       reduction_prev=reduction_prev)
    randomize_batchnorms(cell)
    cell.eval()
    s0 = torch.randn(2, 12, 10 if reduction_prev else 5, 10 if reduction_prev else 5)
    s1 = torch.randn(2, 10, 5, 5)
    with torch.no_grad():
        expected = cell(s0, s1)
        before = len(cell_batchnorms(cell))
        folded = fold_batchnorm_(cell)
        out = cell(s0, s1)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    # Only the BatchNorms after a pooling remain: nothing precedes them to fold into.
    assert cell_batchnorms(cell) == pool_batchnorms(cell) and folded == before - len(pool_batchnorms(cell)) > 0


def test_fold_refuses_a_training_model():
    cell = DerivedCell(CELLS["b"], 8, 8, 8, reduction=False, reduction_prev=False)
    with pytest.raises(ValueError, match="model.eval"):
        fold_batchnorm_(cell)


def _tiny_model(compose_cfg, *overrides):
    cfg = build_cfg(compose_cfg("train_fsd", *FSD, "model.score_thresh_test=0.0", *overrides))
    torch.manual_seed(0)
    model = build_model(cfg)
    randomize_batchnorms(model)
    return cfg, model.eval()


@pytest.mark.parametrize("graph", [False, True])
def test_deployed_fsd_gives_the_trained_features_and_detections(compose_cfg, graph):
    extra = ["model.roi_heads=GraphROIHeads", "model.graph_enabled=true", "model.graph_dim=16"] if graph else []
    cfg, model = _tiny_model(compose_cfg, *extra)
    deployed = deploy_(copy.deepcopy(model))
    assert cell_batchnorms(deployed) == pool_batchnorms(deployed) and len(cell_batchnorms(model)) > 10
    assert fold_batchnorm_(deployed) == 0  # deploying twice changes nothing
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    inputs = [{"image": image, "height": 64, "width": 64}]
    with torch.no_grad():
        x = model.preprocess_image(inputs).tensor
        features, deployed_features = model.backbone(x), deployed.backbone(x)
        for name, value in features.items():
            torch.testing.assert_close(deployed_features[name], value, rtol=1e-4, atol=1e-4)
        rois = torch.randn(6, cfg.MODEL.FPN.OUT_CHANNELS, 8, 8)
        torch.testing.assert_close(deployed.roi_heads.box_head(rois), model.roi_heads.box_head(rois),
                                   rtol=1e-4, atol=1e-4)
        expected, found = model(inputs)[0]["instances"], deployed(inputs)[0]["instances"]
    assert len(expected) > 0
    torch.testing.assert_close(found.pred_boxes.tensor, expected.pred_boxes.tensor, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(found.scores, expected.scores, rtol=1e-4, atol=1e-5)
    assert torch.equal(found.pred_classes, expected.pred_classes)
    if graph:
        torch.testing.assert_close(found.pred_relations, expected.pred_relations, rtol=1e-4, atol=1e-5)


def test_deploy_leaves_the_values_of_a_model_without_fsd_cells_as_they_are(compose_cfg):
    cfg = build_cfg(compose_cfg("train"))  # FPN-R50
    model = build_model(cfg).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    deployed = deploy_(model)
    assert fold_batchnorm_(deployed) == 0 and deployed.state_dict().keys() == state.keys()
    assert deployed.backbone.bottom_up.stem.conv1.weight.is_contiguous(memory_format=torch.channels_last)  # CPU
    for key, value in deployed.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_eval_stage_reports_the_same_numbers_deployed(compose_cfg, tmp_path):
    _, model = _tiny_model(compose_cfg, f"output_dir={tmp_path}")
    AtomicCheckpointer(model, str(tmp_path)).save("model_final")
    given = ["model=fsd", f"checkpoint={tmp_path / 'model_final.pth'}", "model.score_thresh_test=0.0"]
    runs = ("true", "false")
    results = {d: run_stage(compose_cfg("eval", *given, f"model.deploy={d}", output_dir=tmp_path / d)) for d in runs}
    on, off = (next(iter(results[d].values()))["bbox"] for d in runs)
    assert on == pytest.approx(off, rel=1e-4, abs=1e-4)
    assert on["params_total"] == off["params_total"]  # the trained network's size, not the folded one's
    assert ["deploy: folded" in (tmp_path / d / "log.txt").read_text() for d in runs] == [True, False]
    # Every detection of every image, as saved (boxes to 2 decimals, scores to 5).
    deployed, trained = (json.loads((tmp_path / d / "eval" / "detections_deeplesion_test.json").read_text())
                         for d in runs)
    assert [d["image_id"] for d in deployed] == [d["image_id"] for d in trained]
    assert sum(len(d["scores"]) for d in trained) > 0
    for a, b in zip(deployed, trained):
        assert a["classes"] == b["classes"]
        torch.testing.assert_close(torch.tensor(a["boxes_xyxy"]), torch.tensor(b["boxes_xyxy"]), rtol=0, atol=0.011)
        torch.testing.assert_close(torch.tensor(a["scores"]), torch.tensor(b["scores"]), rtol=0, atol=2e-5)
