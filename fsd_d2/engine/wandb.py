"""Weights & Biases, the only module that talks to it: the run of a stage, a Detectron2 ``EventWriter`` for the
trainers' scalars, the pictures, tables and artifacts the stages produce, and a sweep's summary.

Offline by default: a run lands in ``<run dir>/wandb`` and ``wandb sync <run dir>/wandb/offline-run-*`` uploads it.
Every ``log_*`` function but :func:`log_sweep` (which starts a run of its own) does nothing when no run is active,
so callers need not know whether W&B is on.
"""
import logging
import os
from typing import Any, Dict, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg

from detectron2.config import CfgNode
from detectron2.utils.events import EventWriter, get_event_storage

from fsd_d2.evaluation.report import Table

logger = logging.getLogger(__name__)


def wandb_settings(cfg: CfgNode) -> Dict[str, Any]:
    """The arguments of ``wandb.init`` for this run; ``WANDB_MODE`` in the environment overrides the config."""
    return dict(
        project=cfg.WANDB.PROJECT,
        entity=cfg.WANDB.ENTITY or None,
        mode=os.environ.get("WANDB_MODE", cfg.WANDB.MODE),
        group=cfg.WANDB.GROUP or None,
        job_type=cfg.WANDB.JOB_TYPE or cfg.FSD_STAGE or None,
        name=cfg.WANDB.NAME or None,
        tags=list(cfg.WANDB.TAGS) or None,
        dir=cfg.OUTPUT_DIR,
    )


def init_wandb(cfg: CfgNode, config: Optional[Dict[str, Any]] = None):
    """Start (once per process) the W&B run of this stage; returns it, or None when logging is off."""
    if not cfg.WANDB.ENABLED:
        return None
    import wandb

    if wandb.run is not None:
        return wandb.run
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    run = wandb.init(config=config, reinit=True, settings=wandb.Settings(silent=True, console="off"),
                     **wandb_settings(cfg))
    logger.info(f"W&B run {run.id} ({wandb_settings(cfg)['mode']}) in {run.dir}")
    return run


def finish_wandb() -> None:
    import wandb

    if wandb.run is not None:
        wandb.finish()


def log_images(images: Dict[str, Any]) -> None:
    """Log PNG files: ``{key: path}`` or ``{key: [paths]}`` (a list becomes a gallery with file-name captions)."""
    import wandb

    if wandb.run is None:
        return
    wandb.log({key: [wandb.Image(p, caption=os.path.basename(p)) for p in value] if isinstance(value, list)
               else wandb.Image(value) for key, value in images.items()})


def log_artifact(path: str, name: str, kind: str) -> None:
    """Version a file (e.g. a genotype) as a W&B artifact of type ``kind``."""
    import wandb

    if wandb.run is None:
        return
    artifact = wandb.Artifact(name, type=kind)
    artifact.add_file(path)
    wandb.run.log_artifact(artifact)


def log_evaluation(prefix: str, metrics: Dict[str, float], report) -> None:
    """An evaluator's scalars as ``<prefix>/<key>``, its tables as ``wandb.Table``, the FROC figure and the
    detection drawings (``report``: :class:`fsd_d2.evaluation.report.EvaluationReport`)."""
    import wandb

    if wandb.run is None:
        return
    canvas = FigureCanvasAgg(report.froc)
    canvas.draw()
    data = {f"{prefix}/{k}": v for k, v in metrics.items()}
    for t in report.tables:
        data[f"{prefix}/{t.key}"] = wandb.Table(columns=["criterion", *t.header[1:]], data=t.rows)
    data[f"{prefix}/froc"] = wandb.Image(np.asarray(canvas.buffer_rgba())[..., :3])
    if report.drawings:
        data[f"{prefix}/detections"] = [wandb.Image(p, caption=os.path.basename(p)) for p in report.drawings]
    wandb.log(data)


def log_sweep(logger_settings: Dict[str, Any], *, name: str, directory: str, tables: Sequence[Table],
              images: Dict[str, str], job_type: str = "sweep") -> None:
    """A sweep's summary as its own W&B run (of ``job_type``, in the sweep's group): ``tables`` (the summary
    first) as ``wandb.Table`` and the PNGs of ``images``. ``logger_settings``: the Hydra ``logger`` group
    (``project``, ``entity``, ``mode``, ``group``, ``tags``); ``WANDB_MODE`` in the environment overrides the mode."""
    import wandb

    run = wandb.init(project=logger_settings["project"], entity=logger_settings.get("entity") or None,
                     mode=os.environ.get("WANDB_MODE", logger_settings["mode"]),
                     group=logger_settings.get("group") or None, job_type=job_type, name=name,
                     tags=list(logger_settings.get("tags") or []) or None, dir=directory, reinit=True,
                     settings=wandb.Settings(silent=True, console="off"))
    data = {f"sweep/{t.key}": wandb.Table(columns=[str(c) or f"col{i}" for i, c in enumerate(t.header)],
                                          data=t.rows, allow_mixed_types=True) for t in tables}
    data.update({key: wandb.Image(path) for key, path in images.items()})
    run.log(data)
    logger.info(f"W&B sweep run {run.id} in {run.dir}")
    run.finish()


class WandbWriter(EventWriter):
    """Sends the trainer's scalars (smoothed as Detectron2 hints) and visualised images to the active W&B run."""

    def __init__(self, window_size: int = 20):
        self._window_size = window_size
        self._last_write = -1

    def write(self):
        import wandb

        if wandb.run is None:
            return
        storage = get_event_storage()
        by_iter: Dict[int, Dict[str, Any]] = {}
        for name, (value, it) in storage.latest_with_smoothing_hint(self._window_size).items():
            if it > self._last_write:
                by_iter.setdefault(it, {})[name] = value
        for img_name, img, it in storage._vis_data:
            by_iter.setdefault(it, {})[img_name] = wandb.Image(img.transpose(1, 2, 0))
        if len(storage._vis_data) >= 1:
            storage.clear_images()
        for it in sorted(by_iter):
            wandb.log(by_iter[it], step=it)
        if by_iter:
            self._last_write = max(by_iter)
