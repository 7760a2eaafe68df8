"""DeepLesionMapper: one mapper for training and inference; image, boxes and RECIST transform together."""
import os
import re

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog

from fsd_d2.config import add_fsd_config
from fsd_d2.data.ct import load_slice_mix
from fsd_d2.data.deeplesion import register_deeplesion
from fsd_d2.data.cache import cache_path
from fsd_d2.data.mapper import DeepLesionMapper
from fsd_d2.data.synthetic import generate_synthetic
from fsd_d2.errors import DataError


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return generate_synthetic(str(tmp_path_factory.mktemp("syn") / "tiny"), num_key_slices=6, image_size=64, seed=1)


@pytest.fixture(scope="module")
def record(root):
    register_deeplesion(root)
    return DatasetCatalog.get("deeplesion_train")[0]


def _cfg(short=128, **deeplesion):
    cfg = get_cfg()
    add_fsd_config(cfg)
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TEST = (short,), short
    cfg.INPUT.RANDOM_FLIP = "none"
    for k, v in deeplesion.items():
        cfg.DEEPLESION[k] = v
    return cfg


def _boxes(record):
    return np.array([a["bbox"] for a in record["annotations"]], dtype=np.float32)


def test_train_output_resized_with_boxes_and_recist(record):
    out = DeepLesionMapper(_cfg(128), is_train=True)(record)
    assert out["image"].shape == (3, 128, 128) and out["image"].dtype == torch.uint8
    assert (out["height"], out["width"]) == (64, 64) and out["image_id"] == record["image_id"]
    assert "annotations" not in out and "annotations" in record  # the input dict is left intact
    inst = out["instances"]
    assert inst.image_size == (128, 128)
    assert np.allclose(inst.gt_boxes.tensor.numpy(), 2 * _boxes(record), atol=1e-4)
    assert inst.gt_classes.tolist() == [0] * len(record["annotations"])
    assert np.allclose(inst.gt_recist.numpy(), 2 * np.array([a["recist"] for a in record["annotations"]]), atol=1e-3)


def test_eval_output_keeps_original_size_without_annotations(record):
    out = DeepLesionMapper(_cfg(64), is_train=False)(record)
    assert "instances" not in out and "annotations" not in out
    expected = load_slice_mix(record["slices"], (-1024, 3071))
    assert torch.equal(out["image"], torch.as_tensor(expected.transpose(2, 0, 1)))


def test_dicom_window_option(record):
    out = DeepLesionMapper(_cfg(64, USE_DICOM_WINDOW=True), is_train=False)(record)
    expected = load_slice_mix(record["slices"], record["dicom_window"])
    assert torch.equal(out["image"], torch.as_tensor(expected.transpose(2, 0, 1)))


def test_spacing_normalisation_rescales_image_and_boxes(record):
    sx, sy, _ = record["spacing_mm"]
    out = DeepLesionMapper(_cfg(128, SPACING_MM=2 * sx), is_train=True)(record)  # pixels twice as large
    assert out["image"].shape == (3, 32, 32)  # short side 128 is not applied on top
    scale = np.array([32 / 64, 32 / 64] * 2, dtype=np.float32)
    assert np.allclose(out["instances"].gt_boxes.tensor.numpy(), _boxes(record) * scale, atol=1e-3)


def test_slice_interval_image_is_the_windowed_hu_mix(root):
    register_deeplesion(root, slice_interval_mm=2.0)
    d = next(d for d in DatasetCatalog.get("deeplesion_train") if any(len(c) == 2 for c in d["slices"]))
    out = DeepLesionMapper(_cfg(64, HU_WINDOW=[-160.0, 240.0]), is_train=False)(d)
    hu = [sum(w * (cv2.imread(path, cv2.IMREAD_UNCHANGED).astype(np.float64) - 32768) for path, w in channel)
          for channel in d["slices"]]
    expected = np.rint(np.clip((np.stack(hu) + 160) * 255 / 400, 0, 255))
    diff = np.abs(out["image"].numpy() - expected)
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99  # the loader sums in float32: a rare .5 may round apart


def test_cache_path_names_the_slice_interval(record):
    at = {interval: cache_path("/c", {**record, "slice_interval_mm": interval}, (-1024, 3071), False)
          for interval in (0.0, 2.0, 2.5)}
    assert at[0.0] == f"/c/hu_-1024_3071/{record['image_id']}.npy"  # interval 0: the folder of before
    assert at[2.0] == f"/c/hu_-1024_3071_interval_2mm/{record['image_id']}.npy"
    assert len(set(at.values())) == 3
    assert cache_path("/c", {**record, "slice_interval_mm": 2.0}, (-1024, 3071), True).startswith(
        "/c/dicom_windows_interval_2mm/")


def test_image_size_mismatch_names_the_file(record):
    bad = {**record, "height": 65}
    expected = f"{record['file_name']}: the slices are 64x64 pixels but Image_size in DL_info.csv says 64x65"
    with pytest.raises(ValueError, match=re.escape(expected)):
        DeepLesionMapper(_cfg(64), is_train=False)(bad)


@pytest.mark.parametrize("content", [b"", np.zeros((32, 64, 3), dtype=np.uint8)])
def test_damaged_cache_file_is_named_with_prepare_as_the_fix(record, tmp_path, content):
    path = cache_path(str(tmp_path), record, (-1024, 3071), False)
    os.makedirs(os.path.dirname(path))
    if isinstance(content, bytes):
        open(path, "wb").close()
    else:
        np.save(path, content)
    with pytest.raises(DataError, match=re.escape(f"{path}: damaged cache file")) as err:
        DeepLesionMapper(_cfg(64, CACHE_DIR=str(tmp_path)), is_train=False)(record)
    assert "rerun +stage=prepare" in str(err.value) and "Image_size" not in str(err.value)
