"""DeepLesion evaluation as a Detectron2 ``DatasetEvaluator``: the numbers of the paper's Tables I-IV.

For each overlap criterion (IoU, and IoBB = intersection over the detected box; suffix ``_iobb``):
``AP`` / ``recall`` = COCO AP@[.5:.95] / recall@[.5:.95] (maxDets 100, pycocotools), ``sens@F`` = sensitivity
at F false positives per image for F in 0.5, 1, 2, 4, 8, 16 (overlap >= 0.5, see :func:`metrics.froc`), and on a
multi-type split ``AP-<T>`` / ``sens@4-<T>`` per lesion type T (BN AB ME LV LU KD ST PV). All in percent.
The sensitivities follow a protocol (:data:`metrics.PROTOCOLS`, config ``evaluation.protocol``): ``cadlab``, the
NIH CADLab code behind the published tables ("+1 pixel" box areas, lesions flagged Possibly_noisy removed), or
``coco`` (pycocotools' box areas, every lesion); AP and recall are the same in both.
"""
import itertools
import json
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import BoxMode
from detectron2.utils import comm

from fsd_d2.data.deeplesion import type_abbreviations
from fsd_d2.errors import ConfigError, DataError
from fsd_d2.evaluation.metrics import (FPPI_POINTS, ImageResult, coco_ap_recall, froc, invalid_detections,
                                       select_class, sensitivity_at_fppi, without_noisy_lesions)
from fsd_d2.evaluation.params import count_parameters
from fsd_d2.evaluation.report import CRITERIA, EvaluationReport, paper_tables, to_markdown
from fsd_d2.viz.detections import draw_detections
from fsd_d2.viz.froc import plot_froc

logger = logging.getLogger(__name__)

OVERLAP = {"": "iou", "_iobb": "iobb"}  # metric-key suffix -> overlap criterion
HIT_THRESHOLD = 0.5  # overlap a FROC hit needs (the protocol's 0.5 for both IoU and IoBB)
PER_TYPE_FPPI = 4  # the FPPI of the per-type sensitivity (Table IV)
DRAWN_DETECTIONS = 10  # per drawn image: enough to show what is found and missed, few enough to see the slice
PROTOCOL_NOTES = {  # what the reports say about the sensitivities, filled with the counts of _report
    "cadlab": "CADLab protocol (the NIH CADLab code of the published tables): \"+1 pixel\" box areas, lesions flagged "
              "Possibly_noisy removed: {sensitivity_images} of {num_images} images, {sensitivity_lesions} of "
              "{num_lesions} lesions",
    "coco": "coco protocol: pycocotools' box areas, all {num_images} images and {num_lesions} lesions",
}


class DeepLesionEvaluator(DatasetEvaluator):
    """COCO mAP / recall and FROC sensitivities with IoU and IoBB, per lesion type on multi-type splits.

    Ground truth comes from ``DatasetCatalog.get(dataset_name)`` (Detectron2 dicts; every processed image counts,
    also one without lesions: its detections are all false positives). On a binary split (one thing class)
    detections are class-agnostic (their labels are ignored); on a multi-type split a detection only matches
    lesions of its own label, also in the pooled ``sens@F`` numbers. ``protocol`` ("cadlab" or "coco", checked once,
    where ``evaluation.protocol`` enters the config) decides how the sensitivities are computed; under "cadlab" the
    lesions whose annotation carries ``"noisy": True`` (DL_info.csv's Possibly_noisy) are removed and the images
    left without a lesion dropped, for the sensitivities only (AP and recall count every image and lesion).
    Detections with a non-finite box or score, or an inverted / empty box, are dropped, counted in
    ``dropped_invalid`` and logged. With ``output_dir``, ``metrics_<dataset>.json``, ``metrics_<dataset>.md`` (the
    paper's table layout), ``froc_<dataset>.png`` and ``detections_<dataset>.json`` (every image's detections) are
    written, and ``self.report`` (tables, FROC figure, drawings) is kept for a logger such as W&B. ``model`` adds
    its parameter count (millions). ``num_drawn`` images (the first processed) are drawn with ground truth and
    detections (the paper's Fig. 3) as ``detections_<dataset>/<image_id>.png``, so a glance shows what the numbers
    mean.
    """

    def __init__(self, dataset_name: str, output_dir: Optional[str] = None, *, per_type: Optional[bool] = None,
                 model: Optional[torch.nn.Module] = None, distributed: bool = True, num_drawn: int = 0,
                 protocol: str = "cadlab"):
        meta = MetadataCatalog.get(dataset_name)
        classes = list(meta.get("thing_classes", None) or [])
        if not classes:
            raise ConfigError(f"dataset '{dataset_name}' has no thing_classes metadata: register the dataset first "
                              f"(e.g. fsd_d2.data.deeplesion.register_deeplesion) or set MetadataCatalog thing_classes")
        if per_type and len(classes) == 1:
            raise ConfigError(f"per-type metrics were asked for, but '{dataset_name}' is a binary split (thing_classes "
                              f"{classes}); use a lesion-type split such as deeplesion_types_test, or per_type=False")
        self._dataset_name = dataset_name
        self._classes = classes
        self._per_type = len(classes) > 1 if per_type is None else per_type
        self._abbr = type_abbreviations(dataset_name) if len(classes) > 1 else []
        self._output_dir = output_dir
        self._model = model
        self._distributed = distributed
        self._num_drawn = num_drawn
        self._protocol = protocol
        self._predictions: List[Dict] = []
        self._images: Dict[str, np.ndarray] = {}  # image_id -> HxWx3 uint8 input, for the drawings
        self.report: Optional[EvaluationReport] = None  # set by evaluate() on the main process

    def reset(self):
        self._predictions = []
        self._images = {}

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            inst = out["instances"].to("cpu")
            boxes = inst.pred_boxes.tensor.numpy().astype(np.float64)
            scores = inst.scores.numpy().astype(np.float64)
            labels = inst.pred_classes.numpy().astype(np.int64)
            nonfinite, inverted = invalid_detections(boxes, scores)
            keep = ~(nonfinite | inverted)
            self._predictions.append({"image_id": inp["image_id"], "boxes": boxes[keep], "scores": scores[keep],
                                      "labels": labels[keep], "nonfinite": int(nonfinite.sum()),
                                      "inverted": int(inverted.sum())})
            if len(self._images) < self._num_drawn and self._output_dir:
                # The model saw a resized image; its detections are in the original (height, width) frame.
                image = inp["image"].permute(1, 2, 0).cpu().numpy()
                self._images[inp["image_id"]] = cv2.resize(image, (inp["width"], inp["height"]))

    def evaluate(self):
        predictions = self._predictions
        if self._distributed:
            comm.synchronize()
            predictions = list(itertools.chain(*comm.gather(predictions, dst=0)))
            if not comm.is_main_process():
                return {}
        if not predictions:
            logger.warning(f"DeepLesionEvaluator({self._dataset_name}): no image was processed, nothing to evaluate")
            return {}
        matched, noisy = self._match_ground_truth(predictions)
        images = list(matched.values())
        sens_images = without_noisy_lesions(images, noisy) if self._protocol == "cadlab" else images
        metrics, curves = self._metrics(images, sens_images)
        nonfinite, inverted = sum(p["nonfinite"] for p in predictions), sum(p["inverted"] for p in predictions)
        metrics["dropped_invalid"] = float(nonfinite + inverted)
        if nonfinite + inverted:
            logger.warning(f"{self._dataset_name}: dropped {nonfinite + inverted} invalid detections ({nonfinite} "
                           f"with a NaN/inf box or score, {inverted} with an inverted or empty box); the model "
                           f"produces broken boxes, check its training (loss divergence) and box decoding")
        if self._model is not None:
            metrics.update({f"params_{k}": v for k, v in count_parameters(self._model).items()})
        self._report(metrics, curves, matched, sens_images, self._draw(matched))
        return OrderedDict(bbox=metrics)

    def _match_ground_truth(self, predictions: List[Dict]) -> Tuple[Dict[str, ImageResult], List[np.ndarray]]:
        """image_id -> :class:`ImageResult` for each processed image, in dataset order, ground truth in XYXY_ABS;
        and per image, which lesions are flagged noisy (an annotation without ``"noisy"`` is not)."""
        by_id = {}
        for p in predictions:
            if p["image_id"] in by_id:
                raise ValueError(f"{self._dataset_name}: image_id {p['image_id']!r} was processed twice; call "
                                 f"reset() before evaluating again")
            by_id[p["image_id"]] = p
        dataset = DatasetCatalog.get(self._dataset_name)
        unknown = set(by_id) - {d["image_id"] for d in dataset}
        if unknown:
            raise ValueError(f"{self._dataset_name}: processed image_ids {sorted(map(str, unknown))[:5]} are not in "
                             f"the dataset; evaluate with the test loader of this same dataset")
        if len(by_id) < len(dataset):
            logger.warning(f"{self._dataset_name}: only {len(by_id)} of {len(dataset)} images were processed; "
                           f"metrics (and FPPI) cover those only")
        binary = len(self._classes) == 1
        images, noisy = {}, []
        for d in dataset:
            if d["image_id"] not in by_id:
                continue
            p, anns = by_id[d["image_id"]], d.get("annotations", [])
            gt = np.array([BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns],
                          np.float64).reshape(-1, 4)
            gt_labels = np.array([a["category_id"] for a in anns], np.int64)
            if not (np.isfinite(gt).all() and (gt[:, 2:] > gt[:, :2]).all()):
                raise DataError(f"{self._dataset_name}: image {d['image_id']!r} has a non-finite, inverted or empty "
                                f"ground-truth box in {gt.tolist()}; fix the dataset")
            labels = p["labels"]
            if binary:
                labels = np.zeros_like(labels)  # binary lesion detection: every detection is "a lesion"
            for what, values in (("ground-truth category_id", gt_labels), ("pred_classes", labels)):
                if len(values) and not ((values >= 0) & (values < len(self._classes))).all():
                    raise ConfigError(f"{self._dataset_name}: image {d['image_id']!r} has {what} {values.tolist()} "
                                      f"outside 0..{len(self._classes) - 1} ({self._classes}); does the model's "
                                      f"ROI_HEADS.NUM_CLASSES match the dataset?")
            images[d["image_id"]] = ImageResult(gt, gt_labels, p["boxes"], p["scores"], labels)
            noisy.append(np.array([bool(a.get("noisy", False)) for a in anns], bool))
        return images, noisy

    def _metrics(self, images: List[ImageResult], sens_images: List[ImageResult]):
        """COCO AP / recall on ``images``; the FROC curves and sensitivities on ``sens_images`` (the protocol's)."""
        metrics, curves = {}, {}
        plus_one = self._protocol == "cadlab"  # CADLab's box areas
        for (name, suffix) in CRITERIA:
            overlap = OVERLAP[suffix]
            coco = coco_ap_recall(images, len(self._classes), overlap)
            metrics[f"AP{suffix}"], metrics[f"recall{suffix}"] = 100 * coco["AP"], 100 * coco["recall"]
            curves[name] = froc(sens_images, overlap, HIT_THRESHOLD, plus_one=plus_one)
            for fppi, s in zip(FPPI_POINTS, sensitivity_at_fppi(*curves[name])):
                metrics[f"sens{suffix}@{fppi:g}"] = 100 * float(s)
            if self._per_type:
                for k, abbr in enumerate(self._abbr):
                    metrics[f"AP{suffix}-{abbr}"] = 100 * float(coco["AP_per_class"][k])
                    typed = froc(select_class(sens_images, k), overlap, HIT_THRESHOLD, plus_one=plus_one)
                    metrics[f"sens{suffix}@{PER_TYPE_FPPI}-{abbr}"] = 100 * float(
                        sensitivity_at_fppi(*typed, [PER_TYPE_FPPI])[0])
        return metrics, curves

    def _report(self, metrics: Dict[str, float], curves, matched: Dict[str, ImageResult],
                sens_images: List[ImageResult], drawings: List[str]) -> None:
        name, images = self._dataset_name, list(matched.values())
        counts = {"num_images": len(images), "num_lesions": int(sum(len(im.gt_boxes) for im in images)),
                  "num_detections": int(sum(len(im.det_boxes) for im in images)),
                  "sensitivity_protocol": self._protocol, "sensitivity_images": len(sens_images),
                  "sensitivity_lesions": int(sum(len(im.gt_boxes) for im in sens_images))}
        protocol = PROTOCOL_NOTES[self._protocol].format(**counts)
        logger.info(f"{name}: sensitivities by the {protocol}")
        tables = paper_tables(metrics, self._abbr if self._per_type else ())
        if self._output_dir:
            os.makedirs(self._output_dir, exist_ok=True)
        marks = {criterion: [metrics[f"sens{suffix}@{fppi:g}"] for fppi in FPPI_POINTS]
                 for criterion, suffix in CRITERIA}  # the reported sensitivities, marked on their curves
        figure = plot_froc(curves, os.path.join(self._output_dir, f"froc_{name}.png") if self._output_dir else None,
                           points=FPPI_POINTS, marks=marks, title=f"FROC on {name} ({self._protocol} protocol)")
        if self._output_dir:
            with open(os.path.join(self._output_dir, f"metrics_{name}.json"), "w") as f:
                json.dump({"dataset": name, **counts, "bbox": metrics}, f, indent=2)
            notes = [f"{counts['num_images']} images, {counts['num_lesions']} lesions, {counts['num_detections']} "
                     f"detections ({int(metrics['dropped_invalid'])} invalid ones dropped). Percent; overlap >= 0.5 "
                     f"for a FROC hit; COCO maxDets 100 on every image and lesion.",
                     f"Sensitivities by the {protocol}."]
            with open(os.path.join(self._output_dir, f"metrics_{name}.md"), "w") as f:
                f.write(to_markdown(f"DeepLesion evaluation: {name}", tables, notes))
            with open(os.path.join(self._output_dir, f"detections_{name}.json"), "w") as f:
                json.dump(self._detections_record(matched), f)
            logger.info(f"wrote metrics_{name}.json/.md, detections_{name}.json and froc_{name}.png to "
                        f"{self._output_dir}")
        self.report = EvaluationReport(tables, figure, drawings)

    def _detections_record(self, matched: Dict[str, ImageResult]) -> List[Dict]:
        """Every image's valid detections, so metrics can be recomputed and errors studied without rerunning
        the model: XYXY boxes in the original image's pixels (2 decimals), scores, class names."""
        return [{"image_id": image_id, "boxes_xyxy": np.round(im.det_boxes, 2).tolist(),
                 "scores": np.round(im.det_scores, 5).tolist(), "classes": [self._classes[c] for c in im.det_labels]}
                for image_id, im in matched.items()]

    def _draw(self, matched: Dict[str, ImageResult]) -> List[str]:
        """PNGs of the kept input images with their ground truth and best detections; returns their paths."""
        paths = []
        for image_id, image in self._images.items():
            im = matched[image_id]
            best = np.argsort(-im.det_scores, kind="stable")[:DRAWN_DETECTIONS]
            paths.append(draw_detections(
                image, im.gt_boxes, im.det_boxes[best], im.det_scores[best], im.det_labels[best],
                os.path.join(self._output_dir, f"detections_{self._dataset_name}", f"{image_id}.png"),
                class_names=self._classes))
        return paths
