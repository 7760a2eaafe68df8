"""The region-aware graph module: per-image isolation, permutation equivariance, edge cases, gradients."""
import pytest
import torch

from fsd_d2.modeling.graph import RegionGraph

D = 6


@pytest.fixture
def graph():
    torch.manual_seed(0)
    return RegionGraph(D, hidden=4)


def test_images_do_not_mix(graph):
    torch.manual_seed(1)
    mine = torch.randn(4, D)
    x_e, rel = graph(torch.cat([torch.randn(3, D), mine, torch.randn(2, D)]), [3, 4, 2])
    # Other images changed in values, order and count: image 1's outputs must not move by a single bit.
    x_e2, rel2 = graph(torch.cat([torch.randn(5, D), mine, torch.randn(1, D)]), [5, 4, 1])
    assert torch.equal(x_e[3:7], x_e2[5:9])
    assert torch.equal(rel[1], rel2[1])
    assert [r.shape for r in rel2] == [(5, 5), (4, 4), (1, 1)]


def test_permutation_equivariant_within_an_image(graph):
    torch.manual_seed(2)
    x = torch.randn(7, D)
    perm = torch.randperm(7)
    x_e, (rel,) = graph(x, [7])
    x_ep, (rel_p,) = graph(x[perm], [7])
    torch.testing.assert_close(x_ep, x_e[perm])
    torch.testing.assert_close(rel_p, rel[perm][:, perm])


def test_images_with_one_and_zero_proposals(graph):
    x = torch.randn(4, D)
    x_e, rel = graph(x, [1, 0, 3, 0])
    assert x_e.shape == (4, D)
    assert [r.shape for r in rel] == [(1, 1), (0, 0), (3, 3), (0, 0)]
    assert torch.equal(rel[0], torch.ones(1, 1))  # a lone proposal relates only to itself
    x_e, rel = graph(torch.zeros(0, D), [0])
    assert x_e.shape == (0, D) and rel[0].shape == (0, 0)


def test_relations_stay_bounded_for_large_inputs(graph):
    x = 1e3 * torch.randn(64, D)
    x_e, (rel,) = graph(x, [64])
    assert torch.isfinite(x_e).all()
    torch.testing.assert_close(rel.sum(dim=1), torch.ones(64))  # row-stochastic: A_e X is a convex mix
    assert not rel.requires_grad


def test_gradients_reach_every_mapping(graph):
    torch.manual_seed(3)
    x = torch.randn(9, D, requires_grad=True)
    x_e, _ = graph(x, [5, 4])
    (x_e * torch.randn_like(x_e)).sum().backward()
    for name in ("phi", "varphi", "delta", "sigma"):
        for pname, p in getattr(graph, name).named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname} got no gradient"
    assert x.grad.abs().sum() > 0


def test_counts_must_match_features(graph):
    with pytest.raises(ValueError, match="counts summing to R"):
        graph(torch.randn(5, D), [2, 2])
