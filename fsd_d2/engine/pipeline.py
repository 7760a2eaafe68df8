"""``+stage=pipeline``: Algorithm 1 end to end, each stage in its own sub-directory of the run.

search_bone -> train_bone -> search_head -> train_fsd -> eval. A stage reads the previous stages'
artifacts by path, and a finished stage (its ``results.json`` exists) is skipped, so re-running the same
command after a kill resumes stage by stage (and inside the interrupted stage, from its last checkpoint).

``stage.search=random`` draws both cells at random from the same spaces instead of searching them (``random_bone``,
``random_head``; ``stage.draw`` picks the draw), and trains and evaluates them exactly as the searched ones: the
baseline a search has to beat (:mod:`fsd_d2.engine.study`). ``stage.profile_latency=true`` first times the ops of
both searches on this machine (``profile_ops``) and gives the searches those tables, for a latency-aware search
(``search.latency_weight > 0``) without tables of its own. ``stage.match_params=[0.96,0.63]`` solves the cell
widths for the genotypes found, so that every FSD keeps the paper's size relation to FPN-R50
(:mod:`fsd_d2.engine.widths`).
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
from fsd_d2.engine.widths import matched_width, millions_of
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
    match_params: Tuple[float, ...] = ()  # (FSD backbone + FC head, FSD) as multiples of FPN-R50's parameters:
    # the cell widths are solved for the genotypes at hand (fsd_d2/engine/widths.py); () keeps the configured ones


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


class _Widths:
    """The width overrides ``stage.match_params`` solves: the backbone's before train_bone (its genotype is known),
    the head's before train_fsd; each step after gets those solved so far, so a checkpoint and the model that
    loads it agree (the head search keeps its own proxy head width)."""

    def __init__(self, ratios: Sequence[float]):
        if ratios and len(ratios) != 2:
            raise ConfigError(f"stage.match_params={list(ratios)}: give two multiples of FPN-R50's parameters, "
                              f"[FSD backbone + FC head, FSD] (the paper's: [0.96, 0.63]), or [] for fixed widths")
        self.ratios, self.solved, self.fpn = tuple(ratios), {}, 0.0

    def solve(self, step: str, overrides: Sequence[str]) -> None:
        if not self.ratios or step not in ("train_bone", "train_fsd"):
            return
        self.fpn = self.fpn or millions_of([*overrides, "model=fpn_r50"])
        key, ratio = (("model.bone_channels", self.ratios[0]) if step == "train_bone"
                      else ("model.head_channels", self.ratios[1]))
        self.solved[key] = matched_width([*overrides, *self.overrides(step)], key, ratio * self.fpn)

    def overrides(self, step: str) -> List[str]:
        keys = [k for k in self.solved if step != "search_head" or k != "model.head_channels"]
        return [f"{k}={self.solved[k]}" for k in keys]


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
    widths = _Widths(args.match_params)
    results = {}
    for step in plan:
        out = dirs[step.name]
        overrides = (user_overrides(args) + list(per_stage.get(step.name, []))
                     + [f"+stage={step.stage}", f"output_dir={out}", "resume=true"]
                     + [w.format(**places) for w in step.wiring])
        widths.solve(step.name, overrides)  # (again on a resume: it is deterministic)
        overrides += widths.overrides(step.name)
        if (out / "results.json").exists():
            logger.info(f"pipeline: {step.name} already finished in {out}; skipping")
            results[step.name] = json.loads((out / "results.json").read_text())
            continue
        logger.info(f"pipeline: running {step.name} with {overrides}")
        results[step.name] = run_stage(compose(config_name="config", overrides=overrides))
    return {"stages": {name: str(d) for name, d in dirs.items()}, "results": results,
            "widths": dict(widths.solved)}
