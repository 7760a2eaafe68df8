"""Images per second one data-loader worker delivers: from the raw slices, from the ``prepare`` cache, and from the
PNG cache earlier versions wrote, with the decode, window and resize times split out.

    python benchmarks/data_loading.py             # 48 key slices at DeepLesion's 512 x 512
    python benchmarks/data_loading.py --tiny      # 6 key slices at 64 px: a smoke test, seconds

The set is the synthetic one (``fsd_d2.data.synthetic``) written at ``--size`` into a temp folder, cached by
``+stage=prepare``'s code. Each row times the training mapper (``DeepLesionMapper``, ``is_train=True``: read or
convert, ResizeShortestEdge to ``--size``, flip, boxes) on every image, ``--repeats`` passes after one warm-up
pass, on one thread, as in one worker process; the columns split its time into reading and decoding (the three 16-bit PNGs,
or the cached file), HU windowing and mixing (raw only) and the resize and flip, each timed on its own over the
same images. The last columns give how many such workers a node needs to deliver ``--node-rate`` images a second
(default 640: 8 GPUs x 8 images at ~0.1 s a step), the bytes read per image, and the disk a cache of DeepLesion's
32,120 key slices takes at these bytes per image (the raw slices are the dataset itself). Progress goes to stderr, the Markdown table to stdout.
"""
import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import cv2
import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T

from fsd_d2.config import base_cfg
from fsd_d2.data.cache import cache_dir_for, cache_path, read_cached
from fsd_d2.data.ct import read_channel_slices, window_slice_mix
from fsd_d2.data.mapper import DeepLesionMapper, image_window
from fsd_d2.data.prepare import cache_images
from fsd_d2.data.setup import setup_datasets

DEEPLESION_KEY_SLICES = 32_120
ROWS = ("raw slices (3 x 16-bit PNG)", "prepare cache (.npy)", "PNG cache (before)")
SPLITS = ("deeplesion_train", "deeplesion_val", "deeplesion_test")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, help="slice side in pixels, also the resize's short side (default 512; 64 "
                                            "with --tiny)")
    p.add_argument("--images", type=int, help="synthetic key slices (default 48; 6 with --tiny)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes over the images after one warm-up pass")
    p.add_argument("--node-rate", type=float, default=640.0, help="images a second a node consumes (default 640)")
    p.add_argument("--tiny", action="store_true", help="few, small images: a smoke test")
    args = p.parse_args(argv)
    args.size = args.size or (64 if args.tiny else 512)
    args.images = args.images or (6 if args.tiny else 48)
    return args


def ms_per_call(fn: Callable[[Dict], object], records: List[Dict], repeats: int) -> float:
    """Median over ``repeats`` passes (after a warm-up pass) of the mean milliseconds ``fn`` takes per record."""
    passes = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        for r in records:
            fn(r)
        if i > 0:
            passes.append((time.perf_counter() - start) * 1000 / len(records))
    return statistics.median(passes)


def _prepared_set(root: str, size: int, images: int):
    """The synthetic set at ``size`` px, registered and cached by ``prepare``: (cfg, records of all splits)."""
    cfg = base_cfg()
    cfg.DEEPLESION.SOURCE, cfg.DEEPLESION.ROOT = "synthetic", root
    cfg.DEEPLESION.SYNTHETIC.update(NUM_KEY_SLICES=images, IMAGE_SIZE=size, SLICES_PER_SERIES=3)
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (size,), 1333
    cfg.DATALOADER.NUM_WORKERS = 0
    setup_datasets(cfg)
    cache_images(cfg)
    return cfg, [r for name in SPLITS for r in DatasetCatalog.get(name)]


def _png_cache(cfg, records: List[Dict], folder: str) -> None:
    """The same images as the PNG cache an earlier ``prepare`` wrote (``<id>.png`` beside no ``.npy``)."""
    d = cfg.DEEPLESION
    for r in records:
        path = cache_path(folder, r, d.HU_WINDOW, d.USE_DICOM_WINDOW)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        cv2.imwrite(f"{path[:-len('.npy')]}.png", read_cached(cache_path(cache_dir_for(cfg), r, d.HU_WINDOW,
                                                                         d.USE_DICOM_WINDOW), _shape(r)))


def _shape(record: Dict):
    return record["height"], record["width"], 3


def _disk_bytes(paths: List[str]) -> float:
    return statistics.mean(os.path.getsize(p) for p in paths)


def measure(args: argparse.Namespace, root: str) -> List[Dict]:
    """One dict per row of :data:`ROWS`: mapper, decode, window and resize milliseconds per image, and bytes per
    cached image (raw: the three slice files it reads)."""
    cfg, records = _prepared_set(os.path.join(root, "synthetic"), args.size, args.images)
    d = cfg.DEEPLESION
    npy_dir, png_dir = cache_dir_for(cfg), os.path.join(root, "png_cache")
    _png_cache(cfg, records, png_dir)
    npy = {r["image_id"]: cache_path(npy_dir, r, d.HU_WINDOW, d.USE_DICOM_WINDOW) for r in records}
    png = {i: f"{cache_path(png_dir, r, d.HU_WINDOW, d.USE_DICOM_WINDOW)[:-len('.npy')]}.png"
           for i, r in zip(npy, records)}
    slices = {r["image_id"]: read_channel_slices(r["slices"]) for r in records}
    augs = T.AugmentationList(DeepLesionMapper(cfg, is_train=True).augmentations)

    def resize(r):
        augs(T.AugInput(read_cached(npy[r["image_id"]], _shape(r))))

    def mapper_from(cache_dir):
        c = cfg.clone()
        c.DEEPLESION.CACHE_DIR = cache_dir
        return DeepLesionMapper(c, is_train=True)

    def window(r):
        window_slice_mix(r["slices"], slices[r["image_id"]], image_window(r, d.HU_WINDOW, d.USE_DICOM_WINDOW))

    timed = {
        ROWS[0]: {"mapper": mapper_from(os.path.join(root, "no_cache")),
                  "decode": lambda r: read_channel_slices(r["slices"]), "window": window},
        ROWS[1]: {"mapper": mapper_from(npy_dir), "decode": lambda r: read_cached(npy[r["image_id"]], _shape(r))},
        ROWS[2]: {"mapper": mapper_from(png_dir),
                  "decode": lambda r: cv2.imread(png[r["image_id"]], cv2.IMREAD_UNCHANGED)},
    }
    resize_ms = ms_per_call(resize, records, args.repeats)
    files = {ROWS[0]: sorted({p for r in records for channel in r["slices"] for p, _ in channel}),
             ROWS[1]: list(npy.values()), ROWS[2]: list(png.values())}
    rows = []
    for label, fns in timed.items():
        print(f"data_loading: timing {label} on {len(records)} images of {args.size} px ...", file=sys.stderr)
        per_image = 3 if label == ROWS[0] else 1  # three slices, or one cached file
        row = {"label": label, "resize": resize_ms, "window": None, "bytes": _disk_bytes(files[label]) * per_image}
        for part, fn in fns.items():
            row[part] = ms_per_call(fn, records, args.repeats)
        rows.append(row)
    return rows


def table(rows: List[Dict], node_rate: float) -> str:
    head = ["path", "mapper ms/img", "decode ms", "window ms", "resize+flip ms", "img/s per worker",
            f"workers for {node_rate:g} img/s", "MiB read/img", f"cache GiB for {DEEPLESION_KEY_SLICES:,} key slices"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        rate = 1000 / r["mapper"]
        window = "–" if r["window"] is None else f"{r['window']:.2f}"
        cells = [r["label"], f"{r['mapper']:.2f}", f"{r['decode']:.2f}", window, f"{r['resize']:.2f}", f"{rate:.0f}",
                 str(math.ceil(node_rate / rate)), f"{r['bytes'] / 2**20:.2f}",
                 "–" if r["window"] is not None else f"{r['bytes'] * DEEPLESION_KEY_SLICES / 2**30:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    args = parse_args(argv)
    torch.set_num_threads(1)  # one worker process: one core
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory(prefix="fsd_data_loading_") as root:
        rows = measure(args, root)
    print(f"Data loading per worker, {args.images} synthetic key slices of {args.size} x {args.size} px, mean per "
          f"image, median of {args.repeats} passes after 1 warm-up, 1 thread:\n")
    print(table(rows, args.node_rate))
    return rows


if __name__ == "__main__":
    main()
