"""Make the configured dataset available: generate the synthetic set if chosen, then register the splits."""
import os
from typing import List

from detectron2.config import CfgNode
from detectron2.utils import comm

from fsd_d2.data.coco import TYPES_SUFFIX, CocoOptions, register_coco
from fsd_d2.data.deeplesion import CSV_NAME, IMAGES_DIR, SPLIT_NAMES, register_deeplesion
from fsd_d2.data.synthetic import generate_synthetic
from fsd_d2.errors import ConfigError, MissingFileError

COCO_SPLITS = ("train", "val", "test")  # dataset.<split>_json / dataset.<split>_name
# What only dataset=coco reads, with its default: set with another dataset, it would be silently ignored.
_COCO_ONLY = {"TRAIN_JSON": "", "VAL_JSON": "", "TEST_JSON": "", "PIXELS": "ct16", "HU_OFFSET": 32768.0}


def setup_datasets(cfg: CfgNode) -> List[str]:
    """Generate (``DEEPLESION.SOURCE`` synthetic) or check (deeplesion) ``DEEPLESION.ROOT``, then register; or
    register the COCO JSON files (coco).

    Returns the registered split names (see :func:`fsd_d2.data.deeplesion.register_deeplesion` and
    :func:`fsd_d2.data.coco.register_coco`).
    """
    d = cfg.DEEPLESION
    root, source = d.ROOT, d.SOURCE
    if source == "coco":
        return _setup_coco(cfg)
    coco_keys = [f"dataset.{k.lower()}={d.COCO[k]!r}" for k, default in _COCO_ONLY.items() if d.COCO[k] != default]
    if coco_keys:
        raise ConfigError(f"{', '.join(coco_keys)} apply to dataset=coco only; add dataset=coco (your own data in "
                          f"COCO JSON) or drop them")
    if source == "synthetic":
        if not root:
            raise ConfigError("dataset.root is empty: set the folder the synthetic set is generated into")
        params = {k.lower(): v for k, v in d.SYNTHETIC.items()}
        if comm.is_main_process():
            generate_synthetic(root, **params)
        comm.synchronize()  # the other processes of a launch then find the set written and reuse it
        if not comm.is_main_process():
            generate_synthetic(root, **params)
    elif source == "deeplesion":
        if not root or not os.path.isfile(os.path.join(root, CSV_NAME)):
            where = f"'{root}' has no {CSV_NAME}" if root else "dataset.root is not set"
            raise MissingFileError(f"DeepLesion not found: {where}. Download DeepLesion (DL_info.csv and the "
                                   f"{IMAGES_DIR}/ archives, unzipped) and set dataset.root=/path/to/DeepLesion")
    else:
        raise ConfigError(f"dataset.name '{source}' is not known; use dataset=synthetic, dataset=deeplesion or "
                          f"dataset=coco")
    return register_deeplesion(root, drop_noisy=d.DROP_NOISY, patients=tuple(d.PATIENTS),
                               skip_bad_rows=d.SKIP_BAD_ROWS, hu_window=tuple(d.HU_WINDOW),
                               use_dicom_window=d.USE_DICOM_WINDOW, check_boxes=d.BOX_PAD_CHECK,
                               slice_interval_mm=d.SLICE_INTERVAL_MM, spacing_mm=d.SPACING_MM,
                               coordinate_origin=d.COORDINATE_ORIGIN)


def unregistered_hint(cfg: CfgNode, name: str) -> str:
    """What the config says about a split ``name`` that is not registered ("" when nothing): with dataset=coco, the
    JSON key to set, or the stage's DeepLesion default to replace."""
    if cfg.DEEPLESION.SOURCE != "coco":
        return ""
    c = cfg.DEEPLESION.COCO
    for split in COCO_SPLITS:
        own = c[f"{split.upper()}_NAME"]
        if name in (own, own + TYPES_SUFFIX) and not c[f"{split.upper()}_JSON"]:
            return f" (set dataset.{split}_json=/path/to/{split}.json, the COCO JSON of split {own})"
    if name in SPLIT_NAMES:
        return (f" (the stage's default is a DeepLesion split; with dataset=coco name yours, e.g. "
                f"dataset.train=[{c.VAL_NAME}{TYPES_SUFFIX}] dataset.test=[{c.TEST_NAME}{TYPES_SUFFIX}] for the "
                f"lesion types)")
    return ""


def _setup_coco(cfg: CfgNode) -> List[str]:
    """Register each COCO split whose JSON is set."""
    d, c = cfg.DEEPLESION, cfg.DEEPLESION.COCO
    deeplesion_only = {"dataset.skip_bad_rows": d.SKIP_BAD_ROWS, "dataset.patients": list(d.PATIENTS),
                       "dataset.slice_interval_mm": d.SLICE_INTERVAL_MM}
    set_keys = [f"{k}={v!r}" for k, v in deeplesion_only.items() if v]
    if set_keys:
        raise ConfigError(f"{', '.join(set_keys)} apply to DeepLesion's DL_info.csv, not to dataset=coco; drop them "
                          f"(a COCO image names its neighbour slices itself, and a bad entry is fixed in the JSON)")
    if not d.ROOT:
        raise ConfigError("dataset.root is not set: with dataset=coco it is the image folder the JSON's file_name "
                          "entries are relative to (dataset.root=/path/to/images)")
    splits = {split: (c[f"{split.upper()}_NAME"], c[f"{split.upper()}_JSON"]) for split in COCO_SPLITS}
    names = [name for name, _ in splits.values()]
    clash = [n for n in names if not n or n in SPLIT_NAMES or names.count(n) > 1]
    if clash:
        raise ConfigError(f"dataset.train_name, dataset.val_name and dataset.test_name must be three different names, "
                          f"none of DeepLesion's; got {names}")
    options = CocoOptions(pixels=c.PIXELS, hu_offset=float(c.HU_OFFSET), check_boxes=d.BOX_PAD_CHECK,
                          drop_noisy=d.DROP_NOISY, use_dicom_window=d.USE_DICOM_WINDOW, spacing_mm=d.SPACING_MM)
    return register_coco({name: path for name, path in splits.values() if path}, d.ROOT, options=options,
                         hu_window=tuple(d.HU_WINDOW),
                         json_keys={name: f"dataset.{split}_json" for split, (name, _) in splits.items()})
