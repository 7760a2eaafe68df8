"""The synthetic generator: DeepLesion layout, plausible CT content, determinism and reuse."""
import csv
import json

import cv2
import numpy as np
import pytest

from fsd_d2.data.deeplesion import COLUMNS
from fsd_d2.data.synthetic import MANIFEST, generate_synthetic
from fsd_d2.errors import DataError

CSV_ORIGIN = 1  # DeepLesion's DL_info.csv counts pixels from 1 (3DCE's and MULAN's loaders subtract 1)

TINY = dict(num_key_slices=8, image_size=64, seed=0)


def _rows(root):
    with open(f"{root}/DL_info.csv", newline="") as f:
        return list(csv.DictReader(f))


def _nums(text):
    return [float(v) for v in text.split(",")]


def _hu(root, file_name, index=None):
    series, key = file_name[:-8], int(file_name[-7:-4])
    png = cv2.imread(f"{root}/Images_png/{series}/{key if index is None else index:03d}.png", cv2.IMREAD_UNCHANGED)
    assert png is not None and png.dtype == np.uint16
    return png.astype(np.float32) - 32768


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    return generate_synthetic(str(tmp_path_factory.mktemp("syn") / "medium"), num_key_slices=40, image_size=128, seed=3)


def test_layout_matches_deeplesion(tmp_path):
    root = generate_synthetic(str(tmp_path / "tiny"), **TINY)
    rows = _rows(root)
    with open(f"{root}/DL_info.csv") as f:
        assert tuple(f.readline().strip().split(",")) == COLUMNS
    assert len({r["File_name"] for r in rows}) == 8
    for r in rows:
        first, last = (int(v) for v in _nums(r["Slice_range"]))
        assert last - first + 1 == 5 and first <= int(r["Key_slice_index"]) <= last
        series = f"{int(r['Patient_index']):06d}_{int(r['Study_index']):02d}_{int(r['Series_ID']):02d}"
        assert r["File_name"] == f"{series}_{int(r['Key_slice_index']):03d}.png"
        for i in range(first, last + 1):
            assert _hu(root, r["File_name"], i).shape == (64, 64)
        assert _nums(r["Image_size"]) == [64, 64] and len(_nums(r["Spacing_mm_px_"])) == 3
        lo, hi = _nums(r["DICOM_windows"])
        assert lo < hi
        assert all(0 <= v <= 1 for v in _nums(r["Normalized_lesion_location"]))
    # official-style splits: every split present, types only on val/test
    assert {r["Train_Val_Test"] for r in rows} == {"1", "2", "3"}
    assert all((r["Coarse_lesion_type"] == "-1") == (r["Train_Val_Test"] == "1") for r in rows)
    assert sum(r["Possibly_noisy"] == "1" for r in rows) >= 1


def test_boxes_are_padded_recist_extent(medium):
    for r in _rows(medium):
        m, box = _nums(r["Measurement_coordinates"]), _nums(r["Bounding_boxes"])
        xs, ys = m[0::2], m[1::2]  # DL_info.csv's pixel coordinates start from 1, as the real file's
        o = CSV_ORIGIN
        expected = [max(o, min(xs) - 2), max(o, min(ys) - 2), min(127 + o, max(xs) + 2), min(127 + o, max(ys) + 2)]
        assert np.allclose(box, expected, atol=1e-3)
        long_d, short_d = _nums(r["Lesion_diameters_Pixel_"])
        if r["Possibly_noisy"] == "0":  # noisy rows are moved, not resized
            assert np.isclose(np.hypot(m[2] - m[0], m[3] - m[1]), long_d, rtol=1e-3)
            assert np.isclose(np.hypot(m[6] - m[4], m[7] - m[5]), short_d, rtol=1e-3)
        assert long_d >= short_d > 0


def test_anatomy_and_lesions_have_realistic_hu(medium):
    rows = [r for r in _rows(medium) if r["Possibly_noisy"] == "0"]
    corner = _hu(medium, rows[0]["File_name"])[:3, :3]
    assert abs(corner.mean() + 1000) < 30  # air outside the body
    lung = [r for r in rows if r["Coarse_lesion_type"] == "5"]
    bone = [r for r in rows if r["Coarse_lesion_type"] == "1"]
    assert lung and bone
    for r in lung:  # solid nodule inside aerated lung, fainter on the neighbour slices
        m = np.subtract(_nums(r["Measurement_coordinates"]), CSV_ORIGIN)  # 0-based pixel indices
        cx, cy = int(round((m[0] + m[2]) / 2)), int(round((m[1] + m[3]) / 2))
        key, (first, last) = int(r["Key_slice_index"]), (int(v) for v in _nums(r["Slice_range"]))
        assert _hu(medium, r["File_name"])[cy, cx] > -350
        nb = key + 1 if key < last else key - 1
        assert -750 < _hu(medium, r["File_name"], nb)[cy, cx] < 200
        x1, y1, x2, y2 = (int(v) - CSV_ORIGIN for v in _nums(r["Bounding_boxes"]))
        ring = _hu(medium, r["File_name"])[max(0, y1 - 3):y2 + 4, max(0, x1 - 3):x2 + 4]
        assert ring.min() < -600  # lung parenchyma around it
    for r in bone:  # lytic or sclerotic, in a bone (cortex ~700 HU somewhere around it)
        x1, y1, x2, y2 = (int(v) - CSV_ORIGIN for v in _nums(r["Bounding_boxes"]))
        assert _hu(medium, r["File_name"])[max(0, y1 - 4):y2 + 5, max(0, x1 - 4):x2 + 5].max() > 500


def test_same_seed_gives_identical_bytes(tmp_path):
    a = generate_synthetic(str(tmp_path / "a"), **TINY)
    b = generate_synthetic(str(tmp_path / "b"), **TINY)
    c = generate_synthetic(str(tmp_path / "c"), **{**TINY, "seed": 1})
    csv_a = open(f"{a}/DL_info.csv", "rb").read()
    assert csv_a == open(f"{b}/DL_info.csv", "rb").read()
    assert csv_a != open(f"{c}/DL_info.csv", "rb").read()
    name = _rows(a)[0]["File_name"]
    assert np.array_equal(_hu(a, name), _hu(b, name))


def test_reuses_or_regenerates_by_manifest(tmp_path):
    root = tmp_path / "syn"
    generate_synthetic(str(root), **TINY)
    stamp = (root / "DL_info.csv").stat().st_mtime_ns
    generate_synthetic(str(root), **TINY)
    assert (root / "DL_info.csv").stat().st_mtime_ns == stamp  # reused, not rewritten
    generate_synthetic(str(root), **{**TINY, "num_key_slices": 9})
    assert json.loads((root / MANIFEST).read_text())["params"]["num_key_slices"] == 9
    assert len({r["File_name"] for r in _rows(root)}) == 9
    assert not list(tmp_path.glob(".syn.tmp-*"))


def test_refuses_foreign_folder_and_bad_parameters(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "DL_info.csv").write_text("File_name\n")
    with pytest.raises(DataError, match="not made by the synthetic generator"):
        generate_synthetic(str(tmp_path / "real"), **TINY)
    with pytest.raises(ValueError, match=r"unknown dataset.synthetic parameter\(s\) \['size'\]"):
        generate_synthetic(str(tmp_path / "x"), size=3)
    with pytest.raises(ValueError, match="num_key_slices=2"):
        generate_synthetic(str(tmp_path / "x"), num_key_slices=2)


def test_a_killed_generation_leaves_nothing_behind(tmp_path):
    """The half-written folder of a generation whose process is gone is removed by the next one; a live
    process's is left to it."""
    import os
    import subprocess

    finished = subprocess.Popen(["true"])
    finished.wait()
    killed = tmp_path / f".set.tmp-{finished.pid}"
    running = tmp_path / f".set.tmp-{os.getppid()}"
    for folder in (killed, running):
        (folder / "Images_png").mkdir(parents=True)
    generate_synthetic(str(tmp_path / "set"), num_key_slices=3, image_size=32)
    assert not killed.exists() and running.exists()
    assert (tmp_path / "set" / MANIFEST).is_file()
