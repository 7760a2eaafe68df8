"""``model.init``: start a fresh run's ResNet from the ImageNet file in ``model.weights``, or from scratch.

Detectron2's own load of ``MODEL.WEIGHTS`` matches names by suffix heuristics, does not know torchvision's
names and only logs what it could not place; here every tensor of the model's ResNet (but BatchNorm
statistics, which caffe2 files fold in) must come from the file, or the run stops naming what did not match.
"""
import logging
import os
import pickle
from typing import Dict, Tuple

import torch
from detectron2.config import CfgNode
from torch import nn

from fsd_d2.errors import CheckpointError, ConfigError, MissingFileError
from fsd_d2.modeling.architecture import unwrap
from fsd_d2.modeling.pretrained import (c2_to_d2_names, describe_part, imagenet_resnet, match_pretrained,
                                        torchvision_to_d2_name)

logger = logging.getLogger(__name__)
_SHOWN = 8  # names listed per kind in an error


def read_imagenet_weights(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """The file's tensors by file name, and each file name's ResNet state-dict name.

    ``.pkl``: Detectron2's (caffe2-named ImageNet ``R-50.pkl``, or Detectron2-named from its torchvision
    converter); anything else: a torchvision state dict (``resnet50-*.pth``).
    """
    try:
        if path.endswith(".pkl"):
            with open(path, "rb") as f:
                data = pickle.load(f, encoding="latin1")
        else:
            data = torch.load(path, map_location="cpu")
    except Exception as e:  # pickle and torch raise many types for a foreign or truncated file
        raise CheckpointError(f"model.weights={path} could not be read ({type(e).__name__}: {e}); pass Detectron2's "
                              f"ImageNet R-50.pkl or torchvision's resnet50-*.pth") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"model.weights={path} holds a {type(data).__name__}, not a dict of named tensors")
    if not path.endswith(".pkl"):
        names = {k: torchvision_to_d2_name(k) for k in data}
    elif "model" in data and "__author__" in data:  # Detectron2's format: its names already
        data = data["model"]
        names = {k: k for k in data}
    else:
        data = {k: v for k, v in data.get("blobs", data).items() if not k.endswith("_momentum")}
        names = c2_to_d2_names(list(data))
    return {k: torch.as_tensor(v) for k, v in data.items()}, names  # numpy arrays in .pkl files


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
    if not os.path.isfile(path):
        raise MissingFileError(f"model.weights={path} does not exist; pass the ImageNet R-50.pkl or resnet50-*.pth "
                               f"on disk (nothing is downloaded)")
    model = unwrap(model)
    prefix, resnet = imagenet_resnet(model)
    tensors, names = read_imagenet_weights(path)
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
    if not path.endswith(".pkl") and list(cfg.MODEL.PIXEL_STD) == [1.0, 1.0, 1.0]:
        logger.warning("torchvision's ImageNet weights expect inputs divided by ImageNet's std, Detectron2 pairs them "
                       "with +d2.MODEL.PIXEL_STD=[57.375,57.120,58.395]; the pixel std is 1 (caffe2 R-50.pkl's)")
    logger.info(f"init=imagenet: loaded {len(match.tensors)} tensors from {path} ({describe_part(resnet)}: {prefix}, "
                f"norm {cfg.MODEL.RESNETS.NORM}, FREEZE_AT {cfg.MODEL.BACKBONE.FREEZE_AT}); "
                f"{len(match.unused)} file tensors beyond it unused")
    return len(match.tensors)
