"""Drawing of a derived cell (DARTS' cell plots) with matplotlib only: no graphviz binary is needed.

Inputs c_{k-2} / c_{k-1} sit on the left, intermediate nodes 0..n-1 on a line, the output c_{k} (their
concatenation) on the right. Each edge carries its operation name and bends just enough to clear other nodes
and earlier labels.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Union

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyArrowPatch

from fsd_d2.nas.genotype import CellGenotype
from fsd_d2.viz import save_figure

_INPUT_LABELS = ("$c_{k-2}$", "$c_{k-1}$")
_STEP = 2.4  # horizontal distance between intermediate nodes (node radius 0.42)
_BENDS = (0.0, 0.15, -0.15, 0.3, -0.3, 0.45, -0.45)  # arc3 curvatures tried per edge


def draw_cell(cell_genotype: CellGenotype, path: Union[str, Path], title: str = "") -> Path:
    """Write a PNG drawing of ``cell_genotype``; returns ``path``."""
    n = cell_genotype.num_nodes
    pos = [(0.0, 1.6), (0.0, -1.6)] + [(_STEP * (i + 1), 0.0) for i in range(n)] + [(_STEP * (n + 1), 0.0)]
    colors = ["#9ecae1"] * 2 + ["#fdd0a2"] * n + ["#c7e9c0"]
    labels = list(_INPUT_LABELS) + [str(i) for i in range(n)] + ["$c_{k}$"]
    fig = Figure(figsize=(1.6 + 1.5 * (n + 1), 4.2))
    ax = fig.subplots()
    circles = [Circle(p, 0.42, facecolor=c, edgecolor="black", zorder=3) for p, c in zip(pos, colors)]
    for circle, (x, y), label in zip(circles, pos, labels):
        ax.add_patch(circle)
        ax.text(x, y, label, ha="center", va="center", fontsize=10, zorder=4)

    centers = np.array(pos)
    labels_at: List[np.ndarray] = []

    def edge(src: int, dst: int, label: str = "", **style):
        """Pick the arc bend that keeps the edge off other nodes and its label off earlier labels."""
        p1, p2 = centers[src], centers[dst]
        others = np.delete(centers, [src, dst], axis=0)

        def score(rad):
            ctrl = (p1 + p2) / 2 + rad * np.array([p2[1] - p1[1], p1[0] - p2[0]])
            t = np.linspace(0.1, 0.9, 17)[:, None]
            curve = (1 - t) ** 2 * p1 + 2 * (1 - t) * t * ctrl + t ** 2 * p2
            clear = np.linalg.norm(curve[:, None] - others[None], axis=-1).min() if len(others) else 9.0
            mid = curve[8]
            apart = min((np.linalg.norm(mid - q) for q in labels_at), default=9.0) if label else 9.0
            return min(clear, 1.0) + min(apart, 0.9) - 0.2 * abs(rad), mid

        rad = max(_BENDS, key=lambda r: score(r)[0])
        ax.add_patch(FancyArrowPatch(tuple(p1), tuple(p2), patchA=circles[src], patchB=circles[dst], zorder=2,
                                     connectionstyle=f"arc3,rad={rad}", arrowstyle="-|>", mutation_scale=12,
                                     **style))
        if label:
            mid = score(rad)[1]
            labels_at.append(mid)
            ax.text(*mid, label, fontsize=7, ha="center", va="center", zorder=5,
                    bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none", alpha=0.85))

    for i, node in enumerate(cell_genotype.edges):
        for op, j in node:
            edge(j, 2 + i, op, color="black", lw=1.1)
    for i in range(n):
        edge(2 + i, 2 + n, color="grey", lw=0.8, ls="--")

    ax.set_xlim(-0.8, pos[-1][0] + 0.8)
    ax.set_ylim(-2.6, 2.6)
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        ax.set_title(title)
    return save_figure(fig, path, dpi=110)
