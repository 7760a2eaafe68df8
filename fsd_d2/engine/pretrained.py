"""``model.init``: start a fresh run's ResNet from the ImageNet file in ``model.weights``, or from scratch.

Detectron2's own load of ``MODEL.WEIGHTS`` matches names by suffix heuristics, does not know torchvision's
names and only logs what it could not place; here every tensor of the model's ResNet (but BatchNorm
statistics, which caffe2 files fold in) must come from the file, or the run stops naming what did not match.
"""
import logging

import torch
from detectron2.config import CfgNode
from torch import nn

from fsd_d2.errors import CheckpointError, ConfigError
from fsd_d2.modeling.architecture import unwrap
from fsd_d2.modeling.pretrained import (describe_part, imagenet_resnet, imagenet_tensors, match_pretrained,
                                        read_weights_file)

logger = logging.getLogger(__name__)
_SHOWN = 8  # names listed per kind in an error


def _show(names) -> str:
    return ", ".join(names[:_SHOWN]) + (f" ... (+{len(names) - _SHOWN})" if len(names) > _SHOWN else "")


def load_pretrained(cfg: CfgNode, model: nn.Module) -> int:
    """Initialise a fresh run's ``model`` as ``model.init`` says; returns how many tensors came from the file."""
    if cfg.MODEL.INIT == "scratch":
        logger.info(f"init=scratch: loaded 0 tensors (ResNet norm {cfg.MODEL.RESNETS.NORM}, "
                    f"FREEZE_AT {cfg.MODEL.BACKBONE.FREEZE_AT})")
        return 0
    path = cfg.MODEL.WEIGHTS
    if not path:
        raise ConfigError("model.init=imagenet needs model.weights=<Detectron2's ImageNet R-50.pkl or torchvision's "
                          "resnet50-*.pth>; or model.init=scratch")
    model = unwrap(model)
    prefix, resnet = imagenet_resnet(model)
    tensors, names = imagenet_tensors(path, read_weights_file(path, f"model.weights={path}"))
    match = match_pretrained(resnet, prefix, tensors, names)
    if not match.complete:
        raise CheckpointError(
            f"model.weights={path} does not cover the model's ImageNet-initialised {prefix} "
            f"({describe_part(resnet)}):\n"
            f"  model keys that got nothing ({len(match.missing)}): {_show(match.missing)}\n"
            f"  shape differs ({len(match.mismatched)}): {_show(match.mismatched)}\n"
            f"  file keys that matched nothing ({len(match.unused)}): {_show(match.unused)}\n"
            f"Pass a ResNet-{cfg.MODEL.RESNETS.DEPTH} ImageNet file (caffe2 R-50.pkl or torchvision resnet50-*.pth) "
            f"whose widths are the config's MODEL.RESNETS, or model.init=scratch.")
    state = model.state_dict()
    with torch.no_grad():
        for key, value in match.tensors.items():
            state[key].copy_(value)
    logger.info(f"init=imagenet: loaded {len(match.tensors)} tensors from {path} ({describe_part(resnet)}: {prefix}, "
                f"norm {cfg.MODEL.RESNETS.NORM}, FREEZE_AT {cfg.MODEL.BACKBONE.FREEZE_AT}); "
                f"{len(match.unused)} file tensors beyond it unused; {cfg.MODEL.IMAGENET_FORMAT} format: "
                f"STRIDE_IN_1X1 {cfg.MODEL.RESNETS.STRIDE_IN_1X1}, INPUT.FORMAT {cfg.INPUT.FORMAT}, "
                f"PIXEL_MEAN {list(cfg.MODEL.PIXEL_MEAN)}, PIXEL_STD {list(cfg.MODEL.PIXEL_STD)}")
    return len(match.tensors)
