"""``+stage=pipeline``: Algorithm 1 end to end, each stage in its own sub-directory of the run.

search_bone -> train_bone -> search_head -> train_fsd -> eval. A stage reads the previous stages'
artifacts by path, and a finished stage (its ``results.json`` exists) is skipped, so re-running the same
command after a kill resumes stage by stage (and inside the interrupted stage, from its last checkpoint).
"""
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple

from detectron2.config import CfgNode
from hydra import compose

from fsd_d2.engine.runner import run_stage
from fsd_d2.engine.stages import StageArgs, register_stage

logger = logging.getLogger(__name__)

# (stage, overrides that wire in earlier artifacts; {name} is that stage's directory)
PIPELINE = (
    ("search_bone", []),
    ("train_bone", ["model.genotype_bone={search_bone}/genotype_bone.yaml"]),
    ("search_head", ["model.genotype_bone={search_bone}/genotype_bone.yaml",
                     "checkpoint={train_bone}/model_final.pth"]),
    ("train_fsd", ["model.genotype_bone={search_bone}/genotype_bone.yaml",
                   "model.genotype_head={search_head}/genotype_head.yaml"]),
    ("eval", ["model=fsd", "model.genotype_bone={search_bone}/genotype_bone.yaml",
              "model.genotype_head={search_head}/genotype_head.yaml", "checkpoint={train_fsd}/model_final.pth"]),
)
# What the pipeline sets itself; the same keys given on the command line would be ambiguous.
_OWN_KEYS = ("stage", "+stage", "output_dir", "resume", "checkpoint", "hydra.")


@dataclass(frozen=True)
class PipelineArgs(StageArgs):
    stage_overrides: Mapping[str, Sequence[str]] = field(default_factory=dict)  # per stage, e.g. {search_bone: [...]}
    common_overrides: Tuple[str, ...] = ()  # for every stage, beside the command line's
    fsd_from_train_bone: bool = False  # train_fsd starts its backbone from train_bone's weights, not from scratch


def user_overrides(args: PipelineArgs) -> List[str]:
    """The command line's and ``common_overrides`` (minus the pipeline's own keys), for every stage."""
    return [o for o in [*args.overrides, *args.common_overrides] if not o.split("=")[0].startswith(_OWN_KEYS)]


@register_stage("pipeline", args=PipelineArgs, data=False, epoch_fraction=None, parallel=False)
def pipeline(cfg: CfgNode, args: PipelineArgs) -> Dict:
    """Each stage in its own process count (num_gpus reaches them through the overrides)."""
    root = Path(cfg.OUTPUT_DIR)
    dirs = {name: root / f"{i}_{name}" for i, (name, _) in enumerate(PIPELINE)}
    per_stage = args.stage_overrides or {}
    results = {}
    for name, wiring in PIPELINE:
        out = dirs[name]
        if (out / "results.json").exists():
            logger.info(f"pipeline: {name} already finished in {out}; skipping")
            continue
        overrides = (user_overrides(args) + list(per_stage.get(name, []))
                     + [f"+stage={name}", f"output_dir={out}", "resume=true"]
                     + [w.format(**{k: str(v) for k, v in dirs.items()}) for w in wiring])
        if name == "train_fsd" and args.fsd_from_train_bone:
            overrides.append(f"checkpoint={dirs['train_bone'] / 'model_final.pth'}")
        logger.info(f"pipeline: running {name} with {overrides}")
        results[name] = run_stage(compose(config_name="config", overrides=overrides))
    return {"stages": {name: str(d) for name, d in dirs.items()}, "results": results}
