"""A sweep (``--multirun``) survives a failing job: the job's error is written beside its results, the other
jobs run, and the sweep ends with a list of the failures and a non-zero exit status."""
import logging
import sys
import traceback
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from fsd_d2.errors import FSDError

logger = logging.getLogger(__name__)
ERROR_NAME = "error.txt"  # a failed job's overrides and error, in its run directory


def in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record_failed_job(output_dir: str, error: BaseException) -> None:
    """Write the job's overrides and error (with the traceback of a bug) and say so on stderr."""
    overrides = " ".join(HydraConfig.get().overrides.task)
    detail = str(error) if isinstance(error, FSDError) else traceback.format_exc()
    path = Path(output_dir) / ERROR_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"overrides: {overrides}\n{type(error).__name__}: {detail}\n")
    print(f"error: job {HydraConfig.get().job.num} ({overrides}) failed: {error}\n(details in {path}); "
          f"the sweep goes on", file=sys.stderr)


class ReportFailedJobs(Callback):
    """Hydra callback: at the end of a multirun, list the jobs that failed and exit with status 1."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        failed = sorted(Path(config.hydra.sweep.dir).glob(f"*/{ERROR_NAME}"))
        if not failed:
            return
        lines = [f"  {p.parent.name}: {p.read_text().splitlines()[0]}" for p in failed]
        print(f"error: {len(failed)} job(s) of the sweep in {config.hydra.sweep.dir} failed:\n" + "\n".join(lines),
              file=sys.stderr)
        sys.exit(1)
