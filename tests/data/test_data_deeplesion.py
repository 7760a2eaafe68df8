"""DL_info.csv parsing, split/type registration, filters, and the error for each kind of bad input."""
import csv
import logging
import os
import re
import shutil
from collections import Counter

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from fsd_d2.data.ct import channel_slices
from fsd_d2.data.deeplesion import (LESION_TYPE_ABBR, LESION_TYPES, BadRowError, EmptySplitError,
                                    register_deeplesion, type_abbreviations)
from fsd_d2.data.synthetic import generate_synthetic

BINARY = ("deeplesion_train", "deeplesion_val", "deeplesion_test")
SPLIT_OF_CODE = dict(zip("123", BINARY))  # Train_Val_Test -> binary split name


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return generate_synthetic(str(tmp_path_factory.mktemp("syn") / "tiny"), num_key_slices=10, image_size=64, seed=0)


@pytest.fixture
def root(source, tmp_path):
    """A private copy that a test may break."""
    return shutil.copytree(source, tmp_path / "dl")


def _rows(root):
    with open(os.path.join(root, "DL_info.csv"), newline="") as f:
        return list(csv.DictReader(f))


def _edit(root, index, **values):
    """Change data row ``index`` (0-based; CSV row index + 2 counting the header as row 1)."""
    rows = _rows(root)
    rows[index].update(values)
    with open(os.path.join(root, "DL_info.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows[index]


def _slices(row):
    first, last = (int(float(v)) for v in row["Slice_range"].split(","))
    return first, int(row["Key_slice_index"]), last


# DeepLesion's Coarse_lesion_type codes, from the dataset's documentation (Yan et al. 2018)
TYPE_OF_CODE = {1: "bone", 2: "abdomen", 3: "mediastinum", 4: "liver", 5: "lung", 6: "kidney", 7: "soft tissue",
                8: "pelvis"}


def test_a_typed_lesion_is_named_by_its_coarse_type_code(source):
    register_deeplesion(source)
    for split in ("val", "test"):
        names = MetadataCatalog.get(f"deeplesion_types_{split}").thing_classes
        lesions = [a for d in DatasetCatalog.get(f"deeplesion_types_{split}") for a in d["annotations"]]
        assert lesions and [names[a["category_id"]] for a in lesions] == [TYPE_OF_CODE[a["lesion_type"]]
                                                                           for a in lesions]
    # the tables' abbreviations are in the names' order
    assert [abbr[0] for abbr in LESION_TYPE_ABBR] == [name[0].upper() for name in LESION_TYPES]


def test_registers_official_splits_and_types(source):
    names = register_deeplesion(source)
    assert names == [*BINARY, "deeplesion_types_val", "deeplesion_types_test"]
    rows = _rows(source)
    images = Counter(r["Train_Val_Test"] for r in {r["File_name"]: r for r in rows}.values())
    lesions = Counter(r["Train_Val_Test"] for r in rows)
    for code, name in SPLIT_OF_CODE.items():
        dicts = DatasetCatalog.get(name)
        assert len(dicts) == images[code] and sum(len(d["annotations"]) for d in dicts) == lesions[code]
        assert all(a["category_id"] == 0 for d in dicts for a in d["annotations"])
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == ["lesion"] and meta.evaluator_type == "deeplesion"
        assert meta.root == os.path.abspath(source) and meta.split == {"1": "train", "2": "val", "3": "test"}[code]
    assert all(a["lesion_type"] == -1 for d in DatasetCatalog.get("deeplesion_train") for a in d["annotations"])
    for split in ("val", "test"):
        typed = DatasetCatalog.get(f"deeplesion_types_{split}")
        assert [d["image_id"] for d in typed] == [d["image_id"] for d in DatasetCatalog.get(f"deeplesion_{split}")]
        assert all(a["category_id"] == a["lesion_type"] - 1 and 0 <= a["category_id"] < 8
                   for d in typed for a in d["annotations"])
        meta = MetadataCatalog.get(f"deeplesion_types_{split}")
        assert meta.thing_classes == list(LESION_TYPES) and meta.thing_abbr == list(LESION_TYPE_ABBR)
        assert type_abbreviations(f"deeplesion_types_{split}") == ["BN", "AB", "ME", "LV", "LU", "KD", "ST", "PV"]


def test_dataset_dict_fields(source):
    register_deeplesion(source)
    rows = {r["File_name"]: r for r in _rows(source)}
    for d in DatasetCatalog.get("deeplesion_train"):
        row = rows[d["image_id"] + ".png"]
        first, key, last = _slices(row)
        series = os.path.join(os.path.abspath(source), "Images_png", d["image_id"][:-4])
        expected = [os.path.join(series, f"{i:03d}.png") for i in (max(first, key - 1), key, min(last, key + 1))]
        assert d["slices"] == [[(path, 1.0)] for path in expected] and d["slice_interval_mm"] == 0.0
        assert d["file_name"] == expected[1] and os.path.isfile(d["file_name"])
        assert (d["height"], d["width"]) == (64, 64)
        assert d["spacing_mm"] == [float(v) for v in row["Spacing_mm_px_"].split(",")]
        assert d["dicom_window"] == [float(v) for v in row["DICOM_windows"].split(",")]
        ann = d["annotations"][0]
        assert ann["bbox_mode"] == BoxMode.XYXY_ABS and len(ann["bbox"]) == 4 and len(ann["recist"]) == 8
        assert isinstance(ann["noisy"], bool)


def test_drop_noisy_and_patient_subset(source):
    rows = _rows(source)
    noisy = [r for r in rows if r["Possibly_noisy"] == "1"]
    assert noisy
    name = SPLIT_OF_CODE[noisy[0]["Train_Val_Test"]]
    register_deeplesion(source)
    before = sum(len(d["annotations"]) for d in DatasetCatalog.get(name))
    register_deeplesion(source, drop_noisy=True)  # re-registering replaces the entries
    after = DatasetCatalog.get(name)
    dropped = sum(r["Train_Val_Test"] == noisy[0]["Train_Val_Test"] for r in noisy)
    assert sum(len(d["annotations"]) for d in after) == before - dropped
    assert not any(a["noisy"] for d in after for a in d["annotations"])
    patient = int(rows[0]["Patient_index"])
    register_deeplesion(source, patients=[patient])
    kept = DatasetCatalog.get(SPLIT_OF_CODE[rows[0]["Train_Val_Test"]])
    assert {d["image_id"] for d in kept} == {r["File_name"][:-4] for r in rows if int(r["Patient_index"]) == patient}


def test_empty_split_raises_naming_root_and_split(source):
    register_deeplesion(source, patients=[999999])
    with pytest.raises(EmptySplitError, match=re.escape(f"split 'val' under {os.path.abspath(source)} has no images")):
        DatasetCatalog.get("deeplesion_val")


def test_registration_is_lazy_and_checks_the_root(tmp_path):
    register_deeplesion(str(tmp_path / "nowhere"))  # nothing read yet
    with pytest.raises(FileNotFoundError, match="dataset.root=/path/to/DeepLesion"):
        DatasetCatalog.get("deeplesion_train")


@pytest.mark.parametrize("column,value,message", [
    ("Bounding_boxes", "1, 2, 30", "Bounding_boxes must hold 4 numbers, got 3"),
    ("Measurement_coordinates", "1, 2, 3, 4, 5, 6, 7, x", "Measurement_coordinates '1, 2, 3, 4, 5, 6, 7, x' is not"),
    ("Spacing_mm_px_", "0.8, nan, 5", "Spacing_mm_px_ '0.8, nan, 5' is not a list of numbers"),
    ("Patient_index", "x1", "Patient_index 'x1' is not an integer"),
    ("Coarse_lesion_type", "9", "unknown Coarse_lesion_type 9; valid codes are 1..8"),
    ("Bounding_boxes", "10, 10, 90, 20", r"is not a box inside the 64x64 image"),
])
def test_malformed_rows_name_csv_row_and_fix(root, column, value, message):
    _edit(root, 2, **{column: value})
    register_deeplesion(str(root))
    with pytest.raises(BadRowError, match=message) as err:
        DatasetCatalog.get("deeplesion_train")
    assert f"{root}/DL_info.csv row 4:" in str(err.value) and "skip_bad_rows=true" in str(err.value)


def test_missing_key_and_neighbour_slices_name_the_png(root):
    rows = _rows(root)
    i = next(i for i, r in enumerate(rows) if _slices(r)[0] < _slices(r)[1] < _slices(r)[2])
    first, key, last = _slices(rows[i])
    neighbour = os.path.join(root, "Images_png", rows[i]["File_name"][:-8], f"{key + 1:03d}.png")
    os.remove(neighbour)
    register_deeplesion(str(root))
    expected = f"row {i + 2}: neighbour slice {key + 1} (Slice_range {first}-{last}) {neighbour} is missing"
    with pytest.raises(BadRowError, match=re.escape(expected)):
        DatasetCatalog.get("deeplesion_train")
    key_png = os.path.join(root, "Images_png", rows[i]["File_name"][:-8], f"{key:03d}.png")
    os.remove(key_png)
    with pytest.raises(BadRowError, match=re.escape(f"key slice {key_png} is missing")):
        DatasetCatalog.get("deeplesion_train")


def test_neighbour_beyond_slice_range_is_clamped_not_missing(root):
    rows = _rows(root)
    i = next(i for i, r in enumerate(rows) if _slices(r)[1] == _slices(r)[2])  # key is the last slice
    register_deeplesion(str(root))
    d = next(d for name in BINARY for d in DatasetCatalog.get(name) if d["image_id"] == rows[i]["File_name"][:-4])
    assert d["slices"][1] == d["slices"][2] != d["slices"][0]


def test_slice_interval_mixes_slices_chosen_by_z_spacing(source):
    register_deeplesion(source, slice_interval_mm=2.0)
    rows = {r["File_name"]: r for r in _rows(source)}
    dicts = [d for name in BINARY for d in DatasetCatalog.get(name)]
    for d in dicts:
        row = rows[d["image_id"] + ".png"]
        first, key, last = _slices(row)
        z = float(row["Spacing_mm_px_"].split(",")[2])
        series = os.path.join(os.path.abspath(source), "Images_png", d["image_id"][:-4])
        expected = [[(os.path.join(series, f"{i:03d}.png"), w) for i, w in channel]
                    for channel in channel_slices(key, first, last, z, 2.0)]
        assert d["slices"] == expected and d["slice_interval_mm"] == 2.0 and d["file_name"] == expected[1][0][0]
    assert any(len(channel) == 2 for d in dicts for channel in d["slices"])  # some rows interpolate
    with pytest.raises(ValueError, match=re.escape("dataset.slice_interval_mm must be >= 0")):
        register_deeplesion(source, slice_interval_mm=-1.0)


def test_missing_slice_needed_only_by_the_interval_names_the_png(root):
    rows = _rows(root)
    # z = 1.25 mm and 2 mm: the neighbours mix slices key +- 1 and key +- 2; key + 2 is not needed at interval 0
    i = next(i for i, r in enumerate(rows)
             if r["Spacing_mm_px_"].endswith(" 1.25") and _slices(r)[1] + 2 <= _slices(r)[2])
    first, key, last = _slices(rows[i])
    far = os.path.join(root, "Images_png", rows[i]["File_name"][:-8], f"{key + 2:03d}.png")
    os.remove(far)
    register_deeplesion(str(root))
    assert DatasetCatalog.get(SPLIT_OF_CODE[rows[i]["Train_Val_Test"]])
    register_deeplesion(str(root), slice_interval_mm=2.0)
    expected = (f"row {i + 2}: neighbour slice {key + 2} (Slice_range {first}-{last}, slice interval 2 mm) "
                f"{far} is missing. Fix: restore the file")
    with pytest.raises(BadRowError, match=re.escape(expected)):
        DatasetCatalog.get("deeplesion_train")


def test_slice_interval_needs_a_z_spacing(root):
    _edit(root, 2, Spacing_mm_px_="0.8, 0.8, 0")
    register_deeplesion(str(root))
    assert DatasetCatalog.get("deeplesion_train")  # adjacent slices need no spacing
    register_deeplesion(str(root), slice_interval_mm=2.0)
    with pytest.raises(BadRowError, match=r"row 4: z spacing 0.0 mm cannot place neighbours 2 mm .*Spacing_mm_px_"):
        DatasetCatalog.get("deeplesion_train")


def test_box_clipped_when_check_is_off(root):
    row = _edit(root, 0, Bounding_boxes="-4, 3, 70, 20")
    register_deeplesion(str(root), check_boxes=False)
    dicts = DatasetCatalog.get(SPLIT_OF_CODE[row["Train_Val_Test"]])
    d = next(d for d in dicts if d["image_id"] == row["File_name"][:-4])
    assert d["annotations"][0]["bbox"] == [0.0, 2.0, 64.0, 19.0]  # 1-based -4 .. 70 is -5 .. 69, clipped


def _annotation(root, row):
    dicts = DatasetCatalog.get(SPLIT_OF_CODE[row["Train_Val_Test"]])
    return next(d for d in dicts if d["image_id"] == row["File_name"][:-4])["annotations"][0]


def test_coordinates_start_from_one_as_the_reference_loaders_read_them(root):
    """3DCE's and MULAN's loaders subtract 1 from Bounding_boxes and Measurement_coordinates ("coordinates in info
    file start from 1"); dataset.coordinate_origin=0 keeps the literal reading."""
    row = _edit(root, 0, Bounding_boxes="11, 21, 31, 41", Measurement_coordinates="12, 22, 30, 40, 15, 25, 28, 38")
    register_deeplesion(str(root))
    ann = _annotation(root, row)
    assert ann["bbox"] == [10.0, 20.0, 30.0, 40.0]
    assert ann["recist"] == [11.0, 21.0, 29.0, 39.0, 14.0, 24.0, 27.0, 37.0]
    register_deeplesion(str(root), coordinate_origin=0)
    ann = _annotation(root, row)
    assert ann["bbox"] == [11.0, 21.0, 31.0, 41.0] and ann["recist"][:2] == [12.0, 22.0]


def test_a_zero_coordinate_is_outside_a_one_based_image(root):
    _edit(root, 0, Bounding_boxes="0, 5, 20, 30")
    register_deeplesion(str(root))
    with pytest.raises(BadRowError, match=r"row 2: Bounding_boxes \[0.0, 5.0, 20.0, 30.0\] \(origin 1: "
                                          r"dataset.coordinate_origin\) is not a box inside the 64x64 image"):
        for name in BINARY:
            DatasetCatalog.get(name)
    register_deeplesion(str(root), coordinate_origin=0)
    for name in BINARY:
        DatasetCatalog.get(name)


def test_the_synthetic_boxes_read_back_as_drawn(source):
    """The generator writes DL_info.csv 1-based, as the real file is; read with the default origin, every box is the
    padded RECIST extent in 0-based pixels, inside the image."""
    register_deeplesion(source)
    for name in BINARY:
        for d in DatasetCatalog.get(name):
            for ann in d["annotations"]:
                xs, ys = ann["recist"][0::2], ann["recist"][1::2]
                assert ann["bbox"] == pytest.approx([max(0, min(xs) - 2), max(0, min(ys) - 2), min(63, max(xs) + 2),
                                                     min(63, max(ys) + 2)], abs=1e-3)


def test_skip_bad_rows_counts_and_logs(root, caplog):
    rows = _rows(root)
    _edit(root, 1, Bounding_boxes="1, 2")
    _edit(root, 3, Coarse_lesion_type="12")
    register_deeplesion(str(root), skip_bad_rows=True)
    with caplog.at_level(logging.WARNING, logger="fsd_d2.data.deeplesion"):
        total = sum(len(d["annotations"]) for name in BINARY for d in DatasetCatalog.get(name))
    assert total == len(rows) - 2
    assert "skipped 2 bad row(s)" in caplog.text and "row 3" in caplog.text


def test_a_row_repeated_exactly_is_one_lesion_not_two(root, caplog):
    rows = _rows(root)
    with open(os.path.join(root, "DL_info.csv"), "a", newline="") as f:
        csv.DictWriter(f, fieldnames=list(rows[0])).writerow(rows[2])  # row 4 again, as row len(rows) + 2
    register_deeplesion(str(root))
    with caplog.at_level(logging.WARNING, logger="fsd_d2.data.deeplesion"):
        total = sum(len(d["annotations"]) for name in BINARY for d in DatasetCatalog.get(name))
    assert total == len(rows)
    assert f"dropped 1 row(s) that repeat an earlier row exactly (the first: row {len(rows) + 2} repeats row 4)" \
        in caplog.text


def test_multi_type_split_needs_types(root):
    i = next(i for i, r in enumerate(_rows(root)) if r["Train_Val_Test"] == "2")
    _edit(root, i, Coarse_lesion_type="-1")
    register_deeplesion(str(root))
    assert DatasetCatalog.get("deeplesion_val")  # binary detection does not need the type
    with pytest.raises(BadRowError, match=f"row {i + 2}: Coarse_lesion_type is -1"):
        DatasetCatalog.get("deeplesion_types_val")


def test_dicom_window_checked_only_when_used(root):
    i = next(i for i, r in enumerate(_rows(root)) if r["Train_Val_Test"] == "1")
    _edit(root, i, DICOM_windows="300, -100")
    register_deeplesion(str(root))
    assert DatasetCatalog.get("deeplesion_train")
    register_deeplesion(str(root), use_dicom_window=True)
    with pytest.raises(BadRowError, match=re.escape(f"row {i + 2}: DICOM_windows [300.0, -100.0] needs min < max")):
        DatasetCatalog.get("deeplesion_train")
