"""Where the cells of a derived FSD sit: per cell, its genotype cell, stride, width and input tensors.

The op-latency table (:mod:`fsd_d2.nas.latency`) is measured at these positions, for the network that is
deployed (inference on one image), so the positions follow :class:`~fsd_d2.modeling.backbone.FSDBackbone` and
:class:`~fsd_d2.modeling.box_head.FSDBoxHead` as the config builds them (tests/nas/test_latency.py checks them
against the built modules).
"""
from typing import List, Sequence, Tuple

from detectron2.config import CfgNode

from fsd_d2.nas.latency import CellPosition, Shape

_SIZE_DIVISIBILITY = 32  # the FSD backbone pads images to a multiple of 32


def _chain(cells: Sequence[Tuple[str, str, bool, int]], first: Shape, num_nodes: int) -> List[CellPosition]:
    """``cells`` = (name, cell type, reduction, C) in order; each cell reads the outputs of the two before it."""
    out, s0, s1, reduction_prev = [], first, first, False
    for name, cell_type, reduction, channels in cells:
        position = CellPosition(name, cell_type, reduction, reduction_prev, channels, (s0, s1))
        n, _, h, w = position.edge_shapes()[1][1]  # a node's shape: the cell's output resolution
        out.append(position)
        s0, s1, reduction_prev = s1, (n, channels * num_nodes, h, w), reduction
    return out


def backbone_positions(cfg: CfgNode) -> List[CellPosition]:
    """The derived backbone's cells on one ``dataset.short_side`` square image: per stage res3-res5,
    ``model.normal_cells_per_stage`` stride-1 copies of the searched cell, then the searched reduction cell."""
    fsd = cfg.MODEL.FSD
    size = -(-cfg.INPUT.SHORT_SIDE // _SIZE_DIVISIBILITY) * _SIZE_DIVISIBILITY
    per_stage = fsd.NORMAL_CELLS_PER_STAGE + 1
    cells = [(f"res{3 + i // per_stage}." + ("reduce" if i % per_stage == per_stage - 1 else f"normal{i % per_stage}"),
              "reduce", i % per_stage == per_stage - 1, fsd.BONE_CHANNELS * 2 ** (i // per_stage))
             for i in range(3 * per_stage)]
    res2 = (1, cfg.MODEL.RESNETS.RES2_OUT_CHANNELS, size // 4, size // 4)
    return _chain(cells, res2, fsd.NUM_NODES)


def head_positions(cfg: CfgNode) -> List[CellPosition]:
    """The derived box head's cells on one image's test proposals (``model.test_proposals`` ROIs of FPN
    features at ``model.pooler_resolution``): the extra and searched normal cells, then the reduction cell."""
    fsd = cfg.MODEL.FSD
    normals = fsd.HEAD_EXTRA_NORMAL_CELLS + 1
    cells = [(f"head.normal{k}", "normal", False, fsd.HEAD_CHANNELS) for k in range(normals)]
    cells.append(("head.reduce", "reduce", True, fsd.HEAD_CHANNELS))
    r = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
    rois = (cfg.MODEL.RPN.POST_NMS_TOPK_TEST, cfg.MODEL.FPN.OUT_CHANNELS, r, r)
    return _chain(cells, rois, fsd.NUM_NODES)


def cell_positions(cfg: CfgNode, kind: str) -> List[CellPosition]:
    """The cells whose ops the ``kind`` search (``bone`` or ``head``) chooses, in the derived FSD."""
    return {"bone": backbone_positions, "head": head_positions}[kind](cfg)
