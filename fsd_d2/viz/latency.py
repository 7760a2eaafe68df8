"""Heatmap of an op-latency table: which operation costs what, where, on the profiled device."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from fsd_d2.nas.latency import LatencyTable
from fsd_d2.viz import save_figure


def plot_latency_table(table: LatencyTable, path: Union[str, Path]) -> Path:
    """ops x cells heatmap of milliseconds per edge (log colour scale); a reduction cell has two columns, its
    stride-2 edges (``in``) and its stride-1 node edges (``node``). ``none`` (0 ms) is left out."""
    ops = [op for op in table.ops if op != "none"]
    columns, values = [], []
    for cell in table.cells:
        sides = [("in", 0), ("node", 1)] if cell.position.reduction else [("", 0)]
        for label, side in sides:
            columns.append(f"{cell.position.name} {label}".strip())
            values.append([cell.ms[op][side] for op in ops])
    ms = np.array(values).T  # ops x columns
    fig = Figure(figsize=(3 + 0.55 * len(columns), 1.5 + 0.4 * len(ops)))
    ax = fig.subplots()
    positive = ms[ms > 0]
    norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size and positive.max() > positive.min() else None
    image = ax.imshow(np.where(ms > 0, ms, np.nan), cmap="viridis", norm=norm, aspect="auto")
    for (r, c), v in np.ndenumerate(ms):
        light = norm is not None and v > 0 and norm(v) > 0.6
        ax.text(c, r, f"{v:.2g}", ha="center", va="center", fontsize=6, color="black" if light else "white")
    ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(ops)), ops, fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="ms per edge")
    meta = table.meta
    ax.set_title(f"{table.kind} ops ({table.pool}) on {meta.get('device', '?')} {meta.get('device_name', '')}, "
                 f"torch {meta.get('torch', '?')}", fontsize=9)
    return save_figure(fig, path)
