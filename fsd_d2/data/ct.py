"""CT slice conversion: 16-bit DeepLesion PNG -> Hounsfield units -> windowed 3-slice uint8 image.

Kept as small pure functions so the conversion the reference detectors use (3DCE, MULAN) can be tested
with known pixel values and shared by the mapper and the ``prepare`` cache.
"""
from typing import Sequence, Tuple

import cv2
import numpy as np

HU_OFFSET = 32768  # DeepLesion stores HU + 32768 as unsigned 16 bit


def png_to_hu(arr: np.ndarray) -> np.ndarray:
    """Hounsfield units of a DeepLesion slice (uint16 array) as float32."""
    if arr.dtype != np.uint16:
        raise ValueError(f"expected a uint16 DeepLesion slice, got dtype {arr.dtype}")
    return arr.astype(np.float32) - HU_OFFSET


def window_to_uint8(hu: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map HU in [lo, hi] linearly to [0, 255] (rounded), clipping outside the window."""
    if not hi > lo:
        raise ValueError(f"HU window must have lo < hi, got [{lo}, {hi}]")
    scaled = (np.asarray(hu, dtype=np.float32) - lo) * (255.0 / (hi - lo))
    return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


def neighbour_slice_indices(key: int, first: int, last: int) -> Tuple[int, int, int]:
    """(previous, key, next) slice numbers; at the ends of the volume the key slice repeats (clamped)."""
    if not first <= key <= last:
        raise ValueError(f"key slice {key} lies outside the slice range {first}-{last}")
    return max(key - 1, first), key, min(key + 1, last)


def read_slice(path: str) -> np.ndarray:
    """One 16-bit slice, with an error naming the file if it is missing or not 16-bit."""
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise FileNotFoundError(f"{path}: CT slice missing or unreadable; restore it from the DeepLesion "
                                f"Images_png archives (or regenerate the synthetic set)")
    if arr.dtype != np.uint16 or arr.ndim != 2:
        raise ValueError(f"{path}: expected a single-channel 16-bit PNG (DeepLesion format), "
                         f"got dtype {arr.dtype} with shape {arr.shape}")
    return arr


def load_three_slice(paths: Sequence[str], window: Sequence[float]) -> np.ndarray:
    """HxWx3 uint8 image: channels are (previous, key, next) slice, each windowed to ``window``."""
    if len(paths) != 3:
        raise ValueError(f"need exactly 3 slice paths (previous, key, next), got {len(paths)}")
    cache = {}  # at the volume ends the key slice fills a neighbour channel: read it once
    for p in paths:
        if p not in cache:
            cache[p] = read_slice(p)
    shapes = {cache[p].shape for p in paths}
    if len(shapes) != 1:
        raise ValueError(f"slices {list(paths)} differ in size {sorted(shapes)}; one series must share one size")
    lo, hi = window
    return np.stack([window_to_uint8(png_to_hu(cache[p]), lo, hi) for p in paths], axis=-1)
