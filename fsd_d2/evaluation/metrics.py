"""Lesion-detection metrics as plain numpy functions: overlaps, FROC / sensitivity at FPPI, COCO mAP and recall.

No Detectron2 API here, so each number can be checked against hand-worked cases (importing the module still
runs the package's model registrations, but never Hydra or the stages). Boxes are float arrays
``(N, 4)`` in XYXY absolute pixels; fractions in [0, 1] are returned (the evaluator turns them into percent).

Two protocols for the sensitivities (:data:`PROTOCOLS`); COCO mAP / recall are pycocotools' in both:

- ``"cadlab"``: the NIH CADLab code that produced every published DeepLesion table (MULAN's
  ``maskrcnn/data/datasets/evaluation/DeepLesion/detection_eval.py``; 3DCE's ``rcnn/utils/evaluation.py``, in
  github.com/rsummers11/CADLab): overlaps with the legacy "+1 pixel" box areas, and the lesions flagged
  Possibly_noisy removed from the split first (:func:`without_noisy_lesions`, done by the evaluator).
- ``"coco"``: overlaps with pycocotools' areas (w * h), every lesion counted.

Both walk the FROC curve the same way (:func:`froc`) and read it the same way (:func:`sensitivity_at_fppi`):
CADLab's "linear interpolation" of its curve is exactly that step reading.
"""
import contextlib
import io
from typing import Dict, List, NamedTuple, Sequence, Tuple

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

FPPI_POINTS = (0.5, 1, 2, 4, 8, 16)  # the FROC points of the paper's Table II


class ImageResult(NamedTuple):
    """Ground truth and detections of one image; labels are contiguous class ids (0 for binary detection)."""

    gt_boxes: np.ndarray  # (G, 4) XYXY
    gt_labels: np.ndarray  # (G,) int
    det_boxes: np.ndarray  # (D, 4) XYXY
    det_scores: np.ndarray  # (D,)
    det_labels: np.ndarray  # (D,) int


def _intersection(det: np.ndarray, gt: np.ndarray, plus_one: float) -> np.ndarray:
    det, gt = np.asarray(det, np.float64).reshape(-1, 4), np.asarray(gt, np.float64).reshape(-1, 4)
    w = np.minimum(det[:, None, 2], gt[None, :, 2]) - np.maximum(det[:, None, 0], gt[None, :, 0]) + plus_one
    h = np.minimum(det[:, None, 3], gt[None, :, 3]) - np.maximum(det[:, None, 1], gt[None, :, 1]) + plus_one
    return np.clip(w, 0, None) * np.clip(h, 0, None)


def _area(boxes: np.ndarray, plus_one: float) -> np.ndarray:
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return (boxes[:, 2] - boxes[:, 0] + plus_one) * (boxes[:, 3] - boxes[:, 1] + plus_one)


def iou_matrix(det: np.ndarray, gt: np.ndarray, *, plus_one: bool = False) -> np.ndarray:
    """(D, G) intersection over union, with pycocotools' areas (w * h) or, ``plus_one``, the legacy R-CNN areas
    (x2 - x1 + 1) * (y2 - y1 + 1), the intersection likewise, as the CADLab code's ``IOU`` computes them."""
    inter = _intersection(det, gt, float(plus_one))
    return inter / (_area(det, float(plus_one))[:, None] + _area(gt, float(plus_one))[None, :] - inter)


def iobb_matrix(det: np.ndarray, gt: np.ndarray, *, plus_one: bool = False) -> np.ndarray:
    """(D, G) intersection over the area of the *detected* box (IoBB, DeepLesion's lenient criterion).

    The CADLab code has no IoBB for its 2D FROC (IoBB belongs to DeepLesion's 3D manual test-set protocol), so
    ``plus_one`` gives IoBB the same "+1" areas as the CADLab IoU: the two criteria differ only in the denominator.
    """
    return _intersection(det, gt, float(plus_one)) / _area(det, float(plus_one))[:, None]


OVERLAPS = {"iou": iou_matrix, "iobb": iobb_matrix}
PROTOCOLS = ("cadlab", "coco")  # how the sensitivities are computed, see the module docstring


def invalid_detections(boxes: np.ndarray, scores: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Masks of detections that no metric can use: (non-finite box or score, inverted or empty box)."""
    nonfinite = ~np.isfinite(boxes).all(axis=1) | ~np.isfinite(scores)
    with np.errstate(invalid="ignore"):
        inverted = ~nonfinite & ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
    return nonfinite, inverted


def select_class(images: Sequence[ImageResult], label: int) -> List[ImageResult]:
    """The lesions of class ``label`` and the detections labelled ``label`` (per-type FROC)."""
    out = []
    for im in images:
        g, d = im.gt_labels == label, im.det_labels == label
        out.append(ImageResult(im.gt_boxes[g], im.gt_labels[g], im.det_boxes[d], im.det_scores[d], im.det_labels[d]))
    return out


def without_noisy_lesions(images: Sequence[ImageResult], noisy: Sequence[np.ndarray]) -> List[ImageResult]:
    """The CADLab test split: the lesions flagged Possibly_noisy (``noisy[i]``, one bool per lesion of image i)
    removed, and the images left without a lesion dropped, with their detections.

    As 3DCE's ``filter_roidb`` (``rcnn/utils/load_data.py``, run by ``tools/test.py``: "noisy boxes filtered,
    images: 4831 -> 4817, bboxes: 4927 -> 4912" in its test logs) and MULAN's ``DeepLesionDataset.load_split_index``
    (``~self.noisy``) do. An image that had no lesion to begin with is kept (DeepLesion has none; elsewhere it
    counts as an image and its detections as false positives, as everywhere in this module).
    """
    if len(noisy) != len(images):
        raise ValueError(f"without_noisy_lesions: {len(noisy)} noisy masks for {len(images)} images")
    out = []
    for im, flags in zip(images, noisy):
        flags = np.asarray(flags, bool).reshape(-1)
        if len(flags) != len(im.gt_boxes):
            raise ValueError(f"without_noisy_lesions: {len(flags)} noisy flags for {len(im.gt_boxes)} lesions")
        if len(flags) and flags.all():
            continue
        out.append(im._replace(gt_boxes=im.gt_boxes[~flags], gt_labels=im.gt_labels[~flags]))
    return out


def froc(images: Sequence[ImageResult], overlap: str = "iou", threshold: float = 0.5, *,
         plus_one: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """FROC curve ``(fppi, sensitivity)`` of the detections of all images pooled and sorted by score.

    The walk of CADLab's ``FROC``: down the list (stable sort, descending score), a detection whose overlap
    (``"iou"`` or ``"iobb"``) with a not-yet-hit lesion *of its own label* in its image is >= ``threshold`` hits
    every such lesion (each lesion counts once); one that overlaps no lesion at >= ``threshold`` is a false
    positive; one that overlaps only already-hit lesions is neither. FPPI = false positives / number of images
    (images without lesions included). ``plus_one`` picks the overlap's box areas: True the "+1 pixel" ones of
    CADLab's ``IOU`` (the ``cadlab`` protocol), False pycocotools' (``coco``; :func:`iou_matrix`). Exact score ties are walked in image
    order (CADLab's ``np.argsort(scores)[::-1]`` leaves their order to numpy's unstable sort).
    Returns one point per false-positive count, starting at 0 FPs: the sensitivity reached just before the
    next false positive, so ``fppi`` is strictly increasing. Sensitivity is NaN when there are no lesions.
    """
    overlap_fn = OVERLAPS[overlap]
    num_lesions = sum(len(im.gt_boxes) for im in images)
    hit = [np.zeros(len(im.gt_boxes), bool) for im in images]
    candidates, image_of, scores = [], [], []
    for i, im in enumerate(images):
        overlaps = overlap_fn(im.det_boxes, im.gt_boxes, plus_one=plus_one)
        cand = (overlaps >= threshold) & (im.det_labels[:, None] == im.gt_labels[None])
        candidates.extend(cand)
        image_of.extend([i] * len(cand))
        scores.append(np.asarray(im.det_scores, np.float64))
    order = np.argsort(-np.concatenate(scores) if scores else np.zeros(0), kind="mergesort")
    is_fp = np.array([not candidates[k].any() for k in order], bool)
    new_hits = np.zeros(len(order), np.int64)
    for pos in np.flatnonzero(~is_fp):  # only detections touching a lesion need the walk's state
        k = order[pos]
        new = candidates[k] & ~hit[image_of[k]]
        hit[image_of[k]] |= new
        new_hits[pos] = new.sum()
    fps = np.concatenate([[0], np.cumsum(is_fp)])
    hits = np.concatenate([[0], np.cumsum(new_hits)])
    last = np.flatnonzero(np.diff(fps, append=fps[-1] + 1))  # last point of each false-positive count
    sens = hits[last] / num_lesions if num_lesions else np.full(len(last), np.nan)
    return fps[last] / max(len(images), 1), sens


def sensitivity_at_fppi(fppi: np.ndarray, sens: np.ndarray, targets: Sequence[float] = FPPI_POINTS) -> np.ndarray:
    """Sensitivity at each target FPPI (>= 0): that of the last curve point whose FPPI is <= the target; past the
    last point (the detections ran out), the final sensitivity.

    This is CADLab's reading, in both protocols. MULAN's ``sens_at_FP`` reads ``interp1d(fp_per_img, sens)`` at
    targets inside its curve and ``sens[-1]`` past its end; its curve has one point per *detection*, and a false
    positive adds no hit, so the point that raises the FP count repeats the sensitivity before it: every segment
    between two FP counts is flat. At a target equal to an FP count, ``interp1d`` (which hands float64 data to
    ``numpy.interp`` since SciPy 0.17, scipy#5359) returns the last point of that count. The linear interpolation
    is thus this step function, never crediting sensitivity reached only after more false positives.
    (Interpolating linearly between the points :func:`froc` returns, one per FP count, would differ.) 3DCE's older
    copy passes ``fill_value="extrapolate"``, which runs SciPy's own kernel: at an exact FP count K it reads the
    *first* point of K, i.e. without the lesions first hit between the K-th and (K+1)-th false positive, and it
    extrapolates past the end.
    """
    return np.asarray(sens)[np.searchsorted(fppi, np.asarray(targets, np.float64), side="right") - 1]


class IoBBCOCOeval(COCOeval):
    """COCOeval with IoBB in place of IoU; matching, ``accumulate`` and all bookkeeping are COCO's own."""

    def computeIoU(self, imgId, catId):
        # Same selection and ordering as COCOeval.computeIoU (evaluateImg indexes rows in this order).
        p = self.params
        if p.useCats:
            gt, dt = self._gts[imgId, catId], self._dts[imgId, catId]
        else:
            gt = [g for c in p.catIds for g in self._gts[imgId, c]]
            dt = [d for c in p.catIds for d in self._dts[imgId, c]]
        if len(gt) == 0 or len(dt) == 0:
            return []
        inds = np.argsort([-d["score"] for d in dt], kind="mergesort")
        dt = [dt[i] for i in inds[:p.maxDets[-1]]]
        return iobb_matrix(_xywh_to_xyxy([d["bbox"] for d in dt]), _xywh_to_xyxy([g["bbox"] for g in gt]))


def _xywh_to_xyxy(boxes) -> np.ndarray:
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def _coco(images: Sequence[ImageResult], num_classes: int, detections: bool) -> COCO:
    anns = []
    for img_id, im in enumerate(images, start=1):
        boxes, labels = (im.det_boxes, im.det_labels) if detections else (im.gt_boxes, im.gt_labels)
        for j, (box, label) in enumerate(zip(np.asarray(boxes, np.float64).reshape(-1, 4), labels)):
            x1, y1, x2, y2 = box.tolist()
            ann = {"id": len(anns) + 1, "image_id": img_id, "category_id": int(label) + 1, "iscrowd": 0,
                   "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)}
            if detections:
                ann["score"] = float(im.det_scores[j])
            anns.append(ann)
    coco = COCO()
    coco.dataset = {"images": [{"id": i} for i in range(1, len(images) + 1)], "annotations": anns,
                    "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_ap_recall(images: Sequence[ImageResult], num_classes: int, overlap: str = "iou",
                   max_dets: int = 100) -> Dict[str, np.ndarray]:
    """COCO AP@[.5:.95] and recall@[.5:.95] (all areas, ``max_dets`` per image) with IoU or IoBB as overlap.

    Runs pycocotools' COCOeval (or :class:`IoBBCOCOeval`) on in-memory COCO objects; every image counts,
    also those without lesions or without detections. Returns ``AP`` and ``recall`` (means over the classes
    that have lesions, as COCO's summary) and ``AP_per_class`` / ``recall_per_class`` (NaN for a class without
    lesions). A class with lesions but no detections scores 0.
    """
    gt, dt = _coco(images, num_classes, False), _coco(images, num_classes, True)
    ev = {"iou": COCOeval, "iobb": IoBBCOCOeval}[overlap](gt, dt, iouType="bbox")
    ev.params.maxDets = [max_dets]
    ev.params.areaRng, ev.params.areaRngLbl = [[0, float("inf")]], ["all"]
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][:, :, :, 0, 0]  # (iou thresholds, recall points, classes)
    recall = ev.eval["recall"][:, :, 0, 0]  # (iou thresholds, classes)

    def mean_valid(x: np.ndarray) -> float:
        return float(x[x > -1].mean()) if (x > -1).any() else float("nan")

    return {"AP": mean_valid(precision), "recall": mean_valid(recall),
            "AP_per_class": np.array([mean_valid(precision[:, :, k]) for k in range(num_classes)]),
            "recall_per_class": np.array([mean_valid(recall[:, k]) for k in range(num_classes)])}
