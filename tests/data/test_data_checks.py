"""Damaged inputs found before training: slice PNG headers per split, the prepare cache, the CSV encoding,
and the pixel spacing that ``dataset.spacing_mm`` needs."""
import csv
import logging
import os
import re
import shutil

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog

from fsd_d2.config import base_cfg
from fsd_d2.data import checks, deeplesion
from fsd_d2.data.checks import png_problem
from fsd_d2.data.ct import load_slice_mix
from fsd_d2.data.deeplesion import BadRowError, register_deeplesion
from fsd_d2.data.prepare import cache_images
from fsd_d2.data.synthetic import generate_synthetic
from fsd_d2.errors import ConfigError, DataError

SPLITS = ("deeplesion_train", "deeplesion_val", "deeplesion_test")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return generate_synthetic(str(tmp_path_factory.mktemp("syn") / "tiny"), num_key_slices=10, image_size=64, seed=3)


@pytest.fixture
def root(source, tmp_path):
    """A private copy that a test may damage."""
    return str(shutil.copytree(source, tmp_path / "dl"))


def _rows(root):
    with open(os.path.join(root, "DL_info.csv"), newline="") as f:
        return list(csv.DictReader(f))


def _slice(root, row, offset=0):
    """The PNG of a row's key slice (``offset``: a neighbour of it)."""
    name = row["File_name"]
    return os.path.join(root, "Images_png", name[:-8], f"{int(name[-7:-4]) + offset:03d}.png")


def _rows_label(rows, name):
    """How a damaged-slice message names the CSV rows of one image: "row 5" or "rows 5, 6"."""
    numbers = [str(i + 2) for i, r in enumerate(rows) if r["File_name"] == name]
    return f"row{'s' if len(numbers) > 1 else ''} {', '.join(numbers)}"


def _truncate(path, keep):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:keep])


def _write_8bit(path, shape=(64, 64)):
    cv2.imwrite(path, np.full(shape, 100, dtype=np.uint8))


def _damage_three_train_images(root):
    """Truncate, empty and 8-bit one slice of three train images; returns {File_name: (path, problem)}."""
    rows = _rows(root)
    names = list(dict.fromkeys(r["File_name"] for r in rows if r["Train_Val_Test"] == "1"))[:3]
    row_of = {r["File_name"]: r for r in rows}
    assert len(names) == 3
    paths = [_slice(root, row_of[names[0]]), _slice(root, row_of[names[1]]), _slice(root, row_of[names[2]])]
    _truncate(paths[0], os.path.getsize(paths[0]) // 2)
    open(paths[1], "wb").close()
    _write_8bit(paths[2])
    problems = ("is truncated", "is empty (0 bytes)", "is a 8-bit greyscale PNG, expected 16-bit greyscale")
    return {name: (path, problem) for name, path, problem in zip(names, paths, problems)}


def test_png_problem_reads_only_the_header_and_the_end(tmp_path):
    good = str(tmp_path / "good.png")
    cv2.imwrite(good, np.full((32, 48), 32768, dtype=np.uint16))
    assert png_problem(good, 48, 32) == ""
    assert png_problem(good, 32, 48) == "is 48x32 pixels, expected 32x48"
    size = os.path.getsize(good)
    for keep, problem in [(size - 1, f"is truncated ({size - 1} bytes, the PNG end marker is missing)"),
                          (20, "is truncated or corrupt (20 bytes, no PNG header)"), (5, "is truncated (5 bytes)"),
                          (0, "is empty (0 bytes)")]:
        cut = str(tmp_path / f"cut{keep}.png")
        shutil.copy(good, cut)
        _truncate(cut, keep)
        assert png_problem(cut, 48, 32) == problem
    eight, rgb, text = str(tmp_path / "8.png"), str(tmp_path / "rgb.png"), tmp_path / "x.png"
    _write_8bit(eight, (32, 48))
    cv2.imwrite(rgb, np.zeros((32, 48, 3), dtype=np.uint8))
    text.write_text("not an image")
    assert png_problem(eight, 48, 32) == "is a 8-bit greyscale PNG, expected 16-bit greyscale"
    assert png_problem(rgb, 48, 32) == "is a 8-bit RGB PNG, expected 16-bit greyscale"
    assert png_problem(rgb, 48, 32, bit_depth=8, colour_type=2) == ""
    assert png_problem(str(text), 48, 32) == "is not a PNG file"
    assert png_problem(str(tmp_path / "none.png"), 48, 32).startswith("cannot be read")


def test_damaged_slices_stop_loading_naming_rows_files_and_fix(root):
    damaged = _damage_three_train_images(root)
    rows = _rows(root)
    register_deeplesion(root)
    assert DatasetCatalog.get("deeplesion_val")  # only the splits that need the files fail
    with pytest.raises(BadRowError) as err:
        DatasetCatalog.get("deeplesion_train")
    message = str(err.value)
    bad_rows = [i + 2 for i, r in enumerate(rows) if r["File_name"] in damaged]
    assert message.startswith(f"{root}/DL_info.csv: {len(bad_rows)} row(s) of the train split (3 image(s)) need a "
                              f"damaged slice PNG")
    for name, (path, problem) in damaged.items():
        assert f"{_rows_label(rows, name)} ({name}): {path} {problem}" in message
    assert "restore the files from the DeepLesion Images_png archives" in message
    assert "dataset.skip_bad_rows=true" in message


def test_skip_bad_rows_drops_exactly_the_rows_of_damaged_slices(root, caplog):
    damaged = _damage_three_train_images(root)
    rows = _rows(root)
    register_deeplesion(root, skip_bad_rows=True)
    with caplog.at_level(logging.WARNING, logger="fsd_d2.data.deeplesion"):
        train = DatasetCatalog.get("deeplesion_train")
    kept = {d["image_id"] + ".png" for d in train}
    expected = {r["File_name"] for r in rows if r["Train_Val_Test"] == "1"} - set(damaged)
    assert kept == expected
    dropped = sum(r["File_name"] in damaged for r in rows)
    assert f"train split: skipped {dropped} row(s) (3 image(s)) whose slice PNGs are damaged" in caplog.text


def test_a_damaged_neighbour_slice_is_found_too(root):
    rows = _rows(root)
    row = next(r for r in rows
               if int(r["Key_slice_index"]) > int(r["Slice_range"].split(",")[0]) and r["Train_Val_Test"] == "2")
    neighbour = _slice(root, row, -1)
    _write_8bit(neighbour, (64, 32))
    register_deeplesion(root)
    expected = f"{_rows_label(rows, row['File_name'])} ({row['File_name']}): {neighbour} is a 8-bit"
    with pytest.raises(BadRowError, match=re.escape(expected)):
        DatasetCatalog.get("deeplesion_val")


def test_wrong_slice_size_is_named_against_image_size(root):
    rows = _rows(root)
    row = next(r for r in rows if r["Train_Val_Test"] == "3")
    cv2.imwrite(_slice(root, row), np.full((48, 64), 32768, dtype=np.uint16))
    register_deeplesion(root)
    expected = f"{_rows_label(rows, row['File_name'])} ({row['File_name']}): {_slice(root, row)} is 64x48 pixels"
    with pytest.raises(BadRowError, match=re.escape(expected + ", expected 64x64")) as err:
        DatasetCatalog.get("deeplesion_test")
    assert "correct Image_size" in str(err.value)


def test_each_slice_is_checked_once_and_big_splits_show_progress(root, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(checks, "png_problem", lambda *need: calls.append(need) or "")
    monkeypatch.setattr(deeplesion, "_PROGRESS_MIN_IMAGES", 0)
    register_deeplesion(root)
    val = DatasetCatalog.get("deeplesion_val")
    needed = {(p, d["width"], d["height"]) for d in val for channel in d["slices"] for p, _ in channel}
    assert sorted(calls) == sorted(needed)
    assert "checking the slice PNGs of the val split" in capsys.readouterr().err
    DatasetCatalog.get("deeplesion_val")
    DatasetCatalog.get("deeplesion_types_val")
    assert len(calls) == len(needed)  # the same files: not read again


def test_prepare_makes_damaged_cache_files_again(root):
    cfg = base_cfg()
    cfg.DEEPLESION.ROOT, cfg.DATALOADER.NUM_WORKERS = root, 0
    register_deeplesion(root)
    first = cache_images(cfg)
    records = [r for name in SPLITS for r in DatasetCatalog.get(name)]
    cache = os.path.join(root, "cache_3slice", "hu_-1024_3071")
    truncated, empty, small = (os.path.join(cache, f"{r['image_id']}.npy") for r in records[:3])
    _truncate(truncated, os.path.getsize(truncated) - 4)
    open(empty, "wb").close()
    np.save(small, np.zeros((32, 64, 3), dtype=np.uint8))
    again = cache_images(cfg)
    assert (again["written"], again["rewritten"], again["skipped"]) == (0, 3, first["images"] - 3)
    for record, path in zip(records, (truncated, empty, small)):
        assert np.array_equal(np.load(path), load_slice_mix(record["slices"], (-1024, 3071)))


def test_csv_bytes_that_are_not_utf8_name_the_line(root):
    path = os.path.join(root, "DL_info.csv")
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    lines[3] = lines[3].replace(b",F,", b",\xe9,").replace(b",M,", b",\xe9,")  # Patient_gender in Latin-1
    with open(path, "wb") as f:
        f.write(b"\n".join(lines))
    register_deeplesion(root)
    with pytest.raises(DataError, match=re.escape(f"{path}: line 4 holds a byte that is not UTF-8 (0xe9")) as err:
        DatasetCatalog.get("deeplesion_train")
    assert "save the CSV as UTF-8" in str(err.value)


def test_csv_with_a_byte_order_mark_parses(root, source):
    path = os.path.join(root, "DL_info.csv")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(b"\xef\xbb\xbf" + data)
    register_deeplesion(root)
    assert len(DatasetCatalog.get("deeplesion_train")) == len(
        {r["File_name"] for r in _rows(source) if r["Train_Val_Test"] == "1"})


def test_spacing_mm_negative_is_a_config_error_and_needs_positive_row_spacing(root, caplog):
    with pytest.raises(ConfigError, match=re.escape("dataset.spacing_mm must be >= 0 (0: off")):
        register_deeplesion(root, spacing_mm=-0.8)
    rows = _rows(root)
    i = next(i for i, r in enumerate(rows) if r["Train_Val_Test"] == "1")
    same_image = [r for r in rows if r["File_name"] == rows[i]["File_name"]]
    for r in same_image:
        r["Spacing_mm_px_"] = "0, 0.8, 5"
    with open(os.path.join(root, "DL_info.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    register_deeplesion(root)
    assert DatasetCatalog.get("deeplesion_train")  # no scaling: the spacing is not used
    register_deeplesion(root, spacing_mm=0.8)
    with pytest.raises(BadRowError, match=re.escape(f"row {i + 2}: Spacing_mm_px_ [0.0, 0.8, 5.0] needs x and y "
                                                    f"spacing > 0 for dataset.spacing_mm=0.8")):
        DatasetCatalog.get("deeplesion_train")
    register_deeplesion(root, spacing_mm=0.8, skip_bad_rows=True)
    with caplog.at_level(logging.WARNING, logger="fsd_d2.data.deeplesion"):
        train = DatasetCatalog.get("deeplesion_train")
    assert rows[i]["File_name"][:-4] not in {d["image_id"] for d in train}
    assert f"skipped {len(same_image)} row(s)" in caplog.text


def _garble_body(path):
    """Flip bytes in the middle of a PNG: header and end marker intact, the compressed pixels not."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0x5A for b in data[middle:middle + 16])
    with open(path, "wb") as f:
        f.write(bytes(data))


def test_pixel_problem_tells_what_the_header_cannot(tmp_path):
    hu = np.linspace(-1000, 400, 64 * 64).reshape(64, 64)
    cases = {"good": hu + 32768, "no_offset": hu + 1024, "blank": np.zeros((64, 64))}
    for name, pixels in cases.items():
        cv2.imwrite(str(tmp_path / f"{name}.png"), pixels.astype(np.uint16))
    garbled = str(tmp_path / "garbled.png")
    shutil.copy(tmp_path / "good.png", garbled)
    _garble_body(garbled)
    assert checks.pixel_problem(str(tmp_path / "good.png")) == ""
    assert "look like HU + 1024 (or raw HU): was the +32768 offset applied?" in \
        checks.pixel_problem(str(tmp_path / "no_offset.png"))
    assert checks.pixel_problem(str(tmp_path / "blank.png")) == "holds one value everywhere (0): a blank slice"
    assert png_problem(garbled, 64, 64) == ""  # the header check cannot see it
    assert checks.pixel_problem(garbled) == "cannot be decoded (its PNG data is garbled)"


def test_slices_saved_without_the_offset_stop_loading_naming_the_files(root):
    rows = [r for r in _rows(root) if r["Train_Val_Test"] == "1"]
    for row in rows:  # every train key slice written as HU + 1024, the way many converters save CT
        path = _slice(root, row)
        cv2.imwrite(path, (cv2.imread(path, cv2.IMREAD_UNCHANGED).astype(np.int32) - 32768 + 1024)
                    .clip(0, 65535).astype(np.uint16))
    register_deeplesion(root)
    assert DatasetCatalog.get("deeplesion_val")
    with pytest.raises(DataError, match=r"sampled key slices of the train split cannot be CT:\n  .*\.png: is not a "
                                        r"DeepLesion slice: its median is -3\d\d\d\d HU; .*offset applied\?"):
        DatasetCatalog.get("deeplesion_train")


def test_a_blank_test_split_stops_the_run_before_training(root, compose_cfg, tmp_path):
    from fsd_d2.engine.runner import run_stage

    for row in _rows(root):
        if row["Train_Val_Test"] == "3":
            cv2.imwrite(_slice(root, row), np.zeros((int(row["Image_size"].split(",")[0]),) * 2, np.uint16))
    with pytest.raises(DataError, match=r"of the test split cannot be CT:\n.*a blank slice"):
        run_stage(compose_cfg("train", "dataset=deeplesion", f"dataset.root={root}", output_dir=tmp_path / "run"))
    assert not list((tmp_path / "run").glob("model_*.pth"))  # refused before the first iteration
