"""The candidate operations of all the edges leaving some search-cell states, each evaluated as one batched call.

In a DARTS search cell every state feeds an edge into each later node and every edge runs every op of the pool:
a cell of 4 nodes runs 14 copies of each op, each its own handful of small calls, and on a GPU such a step is
bound by launches, not arithmetic. The edges leaving one state share their input, and states that exist at the
same time (the cell's two inputs) can be put side by side along the channels, so all the copies of an op on the
edges leaving ``sources`` states, ``copies`` edges each, run as one call: a convolution grouped by source where
the op reads a state (``groups=sources``, ``copies * C`` outputs per group), one grouped by edge where it reads
per-edge features (``groups=sources * copies``), one BatchNorm over all the edges' channels (its statistics are
per channel, so it is one BatchNorm per edge). Channels are laid out source by source, edge by edge.

An op whose last layer is its BN (``pre_norm = True``) returns its output before that BN, ``(N, sources * copies
* C, H', W')``: the mixture (``cells.StateEdges``) puts every such op side by side and runs their BNs as one,
weighted by the alphas. Followed by a BN without affine, each equals ``sources * copies`` independent
``OPS[name](C, stride, affine=False)``, the weights of the copy on edge ``e`` of source ``s`` in output channels
``[(s * copies + e) * C', ...)`` of every weight (``tests/nas/test_batched_ops.py`` compares outputs and
gradients with the separate ops). The other ops return ``(N, sources, copies or 1, C, H', W')``: the identity
(the same for every edge) and :class:`SeparateCopies`, the form of an op without a batched one, so adding an
operation to ``OPS`` needs nothing here.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import nn

from fsd_d2.nas.ops import OPS


class SharedInput:
    """The states' features ``(N, sources * C, H, W)`` and what several ops derive from them (ReLU, the ReLU once
    per edge), each computed once for all the ops of the edges leaving them."""

    def __init__(self, x: torch.Tensor, sources: int, copies: int):
        self.x, self.sources, self.copies = x, sources, copies

    def by_source(self, y: torch.Tensor) -> torch.Tensor:
        """``(N, sources * C, ...)`` -> ``(N, sources, 1, C, ...)``: a state's tensor, broadcast over its edges."""
        return y.unflatten(1, (self.sources, 1, -1))

    def by_edge(self, y: torch.Tensor) -> torch.Tensor:
        """``(N, sources * copies * C, ...)`` -> ``(N, sources, copies, C, ...)`` (a view)."""
        return y.unflatten(1, (self.sources, self.copies, -1))

    def over_edges(self, y: torch.Tensor) -> torch.Tensor:
        """A state's tensor ``(N, sources * C, ...)`` seen by each of its edges: ``(N, sources, copies, C, ...)``."""
        return self.by_source(y).expand(-1, -1, self.copies, *[-1] * (y.dim() - 1))

    def to_edges(self, y: torch.Tensor) -> torch.Tensor:
        """A state's tensor copied to each of its edges: ``(N, sources * copies * C, ...)``."""
        return self.over_edges(y).flatten(1, 3)

    @functools.cached_property
    def relu(self) -> torch.Tensor:
        return F.relu(self.x)

    @functools.cached_property
    def relu_per_edge(self) -> torch.Tensor:
        """ReLU(x) once per edge, the input of depthwise convolutions with per-edge filters."""
        return self.to_edges(self.relu)


class BatchedReLUConvBN(nn.Module):
    """``ReLUConvBN`` (``conv_3x3``, ``dil_conv_*``) of every edge: one convolution grouped by source."""

    pre_norm = True

    def __init__(self, C: int, sources: int, copies: int, kernel: int, stride: int, padding: int, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(sources * C, sources * copies * C, kernel, stride, padding, dilation=dilation,
                              groups=sources, bias=False)

    def forward(self, inputs: SharedInput) -> torch.Tensor:
        return self.conv(inputs.relu)


class BatchedDepthwiseSeparableConv(nn.Module):
    """``dw_sep_conv_KxK`` of every edge: each edge's depthwise filters on its copy of ReLU(x), then a pointwise
    convolution grouped by edge."""

    pre_norm = True

    def __init__(self, C: int, sources: int, copies: int, kernel: int, stride: int):
        super().__init__()
        channels, edges = sources * copies * C, sources * copies
        self.depthwise = nn.Conv2d(channels, channels, kernel, stride, kernel // 2, groups=channels, bias=False)
        self.pointwise = nn.Conv2d(channels, channels, 1, groups=edges, bias=False)

    def forward(self, inputs: SharedInput) -> torch.Tensor:
        return self.pointwise(self.depthwise(inputs.relu_per_edge))


class BatchedFacConv(nn.Module):
    """``fac_conv_KxK`` of every edge: the 1 x K convolution reads the states (grouped by source), the K x 1 one
    each edge's features (grouped by edge)."""

    pre_norm = True

    def __init__(self, C: int, sources: int, copies: int, kernel: int, stride: int):
        super().__init__()
        pad, channels = kernel // 2, sources * copies * C
        self.conv_1xk = nn.Conv2d(sources * C, channels, (1, kernel), (1, stride), (0, pad), groups=sources,
                                  bias=False)
        self.conv_kx1 = nn.Conv2d(channels, channels, (kernel, 1), (stride, 1), (pad, 0), groups=sources * copies,
                                  bias=False)

    def forward(self, inputs: SharedInput) -> torch.Tensor:
        return self.conv_kx1(self.conv_1xk(inputs.relu))


class BatchedRes2Conv(nn.Module):
    """``res2conv_3x3`` of every edge (see ``ops.Res2Conv``). The channel groups of ReLU(x) and the first group's
    pass-through are the states'. At stride 1 the groups' convolutions run in turn, as Res2Net's: the first reads
    its group of the state (grouped by source), each later one its group plus that edge's previous output (grouped
    by edge). At stride 2 the groups are not linked, so every group of every edge is one convolution (grouped by
    source and group; its weights laid out source, group, edge) and one BN."""

    pre_norm = True

    def __init__(self, C: int, sources: int, copies: int, stride: int, scale: int = 4):
        super().__init__()
        scale = min(scale, C)
        width = C // scale
        self.stride, self.copies = stride, copies
        self.widths = [C - width * (scale - 1)] + [width] * (scale - 1)
        edges = sources * copies
        if stride == 1:
            self.first = nn.Identity()
            self.convs = nn.ModuleList(
                nn.Sequential(nn.Conv2d((sources if i == 0 else edges) * width, edges * width, 3, 1, 1,
                                        groups=sources if i == 0 else edges, bias=False),
                              nn.BatchNorm2d(edges * width, affine=False)) for i in range(scale - 1))
        else:
            self.first = nn.AvgPool2d(3, stride, 1, count_include_pad=False)
            linked = sources * (scale - 1)  # (source, group) pairs
            self.convs = nn.Sequential(nn.Conv2d(linked * width, linked * copies * width, 3, stride, 1, groups=linked,
                                                 bias=False),
                                       nn.BatchNorm2d(linked * copies * width, affine=False))
        self.fuse = nn.Sequential(nn.ReLU(inplace=False), nn.Conv2d(edges * C, edges * C, 1, groups=edges, bias=False))

    def forward(self, inputs: SharedInput) -> torch.Tensor:
        states = inputs.relu.unflatten(1, (inputs.sources, -1))
        first, rest = torch.split(states, [self.widths[0], sum(self.widths[1:])], dim=2)
        outs = [inputs.over_edges(self.first(first.flatten(1, 2)))]
        if self.stride == 1:
            prev = None
            for conv, g in zip(self.convs, torch.split(rest, self.widths[1:], dim=2)):
                prev = conv(g.flatten(1, 2) if prev is None else (inputs.by_edge(prev) + g.unsqueeze(2)).flatten(1, 3))
                outs.append(inputs.by_edge(prev))
        else:  # (N, source, group, edge, width) -> (N, source, edge, group * width)
            y = self.convs(rest.flatten(1, 2)).unflatten(1, (inputs.sources, len(self.widths) - 1, self.copies, -1))
            outs.append(y.transpose(2, 3).flatten(3, 4))
        return self.fuse(torch.cat(outs, dim=3).flatten(1, 3))


class BatchedFactorizedReduce(nn.Module):
    """``skip_connect`` at stride 2 (``ops.FactorizedReduce``) of every edge: both strided 1x1 convolutions read the
    states' ReLU (grouped by source), and each edge's two halves are put side by side."""

    pre_norm = True

    def __init__(self, C: int, sources: int, copies: int):
        super().__init__()
        self.conv1 = nn.Conv2d(sources * C, sources * copies * (C // 2), 1, stride=2, groups=sources, bias=False)
        self.conv2 = nn.Conv2d(sources * C, sources * copies * (C - C // 2), 1, stride=2, groups=sources, bias=False)

    def forward(self, inputs: SharedInput) -> torch.Tensor:
        x = inputs.relu
        shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        halves = torch.cat([inputs.by_edge(self.conv1(x)), inputs.by_edge(self.conv2(shifted))], dim=3)
        return halves.flatten(1, 3)


class Identity(nn.Module):
    """``skip_connect`` at stride 1: every edge's output is its state itself."""

    pre_norm = False

    def forward(self, inputs: SharedInput) -> torch.Tensor:
        return inputs.by_source(inputs.x)


class BatchedPool(nn.Module):
    """``avg_pool_3x3``/``max_pool_3x3`` (``ops.PoolBN`` before its BN): one pooling, given to every edge's BN."""

    pre_norm = True

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.pool = pool

    def forward(self, inputs: SharedInput) -> torch.Tensor:
        return inputs.to_edges(self.pool(inputs.x))


class SeparateCopies(nn.Module):
    """An op without a batched form: one ``OPS[name]`` per edge, each on its state, stacked."""

    pre_norm = False

    def __init__(self, name: str, C: int, sources: int, copies: int, stride: int):
        super().__init__()
        self.copies = copies
        self.ops = nn.ModuleList(OPS[name](C, stride, False) for _ in range(sources * copies))

    def forward(self, inputs: SharedInput) -> torch.Tensor:
        states = inputs.x.unflatten(1, (inputs.sources, -1)).unbind(1)
        outputs = [op(states[i // self.copies]) for i, op in enumerate(self.ops)]
        return torch.stack(outputs, dim=1).unflatten(1, (inputs.sources, self.copies))


BatchedFactory = Callable[[int, int, int, int], nn.Module]

# name -> (C, stride, sources, copies) -> module: the OPS of that name on the edges leaving ``sources`` states.
BATCHED_OPS: Dict[str, BatchedFactory] = {
    "skip_connect": lambda C, stride, s, k: Identity() if stride == 1 else BatchedFactorizedReduce(C, s, k),
    "conv_3x3": lambda C, stride, s, k: BatchedReLUConvBN(C, s, k, 3, stride, 1),
    "dw_sep_conv_3x3": lambda C, stride, s, k: BatchedDepthwiseSeparableConv(C, s, k, 3, stride),
    "dw_sep_conv_5x5": lambda C, stride, s, k: BatchedDepthwiseSeparableConv(C, s, k, 5, stride),
    "fac_conv_5x5": lambda C, stride, s, k: BatchedFacConv(C, s, k, 5, stride),
    "res2conv_3x3": lambda C, stride, s, k: BatchedRes2Conv(C, s, k, stride),
    "dil_conv_3x3_d3": lambda C, stride, s, k: BatchedReLUConvBN(C, s, k, 3, stride, 3, dilation=3),
    "dil_conv_3x3_d5": lambda C, stride, s, k: BatchedReLUConvBN(C, s, k, 3, stride, 5, dilation=5),
    "avg_pool_3x3": lambda C, stride, s, k: BatchedPool(nn.AvgPool2d(3, stride, 1, count_include_pad=False)),
    "max_pool_3x3": lambda C, stride, s, k: BatchedPool(nn.MaxPool2d(3, stride, 1)),
}


def build_batched(name: str, C: int, stride: int, sources: int, copies: int) -> nn.Module:
    """Op ``name`` on the ``copies`` edges leaving each of ``sources`` states: its batched form, or separate copies."""
    factory = BATCHED_OPS.get(name)
    return factory(C, stride, sources, copies) if factory else SeparateCopies(name, C, sources, copies, stride)
