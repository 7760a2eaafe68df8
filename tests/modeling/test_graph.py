"""The region-aware graph module: eqs. 5-6, per-image isolation, permutation equivariance, edge cases, gradients,
and a size set by the graph width alone."""
import pytest
import torch
import torch.nn.functional as F

from fsd_d2.modeling.graph import RegionGraph

D_IN, D = 6, 4  # box-head feature width d, graph width D


@pytest.fixture
def graph():
    torch.manual_seed(0)
    return RegionGraph(D_IN, D, hidden=4)


def test_equations_5_and_6(graph):
    torch.manual_seed(4)
    h = torch.randn(5, D_IN)
    x = graph.nodes(h)
    a = x @ x.t() / D

    def mapped(m, rel):  # a 1x1 convolution applied entry by entry, then a row softmax
        w1, b1, w2 = m[0].weight.flatten(), m[0].bias, m[2].weight.flatten()
        return F.softmax(F.relu(rel[..., None] * w1 + b1) @ w2, dim=1)

    a_e = mapped(graph.varphi, a.t()) @ mapped(graph.phi, a) @ mapped(graph.delta, a.t())
    x_e, (rel,) = graph(h, [5])
    torch.testing.assert_close(rel, a_e)
    torch.testing.assert_close(x_e, F.relu(graph.sigma(a_e @ x)))


def test_nodes_pool_neighbouring_positions_of_each_channel():
    # A cell head's flat features are channel-major (C, h, w): pooling 2 x 2 x 2 = 8 values to 4 averages rows.
    h = torch.arange(16.0).reshape(2, 8)
    torch.testing.assert_close(RegionGraph(8, 4, 1).nodes(h), h.reshape(2, 4, 2).mean(-1))
    torch.testing.assert_close(RegionGraph(8, 8, 1).nodes(h), h)  # d = D (the FC head): the identity
    torch.testing.assert_close(RegionGraph(8, 16, 1).nodes(h), h.repeat_interleave(2, dim=1))  # d < D: repeats


def test_size_does_not_depend_on_the_feature_width():
    def size(m):
        return sum(p.numel() for p in m.parameters())

    assert size(RegionGraph(1024, 256, 8)) == size(RegionGraph(4096, 256, 8)) == size(RegionGraph(64, 256, 8))
    assert size(RegionGraph(1024, 256, 8)) == 256 * 256 + 256 + 3 * (8 + 8 + 8)  # sigma + 3 relation maps


def test_images_do_not_mix(graph):
    torch.manual_seed(1)
    mine = torch.randn(4, D_IN)
    x_e, rel = graph(torch.cat([torch.randn(3, D_IN), mine, torch.randn(2, D_IN)]), [3, 4, 2])
    # Other images changed in values, order and count: image 1's outputs must not move by a single bit.
    x_e2, rel2 = graph(torch.cat([torch.randn(5, D_IN), mine, torch.randn(1, D_IN)]), [5, 4, 1])
    assert torch.equal(x_e[3:7], x_e2[5:9])
    assert torch.equal(rel[1], rel2[1])
    assert [r.shape for r in rel2] == [(5, 5), (4, 4), (1, 1)]


def test_permutation_equivariant_within_an_image(graph):
    torch.manual_seed(2)
    x = torch.randn(7, D_IN)
    perm = torch.randperm(7)
    x_e, (rel,) = graph(x, [7])
    x_ep, (rel_p,) = graph(x[perm], [7])
    torch.testing.assert_close(x_ep, x_e[perm])
    torch.testing.assert_close(rel_p, rel[perm][:, perm])


def test_images_with_one_and_zero_proposals(graph):
    x = torch.randn(4, D_IN)
    x_e, rel = graph(x, [1, 0, 3, 0])
    assert x_e.shape == (4, D)
    assert [r.shape for r in rel] == [(1, 1), (0, 0), (3, 3), (0, 0)]
    assert torch.equal(rel[0], torch.ones(1, 1))  # a lone proposal relates only to itself
    x_e, rel = graph(torch.zeros(0, D_IN), [0])
    assert x_e.shape == (0, D) and rel[0].shape == (0, 0)


def test_relations_stay_bounded_for_large_inputs(graph):
    x = 1e3 * torch.randn(64, D_IN)
    x_e, (rel,) = graph(x, [64])
    assert torch.isfinite(x_e).all()
    torch.testing.assert_close(rel.sum(dim=1), torch.ones(64))  # row-stochastic: A_e X is a convex mix
    assert not rel.requires_grad


def test_gradients_reach_every_mapping(graph):
    torch.manual_seed(3)
    x = torch.randn(9, D_IN, requires_grad=True)
    x_e, _ = graph(x, [5, 4])
    (x_e * torch.randn_like(x_e)).sum().backward()
    for name in ("phi", "varphi", "delta", "sigma"):
        for pname, p in getattr(graph, name).named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname} got no gradient"
    assert x.grad.abs().sum() > 0


def test_counts_must_match_features(graph):
    with pytest.raises(ValueError, match="counts summing to R"):
        graph(torch.randn(5, D_IN), [2, 2])
    with pytest.raises(ValueError, match=r"\(R, 6\) features"):
        graph(torch.randn(4, D), [4])  # nodes instead of box-head features
