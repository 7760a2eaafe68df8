"""A bi-level search whose right answer is known: it must find the cell that made its data, in first and second order
(also with the weight step reusing the unrolled step's gradient).

The data are white noise through a teacher: a one-node DerivedCell whose two edges are dilated 3x3 convolutions,
dilation 3 on one input and 5 on the other, with random weights. The part of the teacher's output that comes
from inputs 3 (resp. 5) pixels away can be computed by one candidate of the pool only: the 3x3 convolutions and
pools reach 1 pixel, skip_connect 0, the other dilation the wrong ring (the cell's 1x1 preprocessing reaches
no further). The student is the real machinery: a SearchCell over the pool weighted by CellAlphas, its weights trained
on one half of the data by SGD and its alphas on the other half by the Architect, the genotype read by derive().
Both orientations are searched, so a preference for one operation or one input cannot pass.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fsd_d2.nas.architect import Architect
from fsd_d2.nas.cells import DerivedCell, SearchCell
from fsd_d2.nas.genotype import CellGenotype
from fsd_d2.nas.regularizers import BetaDecay
from fsd_d2.nas.searchable import CellAlphas, Searchable

POOL = ["none", "skip_connect", "conv_3x3", "dw_sep_conv_3x3", "dil_conv_3x3_d3", "dil_conv_3x3_d5",
        "avg_pool_3x3", "max_pool_3x3"]
TEACHERS = {
    "d3_then_d5": CellGenotype([[("dil_conv_3x3_d3", 0), ("dil_conv_3x3_d5", 1)]]),
    "d5_then_d3": CellGenotype([[("dil_conv_3x3_d5", 0), ("dil_conv_3x3_d3", 1)]]),
}
CHANNELS, SIZE, HALF = 4, 12, 16  # 2 x HALF noise samples of CHANNELS x SIZE x SIZE, split in two halves
STEPS = 40  # alpha + weight steps. Seeds 0-9, every mode and teacher: right op >= 0.50 of its edge, others <= 0.18
WEIGHT_LR, ARCH_LR = 0.05, 0.03
BETA_DECAY = 1.0  # the beta-decay weight at the last step


class ToyCell(nn.Module, Searchable):
    """One search cell (1 node, 2 edges) and its alphas: the smallest searchable network."""

    def __init__(self):
        super().__init__()
        self.arch = CellAlphas("toy", POOL, num_nodes=1, cell_types=("normal",))
        self.cell = SearchCell(POOL, 1, CHANNELS, CHANNELS, CHANNELS, reduction=False, reduction_prev=False)

    def forward(self, s0, s1):
        return self.cell(s0, s1, self.arch.weights()["normal"])


def mse(model, batch):
    s0, s1, target = batch
    return F.mse_loss(model(s0, s1), target)


def search(teacher: CellGenotype, order: int, seed: int, reuse_train_gradient: bool = False, *,
           penalty_for=lambda model: None, after_step=lambda model: None, max_skip=None) -> CellGenotype:
    """The genotype found; ``reuse_train_gradient``: the weight step takes the unrolled step's dL_train/dw, as
    ``search.reuse_train_gradient`` does. ``penalty_for(model)``: an alpha-only term of the alpha loss (as the
    search trainer passes the Architect), ``after_step(model)`` sees each step's end, ``max_skip`` caps the derived
    cell's skip connections."""
    torch.manual_seed(seed)
    s0, s1 = torch.randn(2, 2 * HALF, CHANNELS, SIZE, SIZE)
    with torch.no_grad():
        target = DerivedCell(teacher, CHANNELS, CHANNELS, CHANNELS, reduction=False, reduction_prev=False)(s0, s1)
    train, val = [(s0[i::2], s1[i::2], target[i::2]) for i in (0, 1)]
    model = ToyCell()
    weights = [p for name, p in model.named_parameters() if not name.startswith("arch.")]
    weight_optimizer = torch.optim.SGD(weights, lr=WEIGHT_LR, momentum=0.9)
    architect = Architect(model, mse, arch_params=model.arch_parameters(), weight_params=weights, lr=ARCH_LR,
                          weight_decay=0.0, order=order, keep_train_pass=reuse_train_gradient,
                          arch_penalty=penalty_for(model))
    for _ in range(STEPS):
        architect.step(train, val, eta=WEIGHT_LR, weight_optimizer=weight_optimizer)
        weight_optimizer.zero_grad()
        if reuse_train_gradient:
            for p, g in zip(weights, architect.train_pass.grads):
                p.grad = g
        else:
            mse(model, train).backward()
        weight_optimizer.step()
        after_step(model)
    return model.arch.genotype(max_skip=max_skip).cells["normal"]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("teacher", TEACHERS)
@pytest.mark.parametrize("order, reuse", [(1, False), (2, False), (2, True)], ids=["first", "second", "second-reuse"])
def test_search_finds_the_teacher_cell(order, reuse, teacher, seed):
    found = search(TEACHERS[teacher], order, seed, reuse)
    by_input = sorted(found.edges[0], key=lambda edge: edge[1])  # derive lists the stronger edge first
    assert by_input == list(TEACHERS[teacher].edges[0]), f"order {order}, seed {seed}: found\n{found}"


# --- the collapse remedies on the same toy ---------------------------------------------------------------------
SKIPS = CellGenotype([[("skip_connect", 0), ("skip_connect", 1)]])  # a teacher that plain DARTS answers with skips


def search_with(teacher: CellGenotype, seed: int, *, beta_decay: float = 0.0, max_skip=None, order: int = 1):
    """:func:`search` with the remedies: beta-decay in the alpha loss (rising linearly over the steps, as
    ``search.beta_decay_weight``) and P-DARTS' cap at derivation; returns the genotype and the alphas after each
    step."""
    step = [0]
    history = []

    def penalty_for(model):
        return BetaDecay(model.arch, beta_decay, lambda: step[0] / STEPS) if beta_decay > 0 else None

    def after_step(model):
        step[0] += 1
        history.append(model.arch.logits["normal"].detach().clone())

    found = search(teacher, order, seed, penalty_for=penalty_for, after_step=after_step, max_skip=max_skip)
    return found, history


def test_the_skip_cap_holds_where_plain_darts_takes_skips():
    seed = 0  # a seed where plain DARTS answers this teacher with two skips, so the cap has something to hold
    plain, history = search_with(SKIPS, seed)
    assert [op for op, _ in plain.edges[0]] == ["skip_connect", "skip_connect"]  # the cap is binding here
    for cap in (1, 0):
        capped, _ = search_with(SKIPS, seed, max_skip=cap)
        ops = [op for op, _ in capped.edges[0]]
        assert ops.count("skip_connect") == cap and "none" not in ops
    weights = torch.softmax(history[-1], dim=-1)[:, POOL.index("skip_connect")]
    kept, = [j for op, j in search_with(SKIPS, seed, max_skip=1)[0].edges[0] if op == "skip_connect"]
    assert kept == int(weights.argmax())  # the stronger skip is the one kept


@pytest.mark.parametrize("seed", [0, 1])
def test_beta_decay_keeps_the_alphas_flat_and_still_finds_the_teacher(seed):
    """beta-DARTS: the regulariser lowers each edge's logsumexp(alpha), so no op's weight runs away; the search's
    answer, where the data decide it, stays the same."""
    teacher = TEACHERS["d3_then_d5"]
    plain, plain_history = search_with(teacher, seed)
    found, history = search_with(teacher, seed, beta_decay=BETA_DECAY)
    assert torch.equal(history[0], plain_history[0])  # the weight starts at 0: the first step is plain DARTS'
    peak = [torch.softmax(a, dim=-1).max(dim=-1).values.mean().item() for a in history]
    plain_peak = [torch.softmax(a, dim=-1).max(dim=-1).values.mean().item() for a in plain_history]
    assert peak[-1] < plain_peak[-1] - 0.05, (peak[-1], plain_peak[-1])
    assert torch.logsumexp(history[-1], -1).mean() < torch.logsumexp(plain_history[-1], -1).mean()
    assert sorted(found.edges[0], key=lambda e: e[1]) == list(teacher.edges[0])


def test_a_zero_beta_decay_leaves_the_search_bitwise_plain_darts():
    """The penalty's path (its gradient added to the hypergradient) with a weight of 0 changes not one bit."""
    plain, plain_history = search_with(TEACHERS["d3_then_d5"], 0)
    history = []
    off = search(TEACHERS["d3_then_d5"], 1, 0, penalty_for=lambda model: BetaDecay(model.arch, 0.0, lambda: 1.0),
                 after_step=lambda model: history.append(model.arch.logits["normal"].detach().clone()))
    assert off == plain and all(torch.equal(a, b) for a, b in zip(history, plain_history))
