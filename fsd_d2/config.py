"""FSD-D2 configuration: the CfgNode keys the project adds, and Hydra -> CfgNode conversion.

Hydra composes a run from friendly, lower-case groups (``dataset``, ``model``, ``solver``, ``logger``,
``stage``); :func:`build_cfg` turns that composition into the single frozen Detectron2 ``CfgNode`` every
component reads. Every key the project reads is declared in :func:`add_fsd_config`.
"""
import math
from typing import Any, Dict, List

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value a user can fix; the message says which key and how."""


def add_fsd_config(cfg: CN) -> None:
    """Declare every FSD-D2 key with its default (paper values where the paper gives one)."""
    # --- DeepLesion data (fsd_d2.data) ---
    cfg.DEEPLESION = CN()
    cfg.DEEPLESION.ROOT = ""  # folder holding DL_info.csv and Images_png/
    cfg.DEEPLESION.HU_WINDOW = [-1024.0, 3071.0]  # HU mapped linearly to [0, 255] (reference detectors)
    cfg.DEEPLESION.USE_DICOM_WINDOW = False  # use each row's DICOM_windows instead of HU_WINDOW
    cfg.DEEPLESION.SPACING_MM = 0.0  # >0: scale to this mm/pixel instead of to the short side (3DCE: 0.8)
    cfg.DEEPLESION.SLICE_INTERVAL_MM = 0.0  # >0: neighbour channels this many mm from the key slice (3DCE: 2)
    cfg.DEEPLESION.DROP_NOISY = False  # drop rows flagged Possibly_noisy
    cfg.DEEPLESION.PATIENTS = []  # restrict to these Patient_index values (empty: all)
    cfg.DEEPLESION.SKIP_BAD_ROWS = False  # skip (and count) malformed rows instead of failing
    cfg.DEEPLESION.CACHE_DIR = ""  # +stage=prepare output (empty: <ROOT>/cache_3slice); uncached images convert on the fly
    cfg.DEEPLESION.BOX_PAD_CHECK = True  # boxes outside the image are an error (not silently clipped)

    # --- FSD architecture (fsd_d2.nas, fsd_d2.modeling) ---
    cfg.MODEL.FSD = CN()
    cfg.MODEL.FSD.BONE_POOL_NAME = "bone8"  # name recorded in genotype_bone.yaml
    cfg.MODEL.FSD.BONE_POOL = []  # operation names of the backbone search space (from conf/search_space)
    cfg.MODEL.FSD.HEAD_POOL_NAME = "head13"
    cfg.MODEL.FSD.HEAD_POOL = []  # operation names of the head search space
    cfg.MODEL.FSD.NUM_NODES = 4  # intermediate nodes per cell (DARTS)
    cfg.MODEL.FSD.BONE_CHANNELS = 64  # C of the first searched cell; doubles at each reduction
    cfg.MODEL.FSD.NORMAL_CELLS_PER_STAGE = 3  # derived backbone: normal cells before each reduction cell
    cfg.MODEL.FSD.HEAD_CHANNELS = 64  # C of the head cells
    cfg.MODEL.FSD.HEAD_EXTRA_NORMAL_CELLS = 2  # derived head: normal cells before the searched pair
    cfg.MODEL.FSD.PARTIAL_CHANNELS = 1  # PC-DARTS: 1/K of channels go through the mixed op (1 = off)
    cfg.MODEL.FSD.GENOTYPE_BONE = ""  # genotype_bone.yaml for build_fsd_backbone
    cfg.MODEL.FSD.GENOTYPE_HEAD = ""  # genotype_head.yaml for the FSD box head
    cfg.MODEL.FSD.FREEZE_BACKBONE = False  # head search: backbone weights fixed

    # --- region-aware graph module (fsd_d2.modeling.graph) ---
    cfg.MODEL.GRAPH = CN()
    cfg.MODEL.GRAPH.ENABLED = False  # off: GraphROIHeads behaves as StandardROIHeads
    cfg.MODEL.GRAPH.HIDDEN = 8  # channels of the 1x1 convolutions that encode the relation matrix

    # --- bi-level architecture search (fsd_d2.engine.search) ---
    cfg.SEARCH = CN()
    cfg.SEARCH.ORDER = 2  # 1: first-order DARTS; 2: unrolled second order (finite-difference HVP)
    cfg.SEARCH.ARCH_BASE_LR = 0.0024  # Adam lr for alphas (per-image rate x images per batch)
    cfg.SEARCH.ARCH_WEIGHT_DECAY = 1e-3
    cfg.SEARCH.ARCH_BETAS = [0.5, 0.999]  # DARTS' Adam betas
    cfg.SEARCH.LR_MIN = 1e-4  # cosine floor of the weight learning rate
    cfg.SEARCH.FD_EPSILON = 0.01  # finite-difference step, scaled by 1/||dw|| as in DARTS

    # --- epoch schedule (converted to iterations once the dataset size is known) ---
    cfg.SOLVER.EPOCHS = 12  # epochs after warm-up
    cfg.SOLVER.WARMUP_EPOCHS = 1  # warm-up epochs before them (paper: 1 binary, 2 multi-type)
    cfg.SOLVER.STEP_EPOCHS = [8, 11]  # x GAMMA at these epochs, counted after warm-up
    cfg.SOLVER.CHECKPOINT_PERIOD_EPOCHS = 1.0
    cfg.SOLVER.EVAL_PERIOD_EPOCHS = 0.0  # 0: evaluate only at the end
    cfg.SOLVER.LR_PER_IMAGE = 0.005  # BASE_LR = LR_PER_IMAGE x IMS_PER_BATCH
    cfg.SOLVER.CLIP_GRAD_NORM = 0.0  # >0: clip each parameter's gradient norm (Detectron2 "norm" clipping); paper: off

    # --- Weights & Biases (fsd_d2.engine.wandb) ---
    cfg.WANDB = CN()
    cfg.WANDB.ENABLED = True
    cfg.WANDB.PROJECT = "fsd-d2"
    cfg.WANDB.ENTITY = ""
    cfg.WANDB.MODE = "offline"  # offline | online | disabled (WANDB_MODE in the environment wins)
    cfg.WANDB.GROUP = ""  # Hydra sweep name in a multirun
    cfg.WANDB.JOB_TYPE = ""  # the stage
    cfg.WANDB.NAME = ""
    cfg.WANDB.TAGS = []

    cfg.TEST.DRAW_IMAGES = 4  # evaluated images per split drawn with ground truth and detections (Fig. 3)

    cfg.FSD_STAGE = ""  # the stage this config runs


# Friendly Hydra keys -> Detectron2 keys. Only these are accepted in the groups; anything else goes
# through the ``d2`` escape hatch (``+d2.MODEL.RPN.NMS_THRESH=0.6``), which Detectron2 validates.
_MODEL_KEYS = {
    "meta_architecture": "MODEL.META_ARCHITECTURE",
    "backbone": "MODEL.BACKBONE.NAME",
    "resnet_depth": "MODEL.RESNETS.DEPTH",
    "fpn_channels": "MODEL.FPN.OUT_CHANNELS",
    "roi_heads": "MODEL.ROI_HEADS.NAME",
    "box_head": "MODEL.ROI_BOX_HEAD.NAME",
    "weights": "MODEL.WEIGHTS",
    "anchor_ratios": "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS",
    "pooler_resolution": "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION",
    "fc_dim": "MODEL.ROI_BOX_HEAD.FC_DIM",
    "graph_enabled": "MODEL.GRAPH.ENABLED",
    "graph_hidden": "MODEL.GRAPH.HIDDEN",
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
}
_DATASET_KEYS = {
    "root": "DEEPLESION.ROOT",
    "hu_window": "DEEPLESION.HU_WINDOW",
    "use_dicom_window": "DEEPLESION.USE_DICOM_WINDOW",
    "spacing_mm": "DEEPLESION.SPACING_MM",
    "slice_interval_mm": "DEEPLESION.SLICE_INTERVAL_MM",
    "drop_noisy": "DEEPLESION.DROP_NOISY",
    "patients": "DEEPLESION.PATIENTS",
    "skip_bad_rows": "DEEPLESION.SKIP_BAD_ROWS",
    "cache_dir": "DEEPLESION.CACHE_DIR",
    "train": "DATASETS.TRAIN",
    "test": "DATASETS.TEST",
    "num_classes": "MODEL.ROI_HEADS.NUM_CLASSES",
    "short_side": "INPUT.MIN_SIZE_TRAIN",
    "max_size": "INPUT.MAX_SIZE_TRAIN",
}
_SOLVER_KEYS = {
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
    "arch_lr_per_image": "SEARCH.ARCH_BASE_LR",
    "arch_weight_decay": "SEARCH.ARCH_WEIGHT_DECAY",
    "lr_min": "SEARCH.LR_MIN",
    "order": "SEARCH.ORDER",
}
_LOGGER_KEYS = {
    "enabled": "WANDB.ENABLED",
    "project": "WANDB.PROJECT",
    "entity": "WANDB.ENTITY",
    "mode": "WANDB.MODE",
    "tags": "WANDB.TAGS",
    "group": "WANDB.GROUP",
    "run_name": "WANDB.NAME",
}
_GROUP_KEYS = {"model": _MODEL_KEYS, "dataset": _DATASET_KEYS, "solver": _SOLVER_KEYS, "logger": _LOGGER_KEYS}
# Keys of a group that the stage runner reads itself rather than the CfgNode.
_RUNNER_ONLY = {"dataset": {"name", "synthetic", "type_train", "type_test"}, "model": {"name", "anchor_scales"},
                "solver": {"name"}, "logger": {"name"}}


def anchor_sizes(scales: List[float], strides: List[int]) -> List[List[float]]:
    """Turn the paper's octave scales ("2, 3, 4, 6, 12") into Detectron2's absolute sizes per FPN level.

    The paper (mmdetection-style) multiplies each scale by the level's stride; Detectron2 wants pixels.
    """
    return [[float(s * stride) for s in scales] for stride in strides]


def _set(cfg: CN, dotted: str, value: Any) -> None:
    node = cfg
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node[p]
    if isinstance(value, list) and isinstance(node[leaf], tuple):
        value = tuple(value)
    node[leaf] = value


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def build_cfg(hcfg: DictConfig) -> CN:
    """Compose the Detectron2 CfgNode from a Hydra config (not frozen: the stage adds the schedule)."""
    cfg = get_cfg()
    add_fsd_config(cfg)
    _base_rcnn_fpn(cfg)
    cfg.MODEL.DEVICE = hcfg.get("device", "cpu")
    cfg.SEED = int(hcfg.get("seed", 0))
    cfg.OUTPUT_DIR = str(hcfg.output_dir)
    cfg.DATALOADER.NUM_WORKERS = int(hcfg.get("num_workers", 0))
    cfg.FSD_STAGE = str(hcfg.stage.name)
    cfg.WANDB.JOB_TYPE = cfg.FSD_STAGE
    for group, table in _GROUP_KEYS.items():
        node = OmegaConf.to_container(hcfg[group], resolve=True) if group in hcfg else {}
        for key, value in node.items():
            if key in _RUNNER_ONLY.get(group, set()):
                continue
            if key not in table:
                raise ConfigError(
                    f"{group}.{key} is not a key FSD-D2 knows; known keys of '{group}': {sorted(table)}. "
                    f"For a raw Detectron2 key use +d2.<KEY>=<value>."
                )
            _set(cfg, table[key], value)
    _apply_derived(cfg, hcfg)
    raw = _flatten(OmegaConf.to_container(hcfg.d2, resolve=True)) if hcfg.get("d2") else {}
    try:
        cfg.merge_from_list([x for kv in raw.items() for x in (kv[0], repr(kv[1]) if isinstance(kv[1], str) else kv[1])])
    except (KeyError, AssertionError, ValueError) as e:
        raise ConfigError(f"d2 override rejected by Detectron2: {e}") from None
    return cfg


def _base_rcnn_fpn(cfg: CN) -> None:
    """Detectron2's Base-RCNN-FPN.yaml settings, which ``get_cfg()`` does not have (it defaults to C4)."""
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 2000
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 1000
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 1000
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 1000
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    cfg.MODEL.MASK_ON = False


def _apply_derived(cfg: CN, hcfg: DictConfig) -> None:
    """Values that follow from others: anchors from scales, test size from train size, lr from batch."""
    scales = list(hcfg.model.get("anchor_scales", [2, 3, 4, 6, 12]))
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = anchor_sizes(scales, [4, 8, 16, 32, 64])
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [list(cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS)]
    if not cfg.MODEL.WEIGHTS:
        # From scratch there is nothing pretrained to keep frozen, and FrozenBN would freeze random statistics;
        # GroupNorm trains with the small per-GPU batches of 512-px CT slices.
        cfg.MODEL.BACKBONE.FREEZE_AT = 0
        cfg.MODEL.RESNETS.NORM = "GN"
    short = cfg.INPUT.MIN_SIZE_TRAIN
    cfg.INPUT.MIN_SIZE_TRAIN = (int(short),) if isinstance(short, (int, float)) else tuple(short)
    cfg.INPUT.MIN_SIZE_TEST = int(cfg.INPUT.MIN_SIZE_TRAIN[0])
    cfg.INPUT.MAX_SIZE_TEST = cfg.INPUT.MAX_SIZE_TRAIN
    cfg.INPUT.RANDOM_FLIP = "none"  # CT laterality matters; flips would mislabel left/right organs
    cfg.SOLVER.BASE_LR = cfg.SOLVER.LR_PER_IMAGE * cfg.SOLVER.IMS_PER_BATCH
    clip = cfg.SOLVER.CLIP_GRADIENTS
    clip.ENABLED = cfg.SOLVER.CLIP_GRAD_NORM > 0
    if clip.ENABLED:
        clip.CLIP_TYPE, clip.CLIP_VALUE = "norm", float(cfg.SOLVER.CLIP_GRAD_NORM)
    cfg.SEARCH.ARCH_BASE_LR = cfg.SEARCH.ARCH_BASE_LR * cfg.SOLVER.IMS_PER_BATCH
    cfg.MODEL.RETINANET.NUM_CLASSES = cfg.MODEL.ROI_HEADS.NUM_CLASSES


def apply_epoch_schedule(cfg: CN, num_train_images: int) -> int:
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
