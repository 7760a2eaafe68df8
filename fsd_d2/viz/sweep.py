"""The sweep summary's plot: a metric against the value of one swept key."""
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from matplotlib.figure import Figure

from fsd_d2.viz import save_figure


def _number(value: str) -> Optional[float]:
    try:
        return float(value)
    except ValueError:
        return None


def plot_against(points: Sequence[Tuple[str, str, float]], key: str, metric: str, path: Path,
                 missing: int = 0) -> Path:
    """``metric`` against the value of ``key``, ``points`` = (the key's value as given, the line's label, the
    metric) of each finished job; one line per label (a combination of the other swept keys): a number axis (log
    for a wide positive range) when every value is a number, else one tick per value in the order given.
    ``missing`` jobs without the metric are named in the title."""
    numbers = [_number(value) for value, _, _ in points]
    numeric = bool(points) and all(n is not None for n in numbers)
    ticks = list(dict.fromkeys(value for value, _, _ in points))
    series: Dict[str, List[Tuple[float, float]]] = {}
    for (value, label, y), number in zip(points, numbers):
        x = number if numeric else ticks.index(value)
        series.setdefault(label, []).append((x, y))
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    for label, xy in series.items():
        ax.plot(*zip(*sorted(xy)), "o-", label=label or None)
    if numeric and min(numbers) > 0 and max(numbers) >= 10 * min(numbers):
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(ticks)), ticks, rotation=20, ha="right", fontsize=8)
        ax.set_xlim(-0.5, len(ticks) - 0.5)
    if 1 < len(series) <= 10:
        ax.legend(fontsize=7)
    ax.set_title(f"{metric} vs {key}" + (f" ({missing} job(s) without it not shown)" if missing else ""), fontsize=10)
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    return save_figure(fig, path)
