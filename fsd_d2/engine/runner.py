"""Run one stage from a composed Hydra config: the same path for the command line, the pipeline and the tests.

Hydra config -> CfgNode (:func:`fsd_d2.config.build_cfg`) -> the registered splits and what follows from them
(classes, iterations, genotypes recorded in the checkpoint) -> frozen CfgNode + typed stage arguments -> the
stage's runner -> ``results.json``. The run directory receives both configs and the W&B run.
"""
import json
import logging
import time
from pathlib import Path
from typing import Dict

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import launch
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from fsd_d2.config import apply_dataset_size, apply_num_classes, build_cfg
from fsd_d2.data.setup import setup_datasets, unregistered_hint
from fsd_d2.engine.checkpoint import architecture_from_checkpoint
from fsd_d2.engine.cluster import slurm_rendezvous
from fsd_d2.engine.rundir import CONFIG_NAME, own_run_directory
from fsd_d2.engine.stages import Stage, StageArgs, get_stage, make_stage_args, stage_names
from fsd_d2.engine.sweep_job import sweep_group
from fsd_d2.engine.wandb import finish_wandb, init_wandb
from fsd_d2.errors import ConfigError

logger = logging.getLogger(__name__)


def _name_the_run(hcfg: DictConfig) -> None:
    """W&B group = the sweep (one group per --multirun), job type = the stage, name = the run directory."""
    if not HydraConfig.initialized() or not hcfg.logger.enabled:
        return
    hc = HydraConfig.get()
    if not hcfg.logger.group and hc.mode == RunMode.MULTIRUN:
        hcfg.logger.group = sweep_group(hcfg.stage.name, hc.sweep.dir)
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


def _classes(splits) -> list:
    """The lesion classes shared by ``splits``; splits of different kinds cannot train one detector."""
    by_split = {name: list(MetadataCatalog.get(name).thing_classes) for name in splits}
    kinds = {tuple(c) for c in by_split.values()}
    if len(kinds) > 1:
        raise ConfigError(f"dataset.train and dataset.test have different classes {by_split}; use splits of one kind, "
                          f"binary (deeplesion_*, a COCO <name>) or lesion-type (deeplesion_types_*, a COCO "
                          f"<name>_types) whose categories agree")
    return next(iter(by_split.values()))


def prepare_cfg(cfg: CfgNode, stage: Stage, args: StageArgs) -> CfgNode:
    """Derive what needs the data and the checkpoint, then freeze: the exact config the stage runs with."""
    if stage.data:
        registered = setup_datasets(cfg)
        trains = stage.epoch_fraction is not None  # a stage that does not train reads no training split
        needed = cfg.DATASETS.TEST + (cfg.DATASETS.TRAIN if trains else ())
        unknown = [name for name in needed if name not in registered]
        if unknown:
            raise ConfigError(f"dataset.train / dataset.test: no split is named {unknown[0]!r}; the dataset's splits "
                              f"are {sorted(registered)}{unregistered_hint(cfg, unknown[0])}")
        apply_num_classes(cfg, len(_classes(cfg.DATASETS.TEST + (cfg.DATASETS.TRAIN if trains else ()))))
        if trains:
            num_images = sum(len(DatasetCatalog.get(name)) for name in cfg.DATASETS.TRAIN)
            ipe = apply_dataset_size(cfg, max(1, int(num_images * stage.epoch_fraction)))
            logger.info(f"{num_images} training images, {ipe} iterations per epoch, MAX_ITER {cfg.SOLVER.MAX_ITER}; "
                        f"anchor sizes per level {cfg.MODEL.ANCHOR_GENERATOR.SIZES}")
    if args.checkpoint:
        architecture_from_checkpoint(cfg, args.checkpoint)
    cfg.freeze()
    return cfg


def run_stage(hcfg: DictConfig) -> Dict:
    """Compose the CfgNode, run the stage, save ``results.json``; returns the stage's results.

    With ``num_gpus`` (x ``num_machines``) > 1 the stage runs in that many processes started by Detectron2's
    ``launch``; rank 0 writes the run directory's files and W&B run, and its results are returned. In a SLURM
    job the machine's rank and the rendezvous come from the allocation (:mod:`fsd_d2.engine.cluster`).
    """
    if "stage" not in hcfg:
        raise ConfigError(f"no stage chosen: add +stage=<name>, one of {stage_names()}")
    stage = get_stage(hcfg.stage.name)
    if comm.get_world_size() > 1:  # a process of a launch: the launching process holds the run directory
        return _run(hcfg, stage)
    hcfg.update(slurm_rendezvous(int(hcfg.get("num_machines", 1)), str(hcfg.get("dist_url", "auto"))) or {})
    if int(hcfg.get("machine_rank", 0)) > 0 and stage.parallel:  # machine 0's launching process holds it
        return _launch(hcfg)
    _name_the_run(hcfg)  # before the config is compared and saved
    with own_run_directory(Path(hcfg.output_dir), resume=bool(hcfg.resume), overwrite=bool(hcfg.overwrite),
                           config=OmegaConf.to_container(hcfg, resolve=True)):
        if _world_size(hcfg) > 1 and stage.parallel:
            return _launch(hcfg)
        return _run(hcfg, stage)


def _run(hcfg: DictConfig, stage: Stage) -> Dict:
    out = Path(hcfg.output_dir)
    _log_to(out / "log.txt")
    if comm.get_world_size() > 1:  # where the processes met (on SLURM: from the allocation, fsd_d2.engine.cluster)
        logger.info(f"process {comm.get_rank()} of {comm.get_world_size()} (machine {hcfg.machine_rank} of "
                    f"{hcfg.num_machines}), rendezvous {hcfg.dist_url}")
    if hcfg.device == "cpu":
        torch.set_flush_denormal(True)  # weights decaying towards 0 otherwise hit denormal slow paths (x100 on CPU)
    if comm.is_main_process():
        (out / CONFIG_NAME).write_text(OmegaConf.to_yaml(hcfg, resolve=True))
    cfg = build_cfg(hcfg)
    overrides = tuple(HydraConfig.get().overrides.task) if HydraConfig.initialized() else ()
    options = OmegaConf.to_container(hcfg.stage, resolve=True)
    options.pop("name")
    args = make_stage_args(stage, {"resume": bool(hcfg.resume), "checkpoint": str(hcfg.checkpoint or ""),
                                   "overrides": overrides}, options)
    # Detectron2's rule: one seed per process, so the ranks draw different samples and augmentations.
    seed_all_rng(cfg.SEED + comm.get_rank())
    cfg = prepare_cfg(cfg, stage, args)
    if comm.is_main_process() and stage.data:
        (out / "d2_config.yaml").write_text(cfg.dump())
        init_wandb(cfg, config={"hydra": OmegaConf.to_container(hcfg, resolve=True), "d2": _to_dict(cfg)})
    start = time.perf_counter()
    try:
        results = stage.run(cfg, args)
    finally:
        finish_wandb()
    results["wall_seconds"] = time.perf_counter() - start  # what the stage cost (a study's search cost)
    if comm.is_main_process():
        with open(out / "results.json", "w") as f:
            json.dump(results, f, indent=2, default=float)
        logger.info(f"stage {cfg.FSD_STAGE} done; results in {out / 'results.json'}")
    return results


def _to_dict(cfg: CfgNode) -> Dict:
    return {k: _to_dict(v) if isinstance(v, CfgNode) else v for k, v in cfg.items()}


def _launch(hcfg: DictConfig) -> Dict:
    """Run the stage in ``num_gpus`` processes per machine; returns rank 0's results (on machine 0)."""
    resolved = OmegaConf.create(OmegaConf.to_container(hcfg, resolve=True))
    launch(run_stage, int(hcfg.num_gpus), num_machines=int(hcfg.num_machines), machine_rank=int(hcfg.machine_rank),
           dist_url=str(hcfg.dist_url), args=(resolved,))
    results = Path(resolved.output_dir) / "results.json"
    return json.loads(results.read_text()) if results.exists() else {}
