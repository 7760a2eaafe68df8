"""The inference form of a trained detector: BatchNorm folded into the FSD cells' convolutions, and on CPU
the channels-last memory layout.

A derived cell's operations are ReLU-Conv-BN: in eval mode each BatchNorm is a per-channel affine map of its
convolution's output, so it folds into that convolution's weight and bias (one pass over the activations
less per operation, same outputs to float rounding). The BatchNorm after a pooling (``avg_pool_3x3``,
``max_pool_3x3``) has no convolution before it and stays; eval-mode BatchNorm is already that affine map.
A derived cell has no ``none`` edge to drop (its genotype check refuses one) and its ``skip_connect`` edges
at stride 1 are ``nn.Identity``, which costs nothing.

On CPU the weights also go channels-last, and with them every activation that a convolution writes: oneDNN's
convolutions, the depthwise ones above all, run faster on that layout (the FSD box head on 1000 ROIs, one
thread: 1.6 s -> 0.9 s; FPN-R50 unchanged). On CUDA it is left off: not measured there in fp32.

Deploy after loading the weights: the folded model has other parameters (conv biases, no BN statistics) and
cannot be trained or saved as a checkpoint of the original architecture.
"""
import logging

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights

from fsd_d2.nas.cells import DerivedCell
from fsd_d2.nas.ops import FactorizedReduce

__all__ = ["deploy_", "deploy_cell_", "fold_batchnorm_"]
logger = logging.getLogger(__name__)


def _fold_sequential(seq: nn.Sequential) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d in ``seq``; the BN's slot becomes an Identity (the
    other modules keep their names). Returns how many were folded."""
    folded = 0
    for i in range(len(seq) - 1):
        conv, bn = seq[i], seq[i + 1]
        if type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d):
            seq[i], seq[i + 1] = fuse_conv_bn_eval(conv, bn), nn.Identity()
            folded += 1
    return folded


def _fold_factorized_reduce(op: FactorizedReduce) -> None:
    """FactorizedReduce normalises the concatenation of its two convolutions: fold each half of the BN into
    the convolution that produced those channels."""
    bn, half = op.bn, op.conv1.out_channels
    for conv, part in ((op.conv1, slice(None, half)), (op.conv2, slice(half, None))):
        weight = None if bn.weight is None else bn.weight[part]
        bias = None if bn.bias is None else bn.bias[part]
        conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean[part],
                                                      bn.running_var[part], bn.eps, weight, bias)
    op.bn = nn.Identity()


def fold_batchnorm_(model: nn.Module) -> int:
    """Fold, in place, every BatchNorm2d of the derived cells in ``model`` that follows a convolution; returns
    how many were folded. ``model`` must be in eval mode (training-mode BN normalises by the batch instead)."""
    if model.training:
        raise ValueError("fold_batchnorm_: the model is in training mode; call model.eval() first (BatchNorm "
                         "folds its running statistics, which only eval mode uses)")
    return _fold_within([m for cell in model.modules() if isinstance(cell, DerivedCell) for m in cell.modules()])


def _fold_within(modules) -> int:
    folded = 0
    for m in modules:
        if isinstance(m, nn.Sequential):
            folded += _fold_sequential(m)
        elif isinstance(m, FactorizedReduce) and isinstance(m.bn, nn.BatchNorm2d):  # not folded yet
            _fold_factorized_reduce(m)
            folded += 1
    return folded


def deploy_cell_(module: nn.Module) -> nn.Module:
    """A derived cell, or one of its operations, in place in the form :func:`deploy_` gives it inside a detector
    (eval mode, BatchNorms after convolutions folded, channels-last on CPU); returns it. The op-latency table
    times this form, since it is what ``+stage=eval`` runs."""
    module.eval()
    _fold_within(list(module.modules()))
    if next(module.parameters(), torch.empty(0)).device.type == "cpu":
        module.to(memory_format=torch.channels_last)
    return module


def deploy_(model: nn.Module) -> nn.Module:
    """Put a loaded detector in eval mode and turn it, in place, into its inference form (see the module
    docstring); returns it. Outputs equal the original's to float rounding."""
    model.eval()
    folded = fold_batchnorm_(model)
    cpu = next(model.parameters()).device.type == "cpu"
    if cpu:
        model.to(memory_format=torch.channels_last)
    logger.info(f"deploy: folded {folded} BatchNorms into the FSD cells' convolutions"
                f"{', channels-last layout' if cpu else ''} (model.deploy=false keeps the trained form)")
    return model
