"""FSD box heads in ``ROI_BOX_HEAD_REGISTRY``: the searchable 2-cell head and the derived 4-cell FSD head.

Both replace the baseline's two FC layers by DARTS cells over the pooled ROI features and return flat
per-ROI features, so Detectron2's ``FastRCNNOutputLayers`` (and the graph ROI heads) use them unchanged.
"""
from typing import List

import torch
import torch.nn as nn
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import ROI_BOX_HEAD_REGISTRY

from fsd_d2.errors import ConfigError
from fsd_d2.nas.cells import DerivedCell, PlannedCell, SearchCell, chain_cells
from fsd_d2.nas.genotype import Genotype, load_genotype
from fsd_d2.nas.ops import validate_pool
from fsd_d2.nas.searchable import CellAlphas, Searchable


def _check_resolution(input_shape: ShapeSpec) -> int:
    if input_shape.height % 2:
        raise ConfigError(
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
class FSDSearchBoxHead(Searchable, _CellHead):
    """Head search space: a searchable normal cell then a searchable reduction cell (``head13`` pool)."""

    CELL_TYPES = ("normal", "reduce")  # the cell types of its genotype

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, pool_name: str, pool: List[str], num_nodes: int, channels: int,
                 partial_channels: int = 1, batched_edges: bool = True):
        """
        Args:
            input_shape: the pooled ROI features (channels, even height).
            pool_name, pool: the operation pool; num_nodes: intermediate nodes per cell.
            channels: C of both cells; partial_channels: PC-DARTS' K (1 = off).
            batched_edges: evaluate the edges leaving a state together (see ``SearchCell``).
        """
        pool = validate_pool(pool, pool_name)

        def make(i, c_pp, c_p, reduction, reduction_prev):
            return SearchCell(pool, num_nodes, c_pp, c_p, channels, reduction=reduction,
                              reduction_prev=reduction_prev, partial_channels=partial_channels,
                              batched=batched_edges)

        super().__init__(chain_cells(make, input_shape.channels, [False, True]), _check_resolution(input_shape))
        self.arch = CellAlphas(pool_name, pool, num_nodes, cell_types=self.CELL_TYPES)

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        fsd = cfg.MODEL.FSD
        return dict(input_shape=input_shape, pool_name=fsd.HEAD_POOL_NAME, pool=list(fsd.HEAD_POOL),
                    num_nodes=fsd.NUM_NODES, channels=fsd.HEAD_CHANNELS, partial_channels=fsd.PARTIAL_CHANNELS,
                    batched_edges=fsd.BATCHED_EDGES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.arch.weights()
        return self._chain(x, [weights["normal"], weights["reduce"]])


@ROI_BOX_HEAD_REGISTRY.register()
class FSDBoxHead(_CellHead):
    """The derived 4-cell head: extra copies of the searched normal cell, then the searched normal and
    reduction cells (the paper's augmentation of the searched head). ``self.genotype`` is what checkpoints
    record and check."""

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, genotype: Genotype, channels: int, extra_normal_cells: int):
        """
        Args:
            input_shape: the pooled ROI features (channels, even height).
            genotype: the head search's genotype (``normal`` and ``reduce`` cells).
            channels: C of every cell; extra_normal_cells: copies of the normal cell before the searched pair.
        """
        plan = self.cell_plan(channels, extra_normal_cells)

        def make(i, c_pp, c_p, reduction, reduction_prev):
            return DerivedCell(genotype.cells[plan[i].cell_type], c_pp, c_p, plan[i].channels, reduction=reduction,
                               reduction_prev=reduction_prev)

        super().__init__(chain_cells(make, input_shape.channels, [cell.reduction for cell in plan]),
                         _check_resolution(input_shape))
        self.genotype = genotype

    @staticmethod
    def cell_plan(channels: int, extra_normal_cells: int) -> List[PlannedCell]:
        """The chain: the extra copies and the searched normal cell, then the reduction cell, all C = ``channels``."""
        return [*(PlannedCell(f"head.normal{k}", "normal", False, channels) for k in range(extra_normal_cells + 1)),
                PlannedCell("head.reduce", "reduce", True, channels)]

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        fsd = cfg.MODEL.FSD
        if not fsd.GENOTYPE_HEAD:
            raise ConfigError("FSDBoxHead needs model.genotype_head=<genotype_head.yaml> (written by "
                              "+stage=search_head), or a checkpoint=... that records it")
        genotype = load_genotype(fsd.GENOTYPE_HEAD, pool_ops=list(fsd.HEAD_POOL) or None,
                                 model_pool=fsd.HEAD_POOL_NAME or None, num_nodes=fsd.NUM_NODES,
                                 cell_types=["normal", "reduce"])
        return dict(input_shape=input_shape, genotype=genotype, channels=fsd.HEAD_CHANNELS,
                    extra_normal_cells=fsd.HEAD_EXTRA_NORMAL_CELLS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._chain(x)
