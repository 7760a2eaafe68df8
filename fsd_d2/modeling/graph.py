"""Region-aware graph module (paper section III-D, eqs. 5-6): relations between the proposals of one image.

For the N proposals of an image with box-head features H (N x d)::

    X   = pool_D(H)                                     the graph's nodes, D wide whatever d is (no parameters)
    A   = X Xᵀ / D                                      proposal-to-proposal affinity (eq. 5's A)
    A_e = S(varphi(Aᵀ)) · S(phi(A)) · S(delta(Aᵀ))       three N x N maps, matrix product (eq. 5)
    X_e = ReLU(sigma(A_e X)),  sigma = Linear(D, D)      one Kipf-Welling graph convolution (eq. 6)

Equal capacity on every box head. Table III compares the graph's gain on the 2-FC head (d = 1024) and on
the FSD cell head (d = C x h x w, 448 x 4 x 4 = 7168 at the default widths), so the graph must add the same
parameters to both. A learned d -> D projection cannot: its size grows with d. pool_D is therefore a
parameter-free adaptive average pooling of the flat feature vector to a fixed width D (``MODEL.GRAPH.DIM``,
default 1024, the paper's example feature width): on the FC head it is the identity; on a cell head, whose
flat features are channel-major, each of the D values averages about d/D consecutive values (7 at the default
widths; with 4 x 4 maps and d/D = 4, the 4 pixels of a row). A width d < D repeats features, adding none. Every parameter of the
graph (relation maps, sigma, and GraphROIHeads' D-wide classifier part) thus depends on D, ``MODEL.GRAPH.HIDDEN``
and the number of classes only: 1.06M at the defaults with 8 lesion types, on either head.

varphi, phi, delta are the paper's "1x1 convolutions" over the relation matrix seen as a 1-channel N x N image
(conv1x1 1->hidden, ReLU, conv1x1 hidden->1): each learns a scalar function applied to every A_ij.
S is a row softmax. This normalisation is our choice (the paper gives none) and it is there for training
stability: a raw triple product of N x N maps scales like N² times the cube of the entries, so with 512
proposals per image A_e X would explode. Row-stochastic maps multiply to a row-stochastic A_e, so every
A_e X row is a convex combination of proposal features — bounded by max|X| for any N — and A_e's entries
lie in [0, 1], ready to draw as Fig. 4's line opacities. The 1/D scaling keeps A the *mean* per-channel
product, so its range does not grow with the graph width. The softmax ignores a constant added to a
row, so the last 1x1 convolution of each map has no bias (it could never learn).

The paper's implementation paragraph mentions an Ns x D x D (XᵀX) matrix instead; we implement the
equations (proposal relations); this and the module's other readings (the maps, the 1/D scaling, the row softmax,
the ReLU after sigma) are in the readings table of projects/DeepLesion/README.md.

Export (``+stage=export``). Two things would not leave Python as written, and the module takes another path for
them while it is traced (``torch.jit.trace``, ``torch.onnx.export``), computing the same numbers to float rounding
(tests/modeling/test_exportable.py): ONNX has adaptive average pooling only where D divides d (the FC head's
d = 64 < D at the tiny widths, d = 1000 and D = 300, ...), so pool_D becomes a gather of each bin's values, summed
under a 0/1 mask and divided by the bin's length (:func:`pool_bins`); and the per-image split takes its sizes as
Python ints, which a trace records as constants, so a batch of one image (what an exported detector runs) is not
split at all and the proposal count stays free.
"""
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fsd_d2.errors import ConfigError


def pool_bins(in_dim: int, dim: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adaptive average pooling of ``in_dim`` values to ``dim`` as data: bin j covers ``[floor(j in/D),
    ceil((j+1) in/D))`` (PyTorch's bins). Returns (index D x L, mask D x L of 0/1, length D), L the longest
    bin; padded slots repeat the bin's last index under a 0 in the mask."""
    j = torch.arange(dim)
    start, end = j * in_dim // dim, ((j + 1) * in_dim + dim - 1) // dim
    length = end - start
    offsets = torch.arange(int(length.max()))
    index = torch.minimum(start[:, None] + offsets, end[:, None] - 1)
    return index, (offsets < length[:, None]).float(), length.float()


def _relation_map(hidden: int) -> nn.Sequential:
    """A learned scalar function of each relation value, as 1x1 convolutions over a 1-channel image."""
    return nn.Sequential(nn.Conv2d(1, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, 1, 1, bias=False))


class RegionGraph(nn.Module):
    """Propagates information between the proposals of the same image only (eqs. 5-6), at a fixed width.

    Args:
        in_dim: d, the width of the box head's flat per-proposal features.
        dim: D, the width of the graph's nodes and output (``MODEL.GRAPH.DIM``); the parameters depend on it,
            not on ``in_dim``.
        hidden: channels of the 1x1 convolutions of varphi, phi and delta (``MODEL.GRAPH.HIDDEN``).
    """

    def __init__(self, in_dim: int, dim: int, hidden: int):
        super().__init__()
        if min(in_dim, dim, hidden) <= 0:
            raise ConfigError(f"RegionGraph needs positive widths: box head features {in_dim}, "
                              f"model.graph_dim={dim}, model.graph_hidden={hidden}")
        self.in_dim, self.dim = in_dim, dim
        self.varphi = _relation_map(hidden)  # eq. 5's varphi_w, on Aᵀ
        self.phi = _relation_map(hidden)  # phi_w, on A
        self.delta = _relation_map(hidden)  # delta_w, on Aᵀ
        self.sigma = nn.Linear(dim, dim)  # σ: the graph convolution's trainable matrix (followed by ReLU)

    def nodes(self, features: torch.Tensor) -> torch.Tensor:
        """X (R x D): the box head's (R x d) features average-pooled to the graph width."""
        if torch.jit.is_tracing():  # ONNX pools adaptively only where D divides d: the same bins, as a gather
            index, mask, length = (t.to(features.device) for t in pool_bins(self.in_dim, self.dim))
            return (features[:, index] * mask).sum(dim=2) / length
        return F.adaptive_avg_pool1d(features[:, None], self.dim)[:, 0]

    def enhanced_adjacency(self, x: torch.Tensor) -> torch.Tensor:
        """A_e (N x N, rows sum to 1) for the nodes ``x`` (N x D) of one image."""
        a = (x @ x.t()) / self.dim

        def mapped(m: nn.Module, rel: torch.Tensor) -> torch.Tensor:
            return F.softmax(m(rel[None, None])[0, 0], dim=1)

        return mapped(self.varphi, a.t()) @ mapped(self.phi, a) @ mapped(self.delta, a.t())

    def forward(self, features: torch.Tensor,
                num_per_image: Sequence[int]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """
        Args:
            features: (R, d) box-head features of all proposals of a batch, image after image (Detectron2's
                ROI order).
            num_per_image: proposals of each image; they must sum to R. Zeros are allowed.

        Returns:
            x_e: (R, D) updated node features, in the order of ``features``.
            relations: per image, its detached A_e (n_i x n_i) for visualisation.
        """
        counts = [int(n) for n in num_per_image]
        if (features.dim() != 2 or features.shape[1] != self.in_dim or sum(counts) != features.shape[0]
                or min(counts, default=0) < 0):
            raise ValueError(
                f"RegionGraph expects (R, {self.in_dim}) features and per-image counts summing to R; got features "
                f"{tuple(features.shape)} and counts {counts}. Pass len(p) for each image's proposals.")
        outputs, relations = [], []
        # One image at a time: no proposal can see another image's, whatever the batch holds. One image is not
        # split: a traced split would fix its proposal count.
        nodes = self.nodes(features)
        for xi in ([nodes] if len(counts) == 1 else nodes.split(counts)):
            a_e = self.enhanced_adjacency(xi) if len(xi) else xi.new_zeros((0, 0))
            outputs.append(F.relu(self.sigma(a_e @ xi)))
            relations.append(a_e.detach())
        return (torch.cat(outputs) if outputs else features.new_zeros((0, self.dim))), relations
