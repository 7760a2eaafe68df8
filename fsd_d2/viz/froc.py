"""FROC curves (sensitivity vs. false positives per image) with the paper's six FPPI points marked.

Built with ``matplotlib.figure.Figure`` (no pyplot), so no backend or global state is touched.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
from matplotlib.figure import Figure

from fsd_d2.viz import save_figure

FPPI_RANGE = (0.125, 16.0)


def plot_froc(curves: Dict[str, Tuple[np.ndarray, np.ndarray]], path: Optional[Union[str, Path]] = None, *,
              points: Sequence[float], marks: Dict[str, Sequence[float]], title: str = "") -> Figure:
    """One step curve per criterion (e.g. ``{"IoU": (fppi, sens), "IoBB": ...}``, sensitivity as a fraction),
    log-x FPPI axis over 0.125..16, each curve's ``marks`` (sensitivity in percent at ``points`` FPPI, the
    evaluator's reported numbers) marked and printed.

    Each curve is a step function (see :func:`fsd_d2.evaluation.metrics.sensitivity_at_fppi`), drawn as such so
    the marks sit on it. Saves a PNG to ``path`` when given; returns the figure.
    """
    if not curves:
        raise ValueError("plot_froc: no curves given (expected e.g. {'IoU': (fppi, sensitivity)})")
    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    styles = zip(("tab:blue", "tab:orange", "tab:green", "tab:red"), (-12, 5, -20, 13))  # label offsets apart
    for (name, (fppi, sens)), (color, dy) in zip(curves.items(), styles):
        fppi, sens = np.asarray(fppi, np.float64), 100 * np.asarray(sens, np.float64)
        end = min(len(fppi), int(np.searchsorted(fppi, FPPI_RANGE[1], side="right")) + 1)  # nothing past the axis
        x, y = fppi[:end], sens[:end]
        if x[-1] < FPPI_RANGE[1]:  # detections ran out: the reported sensitivity stays the final one
            x, y = np.append(x, FPPI_RANGE[1]), np.append(y, y[-1])
        ax.step(x, y, where="post", color=color, label=name)
        ax.plot(points, marks[name], "o", color=color)
        for fp, s in zip(points, marks[name]):
            ax.annotate(f"{s:.1f}", (fp, s), textcoords="offset points", xytext=(0, dy), ha="center", fontsize=7,
                        color=color)
    ax.set_xscale("log", base=2)
    ax.set_xlim(*FPPI_RANGE)
    ticks = sorted({FPPI_RANGE[0], 0.25, *points})
    ax.set_xticks(ticks, [f"{p:g}" for p in ticks])
    ax.minorticks_off()
    ax.set_ylim(0, 103)
    ax.set_xlabel("false positives per image")
    ax.set_ylabel("sensitivity (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title)
    if path is not None:
        save_figure(fig, path)
    return fig
