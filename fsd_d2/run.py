"""Hydra entry point: ``python -m fsd_d2.run +stage=<name> [group=option] [key=value ...] [--multirun]``."""
import json
import logging
import os
import sys
from pathlib import Path
from typing import Dict

import hydra
import torch
from detectron2.engine import launch
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import fsd_d2  # noqa: F401  (registers every component and stage)
from fsd_d2.config import build_cfg
from fsd_d2.engine.stages import get_stage, stage_names
from fsd_d2.engine.wandb import finish_wandb
from fsd_d2.errors import USER_ERRORS

logger = logging.getLogger("fsd_d2")
# Stages that run in one process whatever num_gpus says: the pipeline launches each of its stages itself,
# prepare has its own worker pool, and visualize draws a handful of images.
_SINGLE_PROCESS_STAGES = ("pipeline", "prepare", "visualize")


def _name_the_run(hcfg: DictConfig) -> None:
    """W&B group = the sweep (one group per --multirun), job type = the stage, name = the run directory."""
    if not HydraConfig.initialized() or not hcfg.logger.enabled:
        return
    hc = HydraConfig.get()
    sweep = hc.mode == RunMode.MULTIRUN
    if not hcfg.logger.group and sweep:
        hcfg.logger.group = f"{hcfg.stage.name}-{Path(hc.sweep.dir).name}"
    if not hcfg.logger.run_name:
        hcfg.logger.run_name = f"{hcfg.stage.name}-{Path(hc.runtime.output_dir).name}"


def _log_to(path: Path) -> None:
    """Detectron2's console + file logging, re-pointed for each stage a process runs (pipeline, tests).
    Processes other than rank 0 log to ``log.txt.rank<N>`` only."""
    setup_logger.cache_clear()
    for name in ("detectron2", "fsd_d2"):
        logging.getLogger(name).handlers.clear()
    rank = comm.get_rank()
    setup_logger(output=str(path), distributed_rank=rank, name="detectron2")
    setup_logger(output=str(path), distributed_rank=rank, name="fsd_d2", abbrev_name="fsd")


def _world_size(hcfg: DictConfig) -> int:
    return int(hcfg.get("num_gpus", 1)) * int(hcfg.get("num_machines", 1))


def run_stage(hcfg: DictConfig) -> Dict:
    """Compose the CfgNode, run the stage, save ``results.json``; the same path for CLI and tests.

    With ``num_gpus`` (x ``num_machines``) > 1 the stage runs in that many processes started by Detectron2's
    ``launch``; rank 0 writes the run directory's files and W&B run, and its results are returned.
    """
    if "stage" not in hcfg:
        raise KeyError(f"no stage chosen: add +stage=<name>, one of {stage_names()}")
    if _world_size(hcfg) > 1 and comm.get_world_size() == 1 and hcfg.stage.name not in _SINGLE_PROCESS_STAGES:
        return _launch(hcfg)
    out = Path(hcfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _log_to(out / "log.txt")
    if hcfg.device == "cpu":
        torch.set_flush_denormal(True)  # weights decaying towards 0 otherwise hit denormal slow paths (x100 on CPU)
    _name_the_run(hcfg)
    if comm.is_main_process():
        (out / "config.yaml").write_text(OmegaConf.to_yaml(hcfg, resolve=True))
    cfg = build_cfg(hcfg)
    # Detectron2's rule: one seed per process, so the ranks draw different samples and augmentations.
    seed_all_rng(cfg.SEED + comm.get_rank())
    runner = get_stage(cfg.FSD_STAGE)
    try:
        results = runner(cfg, hcfg)
    finally:
        finish_wandb()
    if comm.is_main_process():
        with open(out / "results.json", "w") as f:
            json.dump(results, f, indent=2, default=float)
        logger.info(f"stage {cfg.FSD_STAGE} done; results in {out / 'results.json'}")
    return results


def _launch(hcfg: DictConfig) -> Dict:
    """Run the stage in ``num_gpus`` processes per machine; returns rank 0's results (on machine 0)."""
    _name_the_run(hcfg)  # needs Hydra's runtime, which only this process has
    resolved = OmegaConf.create(OmegaConf.to_container(hcfg, resolve=True))
    launch(run_stage, int(hcfg.num_gpus), num_machines=int(hcfg.num_machines), machine_rank=int(hcfg.machine_rank),
           dist_url=str(hcfg.dist_url), args=(resolved,))
    results = Path(resolved.output_dir) / "results.json"
    return json.loads(results.read_text()) if results.exists() else {}


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(hcfg: DictConfig) -> None:
    try:
        run_stage(hcfg)
    except USER_ERRORS as e:
        if os.environ.get("FSD_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}\n(set FSD_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
