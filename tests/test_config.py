"""Hydra composition and the Hydra -> Detectron2 CfgNode conversion."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from fsd_d2.config import (D2, DERIVED_KEYS, FRIENDLY_KEYS, KEYS, VALUE_RULES, anchor_sizes, apply_dataset_size,
                           base_cfg, build_cfg)
from fsd_d2.config.keys import MOVED, RUN_KEYS, get_value
from fsd_d2.errors import ConfigError


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
    assert cfg.MODEL.ROI_HEADS.IN_FEATURES == ["p2", "p3", "p4", "p5"]  # Detectron2's Base-RCNN-FPN.yaml


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
    assert cfg.SEARCH.ARCH_LR_PER_IMAGE == pytest.approx(0.0024)  # per image, never rescaled in place
    assert cfg.SEARCH.ARCH_BASE_LR == pytest.approx(0.0048)
    assert cfg.SEARCH.ORDER == 2
    assert cfg.MODEL.FSD.BONE_POOL_NAME == "bone8" and "none" in cfg.MODEL.FSD.BONE_POOL
    assert len(cfg.MODEL.FSD.BONE_POOL) == 8


def test_the_pools_come_from_the_search_space_group_alone(compose_cfg):
    """The Hydra group is the pools' one default: both pools follow its overrides, and without one the config is
    refused naming the override to give (the CfgNode keys hold no pool of their own)."""
    assert base_cfg().MODEL.FSD.BONE_POOL == [] and base_cfg().MODEL.FSD.HEAD_POOL == []
    fsd = build_cfg(compose_cfg("search_head")).MODEL.FSD
    assert (fsd.BONE_POOL_NAME, fsd.HEAD_POOL_NAME, len(fsd.HEAD_POOL)) == ("bone8", "head13", 13)
    fsd = build_cfg(compose_cfg("search_bone", "search_space=head13", "search_space@head_search_space=bone8")).MODEL.FSD
    assert (fsd.BONE_POOL_NAME, len(fsd.BONE_POOL), fsd.HEAD_POOL_NAME, len(fsd.HEAD_POOL)) == ("head13", 13, "bone8", 8)
    fsd = build_cfg(compose_cfg("search_bone", "search_space.ops=[none,skip_connect]",
                                "head_search_space.ops=[none,se]")).MODEL.FSD
    assert (fsd.BONE_POOL, fsd.HEAD_POOL) == (["none", "skip_connect"], ["none", "se"])
    with pytest.raises(ConfigError, match=r"search_space.ops=\[\]: must be the backbone pool's operations: choose a "
                                          r"pool with search_space=<name> \(packaged: bone8, head13"):
        build_cfg(compose_cfg("search_bone", "~search_space"))
    with pytest.raises(ConfigError, match=r"head_search_space.ops=\[\]: .*search_space@head_search_space=<name>"):
        build_cfg(compose_cfg("search_head", "~search_space@head_search_space"))


def test_the_search_settings_are_in_the_search_group_and_their_former_names_stop(compose_cfg):
    """search.order and search.arch_lr_per_image were solver.*: Hydra still takes a former name (the generated
    solver/base holds it as null), and build_cfg stops it in one line naming the new key."""
    cfg = build_cfg(compose_cfg("search_bone", "search.order=1", "search.arch_lr_per_image=0.001"))
    assert cfg.SEARCH.ORDER == 1 and cfg.SEARCH.ARCH_LR_PER_IMAGE == pytest.approx(0.001)
    assert build_cfg(compose_cfg("search_bone")).SEARCH.ORDER == 2  # the declared default; the former name's null
    for given, message in [("solver.order=1", r"^solver\.order is now search\.order: set search\.order=1 instead$"),
                           ("solver.arch_lr_per_image=0.001", r"^solver\.arch_lr_per_image is now search\."
                                                              r"arch_lr_per_image: set search\.arch_lr_per_image=0\.001"
                                                              r" instead$"),
                           ("+d2.SEARCH.ORDER=1", r"SEARCH\.ORDER has a friendly key; set search\.order=")]:
        with pytest.raises(ConfigError, match=message):
            build_cfg(compose_cfg("search_bone", given))


def test_raw_detectron2_override(compose_cfg):
    cfg = build_cfg(compose_cfg("train", "+d2.MODEL.RPN.NMS_THRESH=0.6"))
    assert cfg.MODEL.RPN.NMS_THRESH == pytest.approx(0.6)


def test_unknown_keys_get_clear_errors(compose_cfg):
    with pytest.raises(ConfigError, match="d2 override rejected.*MODEL.NOT_A_KEY is not a Detectron2 key"):
        build_cfg(compose_cfg("train", "+d2.MODEL.NOT_A_KEY=1"))
    with pytest.raises(ConfigError, match="model.not_a_key is not a key"):
        build_cfg(compose_cfg("train", "+model.not_a_key=1"))


def test_values_are_type_checked_against_their_defaults(compose_cfg):
    with pytest.raises(ConfigError, match=r"solver.ims_per_batch='two': expected a int like the default 2"):
        build_cfg(compose_cfg("train", "solver.ims_per_batch=two"))
    assert build_cfg(compose_cfg("train", "solver.lr_per_image=1")).SOLVER.BASE_LR == 2.0  # int accepted for float
    with pytest.raises(ConfigError, match=r"solver.lr_per_image=inf: must be > 0"):
        build_cfg(compose_cfg("train", "solver.lr_per_image=inf"))


def test_the_box_check_named_in_its_error_is_a_key(compose_cfg):
    assert build_cfg(compose_cfg("train", "dataset.check_boxes=false")).DEEPLESION.BOX_PAD_CHECK is False


def test_derived_values_follow_their_inputs_however_they_are_set(compose_cfg):
    cfg = build_cfg(compose_cfg("train", "+d2.MODEL.RPN.IN_FEATURES=[p3,p4]", "model.anchor_scales=[1,2]"))
    assert cfg.MODEL.ANCHOR_GENERATOR.SIZES == [[8.0, 16.0], [16.0, 32.0]]  # strides 8 and 16 of p3, p4
    cfg = build_cfg(compose_cfg("search_bone", "solver.ims_per_batch=8", "search.arch_lr_per_image=0.001"))
    assert cfg.SOLVER.BASE_LR == pytest.approx(0.08) and cfg.SEARCH.ARCH_BASE_LR == pytest.approx(0.008)
    assert build_cfg(compose_cfg("train", "dataset.short_side=96")).INPUT.MIN_SIZE_TEST == 96


@pytest.mark.parametrize("key, hint", [("SOLVER.BASE_LR", "solver.lr_per_image"),
                                       ("MODEL.ANCHOR_GENERATOR.SIZES", "model.anchor_scales"),
                                       ("SOLVER.MAX_ITER", "solver.epochs"),
                                       ("MODEL.ROI_HEADS.NUM_CLASSES", "dataset.train")])
def test_a_derived_key_cannot_be_set_by_hand(compose_cfg, key, hint):
    assert key in DERIVED_KEYS
    with pytest.raises(ConfigError, match=rf"{key} is derived; set {hint}"):
        build_cfg(compose_cfg("train", f"+d2.{key}=1"))


def test_a_raw_key_with_a_friendly_name_points_to_it(compose_cfg):
    with pytest.raises(ConfigError, match=r"SOLVER.IMS_PER_BATCH has a friendly key; set solver.ims_per_batch"):
        build_cfg(compose_cfg("train", "+d2.SOLVER.IMS_PER_BATCH=8"))


def test_yaml_options_list_only_what_they_change():
    """Defaults live in their declarations (fsd_d2/config/keys.py): no group option repeats a base value."""
    import yaml

    conf_dir = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(version_base="1.3", config_dir=str(conf_dir)):
        for group in ("dataset", "model", "solver", "logger"):
            base = compose("config", overrides=["+stage=train", "output_dir=/tmp/x", f"{group}=base"])[group]
            for path in sorted((conf_dir / group).glob("*.yaml")):
                own = yaml.safe_load(path.read_text())
                repeated = [k for k, v in own.items() if k not in ("defaults", "name") and base.get(k) == v]
                assert not repeated, f"{path.name} repeats base values {repeated}"


def test_model_configs_share_a_base_not_the_pipeline_order(compose_cfg):
    """fsd does not inherit the head search's frozen backbone; each model states only its own parts."""
    fsd = compose_cfg("train_fsd").model
    assert fsd.freeze_backbone is False and fsd.box_head == "FSDBoxHead"
    assert compose_cfg("search_head").model.freeze_backbone is True


def test_epoch_schedule_in_iterations():
    cfg = base_cfg()
    cfg.SOLVER.IMS_PER_BATCH = 2
    ipe = apply_dataset_size(cfg, 10)
    assert ipe == 5
    assert cfg.SOLVER.MAX_ITER == 65  # (1 warm-up + 12) epochs
    assert cfg.SOLVER.WARMUP_ITERS == 5
    assert cfg.SOLVER.STEPS == (45, 60)  # epochs 8 and 11 after warm-up
    with pytest.raises(ConfigError, match="no images"):
        apply_dataset_size(cfg, 0)


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


def test_an_unknown_split_name_is_a_message_naming_the_splits(compose_cfg):
    from fsd_d2.engine.runner import run_stage
    with pytest.raises(ConfigError, match=r"no split is named 'deeplesion_tst'; the dataset's splits are "
                                          r"\['deeplesion_test', 'deeplesion_train', "):
        run_stage(compose_cfg("eval", "dataset.test=[deeplesion_tst]"))


def test_only_user_errors_are_one_line_messages(tmp_path, monkeypatch):
    """A bug (any exception that is not an FSDError) keeps its traceback and is not called a user error."""
    from fsd_d2 import run

    def broken(hcfg):
        raise KeyError("library bug")

    monkeypatch.setattr(run, "run_stage", broken)
    with pytest.raises(KeyError, match="library bug"):
        run.main.__wrapped__(None)

    def user_error(hcfg):
        raise ConfigError("solver.x is wrong; set it right")

    monkeypatch.setattr(run, "run_stage", user_error)
    with pytest.raises(SystemExit) as exit_info:
        run.main.__wrapped__(None)
    assert exit_info.value.code == 2


def test_group_norm_widths_are_checked_before_torch(compose_cfg):
    with pytest.raises(ConfigError, match=r"multiples of 32; d2.MODEL.RESNETS.WIDTH_PER_GROUP=16 is not"):
        build_cfg(compose_cfg("train", "+d2.MODEL.RESNETS.WIDTH_PER_GROUP=16"))


def test_adamw_is_one_key_away_and_keeps_gradient_clipping(compose_cfg):
    from detectron2.modeling import build_model

    from fsd_d2.engine.train import FSDTrainer

    cfg = build_cfg(compose_cfg("train", "solver.optimizer=adamw", "solver.clip_grad_norm=5"))
    optimizer = FSDTrainer.build_optimizer(cfg, build_model(cfg))
    assert isinstance(optimizer, torch.optim.AdamW) and type(optimizer).__name__ != "AdamW"  # clipping subclass
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.SOLVER.BASE_LR)
    sgd = FSDTrainer.build_optimizer(build_cfg(compose_cfg("train")), build_model(cfg))
    assert type(sgd) is torch.optim.SGD  # the paper's optimizer stays the default
    with pytest.raises(ConfigError, match="solver.optimizer='adam': must be sgd or adamw"):
        build_cfg(compose_cfg("train", "solver.optimizer=adam"))


def test_mixed_precision_is_one_key_on_cuda_and_refused_on_cpu(compose_cfg):
    assert build_cfg(compose_cfg("train", "device=cuda", "solver.amp=true")).SOLVER.AMP.ENABLED
    assert not build_cfg(compose_cfg("train")).SOLVER.AMP.ENABLED  # off unless asked for
    with pytest.raises(ConfigError, match="solver.amp=true: mixed precision is for CUDA"):
        build_cfg(compose_cfg("search_bone", "solver.amp=true"))


# Settable numeric keys that take any value, or are checked where they are used: why each has no declared check.
UNCHECKED_NUMBERS = {
    "SEED": "any integer",
    "MODEL.RESNETS.DEPTH": "Detectron2 refuses a depth it has no ResNet for when it builds the model",
    "MODEL.RPN.POST_NMS_TOPK_TEST": "any count; 0 keeps no proposals, a valid if useless model",
    "SOLVER.STEP_EPOCHS": "checked against solver.epochs (fsd_d2.config.validate.check_values)",
    "SEARCH.ARCH_BETAS": "a DARTS constant, a raw +d2 override only",
    "SEARCH.FD_EPSILON": "a DARTS constant, a raw +d2 override only",
    "DEEPLESION.PATIENTS": "any Patient_index values",
    **{k.key: "SyntheticParams.check" for k in KEYS if k.key.startswith("DEEPLESION.SYNTHETIC.")},
}


def _numeric(value) -> bool:
    if isinstance(value, (list, tuple)):
        return bool(value) and all(_numeric(v) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def test_every_declared_key_has_a_default_a_name_and_a_check():
    """One declaration per key (fsd_d2/config/keys.py): a default (or Detectron2's), a name where users set it (a
    derived key: the name of what to set instead), and a check where a value can be wrong."""
    cfg = base_cfg()
    keys = [k.key for k in KEYS]
    assert len(keys) == len(set(keys)), "a key declared twice"
    names = [k.name for k in KEYS if k.name]
    assert len(names) == len(set(names)), "a friendly name given to two keys"
    assert not set(MOVED) & set(names), "a former name is some key's current name"
    user_names = set(names) | {"+stage"}
    for k in KEYS:
        value = get_value(cfg, k.key)  # a KeyError: neither declared with a default nor one of Detectron2's
        assert k.default is D2 or value == k.default or k.key in DERIVED_KEYS, k.key
        if k.derived:
            assert not k.name and not k.check, f"{k.key} is derived: users set {k.derived}, not the key"
            assert any(n in k.derived for n in user_names), f"{k.key}: '{k.derived}' names no key users set"
            continue
        if k.name:
            assert (FRIENDLY_KEYS[k.group][k.name.split(".", 1)[1]] if k.group else RUN_KEYS[k.name]) == k.key
        if _numeric(value) and k.key not in UNCHECKED_NUMBERS:
            assert k.key in VALUE_RULES, f"{k.key}={value!r} can be set wrong: declare its check"
    assert not set(UNCHECKED_NUMBERS) & set(VALUE_RULES), "a key listed as unchecked has a check"


def test_declared_defaults_are_fresh_per_config():
    """Mutable defaults (lists) are copied from the declaration: one config's edit never reaches the next."""
    first = base_cfg()
    first.DEEPLESION.PATIENTS.append(7)
    first.MODEL.ANCHOR_GENERATOR.STRIDE_MULTIPLES[0] = 99.0
    second = base_cfg()
    assert second.DEEPLESION.PATIENTS == [] and second.MODEL.ANCHOR_GENERATOR.STRIDE_MULTIPLES[0] == 2.0


def test_a_declared_key_reaches_its_group_base_and_its_check(compose_cfg):
    """search.latency_target_ms is one declaration: the generated search/base offers it, build_cfg sets it and its
    check names it."""
    hcfg = compose_cfg("train", "search.latency_target_ms=12.5")
    assert build_cfg(hcfg).SEARCH.LATENCY_TARGET_MS == 12.5
    assert compose_cfg("train").search.latency_target_ms == 0.0
    with pytest.raises(ConfigError, match=r"search.latency_target_ms=-1.0: must be >= 0 ms \(0: no latency target\)"):
        build_cfg(compose_cfg("train", "search.latency_target_ms=-1"))
