"""``+stage=random_bone`` and ``random_head``: an architecture drawn at random from a search's space, in place of
the search (``+stage=pipeline stage.search=random``), so that a searched FSD can be compared with FSDs that
nothing searched, trained the same way (:mod:`fsd_d2.nas.sampling`).

The draw is named by ``(seed, stage.draw)``: the same pair gives the same genotype, another draw another one. The
stage writes what a search writes for the next stages (``genotype_<kind>.yaml``, the cell drawings) and takes no
time worth speaking of, which is the point of the comparison.
"""
import os
from dataclasses import dataclass
from typing import Dict

from detectron2.config import CfgNode

from fsd_d2.engine.latency import pool_of
from fsd_d2.engine.stages import StageArgs, register_stage
from fsd_d2.engine.wandb import log_artifact, log_images
from fsd_d2.errors import ConfigError
from fsd_d2.modeling.backbone import SearchBackbone
from fsd_d2.modeling.box_head import FSDSearchBoxHead
from fsd_d2.nas.genotype import op_counts, save_genotype
from fsd_d2.nas.ops import validate_pool
from fsd_d2.nas.sampling import sample_genotype
from fsd_d2.viz.cells import draw_cell

CELL_TYPES = {"bone": SearchBackbone.CELL_TYPES, "head": FSDSearchBoxHead.CELL_TYPES}


@dataclass(frozen=True)
class RandomArgs(StageArgs):
    draw: int = 0  # which architecture of this seed's stream: (seed, draw) names it


def draw_architecture(cfg: CfgNode, args: RandomArgs, kind: str) -> Dict:
    if args.draw < 0:
        raise ConfigError(f"stage.draw={args.draw}: must be >= 0 (with seed, it names the random architecture)")
    pool_name, pool = pool_of(cfg, kind)
    genotype = sample_genotype(pool_name, validate_pool(pool, pool_name), cfg.MODEL.FSD.NUM_NODES, CELL_TYPES[kind],
                               (cfg.SEED, args.draw))
    path = str(save_genotype(genotype, os.path.join(cfg.OUTPUT_DIR, f"genotype_{kind}.yaml")))
    log_images({f"random/cell_{t}": draw_cell(cell, os.path.join(cfg.OUTPUT_DIR, f"cell_{kind}_{t}.png"),
                                               title=f"random {kind} {t} cell (seed {cfg.SEED}, draw {args.draw})")
                for t, cell in genotype.cells.items()})
    log_artifact(path, f"genotype_{kind}", "genotype")
    return {"genotype": path, "genotype_text": str(genotype), "seed": cfg.SEED, "draw": args.draw,
            "op_counts": op_counts(genotype)}


@register_stage("random_bone", args=RandomArgs, epoch_fraction=None, parallel=False)
def random_bone(cfg: CfgNode, args: RandomArgs) -> Dict:
    return draw_architecture(cfg, args, "bone")


@register_stage("random_head", args=RandomArgs, epoch_fraction=None, parallel=False)
def random_head(cfg: CfgNode, args: RandomArgs) -> Dict:
    return draw_architecture(cfg, args, "head")
