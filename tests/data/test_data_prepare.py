"""setup_datasets, the Hydra dataset groups, and the prepare stage's resumable cache read by the mapper."""
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from hydra import compose, initialize_config_dir

from fsd_d2.config import base_cfg, build_cfg
from fsd_d2.data.ct import load_slice_mix
from fsd_d2.data.mapper import DeepLesionMapper
from fsd_d2.data.prepare import cache_images
from fsd_d2.data.setup import setup_datasets
from fsd_d2.errors import ConfigError, DataError

CONF = str(Path(__file__).resolve().parents[2] / "conf")
TINY = {"num_key_slices": 8, "image_size": 64, "slices_per_series": 3, "seed": 2}


def _setup(root, **deeplesion):
    """A synthetic set's CfgNode, its splits registered."""
    cfg = base_cfg()
    cfg.DEEPLESION.SOURCE, cfg.DEEPLESION.ROOT = "synthetic", str(root)
    cfg.DEEPLESION.SYNTHETIC.update({k.upper(): v for k, v in TINY.items()})
    cfg.INPUT.MIN_SIZE_TEST = 64
    for k, v in deeplesion.items():
        cfg.DEEPLESION[k] = v
    setup_datasets(cfg)
    return cfg


def test_dataset_groups_compose_into_the_cfg(tmp_path):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        h = compose("config", overrides=["+stage=train", f"output_dir={tmp_path}", "dataset.synthetic.seed=5"])
        cfg = build_cfg(h)
        assert cfg.DEEPLESION.ROOT == "outputs/datasets/synthetic_n300_s128_seed5"
        assert cfg.INPUT.MIN_SIZE_TRAIN == (128,) and list(cfg.DATASETS.TRAIN) == ["deeplesion_train"]
        h = compose("config", overrides=["+stage=train", f"output_dir={tmp_path}", "dataset=deeplesion"])
        cfg = build_cfg(h)
        assert cfg.INPUT.MIN_SIZE_TEST == 512 and list(cfg.DEEPLESION.HU_WINDOW) == [-1024, 3071]
        with pytest.raises(FileNotFoundError, match="set dataset.root=/path/to/DeepLesion"):
            setup_datasets(cfg)


def test_setup_generates_and_registers(tmp_path):
    cfg = _setup(tmp_path / "syn")
    assert (tmp_path / "syn" / "DL_info.csv").is_file() and DatasetCatalog.get("deeplesion_types_test")
    assert DatasetCatalog.get("deeplesion_train")
    cfg.DEEPLESION.SOURCE = "kitti"
    with pytest.raises(ConfigError, match="dataset.name 'kitti' is not known; use dataset=synthetic, "
                                          "dataset=deeplesion or dataset=coco"):
        setup_datasets(cfg)
    cfg.DEEPLESION.SOURCE, cfg.DEEPLESION.ROOT = "deeplesion", str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="has no DL_info.csv"):
        setup_datasets(cfg)


def test_prepare_caches_once_and_mapper_reads_the_cache(tmp_path):
    cfg = _setup(tmp_path / "syn")
    cfg.DATALOADER.NUM_WORKERS = 2
    first = cache_images(cfg)
    images = sum(len(DatasetCatalog.get(n)) for n in ("deeplesion_train", "deeplesion_val", "deeplesion_test"))
    assert (first["written"], first["skipped"], first["images"]) == (images, 0, images)
    cache = tmp_path / "syn" / "cache_3slice" / "hu_-1024_3071"
    files = sorted(cache.iterdir())
    assert len(files) == images and not list(cache.glob("*.tmp*"))
    record = DatasetCatalog.get("deeplesion_val")[0]
    cached = np.load(cache / f"{record['image_id']}.npy")
    assert np.array_equal(cached, load_slice_mix(record["slices"], (-1024, 3071)))

    cfg.DATALOADER.NUM_WORKERS = 0
    files[0].unlink()  # an interrupted run: only the missing file is written again
    again = cache_images(cfg)
    assert (again["written"], again["skipped"]) == (1, images - 1)

    np.save(cache / f"{record['image_id']}.npy", np.full((64, 64, 3), 7, dtype=np.uint8))
    out = DeepLesionMapper(cfg, is_train=False)(record)
    assert torch.all(out["image"] == 7)  # read from the cache, not reconverted


def test_cache_dir_option_and_window_tag(tmp_path):
    cfg = _setup(tmp_path / "syn", CACHE_DIR=str(tmp_path / "cache"), USE_DICOM_WINDOW=True)
    result = cache_images(cfg)
    assert result["written"] == len(list((tmp_path / "cache" / "dicom_windows").iterdir())) > 0


def test_slice_interval_key_reaches_the_cfg_records_cache_and_mapper(tmp_path):
    tiny = [f"dataset.synthetic.{k}={v}" for k, v in {**TINY, "slices_per_series": 5}.items()]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        default = build_cfg(compose("config", overrides=["+stage=train", f"output_dir={tmp_path}"]))
        h = compose("config", overrides=["+stage=train", f"output_dir={tmp_path}", f"dataset.root={tmp_path / 'syn'}",
                                         "dataset.slice_interval_mm=2", *tiny])
    assert default.DEEPLESION.SLICE_INTERVAL_MM == 0.0  # adjacent slices: the paper's setting
    cfg = build_cfg(h)
    assert cfg.DEEPLESION.SLICE_INTERVAL_MM == 2.0
    cfg.INPUT.MIN_SIZE_TEST = 64
    setup_datasets(cfg)
    result = cache_images(cfg)
    cache = tmp_path / "syn" / "cache_3slice" / "hu_-1024_3071_interval_2mm"
    assert result["written"] == len(list(cache.iterdir())) > 0
    assert not (tmp_path / "syn" / "cache_3slice" / "hu_-1024_3071").exists()  # never mixed with interval 0
    records = DatasetCatalog.get("deeplesion_val")
    assert all(r["slice_interval_mm"] == 2.0 for r in records)
    record = next(r for r in records if any(len(c) == 2 for c in r["slices"]))
    cached = np.load(cache / f"{record['image_id']}.npy")
    assert np.array_equal(cached, load_slice_mix(record["slices"], (-1024, 3071)))
    cfg.DEEPLESION.CACHE_DIR = str(tmp_path / "no_cache")  # the mapper converts on the fly, the same way
    out = DeepLesionMapper(cfg, is_train=False)(record)
    assert torch.equal(out["image"], torch.as_tensor(cached.transpose(2, 0, 1)))


def test_an_unwritable_cache_folder_is_named(tmp_path):
    (tmp_path / "a_file").write_text("")
    cfg = _setup(tmp_path / "syn", CACHE_DIR=str(tmp_path / "a_file" / "cache"))
    with pytest.raises(DataError, match=r"cannot write the cache folder .*a_file/cache.*dataset.cache_dir"):
        cache_images(cfg)
