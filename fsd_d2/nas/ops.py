"""Candidate operations of the FSD search spaces, and the named pools built from them.

Operations are data (quark0/darts, khanrc/pt.darts): ``OPS`` maps a name to a factory
``(C, stride, affine) -> nn.Module`` and a pool is a list of names kept in ``fsd_d2/nas/pools/<name>.yaml``
(package data, offered to Hydra as the ``search_space`` group), so adding an operation is one line here and
sweeping a search space is a config override.

Every operation keeps the channel count ``C``; at stride 2 it halves the spatial size to ``ceil(H / 2)``
(odd sizes included, so ROI features of any resolution work). Convolutions follow DARTS' ReLU-Conv-BN order.
BatchNorm's ``affine`` is False inside search cells (the alphas, not BN scales, should weigh the ops) and
True in derived cells.

The paper's "depthwise conv 3x3" (both pools) and "depthwise conv 5x5" (head pool) are one family here,
``dw_sep_conv_KxK``: ReLU, a depthwise K x K convolution (``groups=C``, strided), a pointwise 1x1 convolution,
BN — MobileNet's depthwise separable block, once, at the two kernel sizes the paper lists. A bare depthwise
convolution never mixes channels (an edge holding it filters each channel on its own); MobileNet, which the
paper names as its model of a light backbone, always follows one with a pointwise convolution. DARTS'
``sep_conv`` (two such blocks stacked) is not used: the paper names one depthwise conv. The other names say
what the operation is too: ``dil_conv_3x3_d3`` is a 3x3 convolution with dilation 3 (the paper's "conv 3x3
(dilation = 3)"), ``fac_conv_5x5`` a 1x5 then a 5x1 convolution. tests/nas/test_ops.py measures each one's
receptive field, groups and parameter count.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Sequence, Union

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from fsd_d2.errors import GenotypeError, MissingFileError

POOL_DIR = Path(__file__).resolve().parent / "pools"  # the packaged pools (bone8, head13)


class ReLUConvBN(nn.Sequential):
    def __init__(self, C_in: int, C_out: int, kernel: int, stride: int, padding: int, affine: bool,
                 dilation: int = 1):
        super().__init__(nn.ReLU(inplace=False),
                         nn.Conv2d(C_in, C_out, kernel, stride, padding, dilation=dilation, bias=False),
                         nn.BatchNorm2d(C_out, affine=affine))


class DepthwiseSeparableConv(nn.Sequential):
    """``dw_sep_conv_KxK``: depthwise k x k (one filter per channel, strided), pointwise 1x1 mixing, then BN."""

    def __init__(self, C: int, kernel: int, stride: int, affine: bool):
        super().__init__(nn.ReLU(inplace=False),
                         nn.Conv2d(C, C, kernel, stride, kernel // 2, groups=C, bias=False),
                         nn.Conv2d(C, C, 1, bias=False),
                         nn.BatchNorm2d(C, affine=affine))


class FacConv(nn.Sequential):
    """Factorized k x k convolution: 1 x k then k x 1 (each strided along its own axis), then BN."""

    def __init__(self, C: int, kernel: int, stride: int, affine: bool):
        pad = kernel // 2
        super().__init__(nn.ReLU(inplace=False),
                         nn.Conv2d(C, C, (1, kernel), (1, stride), (0, pad), bias=False),
                         nn.Conv2d(C, C, (kernel, 1), (stride, 1), (pad, 0), bias=False),
                         nn.BatchNorm2d(C, affine=affine))


class Res2Conv(nn.Module):
    """Res2Net-style multi-scale 3x3 convolution (Gao et al.): the channels are split into ``scale`` groups;
    group i > 0 is convolved after adding the previous group's output, so later groups see growing receptive
    fields; a 1x1 convolution fuses the groups. At stride 2 the additive links are dropped and the first group
    is average-pooled, as in Res2Net's downsampling blocks. Channels that do not split evenly go to group 0.
    """

    def __init__(self, C: int, stride: int, affine: bool, scale: int = 4):
        super().__init__()
        scale = min(scale, C)
        width = C // scale
        self.widths = [C - width * (scale - 1)] + [width] * (scale - 1)
        self.stride = stride
        self.first = nn.Identity() if stride == 1 else nn.AvgPool2d(3, stride, 1, count_include_pad=False)
        self.convs = nn.ModuleList(nn.Sequential(nn.Conv2d(width, width, 3, stride, 1, bias=False),
                                                 nn.BatchNorm2d(width, affine=affine)) for _ in range(scale - 1))
        self.fuse = ReLUConvBN(C, C, 1, 1, 0, affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = torch.split(F.relu(x), self.widths, dim=1)
        out, prev = [self.first(groups[0])], None
        for conv, g in zip(self.convs, groups[1:]):
            prev = conv(g if prev is None or self.stride != 1 else g + prev)
            out.append(prev)
        return self.fuse(torch.cat(out, dim=1))


class PoolBN(nn.Sequential):
    """3x3 pooling followed by BN (pt.darts), so pooled features are on the scale of the other candidates."""

    def __init__(self, kind: str, C: int, stride: int, affine: bool):
        pool = (nn.AvgPool2d(3, stride, 1, count_include_pad=False) if kind == "avg" else nn.MaxPool2d(3, stride, 1))
        super().__init__(pool, nn.BatchNorm2d(C, affine=affine))


class Zero(nn.Module):
    """The ``none`` operation: zeros of the output shape (strided), so a mixed op can learn to drop an edge."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, ::self.stride, ::self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    """Halve the resolution without losing half the pixels: two strided 1x1 convs, one shifted by a pixel."""

    def __init__(self, C_in: int, C_out: int, affine: bool):
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.conv2 = nn.Conv2d(C_in, C_out - C_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]  # same size as x, so odd sizes also give ceil(H/2)
        return self.bn(torch.cat([self.conv1(x), self.conv2(shifted)], dim=1))


class NonLocal(nn.Module):
    """Embedded-Gaussian non-local block (Wang et al. 2018): every position attends to every other one,
    z = x + BN(W (softmax(theta(x)^T phi(x)) g(x))). At stride 2 a FactorizedReduce comes first."""

    def __init__(self, C: int, stride: int, affine: bool):
        super().__init__()
        inner = max(C // 2, 1)
        self.reduce = FactorizedReduce(C, C, affine) if stride == 2 else nn.Identity()
        self.theta, self.phi, self.g = (nn.Conv2d(C, inner, 1) for _ in range(3))
        self.out = nn.Sequential(nn.Conv2d(inner, C, 1, bias=False), nn.BatchNorm2d(C, affine=affine))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reduce(x)
        n, _, h, w = x.shape
        theta, phi, g = (m(x).flatten(2) for m in (self.theta, self.phi, self.g))  # (N, C', HW)
        attention = torch.softmax(theta.transpose(1, 2) @ phi, dim=-1)  # (N, HW, HW)
        y = (g @ attention.transpose(1, 2)).view(n, -1, h, w)
        return x + self.out(y)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): channels rescaled by a gate computed from their global mean.
    At stride 2 a FactorizedReduce comes first."""

    def __init__(self, C: int, stride: int, affine: bool, reduction: int = 4):
        super().__init__()
        hidden = max(C // reduction, 1)
        self.reduce = FactorizedReduce(C, C, affine) if stride == 2 else nn.Identity()
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(C, hidden, 1), nn.ReLU(inplace=False),
                                  nn.Conv2d(hidden, C, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reduce(x)
        return x * self.gate(x)


OpFactory = Callable[[int, int, bool], nn.Module]

OPS: Dict[str, OpFactory] = {
    "none": lambda C, stride, affine: Zero(stride),
    "skip_connect": lambda C, stride, affine: nn.Identity() if stride == 1 else FactorizedReduce(C, C, affine),
    "conv_3x3": lambda C, stride, affine: ReLUConvBN(C, C, 3, stride, 1, affine),
    "dw_sep_conv_3x3": lambda C, stride, affine: DepthwiseSeparableConv(C, 3, stride, affine),
    "dw_sep_conv_5x5": lambda C, stride, affine: DepthwiseSeparableConv(C, 5, stride, affine),
    "fac_conv_5x5": lambda C, stride, affine: FacConv(C, 5, stride, affine),
    "res2conv_3x3": lambda C, stride, affine: Res2Conv(C, stride, affine),
    "dil_conv_3x3_d3": lambda C, stride, affine: ReLUConvBN(C, C, 3, stride, 3, affine, dilation=3),
    "dil_conv_3x3_d5": lambda C, stride, affine: ReLUConvBN(C, C, 3, stride, 5, affine, dilation=5),
    "avg_pool_3x3": lambda C, stride, affine: PoolBN("avg", C, stride, affine),
    "max_pool_3x3": lambda C, stride, affine: PoolBN("max", C, stride, affine),
    "non_local": lambda C, stride, affine: NonLocal(C, stride, affine),
    "se": lambda C, stride, affine: SqueezeExcite(C, stride, affine),
}


# Operations with no weights of their own (a pool's BN only rescales): DARTS' collapse drifts towards them, since
# they need no training to be useful early in a search (Zela et al. 2020, Chu et al. 2020).
PARAMETER_FREE_OPS = frozenset({"none", "skip_connect", "avg_pool_3x3", "max_pool_3x3"})


def validate_pool(ops: Sequence[str], name: str) -> List[str]:
    """Return ``ops`` as a list if it is a usable search space, else raise GenotypeError saying what to fix."""
    ops = list(ops)
    if not ops:
        raise GenotypeError(f"operation pool '{name}' is empty; list operations (known: {', '.join(OPS)}) in "
                            f"{POOL_DIR / (name + '.yaml')} or the model's *_pool key")
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise GenotypeError(f"operation pool '{name}': unknown operation(s) {unknown} (known: {', '.join(OPS)}); "
                            "fix the name or add a factory to fsd_d2.nas.ops.OPS")
    if set(ops) == {"none"}:
        raise GenotypeError(f"operation pool '{name}' has only 'none'; add the operations to search over")
    duplicates = sorted({op for op in ops if ops.count(op) > 1})
    if duplicates:
        raise GenotypeError(f"operation pool '{name}': {duplicates} listed more than once; each operation must "
                            "appear once (a duplicate would get two alphas for the same choice)")
    if "none" not in ops:
        raise GenotypeError(f"operation pool '{name}' has no 'none' operation; DARTS needs it to weigh edges "
                            "(genotype derivation ranks edges by their strongest non-none weight): add 'none'")
    return ops


def packaged_pools() -> List[str]:
    """Names of the pools shipped with the package."""
    return sorted(p.stem for p in POOL_DIR.glob("*.yaml"))


def load_pool(name_or_path: Union[str, Path]) -> List[str]:
    """The validated operation list of the packaged pool ``<name>``, or of a pool YAML file given by path."""
    arg = str(name_or_path)
    path = Path(arg) if arg.endswith((".yaml", ".yml")) or "/" in arg else POOL_DIR / f"{arg}.yaml"
    if not path.is_file():
        raise MissingFileError(f"operation pool '{arg}': no file {path} (pools in {POOL_DIR}: {packaged_pools()})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise GenotypeError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("ops"), list):
        raise GenotypeError(f"{path}: expected a mapping with 'name:' and an 'ops:' list of operation names")
    return validate_pool(data["ops"], str(data.get("name", path.stem)))
