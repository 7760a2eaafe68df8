"""The stage registry: ``+stage=<name>`` looks its :class:`Stage` up here.

A stage runner receives the frozen CfgNode and its typed arguments (:class:`StageArgs`, or a subclass that
adds the stage's own ``stage.*`` options) and returns a dict that the runner saves as ``results.json``. The
:class:`Stage` record says what the runner must prepare before freezing the config: the dataset splits and,
for stages that train, the schedule in iterations.
"""
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Mapping, Optional, Set, Tuple, Type

from detectron2.config import CfgNode

from fsd_d2.errors import ConfigError


@dataclass(frozen=True)
class StageArgs:
    """What a stage needs beside the CfgNode: run-level keys of the root config."""

    resume: bool = False  # continue from the run directory's last checkpoint
    checkpoint: str = ""  # weights to start from or evaluate
    overrides: Tuple[str, ...] = ()  # the command line's overrides (the pipeline hands them to its stages)


StageFn = Callable[[CfgNode, StageArgs], Dict]


@dataclass(frozen=True)
class Stage:
    run: StageFn
    args: Type[StageArgs] = StageArgs
    data: bool = True  # register the dataset splits (and take the classes from them) before running
    epoch_fraction: Optional[float] = 1.0  # share of the training split an epoch covers; None: does not train
    parallel: bool = True  # runs in num_gpus processes (False: always one process)


_STAGES: Dict[str, Stage] = {}


def register_stage(name: str, **spec: Any) -> Callable[[StageFn], StageFn]:
    """Register the decorated runner as ``+stage=<name>``; ``spec`` are :class:`Stage`'s fields."""
    def deco(fn: StageFn) -> StageFn:
        if name in _STAGES:
            raise KeyError(f"stage '{name}' is registered twice ({_STAGES[name].run.__module__} and {fn.__module__})")
        _STAGES[name] = Stage(run=fn, **spec)
        return fn

    return deco


def get_stage(name: str) -> Stage:
    if name not in _STAGES:
        raise ConfigError(f"unknown stage '{name}'; available: {stage_names()}")
    return _STAGES[name]


def stage_names():
    return sorted(_STAGES)


def _options(stage: Stage) -> Set[str]:
    return {f.name for f in fields(stage.args)} - {f.name for f in fields(StageArgs)}


def make_stage_args(stage: Stage, run_keys: Mapping[str, Any], options: Mapping[str, Any]) -> StageArgs:
    """The stage's typed arguments from the root config's run keys and the ``stage.*`` options.

    Options of another stage are left to it: an experiment written for the pipeline sets the pipeline's
    ``stage.stage_overrides``, and the stages it runs compose that experiment too. A name no stage knows stops.
    """
    known = _options(stage)
    unknown = sorted(set(options) - known - {name for other in _STAGES.values() for name in _options(other)})
    if unknown:
        raise ConfigError(f"stage.{unknown[0]} is not an option of this stage; its options: {sorted(known) or 'none'}")
    return stage.args(**{k: v for k, v in run_keys.items() if k in {f.name for f in fields(StageArgs)}},
                      **{k: v for k, v in options.items() if k in known})
