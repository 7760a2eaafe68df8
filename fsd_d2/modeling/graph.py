"""Region-aware graph module (paper section III-D, eqs. 5-6): relations between the proposals of one image.

For the N proposals of an image with features X (N x d)::

    A   = X Xᵀ / d                                      proposal-to-proposal affinity (eq. 5's A)
    A_e = S(varphi(Aᵀ)) · S(phi(A)) · S(delta(Aᵀ))       three N x N maps, matrix product (eq. 5)
    X_e = ReLU(sigma(A_e X)),  sigma = Linear(d, d)      one Kipf-Welling graph convolution (eq. 6)

varphi, phi, delta are the paper's "1x1 convolutions" over the relation matrix seen as a 1-channel N x N image
(conv1x1 1->hidden, ReLU, conv1x1 hidden->1): each learns a scalar function applied to every A_ij.
S is a row softmax. This normalisation is our choice (the paper gives none) and it is there for training
stability: a raw triple product of N x N maps scales like N² times the cube of the entries, so with 512
proposals per image A_e X would explode. Row-stochastic maps multiply to a row-stochastic A_e, so every
A_e X row is a convex combination of proposal features — bounded by max|X| for any N — and A_e's entries
lie in [0, 1], ready to draw as Fig. 4's line opacities. The 1/d scaling keeps A the *mean* per-channel
product, so its range does not grow with the feature width. The softmax ignores a constant added to a
row, so the last 1x1 convolution of each map has no bias (it could never learn).

The paper's implementation paragraph mentions an Ns x D x D (XᵀX) matrix instead; we implement the
equations (proposal relations), as recorded in docs/design.md "Known ambiguities".
"""
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fsd_d2.errors import ConfigError


def _relation_map(hidden: int) -> nn.Sequential:
    """A learned scalar function of each relation value, as 1x1 convolutions over a 1-channel image."""
    return nn.Sequential(nn.Conv2d(1, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, 1, 1, bias=False))


class RegionGraph(nn.Module):
    """Propagates information between the proposals of the same image only (eqs. 5-6).

    Args:
        dim: d, the width of the flat per-proposal features.
        hidden: channels of the 1x1 convolutions of varphi, phi and delta (``MODEL.GRAPH.HIDDEN``).
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        if dim <= 0 or hidden <= 0:
            raise ConfigError(f"RegionGraph needs dim > 0 and hidden > 0 (MODEL.GRAPH.HIDDEN), got {dim}, {hidden}")
        self.dim = dim
        self.varphi = _relation_map(hidden)  # eq. 5's varphi_w, on Aᵀ
        self.phi = _relation_map(hidden)  # phi_w, on A
        self.delta = _relation_map(hidden)  # delta_w, on Aᵀ
        self.sigma = nn.Linear(dim, dim)  # σ: the graph convolution's trainable matrix (followed by ReLU)

    def enhanced_adjacency(self, x: torch.Tensor) -> torch.Tensor:
        """A_e (N x N, rows sum to 1) for the features ``x`` (N x d) of one image."""
        a = (x @ x.t()) / self.dim

        def mapped(m: nn.Module, rel: torch.Tensor) -> torch.Tensor:
            return F.softmax(m(rel[None, None])[0, 0], dim=1)

        return mapped(self.varphi, a.t()) @ mapped(self.phi, a) @ mapped(self.delta, a.t())

    def forward(self, x: torch.Tensor, num_per_image: Sequence[int]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """
        Args:
            x: (R, d) features of all proposals of a batch, image after image (Detectron2's ROI order).
            num_per_image: proposals of each image; they must sum to R. Zeros are allowed.

        Returns:
            x_e: (R, d) updated features, in the order of ``x``.
            relations: per image, its detached A_e (n_i x n_i) for visualisation.
        """
        counts = [int(n) for n in num_per_image]
        if x.dim() != 2 or x.shape[1] != self.dim or sum(counts) != x.shape[0] or min(counts, default=0) < 0:
            raise ValueError(
                f"RegionGraph expects (R, {self.dim}) features and per-image counts summing to R; got features "
                f"{tuple(x.shape)} and counts {counts}. Pass len(p) for each image's proposals.")
        outputs, relations = [], []
        # One image at a time: no proposal can see another image's, whatever the batch holds.
        for xi in x.split(counts):
            a_e = self.enhanced_adjacency(xi) if len(xi) else xi.new_zeros((0, 0))
            outputs.append(F.relu(self.sigma(a_e @ xi)))
            relations.append(a_e.detach())
        return (torch.cat(outputs) if outputs else x), relations
