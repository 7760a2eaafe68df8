"""Cell widths that give a derived FSD a parameter budget: the paper's size relation for any genotype.

The paper's Table I compares FSD backbone + FC head (37.8M) and FSD (24.7M) with FPN-R50 (39.5M): 0.96x and 0.63x.
At fixed widths a searched or random genotype moves these counts by its operations' sizes (a cell of 3x3
convolutions is several times one of separable ones), so architectures would be compared at different sizes.
``stage.match_params`` on the pipeline instead solves, for the genotypes at hand, the widths that put each model at
its multiple of FPN-R50's parameters at the same settings, as NAS evaluations compare architectures at equal size.
"""
import logging
from typing import Callable, Sequence

from detectron2.modeling import build_model
from hydra import compose

from fsd_d2.config import build_cfg
from fsd_d2.evaluation.params import count_parameters

logger = logging.getLogger(__name__)
WIDTH_STEP = 8  # widths are multiples of 8, so partial channels K = 2, 4, 8 divide them


def nearest_width(millions: Callable[[int], float], target: float, *, step: int = WIDTH_STEP,
                  largest: int = 512) -> int:
    """The multiple of ``step`` in [step, largest] whose ``millions(width)`` (increasing in the width) is nearest
    ``target``: a bisection, so a handful of models are built."""
    lo, hi = 1, largest // step
    while lo < hi:  # the smallest multiple at or above the target
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if millions(mid * step) < target else (lo, mid)
    candidates = {w: abs(millions(w) - target) for w in {max(step, (lo - 1) * step), lo * step}}
    return min(candidates, key=candidates.get)


def millions_of(overrides: Sequence[str]) -> float:
    """Total parameters (millions) of the model that ``python -m fsd_d2.run <overrides>`` builds, on the CPU."""
    cfg = build_cfg(compose(config_name="config", overrides=[*overrides, "device=cpu"]))
    return count_parameters(build_model(cfg))["total"]


def matched_width(overrides: Sequence[str], key: str, target: float) -> int:
    """The value of the width ``key`` (e.g. ``model.bone_channels``) nearest ``target`` millions of parameters for
    the model of ``overrides``."""
    width = nearest_width(lambda w: millions_of([*overrides, f"{key}={w}"]), target)
    logger.info(f"match_params: {key}={width} gives {millions_of([*overrides, f'{key}={width}']):.2f}M "
                f"(target {target:.2f}M)")
    return width
