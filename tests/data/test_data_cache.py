"""The ``prepare`` cache's ``.npy`` files: the raw path's pixels exactly, written atomically, a damaged file named
with ``prepare`` as the fix, and earlier versions' PNG caches still read."""
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog

from fsd_d2.config import base_cfg
from fsd_d2.data.cache import cache_dir_for, cache_path, cache_problem, read_cached, remove_stale_temps, write_cached
from fsd_d2.data.mapper import DeepLesionMapper
from fsd_d2.data.prepare import cache_images
from fsd_d2.data.setup import setup_datasets
from fsd_d2.errors import DataError

SHAPE = (64, 64, 3)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tiny synthetic set, cached by ``prepare``: (cfg, a val record, its cache file)."""
    cfg = base_cfg()
    cfg.DEEPLESION.SOURCE, cfg.DEEPLESION.ROOT = "synthetic", str(tmp_path_factory.mktemp("cache") / "syn")
    cfg.DEEPLESION.SYNTHETIC.update(NUM_KEY_SLICES=6, IMAGE_SIZE=64, SLICES_PER_SERIES=3, SEED=4)
    cfg.INPUT.MIN_SIZE_TEST, cfg.DATALOADER.NUM_WORKERS = 64, 0
    setup_datasets(cfg)
    cache_images(cfg)
    record = DatasetCatalog.get("deeplesion_val")[0]
    return cfg, record, cache_path(cache_dir_for(cfg), record, (-1024, 3071), False)


def _mapped(cfg, record, cache_dir):
    cfg = cfg.clone()
    cfg.DEEPLESION.CACHE_DIR = cache_dir
    return DeepLesionMapper(cfg, is_train=False)(record)["image"]


def test_cached_image_equals_the_raw_path_exactly(prepared, tmp_path):
    cfg, record, path = prepared
    assert path.endswith(".npy") and cache_problem(path, SHAPE) == ""
    assert torch.equal(_mapped(cfg, record, os.path.dirname(os.path.dirname(path))),
                       _mapped(cfg, record, str(tmp_path / "no_cache")))  # converted on the fly


@pytest.mark.parametrize("damage, problem", [
    (lambda p: open(p, "wb").close(), "is not a .npy array"),
    (lambda p: os.truncate(p, os.path.getsize(p) - 5), "is truncated or padded"),
    (lambda p: np.save(p, np.zeros((32, 64, 3), np.uint8)), "holds a (32, 64, 3) uint8 array"),
    (lambda p: np.save(p, np.zeros(SHAPE, np.float32)), "holds a (64, 64, 3) float32 array"),
])
def test_a_damaged_file_names_itself_and_prepare_as_the_fix(tmp_path, damage, problem):
    path = str(tmp_path / "1.npy")
    write_cached(path, np.ones(SHAPE, np.uint8))
    damage(path)
    assert cache_problem(path, SHAPE).startswith(problem)
    with pytest.raises(DataError, match=re.escape(f"{path}: damaged cache file")) as err:
        read_cached(path, SHAPE)
    assert "rerun +stage=prepare" in str(err.value)


def test_an_earlier_png_cache_is_still_read(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, SHAPE, dtype=np.uint8)
    path = str(tmp_path / "7.npy")
    assert read_cached(path, SHAPE) is None  # nothing cached: the mapper converts the slices
    cv2.imwrite(str(tmp_path / "7.png"), image)
    assert np.array_equal(read_cached(path, SHAPE), image)
    write_cached(path, image[::-1])
    assert np.array_equal(read_cached(path, SHAPE), image[::-1])  # the .npy wins once prepare wrote it


def test_temps_of_a_killed_writer_are_removed_a_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    live = os.getppid()  # a process that surely runs (pytest's parent)
    for name in (f"1.tmp{dead}.npy", f"2.tmp{dead}.png", f"3.tmp{live}.npy", "4.npy"):
        (tmp_path / name).write_bytes(b"x")
    assert remove_stale_temps(str(tmp_path)) == 2
    assert sorted(os.listdir(tmp_path)) == [f"3.tmp{live}.npy", "4.npy"]
