"""Convert every key slice once to its 3-slice uint8 image and cache it as ``.npy`` (the ``prepare`` stage's work).

Resumable and safe to run twice (or at once): existing files are skipped unless their header shows them
damaged (empty, truncated, wrong shape or type; see :func:`fsd_d2.data.cache.cache_problem`), which are made
again. Each file is written to a temp name and moved into place with ``os.replace``, so a crash never leaves a
half-written image that the mapper would later trust; the temp files of a killed run are removed by the next.
"""
import logging
import os
from collections import Counter
from multiprocessing import Pool
from typing import Dict, List, Tuple

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog
from tqdm import tqdm

from fsd_d2.data.cache import cache_dir_for, cache_path, cache_problem, remove_stale_temps, write_cached
from fsd_d2.data.ct import HU_OFFSET, load_slice_mix
from fsd_d2.data.deeplesion import SPLIT_NAMES, EmptySplitError
from fsd_d2.data.mapper import image_window
from fsd_d2.errors import DataError

logger = logging.getLogger(__name__)


def _convert(job: Tuple[str, list, list, int, int, float]) -> str:
    """Write one cached image unless a sound one is there: "written", "rewritten" (was damaged) or "skipped"."""
    path, slices, window, width, height, hu_offset = job
    status = "written"
    if os.path.exists(path):
        problem = cache_problem(path, (height, width, 3))
        if not problem:
            return "skipped"
        logger.warning(f"prepare: cached {path} {problem}; making it again")
        status = "rewritten"
    write_cached(path, load_slice_mix(slices, window, hu_offset))
    return status


def binary_splits(cfg: CfgNode) -> List[str]:
    """The registered binary splits of the configured dataset (the type splits share their images)."""
    if cfg.DEEPLESION.SOURCE == "coco":
        coco = cfg.DEEPLESION.COCO
        return [coco[f"{s}_NAME"] for s in ("TRAIN", "VAL", "TEST") if coco[f"{s}_JSON"]]
    return [name for name, (_, multi_type) in SPLIT_NAMES.items() if not multi_type]


def cache_images(cfg: CfgNode) -> Dict:
    """Cache the images of all registered binary splits (the type splits reuse them); returns the written,
    rewritten (damaged before) and skipped counts. ``DATALOADER.NUM_WORKERS`` > 0 converts in that many
    processes. Records without slices (COCO's 8-bit colour images) are read as they are: nothing to convert."""
    cache_dir = cache_dir_for(cfg)
    d = cfg.DEEPLESION
    jobs = {}
    for name in binary_splits(cfg):
        try:
            records = DatasetCatalog.get(name)
        except EmptySplitError as e:
            logger.warning(f"nothing to cache for {name}: {e}")
            continue
        for r in records:
            if "slices" not in r:
                continue
            path = cache_path(cache_dir, r, d.HU_WINDOW, d.USE_DICOM_WINDOW)
            jobs[path] = (path, r["slices"], image_window(r, d.HU_WINDOW, d.USE_DICOM_WINDOW), r["width"],
                          r["height"], r.get("hu_offset", HU_OFFSET))
    for folder in {os.path.dirname(job[0]) for job in jobs.values()}:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise DataError(f"cannot write the cache folder {folder} ({e.strerror}); set dataset.cache_dir to a "
                            f"writable folder") from None
        remove_stale_temps(folder)
    workers = cfg.DATALOADER.NUM_WORKERS
    bar = dict(total=len(jobs), desc=f"caching 3-slice images in {cache_dir}", unit="img")
    if workers > 0:
        with Pool(workers) as pool:
            done = list(tqdm(pool.imap_unordered(_convert, jobs.values(), chunksize=16), **bar))
    else:
        done = [_convert(job) for job in tqdm(jobs.values(), **bar)]
    counts = Counter(done)
    logger.info(f"prepare: {counts['written']} images written, {counts['rewritten']} damaged ones made again, "
                f"{counts['skipped']} already cached, in {cache_dir}")
    return {"written": counts["written"], "rewritten": counts["rewritten"], "skipped": counts["skipped"],
            "images": len(done), "cache_dir": cache_dir}
