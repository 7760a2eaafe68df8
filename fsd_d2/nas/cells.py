"""DARTS cells: the search cell (every edge a softmax-weighted mixed op) and the cell derived from a genotype.

A cell reads the outputs of the two previous cells (``s0`` = c_{k-2}, ``s1`` = c_{k-1}), brings both to ``C``
channels at one resolution, computes ``num_nodes`` intermediate nodes (node i sums one edge from each of its
2 + i predecessors) and returns their concatenation (``C * num_nodes`` channels). In a reduction cell the edges
leaving the two inputs have stride 2. Edges are numbered node by node, inputs in order: (node 0, input 0),
(node 0, input 1), (node 1, input 0), ... — the row order of the alpha matrices. :func:`chain_cells` wires
cells into a network the same way: each cell reads the outputs of the two cells before it.

A search cell evaluates its edges one of two ways with the same result: by default the edges leaving each state
together, the two inputs' as one group (:class:`StateEdges`, each op one batched call for all of them, the step
about half the operator calls: ``benchmarks/search_cost.py``), or every edge on its own (:class:`MixedOp`,
``batched=False``), the plain DARTS form the batched one is tested against.
"""
from __future__ import annotations

import functools
import operator
from typing import Iterable, List, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fsd_d2.errors import ConfigError
from fsd_d2.nas.batched_ops import SharedInput, build_batched
from fsd_d2.nas.genotype import CellGenotype, check_cell, num_edges
from fsd_d2.nas.ops import OPS, FactorizedReduce, ReLUConvBN

__all__ = ["MixedOp", "StateEdges", "SearchCell", "DerivedCell", "PlannedCell", "chain_cells", "num_edges",
           "channel_shuffle"]


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
        _check_partial(C, partial_channels)
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


class StateEdges(nn.Module):
    """The search edges leaving ``sources`` states, ``copies`` from each, evaluated together:
    ``forward(x, weights)`` with ``x`` the states side by side ``(N, sources * C, H, W)`` and ``weights`` the edges'
    rows of the softmaxed alphas ((sources * copies) x len(pool), source by source) returns ``(N, sources * copies,
    C, H', W')``, each edge equal to ``MixedOp(...)(state, weights[edge])`` with the same weights (see
    :mod:`fsd_d2.nas.batched_ops`).

    Each op is one call for all the edges. The ops that end in a BN without affine (all but the identity and ops
    without a batched form) are put side by side before it and normalised by one BN whose per-channel scale is
    the alpha weight of the op and edge, ``w * BN(y)``: the BNs and the weighting of the mixture become one call,
    the sum over ops another. Partial channels work as in :class:`MixedOp`, the bypassed channels shared by a
    state's edges.
    """

    def __init__(self, C: int, stride: int, pool: Sequence[str], sources: int, copies: int,
                 partial_channels: int = 1):
        super().__init__()
        _check_partial(C, partial_channels)
        self.k, self.sources, self.copies = partial_channels, sources, copies
        nonzero = [i for i, name in enumerate(pool) if name != "none"]
        ops = {i: build_batched(pool[i], C // self.k, stride, sources, copies) for i in nonzero}
        self._normed = [i for i in nonzero if ops[i].pre_norm]  # pool columns of the ops under the shared BN
        self._direct = [i for i in nonzero if not ops[i].pre_norm]
        self.ops = nn.ModuleList(ops[i] for i in self._normed + self._direct)
        edge_channels = sources * copies * (C // self.k)
        self.norm = WeightedBatchNorm(len(self._normed) * edge_channels) if self._normed else None
        self.register_buffer("_normed_columns", torch.tensor(self._normed, dtype=torch.long), persistent=False)
        self.bypass = nn.MaxPool2d(2, 2, ceil_mode=True) if stride == 2 else nn.Identity()

    def _mix(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``(N, sources, copies, C, H', W')``: every edge's weighted sum over the ops."""
        inputs = SharedInput(x, self.sources, self.copies)
        outputs = [op(inputs) for op in self.ops]
        total = None
        if self._normed:
            normed = torch.cat(outputs[:len(self._normed)], dim=1)
            # the BN's scale of channel (op o, edge e, c) is w[e, o]
            scale = weights.index_select(1, self._normed_columns).t().unsqueeze(-1)
            scale = scale.expand(-1, -1, normed.shape[1] // scale.numel()).flatten()
            mixed = self.norm(normed, scale)
            total = mixed.unflatten(1, (len(self._normed), self.sources, self.copies, -1)).sum(1)
        for i, y in zip(self._direct, outputs[len(self._normed):]):
            w = weights[:, i].view(self.sources, self.copies, 1, 1, 1)
            total = y * w if total is None else torch.addcmul(total, y, w)
        return total

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.k == 1:
            return self._mix(x, weights).flatten(1, 2)
        states = x.unflatten(1, (self.sources, -1))
        active, passive = torch.split(states, [states.shape[2] // self.k, states.shape[2] - states.shape[2] // self.k],
                                      dim=2)
        mixed = self._mix(active.flatten(1, 2), weights)
        passive = self.bypass(passive.flatten(1, 2)).unflatten(1, (self.sources, 1, -1))
        both = torch.cat([mixed, passive.expand(-1, -1, self.copies, -1, -1, -1)], dim=3)
        # channel_shuffle of every edge's channels at once
        return both.unflatten(3, (self.k, -1)).transpose(3, 4).flatten(3, 4).flatten(1, 2)


class WeightedBatchNorm(nn.BatchNorm2d):
    """BatchNorm without learned affine whose output channels are scaled by a given ``scale``: ``scale * BN(x)``
    in one call (the scale is BN's affine weight), with the running statistics of a plain BN."""

    def __init__(self, channels: int):
        super().__init__(channels, affine=False)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, scale, None, self.training, self.momentum,
                            self.eps)


def _check_partial(C: int, partial_channels: int) -> None:
    if C % partial_channels:
        raise ConfigError(f"search edge: {C} channels cannot be split into 1/{partial_channels} partial channels; "
                          "choose model.partial_channels dividing the cell channels")


def _preprocess(C_prev_prev: int, C_prev: int, C: int, reduction_prev: bool, affine: bool):
    """1x1 ReLU-Conv-BN to C channels; c_{k-2} is also halved when c_{k-1} came from a reduction cell."""
    pre0 = (FactorizedReduce(C_prev_prev, C, affine) if reduction_prev
            else ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine))
    return pre0, ReLUConvBN(C_prev, C, 1, 1, 0, affine)


class SearchCell(nn.Module):
    """A DARTS search cell over ``pool``; ``forward(s0, s1, weights)`` with ``weights`` the softmaxed alphas
    of shape (num_edges(num_nodes), len(pool)). The alphas live outside (shared by the cells of one type).

    ``batched`` (``model.batched_edges``): evaluate the edges leaving each state together (:class:`StateEdges`);
    off, each edge is its own :class:`MixedOp`. Both compute the same; the parameters are laid out differently.
    """

    def __init__(self, pool: Sequence[str], num_nodes: int, C_prev_prev: int, C_prev: int, C: int,
                 reduction: bool, reduction_prev: bool, partial_channels: int = 1, batched: bool = True):
        super().__init__()
        self.reduction, self.num_nodes, self.num_ops = reduction, num_nodes, len(pool)
        self.preprocess0, self.preprocess1 = _preprocess(C_prev_prev, C_prev, C, reduction_prev, affine=False)
        self.out_channels, self.batched = C * num_nodes, batched
        if not batched:
            self.edges = nn.ModuleList(MixedOp(C, 2 if reduction and j < 2 else 1, pool, partial_channels)
                                       for i in range(num_nodes) for j in range(2 + i))
            return
        # The cell's two inputs exist together, so their edges run as one StateEdges; then node i's output (state
        # 2 + i) feeds nodes i + 1 .. num_nodes - 1. Edge (node i, input j) is row num_edges(i) + j of the alphas.
        self._state_groups = [(0, 1)] + [(j,) for j in range(2, num_nodes + 1)]
        self.state_edges = nn.ModuleList()
        for g, states in enumerate(self._state_groups):
            nodes = range(max(states[0] - 1, 0), num_nodes)  # the nodes each state of the group feeds
            self.state_edges.append(StateEdges(C, 2 if reduction and states[0] < 2 else 1, pool, len(states),
                                               len(nodes), partial_channels))
            rows = torch.tensor([num_edges(i) + j for j in states for i in nodes])
            self.register_buffer(f"_rows{g}", rows, persistent=False)

    def _check(self, weights: torch.Tensor) -> None:
        expected = (num_edges(self.num_nodes), self.num_ops)
        if tuple(weights.shape) != expected:
            raise ValueError(f"SearchCell: weights have shape {tuple(weights.shape)}, expected {expected} "
                             "(edges x operations of the pool)")

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        self._check(weights)
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        if not self.batched:
            return self._forward_by_edge(states, weights)
        incoming = [[] for _ in range(self.num_nodes)]  # node i's terms, by input in order
        for g, (states_in, edges) in enumerate(zip(self._state_groups, self.state_edges)):
            x = torch.cat([states[j] for j in states_in], dim=1) if len(states_in) > 1 else states[states_in[0]]
            terms = iter(edges(x, weights.index_select(0, getattr(self, f"_rows{g}"))).unbind(1))
            for j in states_in:
                for i in range(max(j - 1, 0), self.num_nodes):
                    incoming[i].append(next(terms))
            states.append(_add(incoming[states_in[-1] - 1]))  # the group's last state completes that node's inputs
        return torch.cat(states[2:], dim=1)

    def _forward_by_edge(self, states: List[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
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
