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


def search(teacher: CellGenotype, order: int, seed: int, reuse_train_gradient: bool = False) -> CellGenotype:
    """The genotype found; ``reuse_train_gradient``: the weight step takes the unrolled step's dL_train/dw, as
    ``search.reuse_train_gradient`` does."""
    torch.manual_seed(seed)
    s0, s1 = torch.randn(2, 2 * HALF, CHANNELS, SIZE, SIZE)
    with torch.no_grad():
        target = DerivedCell(teacher, CHANNELS, CHANNELS, CHANNELS, reduction=False, reduction_prev=False)(s0, s1)
    train, val = [(s0[i::2], s1[i::2], target[i::2]) for i in (0, 1)]
    model = ToyCell()
    weights = [p for name, p in model.named_parameters() if not name.startswith("arch.")]
    weight_optimizer = torch.optim.SGD(weights, lr=WEIGHT_LR, momentum=0.9)
    architect = Architect(model, mse, arch_params=model.arch_parameters(), weight_params=weights, lr=ARCH_LR,
                          weight_decay=0.0, order=order, keep_train_pass=reuse_train_gradient)
    for _ in range(STEPS):
        architect.step(train, val, eta=WEIGHT_LR, weight_optimizer=weight_optimizer)
        weight_optimizer.zero_grad()
        if reuse_train_gradient:
            for p, g in zip(weights, architect.train_pass.grads):
                p.grad = g
        else:
            mse(model, train).backward()
        weight_optimizer.step()
    return model.genotype().cells["normal"]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("teacher", TEACHERS)
@pytest.mark.parametrize("order, reuse", [(1, False), (2, False), (2, True)], ids=["first", "second", "second-reuse"])
def test_search_finds_the_teacher_cell(order, reuse, teacher, seed):
    found = search(TEACHERS[teacher], order, seed, reuse)
    by_input = sorted(found.edges[0], key=lambda edge: edge[1])  # derive lists the stronger edge first
    assert by_input == list(TEACHERS[teacher].edges[0]), f"order {order}, seed {seed}: found\n{found}"
