"""One job of a sweep (``--multirun``): what it returns to the sweeper and what it leaves when it fails.

- A job returns its stage's headline metric (``objective.metric`` of ``objective.split``, by default the first
  test split) so an optimising sweeper (``hydra/sweeper=optuna``) can tune it; stages that evaluate nothing
  (the searches, prepare, visualize) return None.
- A failing job writes its overrides and error beside its results (``error.txt``) and the other jobs run.

The sweep's summary of its jobs is :mod:`fsd_d2.engine.sweep`.
"""
import logging
import sys
import traceback
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from fsd_d2.errors import ConfigError, FSDError

logger = logging.getLogger(__name__)
ERROR_NAME = "error.txt"  # a failed job's overrides and error, in its run directory


def in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_group(stage_name: str, sweep_dir: str) -> str:
    """The W&B group of a sweep's runs (the jobs' and the summary's), unless ``logger.group`` names one."""
    return f"{stage_name}-{Path(sweep_dir).name}"


def forget_failure(output_dir: str) -> None:
    """A job starting again in its directory: the record of an earlier failure there no longer describes it."""
    (Path(output_dir) / ERROR_NAME).unlink(missing_ok=True)


def record_failed_job(output_dir: str, error: BaseException) -> None:
    """Write the job's overrides and error (the exception and its message first, then a bug's traceback) and say
    so on stderr."""
    overrides = " ".join(HydraConfig.get().overrides.task)
    trace = "" if isinstance(error, FSDError) else traceback.format_exc()
    path = Path(output_dir) / ERROR_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"overrides: {overrides}\n{type(error).__name__}: {error}\n{trace}")
    print(f"error: job {HydraConfig.get().job.num} ({overrides}) failed: {error}\n(details in {path}); "
          f"the sweep goes on", file=sys.stderr)


def split_metrics(results: Mapping[str, Any], split: Optional[str] = None) -> Tuple[str, Dict[str, float]]:
    """``(split, its bbox metrics)`` from a stage's results (the pipeline's: its last stage that evaluated);
    ``split`` None is the first test split. ``("", {})`` when the stage evaluated nothing."""
    evaluated = {name: r["bbox"] for name, r in results.items() if isinstance(r, Mapping) and "bbox" in r}
    if not evaluated:
        for stage_results in reversed(list(results.get("results", {}).values())):  # +stage=pipeline
            found = split_metrics(stage_results, split)
            if found[1]:
                return found
        return "", {}
    split = split or next(iter(evaluated))
    if split not in evaluated:
        raise ConfigError(f"objective.split={split} was not evaluated; the stage evaluated {sorted(evaluated)}")
    return split, dict(evaluated[split])


def objective_value(results: Mapping[str, Any], metric: str, split: Optional[str] = None) -> Optional[float]:
    """What the job returns to the sweeper: ``metric`` of ``split``, or None for a stage that evaluates nothing."""
    split, metrics = split_metrics(results, split)
    if not metrics:
        logger.info(f"objective: this stage evaluates nothing, so the job returns no {metric}")
        return None
    if metric not in metrics:
        raise ConfigError(f"objective.metric={metric} is not a metric of {split}; its metrics: {sorted(metrics)}")
    return float(metrics[metric])
