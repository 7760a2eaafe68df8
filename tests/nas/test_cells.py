"""Mixed op, search cell and derived cell: the weighted sums, the wiring and the shapes."""
import pytest
import torch
import torch.nn.functional as F

from fsd_d2.nas.cells import DerivedCell, MixedOp, SearchCell, chain_cells, channel_shuffle, num_edges
from fsd_d2.nas.genotype import CellGenotype
from fsd_d2.nas.ops import DepthwiseSeparableConv, load_pool

BONE8, HEAD13 = load_pool("bone8"), load_pool("head13")
GENOTYPE = CellGenotype([[("dw_sep_conv_3x3", 0), ("conv_3x3", 1)], [("skip_connect", 0), ("res2conv_3x3", 2)],
                         [("dil_conv_3x3_d3", 3), ("fac_conv_5x5", 1)], [("se", 2), ("non_local", 4)]])


def test_num_edges():
    assert [num_edges(n) for n in (1, 2, 4, 5)] == [2, 5, 14, 20]


BN_EVAL = (1 + 1e-5) ** -0.5  # a fresh BatchNorm in eval mode: (x - 0) / sqrt(1 + eps)
KNOWN = ["none", "skip_connect", "conv_3x3", "max_pool_3x3", "avg_pool_3x3"]  # each one's output is known by hand
KNOWN_WEIGHTS = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])


def _delta_kernel(op: MixedOp) -> MixedOp:
    """Make conv_3x3 copy its input channel by channel: its output is then relu(x) through BN."""
    conv = op.ops[KNOWN.index("conv_3x3")][1]
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[range(conv.out_channels), range(conv.in_channels), 1, 1] = 1.0
    return op


def _known_mixture(x: torch.Tensor) -> torch.Tensor:
    """0.1 * none + 0.2 * x + 0.3 * BN(relu(x)) + 0.15 * BN(max pool) + 0.25 * BN(avg pool), stride 1."""
    return (0.2 * x + BN_EVAL * (0.3 * F.relu(x) + 0.15 * F.max_pool2d(x, 3, 1, 1)
                                  + 0.25 * F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)))


def test_mixed_op_is_the_weighted_sum_of_known_ops():
    op = _delta_kernel(MixedOp(8, 1, KNOWN).eval())
    x = torch.randn(2, 8, 8, 8)
    torch.testing.assert_close(op(x, KNOWN_WEIGHTS), _known_mixture(x))


def test_strided_mixed_op_is_the_weighted_sum_of_known_ops():
    pools = ["none", "max_pool_3x3", "avg_pool_3x3"]
    x = torch.randn(2, 8, 9, 9)
    expected = BN_EVAL * (0.3 * F.max_pool2d(x, 3, 2, 1) + 0.5 * F.avg_pool2d(x, 3, 2, 1, count_include_pad=False))
    torch.testing.assert_close(MixedOp(8, 2, pools).eval()(x, torch.tensor([0.2, 0.3, 0.5])), expected)


@pytest.mark.parametrize("stride", [1, 2])
def test_partial_channel_mixed_op(stride):
    """K=4 on 8 channels: channels 0-1 go through the ops, 2-7 bypass them; the shuffle interleaves the 4 groups."""
    op = MixedOp(8, stride, BONE8, partial_channels=4).eval()
    assert all(m.in_channels <= 2 for m in op.modules() if isinstance(m, torch.nn.Conv2d))  # C / K channels
    pools = ["none", "max_pool_3x3", "avg_pool_3x3"]
    op = MixedOp(8, stride, pools, partial_channels=4).eval()
    x = torch.randn(2, 8, 8, 8)
    active = x[:, :2]
    mixed = BN_EVAL * (0.3 * F.max_pool2d(active, 3, stride, 1)
                       + 0.5 * F.avg_pool2d(active, 3, stride, 1, count_include_pad=False))
    bypass = x[:, 2:] if stride == 1 else F.max_pool2d(x[:, 2:], 2)
    expected = torch.cat([mixed, bypass], 1)[:, [0, 2, 4, 6, 1, 3, 5, 7]]
    torch.testing.assert_close(op(x, torch.tensor([0.2, 0.3, 0.5])), expected)


def test_channel_shuffle_interleaves_groups():
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]


def test_partial_channels_must_divide():
    with pytest.raises(ValueError, match="6 channels cannot be split into 1/4"):
        MixedOp(6, 1, BONE8, partial_channels=4)


def make_search_cell(pool, reduction=False, reduction_prev=False, k=1, batched=True):
    return SearchCell(pool, 4, C_prev_prev=6, C_prev=10, C=8, reduction=reduction, reduction_prev=reduction_prev,
                      partial_channels=k, batched=batched)


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("pool, reduction, reduction_prev, k", [
    (BONE8, False, False, 1), (BONE8, True, False, 1), (BONE8, True, True, 1), (HEAD13, False, True, 2),
    (HEAD13, True, False, 4)])
def test_search_cell_shapes(pool, reduction, reduction_prev, k, batched):
    torch.manual_seed(0)
    cell = make_search_cell(pool, reduction, reduction_prev, k, batched)
    edges = (sum(e.sources * e.copies for e in cell.state_edges) if batched else len(cell.edges))
    assert edges == 14 and cell.out_channels == 32
    s0 = torch.randn(2, 6, 16 if reduction_prev else 8, 16 if reduction_prev else 8)
    s1 = torch.randn(2, 10, 8, 8)
    alphas = torch.zeros(14, len(pool), requires_grad=True)
    out = cell(s0, s1, torch.softmax(alphas, -1))
    assert out.shape == (2, 32, 4 if reduction else 8, 4 if reduction else 8)
    out.square().mean().backward()
    assert alphas.grad is not None and alphas.grad.abs().sum() > 0


@pytest.mark.parametrize("batched", [True, False])
def test_search_cell_wiring_with_one_hot_skip(batched):
    """All weight on skip_connect: node i is the sum of every earlier state, so nodes are 1, 2, 4, 8 x (a + b)."""
    cell = make_search_cell(BONE8, batched=batched).eval()
    s0, s1 = torch.randn(1, 6, 4, 4), torch.randn(1, 10, 4, 4)
    weights = F.one_hot(torch.full((14,), BONE8.index("skip_connect")), len(BONE8)).float()
    ab = cell.preprocess0(s0) + cell.preprocess1(s1)
    torch.testing.assert_close(cell(s0, s1, weights), torch.cat([ab, 2 * ab, 4 * ab, 8 * ab], 1))


def test_search_cell_rejects_wrong_weights():
    with pytest.raises(ValueError, match=r"weights have shape \(14, 13\), expected \(14, 8\)"):
        make_search_cell(BONE8)(torch.randn(1, 6, 4, 4), torch.randn(1, 10, 4, 4), torch.zeros(14, 13))


@pytest.mark.parametrize("reduction, reduction_prev", [(False, False), (True, False), (False, True)])
def test_derived_cell_shapes(reduction, reduction_prev):
    torch.manual_seed(0)
    cell = DerivedCell(GENOTYPE, 6, 10, 8, reduction=reduction, reduction_prev=reduction_prev)
    assert cell.out_channels == 32 and isinstance(cell.ops[0][0], DepthwiseSeparableConv)
    assert all(m.affine for m in cell.modules() if isinstance(m, torch.nn.BatchNorm2d))
    s0 = torch.randn(2, 6, 16 if reduction_prev else 8, 16 if reduction_prev else 8)
    out = cell(s0, torch.randn(2, 10, 8, 8))
    assert out.shape == (2, 32, 4 if reduction else 8, 4 if reduction else 8)


def test_derived_cell_wiring():
    """skip_connect everywhere: node0 = a + b, node1 = a + node0, node2 = node0 + node1, node3 = node2 + b."""
    skip = CellGenotype([[("skip_connect", 0), ("skip_connect", 1)], [("skip_connect", 0), ("skip_connect", 2)],
                         [("skip_connect", 2), ("skip_connect", 3)], [("skip_connect", 4), ("skip_connect", 1)]])
    cell = DerivedCell(skip, 6, 10, 8, reduction=False, reduction_prev=False).eval()
    s0, s1 = torch.randn(1, 6, 4, 4), torch.randn(1, 10, 4, 4)
    a, b = cell.preprocess0(s0), cell.preprocess1(s1)
    expected = torch.cat([a + b, 2 * a + b, 3 * a + 2 * b, 3 * a + 3 * b], 1)
    torch.testing.assert_close(cell(s0, s1), expected)


def test_derived_cell_rejects_bad_genotype():
    bad = CellGenotype([[("conv_3x3", 0), ("conv_3x3", 1)], [("conv_3x3", 3), ("conv_3x3", 1)]])
    with pytest.raises(ValueError, match="DerivedCell genotype node 1 edge 0: input 3 is out of range"):
        DerivedCell(bad, 6, 10, 8, reduction=False, reduction_prev=False)


def test_chain_cells_feeds_each_cell_the_two_before_it():
    seen = []

    def make(i, c_pp, c_p, reduction, reduction_prev):
        seen.append((c_pp, c_p, reduction, reduction_prev))
        cell = torch.nn.Identity()
        cell.out_channels = 10 * (i + 1)
        return cell

    cells = chain_cells(make, 3, [False, True, False])
    assert len(cells) == 3 and seen == [(3, 3, False, False), (3, 10, True, False), (10, 20, False, True)]
