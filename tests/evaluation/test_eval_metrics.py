"""Metric functions against hand-worked cases, and COCO mAP against pycocotools run directly."""
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fsd_d2.evaluation.metrics import (ImageResult, coco_ap_recall, froc, invalid_detections, iobb_matrix,
                                       iou_matrix, select_class, sensitivity_at_fppi, without_noisy_lesions)

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
    # "+1 pixel" areas, as CADLab's IOU: 21x21 inside 101x101 pixels, 101x51 of them
    np.testing.assert_allclose(iou_matrix(det, gt, plus_one=True), [[441 / 10201], [5151 / 10201]])
    np.testing.assert_allclose(iobb_matrix(det, gt, plus_one=True), [[1.0], [1.0]])


# A 3x3 detection one pixel left of a 3x4 lesion: pycocotools' areas (w*h) give IoU 6 / (9 + 12 - 6) = 0.4 and
# IoBB 6 / 9; CADLab's "+1" areas ((w+1)(h+1), intersection likewise) give IoU 12 / (16 + 20 - 12) = 0.5.
SMALL_DET, SMALL_LESION = [0, 0, 3, 3], [1, 0, 4, 4]
# A 5x2 sliver over the edge of a 7x10 lesion: IoBB 2*2 / (5*2) = 0.4, with "+1" 3*3 / (6*3) = 0.5.
SLIVER_DET, SLIVER_LESION = [0, 0, 5, 2], [3, 0, 10, 10]


def test_plus_one_areas_turn_small_near_misses_into_hits():
    np.testing.assert_allclose(iou_matrix([SMALL_DET], [SMALL_LESION]), [[0.4]])
    np.testing.assert_allclose(iou_matrix([SMALL_DET], [SMALL_LESION], plus_one=True), [[0.5]])
    np.testing.assert_allclose(iobb_matrix([SLIVER_DET], [SLIVER_LESION]), [[0.4]])
    np.testing.assert_allclose(iobb_matrix([SLIVER_DET], [SLIVER_LESION], plus_one=True), [[0.5]])
    small = [image([SMALL_LESION], [(SMALL_DET, 0.9)])]
    sliver = [image([SLIVER_LESION], [(SLIVER_DET, 0.9)])]
    np.testing.assert_array_equal(sens(small, "iou", plus_one=False), 0.0)  # coco's areas: a false positive
    np.testing.assert_array_equal(sens(small, "iou", plus_one=True), 1.0)  # cadlab's: a hit
    np.testing.assert_array_equal(sens(sliver, "iobb", plus_one=False), 0.0)
    np.testing.assert_array_equal(sens(sliver, "iobb", plus_one=True), 1.0)
    assert sens(small, "iou").tolist() == [1.0] * 6  # cadlab's areas are the default


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
    for plus_one in (True, False):  # the cadlab and coco protocols' box areas
        fppi, s = froc(images, plus_one=plus_one)
        np.testing.assert_array_equal(fppi, [0.0])  # no false positive at all
        np.testing.assert_array_equal(s, [1.0])
    # COCO ranks TP, FP, TP: precision 1 up to recall 0.5 (51 of 101 recall points), 2/3 above.
    assert coco_ap_recall(images, 1)["AP"] == pytest.approx((51 + 50 * 2 / 3) / 101)


def test_small_box_inside_a_big_lesion_hits_by_iobb_only():
    images = [image([[0, 0, 100, 100]], [([40, 40, 60, 60], 0.9)])]  # IoU 0.04, IoBB 1
    np.testing.assert_array_equal(sens(images, "iou"), 0.0)
    np.testing.assert_array_equal(sens(images, "iobb"), 1.0)
    assert coco_ap_recall(images, 1, "iou")["AP"] == 0.0
    assert coco_ap_recall(images, 1, "iobb")["AP"] == pytest.approx(1.0)


A1, A2, B1, B2 = [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 12, 12], [40, 40, 50, 50]
# 2 images, 4 lesions; by score: H F H F F H F F (B2 never found)
WALK = [image([A1, A2], [(A1, 0.95), (FAR, 0.9), (FAR, 0.75), (A2, 0.7), (FAR, 0.6)]),
        image([B1, B2], [(B1, 0.85), (FAR, 0.8), (FAR, 0.65)])]


def test_fppi_reading_takes_the_last_point_not_above_the_target():
    fppi, s = froc(WALK)
    np.testing.assert_allclose(fppi, [0, 0.5, 1, 1.5, 2, 2.5])
    np.testing.assert_allclose(s, [0.25, 0.5, 0.5, 0.75, 0.75, 0.75])
    # at 0.5 FPPI the hit right after the first FP counts (FPPI still 0.5); past the end: the final value
    np.testing.assert_allclose(sensitivity_at_fppi(fppi, s), [0.5, 0.5, 0.75, 0.75, 0.75, 0.75])
    np.testing.assert_allclose(sensitivity_at_fppi(fppi, s, [0.25, 1.25, 1.49]), [0.25, 0.5, 0.5])
    # linear interpolation between these points (one per FP count) would credit half the hit after FP 3 at 1.25
    assert np.interp(1.25, fppi, s) == pytest.approx(0.625)


def cadlab_sens_at_fp(images, avg_fp, iou_th=0.5):
    """MULAN's ``detection_eval.py`` (``sens_at_FP``, ``FROC``, ``IOU``; github.com/rsummers11/CADLab) line by line,
    with ``scipy.interpolate.interp1d(fp_per_img, sens)(x)`` written as the ``numpy.interp(x, fp_per_img, sens)``
    that SciPy runs for 1-D float64 data without extrapolation (its range check: ``x`` >= the first point)."""
    boxes_all = [np.hstack([im.det_boxes, im.det_scores[:, None]]) for im in images]
    gts_all = [im.gt_boxes for im in images]

    def iou(box1, gts):
        iw = np.maximum(np.minimum(gts[:, 2], box1[2]) - np.maximum(gts[:, 0], box1[0]) + 1., 0.)
        ih = np.maximum(np.minimum(gts[:, 3], box1[3]) - np.maximum(gts[:, 1], box1[1]) + 1., 0.)
        inters = iw * ih
        return inters / ((box1[2] - box1[0] + 1.) * (box1[3] - box1[1] + 1.) +
                         (gts[:, 2] - gts[:, 0] + 1.) * (gts[:, 3] - gts[:, 1] + 1.) - inters)

    n_img = len(boxes_all)
    img_idxs = np.hstack([[i] * len(boxes_all[i]) for i in range(n_img)]).astype(int)
    boxes_cat = np.vstack(boxes_all)
    order = np.argsort(boxes_cat[:, -1])[::-1]
    boxes_cat, img_idxs = boxes_cat[order, :4], img_idxs[order]
    hits = [np.zeros((len(gts),), dtype=bool) for gts in gts_all]
    n_hits, n_miss, tps, fps = 0, 0, [], []
    for i in range(len(boxes_cat)):
        overlaps = iou(boxes_cat[i, :], gts_all[img_idxs[i]])
        if len(overlaps) == 0 or overlaps.max() < iou_th:
            n_miss += 1
        else:
            for j in range(len(overlaps)):
                if overlaps[j] >= iou_th and not hits[img_idxs[i]][j]:
                    hits[img_idxs[i]][j] = True
                    n_hits += 1
        tps.append(n_hits)
        fps.append(n_miss)
    sens = np.array(tps, dtype=float) / len(np.vstack(gts_all))
    fp_per_img = np.array(fps, dtype=float) / n_img
    inside = [a for a in avg_fp if a <= fp_per_img[-1]]
    assert min(avg_fp) >= fp_per_img[0], "interp1d raises below its first point"
    return np.hstack([np.interp(inside, fp_per_img, sens), np.ones(len(avg_fp) - len(inside)) * sens[-1]])


def test_cadlab_reading_equals_the_cadlab_code():
    # By hand: the linear interpolation over CADLab's per-detection points is the step reading above.
    targets = [0.5, 1, 1.25, 2, 2.5, 4]  # FP counts 1, 2, 4 and the last (5) exactly, between 2 and 3, past the end
    np.testing.assert_allclose(cadlab_sens_at_fp(WALK, targets), [0.5, 0.5, 0.5, 0.75, 0.75, 0.75])
    np.testing.assert_allclose(sensitivity_at_fppi(*froc(WALK), targets), cadlab_sens_at_fp(WALK, targets))
    # Random small boxes (where "+1" matters), 4 or 8 images (every target an exact FP count) or 5 (half counts).
    rng = np.random.default_rng(0)
    for _ in range(40):
        images = []
        for _ in range(rng.choice([4, 5, 8])):
            xy = rng.integers(0, 30, (rng.integers(0, 3), 2))
            gts = np.hstack([xy, xy + rng.integers(2, 9, xy.shape)]).astype(float)
            dets = np.concatenate([gts[rng.integers(0, len(gts), rng.integers(0, 12))] if len(gts) else
                                   np.zeros((0, 4)), np.tile([50.0, 50, 55, 55], (rng.integers(0, 4), 1))])
            dets += rng.integers(-2, 3, dets.shape)
            dets[:, 2:] = np.maximum(dets[:, 2:], dets[:, :2] + 1)
            images.append(image(gts, [(d, s) for d, s in zip(dets, rng.random(len(dets)))]))
        if not any(len(im.det_boxes) for im in images) or not any(len(im.gt_boxes) for im in images):
            continue
        np.testing.assert_array_equal(sens(images), cadlab_sens_at_fp(images, [0.5, 1, 2, 4, 8, 16]))


def test_noisy_lesions_leave_the_cadlab_split():
    clean, noisy = [10, 10, 30, 30], [50, 50, 70, 70]
    images = [image([clean, noisy], [(clean, 0.9), (noisy, 0.8)]),  # keeps its clean lesion
              image([noisy], [(FAR, 0.7)]),  # only a noisy lesion: dropped, with its false positive
              image([], [(FAR, 0.6)])]  # no lesion to begin with: still an image, its detection still a FP
    kept = without_noisy_lesions(images, [[False, True], [True], []])
    assert len(kept) == 2 and kept[0].gt_boxes.tolist() == [clean] and kept[1].gt_boxes.shape == (0, 4)
    np.testing.assert_array_equal(kept[0].det_boxes, images[0].det_boxes)
    np.testing.assert_array_equal(kept[1].det_scores, [0.6])
    fppi, s = froc(kept)  # the hit on the noisy lesion is now a false positive; 2 images
    np.testing.assert_allclose(fppi, [0, 0.5, 1.0])
    np.testing.assert_allclose(s, [1.0, 1.0, 1.0])
    fppi, s = froc(images)  # every lesion: 2 of 3 hit, then 2 false positives over 3 images
    np.testing.assert_allclose(fppi, [0, 1 / 3, 2 / 3])
    np.testing.assert_allclose(s, [2 / 3] * 3)
    with pytest.raises(ValueError, match="2 noisy flags for 1 lesions"):
        without_noisy_lesions(images[1:2], [[True, False]])


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
