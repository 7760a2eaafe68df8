"""FSD box heads in ``ROI_BOX_HEAD_REGISTRY``: the searchable 2-cell head and the derived 4-cell FSD head.

Both replace the baseline's two FC layers by DARTS cells over the pooled ROI features and return flat
per-ROI features, so Detectron2's ``FastRCNNOutputLayers`` (and the graph ROI heads) use them unchanged.
"""
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import ROI_BOX_HEAD_REGISTRY

from fsd_d2.modeling.backbone import chain_cells, new_alphas
from fsd_d2.nas.cells import DerivedCell, SearchCell
from fsd_d2.nas.genotype import load_genotype
from fsd_d2.nas.ops import validate_pool


def _check_resolution(input_shape: ShapeSpec) -> int:
    if input_shape.height % 2:
        raise ValueError(
            f"FSD box heads halve the pooled ROI features once, so the pooler resolution must be even (got "
            f"{input_shape.height}); set model.pooler_resolution=8")
    return input_shape.height // 2


class _CellHead(nn.Module):
    """Runs ``cells`` as a DARTS chain (each cell sees the two previous outputs) and flattens the result."""

    def __init__(self, cells: nn.ModuleList, out_resolution: int):
        super().__init__()
        self.cells = cells
        self._output_size = cells[-1].out_channels * out_resolution ** 2

    @property
    def output_shape(self) -> ShapeSpec:
        return ShapeSpec(channels=self._output_size)

    def _chain(self, x: torch.Tensor, weights: List[torch.Tensor] = None) -> torch.Tensor:
        s0 = s1 = x
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, (cell(s0, s1) if weights is None else cell(s0, s1, weights[i]))
        return torch.flatten(s1, start_dim=1)


@ROI_BOX_HEAD_REGISTRY.register()
class FSDSearchBoxHead(_CellHead):
    """Head search space: a searchable normal cell then a searchable reduction cell (``head13`` pool)."""

    def __init__(self, cfg, input_shape: ShapeSpec):
        fsd = cfg.MODEL.FSD
        pool = validate_pool(list(fsd.HEAD_POOL), fsd.HEAD_POOL_NAME)

        def make(i, c_pp, c_p, reduction, reduction_prev):
            return SearchCell(pool, fsd.NUM_NODES, c_pp, c_p, fsd.HEAD_CHANNELS, reduction=reduction,
                              reduction_prev=reduction_prev, partial_channels=fsd.PARTIAL_CHANNELS)

        super().__init__(chain_cells(make, input_shape.channels, [False, True]), _check_resolution(input_shape))
        self.alphas_normal = new_alphas(fsd.NUM_NODES, pool)
        self.alphas_reduce = new_alphas(fsd.NUM_NODES, pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = [F.softmax(self.alphas_normal, dim=-1), F.softmax(self.alphas_reduce, dim=-1)]
        return self._chain(x, weights)


@ROI_BOX_HEAD_REGISTRY.register()
class FSDBoxHead(_CellHead):
    """The derived 4-cell head: extra copies of the searched normal cell, then the searched normal and
    reduction cells (the paper's augmentation of the searched head)."""

    def __init__(self, cfg, input_shape: ShapeSpec):
        fsd = cfg.MODEL.FSD
        if not fsd.GENOTYPE_HEAD:
            raise ValueError("FSDBoxHead needs model.genotype_head=<genotype_head.yaml> (written by +stage=search_head)")
        genotype = load_genotype(fsd.GENOTYPE_HEAD, pool_ops=list(fsd.HEAD_POOL) or None, num_nodes=fsd.NUM_NODES,
                                 cell_types=["normal", "reduce"])
        normal, reduce = genotype.cells["normal"], genotype.cells["reduce"]

        def make(i, c_pp, c_p, reduction, reduction_prev):
            return DerivedCell(reduce if reduction else normal, c_pp, c_p, fsd.HEAD_CHANNELS, reduction=reduction,
                               reduction_prev=reduction_prev)

        kinds = [False] * (fsd.HEAD_EXTRA_NORMAL_CELLS + 1) + [True]
        super().__init__(chain_cells(make, input_shape.channels, kinds), _check_resolution(input_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._chain(x)
