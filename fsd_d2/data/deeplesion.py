"""DeepLesion: parse DL_info.csv, validate every row, and register the official splits with Detectron2.

Registered names (see :func:`register_deeplesion`): ``deeplesion_{train,val,test}`` for binary lesion
detection (one class, "lesion") and ``deeplesion_types_{val,test}`` for the 8 coarse lesion types, which
exist only on the validation and test splits (training rows carry type -1).

Bad input never turns into a silently smaller dataset: each problem raises a :class:`BadRowError` naming
the CSV row (row 1 is the header, as a spreadsheet shows it) or the PNG, and the fix; with
``skip_bad_rows`` such rows are dropped and their count is logged. Loading a split also checks the header
of every slice PNG it needs (empty, truncated, not 16-bit, wrong size; see :mod:`fsd_d2.data.checks`), so a
damaged file stops the run before training rather than when an iteration reaches it.
"""
import csv
import functools
import io
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from fsd_d2.errors import ConfigError, DataError, MissingFileError
from fsd_d2.data.checks import Need, SliceChecker, pixel_problem
from fsd_d2.data.ct import channel_slices

logger = logging.getLogger(__name__)

LESION_TYPES = ("bone", "abdomen", "mediastinum", "liver", "lung", "kidney", "soft tissue", "pelvis")
LESION_TYPE_ABBR = ("BN", "AB", "ME", "LV", "LU", "KD", "ST", "PV")  # the paper's column names for them
CSV_NAME = "DL_info.csv"
IMAGES_DIR = "Images_png"
# Every column of the official DL_info.csv, in its order; list columns hold "a, b, ..." strings.
COLUMNS = ("File_name", "Patient_index", "Study_index", "Series_ID", "Key_slice_index", "Measurement_coordinates",
           "Bounding_boxes", "Lesion_diameters_Pixel_", "Normalized_lesion_location", "Coarse_lesion_type",
           "Possibly_noisy", "Slice_range", "Spacing_mm_px_", "Image_size", "DICOM_windows", "Patient_gender",
           "Patient_age", "Train_Val_Test")
LIST_LENGTHS = {"Measurement_coordinates": 8, "Bounding_boxes": 4, "Lesion_diameters_Pixel_": 2,
                "Normalized_lesion_location": 3, "Slice_range": 2, "Spacing_mm_px_": 3, "Image_size": 2,
                "DICOM_windows": 2}
INT_COLUMNS = ("Patient_index", "Study_index", "Series_ID", "Key_slice_index", "Coarse_lesion_type",
               "Possibly_noisy", "Train_Val_Test")
_UNUSED_COLUMNS = ("Patient_gender", "Patient_age")  # demographics: may be absent or empty
SPLIT_CODES = {"train": 1, "val": 2, "test": 3}  # Train_Val_Test
# name -> (split, multi-type)
SPLIT_NAMES = {"deeplesion_train": ("train", False), "deeplesion_val": ("val", False),
               "deeplesion_test": ("test", False), "deeplesion_types_val": ("val", True),
               "deeplesion_types_test": ("test", True)}
_FILE_RE = re.compile(r"^(\d+_\d+_\d+)_(\d+)\.png$")
_SKIP_HINT = "or set dataset.skip_bad_rows=true to skip such rows"
_PROGRESS_MIN_IMAGES = 1000  # splits this big show a progress bar while their slices are checked


class BadRowError(DataError):
    """A DL_info.csv row (or a file it points to) that cannot be used; the message names it and the fix."""


class EmptySplitError(DataError):
    """A registered split holds no images (after the filters)."""


@dataclass(frozen=True)
class RowOptions:
    """How the rows of DL_info.csv are read (the parse of each CSV version is cached per options)."""

    skip_bad_rows: bool = False  # drop (and count) bad rows instead of stopping
    check_boxes: bool = True  # a box outside the image is an error (False: clipped)
    slice_interval_mm: float = 0.0  # > 0: the neighbour channels that many mm from the key slice
    # Bounding_boxes and Measurement_coordinates start from 1 in DL_info.csv: 3DCE's and MULAN's loaders subtract 1
    # ("coordinates in info file start from 1"); 0 reads them as they are
    coordinate_origin: int = 1


def slice_path(root: str, series: str, index: int) -> str:
    return os.path.join(root, IMAGES_DIR, series, f"{index:03d}.png")


@dataclass(frozen=True)
class Lesion:
    """One validated CSV row."""
    row: int
    file_name: str
    patient: int
    split: int
    lesion_type: int
    noisy: bool
    recist: Tuple[float, ...]
    bbox: Tuple[float, ...]
    slices: Tuple[Tuple[Tuple[str, float], ...], ...]  # per channel (previous, key, next): (PNG path, weight)
    width: int
    height: int
    spacing: Tuple[float, float, float]
    dicom_window: Tuple[float, float]


def _numbers(raw: Dict[str, str], col: str, where: str) -> List[float]:
    text = (raw.get(col) or "").strip()
    try:
        values = [float(v) for v in text.split(",")] if text else []
    except ValueError:
        values = [math.nan]
    if not all(math.isfinite(v) for v in values):
        raise BadRowError(f"{where}: {col} '{text}' is not a list of numbers. Fix the row, {_SKIP_HINT}")
    if len(values) != LIST_LENGTHS[col]:
        raise BadRowError(f"{where}: {col} must hold {LIST_LENGTHS[col]} numbers, got {len(values)} ('{text}'). "
                          f"Fix the row, {_SKIP_HINT}")
    return values


def _integer(raw: Dict[str, str], col: str, where: str) -> int:
    text = (raw.get(col) or "").strip()
    try:
        value = float(text)
        if value.is_integer():
            return int(value)
    except ValueError:
        pass
    raise BadRowError(f"{where}: {col} '{text}' is not an integer. Fix the row, {_SKIP_HINT}")


class _SeriesFiles:
    """Which slice files exist, one directory listing per series (cheaper than a stat per slice)."""

    def __init__(self, root: str):
        self.root = root
        self._listing: Dict[str, frozenset] = {}

    def exists(self, series: str, path: str) -> bool:
        if series not in self._listing:
            folder = os.path.join(self.root, IMAGES_DIR, series)
            self._listing[series] = frozenset(os.listdir(folder)) if os.path.isdir(folder) else frozenset()
        return os.path.basename(path) in self._listing[series]


def parse_row(raw: Dict[str, str], row: int, csv_path: str, files: _SeriesFiles, options: RowOptions) -> Lesion:
    """Validate one CSV row (numbers, codes, box inside the image, the slice files) into a :class:`Lesion`, its
    pixel coordinates 0-based.

    Every slice the 3 channels need at ``options.slice_interval_mm`` (see :func:`fsd_d2.data.ct.channel_slices`)
    must exist, so a missing file stops parsing here rather than a training run hours later.
    """
    where = f"{csv_path} row {row}"
    name = (raw.get("File_name") or "").strip()
    m = _FILE_RE.match(name)
    if m is None:
        raise BadRowError(f"{where}: File_name '{name}' is not of the form <patient>_<study>_<series>_<slice>.png "
                          f"(e.g. 000001_01_01_109.png). Fix the row, {_SKIP_HINT}")
    series, key = m.group(1), int(m.group(2))
    ints = {col: _integer(raw, col, where) for col in INT_COLUMNS}
    lists = {col: _numbers(raw, col, where) for col in LIST_LENGTHS}
    if ints["Key_slice_index"] != key:
        raise BadRowError(f"{where}: Key_slice_index {ints['Key_slice_index']} differs from the slice {key} in "
                          f"File_name {name}. Fix the row, {_SKIP_HINT}")
    code = ints["Coarse_lesion_type"]
    if code != -1 and not 1 <= code <= len(LESION_TYPES):
        raise BadRowError(f"{where}: unknown Coarse_lesion_type {code}; valid codes are 1..8 "
                          f"({', '.join(LESION_TYPES)}) or -1 (unknown). Fix the row, {_SKIP_HINT}")
    if ints["Train_Val_Test"] not in SPLIT_CODES.values():
        raise BadRowError(f"{where}: Train_Val_Test {ints['Train_Val_Test']} must be 1 (train), 2 (val) or 3 (test). "
                          f"Fix the row, {_SKIP_HINT}")
    width, height = (int(v) for v in lists["Image_size"])
    x1, y1, x2, y2 = (v - options.coordinate_origin for v in lists["Bounding_boxes"])
    recist = tuple(v - options.coordinate_origin for v in lists["Measurement_coordinates"])
    if options.check_boxes and not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
        raise BadRowError(f"{where}: Bounding_boxes {lists['Bounding_boxes']} (origin {options.coordinate_origin}: "
                          f"dataset.coordinate_origin) is not a box inside the "
                          f"{width}x{height} image (Image_size). Fix the box, set dataset.check_boxes=false "
                          f"to clip it, {_SKIP_HINT}")
    x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
    y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    if not (x1 < x2 and y1 < y2):
        raise BadRowError(f"{where}: Bounding_boxes {lists['Bounding_boxes']} has no area inside the {width}x{height} "
                          f"image. Fix the box, {_SKIP_HINT}")
    first, last = (int(v) for v in lists["Slice_range"])
    try:
        channels = channel_slices(key, first, last, lists["Spacing_mm_px_"][2], options.slice_interval_mm)
    except ValueError as e:
        raise BadRowError(f"{where}: {e} (Slice_range, Spacing_mm_px_). Fix the row, {_SKIP_HINT}") from None
    paths = {i: slice_path(files.root, series, i) for channel in channels for i, _ in channel}
    interval = f", slice interval {options.slice_interval_mm:g} mm" if options.slice_interval_mm > 0 else ""
    for i, path in sorted(paths.items()):
        if not files.exists(series, path):
            what = "key slice" if i == key else f"neighbour slice {i} (Slice_range {first}-{last}{interval})"
            raise BadRowError(f"{where}: {what} {path} is missing. Fix: restore the file from the DeepLesion "
                              f"Images_png archives (or correct Slice_range), {_SKIP_HINT}")
    slices = tuple(tuple((paths[i], w) for i, w in channel) for channel in channels)
    lo, hi = lists["DICOM_windows"]
    return Lesion(row=row, file_name=name, patient=ints["Patient_index"], split=ints["Train_Val_Test"],
                  lesion_type=code, noisy=bool(ints["Possibly_noisy"]), recist=recist,
                  bbox=(x1, y1, x2, y2), slices=slices, width=width, height=height,
                  spacing=tuple(lists["Spacing_mm_px_"]), dicom_window=(lo, hi))


def _read_text(csv_path: str) -> str:
    """The CSV as text; bytes that are not UTF-8 (a file saved in another encoding, or corrupted) are named."""
    with open(csv_path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (spreadsheet export) is not part of the header
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{csv_path}: line {line} holds a byte that is not UTF-8 ({data[e.start]:#04x} at byte "
                        f"{e.start}). Fix: save the CSV as UTF-8 (the official DL_info.csv is plain ASCII) or "
                        f"restore it from the DeepLesion download") from None


@functools.lru_cache(maxsize=8)
def _parse_cached(csv_path: str, _stamp: Tuple[int, int],
                  options: RowOptions) -> Tuple[Tuple[Lesion, ...], int, SliceChecker]:
    """The valid rows, the count of skipped ones, and the slice checker the splits of this CSV version share."""
    root = os.path.dirname(csv_path)
    files = _SeriesFiles(root)
    lesions, skipped, first_problem = [], 0, ""
    seen: Dict[str, Lesion] = {}
    reader = csv.DictReader(io.StringIO(_read_text(csv_path), newline=""))
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or []) and c not in _UNUSED_COLUMNS]
    if missing:
        raise BadRowError(f"{csv_path}: header lacks the column(s) {missing}; expected the official "
                          f"DL_info.csv columns {list(COLUMNS)}")
    rows_seen: Dict[Tuple[str, ...], int] = {}
    duplicates: List[Tuple[int, int]] = []  # (row, the earlier row it repeats)
    for row, raw in enumerate(reader, start=2):
        first = rows_seen.setdefault(tuple(raw.values()), row)
        if first != row:  # the same lesion twice would count twice in the FROC ("2 of 2 lesions" for one)
            duplicates.append((row, first))
            continue
        try:
            lesion = parse_row(raw, row, csv_path, files, options)
            other = seen.setdefault(lesion.file_name, lesion)
            if (other.split, other.width, other.height) != (lesion.split, lesion.width, lesion.height):
                raise BadRowError(f"{csv_path} row {row}: {lesion.file_name} also appears in row {other.row} "
                                  f"with a different Train_Val_Test or Image_size. Fix one of them, {_SKIP_HINT}")
        except BadRowError as e:
            if not options.skip_bad_rows:
                raise
            skipped += 1
            first_problem = first_problem or str(e)
            continue
        lesions.append(lesion)
    if duplicates:
        logger.warning(f"{csv_path}: dropped {len(duplicates)} row(s) that repeat an earlier row exactly (the first: "
                       f"row {duplicates[0][0]} repeats row {duplicates[0][1]}); each lesion is counted once")
    if skipped:
        logger.warning(f"{csv_path}: skipped {skipped} bad row(s) (skip_bad_rows is on); the first: {first_problem}")
    return tuple(lesions), skipped, SliceChecker()


def _parsed(root: str, options: RowOptions) -> Tuple[Tuple[Lesion, ...], int, SliceChecker]:
    csv_path = os.path.join(os.path.abspath(root), CSV_NAME)
    if not os.path.isfile(csv_path):
        raise MissingFileError(f"{csv_path} not found: dataset.root must be the DeepLesion folder holding "
                               f"{CSV_NAME} and {IMAGES_DIR}/ (set dataset.root=/path/to/DeepLesion)")
    st = os.stat(csv_path)
    return _parse_cached(csv_path, (st.st_mtime_ns, st.st_size), options)


def _option_problem(les: Lesion, split: str, multi_type: bool, use_dicom_window: bool, spacing_mm: float) -> str:
    """Why a valid row cannot serve the chosen split or options ("" if it can)."""
    if multi_type and les.lesion_type == -1:
        return (f"Coarse_lesion_type is -1 (unknown) but the multi-type split deeplesion_types_{split} needs a "
                f"type 1..8")
    if use_dicom_window and not les.dicom_window[0] < les.dicom_window[1]:
        return f"DICOM_windows {list(les.dicom_window)} needs min < max for dataset.use_dicom_window=true"
    if spacing_mm > 0 and not min(les.spacing[:2]) > 0:
        return (f"Spacing_mm_px_ {list(les.spacing)} needs x and y spacing > 0 for dataset.spacing_mm="
                f"{spacing_mm:g} (it sets the image scale)")
    return ""


def _drop_damaged_slices(lesions: List[Lesion], checker: SliceChecker, csv_path: str, split: str,
                         skip_bad_rows: bool) -> List[Lesion]:
    """``lesions`` whose slice PNGs pass :func:`fsd_d2.data.checks.png_problem`; the others raise (naming the
    first rows, files and problems) or, with ``skip_bad_rows``, are dropped and counted."""
    def needs(les: Lesion) -> List[Need]:
        return [(path, les.width, les.height) for channel in les.slices for path, _ in channel]

    progress = len({les.file_name for les in lesions}) > _PROGRESS_MIN_IMAGES
    problems = checker.problems((n for les in lesions for n in needs(les)), progress=progress,
                                desc=f"checking the slice PNGs of the {split} split")
    if not problems:
        return lesions
    bad: Dict[str, Tuple[List[int], Need]] = {}  # File_name -> (its rows, its first damaged slice)
    for les in lesions:
        damaged = [n for n in needs(les) if n in problems]
        if damaged:
            bad.setdefault(les.file_name, ([], damaged[0]))[0].append(les.row)
    num_rows = sum(len(rows) for rows, _ in bad.values())
    lines = [f"row{'s' if len(rows) > 1 else ''} {', '.join(map(str, rows))} ({name}): {need[0]} {problems[need]}"
             for name, (rows, need) in list(bad.items())[:5]]
    if not skip_bad_rows:
        more = f"\n  ... and {len(bad) - len(lines)} more image(s)" if len(bad) > len(lines) else ""
        raise BadRowError(f"{csv_path}: {num_rows} row(s) of the {split} split ({len(bad)} image(s)) need a damaged "
                          f"slice PNG (expected: 16-bit greyscale, the row's Image_size):\n  " + "\n  ".join(lines) +
                          f"{more}\nFix: restore the files from the DeepLesion Images_png archives (or correct "
                          f"Image_size), {_SKIP_HINT}")
    logger.warning(f"{split} split: skipped {num_rows} row(s) ({len(bad)} image(s)) whose slice PNGs are damaged "
                   f"(skip_bad_rows is on); the first: {csv_path} {lines[0]}")
    return [les for les in lesions if les.file_name not in bad]


def load_split(root: str, split: str, *, multi_type: bool, drop_noisy: bool = False, patients: Sequence[int] = (),
               options: RowOptions = RowOptions(), use_dicom_window: bool = False,
               spacing_mm: float = 0.0) -> List[Dict]:
    """Detectron2 dataset dicts of one official split; the rows of one File_name form one image.

    "slices" holds, per channel, the ``(PNG path, weight)`` pairs :func:`fsd_d2.data.ct.load_slice_mix` reads;
    "slice_interval_mm" records the interval they were chosen for (it names the ``prepare`` cache). Every
    slice is header-checked here, once per file and CSV version (see :class:`fsd_d2.data.checks.SliceChecker`).
    """
    lesions, _, checker = _parsed(root, options)
    csv_path = os.path.join(os.path.abspath(root), CSV_NAME)
    wanted = set(int(p) for p in patients)
    kept: List[Lesion] = []
    unusable = 0
    for les in lesions:
        if les.split != SPLIT_CODES[split] or (drop_noisy and les.noisy) or (wanted and les.patient not in wanted):
            continue
        problem = _option_problem(les, split, multi_type, use_dicom_window, spacing_mm)
        if problem:
            if not options.skip_bad_rows:
                raise BadRowError(f"{csv_path} row {les.row}: {problem}. Fix the row, {_SKIP_HINT}")
            unusable += 1
            continue
        kept.append(les)
    images: Dict[str, Dict] = {}
    for les in _drop_damaged_slices(kept, checker, csv_path, split, options.skip_bad_rows):
        image = images.get(les.file_name)
        if image is None:
            image = images[les.file_name] = {
                "file_name": les.slices[1][0][0],  # the key channel is the key slice alone
                "image_id": les.file_name[:-4], "height": les.height, "width": les.width,
                "slices": [list(channel) for channel in les.slices],
                "slice_interval_mm": float(options.slice_interval_mm),
                "spacing_mm": list(les.spacing), "dicom_window": list(les.dicom_window), "annotations": []}
        image["annotations"].append({
            "bbox": list(les.bbox), "bbox_mode": BoxMode.XYXY_ABS,
            "category_id": les.lesion_type - 1 if multi_type else 0, "recist": list(les.recist),
            "lesion_type": les.lesion_type, "noisy": les.noisy})
    if unusable:
        logger.warning(f"{split} split: skipped {unusable} row(s) without a lesion type, a valid DICOM window or "
                       f"a pixel spacing the options need (skip_bad_rows is on)")
    if not images:
        filters = f"drop_noisy={drop_noisy}, patients={sorted(wanted) or 'all'}"
        raise EmptySplitError(f"DeepLesion split '{split}' under {root} has no images ({filters}). Check dataset.root, "
                              f"the Train_Val_Test column and the patient filter.")
    _check_pixels_of_a_sample(list(images.values()), split)
    return list(images.values())


def _check_pixels_of_a_sample(images: List[Dict], split: str, sample: int = 8) -> None:
    """Decode the key slices of up to ``sample`` images spread over the split: slices saved without the +32768
    offset, or blank, would otherwise train to an exit 0 on black inputs."""
    step = max(1, len(images) // sample)
    paths = [image["file_name"] for image in images[::step][:sample]]
    problems = [(path, problem) for path in paths for problem in [pixel_problem(path)] if problem]
    if problems:
        lines = "\n  ".join(f"{path}: {problem}" for path, problem in problems)
        raise DataError(f"{len(problems)} of {len(paths)} sampled key slices of the {split} split cannot be CT:\n  "
                        f"{lines}\nFix: write the slices as DeepLesion does (16-bit PNG of HU + 32768), or restore "
                        f"them from the DeepLesion Images_png archives")


def type_abbreviations(dataset_name: str) -> List[str]:
    """Short names of the classes for metric keys and table columns: metadata ``thing_abbr`` if set, else
    DeepLesion's (BN, AB, ...) for its type names, else the first two letters upper-cased."""
    meta = MetadataCatalog.get(dataset_name)
    classes = list(meta.thing_classes)
    known = dict(zip(LESION_TYPES, LESION_TYPE_ABBR))
    abbr = list(meta.get("thing_abbr", None) or [known.get(c.lower(), c[:2].upper()) for c in classes])
    if len(abbr) != len(classes) or len(set(abbr)) != len(abbr):
        raise ConfigError(f"dataset '{dataset_name}': class abbreviations {abbr} must be unique, one per class of "
                          f"{classes}; set MetadataCatalog.get('{dataset_name}').thing_abbr = [...]")
    return abbr


def register_deeplesion(root: str, *, drop_noisy: bool = False, patients: Sequence[int] = (),
                        skip_bad_rows: bool = False, hu_window: Sequence[float] = (-1024, 3071),
                        use_dicom_window: bool = False, check_boxes: bool = True,
                        slice_interval_mm: float = 0.0, spacing_mm: float = 0.0,
                        coordinate_origin: int = 1) -> List[str]:
    """Register the 5 DeepLesion splits lazily (the CSV is read on first ``DatasetCatalog.get``).

    Re-registering replaces earlier entries, so a sweep can point the same names at another root.
    ``hu_window`` / ``use_dicom_window`` are recorded in the metadata for visualisation (the mapper reads
    the same values from the config); with ``use_dicom_window`` every row's window must be valid.
    ``check_boxes=False`` clips boxes to the image instead of rejecting them (DEEPLESION.BOX_PAD_CHECK).
    ``slice_interval_mm > 0`` takes the neighbour channels that many mm from the key slice (3DCE/MULAN).
    ``spacing_mm > 0`` (the mapper's mm-per-pixel scaling; 0: off) needs every row's x/y spacing > 0.
    ``coordinate_origin`` (1: DL_info.csv's, as the reference loaders read it) is subtracted from every pixel
    coordinate of the boxes and RECIST axes (DEEPLESION.COORDINATE_ORIGIN).
    """
    root = os.path.abspath(root)
    lo, hi = hu_window
    if not lo < hi:
        raise ConfigError(f"dataset.hu_window must be [min, max] with min < max, got {list(hu_window)}")
    if slice_interval_mm < 0:
        raise ConfigError(f"dataset.slice_interval_mm must be >= 0 (0: adjacent slices), got {slice_interval_mm}")
    if spacing_mm < 0:
        raise ConfigError(f"dataset.spacing_mm must be >= 0 (0: off, scale to the short side; 3DCE: 0.8), "
                          f"got {spacing_mm}")
    for name, (split, multi_type) in SPLIT_NAMES.items():
        DatasetCatalog.pop(name, None)
        MetadataCatalog.pop(name, None)
        DatasetCatalog.register(name, functools.partial(
            load_split, root, split, multi_type=multi_type, drop_noisy=drop_noisy, patients=tuple(patients),
            options=RowOptions(skip_bad_rows, check_boxes, float(slice_interval_mm), int(coordinate_origin)),
            use_dicom_window=use_dicom_window, spacing_mm=spacing_mm))
        MetadataCatalog.get(name).set(
            thing_classes=list(LESION_TYPES) if multi_type else ["lesion"], evaluator_type="deeplesion",
            root=root, split=split, hu_window=[float(lo), float(hi)], use_dicom_window=use_dicom_window)
        if multi_type:
            MetadataCatalog.get(name).set(thing_abbr=list(LESION_TYPE_ABBR))
    return list(SPLIT_NAMES)
