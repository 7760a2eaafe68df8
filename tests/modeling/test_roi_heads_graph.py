"""GraphROIHeads on a tiny FPN-free setup: builds from a cfg, trains, infers, and switches off cleanly; at the
default widths the graph adds the same, bounded number of parameters to the FC head and to the FSD head."""
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import StandardROIHeads, build_roi_heads
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from fsd_d2.config import add_fsd_config, base_cfg
from fsd_d2.modeling.roi_heads import GraphROIHeads

SIZE = 64
INPUT_SHAPE = {"p2": ShapeSpec(channels=16, stride=4)}
EXAMPLE_HEAD = Path(__file__).resolve().parents[2] / "projects" / "DeepLesion" / "genotypes" / "example_head.yaml"
GRAPH_MAX_PARAMS = 1.1e6  # issue 11: the graph adds at most 1.1M parameters, the same on every box head


def tiny_cfg(graph: bool):
    cfg = get_cfg()
    add_fsd_config(cfg)
    cfg.MODEL.ROI_HEADS.NAME = "GraphROIHeads"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 8
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2"]
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 16
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # keep detections from an untrained head
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 1
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 32
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 4
    cfg.MODEL.GRAPH.ENABLED = graph
    cfg.MODEL.GRAPH.HIDDEN = 4
    cfg.MODEL.GRAPH.DIM = 16  # the 32 FC features pooled in pairs
    return cfg


def build(graph: bool, seed: int = 0):
    torch.manual_seed(seed)
    return build_roi_heads(tiny_cfg(graph), INPUT_SHAPE)


def random_boxes(n: int, gen: torch.Generator) -> Boxes:
    xy = torch.rand(n, 2, generator=gen) * (SIZE - 20)
    wh = 4 + torch.rand(n, 2, generator=gen) * 16
    return Boxes(torch.cat([xy, xy + wh], dim=1))


def inputs(counts, seed: int = 0):
    """Features of a batch of SIZE x SIZE images, proposals (``counts`` per image) and 2 GT lesions each."""
    gen = torch.Generator().manual_seed(seed)
    features = {"p2": torch.randn(len(counts), 16, SIZE // 4, SIZE // 4, generator=gen)}
    proposals, targets = [], []
    for n in counts:
        p = Instances((SIZE, SIZE))
        p.proposal_boxes = random_boxes(n, gen)
        p.objectness_logits = torch.randn(n, generator=gen)
        proposals.append(p)
        t = Instances((SIZE, SIZE))
        t.gt_boxes = random_boxes(2, gen)
        t.gt_classes = torch.randint(0, 8, (2,), generator=gen)
        targets.append(t)
    return features, proposals, targets


@pytest.mark.parametrize("train_on_pred_boxes", [False, True])
def test_builds_from_cfg_and_trains(train_on_pred_boxes):
    cfg = tiny_cfg(graph=True)
    cfg.MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES = train_on_pred_boxes
    heads = build_roi_heads(cfg, INPUT_SHAPE)
    assert isinstance(heads, GraphROIHeads)
    assert heads.box_predictor.cls_score.out_features == 9  # 8 lesion types + background
    heads.train()
    features, proposals, targets = inputs([10, 6])
    with EventStorage():
        sampled, losses = heads(None, features, proposals, targets)
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    sum(losses.values()).backward()
    assert heads.graph_cls_score.weight.grad.abs().sum() > 0  # the graph's logits are trained
    # As in StandardROIHeads, TRAIN_ON_PRED_BOXES hands later heads the regressed boxes instead of the inputs.
    given = torch.cat([proposals[0].proposal_boxes.tensor, targets[0].gt_boxes.tensor])
    is_given = (sampled[0].proposal_boxes.tensor[:, None] == given[None]).all(-1).any(-1)
    assert (~is_given if train_on_pred_boxes else is_given).all()


def test_inference_attaches_relations_of_the_kept_detections():
    heads = build(graph=True).eval()
    torch.nn.init.normal_(heads.graph_cls_score.weight, std=0.1)  # the graph now changes the scores
    # Zero box regression: each detection's box is its proposal's box, which tells us its proposal index.
    torch.nn.init.zeros_(heads.box_predictor.bbox_pred.weight)
    torch.nn.init.zeros_(heads.box_predictor.bbox_pred.bias)
    captured = []
    heads.graph.register_forward_hook(lambda m, args, out: captured.append(out[1]))
    features, proposals, _ = inputs([12, 0, 1])
    with torch.no_grad():
        instances, _ = heads(None, features, proposals)
    assert [len(i) > 0 for i in instances] == [True, False, True]
    for inst, prop, a_e in zip(instances, proposals, captured[0]):
        n = len(inst)
        assert inst.pred_relations.shape == (n, n)
        if n == 0:
            continue
        match = (inst.pred_boxes.tensor[:, None] - prop.proposal_boxes.tensor[None]).abs().sum(-1) < 1e-4
        idx = match.float().argmax(dim=1)
        assert match.any(dim=1).all()
        assert torch.equal(inst.pred_relations, a_e[idx][:, idx])


def test_graph_starts_from_the_plain_classifier():
    """Zero-initialised graph logits: loading a graph-free model gives it the same detections."""
    plain, graph = build(graph=False), build(graph=True, seed=1)
    missing, unexpected = graph.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("graph") for k in missing)
    features, proposals, _ = inputs([8, 5], seed=2)
    with torch.no_grad():
        a, _ = plain.eval()(None, features, proposals)
        b, _ = graph.eval()(None, features, proposals)
    for x, y in zip(a, b):
        assert torch.equal(x.pred_boxes.tensor, y.pred_boxes.tensor)
        torch.testing.assert_close(x.scores, y.scores)


@pytest.mark.parametrize("training", [True, False])
def test_disabled_is_standard_roi_heads(training):
    ours = build(graph=False)
    torch.manual_seed(0)
    standard = StandardROIHeads(tiny_cfg(False), INPUT_SHAPE)
    assert ours.graph is None and not any("graph" in k for k, _ in ours.named_parameters())
    assert list(ours.state_dict()) == list(standard.state_dict())
    features, proposals, targets = inputs([7, 4], seed=3)
    ours.train(training), standard.train(training)
    with EventStorage():
        torch.manual_seed(5)  # proposal sampling draws random numbers
        out_a = ours(None, features, [p[:] for p in proposals], targets)
        torch.manual_seed(5)
        out_b = standard(None, features, [p[:] for p in proposals], targets)
    if training:
        assert out_a[1].keys() == out_b[1].keys()
        assert all(torch.equal(out_a[1][k], out_b[1][k]) for k in out_a[1])
    else:
        for x, y in zip(out_a[0], out_b[0]):
            assert not x.has("pred_relations")
            assert torch.equal(x.scores, y.scores) and torch.equal(x.pred_boxes.tensor, y.pred_boxes.tensor)


def default_graph_heads(box_head: str) -> GraphROIHeads:
    """The 8-type ROI heads with the graph at the default widths (Base-RCNN-FPN's 256-channel p2-p5)."""
    cfg = base_cfg()
    cfg.MODEL.ROI_HEADS.NAME = "GraphROIHeads"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 8
    cfg.MODEL.GRAPH.ENABLED = True
    if box_head == "FSDBoxHead":  # as conf/model/fsd.yaml
        cfg.MODEL.ROI_BOX_HEAD.NAME, cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = "FSDBoxHead", 8
        cfg.MODEL.FSD.GENOTYPE_HEAD = str(EXAMPLE_HEAD)
    shapes = {f"p{i}": ShapeSpec(channels=cfg.MODEL.FPN.OUT_CHANNELS, stride=2 ** i) for i in range(2, 6)}
    return build_roi_heads(cfg, shapes)


def test_graph_adds_the_same_bounded_parameters_to_both_heads():
    fc, fsd = default_graph_heads("FastRCNNConvFCHead"), default_graph_heads("FSDBoxHead")
    assert (fc.graph.in_dim, fsd.graph.in_dim) == (1024, 7168)  # the features the graph reads differ 7x

    def graph_params(heads):
        return sum(p.numel() for name, p in heads.named_parameters() if name.startswith("graph"))

    assert graph_params(fc) == graph_params(fsd) <= GRAPH_MAX_PARAMS
    assert graph_params(fc) == 1024 * 1025 + 9 * 1025 + 3 * 24  # sigma, 9-way classifier part, relation maps
