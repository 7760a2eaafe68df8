"""Weights & Biases as a Detectron2 ``EventWriter``: scalars, the config, and images from the event storage.

Offline by default: a run lands in ``<run dir>/wandb`` and ``wandb sync <run dir>/wandb/offline-run-*`` uploads it.
"""
import logging
import os
from typing import Any, Dict, Optional

from detectron2.config import CfgNode
from detectron2.utils.events import EventWriter, get_event_storage

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


def log_to_wandb(data: Dict[str, Any], step: Optional[int] = None) -> None:
    """Log when a run is active; library code calls this without caring whether W&B is on."""
    import wandb

    if wandb.run is not None:
        wandb.log(data, step=step)


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
