"""Heatmaps of the architecture weights (softmaxed alphas), one panel per cell type, to watch a search converge.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot), so no backend or global state is touched.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Union

import numpy as np
import torch
from matplotlib.figure import Figure

from fsd_d2.nas.genotype import input_name, num_edges
from fsd_d2.viz import save_figure


def edge_labels(num_nodes: int) -> List[str]:
    """Row labels in alpha order: 'c_{k-2} -> 0', 'c_{k-1} -> 0', 'c_{k-2} -> 1', ..."""
    return [f"{input_name(j)} -> {i}" for i in range(num_nodes) for j in range(2 + i)]


def _num_nodes(cell_type: str, shape, pool_ops: List[str]) -> int:
    n = 0
    while num_edges(n) < shape[0]:
        n += 1
    if len(shape) != 2 or shape[1] != len(pool_ops) or num_edges(n) != shape[0]:
        raise ValueError(f"plot_alphas: alphas['{cell_type}'] has shape {tuple(shape)}, expected (edges, "
                         f"{len(pool_ops)}) with edges = 2 + 3 + ... (14 for 4 nodes) for pool {pool_ops}")
    return n


def plot_alphas(alphas: Dict[str, torch.Tensor], pool_ops: Sequence[str], path: Union[str, Path],
                title: str = "") -> Path:
    """Write a PNG with softmax(alphas[cell_type]) as an edges x ops heatmap per cell type; returns ``path``."""
    pool_ops = list(pool_ops)
    if not alphas:
        raise ValueError("plot_alphas: no alphas given (expected e.g. {'reduce': tensor of shape (14, len(pool))})")
    nodes = {t: _num_nodes(t, tuple(a.shape), pool_ops) for t, a in alphas.items()}
    rows = max(num_edges(n) for n in nodes.values())
    fig = Figure(figsize=((2.5 + 0.5 * len(pool_ops)) * len(alphas), 1.5 + 0.35 * rows))
    for ax, (cell_type, logits) in zip(fig.subplots(1, len(alphas), squeeze=False)[0], alphas.items()):
        weights = torch.softmax(logits.detach().float().cpu(), dim=-1).numpy()
        image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=float(weights.max()), aspect="auto")
        for (r, c), w in np.ndenumerate(weights):
            ax.text(c, r, f"{w:.2f}", ha="center", va="center", fontsize=6,
                    color="black" if w > 0.6 * weights.max() else "white")
        ax.set_xticks(range(len(pool_ops)), pool_ops, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(weights.shape[0]), edge_labels(nodes[cell_type]), fontsize=8)
        ax.set_title(cell_type)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
