"""The detection pictures (Fig. 3, and Fig. 4 with relations) are real PNGs and reject mismatched inputs."""
import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from fsd_d2.viz.detections import draw_detections, normalised_correlations

IMAGE = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
GT = np.array([[12.0, 11, 29, 31]])
PRED = torch.tensor([[10.0, 10, 30, 30], [50, 20, 70, 45], [80, 60, 100, 90]])
SCORES, CLASSES = torch.tensor([0.9, 0.7, 0.2]), torch.tensor([1, 3, 0])


def _changed(a: np.ndarray, b: np.ndarray) -> float:
    """Share of pixels that differ visibly between two PNGs."""
    return float((np.abs(a - b).max(axis=2) > 0.1).mean())


def test_draws_boxes_then_relation_lines(tmp_path):
    bare = mpimg.imread(draw_detections(IMAGE, [], np.zeros((0, 4)), [], [], str(tmp_path / "bare.png")))
    boxes = mpimg.imread(draw_detections(IMAGE, GT, PRED, SCORES, CLASSES, str(tmp_path / "sub" / "boxes.png"),
                                         class_names=[f"type{i}" for i in range(8)]))
    rel = torch.softmax(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)), dim=1)
    lines = mpimg.imread(draw_detections(IMAGE, GT, PRED, SCORES, CLASSES, str(tmp_path / "lines.png"),
                                         relations=rel, class_names=[f"type{i}" for i in range(8)]))
    assert bare.shape[:2] == boxes.shape[:2] == (512, 682)  # enlarged to a 512-px short side, aspect ratio kept
    assert _changed(boxes, bare) > 0.002  # boxes and labels were drawn over the slice
    assert _changed(lines, boxes) > 0.001  # and the relations added lines between the predictions


def _edge_pixels(png: np.ndarray, box, scale: float) -> np.ndarray:
    """RGB of the PNG's pixels along the four edges of ``box`` (image pixels, XYXY), in the enlarged picture."""
    x0, y0, x1, y1 = (round(v * scale) for v in box)
    xs, ys = np.arange(x0 + 3, x1 - 2), np.arange(y0 + 3, y1 - 2)  # clear of the corners (and the label)
    return np.concatenate([png[y0, xs], png[y1, xs], png[ys, x0], png[ys, x1]])[:, :3]


def test_drawn_boxes_have_their_colours(tmp_path):
    """Ground truth red, a confident prediction lime, on a black slice; a low-confidence one greyish white."""
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    png = mpimg.imread(draw_detections(image, [[8.0, 8, 24, 24]], [[32.0, 36, 56, 56], [34, 6, 58, 28]], [0.9, 0.2],
                                       [0, 0], str(tmp_path / "c.png"), class_names=["lesion"]))
    scale = png.shape[0] / 64
    red, lime, faint = (_edge_pixels(png, box, scale) for box in ([8, 8, 24, 24], [32, 36, 56, 56], [34, 6, 58, 28]))
    np.testing.assert_allclose(np.median(red, axis=0), [1, 0, 0], atol=0.05)
    np.testing.assert_allclose(np.median(lime, axis=0), [0, 1, 0], atol=0.05)
    np.testing.assert_allclose(np.median(faint, axis=0), [0.5, 0.5, 0.5], atol=0.1)  # white at alpha 0.5 on black
    inside = png[round(12 * scale):round(20 * scale), round(12 * scale):round(20 * scale), :3]
    assert inside.max() < 0.05  # boxes are outlines: the slice shows through


def test_no_predictions_still_draws(tmp_path):
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    out = draw_detections(image, [], np.zeros((0, 4)), [], [], str(tmp_path / "e.png"), relations=np.zeros((0, 0)))
    assert mpimg.imread(out).shape[:2] == (512, 512)


def test_correlations_are_symmetric_in_unit_range():
    s = normalised_correlations(np.array([[0.5, 0.1, 0.4], [0.3, 0.2, 0.5], [0.2, 0.2, 0.6]]))
    off = s[~np.eye(3, dtype=bool)]
    assert np.allclose(s, s.T) and off.min() == 0.0 and off.max() == 1.0


def test_rejects_mismatched_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"\(2, 2\) relations"):
        draw_detections(np.zeros((32, 32, 3), np.uint8), [], np.zeros((2, 4)), [0.9, 0.8], [0, 1],
                        str(tmp_path / "x.png"), relations=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="2 pred_boxes need 2 scores"):
        draw_detections(np.zeros((32, 32, 3), np.uint8), [], np.zeros((2, 4)), [0.9], [0, 1], str(tmp_path / "y.png"))
