"""Random architectures from a search space: drawn under the derivation's rules, uniformly, reproducibly."""
import itertools
from collections import Counter

import numpy as np
import pytest
from scipy.stats import chisquare

from fsd_d2.modeling.backbone import SearchBackbone
from fsd_d2.modeling.box_head import FSDSearchBoxHead
from fsd_d2.nas.cells import DerivedCell
from fsd_d2.nas.genotype import check_cell, genotype_from_text, genotype_to_text
from fsd_d2.nas.ops import load_pool
from fsd_d2.nas.sampling import sample_cell, sample_genotype

BONE8, HEAD13 = load_pool("bone8"), load_pool("head13")
DRAWS = 3000


def test_the_same_seed_gives_the_same_genotype_and_another_seed_another():
    a = sample_genotype("head13", HEAD13, 4, FSDSearchBoxHead.CELL_TYPES, (0, 0))
    assert a == sample_genotype("head13", HEAD13, 4, FSDSearchBoxHead.CELL_TYPES, (0, 0))
    others = {genotype_to_text(sample_genotype("head13", HEAD13, 4, FSDSearchBoxHead.CELL_TYPES, (s, d)))
              for s, d in [(0, 1), (1, 0), (2, 5)]}
    assert genotype_to_text(a) not in others and len(others) == 3
    assert a.cells["normal"] != a.cells["reduce"]  # each cell type draws on its own


@pytest.mark.parametrize("pool, name, cell_types", [(BONE8, "bone8", SearchBackbone.CELL_TYPES),
                                                    (HEAD13, "head13", FSDSearchBoxHead.CELL_TYPES)])
def test_every_draw_is_a_valid_genotype_that_builds(pool, name, cell_types):
    for seed in range(20):
        genotype = sample_genotype(name, pool, 4, cell_types, (seed, 0))
        assert genotype_from_text(genotype_to_text(genotype), "drawn", pool_ops=pool, num_nodes=4,
                                  cell_types=list(cell_types)) == genotype  # the file form loads and validates
        for cell in genotype.cells.values():
            check_cell(cell, "drawn", pool, name, 4)
            assert all(len({j for _, j in node}) == 2 for node in cell.edges)  # two distinct inputs
            assert DerivedCell(cell, 8, 8, 8, reduction=True, reduction_prev=False).out_channels == 32


def _cells(pool, seed=0):
    rng = np.random.default_rng(seed)
    return [sample_cell(pool, 4, rng) for _ in range(DRAWS)]


def test_ops_are_drawn_uniformly_from_the_pool_without_none():
    cells = _cells(BONE8)
    ops = Counter(op for cell in cells for node in cell.edges for op, _ in node)
    assert "none" not in ops and set(ops) == set(BONE8) - {"none"}
    assert chisquare(list(ops.values())).pvalue > 0.001  # 7 ops, 24,000 edges: each near 1/7


@pytest.mark.parametrize("node", range(4))
def test_each_node_takes_a_uniform_pair_of_its_inputs(node):
    """Node i reads 2 of its 2 + i inputs; every pair is equally likely, so input j appears in 2 / (2 + i) of the
    draws."""
    cells = _cells(HEAD13, seed=node)
    pairs = Counter(tuple(j for _, j in cell.edges[node]) for cell in cells)
    expected = list(itertools.combinations(range(2 + node), 2))
    assert sorted(pairs) == expected
    if len(expected) > 1:
        assert chisquare([pairs[p] for p in expected]).pvalue > 0.001
    inputs = Counter(j for cell in cells for _, j in cell.edges[node])
    for j in range(2 + node):
        assert inputs[j] / DRAWS == pytest.approx(2 / (2 + node), abs=0.05)
