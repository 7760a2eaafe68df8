"""Every configuration key FSD-D2 declares, once: :data:`KEYS`, from which the tables are generated.

A :class:`Key` is one Detectron2 key with its default (:data:`D2`: Detectron2's own), the name users set it by
(``group.name`` in a Hydra group, a root name such as ``device``, or none: ``+d2.<KEY>``), its check, and for a key
computed from others, what to set instead. :func:`add_fsd_config` (the defaults), :data:`FRIENDLY_KEYS`,
:data:`VALUE_RULES` and :data:`DERIVED_KEYS` are read off the declarations; nothing else lists keys.
"""
import copy
import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

from detectron2.config import CfgNode as CN

from fsd_d2.data.coco import PIXELS
from fsd_d2.data.synthetic import SyntheticParams
from fsd_d2.evaluation.metrics import PROTOCOLS
from fsd_d2.nas.ops import packaged_pools


class _Detectron2Default:
    def __repr__(self) -> str:
        return "D2"


D2: Any = _Detectron2Default()  # the default is Detectron2's (Base-RCNN-FPN.yaml); FSD-D2 does not set it


class Check(NamedTuple):
    """What a user may set, checked before anything is built: ``test(value)``, and what the value must be."""
    test: Callable[[Any], bool]
    expected: str


def _positive(v) -> bool:
    return math.isfinite(v) and v > 0  # inf would pass "> 0" and train on NaN


def _non_negative(v) -> bool:
    return v >= 0


def _all_positive(v) -> bool:
    flat = [x for row in v for x in (row if isinstance(row, (list, tuple)) else [row])]
    return bool(flat) and all(x > 0 for x in flat)


def positive(expected: str = "> 0") -> Check:
    return Check(_positive, expected)


def non_negative(expected: str = ">= 0") -> Check:
    return Check(_non_negative, expected)


def one_of(values, expected: str) -> Check:
    return Check(lambda v: v in values, expected)


AT_LEAST_1 = positive(">= 1")
POSITIVE_LIST = Check(_all_positive, "a non-empty list of positive numbers")
PIXEL_COUNT = positive("a positive number of pixels")


@dataclass(frozen=True)
class Key:
    """One Detectron2 key: ``default`` (:data:`D2`: Detectron2's), ``name`` (``group.name`` in a Hydra group, a root
    name of conf/config.yaml, or empty: set as ``+d2.<key>``), its ``check`` (None: any value of the default's
    type), ``derived``: for a key computed from others, what a user sets instead (never the key itself), and
    ``formerly``: the name it had before, refused with a message naming ``name`` (a silent no-op would run the
    default instead)."""
    key: str
    default: Any = D2
    name: str = ""
    check: Optional[Check] = None
    derived: str = ""
    formerly: str = ""

    @property
    def group(self) -> str:
        """The Hydra group of its name ("" for a root name or none)."""
        return self.name.split(".", 1)[0] if "." in self.name else ""


_SCHEDULE = "solver.epochs, solver.warmup_epochs and solver.step_epochs (with the training split's size)"
_CLASSES = "dataset.train / dataset.test (their lesion classes)"
_POOLS = f"packaged: {', '.join(packaged_pools())}; or your own conf/search_space/<name>.yaml"

KEYS: Tuple[Key, ...] = (
    # --- DeepLesion data (fsd_d2.data); each key's friendly name is in the `dataset` group ---
    # deeplesion: the NIH download in ROOT; synthetic: generated into ROOT; coco: COCO JSON files, images under ROOT
    Key("DEEPLESION.SOURCE", "deeplesion", "dataset.name"),
    # folder holding DL_info.csv and Images_png/ (coco: the JSON's file_name entries)
    Key("DEEPLESION.ROOT", "", "dataset.root"),
    # HU mapped linearly to [0, 255] (reference detectors)
    Key("DEEPLESION.HU_WINDOW", [-1024.0, 3071.0], "dataset.hu_window",
        Check(lambda v: len(v) == 2 and v[0] < v[1], "[min, max] with min < max")),
    # use each row's DICOM_windows instead of HU_WINDOW
    Key("DEEPLESION.USE_DICOM_WINDOW", False, "dataset.use_dicom_window"),
    # >0: scale to this mm/pixel instead of to the short side (3DCE: 0.8)
    Key("DEEPLESION.SPACING_MM", 0.0, "dataset.spacing_mm",
        non_negative(">= 0 mm per pixel (0: scale to the short side)")),
    # >0: neighbour channels this many mm from the key slice (3DCE: 2)
    Key("DEEPLESION.SLICE_INTERVAL_MM", 0.0, "dataset.slice_interval_mm",
        non_negative(">= 0 mm (0: the adjacent slices)")),
    Key("DEEPLESION.DROP_NOISY", False, "dataset.drop_noisy"),  # drop rows flagged Possibly_noisy
    Key("DEEPLESION.PATIENTS", [], "dataset.patients"),  # restrict to these Patient_index values (empty: all)
    # skip (and count) malformed rows instead of failing
    Key("DEEPLESION.SKIP_BAD_ROWS", False, "dataset.skip_bad_rows"),
    # +stage=prepare output (empty: <ROOT>/cache_3slice); else converted on the fly
    Key("DEEPLESION.CACHE_DIR", "", "dataset.cache_dir"),
    # Where DL_info.csv's pixel coordinates (Bounding_boxes, Measurement_coordinates) start: 1, as the NIH reference
    # loaders (3DCE, MULAN) read them, subtracting 1; 0 reads them literally
    Key("DEEPLESION.COORDINATE_ORIGIN", 1, "dataset.coordinate_origin",
        one_of((0, 1), "1 (DL_info.csv's coordinates start from 1, as the reference loaders read them) or 0 (read them "
                       "as they are)")),
    # boxes outside the image are an error (not silently clipped)
    Key("DEEPLESION.BOX_PAD_CHECK", True, "dataset.check_boxes"),
    # The synthetic generator's parameters (SOURCE=synthetic), defaults from fsd_d2.data.synthetic.SyntheticParams,
    # which checks them (SyntheticParams.check)
    *(Key(f"DEEPLESION.SYNTHETIC.{f.name.upper()}", f.default, f"dataset.synthetic.{f.name}")
      for f in fields(SyntheticParams)),
    # Users' own data in COCO JSON (SOURCE=coco, fsd_d2.data.coco): each non-empty *_JSON is registered as <its NAME>
    # (binary) and <its NAME>_types (the JSON's categories as lesion types)
    *(key for split in ("train", "val", "test") for key in (
        Key(f"DEEPLESION.COCO.{split.upper()}_JSON", "", f"dataset.{split}_json"),
        Key(f"DEEPLESION.COCO.{split.upper()}_NAME", f"coco_{split}", f"dataset.{split}_name"))),
    # ct16: 16-bit single-channel CT slices, HU + HU_OFFSET; rgb8: 8-bit colour
    Key("DEEPLESION.COCO.PIXELS", "ct16", "dataset.pixels",
        one_of(PIXELS, "ct16 (16-bit CT slices) or rgb8 (8-bit colour images)")),
    # ct16: stored value - HU_OFFSET = HU (DeepLesion's 32768)
    Key("DEEPLESION.COCO.HU_OFFSET", 32768.0, "dataset.hu_offset",
        Check(math.isfinite, "a finite number (stored value - offset = HU; DeepLesion: 32768)")),
    Key("DATASETS.TRAIN", ("deeplesion_train",), "dataset.train"),
    Key("DATASETS.TEST", ("deeplesion_test",), "dataset.test"),
    # images are scaled to this short side (paper: 512), for training and test
    Key("INPUT.SHORT_SIDE", 512, "dataset.short_side", PIXEL_COUNT),
    Key("INPUT.MAX_SIZE_TRAIN", 1333, "dataset.max_size", PIXEL_COUNT),
    Key("INPUT.RANDOM_FLIP", "none"),  # CT laterality matters; flips would mislabel left/right organs
    Key("INPUT.MIN_SIZE_TRAIN", derived="dataset.short_side"),
    Key("INPUT.MIN_SIZE_TEST", derived="dataset.short_side"),
    Key("INPUT.MAX_SIZE_TEST", derived="dataset.max_size"),

    # --- detector (Detectron2's keys, under friendly names in the `model` group) ---
    Key("MODEL.META_ARCHITECTURE", name="model.meta_architecture"),
    Key("MODEL.BACKBONE.NAME", name="model.backbone"),
    Key("MODEL.RESNETS.DEPTH", name="model.resnet_depth"),
    Key("MODEL.FPN.OUT_CHANNELS", name="model.fpn_channels", check=AT_LEAST_1),
    Key("MODEL.ROI_HEADS.NAME", name="model.roi_heads"),
    Key("MODEL.ROI_BOX_HEAD.NAME", name="model.box_head"),
    Key("MODEL.WEIGHTS", name="model.weights"),
    # scratch | imagenet: the ResNet (FPN-R50's, FSD's stem + res2) from MODEL.WEIGHTS (checked where it is derived)
    Key("MODEL.INIT", "scratch", "model.init"),
    # eval / visualize: BatchNorm folded into the FSD cells' convolutions, channels-last on CPU
    # (fsd_d2.modeling.deploy); the same detections to float rounding, faster
    Key("MODEL.DEPLOY", True, "model.deploy"),
    # paper's scales, x each level's stride
    Key("MODEL.ANCHOR_GENERATOR.STRIDE_MULTIPLES", [2.0, 3.0, 4.0, 6.0, 12.0], "model.anchor_scales", POSITIVE_LIST),
    Key("MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", name="model.anchor_ratios", check=POSITIVE_LIST),
    Key("MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", name="model.pooler_resolution", check=AT_LEAST_1),
    Key("MODEL.RPN.POST_NMS_TOPK_TEST", name="model.test_proposals"),
    Key("MODEL.ROI_BOX_HEAD.FC_DIM", name="model.fc_dim", check=AT_LEAST_1),
    Key("MODEL.ROI_HEADS.SCORE_THRESH_TEST", name="model.score_thresh_test",
        check=Check(lambda v: 0 <= v <= 1, "in [0, 1]")),
    # binary lesion detection; the stages take it from the splits' classes
    Key("MODEL.ROI_HEADS.NUM_CLASSES", 1, derived=_CLASSES),
    Key("MODEL.RETINANET.NUM_CLASSES", 1, derived=_CLASSES),
    Key("MODEL.ANCHOR_GENERATOR.SIZES", derived="model.anchor_scales (x each FPN level's stride)"),
    # imagenet: caffe2 | torchvision, the weights' format (derived from the file, or recorded by a checkpoint); it
    # fixes STRIDE_IN_1X1, INPUT.FORMAT, PIXEL_MEAN and PIXEL_STD (fsd_d2.modeling.pretrained.IMAGENET_FORMATS)
    Key("MODEL.IMAGENET_FORMAT", "", derived="model.weights (a caffe2 R-50.pkl or a torchvision resnet50-*.pth)"),
    Key("MODEL.BACKBONE.FREEZE_AT", derived="model.init (imagenet: 2, stem + res2 frozen; scratch: 0, nothing frozen)"),
    Key("MODEL.RESNETS.NORM", derived="model.init (imagenet: FrozenBN; scratch: GroupNorm)"),

    # --- region-aware graph module (fsd_d2.modeling.graph) ---
    Key("MODEL.GRAPH.ENABLED", False, "model.graph_enabled"),  # off: GraphROIHeads behaves as StandardROIHeads
    # channels of the 1x1 convolutions that encode the relation matrix
    Key("MODEL.GRAPH.HIDDEN", 8, "model.graph_hidden", AT_LEAST_1),
    # D, the graph width: head features are average-pooled to D, same size on every head
    Key("MODEL.GRAPH.DIM", 1024, "model.graph_dim", AT_LEAST_1),

    # --- FSD architecture (fsd_d2.nas, fsd_d2.modeling) ---
    # The operation pools: Hydra's search_space group (packaged in fsd_d2/nas/pools/, chosen in conf/config.yaml's
    # defaults: bone8 for the backbone, head13 as head_search_space for the head) is their one default, so these keys
    # start empty and a config composed without a pool is refused; the name is recorded in genotype_<kind>.yaml
    Key("MODEL.FSD.BONE_POOL_NAME", "", "search_space.name"),
    Key("MODEL.FSD.BONE_POOL", [], "search_space.ops",
        Check(bool, f"the backbone pool's operations: choose a pool with search_space=<name> ({_POOLS})")),
    Key("MODEL.FSD.HEAD_POOL_NAME", "", "head_search_space.name"),
    Key("MODEL.FSD.HEAD_POOL", [], "head_search_space.ops",
        Check(bool, f"the head pool's operations: choose a pool with search_space@head_search_space=<name> ({_POOLS})")),
    Key("MODEL.FSD.NUM_NODES", 4, "model.num_nodes", AT_LEAST_1),  # intermediate nodes per cell (DARTS)
    # C of the first searched cell (doubles at each reduction) and of every head cell: the widths at which the example
    # genotypes give Table I's 37.8M (FSD backbone + FC head) and 24.7M (FSD); benchmarks/params.py --solve-widths
    Key("MODEL.FSD.BONE_CHANNELS", 88, "model.bone_channels", AT_LEAST_1),
    # derived backbone: normal cells before each reduction cell
    Key("MODEL.FSD.NORMAL_CELLS_PER_STAGE", 3, "model.normal_cells_per_stage", non_negative()),
    Key("MODEL.FSD.HEAD_CHANNELS", 112, "model.head_channels", AT_LEAST_1),
    # derived head: normal cells before the searched pair
    Key("MODEL.FSD.HEAD_EXTRA_NORMAL_CELLS", 2, "model.head_extra_normal_cells", non_negative()),
    # PC-DARTS: 1/K of channels go through the mixed op (1 = off)
    Key("MODEL.FSD.PARTIAL_CHANNELS", 1, "model.partial_channels", positive(">= 1 (1: off)")),
    # search cells run the edges leaving a state as batched calls (false: each edge on its own; the same result)
    Key("MODEL.FSD.BATCHED_EDGES", True, "model.batched_edges"),
    Key("MODEL.FSD.GENOTYPE_BONE", "", "model.genotype_bone"),  # genotype_bone.yaml for build_fsd_backbone
    Key("MODEL.FSD.GENOTYPE_HEAD", "", "model.genotype_head"),  # genotype_head.yaml for the FSD box head
    Key("MODEL.FSD.FREEZE_BACKBONE", False, "model.freeze_backbone"),  # head search: backbone weights fixed

    # --- binary-detection schedule in epochs (paper), turned into iterations once the dataset size is known ---
    # sgd (paper: SGD, momentum 0.9) | adamw (MOMENTUM unused)
    Key("SOLVER.OPTIMIZER", "sgd", "solver.optimizer", one_of(("sgd", "adamw"), "sgd or adamw")),
    Key("SOLVER.AMP.ENABLED", name="solver.amp"),
    Key("SOLVER.IMS_PER_BATCH", 2, "solver.ims_per_batch", positive("a positive number of images")),
    Key("SOLVER.LR_PER_IMAGE", 0.005, "solver.lr_per_image", positive()),  # BASE_LR = LR_PER_IMAGE x IMS_PER_BATCH
    Key("SOLVER.MOMENTUM", name="solver.momentum", check=Check(lambda v: 0 <= v < 1, "in [0, 1)")),
    Key("SOLVER.WEIGHT_DECAY", name="solver.weight_decay", check=non_negative()),
    Key("SOLVER.GAMMA", name="solver.gamma", check=Check(lambda v: 0 < v <= 1, "in (0, 1]")),
    Key("SOLVER.EPOCHS", 12, "solver.epochs", positive()),  # epochs after warm-up
    # warm-up epochs before them (paper: 1 binary, 2 multi-type)
    Key("SOLVER.WARMUP_EPOCHS", 1, "solver.warmup_epochs", non_negative()),
    # x GAMMA at these epochs, counted after warm-up (checked against solver.epochs: fsd_d2.config.validate)
    Key("SOLVER.STEP_EPOCHS", [8, 11], "solver.step_epochs"),
    Key("SOLVER.CHECKPOINT_PERIOD_EPOCHS", 1.0, "solver.checkpoint_period_epochs", positive()),
    # 0: evaluate only at the end
    Key("SOLVER.EVAL_PERIOD_EPOCHS", 0.0, "solver.eval_period_epochs", non_negative(">= 0 (0: only at the end)")),
    Key("SOLVER.LR_SCHEDULER_NAME", name="solver.lr_scheduler"),
    # >0: clip each parameter's (Detectron2), a search the total (DARTS: 5) grad norm
    Key("SOLVER.CLIP_GRAD_NORM", 0.0, "solver.clip_grad_norm", non_negative(">= 0 (0: off)")),
    # periodic checkpoints kept besides model_final.pth (older ones are deleted)
    Key("SOLVER.KEEP_CHECKPOINTS", 2, "solver.keep_checkpoints", AT_LEAST_1),
    Key("SOLVER.BASE_LR", derived="solver.lr_per_image (x solver.ims_per_batch)"),
    Key("SOLVER.MAX_ITER", derived=_SCHEDULE),
    Key("SOLVER.WARMUP_ITERS", derived=_SCHEDULE),
    Key("SOLVER.STEPS", derived=_SCHEDULE),
    Key("SOLVER.CHECKPOINT_PERIOD", derived="solver.checkpoint_period_epochs"),
    Key("TEST.EVAL_PERIOD", derived="solver.eval_period_epochs"),
    Key("SOLVER.CLIP_GRADIENTS.ENABLED", derived="solver.clip_grad_norm"),
    Key("SOLVER.CLIP_GRADIENTS.CLIP_TYPE", derived="solver.clip_grad_norm"),
    Key("SOLVER.CLIP_GRADIENTS.CLIP_VALUE", derived="solver.clip_grad_norm"),

    # --- bi-level architecture search (fsd_d2.engine.search) ---
    # Adam lr for alphas per image; ARCH_BASE_LR = this x IMS_PER_BATCH
    Key("SEARCH.ARCH_LR_PER_IMAGE", 0.0024, "search.arch_lr_per_image", positive(),
        formerly="solver.arch_lr_per_image"),
    Key("SEARCH.ARCH_BASE_LR", 0.0, derived="search.arch_lr_per_image (x solver.ims_per_batch)"),
    Key("SEARCH.ARCH_WEIGHT_DECAY", 1e-3, "solver.arch_weight_decay", non_negative()),
    Key("SEARCH.ARCH_BETAS", [0.5, 0.999]),  # DARTS' Adam betas
    Key("SEARCH.LR_MIN", 1e-4, "solver.lr_min", non_negative()),  # cosine floor of the weight learning rate
    # 1: first-order DARTS; 2: unrolled second order (finite-difference HVP)
    Key("SEARCH.ORDER", 2, "search.order", one_of((1, 2), "1 (first order) or 2 (second order)"),
        formerly="solver.order"),
    Key("SEARCH.FD_EPSILON", 0.01),  # finite-difference step, scaled by 1/||dw|| as in DARTS
    # Latency-aware search: alpha loss + LATENCY_WEIGHT x E_alpha[latency] / E_uniform[latency] (0: the paper's search)
    Key("SEARCH.LATENCY_WEIGHT", 0.0, "search.latency_weight",
        non_negative(">= 0 (0: the paper's search, without the latency term)")),
    # op_latency_<kind>.yaml of +stage=profile_ops; needed when LATENCY_WEIGHT > 0
    Key("SEARCH.LATENCY_TABLE", "", "search.latency_table"),
    # > 0: a budget in ms for the derived cells' predicted latency (the table's sum): the latency term becomes
    # TuNAS' LATENCY_WEIGHT x |E_alpha[latency] / target - 1| and the derivation repairs a genotype above it (0: off)
    Key("SEARCH.LATENCY_TARGET_MS", 0.0, "search.latency_target_ms", non_negative(">= 0 ms (0: no latency target)")),
    # Second order: the weight step reuses the unrolled step's dL_train/dw (taken before the alpha update; DARTS
    # takes a fresh one after it): one forward-backward pass fewer per step (fsd_d2.engine.search.SearchTrainer)
    Key("SEARCH.REUSE_TRAIN_GRADIENT", False, "search.reuse_train_gradient"),
    # Against DARTS' collapse onto skip connections (both off: the paper's plain DARTS). P-DARTS' cap on the skip
    # connections of a derived cell (-1: none; P-DARTS keeps 2), and beta-DARTS' beta-decay: + weight x
    # mean_edges logsumexp(alpha) in the alpha loss, the weight rising linearly from 0 over the search
    Key("SEARCH.MAX_SKIP_CONNECTIONS", -1, "search.max_skip_connections",
        Check(lambda v: v >= -1, ">= 0 skip connections per derived cell, or -1 (no cap)")),
    Key("SEARCH.BETA_DECAY_WEIGHT", 0.0, "search.beta_decay_weight", non_negative(">= 0 (0: off, the paper's search)")),

    # --- Weights & Biases (fsd_d2.engine.wandb) ---
    Key("WANDB.ENABLED", True, "logger.enabled"),
    Key("WANDB.PROJECT", "fsd-d2", "logger.project"),
    Key("WANDB.ENTITY", "", "logger.entity"),
    # offline | online | disabled (WANDB_MODE in the environment wins)
    Key("WANDB.MODE", "offline", "logger.mode",
        one_of(("offline", "online", "disabled"), "offline, online or disabled")),
    Key("WANDB.TAGS", [], "logger.tags"),
    Key("WANDB.GROUP", "", "logger.group"),  # empty: the Hydra sweep in a multirun
    Key("WANDB.NAME", "", "logger.run_name"),  # empty: <stage>-<run directory>
    Key("WANDB.JOB_TYPE", "", derived="+stage"),  # the stage

    # --- evaluation ---
    # sens@F as the published tables (cadlab: NIH CADLab code, +1-px areas, Possibly_noisy lesions removed) or coco
    Key("TEST.SENSITIVITY_PROTOCOL", "cadlab", "evaluation.protocol",
        Check(lambda v: v in PROTOCOLS, " or ".join(PROTOCOLS))),
    # evaluated images per split drawn with ground truth and detections (Fig. 3)
    Key("TEST.DRAW_IMAGES", 4, check=non_negative()),

    # --- the run: root keys of conf/config.yaml (their defaults live there) and the stage ---
    Key("MODEL.DEVICE", name="device"),
    Key("SEED", name="seed"),
    Key("DATALOADER.NUM_WORKERS", name="num_workers", check=non_negative()),
    Key("OUTPUT_DIR", name="output_dir"),
    Key("FSD_STAGE", "", derived="+stage"),  # the stage this config runs
)


def add_fsd_config(cfg: CN) -> None:
    """Declare every FSD-D2 key with its default (paper values where the paper gives one): :data:`KEYS`."""
    for k in KEYS:
        if k.default is D2:
            continue
        node = cfg
        *parents, leaf = k.key.split(".")
        for part in parents:
            if part not in node:
                setattr(node, part, CN())
            node = node[part]
        setattr(node, leaf, copy.deepcopy(k.default))


# Friendly Hydra keys -> Detectron2 keys, per group. ``name`` in every group is the option's label (W&B, tables).
FRIENDLY_KEYS: Dict[str, Dict[str, str]] = {}
for _k in KEYS:
    if _k.group:
        FRIENDLY_KEYS.setdefault(_k.group, {})[_k.name.split(".", 1)[1]] = _k.key
LABEL_ONLY = {"model", "solver", "logger"}  # groups whose ``name`` is a label with no Detectron2 key
# Former friendly names -> the current ones. The generated group bases hold each former name as null, so that Hydra
# takes ``solver.order=1`` and build_cfg can refuse it naming the key that replaced it.
MOVED: Dict[str, str] = {k.formerly: k.name for k in KEYS if k.formerly}
# Root nodes holding an operation pool: their options are the pools (Hydra's search_space group), not a generated base.
POOL_NODES = ("search_space", "head_search_space")
# Root keys of conf/config.yaml that are Detectron2 keys (their defaults live there).
RUN_KEYS: Dict[str, str] = {k.name: k.key for k in KEYS if k.name and not k.group}
FRIENDLY_NAME_OF: Dict[str, str] = {k.key: k.name for k in KEYS if k.group}

# Keys computed by build_cfg / apply_* from others, with what to set instead (a root key: its root name).
DERIVED_KEYS: Dict[str, str] = {**{k.key: k.derived for k in KEYS if k.derived},
                                **{d2: name for name, d2 in RUN_KEYS.items()}}

# What a user may set, checked before anything is built: (test, what it must be).
VALUE_RULES: Dict[str, Check] = {k.key: k.check for k in KEYS if k.check}


def friendly_name(key: str) -> str:
    """How a user sets ``key``: its friendly or root name, else ``d2.<key>``."""
    return FRIENDLY_NAME_OF.get(key) or next((n for n, d2 in RUN_KEYS.items() if d2 == key), f"d2.{key}")


def get_value(cfg: CN, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg
