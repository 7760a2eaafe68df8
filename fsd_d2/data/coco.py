"""Users' own lesion data in Detectron2's convention: COCO JSON files beside an image folder (``dataset=coco``).

Why: a CT lesion set need not be rewritten into DeepLesion's file layout. Each configured split (a JSON file and
a name) is registered in Detectron2's catalog twice, as DeepLesion's splits are: ``<name>`` for binary lesion
detection (one class, "lesion") and ``<name>_types`` with the JSON's categories as the lesion types (multi-type
detection, the per-type tables). Detectron2's ``load_coco_json`` reads the file; the records are then given the
form of :func:`fsd_d2.data.deeplesion.load_split`'s, so the mapper, the evaluator and every stage use them unchanged.

The JSON is COCO's instances format (``images``, ``annotations``, ``categories``; ``bbox`` is ``[x, y, width,
height]`` in pixels from 0), with optional fields:

- image ``neighbour_slices``: ``[previous, next]`` file names of the slices around the key slice (``ct16``), so
  that the 3-slice input is made as for DeepLesion; without them the key slice fills all three channels;
- image ``spacing_mm`` (``[x, y]`` or ``[x, y, z]``, for ``dataset.spacing_mm``) and ``dicom_window``
  (``[min, max]`` HU, for ``dataset.use_dicom_window``);
- annotation ``noisy`` (true: left out of the sensitivities by the cadlab protocol, dropped by
  ``dataset.drop_noisy``) and ``recist`` (the 8 coordinates of the two RECIST axes; default: the box's mid-lines);
- category ``abbr``: its short name in metric keys and tables (default: DeepLesion's for its type names, else
  the first two letters, upper-cased).

Pixels (``dataset.pixels``): ``ct16``, 16-bit single-channel CT slices storing HU + ``dataset.hu_offset``
(DeepLesion: 32768), windowed to ``dataset.hu_window``; ``rgb8``, ordinary 8-bit colour images, used as they are.

Bad input stops before any training with the JSON file, the entry (``images[3] (id 17)``, ``annotations[5]
(id 9)``) and the fix: invalid JSON, a missing or mistyped field, a missing image file, a box outside its image,
an unknown category or image id.
"""
import copy
import functools
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode

from fsd_d2.data.checks import SliceChecker, pixel_problem
from fsd_d2.data.ct import HU_OFFSET
from fsd_d2.data.deeplesion import EmptySplitError, type_abbreviations
from fsd_d2.errors import ConfigError, DataError, MissingFileError

logger = logging.getLogger(__name__)

TYPES_SUFFIX = "_types"  # <name>_types: the split with the JSON's categories as lesion types
PIXELS = ("ct16", "rgb8")
_PIXEL_SAMPLE = 8  # decoded images per split (faults such as a wrong offset are systematic; a few show them)
_EXAMPLE = ('{"images": [{"id": 1, "file_name": "a.png", "width": 512, "height": 512}], "annotations": [{"id": 1, '
            '"image_id": 1, "category_id": 1, "bbox": [10, 20, 30, 40]}], "categories": [{"id": 1, "name": "liver"}]}')


class CocoEntryError(DataError):
    """A COCO JSON file, or one of its entries, that cannot be used; the message names the file, entry and fix."""


@dataclass(frozen=True)
class CocoOptions:
    """How the JSON files' images and annotations are read (records are cached per JSON version and options)."""

    pixels: str = "ct16"  # ct16: 16-bit CT slices storing HU + hu_offset; rgb8: 8-bit colour images
    hu_offset: float = float(HU_OFFSET)
    check_boxes: bool = True  # a box outside its image is an error (False: clipped)
    drop_noisy: bool = False  # drop annotations flagged "noisy" (and images left without one)
    use_dicom_window: bool = False  # every image needs "dicom_window"
    spacing_mm: float = 0.0  # > 0: every image needs "spacing_mm"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _numbers(value, lengths: Sequence[int]) -> bool:
    return isinstance(value, list) and len(value) in lengths and all(_is_number(v) for v in value)


def _entry(kind: str, index: int, entry) -> str:
    """``images[3] (id 17)``: an entry as a user finds it in the file (by position, and by id when it has one)."""
    ident = entry.get("id") if isinstance(entry, dict) else None
    return f"{kind}[{index}]" + (f" (id {ident!r})" if ident is not None else "")


def _fail(where: str, problem: str, fix: str):
    raise CocoEntryError(f"{where} {problem}. Fix: {fix}")


def _read_json(path: str) -> Dict:
    """The parsed file; invalid UTF-8 or JSON is named with its line and column."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise CocoEntryError(f"{path}: line {line} holds a byte that is not UTF-8 ({data[e.start]:#04x}). Fix: save "
                             f"the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise CocoEntryError(f"{path}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}. Fix the file "
                             f"there (python -m json.tool {path} names the spot too); a COCO file looks like "
                             f"{_EXAMPLE}") from None


def _check_categories(path: str, content: Dict) -> List[Dict]:
    cats = content["categories"]
    if not cats:
        _fail(f"{path}:", "has no categories", 'list the lesion types, e.g. "categories": [{"id": 1, "name": '
                                               '"lesion"}] (a single one for binary detection)')
    ids, names, abbrs = set(), set(), set()
    for i, c in enumerate(cats):
        where = f"{path}: " + _entry("categories", i, c)
        if not isinstance(c, dict) or not _is_int(c.get("id")):
            _fail(where, "has no integer id", 'give each category {"id": <integer>, "name": "<type>"}')
        if not isinstance(c.get("name"), str) or not c["name"].strip():
            _fail(where, "has no name", 'give each category {"id": <integer>, "name": "<type>"}')
        if "abbr" in c and not (isinstance(c["abbr"], str) and c["abbr"].strip()):
            _fail(where, f"abbr {c['abbr']!r} is not a short name", 'set "abbr" to a short name such as "LV", or '
                                                                    'drop it')
        for seen, value, what in ((ids, c["id"], "id"), (names, c["name"], "name"), (abbrs, c.get("abbr"), "abbr")):
            if value is not None and value in seen:
                _fail(where, f"repeats the {what} {value!r} of an earlier category", f"give every category its own "
                                                                                     f"{what}")
            seen.add(value)
    if abbrs - {None} and None in abbrs:
        _fail(f"{path}:", "gives \"abbr\" to some categories only", 'give every category an "abbr", or none')
    return sorted(cats, key=lambda c: c["id"])


def _check_id(where: str, entry, seen: Dict[int, int], kind: str, shape: str) -> None:
    """An entry of "images" or "annotations" has an integer id that no earlier entry (id -> index) has."""
    if not isinstance(entry, dict) or not _is_int(entry.get("id")):
        _fail(where, "has no integer id", f"give each {kind} {shape}")
    if entry["id"] in seen:
        _fail(where, f"repeats the id of {kind}s[{seen[entry['id']]}]", f"give every {kind} its own id")


def _check_images(path: str, content: Dict, options: CocoOptions) -> Dict[int, Tuple[int, Dict]]:
    """image id -> (index in "images", entry), every field checked."""
    images: Dict[int, Tuple[int, Dict]] = {}
    index_of: Dict[int, int] = {}
    for i, im in enumerate(content["images"]):
        where = f"{path}: " + _entry("images", i, im)
        _check_id(where, im, index_of, "image",
                  '{"id": <integer>, "file_name": ..., "width": ..., "height": ...}')
        if not isinstance(im.get("file_name"), str) or not im["file_name"]:
            _fail(where, "has no file_name", "set file_name to the image's path relative to dataset.root")
        for key in ("width", "height"):
            if not (_is_int(im.get(key)) and im[key] > 0):
                _fail(where, f"{key} {im.get(key)!r} is not a positive integer", f"set {key} to the image's {key} in "
                                                                                 f"pixels")
        if "neighbour_slices" in im:
            n = im["neighbour_slices"]
            if options.pixels != "ct16":
                _fail(where, "has neighbour_slices, which are for 16-bit CT slices",
                      "set dataset.pixels=ct16 if the images are CT slices, else drop neighbour_slices")
            if not (isinstance(n, list) and len(n) == 2 and all(isinstance(s, str) and s for s in n)):
                _fail(where, f"neighbour_slices {n!r} is not [previous, next]", "list the file names of the slices "
                                                                               "before and after the key slice")
        if "spacing_mm" in im and not (_numbers(im["spacing_mm"], (2, 3)) and min(im["spacing_mm"][:2]) > 0):
            _fail(where, f"spacing_mm {im['spacing_mm']!r} is not [x, y] or [x, y, z] mm per pixel > 0",
                  "correct spacing_mm or drop it")
        if options.spacing_mm > 0 and "spacing_mm" not in im:
            _fail(where, f"has no spacing_mm, which dataset.spacing_mm={options.spacing_mm:g} needs",
                  "add spacing_mm [x, y] (mm per pixel) to every image, or set dataset.spacing_mm=0")
        window = im.get("dicom_window")
        if "dicom_window" in im and not (_numbers(window, (2,)) and window[0] < window[1]):
            _fail(where, f"dicom_window {window!r} is not [min, max] HU with min < max",
                  "correct dicom_window or drop it")
        if options.use_dicom_window and window is None:
            _fail(where, "has no dicom_window, which dataset.use_dicom_window=true needs",
                  "add dicom_window [min, max] (HU) to every image, or set dataset.use_dicom_window=false")
        images[im["id"]], index_of[im["id"]] = (i, im), i
    return images


def _check_annotations(path: str, content: Dict, images: Dict[int, Tuple[int, Dict]], category_ids: List[int],
                       check_boxes: bool) -> None:
    seen: Dict[int, int] = {}
    known = ", ".join(str(c) for c in category_ids)
    for i, a in enumerate(content["annotations"]):
        where = f"{path}: " + _entry("annotations", i, a)
        _check_id(where, a, seen, "annotation",
                  '{"id": <integer>, "image_id": ..., "category_id": ..., "bbox": [x, y, width, height]}')
        seen[a["id"]] = i
        if not _is_int(a.get("image_id")) or a["image_id"] not in images:
            _fail(where, f"refers to image_id {a.get('image_id')!r}, which no entry of images has",
                  "correct image_id, or add the image to images")
        if not _is_int(a.get("category_id")) or a["category_id"] not in category_ids:
            _fail(where, f"has the unknown category_id {a.get('category_id')!r} (the categories' ids: {known})",
                  "correct category_id, or add the category to categories")
        if a.get("iscrowd", 0) != 0 or a.get("ignore", 0) != 0:
            _fail(where, "is marked iscrowd/ignore, which lesion detection does not use",
                  "annotate each lesion on its own, or delete the entry")
        if not (_numbers(a.get("bbox"), (4,)) and a["bbox"][2] > 0 and a["bbox"][3] > 0):
            _fail(where, f"bbox {a.get('bbox')!r} is not [x, y, width, height] with width and height > 0",
                  "write the box as COCO does: [x, y, width, height] in pixels, from 0")
        index, im = images[a["image_id"]]
        x, y, w, h = a["bbox"]
        inside = 0 <= x and 0 <= y and x + w <= im["width"] and y + h <= im["height"]
        if check_boxes and not inside:
            _fail(where, f"bbox {a['bbox']} ([x, y, width, height]) reaches outside the {im['width']}x{im['height']} "
                         f"image images[{index}] (id {im['id']})",
                  "correct the box (or the image's width/height), or set dataset.check_boxes=false to clip it")
        if not inside and not (x < im["width"] and y < im["height"] and x + w > 0 and y + h > 0):
            _fail(where, f"bbox {a['bbox']} has no area inside the {im['width']}x{im['height']} image "
                         f"images[{index}] (id {im['id']})", "correct the box")
        if "recist" in a and not _numbers(a["recist"], (8,)):
            _fail(where, f"recist {a['recist']!r} is not 8 numbers (the ends of the long and the short axis)",
                  "correct recist or drop it")
        if "noisy" in a and not isinstance(a["noisy"], bool):
            _fail(where, f"noisy {a['noisy']!r} is not true or false", "set noisy to true or false")


@functools.lru_cache(maxsize=8)
def _checked_content(path: str, _stamp: Tuple[int, int], options: CocoOptions) -> Tuple[Dict, List[Dict]]:
    """The file's content with every field checked, and its categories sorted by id."""
    content = _read_json(path)
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(
        content.get(k) if isinstance(content, dict) else None, list)]
    if missing:
        _fail(f"{path}:", f"lacks the list(s) {missing} of COCO's instances format", f"write it as {_EXAMPLE}")
    categories = _check_categories(path, content)
    images = _check_images(path, content, options)
    _check_annotations(path, content, images, [c["id"] for c in categories], options.check_boxes)
    return content, categories


def _content(path: str, options: CocoOptions) -> Tuple[Dict, List[Dict]]:
    st = os.stat(path)
    return _checked_content(path, (st.st_mtime_ns, st.st_size), options)


class _Listing:
    """Which files exist, one directory listing per folder (cheaper than a stat per image)."""

    def __init__(self):
        self._folders: Dict[str, frozenset] = {}

    def exists(self, path: str) -> bool:
        folder = os.path.dirname(path)
        if folder not in self._folders:
            self._folders[folder] = frozenset(os.listdir(folder)) if os.path.isdir(folder) else frozenset()
        return os.path.basename(path) in self._folders[folder]


def _check_files(path: str, root: str, content: Dict, options: CocoOptions) -> None:
    """Every image file (and neighbour slice) exists; 16-bit PNG slices have the header and size they need."""
    listing, missing, needs = _Listing(), [], {}
    for i, im in enumerate(content["images"]):
        names = [("file_name", im["file_name"])] + [(f"neighbour_slices[{k}]", n)
                                                    for k, n in enumerate(im.get("neighbour_slices", []))]
        for field, name in names:
            full = os.path.join(root, name)
            if not listing.exists(full):
                missing.append(f"{_entry('images', i, im)} {field} {name!r}: {full} does not exist")
            elif options.pixels == "ct16" and full.lower().endswith(".png"):
                needs.setdefault((full, im["width"], im["height"]), (i, im, field))
    if missing:
        more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CocoEntryError(f"{len(missing)} image file(s) of {path} are missing:\n  " + "\n  ".join(missing[:5]) +
                             f"{more}\nFix: correct the file names (they are relative to dataset.root={root}), or "
                             f"restore the files")
    problems = SliceChecker().problems(needs, progress=len(needs) > 1000, desc=f"checking the slices of {path}")
    if problems:
        lines = [f"{_entry('images', needs[n][0], needs[n][1])} {needs[n][2]} {n[0]} {p}"
                 for n, p in list(problems.items())[:5]]
        raise CocoEntryError(f"{len(problems)} slice(s) of {path} cannot be used as 16-bit CT slices of the entry's "
                             f"width x height:\n  " + "\n  ".join(lines) + "\nFix: restore the files or correct "
                             "width/height; for 8-bit colour images set dataset.pixels=rgb8")


def _check_pixel_sample(path: str, records: List[Dict], options: CocoOptions) -> None:
    """Decode a few key images: a wrong dataset.hu_offset, blank slices or a wrong pixel type would otherwise
    train to an exit 0 on meaningless inputs."""
    step = max(1, len(records) // _PIXEL_SAMPLE)
    problems = []
    for r in records[::step][:_PIXEL_SAMPLE]:
        if options.pixels == "ct16":
            problem = pixel_problem(r["file_name"], options.hu_offset)
        else:
            image = cv2.imread(r["file_name"], cv2.IMREAD_UNCHANGED)
            problem = ("cannot be decoded" if image is None else "" if image.dtype == np.uint8 else
                       f"is {image.dtype}, not 8-bit (for 16-bit CT slices set dataset.pixels=ct16)")
        if problem:
            problems.append(f"{r['entry']}: {r['file_name']} {problem}")
    if problems:
        raise CocoEntryError(f"{len(problems)} sampled image(s) of {path} cannot be {options.pixels} images:\n  " +
                             "\n  ".join(problems) + f"\nFix: set dataset.pixels (ct16 or rgb8) and, for CT slices, "
                             f"dataset.hu_offset (now {options.hu_offset:g}) to what the files store")


def _box_midlines(x1: float, y1: float, x2: float, y2: float) -> List[float]:
    """RECIST stand-in when the JSON gives none: the horizontal and the vertical mid-line of the box."""
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return [x1, cy, x2, cy, cx, y1, cx, y2]


@functools.lru_cache(maxsize=8)
def _records_cached(path: str, _stamp: Tuple[int, int], root: str, name: str,
                    options: CocoOptions) -> Tuple[Dict, ...]:
    """The multi-type records of one JSON version: Detectron2's ``load_coco_json`` records in the DeepLesion
    loader's form (XYXY boxes, 3 slice channels, RECIST, noisy flags)."""
    content, categories = _checked_content(path, _stamp, options)
    _check_files(path, root, content, options)
    contiguous = {c["id"]: k for k, c in enumerate(categories)}  # as load_coco_json maps them with a dataset name
    images = {im["id"]: (i, im) for i, im in enumerate(content["images"])}
    records = []
    for d in load_coco_json(path, root, dataset_name=None, extra_annotation_keys=["recist", "noisy"]):
        index, im = images[d["image_id"]]
        width, height = im["width"], im["height"]
        record = {"file_name": d["file_name"], "image_id": d["image_id"], "height": height, "width": width,
                  "slice_interval_mm": 0.0, "spacing_mm": list(im.get("spacing_mm", [])),
                  "dicom_window": list(im.get("dicom_window", [])), "entry": f"{_entry('images', index, im)} of {path}",
                  "cache_key": f"{name}/{d['image_id']}", "annotations": []}
        if options.pixels == "ct16":
            previous, following = (os.path.join(root, n) for n in im.get("neighbour_slices", [im["file_name"]] * 2))
            record["slices"] = [[(previous, 1.0)], [(d["file_name"], 1.0)], [(following, 1.0)]]
            record["hu_offset"] = float(options.hu_offset)
        for a in d["annotations"]:
            if options.drop_noisy and a.get("noisy", False):
                continue
            x, y, w, h = (float(v) for v in a["bbox"])  # XYWH_ABS; BoxMode.convert would round to float32
            x1, x2 = min(max(x, 0.0), width), min(max(x + w, 0.0), width)  # unchanged when inside
            y1, y2 = min(max(y, 0.0), height), min(max(y + h, 0.0), height)
            record["annotations"].append({
                "bbox": [x1, y1, x2, y2], "bbox_mode": BoxMode.XYXY_ABS, "category_id": contiguous[a["category_id"]],
                "recist": list(a.get("recist") or _box_midlines(x1, y1, x2, y2)), "lesion_type": a["category_id"],
                "noisy": bool(a.get("noisy", False))})
        if d["annotations"] and not record["annotations"]:
            continue  # every lesion of the image was flagged noisy: dropped as DeepLesion drops such rows
        records.append(record)
    if not records:
        raise EmptySplitError(f"{path} (split {name}) has no images (drop_noisy={options.drop_noisy}). Check the "
                              f"file's images list")
    _check_pixel_sample(path, records, options)
    return tuple(records)


def load_coco_split(path: str, root: str, name: str, *, multi_type: bool,
                    options: CocoOptions = CocoOptions()) -> List[Dict]:
    """Detectron2 dataset dicts of one JSON: category_id is the category's contiguous index (sorted by id) when
    ``multi_type``, else 0 (one class, "lesion"). Files are checked once per JSON version and options."""
    st = os.stat(path)
    records = copy.deepcopy(list(_records_cached(path, (st.st_mtime_ns, st.st_size), os.path.abspath(root), name,
                                                 options)))
    if not multi_type:
        for r in records:
            for a in r["annotations"]:
                a["category_id"] = 0
    return records


def _check_abbreviations(path: str, split: str, classes: List[str]) -> None:
    """The per-type metric keys (``AP-<abbr>``) need one short name per category: say so now, not after training."""
    if len(classes) < 2:
        return
    try:
        type_abbreviations(split)
    except ConfigError as e:
        raise CocoEntryError(f"{path}: the categories {classes} need unique short names for the per-type metrics "
                             f"({e}). Fix: give every category an \"abbr\", e.g. {{\"id\": 1, \"name\": \"liver\", "
                             f"\"abbr\": \"LV\"}}") from None


def register_coco(splits: Dict[str, str], root: str, *, options: CocoOptions = CocoOptions(),
                  hu_window: Sequence[float] = (-1024, 3071), json_keys: Optional[Dict[str, str]] = None) -> List[str]:
    """Register ``<name>`` and ``<name>_types`` for each ``name -> JSON path`` of ``splits`` (images under
    ``root``); returns the registered names.

    The JSON is read (and its fields checked) now, since the types split's classes are its categories; the image
    files are checked on the first ``DatasetCatalog.get``. Re-registering replaces earlier entries.
    ``json_keys`` (name -> config key) lets a missing file name the key to set.
    """
    root = os.path.abspath(root)
    if options.pixels not in PIXELS:
        raise ConfigError(f"dataset.pixels={options.pixels!r}: must be ct16 (16-bit CT slices) or rgb8 (8-bit colour)")
    if not os.path.isdir(root):
        raise MissingFileError(f"dataset.root={root} is not a folder: set it to the folder the JSON's file_name "
                               f"entries are relative to")
    names = []
    for name, path in splits.items():
        if not os.path.isfile(path):
            key = (json_keys or {}).get(name, "the JSON path")
            raise MissingFileError(f"{path} not found: set {key} to the COCO JSON of split {name}")
        path = os.path.abspath(path)
        _, categories = _content(path, options)
        classes = [c["name"] for c in categories]
        for split, multi_type in ((name, False), (name + TYPES_SUFFIX, True)):
            DatasetCatalog.pop(split, None)
            MetadataCatalog.pop(split, None)
            DatasetCatalog.register(split, functools.partial(load_coco_split, path, root, name,
                                                             multi_type=multi_type, options=options))
            meta = MetadataCatalog.get(split)
            meta.set(thing_classes=classes if multi_type else ["lesion"], evaluator_type="deeplesion", root=root,
                     json_file=path, split=name, hu_window=[float(v) for v in hu_window],
                     use_dicom_window=options.use_dicom_window)
            if multi_type:
                meta.set(thing_dataset_id_to_contiguous_id={c["id"]: k for k, c in enumerate(categories)})
                if "abbr" in categories[0]:
                    meta.set(thing_abbr=[c["abbr"] for c in categories])
                _check_abbreviations(path, split, classes)
            names.append(split)
    return names
