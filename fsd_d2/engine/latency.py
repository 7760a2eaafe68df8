"""``+stage=profile_ops`` and the latency side of the searches.

``profile_ops`` measures every op of a search's pool at every cell of the FSD that search derives, as the
config builds it (widths, image size, proposals), on ``device``, and writes ``op_latency_<kind>.yaml`` and a
heatmap. Profile the deployment config on the target device; the search that reads the table may run a
smaller proxy (narrower cells, smaller images), as DARTS searches do. A search given
``search.latency_table`` logs E_alpha[latency] every step, adds ``search.latency_weight`` x its normalised
value to the alpha loss, and reports its genotype's predicted latency (the table's sum) next to the
measured one (its derived cells, timed on the table's device). ``search.latency_target_ms`` makes that term TuNAS'
absolute-value one and the derived genotype meet the target (:func:`fsd_d2.nas.latency_repair.meet_latency_target`).
"""
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import CfgNode

from fsd_d2.engine.stages import StageArgs, register_stage
from fsd_d2.errors import ConfigError
from fsd_d2.modeling.cell_layout import cell_positions
from fsd_d2.nas.genotype import Genotype, save_genotype
from fsd_d2.engine.timing import measure_cells, profile_ops
from fsd_d2.nas.latency import LatencyObjective, LatencyTable
from fsd_d2.nas.latency_io import load_table, save_table
from fsd_d2.viz.latency import plot_latency_table

logger = logging.getLogger(__name__)


def search_kind(cfg: CfgNode) -> str:
    """Which search the model config describes: ``head`` (searchable box head) or ``bone``."""
    if cfg.MODEL.ROI_BOX_HEAD.NAME == "FSDSearchBoxHead":
        return "head"
    if cfg.MODEL.BACKBONE.NAME == "build_fsd_search_backbone":
        return "bone"
    raise ConfigError(f"+stage=profile_ops measures the ops of a search, but the model (backbone "
                      f"{cfg.MODEL.BACKBONE.NAME}, box head {cfg.MODEL.ROI_BOX_HEAD.NAME}) searches nothing; use "
                      "model=fsd_search_bone (the stage's default) or model=fsd_search_head")


def pool_of(cfg: CfgNode, kind: str) -> Tuple[str, List[str]]:
    fsd = cfg.MODEL.FSD
    return (fsd.BONE_POOL_NAME, list(fsd.BONE_POOL)) if kind == "bone" else (fsd.HEAD_POOL_NAME, list(fsd.HEAD_POOL))


@dataclass(frozen=True)
class ProfileArgs(StageArgs):
    warmup: int = 2  # untimed calls per op and shape (kernel choice, allocation)
    repeats: int = 10  # timed calls; the table keeps their median


@register_stage("profile_ops", args=ProfileArgs, data=False, epoch_fraction=None, parallel=False)
def profile_ops_stage(cfg: CfgNode, args: ProfileArgs) -> Dict:
    if args.warmup < 0 or args.repeats < 1:
        raise ConfigError(f"stage.warmup={args.warmup}, stage.repeats={args.repeats}: need warmup >= 0 and repeats >= 1")
    kind = search_kind(cfg)
    pool_name, pool = pool_of(cfg, kind)
    positions = cell_positions(cfg, kind)
    fsd = cfg.MODEL.FSD
    meta = ({"image_size": cfg.INPUT.SHORT_SIDE, "channels": fsd.BONE_CHANNELS} if kind == "bone" else
            {"proposals": cfg.MODEL.RPN.POST_NMS_TOPK_TEST, "channels": fsd.HEAD_CHANNELS})
    logger.info(f"profile_ops: {len(pool)} ops of {pool_name} at {len(positions)} {kind} cells on {cfg.MODEL.DEVICE} "
                f"({args.warmup} warm-up + {args.repeats} timed calls each)")
    table = profile_ops(kind, pool_name, pool, fsd.NUM_NODES, positions, device=cfg.MODEL.DEVICE,
                        warmup=args.warmup, repeats=args.repeats, meta=meta, progress=logger.info)
    out = Path(cfg.OUTPUT_DIR)
    path = save_table(table, out / f"op_latency_{kind}.yaml")
    plot = plot_latency_table(table, out / f"op_latency_{kind}.png")
    cheapest = table.cheapest()
    cheapest_path = save_genotype(cheapest, out / f"genotype_{kind}_cheapest.yaml")
    floor = sum(table.predict(cheapest))
    safe = table.safe_target_ms()
    logger.info(f"profile_ops: the cheapest genotype's cells take {floor:.2f} ms ({cheapest_path}), the floor of any "
                f"search on this table; a search.latency_target_ms of {safe:.2f} ms or more is met whatever edges the "
                f"search derives; wrote {path} and {plot}; search with search.latency_table={path} "
                "search.latency_weight=<λ> or search.latency_target_ms=<ms>")
    return {"table": str(path), "plot": str(plot), "kind": kind, "cells": len(positions), "cheapest_ms": floor,
            "safe_target_ms": safe, "cheapest_genotype": str(cheapest_path), **table.meta}


def search_table(cfg: CfgNode, kind: str) -> Optional[LatencyTable]:
    """The ``kind`` search's op-latency table, checked against its pool and the latency target; None without one
    (then the latency weight and target must be 0). Called before the search builds anything, so a wrong file or
    an unreachable target stops it at once."""
    weight, path, target = cfg.SEARCH.LATENCY_WEIGHT, cfg.SEARCH.LATENCY_TABLE, cfg.SEARCH.LATENCY_TARGET_MS
    if not path:
        for key, value in (("latency_weight", weight), ("latency_target_ms", target)):
            if value > 0:
                raise ConfigError(f"search.{key}={value} needs search.latency_table=<op_latency_{kind}.yaml>, "
                                  f"written by +stage=profile_ops model=fsd_search_{kind} on the target device")
        return None
    table = load_table(path)
    pool = pool_of(cfg, kind)[1]
    table.check(path, kind, pool, cfg.MODEL.FSD.NUM_NODES)
    meta = table.meta
    logger.info(f"latency table {path}: {len(table.cells)} cells measured on {meta.get('device')} "
                f"{meta.get('device_name', '')} (torch {meta.get('torch')}); latency_weight {weight}"
                + (f", latency_target_ms {target:g}" if target > 0 else ""))
    floor = table.floor_ms(pool)
    if 0 < target < floor:
        raise ConfigError(f"search.latency_target_ms={target:g} is below the {floor:.2f} ms that the cheapest {kind} "
                          f"genotype of {path} takes (the floor of any search on it); set search.latency_target_ms "
                          f"to at least {floor:.2f} (or 0: no target)")
    return table


def latency_report(objective: LatencyObjective, genotype: Genotype, path: str) -> Dict:
    """The derived genotype's predicted latency (the table's) next to its measured one, per cell and in total.
    Measured on the table's device when this machine has it, with the table's warm-up and repeats."""
    table = objective.table
    predicted = table.predict(genotype)
    device = table.meta.get("device", "cpu")
    measured = None
    if device == "cpu" or (device == "cuda" and torch.cuda.is_available()):
        measured = measure_cells(genotype, [c.position for c in table.cells], device=device,
                                 warmup=int(table.meta.get("warmup", 2)), repeats=int(table.meta.get("repeats", 10)))
    else:
        logger.warning(f"the latency table was measured on {device}, which this machine lacks: the genotype's cells "
                       "are not measured (time them with benchmarks/params.py --latency on that device)")
    with torch.no_grad():
        expected = objective.expected_ms().item()
    report = {"table": path, "device": device, "latency_weight": objective.weight, "target_ms": objective.target_ms,
              "uniform_ms": objective.uniform_ms, "expected_ms": expected, "predicted_ms": sum(predicted),
              "measured_ms": None if measured is None else sum(measured),
              "cells": [{"name": c.position.name, "predicted_ms": p, "measured_ms": None if measured is None else m}
                        for c, p, m in zip(table.cells, predicted, measured or predicted)]}
    logger.info(f"{table.kind} genotype latency on {device}: predicted {report['predicted_ms']:.2f} ms (table), "
                + ("not measured" if measured is None else f"measured {report['measured_ms']:.2f} ms")
                + (f" (target {objective.target_ms:g} ms)" if objective.target_ms > 0 else "")
                + f" over {len(predicted)} derived cells; E_alpha[latency] {expected:.2f} ms at the final alphas, "
                f"{objective.uniform_ms:.2f} ms at uniform ones")
    return report
