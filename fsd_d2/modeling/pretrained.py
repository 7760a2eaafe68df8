"""Where ImageNet weights go in a detector, and the names they carry in the files researchers have.

Every model here holds one Detectron2 ``ResNet``: the whole ResNet-50 body of the FPN baseline
(``backbone.bottom_up``) or the stem + res2 trunk of an FSD backbone (``backbone.bottom_up.trunk``). ImageNet
files name its tensors in one of three ways, all turned into the ResNet's own state-dict names here:

- Detectron2's ImageNet ``R-50.pkl`` (MSRA / caffe2): ``conv1_w``, ``res_conv1_bn_s``, ``res2_0_branch1_w`` ...,
  converted with Detectron2's own caffe2 renaming (``convert_basic_c2_names``);
- torchvision's ``resnet50-*.pth``: ``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight`` ... (the renaming
  of Detectron2's ``tools/convert-torchvision-to-d2.py``);
- that tool's output, a ``.pkl`` already in Detectron2 names (``stem.conv1.weight`` ...).

The files are data, never code: they are read without running anything a file could smuggle in (a restricted
unpickler for ``.pkl``, ``weights_only`` for torch files). Each format also fixes how the network was trained
to see its input (:data:`IMAGENET_FORMATS`), which the config derives from the file so no user has to remember it.
"""
import pickle
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from detectron2.checkpoint.c2_model_loading import convert_basic_c2_names
from detectron2.modeling.backbone.resnet import ResNet
from torch import nn

from fsd_d2.errors import CheckpointError, ConfigError

# BatchNorm statistics: caffe2 ImageNet files fold them into the scale and bias, so a file may lack them
# (FrozenBatchNorm2d then keeps mean 0, variance 1 - eps, and applies the folded scale and bias as they are).
_OPTIONAL_SUFFIXES = (".running_mean", ".running_var")


@dataclass(frozen=True)
class ImageNetFormat:
    """How a family of ImageNet weights was trained to see its input, as Detectron2's configs spell it."""

    stride_in_1x1: bool  # MODEL.RESNETS.STRIDE_IN_1X1: where res3-res5's first block strides
    input_format: str  # INPUT.FORMAT: the channel order the weights expect
    pixel_mean: Tuple[float, float, float]  # MODEL.PIXEL_MEAN, in that channel order
    pixel_std: Tuple[float, float, float]  # MODEL.PIXEL_STD


# MSRA's caffe2 ResNets stride in the 1x1 convolution and take BGR 0-255 minus the mean (std 1, Detectron2's
# defaults); torchvision's stride in the 3x3 and take RGB normalised by ImageNet's std (Detectron2's
# tools/convert-torchvision-to-d2.py says to set exactly these).
IMAGENET_FORMATS = {
    "caffe2": ImageNetFormat(True, "BGR", (103.530, 116.280, 123.675), (1.0, 1.0, 1.0)),
    "torchvision": ImageNetFormat(False, "RGB", (123.675, 116.280, 103.530), (58.395, 57.120, 57.375)),
}


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays, and nothing that could run code."""

    _ALLOWED = {("collections", "OrderedDict"), ("numpy", "ndarray"), ("numpy", "dtype"),
                ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"asks for {module}.{name}")
        return super().find_class(module, name)


def load_error(error: Exception) -> str:
    """What went wrong in a load, without torch's advice to load the file unsafely."""
    return f"{type(error).__name__}: {str(error).rpartition('WeightsUnpickler error: ')[2].strip()}"


def refusal(what: str, error: pickle.UnpicklingError, fix: str) -> Optional[CheckpointError]:
    """The error for a file that asked the unpickler (ours or ``weights_only``'s) for a class beyond weights; None
    when the unpickler stopped for another reason (a damaged file)."""
    asked = re.search(r"(?:Unsupported class|asks for) ([\w.]+)", str(error))
    if asked is None:
        return None
    return CheckpointError(f"{what} was refused: it is not a plain file of weights (it asks for {asked.group(1)}), "
                           f"and loading it could run code hidden in it; {fix}")


def read_weights_file(path: str, what: str) -> Dict[str, Any]:
    """The dict a weights file holds, read without executing code from it.

    ``.pkl``: Detectron2's pickles (caffe2 blobs or Detectron2 names) through an unpickler that admits only
    containers, numbers, strings and numpy arrays; anything else: ``torch.load(weights_only=True)``. ``what``
    names the file in errors (e.g. ``model.weights=/x/R-50.pkl``).
    """
    try:
        if path.endswith(".pkl"):
            with open(path, "rb") as f:
                data = _ArraysOnly(f, encoding="latin1").load()
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle and torch raise many types for a foreign or truncated file
        refused = isinstance(e, pickle.UnpicklingError) and refusal(what, e, "use the original file from its publisher")
        raise refused or CheckpointError(f"{what} could not be read ({load_error(e)}); pass Detectron2's "
                                         f"ImageNet R-50.pkl or torchvision's resnet50-*.pth") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} holds a {type(data).__name__}, not a dict of named tensors")
    return data


def imagenet_format_of(path: str, data: Mapping[str, Any]) -> str:
    """``caffe2`` or ``torchvision``: a torch file is torchvision's; a ``.pkl`` is caffe2's unless Detectron2's
    converter wrote it from torchvision's weights (its ``__author__``)."""
    if not path.endswith(".pkl") or data.get("__author__") == "torchvision":
        return "torchvision"
    return "caffe2"


def imagenet_tensors(path: str, data: Mapping[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """A weights file's tensors by file name, and each file name's ResNet state-dict name."""
    if not path.endswith(".pkl"):
        names = {k: torchvision_to_d2_name(k) for k in data}
    elif "model" in data and "__author__" in data:  # Detectron2's format: its names already
        data = data["model"]
        names = {k: k for k in data}
    else:
        data = {k: v for k, v in data.get("blobs", data).items() if not k.endswith("_momentum")}
        names = c2_to_d2_names(list(data))
    return {k: torch.as_tensor(np.asarray(v)) for k, v in data.items()}, names


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
