"""The stage registry: ``+stage=<name>`` looks its runner up here.

A stage runner takes the composed CfgNode and the Hydra config (for runner-only options such as the
synthetic dataset's size) and returns a dict of results that the entry point saves as ``results.json``.
"""
from typing import Callable, Dict

from detectron2.config import CfgNode
from omegaconf import DictConfig

StageFn = Callable[[CfgNode, DictConfig], Dict]
_STAGES: Dict[str, StageFn] = {}


def register_stage(name: str) -> Callable[[StageFn], StageFn]:
    def deco(fn: StageFn) -> StageFn:
        if name in _STAGES:
            raise KeyError(f"stage '{name}' is registered twice ({_STAGES[name].__module__} and {fn.__module__})")
        _STAGES[name] = fn
        return fn

    return deco


def get_stage(name: str) -> StageFn:
    if name not in _STAGES:
        raise KeyError(f"unknown stage '{name}'; available: {sorted(_STAGES)}")
    return _STAGES[name]


def stage_names():
    return sorted(_STAGES)
