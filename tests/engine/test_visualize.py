"""The visualize stage keeps each drawn detection's relations to the other drawn detections."""
import torch
from detectron2.structures import Boxes, Instances

from fsd_d2.engine.visualize import top_detections


def test_top_detections_cut_relations_on_both_axes():
    inst = Instances((64, 64))
    inst.pred_boxes = Boxes(torch.arange(16, dtype=torch.float32).view(4, 4))
    inst.scores = torch.tensor([0.25, 0.75, 0.125, 0.5])  # exact in float32
    inst.pred_relations = torch.arange(16, dtype=torch.float32).view(4, 4)  # entry (i, j) = 4i + j
    top = top_detections(inst, 2)
    assert top.scores.tolist() == [0.75, 0.5]
    assert top.pred_relations.tolist() == [[5.0, 7.0], [13.0, 15.0]]  # rows and columns of detections 1 and 3
    assert len(top_detections(inst, 10)) == 4
