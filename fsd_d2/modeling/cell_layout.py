"""Where the cells of a derived FSD sit: per cell, its genotype cell, stride, width and input tensors.

The op-latency table (:mod:`fsd_d2.nas.latency`) is measured at these positions, for the network that is
deployed (inference on one image). The positions follow the ``cell_plan`` that
:class:`~fsd_d2.modeling.backbone.FSDBackbone` and :class:`~fsd_d2.modeling.box_head.FSDBoxHead` build their
cells from, with the shapes the config gives them (tests/nas/test_latency.py checks them against the built modules).
"""
from typing import List, Sequence

from detectron2.config import CfgNode

from fsd_d2.modeling.backbone import FSDBackbone
from fsd_d2.modeling.box_head import FSDBoxHead
from fsd_d2.nas.cells import PlannedCell
from fsd_d2.nas.latency import CellPosition, Shape

_SIZE_DIVISIBILITY = 32  # the FSD backbone pads images to a multiple of 32


def _chain(plan: Sequence[PlannedCell], first: Shape, num_nodes: int) -> List[CellPosition]:
    """The shapes along a module's cell plan; each cell reads the outputs of the two before it."""
    out, s0, s1, reduction_prev = [], first, first, False
    for name, cell_type, reduction, channels in plan:
        position = CellPosition(name, cell_type, reduction, reduction_prev, channels, (s0, s1))
        n, _, h, w = position.edge_shapes()[1][1]  # a node's shape: the cell's output resolution
        out.append(position)
        s0, s1, reduction_prev = s1, (n, channels * num_nodes, h, w), reduction
    return out


def backbone_positions(cfg: CfgNode) -> List[CellPosition]:
    """The derived backbone's cells (:meth:`FSDBackbone.cell_plan`) on one ``dataset.short_side`` square image."""
    fsd = cfg.MODEL.FSD
    size = -(-cfg.INPUT.SHORT_SIDE // _SIZE_DIVISIBILITY) * _SIZE_DIVISIBILITY
    res2 = (1, cfg.MODEL.RESNETS.RES2_OUT_CHANNELS, size // 4, size // 4)
    return _chain(FSDBackbone.cell_plan(fsd.BONE_CHANNELS, fsd.NORMAL_CELLS_PER_STAGE), res2, fsd.NUM_NODES)


def head_positions(cfg: CfgNode) -> List[CellPosition]:
    """The derived box head's cells (:meth:`FSDBoxHead.cell_plan`) on one image's test proposals
    (``model.test_proposals`` ROIs of FPN features at ``model.pooler_resolution``)."""
    fsd = cfg.MODEL.FSD
    r = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
    rois = (cfg.MODEL.RPN.POST_NMS_TOPK_TEST, cfg.MODEL.FPN.OUT_CHANNELS, r, r)
    return _chain(FSDBoxHead.cell_plan(fsd.HEAD_CHANNELS, fsd.HEAD_EXTRA_NORMAL_CELLS), rois, fsd.NUM_NODES)


def cell_positions(cfg: CfgNode, kind: str) -> List[CellPosition]:
    """The cells whose ops the ``kind`` search (``bone`` or ``head``) chooses, in the derived FSD."""
    return {"bone": backbone_positions, "head": head_positions}[kind](cfg)
