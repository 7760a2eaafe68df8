"""Hydra composition and the Hydra -> Detectron2 CfgNode conversion."""
import subprocess
import sys
from pathlib import Path

import pytest
from detectron2.config import get_cfg
from hydra import compose, initialize_config_dir

from fsd_d2.config import ConfigError, add_fsd_config, anchor_sizes, apply_epoch_schedule, build_cfg


def test_composes_every_stage_with_its_model(compose_cfg):
    expected = {"train": "fpn_r50", "search_bone": "fsd_search_bone", "train_bone": "fsd_bone",
                "search_head": "fsd_search_head", "train_fsd": "fsd"}
    for stage, model in expected.items():
        hcfg = compose_cfg(stage)
        assert hcfg.stage.name == stage
        assert hcfg.model.name == model


def test_cli_model_override_beats_the_stage_default(compose_cfg):
    assert compose_cfg("train_bone", "model=fpn_r50").model.name == "fpn_r50"


def test_cfgnode_carries_the_paper_defaults(compose_cfg):
    cfg = build_cfg(compose_cfg("train", "solver.ims_per_batch=4"))
    assert cfg.SOLVER.BASE_LR == pytest.approx(0.005 * 4)  # lr per image x batch
    assert cfg.SOLVER.MOMENTUM == 0.9
    assert cfg.MODEL.ANCHOR_GENERATOR.SIZES[0] == [8.0, 12.0, 16.0, 24.0, 48.0]  # scales x stride 4
    assert cfg.MODEL.ANCHOR_GENERATOR.SIZES[-1] == [128.0, 192.0, 256.0, 384.0, 768.0]  # x stride 64
    assert cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS == [[0.5, 1.0, 2.0]]
    assert cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
    assert cfg.MODEL.BACKBONE.NAME == "build_resnet_fpn_backbone"
    assert cfg.MODEL.RESNETS.DEPTH == 50
    assert cfg.FSD_STAGE == "train" and cfg.WANDB.JOB_TYPE == "train"
    assert cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE == 32  # from the experiment's d2 section


def test_gradient_clipping_is_off_by_default_and_one_key_turns_it_on(compose_cfg):
    assert not build_cfg(compose_cfg("train")).SOLVER.CLIP_GRADIENTS.ENABLED  # the paper clips nothing
    clip = build_cfg(compose_cfg("train", "solver.clip_grad_norm=5")).SOLVER.CLIP_GRADIENTS
    assert clip.ENABLED and clip.CLIP_TYPE == "norm" and clip.CLIP_VALUE == 5.0


def test_paper_short_side_is_512_without_the_tiny_experiment():
    conf_dir = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(version_base="1.3", config_dir=str(conf_dir)):
        hcfg = compose("config", overrides=["+stage=train", "output_dir=/tmp/x", "dataset=deeplesion"])
    cfg = build_cfg(hcfg)
    assert cfg.INPUT.MIN_SIZE_TRAIN == (512,) and cfg.INPUT.MIN_SIZE_TEST == 512


def test_search_stage_gets_search_solver_and_pool(compose_cfg):
    cfg = build_cfg(compose_cfg("search_bone", "solver.ims_per_batch=2"))
    assert cfg.SOLVER.BASE_LR == pytest.approx(0.02)
    assert cfg.SOLVER.WEIGHT_DECAY == pytest.approx(3e-4)
    assert cfg.SEARCH.ARCH_BASE_LR == pytest.approx(0.0048)
    assert cfg.SEARCH.ORDER == 2
    assert cfg.MODEL.FSD.BONE_POOL_NAME == "bone8" and "none" in cfg.MODEL.FSD.BONE_POOL
    assert len(cfg.MODEL.FSD.BONE_POOL) == 8


def test_raw_detectron2_override(compose_cfg):
    cfg = build_cfg(compose_cfg("train", "+d2.MODEL.RPN.NMS_THRESH=0.6", "+d2.MODEL.ROI_HEADS.NAME=StandardROIHeads"))
    assert cfg.MODEL.RPN.NMS_THRESH == pytest.approx(0.6)


def test_unknown_keys_get_clear_errors(compose_cfg):
    with pytest.raises(ConfigError, match="d2 override rejected"):
        build_cfg(compose_cfg("train", "+d2.MODEL.NOT_A_KEY=1"))
    with pytest.raises(ConfigError, match="model.not_a_key is not a key"):
        build_cfg(compose_cfg("train", "+model.not_a_key=1"))


def test_epoch_schedule_in_iterations():
    cfg = get_cfg()
    add_fsd_config(cfg)
    cfg.SOLVER.IMS_PER_BATCH = 2
    ipe = apply_epoch_schedule(cfg, 10)
    assert ipe == 5
    assert cfg.SOLVER.MAX_ITER == 65  # (1 warm-up + 12) epochs
    assert cfg.SOLVER.WARMUP_ITERS == 5
    assert cfg.SOLVER.STEPS == (45, 60)  # epochs 8 and 11 after warm-up
    with pytest.raises(ConfigError, match="no images"):
        apply_epoch_schedule(cfg, 0)


def test_anchor_sizes():
    assert anchor_sizes([2, 3], [4, 8]) == [[8.0, 12.0], [16.0, 24.0]]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fsd_d2.run", *args], capture_output=True, text=True, timeout=300)


def test_cli_errors_are_messages_not_tracebacks(tmp_path):
    unknown = _cli("+stage=no_such_stage")
    assert unknown.returncode != 0
    assert "Could not find 'stage/no_such_stage'" in unknown.stderr and "train" in unknown.stderr
    missing = _cli(f"hydra.run.dir={tmp_path}/a")
    assert missing.returncode == 2
    assert "no stage chosen: add +stage=<name>" in missing.stderr and "Traceback" not in missing.stderr
    bad_key = _cli("+stage=train", "+d2.MODEL.NOT_A_KEY=1", f"hydra.run.dir={tmp_path}/b")
    assert bad_key.returncode == 2 and "d2 override rejected" in bad_key.stderr
