"""Checkpoints record the genotypes of a derived FSD and loading checks them: parameter shapes cannot tell
``conv_3x3`` from ``dil_conv_3x3_d3`` (nor one pooling from another)."""
import pytest
import torch
from detectron2.modeling import build_model

from fsd_d2.config import build_cfg
from fsd_d2.engine.checkpoint import AtomicCheckpointer, architecture_from_checkpoint
from fsd_d2.errors import CheckpointError
from fsd_d2.nas.genotype import CellGenotype, Genotype, genotype_differences, load_genotype, save_genotype

TRAINED = CellGenotype([[("dw_sep_conv_3x3", 0), ("conv_3x3", 1)], [("skip_connect", 0), ("conv_3x3", 2)],
                        [("skip_connect", 1), ("skip_connect", 3)], [("skip_connect", 4), ("skip_connect", 1)]])
# The same parameter shapes: a dilated 3x3 convolution has the weights of a plain one.
DILATED = CellGenotype([[("dw_sep_conv_3x3", 0), ("dil_conv_3x3_d3", 1)], *TRAINED.edges[1:]])


def _bone_model(compose_cfg, tmp_path, cell, name):
    path = save_genotype(Genotype("bone8", {"reduce": cell}), tmp_path / f"{name}.yaml")
    cfg = build_cfg(compose_cfg("train_bone", f"model.genotype_bone={path}", output_dir=tmp_path / name))
    return cfg, build_model(cfg)


@pytest.fixture
def trained_checkpoint(compose_cfg, tmp_path):
    _, model = _bone_model(compose_cfg, tmp_path, TRAINED, "trained")
    (tmp_path / "trained").mkdir()
    AtomicCheckpointer(model, str(tmp_path / "trained")).save("model_final")
    return str(tmp_path / "trained" / "model_final.pth")


def test_a_checkpoint_of_another_genotype_is_refused_even_with_equal_shapes(compose_cfg, tmp_path, trained_checkpoint):
    _, model = _bone_model(compose_cfg, tmp_path, DILATED, "dilated")
    expected = r"another architecture.*\n  bone: file cell reduce node 0 edge 1: conv_3x3\(c_\{k-1\}\) vs " \
               r"dil_conv_3x3_d3\(c_\{k-1\}\)"
    with pytest.raises(CheckpointError, match=expected):
        AtomicCheckpointer(model).load_matching(trained_checkpoint)
    with pytest.raises(CheckpointError, match=expected):  # resume reads the same record
        AtomicCheckpointer(model).load(trained_checkpoint, checkpointables=[])
    _, same = _bone_model(compose_cfg, tmp_path, TRAINED, "same")
    AtomicCheckpointer(same).load_matching(trained_checkpoint)
    key = "backbone.bottom_up.cells.0.ops.0.1.1.weight"  # the conv_3x3 of node 0 (ReLU, Conv, BN)
    assert torch.equal(same.state_dict()[key], torch.load(trained_checkpoint)["model"][key])


def test_a_baseline_refuses_a_checkpoint_of_a_derived_backbone(compose_cfg, tmp_path, trained_checkpoint):
    fpn = build_model(build_cfg(compose_cfg("train")))
    with pytest.raises(CheckpointError, match="holds an FSD bone but the model has none"):
        AtomicCheckpointer(fpn).load_matching(trained_checkpoint)


def test_the_genotype_can_come_from_the_checkpoint(compose_cfg, tmp_path, trained_checkpoint):
    cfg = build_cfg(compose_cfg("train_bone", output_dir=tmp_path / "eval"))
    assert cfg.MODEL.FSD.GENOTYPE_BONE == ""
    architecture_from_checkpoint(cfg, trained_checkpoint)
    assert cfg.MODEL.FSD.GENOTYPE_BONE == str(tmp_path / "eval" / "genotype_bone.yaml")
    assert load_genotype(cfg.MODEL.FSD.GENOTYPE_BONE).cells["reduce"] == TRAINED
    AtomicCheckpointer(build_model(cfg)).load_matching(trained_checkpoint)


def test_pooling_choices_are_told_apart():
    avg = CellGenotype([[("avg_pool_3x3", 0), ("se", 1)]] * 4)
    mx = CellGenotype([[("max_pool_3x3", 0), ("se", 1)]] * 4)
    diffs = genotype_differences(Genotype("head13", {"normal": avg}), Genotype("head13", {"normal": mx}))
    assert diffs[0] == "cell normal node 0 edge 0: avg_pool_3x3(c_{k-2}) vs max_pool_3x3(c_{k-2})" and len(diffs) == 4
