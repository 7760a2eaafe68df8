"""The ``prepare`` cache: one uncompressed ``.npy`` per key slice (its HxWx3 uint8 image), where it lives, and how it
is written and read.

Why ``.npy``: reading one is a header parse and a copy, ~0.1 ms at 512 px, where decoding the same image from a
PNG takes ~5 ms and converting its three 16-bit slices ~11 ms (``benchmarks/data_loading.py``), so one data-loader
worker feeds what a PNG cache needs several for; memory-mapping would save only that copy. The price is disk:
768 KiB an image, ~24 GiB for DeepLesion's 32,120 key slices (~7 GiB as PNG). Caches written as PNG by earlier
versions are still read.
"""
import logging
import os
import re
from typing import Dict, Optional, Sequence, Tuple

import cv2
import numpy as np
from detectron2.config import CfgNode

from fsd_d2.data.ct import HU_OFFSET
from fsd_d2.data.synthetic import process_alive
from fsd_d2.errors import DataError

logger = logging.getLogger(__name__)

CACHE_SUBDIR = "cache_3slice"  # default cache folder inside the dataset root
_TEMP = re.compile(r"\.tmp(\d+)\.(npy|png)$")  # <name>.tmp<pid>.<ext>: a file still being written by process pid
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
_FIX = "Fix: rerun +stage=prepare, which makes damaged cache files again"


def cache_dir_for(cfg: CfgNode) -> str:
    """Where ``+stage=prepare`` writes (and the mapper looks for) converted images; "" when no root is set."""
    if cfg.DEEPLESION.CACHE_DIR:
        return cfg.DEEPLESION.CACHE_DIR
    return os.path.join(cfg.DEEPLESION.ROOT, CACHE_SUBDIR) if cfg.DEEPLESION.ROOT else ""


def cache_path(cache_dir: str, record: Dict, hu_window: Sequence[float], use_dicom_window: bool) -> str:
    """Cached image of ``record``; the folder names the window, the slice interval the record was registered
    with (when > 0) and its HU offset (when not DeepLesion's), so changing any never reuses stale images. The file
    is named by the record's "cache_key" (COCO: ``<split>/<id>``, ids repeat across JSON files), else its image_id.
    """
    tag = "dicom_windows" if use_dicom_window else "hu_{:g}_{:g}".format(*hu_window)
    if record["slice_interval_mm"] > 0:
        tag += "_interval_{:g}mm".format(record["slice_interval_mm"])
    if record.get("hu_offset", HU_OFFSET) != HU_OFFSET:
        tag += "_offset_{:g}".format(record["hu_offset"])
    return os.path.join(cache_dir, tag, f"{record.get('cache_key', record['image_id'])}.npy")


def _png_path(path: str) -> str:
    """Where an earlier version's ``prepare`` wrote the image of the ``.npy`` ``path`` (as a PNG)."""
    return f"{path[:-len('.npy')]}.png"


def cache_problem(path: str, shape: Tuple[int, ...]) -> str:
    """What makes the ``.npy`` at ``path`` unusable as a ``shape`` uint8 image, from its header and size alone;
    "" when nothing does."""
    try:
        with open(path, "rb") as f:
            read_header = _HEADER_READERS.get(np.lib.format.read_magic(f))
            if read_header is None:
                return "is a .npy of a format version numpy's np.save does not write"
            got, fortran, dtype = read_header(f)
            expected_size = f.tell() + int(np.prod(got)) * dtype.itemsize
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    except ValueError as e:  # no .npy magic or a garbled header (an empty file too)
        return f"is not a .npy array ({e})"
    if tuple(got) != tuple(shape) or dtype != np.uint8 or fortran:
        return f"holds a {got} {dtype} array, expected a {tuple(shape)} uint8 image"
    if size != expected_size:
        return f"is truncated or padded ({size} bytes, expected {expected_size})"
    return ""


def write_cached(path: str, image: np.ndarray) -> None:
    """Write ``image`` to ``path`` atomically: to a temp file in the same folder, then ``os.replace``, so a killed
    run never leaves a half-written file under the name the mapper trusts."""
    tmp = f"{path[:-len('.npy')]}.tmp{os.getpid()}.npy"
    try:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(image), allow_pickle=False)
    except OSError as e:
        raise DataError(f"could not write {tmp} ({e.strerror}); check free space and permissions of the cache "
                        f"folder (dataset.cache_dir)") from None
    os.replace(tmp, path)


def remove_stale_temps(folder: str) -> int:
    """Remove the temp files of writers that were killed (their process is gone) from ``folder``; a live
    process's temp file is left alone, it is still being written. Returns how many were removed."""
    removed = 0
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        match = _TEMP.search(name)
        if match and not process_alive(int(match.group(1))):
            os.remove(os.path.join(folder, name))
            removed += 1
    if removed:
        logger.info(f"removed {removed} temp files in {folder}, left by a prepare run that was killed")
    return removed


def read_cached(path: str, shape: Tuple[int, ...]) -> Optional[np.ndarray]:
    """The cached ``shape`` uint8 image at ``path`` (or at the PNG an earlier version wrote there); None when
    neither file exists. A damaged file raises a :class:`DataError` naming it, with ``prepare`` as the fix."""
    if os.path.exists(path):
        try:
            image = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"{path}: damaged cache file ({e}). {_FIX}") from None
    elif os.path.exists(_png_path(path)):
        path = _png_path(path)
        image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        if image is None:
            raise DataError(f"{path}: damaged cache file (expected a {shape} uint8 image, got an unreadable "
                            f"file). {_FIX}")
    else:
        return None
    if image.shape != tuple(shape) or image.dtype != np.uint8:
        raise DataError(f"{path}: damaged cache file (expected a {shape} uint8 image, got shape {image.shape} "
                        f"{image.dtype}). {_FIX}")
    return image
