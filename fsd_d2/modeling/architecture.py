"""Where a detector keeps its searched parts: the searchable module of each search, the genotypes of a
derived FSD. Checkpoints record :func:`derived_genotypes` so that loading can check them."""
from typing import Dict

from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from fsd_d2.errors import ConfigError
from fsd_d2.modeling.backbone import FSDBackbone
from fsd_d2.modeling.box_head import FSDBoxHead
from fsd_d2.nas.genotype import Genotype
from fsd_d2.nas.searchable import Searchable

SEARCHES = {"bone": "model.backbone.bottom_up", "head": "model.roi_heads.box_head"}  # search kind -> module


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside (Distributed)DataParallel wrappers."""
    while isinstance(model, (DataParallel, DistributedDataParallel)):
        model = model.module
    return model


def _bottom_up(model: nn.Module):
    return getattr(getattr(model, "backbone", None), "bottom_up", None)


def _box_head(model: nn.Module):
    return getattr(getattr(model, "roi_heads", None), "box_head", None)


def searched_module(model: nn.Module, kind: str) -> Searchable:
    """The module whose alphas the ``kind`` search (``bone`` or ``head``) trains."""
    model = unwrap(model)
    module = {"bone": _bottom_up, "head": _box_head}[kind](model)
    if not isinstance(module, Searchable):
        raise ConfigError(f"the {kind} search needs a searchable {SEARCHES[kind]} but the model has "
                          f"{type(module).__name__}; use model=fsd_search_{kind} (the stage's default)")
    return module


def derived_genotypes(model: nn.Module) -> Dict[str, Genotype]:
    """The genotypes a derived detector was built from: ``bone`` (FSD backbone), ``head`` (FSD box head)."""
    model = unwrap(model)
    found = {}
    if isinstance(_bottom_up(model), FSDBackbone):
        found["bone"] = _bottom_up(model).genotype
    if isinstance(_box_head(model), FSDBoxHead):
        found["head"] = _box_head(model).genotype
    return found
