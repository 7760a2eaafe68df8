"""Random architectures from a search space: the baseline every architecture search has to beat.

Li & Talwalkar (2019) and Yang et al. (2020) showed that DARTS-style searches are often no better than an
architecture drawn at random from the same space and trained the same way. :func:`sample_genotype` draws
one under the rules of DARTS' derivation (:func:`fsd_d2.nas.genotype.derive`), so a drawn cell could have
been derived: every intermediate node takes :data:`~fsd_d2.nas.genotype.EDGES_PER_NODE` edges from distinct
earlier nodes (uniformly among the pairs), each with an operation drawn uniformly from the pool minus ``none``.
"""
from typing import Sequence

import numpy as np

from fsd_d2.nas.genotype import EDGES_PER_NODE, CellGenotype, Genotype

_CELL_TYPES = {"normal": 0, "reduce": 1}  # each cell type draws from a stream of its own


def sample_cell(pool: Sequence[str], num_nodes: int, rng: np.random.Generator) -> CellGenotype:
    """A cell drawn uniformly under the derivation's rules; the inputs of a node in ascending order."""
    ops = [op for op in pool if op != "none"]
    if not ops:
        raise ValueError(f"sample_cell: the pool {list(pool)} has no operation besides 'none'")
    nodes = []
    for i in range(num_nodes):
        inputs = sorted(rng.choice(2 + i, size=EDGES_PER_NODE, replace=False).tolist())
        nodes.append(tuple((ops[rng.integers(len(ops))], j) for j in inputs))
    return CellGenotype(tuple(nodes))


def sample_genotype(pool_name: str, pool: Sequence[str], num_nodes: int, cell_types: Sequence[str],
                    seed: Sequence[int]) -> Genotype:
    """A genotype of ``cell_types`` drawn from ``pool``; the same ``seed`` (e.g. ``(run seed, draw)``) gives the
    same genotype, and each cell type its own draw whatever the others are."""
    return Genotype(pool_name, {t: sample_cell(pool, num_nodes, np.random.default_rng([*seed, _CELL_TYPES[t]]))
                                for t in cell_types})
