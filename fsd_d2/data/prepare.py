"""Convert every key slice once to its 3-slice uint8 image and cache it (the ``prepare`` stage's work).

Resumable and safe to run twice (or at once): existing files are skipped, and each file is written to a
temp name and moved into place with ``os.replace``, so a crash never leaves a half-written image that the
mapper would later trust.
"""
import logging
import os
from multiprocessing import Pool
from typing import Dict, Tuple

import cv2
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog
from tqdm import tqdm

from fsd_d2.data.ct import load_slice_mix
from fsd_d2.data.deeplesion import SPLIT_NAMES, EmptySplitError
from fsd_d2.data.mapper import cache_dir_for, cache_path, image_window
from fsd_d2.errors import DataError

logger = logging.getLogger(__name__)


def _convert(job: Tuple[str, list, list]) -> bool:
    """Write one cached image; False when it was already there."""
    path, slices, window = job
    if os.path.exists(path):
        return False
    image = load_slice_mix(slices, window)
    tmp = f"{path[:-4]}.tmp{os.getpid()}.png"
    if not cv2.imwrite(tmp, image):
        raise DataError(f"could not write {tmp}; check free space and permissions of the cache folder")
    os.replace(tmp, path)
    return True


def cache_images(cfg: CfgNode) -> Dict:
    """Cache the images of all registered binary splits (the type splits reuse them); returns written/skipped
    counts. ``DATALOADER.NUM_WORKERS`` > 0 converts in that many processes."""
    cache_dir = cache_dir_for(cfg)
    d = cfg.DEEPLESION
    jobs = {}
    for name, (split, multi_type) in SPLIT_NAMES.items():
        if multi_type:
            continue
        try:
            records = DatasetCatalog.get(name)
        except EmptySplitError as e:
            logger.warning(f"nothing to cache for {name}: {e}")
            continue
        for r in records:
            jobs[r["image_id"]] = (cache_path(cache_dir, r, d.HU_WINDOW, d.USE_DICOM_WINDOW), r["slices"],
                                   image_window(r, d.HU_WINDOW, d.USE_DICOM_WINDOW))
    for folder in {os.path.dirname(job[0]) for job in jobs.values()}:
        os.makedirs(folder, exist_ok=True)
    workers = cfg.DATALOADER.NUM_WORKERS
    bar = dict(total=len(jobs), desc=f"caching 3-slice images in {cache_dir}", unit="img")
    if workers > 0:
        with Pool(workers) as pool:
            done = list(tqdm(pool.imap_unordered(_convert, jobs.values(), chunksize=16), **bar))
    else:
        done = [_convert(job) for job in tqdm(jobs.values(), **bar)]
    written = sum(done)
    logger.info(f"prepare: {written} images written, {len(done) - written} already cached, in {cache_dir}")
    return {"written": written, "skipped": len(done) - written, "images": len(done), "cache_dir": cache_dir}
