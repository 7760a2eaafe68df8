"""``+stage=pipeline``: Algorithm 1 end to end, each stage in its own sub-directory of the run.

search_bone -> train_bone -> search_head -> train_fsd -> eval. A stage reads the previous stages'
artifacts by path, and a finished stage (its ``results.json`` exists) is skipped, so re-running the same
command after a kill resumes stage by stage (and inside the interrupted stage, from its last checkpoint).

``stage.search=random`` draws both cells at random from the same spaces instead of searching them (``random_bone``,
``random_head``; ``stage.draw`` picks the draw), and trains and evaluates them exactly as the searched ones: the
baseline a search has to beat (:mod:`fsd_d2.engine.study`). ``stage.profile_latency=true`` first times the ops of
both searches on this machine (``profile_ops``) and gives the searches those tables, for a latency-aware search
(``search.latency_weight > 0``) without tables of its own.
"""
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple

from detectron2.config import CfgNode
from hydra import compose

from fsd_d2.engine.runner import run_stage
from fsd_d2.engine.stages import StageArgs, register_stage
from fsd_d2.errors import ConfigError

logger = logging.getLogger(__name__)

# How each kind of pipeline finds its cells: (the backbone's stage, the head's stage).
SEARCHES = {"darts": ("search_bone", "search_head"), "random": ("random_bone", "random_head")}
# What the pipeline sets itself; the same keys given on the command line would be ambiguous.
_OWN_KEYS = ("stage", "+stage", "output_dir", "resume", "checkpoint", "hydra.")


@dataclass(frozen=True)
class PipelineArgs(StageArgs):
    stage_overrides: Mapping[str, Sequence[str]] = field(default_factory=dict)  # per stage, e.g. {search_bone: [...]}
    common_overrides: Tuple[str, ...] = ()  # for every stage, beside the command line's
    fsd_from_train_bone: bool = False  # train_fsd starts its backbone from train_bone's weights, not from scratch
    search: str = "darts"  # darts: search both cells (the paper); random: draw them from the same spaces
    draw: int = 0  # search=random: which draw of this seed
    profile_latency: bool = False  # time the ops first and give the searches those tables (latency-aware search)


@dataclass(frozen=True)
class Step:
    name: str  # its directory is <i>_<name>, its overrides stage_overrides[name]
    stage: str
    wiring: Tuple[str, ...] = ()  # overrides wiring in earlier steps' artifacts: {<step>} is that step's directory,
    # {bone} and {head} those of the steps that found the cells


def steps(args: PipelineArgs) -> List[Step]:
    """The steps of this pipeline, in order."""
    if args.search not in SEARCHES:
        raise ConfigError(f"stage.search={args.search}: must be one of {sorted(SEARCHES)}")
    bone, head = SEARCHES[args.search]
    genotypes = ("model.genotype_bone={bone}/genotype_bone.yaml", "model.genotype_head={head}/genotype_head.yaml")
    own = (f"stage.draw={args.draw}",) if args.search == "random" else ()
    profile, tables = [], ((), ())
    if args.profile_latency:
        profile = [Step("profile_bone", "profile_ops", ("model=fsd_search_bone",)),
                   Step("profile_head", "profile_ops", ("model=fsd_search_head",))]
        tables = (("search.latency_table={profile_bone}/op_latency_bone.yaml",),
                  ("search.latency_table={profile_head}/op_latency_head.yaml",))
    trained_bone = ("checkpoint={train_bone}/model_final.pth",)
    return [*profile,
            Step(bone, bone, own + tables[0]),
            Step("train_bone", "train_bone", genotypes[:1]),
            Step(head, head, own + tables[1] + genotypes[:1] + (trained_bone if args.search == "darts" else ())),
            Step("train_fsd", "train_fsd", genotypes + (trained_bone if args.fsd_from_train_bone else ())),
            Step("eval", "eval", ("model=fsd", *genotypes, "checkpoint={train_fsd}/model_final.pth"))]


def user_overrides(args: PipelineArgs) -> List[str]:
    """The command line's and ``common_overrides`` (minus the pipeline's own keys), for every stage."""
    return [o for o in [*args.overrides, *args.common_overrides] if not o.split("=")[0].startswith(_OWN_KEYS)]


@register_stage("pipeline", args=PipelineArgs, data=False, epoch_fraction=None, parallel=False)
def pipeline(cfg: CfgNode, args: PipelineArgs) -> Dict:
    """Each stage in its own process count (num_gpus reaches them through the overrides). The results hold every
    step's, those of steps an earlier run finished included."""
    root = Path(cfg.OUTPUT_DIR)
    plan = steps(args)
    dirs = {step.name: root / f"{i}_{step.name}" for i, step in enumerate(plan)}
    bone, head = SEARCHES[args.search]
    places = {**{k: str(v) for k, v in dirs.items()}, "bone": str(dirs[bone]), "head": str(dirs[head])}
    per_stage = args.stage_overrides or {}
    results = {}
    for step in plan:
        out = dirs[step.name]
        if (out / "results.json").exists():
            logger.info(f"pipeline: {step.name} already finished in {out}; skipping")
            results[step.name] = json.loads((out / "results.json").read_text())
            continue
        overrides = (user_overrides(args) + list(per_stage.get(step.name, []))
                     + [f"+stage={step.stage}", f"output_dir={out}", "resume=true"]
                     + [w.format(**places) for w in step.wiring])
        logger.info(f"pipeline: running {step.name} with {overrides}")
        results[step.name] = run_stage(compose(config_name="config", overrides=overrides))
    return {"stages": {name: str(d) for name, d in dirs.items()}, "results": results}
