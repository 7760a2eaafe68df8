"""Hydra entry point: ``python -m fsd_d2.run +stage=<name> [group=option] [key=value ...] [--multirun]``.

A user error (:class:`fsd_d2.errors.FSDError`) prints as one line and exits with status 2; anything else is a
bug and keeps its traceback. ``FSD_DEBUG=1`` shows the traceback of user errors too. The job returns its
stage's ``objective.metric`` (None for a stage that evaluates nothing), which an optimising sweeper such as
``hydra/sweeper=optuna`` maximises or minimises. In a ``--multirun`` a failing job is recorded, returns None
(Optuna counts the trial as failed) and the sweep goes on (:mod:`fsd_d2.engine.sweep_job`).
"""
import os
import sys
from typing import Optional

import hydra
from omegaconf import DictConfig

from fsd_d2.config import register_config_groups
from fsd_d2.engine.runner import run_stage
from fsd_d2.engine.sweep_job import forget_failure, in_sweep, objective_value, record_failed_job
from fsd_d2.errors import FSDError, storage_error

# Before Hydra composes conf/: the generated group bases and the packaged pools. At import, so that a submitit
# worker, which imports this module to unpickle main and composes its job's config there, has them too.
register_config_groups()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(hcfg: DictConfig) -> Optional[float]:
    if in_sweep():
        forget_failure(hcfg.output_dir)
    try:
        results = run_stage(hcfg)
        return objective_value(results, hcfg.objective.metric, hcfg.objective.split)
    except Exception as e:
        e = storage_error(e) or e
        if in_sweep():
            record_failed_job(hcfg.output_dir, e)
            return None
        if not isinstance(e, FSDError) or os.environ.get("FSD_DEBUG"):
            raise
        print(f"error: {e}\n(set FSD_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
