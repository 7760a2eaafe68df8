"""Cheap integrity checks of PNG files from their first and last bytes, and of a sample's pixels.

Why: a truncated, empty or 8-bit slice would otherwise surface only when training reaches it, hours in.
Reading the signature, the IHDR chunk (size, bit depth, colour type) and the closing IEND chunk costs a few
syscalls per file, so every slice of a split can be checked before any work starts. What the header cannot tell (a garbled body, slices saved without DeepLesion's +32768 offset,
blank slices) a decoded sample of each split does: such faults are systematic, a few files show them.
"""
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterable, Tuple

import cv2
import numpy as np
from detectron2.utils import comm
from tqdm import tqdm

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IHDR_END = 8 + 8 + 13  # signature, IHDR length and type, IHDR data (width, height, depth, colour, ...)
_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the last 12 bytes of every complete PNG
_COLOUR_TYPES = {0: "greyscale", 2: "RGB", 3: "palette", 4: "greyscale+alpha", 6: "RGBA"}

Need = Tuple[str, int, int]  # (PNG path, width, height)
HU_RANGE = (-2048, 4095)  # what a CT slice holds (scanners' padding -2048 and -1024 included); HU = stored - 32768
_CT_OFFSET = 32768
_READERS = 8  # threads reading headers: on network or cold disks the reads wait on I/O, not on Python


def png_problem(path: str, width: int, height: int, bit_depth: int = 16, colour_type: int = 0) -> str:
    """What makes ``path`` unusable as a ``width`` x ``height`` PNG of that bit depth and colour type
    (default: a 16-bit greyscale DeepLesion slice); "" when nothing does."""
    try:
        with open(path, "rb") as f:
            head = f.read(_IHDR_END)
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - len(_IEND)))
            tail = f.read(len(_IEND))
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if size == 0:
        return "is empty (0 bytes)"
    if head[:len(PNG_SIGNATURE)] != PNG_SIGNATURE:
        return f"is truncated ({size} bytes)" if PNG_SIGNATURE.startswith(head) else "is not a PNG file"
    if len(head) < _IHDR_END or head[12:16] != b"IHDR":
        return f"is truncated or corrupt ({size} bytes, no PNG header)"
    if tail != _IEND:
        return f"is truncated ({size} bytes, the PNG end marker is missing)"
    w, h = struct.unpack(">II", head[16:24])
    depth, colour = head[24], head[25]
    if (depth, colour) != (bit_depth, colour_type):
        return (f"is a {depth}-bit {_COLOUR_TYPES.get(colour, f'colour type {colour}')} PNG, expected "
                f"{bit_depth}-bit {_COLOUR_TYPES[colour_type]}")
    if (w, h) != (width, height):
        return f"is {w}x{h} pixels, expected {width}x{height}"
    return ""


class SliceChecker:
    """Remembers each slice's :func:`png_problem`, so a file is checked once however many splits need it."""

    def __init__(self):
        self._problems: Dict[Need, str] = {}

    def problems(self, needs: Iterable[Need], *, progress: bool = False, desc: str = "") -> Dict[Need, str]:
        """The damaged ones of ``needs``, with what is wrong; ``progress`` shows a bar (main process only)."""
        needs = list(dict.fromkeys(needs))
        todo = [n for n in needs if n not in self._problems]
        with ThreadPoolExecutor(_READERS) as pool:
            found = pool.map(lambda need: png_problem(*need), todo)
            bar = tqdm(found, total=len(todo), desc=desc, unit="slice",
                       disable=not (progress and todo and comm.is_main_process()))
            self._problems.update(zip(todo, bar))
        return {n: self._problems[n] for n in needs if self._problems[n]}


def pixel_problem(path: str, hu_offset: float = _CT_OFFSET) -> str:
    """What the decoded pixels of a 16-bit CT slice storing HU + ``hu_offset`` (DeepLesion: 32768) say is wrong
    with it; "" when nothing does."""
    arr = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if arr is None:
        return "cannot be decoded (its PNG data is garbled)"
    lo, hi = int(arr.min()), int(arr.max())
    if lo == hi:
        return f"holds one value everywhere ({lo}): a blank slice"
    median_hu = float(np.median(arr)) - hu_offset
    if not HU_RANGE[0] <= median_hu <= HU_RANGE[1]:
        if hu_offset != _CT_OFFSET:
            return (f"is not a CT slice storing HU + {hu_offset:g}: its median is {median_hu:.0f} HU (values "
                    f"{lo}..{hi}); is dataset.hu_offset right?")
        guess = (f"values {lo}..{hi} look like HU + 1024 (or raw HU): was the +32768 offset applied?" if hi < 16384
                 else f"values {lo}..{hi} are not HU + 32768")
        return f"is not a DeepLesion slice: its median is {median_hu:.0f} HU; {guess}"
    return ""
