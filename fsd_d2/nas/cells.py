"""DARTS cells: the search cell (every edge a softmax-weighted mixed op) and the cell derived from a genotype.

A cell reads the outputs of the two previous cells (``s0`` = c_{k-2}, ``s1`` = c_{k-1}), brings both to ``C``
channels at one resolution, computes ``num_nodes`` intermediate nodes (node i sums one edge from each of its
2 + i predecessors) and returns their concatenation (``C * num_nodes`` channels). In a reduction cell the edges
leaving the two inputs have stride 2. Edges are numbered node by node, inputs in order: (node 0, input 0),
(node 0, input 1), (node 1, input 0), ... — the row order of the alpha matrices. :func:`chain_cells` wires
cells into a network the same way: each cell reads the outputs of the two cells before it.
"""
from __future__ import annotations

import functools
import operator
from typing import Iterable, List, NamedTuple, Sequence

import torch
from torch import nn

from fsd_d2.errors import ConfigError
from fsd_d2.nas.genotype import CellGenotype, check_cell, num_edges
from fsd_d2.nas.ops import OPS, FactorizedReduce, ReLUConvBN

__all__ = ["MixedOp", "SearchCell", "DerivedCell", "PlannedCell", "chain_cells", "num_edges", "channel_shuffle"]


def _add(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """The sum of the terms without ``sum``'s leading ``0 +`` (one pass over a feature map less per node)."""
    return functools.reduce(operator.add, terms)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave ``groups`` channel groups (ShuffleNet), so the next partial-channel edge samples new channels."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class MixedOp(nn.Module):
    """One search edge: sum_o w_o * o(x) over the pool's operations (BN without affine, as in DARTS).

    ``partial_channels=K > 1`` is PC-DARTS' partial channel connection: only the first C/K channels go through
    the operations, the rest bypass them (max-pooled at stride 2) and a channel shuffle mixes the two parts.
    This cuts the search's memory by about K. PC-DARTS' edge normalisation is not used.

    ``none`` is not run: its output is zero, so its term adds nothing to the sum or to any gradient (its weight
    still takes its share of the softmax).
    """

    def __init__(self, C: int, stride: int, pool: Sequence[str], partial_channels: int = 1):
        super().__init__()
        if C % partial_channels:
            raise ConfigError(f"MixedOp: {C} channels cannot be split into 1/{partial_channels} partial channels; "
                              "choose model.partial_channels dividing the cell channels")
        self.k = partial_channels
        self.ops = nn.ModuleList(OPS[name](C // self.k, stride, False) for name in pool)
        self._nonzero = [i for i, name in enumerate(pool) if name != "none"]
        self.bypass = nn.MaxPool2d(2, 2, ceil_mode=True) if stride == 2 else nn.Identity()

    def _mix(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return _add(weights[i] * self.ops[i](x) for i in self._nonzero)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.k == 1:
            return self._mix(x, weights)
        active, passive = torch.split(x, [x.shape[1] // self.k, x.shape[1] - x.shape[1] // self.k], dim=1)
        mixed = self._mix(active, weights)
        return channel_shuffle(torch.cat([mixed, self.bypass(passive)], dim=1), self.k)


def _preprocess(C_prev_prev: int, C_prev: int, C: int, reduction_prev: bool, affine: bool):
    """1x1 ReLU-Conv-BN to C channels; c_{k-2} is also halved when c_{k-1} came from a reduction cell."""
    pre0 = (FactorizedReduce(C_prev_prev, C, affine) if reduction_prev
            else ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine))
    return pre0, ReLUConvBN(C_prev, C, 1, 1, 0, affine)


class SearchCell(nn.Module):
    """A DARTS search cell over ``pool``; ``forward(s0, s1, weights)`` with ``weights`` the softmaxed alphas
    of shape (num_edges(num_nodes), len(pool)). The alphas live outside (shared by the cells of one type)."""

    def __init__(self, pool: Sequence[str], num_nodes: int, C_prev_prev: int, C_prev: int, C: int,
                 reduction: bool, reduction_prev: bool, partial_channels: int = 1):
        super().__init__()
        self.reduction, self.num_nodes, self.num_ops = reduction, num_nodes, len(pool)
        self.preprocess0, self.preprocess1 = _preprocess(C_prev_prev, C_prev, C, reduction_prev, affine=False)
        self.edges = nn.ModuleList(MixedOp(C, 2 if reduction and j < 2 else 1, pool, partial_channels)
                                   for i in range(num_nodes) for j in range(2 + i))
        self.out_channels = C * num_nodes

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        expected = (len(self.edges), self.num_ops)
        if tuple(weights.shape) != expected:
            raise ValueError(f"SearchCell: weights have shape {tuple(weights.shape)}, expected {expected} "
                             "(edges x operations of the pool)")
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self.num_nodes):
            node = _add(self.edges[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
            offset += len(states)
            states.append(node)
        return torch.cat(states[2:], dim=1)


class DerivedCell(nn.Module):
    """The discrete cell of a genotype (ops with affine BN); ``forward(s0, s1)``, same I/O as SearchCell.
    The output concatenates every intermediate node, as DARTS' derived networks do."""

    def __init__(self, genotype_cell: CellGenotype, C_prev_prev: int, C_prev: int, C: int, reduction: bool,
                 reduction_prev: bool):
        super().__init__()
        genotype_cell = check_cell(genotype_cell, "DerivedCell genotype", list(OPS), "OPS (all registered)")
        self.reduction = reduction
        self.preprocess0, self.preprocess1 = _preprocess(C_prev_prev, C_prev, C, reduction_prev, affine=True)
        self.inputs = [[j for _, j in node] for node in genotype_cell.edges]
        self.ops = nn.ModuleList(nn.ModuleList(OPS[op](C, 2 if reduction and j < 2 else 1, True) for op, j in node)
                                 for node in genotype_cell.edges)
        self.out_channels = C * genotype_cell.num_nodes

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for ops, inputs in zip(self.ops, self.inputs):
            states.append(_add(op(states[j]) for op, j in zip(ops, inputs)))
        return torch.cat(states[2:], dim=1)


class PlannedCell(NamedTuple):
    """One cell of a derived network's chain, as its module plans it (read by the latency table too)."""
    name: str  # e.g. res3.normal0, head.reduce
    cell_type: str  # the genotype cell it is built from: normal or reduce
    reduction: bool
    channels: int  # C of its edges


def chain_cells(make_cell, c_in: int, reductions: List[bool]) -> nn.ModuleList:
    """Build a DARTS chain: cell i sees the outputs of cells i-2 and i-1 (both ``c_in`` channels at the start).

    ``make_cell(i, c_prev_prev, c_prev, reduction, reduction_prev)`` returns cell i.
    """
    cells = nn.ModuleList()
    c_pp, c_p, reduction_prev = c_in, c_in, False
    for i, reduction in enumerate(reductions):
        cell = make_cell(i, c_pp, c_p, reduction, reduction_prev)
        cells.append(cell)
        c_pp, c_p, reduction_prev = c_p, cell.out_channels, reduction
    return cells
