"""FSD backbones and box heads built from hand-written genotypes: shapes, output_shape(), bad genotypes."""
import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import ROI_BOX_HEAD_REGISTRY, build_backbone, build_model

from fsd_d2.config import build_cfg
from fsd_d2.errors import ConfigError, GenotypeError
from fsd_d2.nas.genotype import CellGenotype, Genotype, save_genotype
from fsd_d2.nas.searchable import Searchable

BONE_CELL = CellGenotype([[("dw_sep_conv_3x3", 0), ("conv_3x3", 1)], [("skip_connect", 0), ("dil_conv_3x3_d3", 2)],
                          [("res2conv_3x3", 1), ("fac_conv_5x5", 3)], [("dil_conv_3x3_d5", 4), ("skip_connect", 1)]])
HEAD_NORMAL = CellGenotype([[("se", 0), ("conv_3x3", 1)], [("non_local", 2), ("dw_sep_conv_5x5", 1)],
                            [("max_pool_3x3", 0), ("skip_connect", 3)], [("avg_pool_3x3", 1), ("dw_sep_conv_3x3", 4)]])


@pytest.fixture
def genotypes(tmp_path):
    bone = save_genotype(Genotype(pool="bone8", cells={"reduce": BONE_CELL}), tmp_path / "genotype_bone.yaml")
    head = save_genotype(Genotype(pool="head13", cells={"normal": HEAD_NORMAL, "reduce": BONE_CELL}),
                         tmp_path / "genotype_head.yaml")
    return str(bone), str(head)


def _cfg(compose_cfg, stage, *overrides):
    return build_cfg(compose_cfg(stage, *overrides))


def test_fsd_backbone_shapes_match_output_shape(compose_cfg, genotypes):
    cfg = _cfg(compose_cfg, "train_bone", f"model.genotype_bone={genotypes[0]}", "model.normal_cells_per_stage=2")
    backbone = build_backbone(cfg)
    bottom_up = backbone.bottom_up
    # 3 stages x (2 normal + 1 reduction) cells; 4 nodes x C doubling per stage
    assert len(bottom_up.cells) == 9
    shapes = bottom_up.output_shape()
    assert [shapes[n].stride for n in ("res2", "res3", "res4", "res5")] == [4, 8, 16, 32]
    assert [shapes[n].channels for n in ("res3", "res4", "res5")] == [4 * 8, 4 * 16, 4 * 32]
    feats = bottom_up(torch.randn(1, 3, 64, 64))
    for name, spec in shapes.items():
        assert feats[name].shape[1] == spec.channels and feats[name].shape[-1] == 64 // spec.stride
    out = backbone(torch.randn(1, 3, 64, 64))
    assert sorted(out) == ["p2", "p3", "p4", "p5", "p6"]
    assert not isinstance(bottom_up, Searchable), "a derived backbone has no alphas"
    assert bottom_up.genotype.cells["reduce"] == BONE_CELL and bottom_up.genotype.pool == "bone8"


def test_search_backbone_has_one_shared_alpha(compose_cfg):
    backbone = build_backbone(_cfg(compose_cfg, "search_bone"))
    arch = backbone.bottom_up.arch_parameters()
    assert [tuple(a.shape) for a in arch] == [(14, 8)]
    alpha_ids = {id(a) for a in arch}
    assert all(p.shape != (14, 8) for p in backbone.parameters() if id(p) not in alpha_ids)
    assert backbone(torch.randn(1, 3, 64, 64))["p6"].shape[-1] == 1
    genotype = backbone.bottom_up.genotype()
    assert genotype.pool == "bone8" and list(genotype.cells) == ["reduce"]


@pytest.mark.parametrize("stage", ["search_head", "train_fsd"])
def test_fsd_box_heads_return_flat_features(compose_cfg, genotypes, stage):
    extra = [f"model.genotype_head={genotypes[1]}", "model.head_extra_normal_cells=2"] if stage == "train_fsd" else []
    cfg = _cfg(compose_cfg, stage, f"model.genotype_bone={genotypes[0]}", *extra)
    head = ROI_BOX_HEAD_REGISTRY.get(cfg.MODEL.ROI_BOX_HEAD.NAME)(cfg, ShapeSpec(channels=32, height=8, width=8))
    out = head(torch.randn(5, 32, 8, 8))
    assert out.shape == (5, head.output_shape.channels)
    assert head.output_shape.channels == 4 * 8 * 4 * 4  # 4 nodes x C=8, 8x8 pooled -> 4x4
    if stage == "train_fsd":
        assert len(head.cells) == 4  # the paper's head: 2 extra normal + searched normal + searched reduction
    if stage == "search_head":
        assert [tuple(a.shape) for a in head.arch_parameters()] == [(14, 13), (14, 13)]
        assert sorted(head.genotype().cells) == ["normal", "reduce"]
    else:
        assert not isinstance(head, Searchable) and head.genotype.cells["normal"] == HEAD_NORMAL


def _losses_and_backward(model):
    """One training forward-backward pass on a 64 px image with one lesion; returns the loss dict."""
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage

    torch.manual_seed(0)
    model.train()
    inst = Instances((64, 64), gt_boxes=Boxes(torch.tensor([[10.0, 12.0, 30.0, 28.0]])), gt_classes=torch.tensor([0]))
    batch = [{"image": torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8), "instances": inst}]
    with EventStorage():
        losses = model(batch)
    sum(losses.values()).backward()
    return losses


def _assert_gradients_reach_every_cell(cells):
    """Every parameter of every cell has a finite gradient, and each cell's gradient is not all zero."""
    for i, cell in enumerate(cells):
        named = list(cell.named_parameters())
        assert named, f"cell {i} has no parameters"
        missing = [n for n, p in named if p.grad is None]
        assert not missing, f"cell {i}: no gradient reaches {missing}"
        assert all(torch.isfinite(p.grad).all() for _, p in named), f"cell {i}: a gradient is not finite"
        assert sum(p.grad.abs().sum() for _, p in named) > 0, f"cell {i}: every gradient is zero"


def test_whole_fsd_detector_trains_a_step(compose_cfg, genotypes):
    cfg = _cfg(compose_cfg, "train_fsd", f"model.genotype_bone={genotypes[0]}", f"model.genotype_head={genotypes[1]}")
    model = build_model(cfg)
    losses = _losses_and_backward(model)
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}
    assert all(torch.isfinite(v) for v in losses.values()), losses
    _assert_gradients_reach_every_cell(model.backbone.bottom_up.cells)
    _assert_gradients_reach_every_cell(model.roi_heads.box_head.cells)


@pytest.mark.parametrize("stage", ["search_bone", "search_head"])
def test_search_detectors_pass_gradients_to_every_cell_and_their_alphas(compose_cfg, genotypes, stage):
    cfg = _cfg(compose_cfg, stage, f"model.genotype_bone={genotypes[0]}")
    model = build_model(cfg)
    losses = _losses_and_backward(model)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    searched = model.backbone.bottom_up if stage == "search_bone" else model.roi_heads.box_head
    _assert_gradients_reach_every_cell(searched.cells)
    for alpha in searched.arch_parameters():
        assert torch.isfinite(alpha.grad).all() and alpha.grad.abs().sum() > 0


def test_genotype_of_the_wrong_search_is_named(compose_cfg, genotypes):
    bone, head = genotypes
    with pytest.raises(GenotypeError, match="normal"):
        ROI_BOX_HEAD_REGISTRY.get("FSDBoxHead")(
            _cfg(compose_cfg, "train_fsd", f"model.genotype_bone={bone}", f"model.genotype_head={bone}"),
            ShapeSpec(channels=32, height=8, width=8))
    with pytest.raises(GenotypeError, match="se|non_local|pool"):  # head13 ops are not in the bone8 pool
        build_backbone(_cfg(compose_cfg, "train_bone", f"model.genotype_bone={head}"))
    with pytest.raises(ConfigError, match="pooler resolution must be even"):
        ROI_BOX_HEAD_REGISTRY.get("FSDSearchBoxHead")(_cfg(compose_cfg, "search_head"), ShapeSpec(channels=32, height=7, width=7))


def test_fsd_box_head_is_configurable_without_a_cfg():
    genotype = Genotype(pool="head13", cells={"normal": HEAD_NORMAL, "reduce": BONE_CELL})
    head = ROI_BOX_HEAD_REGISTRY.get("FSDBoxHead")(ShapeSpec(channels=16, height=4, width=4), genotype=genotype,
                                                   channels=4, extra_normal_cells=0)
    assert len(head.cells) == 2 and head(torch.randn(2, 16, 4, 4)).shape == (2, 4 * 4 * 2 * 2)  # searched pair only
