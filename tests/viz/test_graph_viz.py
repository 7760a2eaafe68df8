"""The Fig. 4-style correlation drawing writes a real PNG and rejects mismatched inputs."""
import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from fsd_d2.viz.graph import draw_graph_correlations, normalised_correlations


def test_writes_png(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    pred = torch.tensor([[10.0, 10, 30, 30], [50, 20, 70, 45], [80, 60, 100, 90]])
    rel = torch.softmax(torch.randn(3, 3), dim=1)
    out = draw_graph_correlations(image, np.array([[12.0, 11, 29, 31]]), pred, torch.tensor([0.9, 0.7, 0.2]),
                                  torch.tensor([1, 3, 0]), rel, str(tmp_path / "sub" / "graph.png"),
                                  class_names=[f"type{i}" for i in range(8)])
    png = mpimg.imread(out)
    assert png.shape[:2] == (512, 682)  # enlarged to a 512-px short side, aspect ratio kept
    bare = mpimg.imread(draw_graph_correlations(image, [], np.zeros((0, 4)), [], [], np.zeros((0, 0)),
                                                str(tmp_path / "bare.png")))
    assert (np.abs(png - bare).max(axis=2) > 0.1).mean() > 0.002  # boxes and lines were drawn over the slice


def test_no_predictions_still_draws(tmp_path):
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    out = draw_graph_correlations(image, [], np.zeros((0, 4)), [], [], np.zeros((0, 0)), str(tmp_path / "e.png"))
    assert mpimg.imread(out).shape[:2] == (512, 512)


def test_correlations_are_symmetric_in_unit_range():
    s = normalised_correlations(np.array([[0.5, 0.1, 0.4], [0.3, 0.2, 0.5], [0.2, 0.2, 0.6]]))
    off = s[~np.eye(3, dtype=bool)]
    assert np.allclose(s, s.T) and off.min() == 0.0 and off.max() == 1.0


def test_rejects_a_relation_matrix_of_the_wrong_size(tmp_path):
    with pytest.raises(ValueError, match=r"\(2, 2\) relations"):
        draw_graph_correlations(np.zeros((32, 32, 3), np.uint8), [], np.zeros((2, 4)), [0.9, 0.8], [0, 1],
                                np.zeros((3, 2)), str(tmp_path / "x.png"))
