"""``GraphROIHeads``: Detectron2's standard ROI heads plus the region-aware graph module (paper III-D).

Where the graph sits: after the box head, as a second input of the (num_classes + 1)-way classifier::

    box head -> H --+----------------------> cls_score(H) ------------+--> class logits (sum)
                    +--> graph --> X_e (D) --> graph_cls_score(X_e) --+
                    +----------------------> bbox_pred(H) --------------> box deltas

i.e. logits = W [H; X_e] + b, a classifier over the head features and the graph's. The paper says both
"after the 9-class classifier" and, in its implementation paragraph, that the graph takes the N x D features
the detection head extracts (D e.g. 1024) and its encoded relations "help the lesion classification"; Fig. 4
speaks of relations "over their classification features". We follow the latter: after the classifier there
are only 9 scores per proposal, so A = XXᵀ would relate proposals by their predicted class alone and σ would
be a 9 x 9 map, whereas the classifier's input features carry what the relations are about. Box regression
is untouched (the paper uses the graph for classification).

``graph_cls_score`` starts at zero, so a graph model computes exactly what the graph-free model with the same
weights computes: a model fine-tuned with the graph starts from the same detector as the no-graph ablation,
and the graph's contribution grows only as far as it helps (its other parameters get gradients once
``graph_cls_score`` has moved off zero, after the first step). Any box head whose ``output_shape`` describes
flat features works (the FC head, the FSD cell heads); the graph's parameters are the same on all of them
(``fsd_d2.modeling.graph``).

At inference every image's ``Instances`` gets ``pred_relations``: the (N_det x N_det) sub-matrix of A_e
between its final detections (row/column i = detection i), which is what Fig. 4 draws. It is an Instances
field rather than a side list so it travels with the detections (``.to()``, ``outputs[i]["instances"]``);
row i stays with detection i under any later filtering, but a filter that drops detections (Detectron2's
``detector_postprocess`` drops boxes that became empty) leaves the columns in the pre-filter order.
"""
from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference
from detectron2.structures import Boxes, Instances
from torch import nn

from fsd_d2.modeling.graph import RegionGraph


@ROI_HEADS_REGISTRY.register()
class GraphROIHeads(StandardROIHeads):
    """StandardROIHeads whose classification also sees the other proposals of the same image.

    With ``MODEL.GRAPH.ENABLED`` False no graph parameter exists and the heads are StandardROIHeads.
    """

    @configurable
    def __init__(self, *, graph: Optional[RegionGraph] = None, **kwargs):
        """
        Args:
            graph: the region-aware graph module over the box head's flat features, or None for none; its
                ``dim``-wide output feeds a zero-initialised classifier part ``graph_cls_score``.
            kwargs: StandardROIHeads' arguments.
        """
        super().__init__(**kwargs)
        self.graph = graph
        if graph is not None:
            self.graph_cls_score = nn.Linear(graph.dim, self.box_predictor.cls_score.out_features)
            nn.init.zeros_(self.graph_cls_score.weight)
            nn.init.zeros_(self.graph_cls_score.bias)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        if cfg.MODEL.GRAPH.ENABLED:
            shape = ret["box_head"].output_shape
            dim = shape.channels * (shape.height or 1) * (shape.width or 1)
            ret["graph"] = RegionGraph(dim, cfg.MODEL.GRAPH.DIM, cfg.MODEL.GRAPH.HIDDEN)
        return ret

    def _forward_box(self, features: Dict[str, torch.Tensor], proposals: List[Instances]):
        """As StandardROIHeads._forward_box, with graph-refined class logits: losses in training,
        ``Instances`` with ``pred_relations`` at inference."""
        if self.graph is None:
            return super()._forward_box(features, proposals)
        features = [features[f] for f in self.box_in_features]
        box_features = self.box_pooler(features, [x.proposal_boxes for x in proposals])
        box_features = torch.flatten(self.box_head(box_features), start_dim=1)
        scores, deltas = self.box_predictor(box_features)
        x_e, relations = self.graph(box_features, [len(p) for p in proposals])
        predictions = (scores + self.graph_cls_score(x_e), deltas)
        del box_features, x_e

        if not self.training:
            return self._inference_with_relations(predictions, proposals, relations)
        losses = self.box_predictor.losses(predictions, proposals)
        # proposals is modified in place below, so the losses come first (as in StandardROIHeads).
        if self.train_on_pred_boxes:
            with torch.no_grad():
                pred_boxes = self.box_predictor.predict_boxes_for_gt_classes(predictions, proposals)
                for proposals_per_image, pred_boxes_per_image in zip(proposals, pred_boxes):
                    proposals_per_image.proposal_boxes = Boxes(pred_boxes_per_image)
        return losses

    def _inference_with_relations(self, predictions, proposals: List[Instances],
                                  relations: List[torch.Tensor]) -> List[Instances]:
        """``box_predictor.inference`` (score filter, NMS, top-k) keeping the proposal index of each detection,
        so the A_e entries between the kept detections can be attached."""
        predictor = self.box_predictor
        boxes = predictor.predict_boxes(predictions, proposals)
        probs = predictor.predict_probs(predictions, proposals)
        instances, kept = fast_rcnn_inference(
            boxes, probs, [x.image_size for x in proposals],
            predictor.test_score_thresh, predictor.test_nms_thresh, predictor.test_topk_per_image)
        for inst, b, p, k, rel in zip(instances, boxes, probs, kept, relations):
            # fast_rcnn_inference indexes the proposals that remain after it drops non-finite rows.
            rows = (torch.isfinite(b).all(dim=1) & torch.isfinite(p).all(dim=1)).nonzero()[:, 0][k]
            inst.pred_relations = rel[rows][:, rows]
        return instances
