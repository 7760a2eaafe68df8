"""Where ImageNet weights go in a detector, and the names they carry in the files researchers have.

Every model here holds one Detectron2 ``ResNet``: the whole ResNet-50 body of the FPN baseline
(``backbone.bottom_up``) or the stem + res2 trunk of an FSD backbone (``backbone.bottom_up.trunk``). ImageNet
files name its tensors in one of three ways, all turned into the ResNet's own state-dict names here:

- Detectron2's ImageNet ``R-50.pkl`` (MSRA / caffe2): ``conv1_w``, ``res_conv1_bn_s``, ``res2_0_branch1_w`` ...,
  converted with Detectron2's own caffe2 renaming (``convert_basic_c2_names``);
- torchvision's ``resnet50-*.pth``: ``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight`` ... (the renaming
  of Detectron2's ``tools/convert-torchvision-to-d2.py``);
- that tool's output, a ``.pkl`` already in Detectron2 names (``stem.conv1.weight`` ...).
"""
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Tuple

import torch
from detectron2.checkpoint.c2_model_loading import convert_basic_c2_names
from detectron2.modeling.backbone.resnet import ResNet
from torch import nn

from fsd_d2.errors import ConfigError

# BatchNorm statistics: caffe2 ImageNet files fold them into the scale and bias, so a file may lack them
# (FrozenBatchNorm2d then keeps mean 0, variance 1 - eps, and applies the folded scale and bias as they are).
_OPTIONAL_SUFFIXES = (".running_mean", ".running_var")


def c2_to_d2_names(names: List[str]) -> Dict[str, str]:
    """caffe2 name -> ResNet state-dict name, by Detectron2's renaming (``res2_0_branch2a_w`` ->
    ``res2.0.conv1.weight``, ``res_conv1_bn_s`` -> ``stem.conv1.norm.weight``)."""
    return dict(zip(names, convert_basic_c2_names(list(names))))


def torchvision_to_d2_name(name: str) -> str:
    """torchvision ResNet name -> ResNet state-dict name (``layer1.0.bn1.weight`` -> ``res2.0.conv1.norm.weight``)."""
    name = re.sub(r"^layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", name)
    if not name.startswith("res"):
        name = "stem." + name  # conv1, bn1 (and fc, which matches nothing)
    name = re.sub(r"\bbn(\d)\.", r"conv\1.norm.", name)
    return name.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")


def imagenet_resnet(model: nn.Module) -> Tuple[str, ResNet]:
    """The module path and the ResNet that ImageNet weights initialise (the model must hold exactly one)."""
    found = [(path, m) for path, m in model.named_modules() if isinstance(m, ResNet)]
    if len(found) != 1:
        raise ConfigError(f"model.init=imagenet loads a ResNet's ImageNet weights, but the model holds "
                          f"{len(found)} ResNets ({[p for p, _ in found]}); use model.init=scratch for this model")
    return found[0]


def describe_part(resnet: ResNet) -> str:
    """``whole ResNet`` or which stages it has (``stem + res2``), for the log."""
    return "whole ResNet" if resnet.stage_names[-1] == "res5" else "stem + " + ", ".join(resnet.stage_names)


@dataclass
class PretrainedMatch:
    """What a file gives a ResNet: tensors by model key, and what does not fit."""

    tensors: Dict[str, torch.Tensor]  # model state-dict key -> the file's tensor
    missing: List[str]  # model keys that must come from the file and got nothing
    mismatched: List[str]  # "key: file (shape) vs model (shape)"
    unused: List[str]  # file names that fit no model key (beyond this ResNet, or foreign)

    @property
    def complete(self) -> bool:
        return not self.missing and not self.mismatched


def match_pretrained(resnet: ResNet, prefix: str, file_tensors: Mapping[str, torch.Tensor],
                     d2_names: Mapping[str, str]) -> PretrainedMatch:
    """Pair the file's tensors (by their ResNet name ``d2_names[file name]``) with ``resnet``'s state dict.

    Keys are reported with ``prefix`` (the ResNet's path in the model). Every key but the BatchNorm
    statistics must be given; the file may hold more (res3-res5 for an FSD trunk, the classifier).
    """
    state = resnet.state_dict()
    tensors, mismatched, unused, named = {}, [], [], set()
    for file_name, value in file_tensors.items():
        key = d2_names[file_name]
        if key not in state:
            unused.append(file_name)
            continue
        named.add(key)
        if tuple(value.shape) == tuple(state[key].shape):
            tensors[f"{prefix}.{key}"] = value
        else:
            mismatched.append(f"{prefix}.{key} ({file_name}): file {tuple(value.shape)} vs model "
                              f"{tuple(state[key].shape)}")
    missing = [f"{prefix}.{k}" for k in state if k not in named and not k.endswith(_OPTIONAL_SUFFIXES)]
    return PretrainedMatch(tensors, missing, mismatched, unused)
