"""Derivation: the values that follow from others (:data:`fsd_d2.config.keys.DERIVED_KEYS`), set after every override
(:func:`derive`), and those that need the model's weights or the registered dataset (:func:`apply_init`,
:func:`apply_num_classes`, :func:`apply_dataset_size`)."""
import math
import os
from typing import List

from detectron2.config import CfgNode as CN

from fsd_d2.errors import ConfigError, MissingFileError
from fsd_d2.modeling.pretrained import IMAGENET_FORMATS, imagenet_format_of, read_weights_file


def anchor_sizes(scales: List[float], strides: List[int]) -> List[List[float]]:
    """Turn the paper's octave scales ("2, 3, 4, 6, 12") into Detectron2's absolute sizes per FPN level.

    The paper (mmdetection-style) multiplies each scale by the level's stride; Detectron2 wants pixels.
    """
    return [[float(s * stride) for s in scales] for stride in strides]


def _level_stride(feature: str) -> int:
    """FPN level ``p<k>`` has stride 2^k."""
    if not (feature.startswith("p") and feature[1:].isdigit()):
        raise ConfigError(f"MODEL.RPN.IN_FEATURES has '{feature}'; anchor sizes need FPN levels named p2..p6")
    return 2 ** int(feature[1:])


def derive(cfg: CN) -> None:
    """The values that follow from others (see DERIVED_KEYS), after every override."""
    cfg.WANDB.JOB_TYPE = cfg.FSD_STAGE
    anchors = cfg.MODEL.ANCHOR_GENERATOR
    anchors.SIZES = anchor_sizes(anchors.STRIDE_MULTIPLES, [_level_stride(f) for f in cfg.MODEL.RPN.IN_FEATURES])
    if anchors.ASPECT_RATIOS and not isinstance(anchors.ASPECT_RATIOS[0], (list, tuple)):
        anchors.ASPECT_RATIOS = [list(anchors.ASPECT_RATIOS)]  # one set for every level
    _derive_init(cfg)
    cfg.INPUT.MIN_SIZE_TRAIN = (int(cfg.INPUT.SHORT_SIDE),)
    cfg.INPUT.MIN_SIZE_TEST = int(cfg.INPUT.SHORT_SIDE)
    cfg.INPUT.MAX_SIZE_TEST = cfg.INPUT.MAX_SIZE_TRAIN
    cfg.SOLVER.BASE_LR = cfg.SOLVER.LR_PER_IMAGE * cfg.SOLVER.IMS_PER_BATCH
    cfg.SEARCH.ARCH_BASE_LR = cfg.SEARCH.ARCH_LR_PER_IMAGE * cfg.SOLVER.IMS_PER_BATCH
    clip = cfg.SOLVER.CLIP_GRADIENTS
    clip.ENABLED = cfg.SOLVER.CLIP_GRAD_NORM > 0
    if clip.ENABLED:
        clip.CLIP_TYPE, clip.CLIP_VALUE = "norm", float(cfg.SOLVER.CLIP_GRAD_NORM)


def _derive_init(cfg: CN) -> None:
    """ResNet norm, frozen stages and input format from ``model.init`` (and ``model.weights``' format)."""
    if cfg.MODEL.INIT == "imagenet":
        # model.weights may be empty: eval, search_head and finetune_graph load a checkpoint instead (which records
        # its format, fsd_d2.engine.checkpoint); a fresh run stops where the weights are loaded.
        apply_init(cfg, "imagenet", _weights_format(cfg.MODEL.WEIGHTS) if cfg.MODEL.WEIGHTS else "caffe2")
    elif cfg.MODEL.INIT == "scratch":
        if cfg.MODEL.WEIGHTS:
            raise ConfigError(f"model.weights={cfg.MODEL.WEIGHTS} is set but model.init=scratch ignores it; add "
                              f"model.init=imagenet to start from it, or drop model.weights")
        apply_init(cfg, "scratch", "")
        _check_group_norm_widths(cfg.MODEL.RESNETS)
    else:
        raise ConfigError(f"model.init={cfg.MODEL.INIT!r}: must be scratch or imagenet (with model.weights=...)")


def _weights_format(path: str) -> str:
    if not os.path.isfile(path):
        raise MissingFileError(f"model.weights={path} does not exist; pass the ImageNet R-50.pkl or resnet50-*.pth "
                               f"on disk (nothing is downloaded)")
    return imagenet_format_of(path, read_weights_file(path, f"model.weights={path}"))


def apply_init(cfg: CN, init: str, imagenet_format: str) -> None:
    """Set what ``model.init`` (and the ImageNet weights' format) decide. ImageNet: Detectron2's defaults (FrozenBN,
    stem + res2 frozen) and the stride, channel order and pixel statistics the weights were trained with. From
    scratch there is nothing pretrained to keep frozen, and FrozenBN would freeze random statistics; GroupNorm
    trains with the small per-GPU batches of 512-px CT slices. Layers outside the ResNet (FSD cells, heads) keep
    their own norms either way."""
    cfg.MODEL.INIT, cfg.MODEL.IMAGENET_FORMAT = init, imagenet_format
    if init == "scratch":
        cfg.MODEL.BACKBONE.FREEZE_AT, cfg.MODEL.RESNETS.NORM = 0, "GN"
        return
    cfg.MODEL.BACKBONE.FREEZE_AT, cfg.MODEL.RESNETS.NORM = 2, "FrozenBN"
    fmt = IMAGENET_FORMATS[imagenet_format]
    cfg.MODEL.RESNETS.STRIDE_IN_1X1, cfg.INPUT.FORMAT = fmt.stride_in_1x1, fmt.input_format
    cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = list(fmt.pixel_mean), list(fmt.pixel_std)


_GN_GROUPS = 32  # Detectron2's GroupNorm ("GN") always has 32 groups


def _check_group_norm_widths(resnets: CN) -> None:
    """GroupNorm needs every ResNet width divisible by its 32 groups; say so before torch does, naming the key."""
    widths = {"STEM_OUT_CHANNELS": resnets.STEM_OUT_CHANNELS, "RES2_OUT_CHANNELS": resnets.RES2_OUT_CHANNELS,
              "WIDTH_PER_GROUP": resnets.WIDTH_PER_GROUP * resnets.NUM_GROUPS}
    bad = {k: v for k, v in widths.items() if v % _GN_GROUPS}
    if bad:
        raise ConfigError(f"model.init=scratch trains the ResNet with GroupNorm of {_GN_GROUPS} groups, so its widths "
                          f"must be multiples of {_GN_GROUPS}; " + ", ".join(f"d2.MODEL.RESNETS.{k}={v}" for k, v in
                                                                         bad.items()) + " is not")


def apply_num_classes(cfg: CN, num_classes: int) -> None:
    """The detector's classes follow the registered splits it trains and tests on."""
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = cfg.MODEL.RETINANET.NUM_CLASSES = int(num_classes)


def apply_dataset_size(cfg: CN, num_train_images: int) -> int:
    """Express the paper's epoch schedule in iterations for this dataset; returns iterations per epoch."""
    if num_train_images <= 0:
        raise ConfigError(f"training split {cfg.DATASETS.TRAIN} has no images; check dataset.root / split")
    ipe = max(1, math.ceil(num_train_images / cfg.SOLVER.IMS_PER_BATCH))
    warm = cfg.SOLVER.WARMUP_EPOCHS
    cfg.SOLVER.MAX_ITER = max(1, int(round((warm + cfg.SOLVER.EPOCHS) * ipe)))
    cfg.SOLVER.WARMUP_ITERS = int(round(warm * ipe))
    cfg.SOLVER.STEPS = tuple(int(round((warm + e) * ipe)) for e in cfg.SOLVER.STEP_EPOCHS
                             if (warm + e) * ipe < cfg.SOLVER.MAX_ITER)
    cfg.SOLVER.CHECKPOINT_PERIOD = max(1, int(round(cfg.SOLVER.CHECKPOINT_PERIOD_EPOCHS * ipe)))
    cfg.TEST.EVAL_PERIOD = int(round(cfg.SOLVER.EVAL_PERIOD_EPOCHS * ipe))
    return ipe
