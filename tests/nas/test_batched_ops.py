"""The batched search cell (model.batched_edges=true) computes what the per-edge DARTS cell computes.

Both cells are built, the per-edge cell's weights are copied into the batched layout (``_batched_layout``: the
copies of an op on the edges leaving the grouped states stacked along the output channels, source by source,
edge by edge), and one forward/backward through each must give the same output, the same gradients for the
inputs and the alphas, the same weight gradients (in the same layout), and, after a training step, the same
eval-mode output (the BN running statistics).
"""
from typing import List

import pytest
import torch

from fsd_d2.nas.batched_ops import BatchedRes2Conv, SeparateCopies
from fsd_d2.nas.cells import SearchCell
from fsd_d2.nas.genotype import num_edges
from fsd_d2.nas.ops import load_pool

NUM_NODES, C = 4, 8
# float32 sums taken in another order (one BN, grouped convolutions): differences ~1e-5 of values of order 1-10,
# where a wrong layout or a dropped term is off by order 1
TOL = dict(rtol=1e-4, atol=1e-4)
# weight gradients also hold sums of many terms that cancel (non_local's phi bias shifts a softmax's logits
# equally: its gradient is 0 up to rounding, ~1e-4 either way)
WEIGHT_GRAD_TOL = dict(rtol=1e-4, atol=1e-3)


def _separate_ops(separate: SearchCell, states, column: int) -> List[torch.nn.Module]:
    """Op ``column`` of every edge leaving ``states``, in the batched cell's order (source by source, node by node)."""
    nodes = range(max(states[0] - 1, 0), NUM_NODES)
    return [separate.edges[num_edges(i) + j].ops[column] for j in states for i in nodes]


def _batched_layout(batched_op, separate_ops, tensors_of) -> List[torch.Tensor]:
    """The batched op's parameters (or their gradients, by ``tensors_of``) assembled from the separate ops'."""
    per_edge = [tensors_of(op) for op in separate_ops]
    if isinstance(batched_op, BatchedRes2Conv) and batched_op.stride == 2:
        # the unlinked groups' convolutions are one, laid out (source, group, edge); the fuse conv is the last
        groups, copies = len(batched_op.widths) - 1, batched_op.copies
        sources = len(per_edge) // copies
        convs = torch.stack([per_edge[s * copies + e][g] for s in range(sources) for g in range(groups)
                             for e in range(copies)])
        return [convs.flatten(0, 1), torch.cat([t[-1] for t in per_edge])]
    return [torch.cat(column) for column in zip(*per_edge)]


def _pair(pool_name: str, reduction: bool, partial_channels: int):
    pool = load_pool(pool_name)
    torch.manual_seed(0)
    separate = SearchCell(pool, NUM_NODES, 16, 16, C, reduction, False, partial_channels, batched=False)
    batched = SearchCell(pool, NUM_NODES, 16, 16, C, reduction, False, partial_channels, batched=True)
    batched.preprocess0.load_state_dict(separate.preprocess0.state_dict())
    batched.preprocess1.load_state_dict(separate.preprocess1.state_dict())
    with torch.no_grad():
        for states, edges in zip(batched._state_groups, batched.state_edges):
            for column, op in zip(edges._normed + edges._direct, edges.ops):
                separate_ops = _separate_ops(separate, states, column)
                if isinstance(op, SeparateCopies):
                    for copy, original in zip(op.ops, separate_ops):
                        copy.load_state_dict(original.state_dict())
                    continue
                for p, value in zip(op.parameters(), _batched_layout(op, separate_ops, lambda m: list(m.parameters()))):
                    p.copy_(value)
    return pool, separate, batched


def _run(cell: SearchCell, x0, x1, alphas) -> torch.Tensor:
    y = cell(x0, x1, torch.softmax(alphas, dim=-1))
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()  # a loss every output element counts in
    return y.detach()


@pytest.mark.parametrize("pool_name,reduction,partial_channels", [
    ("bone8", True, 1), ("bone8", False, 1), ("head13", True, 1), ("head13", False, 1), ("bone8", True, 4),
    ("head13", False, 2)])
def test_batched_cell_equals_the_per_edge_cell(pool_name, reduction, partial_channels):
    pool, separate, batched = _pair(pool_name, reduction, partial_channels)
    x0, x1 = (torch.randn(2, 16, 9, 9, requires_grad=True) for _ in range(2))  # odd size: ceil at stride 2
    alphas = torch.randn(num_edges(NUM_NODES), len(pool), requires_grad=True)
    grads = []
    outputs = []
    for cell in (separate, batched):
        outputs.append(_run(cell, x0, x1, alphas))
        grads.append([t.grad.clone() for t in (x0, x1, alphas)])
        for t in (x0, x1, alphas):
            t.grad = None
    torch.testing.assert_close(outputs[1], outputs[0], **TOL)
    for got, expected, name in zip(grads[1], grads[0], ("s0", "s1", "alphas")):
        torch.testing.assert_close(got, expected, **TOL, msg=lambda m: f"gradient of {name}: {m}")
    torch.testing.assert_close(batched.preprocess0[1].weight.grad, separate.preprocess0[1].weight.grad,
                               **WEIGHT_GRAD_TOL)
    for states, edges in zip(batched._state_groups, batched.state_edges):
        for column, op in zip(edges._normed + edges._direct, edges.ops):
            separate_ops = _separate_ops(separate, states, column)
            if isinstance(op, SeparateCopies):
                got = [p.grad for copy in op.ops for p in copy.parameters()]
                expected = [p.grad for original in separate_ops for p in original.parameters()]
            else:
                got = [p.grad for p in op.parameters()]
                expected = _batched_layout(op, separate_ops, lambda m: [p.grad for p in m.parameters()])
            assert len(got) == len(expected)
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, **WEIGHT_GRAD_TOL,
                                           msg=lambda m: f"{pool[column]} from states {states}: {m}")
    separate.eval(), batched.eval()  # the running statistics the training pass left
    with torch.no_grad():
        weights = torch.softmax(alphas, dim=-1)
        torch.testing.assert_close(batched(x0, x1, weights), separate(x0, x1, weights), **TOL)


def test_batched_cell_has_fewer_weight_tensors():
    """The point of batching: per op one weight set for all the edges leaving a state, not one per edge."""
    _, separate, batched = _pair("bone8", True, 1)
    assert sum(p.numel() for p in batched.parameters()) == sum(p.numel() for p in separate.parameters())
    assert len(list(batched.parameters())) * 2 < len(list(separate.parameters()))
