"""The frozen-to-be Detectron2 ``CfgNode`` of a composed Hydra config: :func:`build_cfg`.

It applies, in order: the defaults (:func:`base_cfg`), the friendly values, the raw ``d2`` overrides, the checks
(:mod:`fsd_d2.config.validate`), then the derived values (:mod:`fsd_d2.config.derive`).
"""
from pathlib import Path
from typing import Any, Dict, Mapping

import detectron2
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from omegaconf import DictConfig, OmegaConf

from fsd_d2.config.derive import derive
from fsd_d2.config.keys import FRIENDLY_KEYS, LABEL_ONLY, MOVED, RUN_KEYS, add_fsd_config
from fsd_d2.config.validate import check_raw_key, check_values
from fsd_d2.errors import ConfigError

# Shipped inside the detectron2 package (detectron2.model_zoo would import the removed pkg_resources).
BASE_RCNN_FPN = Path(detectron2.__file__).parent / "model_zoo" / "configs" / "Base-RCNN-FPN.yaml"


def base_cfg() -> CN:
    """Detectron2's defaults, its ``Base-RCNN-FPN.yaml`` (``get_cfg()`` alone is a C4 model), and FSD-D2's keys."""
    cfg = get_cfg()
    cfg.merge_from_file(str(BASE_RCNN_FPN))
    add_fsd_config(cfg)
    return cfg


def flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}, "c": {}}`` -> ``{"a.b": 1, "c": {}}``: dotted keys, an empty mapping kept as a value."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _assign(cfg: CN, dotted: str, value: Any, given_as: str) -> None:
    """Set ``cfg.<dotted>`` to ``value`` with Detectron2's type rules; errors name ``given_as``."""
    node = cfg
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.get(p)
        if not isinstance(node, CN):
            raise ConfigError(f"{given_as}: {dotted} is not a Detectron2 key")
    if leaf not in node:
        raise ConfigError(f"{given_as}: {dotted} is not a Detectron2 key")
    old = node[leaf]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    sequences = (list, tuple)
    if not (type(value) is type(old) or (isinstance(old, sequences) and isinstance(value, sequences))):
        raise ConfigError(f"{given_as}={value!r}: expected a {type(old).__name__} like the default {old!r}")
    node[leaf] = value


def build_cfg(hcfg: DictConfig) -> CN:
    """The CfgNode of a composed Hydra config (not frozen: the dataset-dependent values come later)."""
    cfg = base_cfg()
    for name, key in RUN_KEYS.items():
        _assign(cfg, key, hcfg[name], name)
    cfg.FSD_STAGE = str(hcfg.stage.name)
    for group, table in FRIENDLY_KEYS.items():
        values = flatten(OmegaConf.to_container(hcfg[group], resolve=True)) if group in hcfg else {}
        for key, value in values.items():
            if key == "name" and group in LABEL_ONLY:
                continue
            if f"{group}.{key}" in MOVED:
                if value is None:  # the generated base's placeholder: not set
                    continue
                new = MOVED[f"{group}.{key}"]
                raise ConfigError(f"{group}.{key} is now {new}: set {new}={value} instead")
            if key not in table:
                raise ConfigError(
                    f"{group}.{key} is not a key FSD-D2 knows; known keys of '{group}': {sorted(table)}. "
                    f"For a raw Detectron2 key use +d2.<KEY>=<value>.")
            _assign(cfg, table[key], value, f"{group}.{key}")
    raw = flatten(OmegaConf.to_container(hcfg.d2, resolve=True)) if hcfg.get("d2") else {}
    for key, value in raw.items():
        check_raw_key(key, cfg)
        _assign(cfg, key, value, f"d2 override rejected: d2.{key}")
    check_values(cfg)
    derive(cfg)
    return cfg
