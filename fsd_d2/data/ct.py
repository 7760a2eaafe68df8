"""CT slice conversion: 16-bit DeepLesion PNG -> Hounsfield units -> windowed 3-slice uint8 image.

Kept as small pure functions so the conversion the reference detectors use (3DCE, MULAN) can be tested
with known pixel values and shared by the mapper and the ``prepare`` cache. Which slices make each of the
3 channels, and with what weight, has one representation: a list of ``(slice, weight)`` pairs per channel
(see :func:`channel_slices`), which :func:`load_slice_mix` turns into the image.
"""
import math
from typing import Dict, Sequence, Tuple

import cv2
import numpy as np

from fsd_d2.errors import DataError, MissingFileError

HU_OFFSET = 32768  # DeepLesion stores HU + 32768 as unsigned 16 bit


def png_to_hu(arr: np.ndarray, offset: float = HU_OFFSET) -> np.ndarray:
    """Hounsfield units of a 16-bit slice (uint16 array) as float32: stored value - ``offset`` (DeepLesion's
    32768; a COCO dataset states its own, ``dataset.hu_offset``)."""
    if arr.dtype != np.uint16:
        raise ValueError(f"expected a uint16 DeepLesion slice, got dtype {arr.dtype}")
    return arr.astype(np.float32) - np.float32(offset)


def window_to_uint8(hu: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map HU in [lo, hi] linearly to [0, 255] (rounded), clipping outside the window."""
    if not hi > lo:
        raise ValueError(f"HU window must have lo < hi, got [{lo}, {hi}]")
    scaled = (np.asarray(hu, dtype=np.float32) - lo) * (255.0 / (hi - lo))
    return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


def channel_slices(key: int, first: int, last: int, z_spacing_mm: float,
                   interval_mm: float) -> Tuple[Tuple[Tuple[int, float], ...], ...]:
    """Per channel (previous, key, next), the ``(slice number, weight)`` pairs whose HU mix makes it.

    The neighbours lie ``interval_mm`` before and after the key slice, i.e. ``interval_mm / z_spacing_mm``
    slices away, so they show the same anatomy whatever the scan's slice spacing (3DCE/MULAN: 2 mm);
    ``interval_mm=0`` means the directly adjacent slices (weight 1). A position is clamped to ``first..last``
    (at the volume ends the end slice repeats); between two slices the channel interpolates them linearly.
    """
    if not first <= key <= last:
        raise ValueError(f"key slice {key} lies outside the slice range {first}-{last}")
    if interval_mm < 0:
        raise ValueError(f"slice interval must be >= 0 mm, got {interval_mm}")
    if interval_mm > 0 and not z_spacing_mm > 0:
        raise ValueError(f"z spacing {z_spacing_mm} mm cannot place neighbours {interval_mm:g} mm from the key "
                         f"slice; it must be > 0")
    # rounded: 2.4 mm / 0.8 mm is 2.9999999999999996 in floats and must pick slice key ± 3 alone
    step = round(interval_mm / z_spacing_mm, 6) if interval_mm > 0 else 1

    def mix(position: float) -> Tuple[Tuple[int, float], ...]:
        position = min(max(position, first), last)
        below = math.floor(position)
        frac = position - below
        return ((below, 1.0),) if frac == 0 else ((below, 1.0 - frac), (below + 1, frac))

    return tuple(mix(key + side * step) for side in (-1, 0, 1))


def read_slice(path: str) -> np.ndarray:
    """One 16-bit slice, with an error naming the file if it is missing or not 16-bit."""
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise MissingFileError(f"{path}: CT slice missing or unreadable; restore it from the DeepLesion "
                               f"Images_png archives (or regenerate the synthetic set)")
    if arr.dtype != np.uint16 or arr.ndim != 2:
        raise DataError(f"{path}: expected a single-channel 16-bit PNG (DeepLesion format), "
                        f"got dtype {arr.dtype} with shape {arr.shape}")
    return arr


def read_channel_slices(channels: Sequence[Sequence[Tuple[str, float]]]) -> Dict[str, np.ndarray]:
    """The 16-bit slices the ``(slice path, weight)`` pairs of the 3 channels name, by path, each read once
    (neighbour channels share slices with the key channel at volume ends and when interpolating). Kept apart
    from :func:`window_slice_mix` so the PNG decode can be timed on its own (``benchmarks/data_loading.py``)."""
    if len(channels) != 3:
        raise ValueError(f"need exactly 3 channels (previous, key, next), got {len(channels)}")
    slices = {}
    for channel in channels:
        for path, _ in channel:
            if path not in slices:
                slices[path] = read_slice(path)
    shapes = {a.shape for a in slices.values()}
    if len(shapes) != 1:
        raise DataError(f"slices {list(slices)} differ in size {sorted(shapes)}; one series must share one size")
    return slices


def window_slice_mix(channels: Sequence[Sequence[Tuple[str, float]]], slices: Dict[str, np.ndarray],
                     window: Sequence[float], hu_offset: float = HU_OFFSET) -> np.ndarray:
    """HxWx3 uint8 image: each channel is the weighted sum, in HU (stored value - ``hu_offset``), of its
    ``(slice path, weight)`` pairs, the 16-bit ``slices`` by path, windowed to ``window``. Mixing before
    windowing interpolates the CT values, not clipped grey levels.
    """
    hu = {path: png_to_hu(arr, hu_offset) for path, arr in slices.items()}
    lo, hi = window
    return np.stack([window_to_uint8(sum(w * hu[p] for p, w in channel), lo, hi) for channel in channels], axis=-1)


def load_slice_mix(channels: Sequence[Sequence[Tuple[str, float]]], window: Sequence[float],
                   hu_offset: float = HU_OFFSET) -> np.ndarray:
    """HxWx3 uint8 image of the channels' slices (:func:`read_channel_slices`, then :func:`window_slice_mix`)."""
    return window_slice_mix(channels, read_channel_slices(channels), window, hu_offset)
