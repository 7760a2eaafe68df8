"""Hydra's config groups: each group's ``base`` generated from the declared keys' defaults under their friendly names
(so the YAML files in ``conf/`` list only what they change), and the packaged operation pools (``search_space``)."""
from typing import Any, Dict

from detectron2.config import CfgNode as CN
from hydra.core.config_store import ConfigStore

from fsd_d2.config.build import base_cfg
from fsd_d2.config.keys import FRIENDLY_KEYS, LABEL_ONLY, MOVED, POOL_NODES, get_value
from fsd_d2.nas.ops import load_pool, packaged_pools


def _group_base(cfg: CN, table: Dict[str, str]) -> Dict[str, Any]:
    """A group's friendly keys with their CfgNode defaults, nested at the dots (``synthetic.seed``)."""
    base: Dict[str, Any] = {}
    for name, d2 in table.items():
        value = get_value(cfg, d2)
        *parents, leaf = name.split(".")
        node = base
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = list(value) if isinstance(value, tuple) else value
    return base


def register_config_groups() -> None:
    """Offer Hydra the generated ``<group>/base`` configs (a key's former name in them as null, see
    :data:`~fsd_d2.config.keys.MOVED`) and the packaged operation pools (``search_space``)."""
    cs, cfg = ConfigStore.instance(), base_cfg()
    for group, table in FRIENDLY_KEYS.items():
        if group in POOL_NODES:  # an empty base would be a pool without operations; the pools are offered below
            continue
        node = _group_base(cfg, table)
        if group in LABEL_ONLY:
            node["name"] = "base"
        for former in MOVED:  # null, so that Hydra takes the former name and build_cfg names its new one
            former_group, leaf = former.split(".", 1)
            if former_group == group:
                node[leaf] = None
        cs.store(group=group, name="base", node=node)
    for pool in packaged_pools():
        cs.store(group="search_space", name=pool, node={"name": pool, "ops": load_pool(pool)})
