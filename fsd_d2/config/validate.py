"""Refuse impossible values and forbidden raw overrides with the key a user wrote, before anything is built."""
from detectron2.config import CfgNode as CN

from fsd_d2.config.keys import DERIVED_KEYS, FRIENDLY_NAME_OF, VALUE_RULES, friendly_name, get_value
from fsd_d2.errors import ConfigError

# What the format of ImageNet weights fixes (model.init=imagenet); a raw override of these would contradict the file.
IMAGENET_FORMAT_KEYS = ("MODEL.RESNETS.STRIDE_IN_1X1", "INPUT.FORMAT", "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD")


def check_raw_key(key: str, cfg: CN) -> None:
    """A raw ``d2.`` key may not set a derived key, nor one that has a friendly name (one home per value)."""
    if key in DERIVED_KEYS:
        raise ConfigError(f"d2 override rejected: {key} is derived; set {DERIVED_KEYS[key]} instead")
    if key in FRIENDLY_NAME_OF:
        raise ConfigError(f"d2 override rejected: {key} has a friendly key; set {FRIENDLY_NAME_OF[key]}=... instead")
    if key in IMAGENET_FORMAT_KEYS and cfg.MODEL.INIT == "imagenet":
        raise ConfigError(f"d2 override rejected: with model.init=imagenet, {key} follows the format of model.weights "
                          f"(caffe2 R-50.pkl or torchvision resnet50-*.pth: fsd_d2.modeling.pretrained"
                          f".IMAGENET_FORMATS); drop the override")


def check_values(cfg: CN) -> None:
    """Refuse impossible values with the key a user wrote, before they turn into tracebacks far away."""
    for key, (valid, expected) in VALUE_RULES.items():
        value = get_value(cfg, key)
        if not valid(value):
            raise ConfigError(f"{friendly_name(key)}={value!r}: must be {expected}")
    if cfg.SOLVER.AMP.ENABLED and cfg.MODEL.DEVICE == "cpu":
        raise ConfigError("solver.amp=true: mixed precision is for CUDA (device=cuda); on a CPU it stays off, where "
                          "the float16/bfloat16 kernels are slower than float32")
    steps = [e for e in cfg.SOLVER.STEP_EPOCHS if not 0 < e <= cfg.SOLVER.EPOCHS]
    if steps:
        raise ConfigError(f"solver.step_epochs={list(cfg.SOLVER.STEP_EPOCHS)}: {steps} lie outside the "
                          f"{cfg.SOLVER.EPOCHS} epochs after warm-up (solver.epochs)")
