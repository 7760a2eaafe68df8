"""FSD-D2 configuration: one path from the command line to the frozen Detectron2 ``CfgNode``.

1. :func:`add_fsd_config` declares every key the project adds, with its default, on top of Detectron2's own
   ``Base-RCNN-FPN.yaml`` (:func:`base_cfg`). That is the one home of every default.
2. :data:`FRIENDLY_KEYS` names the keys users set through Hydra groups (``solver.ims_per_batch`` ->
   ``SOLVER.IMS_PER_BATCH``). The groups' base configs (``dataset/base``, ``model/base``, ...) are generated
   from 1 and 2 (:func:`register_config_groups`), so the YAML files in ``conf/`` list only what they change.
3. :func:`build_cfg` applies, in order: the defaults, the friendly values, the raw ``d2`` overrides, then the
   derived values (:data:`DERIVED_KEYS`). Derived values are computed last, so they follow their inputs
   however those were set; a derived key set by hand is an error naming the input to set instead.

The values that need the registered dataset (classes, iterations from epochs) are derived by
:func:`apply_dataset_size` and :func:`apply_num_classes` before the stage freezes the config.
"""
import math
import os
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Tuple

import detectron2
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from fsd_d2.data.coco import PIXELS
from fsd_d2.data.synthetic import SyntheticParams
from fsd_d2.errors import ConfigError, MissingFileError
from fsd_d2.evaluation.metrics import PROTOCOLS
from fsd_d2.modeling.pretrained import IMAGENET_FORMATS, imagenet_format_of, read_weights_file
from fsd_d2.nas.ops import load_pool, packaged_pools


def add_fsd_config(cfg: CN) -> None:
    """Declare every FSD-D2 key with its default (paper values where the paper gives one)."""
    # --- DeepLesion data (fsd_d2.data) ---
    cfg.DEEPLESION = CN()
    # deeplesion: the NIH download in ROOT; synthetic: generated into ROOT; coco: COCO JSON files, images under ROOT
    cfg.DEEPLESION.SOURCE = "deeplesion"
    cfg.DEEPLESION.ROOT = ""  # folder holding DL_info.csv and Images_png/ (coco: the JSON's file_name entries)
    cfg.DEEPLESION.HU_WINDOW = [-1024.0, 3071.0]  # HU mapped linearly to [0, 255] (reference detectors)
    cfg.DEEPLESION.USE_DICOM_WINDOW = False  # use each row's DICOM_windows instead of HU_WINDOW
    cfg.DEEPLESION.SPACING_MM = 0.0  # >0: scale to this mm/pixel instead of to the short side (3DCE: 0.8)
    cfg.DEEPLESION.SLICE_INTERVAL_MM = 0.0  # >0: neighbour channels this many mm from the key slice (3DCE: 2)
    cfg.DEEPLESION.DROP_NOISY = False  # drop rows flagged Possibly_noisy
    cfg.DEEPLESION.PATIENTS = []  # restrict to these Patient_index values (empty: all)
    cfg.DEEPLESION.SKIP_BAD_ROWS = False  # skip (and count) malformed rows instead of failing
    cfg.DEEPLESION.CACHE_DIR = ""  # +stage=prepare output (empty: <ROOT>/cache_3slice); else converted on the fly
    cfg.DEEPLESION.BOX_PAD_CHECK = True  # boxes outside the image are an error (not silently clipped)
    # Where DL_info.csv's pixel coordinates (Bounding_boxes, Measurement_coordinates) start: 1, as the NIH reference
    # loaders (3DCE, MULAN) read them, subtracting 1; 0 reads them literally
    cfg.DEEPLESION.COORDINATE_ORIGIN = 1
    # The synthetic generator's parameters (SOURCE=synthetic), defaults from fsd_d2.data.synthetic.SyntheticParams.
    cfg.DEEPLESION.SYNTHETIC = CN({f.name.upper(): f.default for f in fields(SyntheticParams)})
    # Users' own data in COCO JSON (SOURCE=coco, fsd_d2.data.coco): each non-empty *_JSON is registered as <its NAME>
    # (binary) and <its NAME>_types (the JSON's categories as lesion types)
    cfg.DEEPLESION.COCO = CN()
    cfg.DEEPLESION.COCO.TRAIN_JSON = ""
    cfg.DEEPLESION.COCO.VAL_JSON = ""
    cfg.DEEPLESION.COCO.TEST_JSON = ""
    cfg.DEEPLESION.COCO.TRAIN_NAME = "coco_train"
    cfg.DEEPLESION.COCO.VAL_NAME = "coco_val"
    cfg.DEEPLESION.COCO.TEST_NAME = "coco_test"
    cfg.DEEPLESION.COCO.PIXELS = "ct16"  # ct16: 16-bit single-channel CT slices, HU + HU_OFFSET; rgb8: 8-bit colour
    cfg.DEEPLESION.COCO.HU_OFFSET = 32768.0  # ct16: stored value - HU_OFFSET = HU (DeepLesion's 32768)
    cfg.DATASETS.TRAIN = ("deeplesion_train",)
    cfg.DATASETS.TEST = ("deeplesion_test",)
    cfg.INPUT.SHORT_SIDE = 512  # images are scaled to this short side (paper: 512), for training and test
    cfg.INPUT.MAX_SIZE_TRAIN = 1333
    cfg.INPUT.RANDOM_FLIP = "none"  # CT laterality matters; flips would mislabel left/right organs

    # --- detector ---
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 1  # binary lesion detection; the stages take it from the splits' classes
    cfg.MODEL.RETINANET.NUM_CLASSES = 1
    cfg.MODEL.ANCHOR_GENERATOR.STRIDE_MULTIPLES = [2.0, 3.0, 4.0, 6.0, 12.0]  # paper's scales, x each level's stride
    cfg.MODEL.INIT = "scratch"  # scratch | imagenet: the ResNet (FPN-R50's, FSD's stem + res2) from MODEL.WEIGHTS
    # imagenet: caffe2 | torchvision, the weights' format (derived from the file, or recorded by a checkpoint); it
    # fixes STRIDE_IN_1X1, INPUT.FORMAT, PIXEL_MEAN and PIXEL_STD (fsd_d2.modeling.pretrained.IMAGENET_FORMATS)
    cfg.MODEL.IMAGENET_FORMAT = ""
    # eval / visualize: BatchNorm folded into the FSD cells' convolutions, channels-last on CPU
    # (fsd_d2.modeling.deploy); the same detections to float rounding, faster
    cfg.MODEL.DEPLOY = True

    # --- FSD architecture (fsd_d2.nas, fsd_d2.modeling) ---
    cfg.MODEL.FSD = CN()
    cfg.MODEL.FSD.BONE_POOL_NAME = "bone8"  # name recorded in genotype_bone.yaml
    cfg.MODEL.FSD.BONE_POOL = load_pool("bone8")  # operation names of the backbone search space
    cfg.MODEL.FSD.HEAD_POOL_NAME = "head13"
    cfg.MODEL.FSD.HEAD_POOL = load_pool("head13")  # operation names of the head search space
    cfg.MODEL.FSD.NUM_NODES = 4  # intermediate nodes per cell (DARTS)
    # C of the first searched cell (doubles at each reduction) and of every head cell: the widths at which the example
    # genotypes give Table I's 37.8M (FSD backbone + FC head) and 24.7M (FSD); benchmarks/params.py --solve-widths
    cfg.MODEL.FSD.BONE_CHANNELS = 88
    cfg.MODEL.FSD.NORMAL_CELLS_PER_STAGE = 3  # derived backbone: normal cells before each reduction cell
    cfg.MODEL.FSD.HEAD_CHANNELS = 112
    cfg.MODEL.FSD.HEAD_EXTRA_NORMAL_CELLS = 2  # derived head: normal cells before the searched pair
    cfg.MODEL.FSD.PARTIAL_CHANNELS = 1  # PC-DARTS: 1/K of channels go through the mixed op (1 = off)
    cfg.MODEL.FSD.GENOTYPE_BONE = ""  # genotype_bone.yaml for build_fsd_backbone
    cfg.MODEL.FSD.GENOTYPE_HEAD = ""  # genotype_head.yaml for the FSD box head
    cfg.MODEL.FSD.FREEZE_BACKBONE = False  # head search: backbone weights fixed

    # --- region-aware graph module (fsd_d2.modeling.graph) ---
    cfg.MODEL.GRAPH = CN()
    cfg.MODEL.GRAPH.ENABLED = False  # off: GraphROIHeads behaves as StandardROIHeads
    cfg.MODEL.GRAPH.HIDDEN = 8  # channels of the 1x1 convolutions that encode the relation matrix
    cfg.MODEL.GRAPH.DIM = 1024  # D, the graph width: head features are average-pooled to D, same size on every head

    # --- bi-level architecture search (fsd_d2.engine.search) ---
    cfg.SEARCH = CN()
    cfg.SEARCH.ORDER = 2  # 1: first-order DARTS; 2: unrolled second order (finite-difference HVP)
    cfg.SEARCH.ARCH_LR_PER_IMAGE = 0.0024  # Adam lr for alphas per image; ARCH_BASE_LR = this x IMS_PER_BATCH
    cfg.SEARCH.ARCH_BASE_LR = 0.0  # derived
    cfg.SEARCH.ARCH_WEIGHT_DECAY = 1e-3
    cfg.SEARCH.ARCH_BETAS = [0.5, 0.999]  # DARTS' Adam betas
    cfg.SEARCH.LR_MIN = 1e-4  # cosine floor of the weight learning rate
    cfg.SEARCH.FD_EPSILON = 0.01  # finite-difference step, scaled by 1/||dw|| as in DARTS
    # Second order: the weight step reuses the unrolled step's dL_train/dw (taken before the alpha update; DARTS
    # takes a fresh one after it): one forward-backward pass fewer per step (fsd_d2.engine.search.SearchTrainer)
    cfg.SEARCH.REUSE_TRAIN_GRADIENT = False
    # Latency-aware search: alpha loss + LATENCY_WEIGHT x E_alpha[latency] / E_uniform[latency] (0: the paper's search)
    cfg.SEARCH.LATENCY_WEIGHT = 0.0
    cfg.SEARCH.LATENCY_TABLE = ""  # op_latency_<kind>.yaml of +stage=profile_ops; needed when LATENCY_WEIGHT > 0
    # > 0: a budget in ms for the derived cells' predicted latency (the table's sum): the latency term becomes
    # TuNAS' LATENCY_WEIGHT x |E_alpha[latency] / target - 1| and the derivation repairs a genotype above it (0: off)
    cfg.SEARCH.LATENCY_TARGET_MS = 0.0
    # Against DARTS' collapse onto skip connections (both off: the paper's plain DARTS). P-DARTS' cap on the skip
    # connections of a derived cell (-1: none; P-DARTS keeps 2), and beta-DARTS' beta-decay: + weight x
    # mean_edges logsumexp(alpha) in the alpha loss, the weight rising linearly from 0 over the search
    cfg.SEARCH.MAX_SKIP_CONNECTIONS = -1
    cfg.SEARCH.BETA_DECAY_WEIGHT = 0.0

    # --- binary-detection schedule in epochs (paper), turned into iterations once the dataset size is known ---
    cfg.SOLVER.OPTIMIZER = "sgd"  # sgd (paper: SGD, momentum 0.9) | adamw (MOMENTUM unused)
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.LR_PER_IMAGE = 0.005  # BASE_LR = LR_PER_IMAGE x IMS_PER_BATCH
    cfg.SOLVER.EPOCHS = 12  # epochs after warm-up
    cfg.SOLVER.WARMUP_EPOCHS = 1  # warm-up epochs before them (paper: 1 binary, 2 multi-type)
    cfg.SOLVER.STEP_EPOCHS = [8, 11]  # x GAMMA at these epochs, counted after warm-up
    cfg.SOLVER.CHECKPOINT_PERIOD_EPOCHS = 1.0
    cfg.SOLVER.EVAL_PERIOD_EPOCHS = 0.0  # 0: evaluate only at the end
    cfg.SOLVER.CLIP_GRAD_NORM = 0.0  # >0: clip each parameter's (Detectron2), a search the total (DARTS: 5) grad norm
    cfg.SOLVER.KEEP_CHECKPOINTS = 2  # periodic checkpoints kept besides model_final.pth (older ones are deleted)

    # --- Weights & Biases (fsd_d2.engine.wandb) ---
    cfg.WANDB = CN()
    cfg.WANDB.ENABLED = True
    cfg.WANDB.PROJECT = "fsd-d2"
    cfg.WANDB.ENTITY = ""
    cfg.WANDB.MODE = "offline"  # offline | online | disabled (WANDB_MODE in the environment wins)
    cfg.WANDB.GROUP = ""  # empty: the Hydra sweep in a multirun
    cfg.WANDB.JOB_TYPE = ""  # the stage
    cfg.WANDB.NAME = ""  # empty: <stage>-<run directory>
    cfg.WANDB.TAGS = []

    cfg.TEST.DRAW_IMAGES = 4  # evaluated images per split drawn with ground truth and detections (Fig. 3)
    # sens@F as the published tables (cadlab: NIH CADLab code, +1-px areas, Possibly_noisy lesions removed) or coco
    cfg.TEST.SENSITIVITY_PROTOCOL = "cadlab"

    cfg.FSD_STAGE = ""  # the stage this config runs


# Shipped inside the detectron2 package (detectron2.model_zoo would import the removed pkg_resources).
BASE_RCNN_FPN = Path(detectron2.__file__).parent / "model_zoo" / "configs" / "Base-RCNN-FPN.yaml"


def base_cfg() -> CN:
    """Detectron2's defaults, its ``Base-RCNN-FPN.yaml`` (``get_cfg()`` alone is a C4 model), and FSD-D2's keys."""
    cfg = get_cfg()
    cfg.merge_from_file(str(BASE_RCNN_FPN))
    add_fsd_config(cfg)
    return cfg


# Friendly Hydra keys -> Detectron2 keys, per group. ``name`` in every group is the option's label (W&B, tables).
FRIENDLY_KEYS: Dict[str, Dict[str, str]] = {
    "dataset": {
        "name": "DEEPLESION.SOURCE",
        "root": "DEEPLESION.ROOT",
        "hu_window": "DEEPLESION.HU_WINDOW",
        "use_dicom_window": "DEEPLESION.USE_DICOM_WINDOW",
        "spacing_mm": "DEEPLESION.SPACING_MM",
        "slice_interval_mm": "DEEPLESION.SLICE_INTERVAL_MM",
        "drop_noisy": "DEEPLESION.DROP_NOISY",
        "patients": "DEEPLESION.PATIENTS",
        "skip_bad_rows": "DEEPLESION.SKIP_BAD_ROWS",
        "cache_dir": "DEEPLESION.CACHE_DIR",
        "coordinate_origin": "DEEPLESION.COORDINATE_ORIGIN",
        "check_boxes": "DEEPLESION.BOX_PAD_CHECK",
        **{f"synthetic.{f.name}": f"DEEPLESION.SYNTHETIC.{f.name.upper()}" for f in fields(SyntheticParams)},
        **{f"{split}_{what}": f"DEEPLESION.COCO.{split.upper()}_{what.upper()}"
           for split in ("train", "val", "test") for what in ("json", "name")},
        "pixels": "DEEPLESION.COCO.PIXELS",
        "hu_offset": "DEEPLESION.COCO.HU_OFFSET",
        "train": "DATASETS.TRAIN",
        "test": "DATASETS.TEST",
        "short_side": "INPUT.SHORT_SIDE",
        "max_size": "INPUT.MAX_SIZE_TRAIN",
    },
    "model": {
        "meta_architecture": "MODEL.META_ARCHITECTURE",
        "backbone": "MODEL.BACKBONE.NAME",
        "resnet_depth": "MODEL.RESNETS.DEPTH",
        "fpn_channels": "MODEL.FPN.OUT_CHANNELS",
        "roi_heads": "MODEL.ROI_HEADS.NAME",
        "box_head": "MODEL.ROI_BOX_HEAD.NAME",
        "weights": "MODEL.WEIGHTS",
        "init": "MODEL.INIT",
        "deploy": "MODEL.DEPLOY",
        "anchor_scales": "MODEL.ANCHOR_GENERATOR.STRIDE_MULTIPLES",
        "anchor_ratios": "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS",
        "pooler_resolution": "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION",
        "test_proposals": "MODEL.RPN.POST_NMS_TOPK_TEST",
        "fc_dim": "MODEL.ROI_BOX_HEAD.FC_DIM",
        "score_thresh_test": "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
        "graph_enabled": "MODEL.GRAPH.ENABLED",
        "graph_hidden": "MODEL.GRAPH.HIDDEN",
        "graph_dim": "MODEL.GRAPH.DIM",
        "bone_pool_name": "MODEL.FSD.BONE_POOL_NAME",
        "bone_pool": "MODEL.FSD.BONE_POOL",
        "head_pool_name": "MODEL.FSD.HEAD_POOL_NAME",
        "head_pool": "MODEL.FSD.HEAD_POOL",
        "num_nodes": "MODEL.FSD.NUM_NODES",
        "bone_channels": "MODEL.FSD.BONE_CHANNELS",
        "normal_cells_per_stage": "MODEL.FSD.NORMAL_CELLS_PER_STAGE",
        "head_channels": "MODEL.FSD.HEAD_CHANNELS",
        "head_extra_normal_cells": "MODEL.FSD.HEAD_EXTRA_NORMAL_CELLS",
        "partial_channels": "MODEL.FSD.PARTIAL_CHANNELS",
        "genotype_bone": "MODEL.FSD.GENOTYPE_BONE",
        "genotype_head": "MODEL.FSD.GENOTYPE_HEAD",
        "freeze_backbone": "MODEL.FSD.FREEZE_BACKBONE",
    },
    "solver": {
        "optimizer": "SOLVER.OPTIMIZER",
        "amp": "SOLVER.AMP.ENABLED",
        "ims_per_batch": "SOLVER.IMS_PER_BATCH",
        "lr_per_image": "SOLVER.LR_PER_IMAGE",
        "momentum": "SOLVER.MOMENTUM",
        "weight_decay": "SOLVER.WEIGHT_DECAY",
        "gamma": "SOLVER.GAMMA",
        "epochs": "SOLVER.EPOCHS",
        "warmup_epochs": "SOLVER.WARMUP_EPOCHS",
        "step_epochs": "SOLVER.STEP_EPOCHS",
        "checkpoint_period_epochs": "SOLVER.CHECKPOINT_PERIOD_EPOCHS",
        "eval_period_epochs": "SOLVER.EVAL_PERIOD_EPOCHS",
        "lr_scheduler": "SOLVER.LR_SCHEDULER_NAME",
        "clip_grad_norm": "SOLVER.CLIP_GRAD_NORM",
        "keep_checkpoints": "SOLVER.KEEP_CHECKPOINTS",
        "arch_lr_per_image": "SEARCH.ARCH_LR_PER_IMAGE",
        "arch_weight_decay": "SEARCH.ARCH_WEIGHT_DECAY",
        "lr_min": "SEARCH.LR_MIN",
        "order": "SEARCH.ORDER",
    },
    "search": {
        "latency_weight": "SEARCH.LATENCY_WEIGHT",
        "latency_table": "SEARCH.LATENCY_TABLE",
        "latency_target_ms": "SEARCH.LATENCY_TARGET_MS",
        "reuse_train_gradient": "SEARCH.REUSE_TRAIN_GRADIENT",
        "max_skip_connections": "SEARCH.MAX_SKIP_CONNECTIONS",
        "beta_decay_weight": "SEARCH.BETA_DECAY_WEIGHT",
    },
    "logger": {
        "enabled": "WANDB.ENABLED",
        "project": "WANDB.PROJECT",
        "entity": "WANDB.ENTITY",
        "mode": "WANDB.MODE",
        "tags": "WANDB.TAGS",
        "group": "WANDB.GROUP",
        "run_name": "WANDB.NAME",
    },
    "evaluation": {
        "protocol": "TEST.SENSITIVITY_PROTOCOL",
    },
}
_LABEL_ONLY = {"model", "solver", "logger"}  # groups whose ``name`` is a label with no Detectron2 key
# Root keys of conf/config.yaml that are Detectron2 keys (their defaults live there).
_RUN_KEYS = {"device": "MODEL.DEVICE", "seed": "SEED", "num_workers": "DATALOADER.NUM_WORKERS",
             "output_dir": "OUTPUT_DIR"}

_FRIENDLY_NAME_OF = {d2: f"{group}.{name}" for group, table in FRIENDLY_KEYS.items() for name, d2 in table.items()}

# Keys computed by build_cfg / apply_* from others, with what to set instead.
_SCHEDULE = "solver.epochs, solver.warmup_epochs and solver.step_epochs (with the training split's size)"
DERIVED_KEYS: Dict[str, str] = {
    "SOLVER.BASE_LR": "solver.lr_per_image (x solver.ims_per_batch)",
    "SEARCH.ARCH_BASE_LR": "solver.arch_lr_per_image (x solver.ims_per_batch)",
    "MODEL.ANCHOR_GENERATOR.SIZES": "model.anchor_scales (x each FPN level's stride)",
    "INPUT.MIN_SIZE_TRAIN": "dataset.short_side",
    "INPUT.MIN_SIZE_TEST": "dataset.short_side",
    "INPUT.MAX_SIZE_TEST": "dataset.max_size",
    "SOLVER.MAX_ITER": _SCHEDULE,
    "SOLVER.WARMUP_ITERS": _SCHEDULE,
    "SOLVER.STEPS": _SCHEDULE,
    "SOLVER.CHECKPOINT_PERIOD": "solver.checkpoint_period_epochs",
    "TEST.EVAL_PERIOD": "solver.eval_period_epochs",
    "SOLVER.CLIP_GRADIENTS.ENABLED": "solver.clip_grad_norm",
    "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": "solver.clip_grad_norm",
    "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": "solver.clip_grad_norm",
    "MODEL.ROI_HEADS.NUM_CLASSES": "dataset.train / dataset.test (their lesion classes)",
    "MODEL.RETINANET.NUM_CLASSES": "dataset.train / dataset.test (their lesion classes)",
    "MODEL.BACKBONE.FREEZE_AT": "model.init (imagenet: 2, stem + res2 frozen; scratch: 0, nothing frozen)",
    "MODEL.RESNETS.NORM": "model.init (imagenet: FrozenBN; scratch: GroupNorm)",
    "MODEL.IMAGENET_FORMAT": "model.weights (a caffe2 R-50.pkl or a torchvision resnet50-*.pth)",
    "WANDB.JOB_TYPE": "+stage",
    "FSD_STAGE": "+stage",
    **{d2: name for name, d2 in _RUN_KEYS.items()},
}


def flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}, "c": {}}`` -> ``{"a.b": 1, "c": {}}``: dotted keys, an empty mapping kept as a value."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _assign(cfg: CN, dotted: str, value: Any, given_as: str) -> None:
    """Set ``cfg.<dotted>`` to ``value`` with Detectron2's type rules; errors name ``given_as``."""
    node = cfg
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.get(p)
        if not isinstance(node, CN):
            raise ConfigError(f"{given_as}: {dotted} is not a Detectron2 key")
    if leaf not in node:
        raise ConfigError(f"{given_as}: {dotted} is not a Detectron2 key")
    old = node[leaf]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    sequences = (list, tuple)
    if not (type(value) is type(old) or (isinstance(old, sequences) and isinstance(value, sequences))):
        raise ConfigError(f"{given_as}={value!r}: expected a {type(old).__name__} like the default {old!r}")
    node[leaf] = value


# What the format of ImageNet weights fixes (model.init=imagenet); a raw override of these would contradict the file.
IMAGENET_FORMAT_KEYS = ("MODEL.RESNETS.STRIDE_IN_1X1", "INPUT.FORMAT", "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD")


def _check_raw_key(key: str, cfg: CN) -> None:
    """A raw ``d2.`` key may not set a derived key, nor one that has a friendly name (one home per value)."""
    if key in DERIVED_KEYS:
        raise ConfigError(f"d2 override rejected: {key} is derived; set {DERIVED_KEYS[key]} instead")
    if key in _FRIENDLY_NAME_OF:
        raise ConfigError(f"d2 override rejected: {key} has a friendly key; set {_FRIENDLY_NAME_OF[key]}=... instead")
    if key in IMAGENET_FORMAT_KEYS and cfg.MODEL.INIT == "imagenet":
        raise ConfigError(f"d2 override rejected: with model.init=imagenet, {key} follows the format of model.weights "
                          f"(caffe2 R-50.pkl or torchvision resnet50-*.pth: fsd_d2.modeling.pretrained"
                          f".IMAGENET_FORMATS); drop the override")


def build_cfg(hcfg: DictConfig) -> CN:
    """The CfgNode of a composed Hydra config (not frozen: the dataset-dependent values come later)."""
    cfg = base_cfg()
    for name, key in _RUN_KEYS.items():
        _assign(cfg, key, hcfg[name], name)
    cfg.FSD_STAGE = str(hcfg.stage.name)
    for group, table in FRIENDLY_KEYS.items():
        values = flatten(OmegaConf.to_container(hcfg[group], resolve=True)) if group in hcfg else {}
        for key, value in values.items():
            if key == "name" and group in _LABEL_ONLY:
                continue
            if key not in table:
                raise ConfigError(
                    f"{group}.{key} is not a key FSD-D2 knows; known keys of '{group}': {sorted(table)}. "
                    f"For a raw Detectron2 key use +d2.<KEY>=<value>.")
            _assign(cfg, table[key], value, f"{group}.{key}")
    raw = flatten(OmegaConf.to_container(hcfg.d2, resolve=True)) if hcfg.get("d2") else {}
    for key, value in raw.items():
        _check_raw_key(key, cfg)
        _assign(cfg, key, value, f"d2 override rejected: d2.{key}")
    _check_values(cfg)
    _derive(cfg)
    return cfg


def _positive(v) -> bool:
    return math.isfinite(v) and v > 0  # inf would pass "> 0" and train on NaN


def _non_negative(v) -> bool:
    return v >= 0


def _all_positive(v) -> bool:
    flat = [x for row in v for x in (row if isinstance(row, (list, tuple)) else [row])]
    return bool(flat) and all(x > 0 for x in flat)


# What a user may set, checked before anything is built: (test, what it must be).
_VALUE_RULES: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "SOLVER.OPTIMIZER": (lambda v: v in ("sgd", "adamw"), "sgd or adamw"),
    "SOLVER.IMS_PER_BATCH": (_positive, "a positive number of images"),
    "SOLVER.LR_PER_IMAGE": (_positive, "> 0"),
    "SOLVER.MOMENTUM": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "SOLVER.WEIGHT_DECAY": (_non_negative, ">= 0"),
    "SOLVER.GAMMA": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "SOLVER.EPOCHS": (_positive, "> 0"),
    "SOLVER.WARMUP_EPOCHS": (_non_negative, ">= 0"),
    "SOLVER.CHECKPOINT_PERIOD_EPOCHS": (_positive, "> 0"),
    "SOLVER.EVAL_PERIOD_EPOCHS": (_non_negative, ">= 0 (0: only at the end)"),
    "SOLVER.CLIP_GRAD_NORM": (_non_negative, ">= 0 (0: off)"),
    "SOLVER.KEEP_CHECKPOINTS": (_positive, ">= 1"),
    "SEARCH.ARCH_LR_PER_IMAGE": (_positive, "> 0"),
    "SEARCH.ARCH_WEIGHT_DECAY": (_non_negative, ">= 0"),
    "SEARCH.LR_MIN": (_non_negative, ">= 0"),
    "SEARCH.ORDER": (lambda v: v in (1, 2), "1 (first order) or 2 (second order)"),
    "SEARCH.LATENCY_WEIGHT": (_non_negative, ">= 0 (0: the paper's search, without the latency term)"),
    "SEARCH.LATENCY_TARGET_MS": (_non_negative, ">= 0 ms (0: no latency target)"),
    "SEARCH.MAX_SKIP_CONNECTIONS": (lambda v: v >= -1, ">= 0 skip connections per derived cell, or -1 (no cap)"),
    "SEARCH.BETA_DECAY_WEIGHT": (_non_negative, ">= 0 (0: off, the paper's search)"),
    "MODEL.FSD.NUM_NODES": (_positive, ">= 1"),
    "MODEL.FSD.BONE_CHANNELS": (_positive, ">= 1"),
    "MODEL.FSD.HEAD_CHANNELS": (_positive, ">= 1"),
    "MODEL.FSD.NORMAL_CELLS_PER_STAGE": (_non_negative, ">= 0"),
    "MODEL.FSD.HEAD_EXTRA_NORMAL_CELLS": (_non_negative, ">= 0"),
    "MODEL.FSD.PARTIAL_CHANNELS": (_positive, ">= 1 (1: off)"),
    "MODEL.FPN.OUT_CHANNELS": (_positive, ">= 1"),
    "MODEL.ROI_BOX_HEAD.FC_DIM": (_positive, ">= 1"),
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": (_positive, ">= 1"),
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "MODEL.GRAPH.HIDDEN": (_positive, ">= 1"),
    "MODEL.GRAPH.DIM": (_positive, ">= 1"),
    "MODEL.ANCHOR_GENERATOR.STRIDE_MULTIPLES": (_all_positive, "a non-empty list of positive numbers"),
    "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": (_all_positive, "a non-empty list of positive numbers"),
    "INPUT.SHORT_SIDE": (_positive, "a positive number of pixels"),
    "INPUT.MAX_SIZE_TRAIN": (_positive, "a positive number of pixels"),
    "DEEPLESION.HU_WINDOW": (lambda v: len(v) == 2 and v[0] < v[1], "[min, max] with min < max"),
    "DEEPLESION.SPACING_MM": (_non_negative, ">= 0 mm per pixel (0: scale to the short side)"),
    "DEEPLESION.SLICE_INTERVAL_MM": (_non_negative, ">= 0 mm (0: the adjacent slices)"),
    "DEEPLESION.COORDINATE_ORIGIN": (lambda v: v in (0, 1), "1 (DL_info.csv's coordinates start from 1, as the "
                                                          "reference loaders read them) or 0 (read them as they are)"),
    "DEEPLESION.COCO.PIXELS": (lambda v: v in PIXELS, "ct16 (16-bit CT slices) or rgb8 (8-bit colour images)"),
    "DEEPLESION.COCO.HU_OFFSET": (math.isfinite, "a finite number (stored value - offset = HU; DeepLesion: 32768)"),
    "DATALOADER.NUM_WORKERS": (_non_negative, ">= 0"),
    "TEST.DRAW_IMAGES": (_non_negative, ">= 0"),
    "TEST.SENSITIVITY_PROTOCOL": (lambda v: v in PROTOCOLS, " or ".join(PROTOCOLS)),
    "WANDB.MODE": (lambda v: v in ("offline", "online", "disabled"), "offline, online or disabled"),
}


def _friendly_name(key: str) -> str:
    """How a user sets ``key``: its friendly or root name, else ``d2.<key>``."""
    return _FRIENDLY_NAME_OF.get(key) or next((n for n, d2 in _RUN_KEYS.items() if d2 == key), f"d2.{key}")


def _check_values(cfg: CN) -> None:
    """Refuse impossible values with the key a user wrote, before they turn into tracebacks far away."""
    for key, (valid, expected) in _VALUE_RULES.items():
        value = _get(cfg, key)
        if not valid(value):
            raise ConfigError(f"{_friendly_name(key)}={value!r}: must be {expected}")
    if cfg.SOLVER.AMP.ENABLED and cfg.MODEL.DEVICE == "cpu":
        raise ConfigError("solver.amp=true: mixed precision is for CUDA (device=cuda); on a CPU it stays off, where "
                          "the float16/bfloat16 kernels are slower than float32")
    steps = [e for e in cfg.SOLVER.STEP_EPOCHS if not 0 < e <= cfg.SOLVER.EPOCHS]
    if steps:
        raise ConfigError(f"solver.step_epochs={list(cfg.SOLVER.STEP_EPOCHS)}: {steps} lie outside the "
                          f"{cfg.SOLVER.EPOCHS} epochs after warm-up (solver.epochs)")


def _get(cfg: CN, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


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


def _derive(cfg: CN) -> None:
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


def _group_base(cfg: CN, table: Dict[str, str]) -> Dict[str, Any]:
    """A group's friendly keys with their CfgNode defaults, nested at the dots (``synthetic.seed``)."""
    base: Dict[str, Any] = {}
    for name, d2 in table.items():
        value = _get(cfg, d2)
        *parents, leaf = name.split(".")
        node = base
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = list(value) if isinstance(value, tuple) else value
    return base


def register_config_groups() -> None:
    """Offer Hydra the generated ``<group>/base`` configs and the packaged operation pools (``search_space``)."""
    cs, cfg = ConfigStore.instance(), base_cfg()
    for group, table in FRIENDLY_KEYS.items():
        node = _group_base(cfg, table)
        if group in _LABEL_ONLY:
            node["name"] = "base"
        cs.store(group=group, name="base", node=node)
    for pool in packaged_pools():
        cs.store(group="search_space", name=pool, node={"name": pool, "ops": load_pool(pool)})


register_config_groups()
