"""The architecture parameters of a searchable network, kept apart from its weights (DARTS' model interface).

A searchable module owns one :class:`CellAlphas` and exposes ``arch_parameters()`` and ``genotype()``, as the
model of quark0/darts does; the search trainer asks that module for its alphas instead of picking parameters
by name, so nothing else in the model can be mistaken for an architecture parameter.
"""
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fsd_d2.nas.genotype import Genotype, derive, num_edges


class CellAlphas(nn.Module):
    """One logit matrix (num_edges x len(pool)) per cell type, shared by every search cell of that type.

    Args:
        pool_name: the pool's name, recorded in the derived genotype.
        pool: its operation names, the columns of every matrix.
        num_nodes: intermediate nodes per cell.
        cell_types: e.g. ``("reduce",)`` for the backbone search, ``("normal", "reduce")`` for the head's.
    """

    def __init__(self, pool_name: str, pool: Sequence[str], num_nodes: int, cell_types: Sequence[str]):
        super().__init__()
        self.pool_name, self.pool, self.num_nodes = pool_name, list(pool), num_nodes
        # DARTS initialisation: small random logits, so the first softmax is nearly uniform.
        self.logits = nn.ParameterDict({t: nn.Parameter(1e-3 * torch.randn(num_edges(num_nodes), len(self.pool)))
                                        for t in cell_types})

    def weights(self) -> Dict[str, torch.Tensor]:
        """Softmaxed alphas by cell type: the mixing weights of every edge's operations."""
        return {t: F.softmax(a, dim=-1) for t, a in self.logits.items()}

    def genotype(self, max_skip: Optional[int] = None) -> Genotype:
        """DARTS' discretisation of the current alphas, one cell per type (at most ``max_skip`` skip connections
        per cell: P-DARTS' cap, see :func:`fsd_d2.nas.genotype.derive`)."""
        return Genotype(pool=self.pool_name, cells={t: derive(a, self.pool, self.num_nodes, max_skip)
                                                    for t, a in self.logits.items()})


class Searchable:
    """Mixin of a module that holds a :class:`CellAlphas` as ``self.arch``."""

    arch: CellAlphas

    def arch_parameters(self) -> List[nn.Parameter]:
        return list(self.arch.parameters())

    def genotype(self) -> Genotype:
        return self.arch.genotype()

    def alphas(self) -> Dict[str, torch.Tensor]:
        """The alpha logits by cell type, detached (for plots and logs)."""
        return {t: a.detach() for t, a in self.arch.logits.items()}
