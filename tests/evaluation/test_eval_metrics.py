"""Metric functions against hand-worked cases, and COCO mAP against pycocotools run directly."""
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fsd_d2.evaluation.metrics import (ImageResult, coco_ap_recall, froc, invalid_detections, iobb_matrix,
                                       iou_matrix, select_class, sensitivity_at_fppi)

FAR = [200, 200, 210, 210]  # overlaps no lesion below


def image(gts=(), dets=(), gt_labels=None):
    """gts: XYXY boxes; dets: (box, score) or (box, score, label)."""
    dets = [d if len(d) == 3 else (*d, 0) for d in dets]
    return ImageResult(np.array(gts, np.float64).reshape(-1, 4),
                       np.array(gt_labels if gt_labels is not None else [0] * len(gts), np.int64),
                       np.array([d[0] for d in dets], np.float64).reshape(-1, 4),
                       np.array([d[1] for d in dets], np.float64), np.array([d[2] for d in dets], np.int64))


def sens(images, overlap="iou", **kw):
    return sensitivity_at_fppi(*froc(images, overlap, **kw))


def test_overlap_matrices():
    det, gt = np.array([[40, 40, 60, 60], [0, 0, 100, 50]]), np.array([[0, 0, 100, 100]])
    np.testing.assert_allclose(iou_matrix(det, gt), [[0.04], [0.5]])
    np.testing.assert_allclose(iobb_matrix(det, gt), [[1.0], [1.0]])  # intersection over the *detected* box
    assert iou_matrix(det, np.zeros((0, 4))).shape == (2, 0)


def test_perfect_detector_scores_100_everywhere():
    images = [image([[10, 10, 30, 40]], [([10, 10, 30, 40], 0.9)]),
              image([[5, 5, 20, 20], [50, 50, 90, 70]], [([5, 5, 20, 20], 0.8), ([50, 50, 90, 70], 0.7)])]
    for overlap in ("iou", "iobb"):
        res = coco_ap_recall(images, 1, overlap)
        assert res["AP"] == pytest.approx(1.0) and res["recall"] == pytest.approx(1.0)
        np.testing.assert_allclose(sens(images, overlap), 1.0)


@pytest.mark.parametrize("dets", [[], [(FAR, 0.9), (FAR, 0.5)]], ids=["no-detections", "all-false-positives"])
def test_detector_that_misses_everything_scores_0(dets):
    images = [image([[10, 10, 30, 40]], dets), image([[5, 5, 20, 20]])]
    for overlap in ("iou", "iobb"):
        res = coco_ap_recall(images, 1, overlap)
        assert res["AP"] == 0.0 and res["recall"] == 0.0
        np.testing.assert_array_equal(sens(images, overlap), 0.0)


def test_duplicate_is_neither_hit_nor_fp_in_froc_but_fp_in_coco():
    a, b = [0, 0, 20, 20], [30, 30, 50, 50]
    images = [image([a], [(a, 0.9), ([0, 0, 20, 19], 0.8)]), image([b], [(b, 0.7)])]
    fppi, s = froc(images)
    np.testing.assert_array_equal(fppi, [0.0])  # no false positive at all
    np.testing.assert_array_equal(s, [1.0])
    fppi, s = froc(images, duplicates_are_fp=True)  # the protocol's "(check)" alternative
    np.testing.assert_array_equal(fppi, [0.0, 0.5])
    # COCO ranks TP, FP, TP: precision 1 up to recall 0.5 (51 of 101 recall points), 2/3 above.
    assert coco_ap_recall(images, 1)["AP"] == pytest.approx((51 + 50 * 2 / 3) / 101)


def test_small_box_inside_a_big_lesion_hits_by_iobb_only():
    images = [image([[0, 0, 100, 100]], [([40, 40, 60, 60], 0.9)])]  # IoU 0.04, IoBB 1
    np.testing.assert_array_equal(sens(images, "iou"), 0.0)
    np.testing.assert_array_equal(sens(images, "iobb"), 1.0)
    assert coco_ap_recall(images, 1, "iou")["AP"] == 0.0
    assert coco_ap_recall(images, 1, "iobb")["AP"] == pytest.approx(1.0)


def test_fppi_interpolation_takes_the_last_point_not_above_the_target():
    a1, a2, b1, b2 = [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 12, 12], [40, 40, 50, 50]
    # 2 images, 4 lesions; by score: H F H F F H F F (b2 never found)
    images = [image([a1, a2], [(a1, 0.95), (FAR, 0.9), (FAR, 0.75), (a2, 0.7), (FAR, 0.6)]),
              image([b1, b2], [(b1, 0.85), (FAR, 0.8), (FAR, 0.65)])]
    fppi, s = froc(images)
    np.testing.assert_allclose(fppi, [0, 0.5, 1, 1.5, 2, 2.5])
    np.testing.assert_allclose(s, [0.25, 0.5, 0.5, 0.75, 0.75, 0.75])
    # at 0.5 FPPI the hit right after the first FP counts (FPPI still 0.5); past the end: the final value
    np.testing.assert_allclose(sensitivity_at_fppi(fppi, s), [0.5, 0.5, 0.75, 0.75, 0.75, 0.75])
    np.testing.assert_allclose(sensitivity_at_fppi(fppi, s, [0.25, 1.49]), [0.25, 0.5])


def test_images_without_lesions_count_as_images_and_their_detections_as_fps():
    lesion = [10, 10, 30, 30]
    images = [image([lesion], [(lesion, 0.5)]), image([], [([0, 0, 5, 5], 0.9)])]
    fppi, s = froc(images)
    np.testing.assert_allclose(fppi, [0, 0.5])  # 1 FP over 2 images
    np.testing.assert_allclose(sensitivity_at_fppi(fppi, s, [0.5]), [1.0])
    assert coco_ap_recall(images, 1)["AP"] == pytest.approx(0.5)  # ranked FP, TP


def test_per_type_split_and_class_aware_matching():
    liver, lung = [0, 0, 20, 20], [50, 50, 70, 70]
    images = [image([liver, lung], [(liver, 0.9, 0), ([1, 1, 20, 20], 0.8, 1)], gt_labels=[0, 1])]
    res = coco_ap_recall(images, 3)
    np.testing.assert_allclose(res["AP_per_class"][:2], [1.0, 0.0])
    assert np.isnan(res["AP_per_class"][2])  # no lesion of class 2: excluded from the mean
    assert res["AP"] == pytest.approx(0.5)
    # the class-1 detection on the class-0 lesion is a false positive, in the pooled and the per-type curve
    np.testing.assert_allclose(froc(images)[1], [0.5, 0.5])
    np.testing.assert_array_equal(sens(select_class(images, 0)), 1.0)
    np.testing.assert_array_equal(sens(select_class(images, 1)), 0.0)
    assert np.isnan(sens(select_class(images, 2))).all()


def test_invalid_detections_are_flagged():
    boxes = np.array([[0, 0, 5, 5], [np.nan, 0, 5, 5], [5, 0, 0, 5], [0, 0, 5, 5], [0, 0, 0, 5]], np.float64)
    nonfinite, inverted = invalid_detections(boxes, np.array([0.5, 0.5, 0.5, np.inf, 0.5]))
    np.testing.assert_array_equal(nonfinite, [False, True, False, True, False])
    np.testing.assert_array_equal(inverted, [False, False, True, False, True])


def test_iou_map_equals_pycocotools_run_directly(tmp_path):
    rng = np.random.default_rng(0)
    images, gt_json, dt_json = [], {"images": [], "annotations": [], "categories": [{"id": 1}, {"id": 2}]}, []
    for img_id in range(1, 9):
        gts = []
        for _ in range(rng.integers(0, 3)):  # some images without lesions
            x, y, w, h = rng.uniform(0, 80, 2).tolist() + rng.uniform(5, 30, 2).tolist()
            gts.append(([x, y, x + w, y + h], int(rng.integers(0, 2))))
        dets = [((np.array(b) + rng.normal(0, 2.5, 4)).tolist(), float(rng.uniform()), c) for b, c in gts]
        dets += [((np.array([x, y, x + 15, y + 15])).tolist(), float(rng.uniform()), int(rng.integers(0, 2)))
                 for x, y in rng.uniform(0, 90, (3, 2))]
        images.append(image([b for b, _ in gts], dets, gt_labels=[c for _, c in gts]))
        gt_json["images"].append({"id": img_id})
        for b, c in gts:
            gt_json["annotations"].append({"id": len(gt_json["annotations"]) + 1, "image_id": img_id, "iscrowd": 0,
                                           "category_id": c + 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                                           "area": (b[2] - b[0]) * (b[3] - b[1])})
        dt_json += [{"image_id": img_id, "category_id": c + 1, "score": s,
                     "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]} for b, s, c in dets]
    (tmp_path / "gt.json").write_text(json.dumps(gt_json))
    (tmp_path / "dt.json").write_text(json.dumps(dt_json))
    gt = COCO(str(tmp_path / "gt.json"))
    ev = COCOeval(gt, gt.loadRes(str(tmp_path / "dt.json")), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    ours = coco_ap_recall(images, 2)
    assert 0.05 < ev.stats[0] < 0.95  # a non-trivial case
    assert ours["AP"] == pytest.approx(ev.stats[0], abs=1e-12)
    assert ours["recall"] == pytest.approx(ev.stats[8], abs=1e-12)  # AR@[.5:.95], all areas, maxDets 100
