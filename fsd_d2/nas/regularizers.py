"""Regularisers of the architecture parameters, against DARTS' collapse onto parameter-free operations.

:class:`BetaDecay` is β-DARTS' beta-decay (Ye et al., CVPR 2022): the mean over edges of ``logsumexp(α_edge)``
added to the alpha objective. Its gradient is the edge's softmax ("beta"), so every step lowers each logit in
proportion to its own weight: the largest shrink most, the alphas stay small and their softmax flat, and no
operation can run away with an edge early in the search, which is how skip connections take over (Zela et al.
2020). It depends on the alphas only, so it enters either order's hypergradient exactly, like the latency term.
"""
from typing import Callable

import torch

from fsd_d2.nas.searchable import CellAlphas


class BetaDecay:
    """``weight(progress) x mean_edges logsumexp(α)``, ``progress()`` the search's fraction done (0 -> 1): the
    weight grows linearly from 0 to ``weight``, as β-DARTS' code does (``50 * epoch / 100``), so the loss shapes
    the first steps freely and is held in check later."""

    def __init__(self, alphas: CellAlphas, weight: float, progress: Callable[[], float]):
        self.alphas, self.weight, self.progress = alphas, weight, progress

    def __call__(self) -> torch.Tensor:
        logits = torch.cat(list(self.alphas.logits.values()))
        return self.weight * self.progress() * torch.logsumexp(logits, dim=-1).mean()
