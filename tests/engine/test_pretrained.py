"""``model.init=imagenet``: Detectron2's caffe2 R-50.pkl and torchvision's resnet50-*.pth load into the ResNet of
FPN-R50 (whole) and of the FSD backbones (stem + res2), or the run stops naming what did not match.

The files are written here with the real key names (converted backwards from the model by tables written
independently of fsd_d2.modeling.pretrained) and the shapes of the tiny experiment's narrowed ResNet.
"""
import logging
import pickle
import re

import numpy as np
import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from torch import nn

from fsd_d2.config import build_cfg
from fsd_d2.engine.checkpoint import AtomicCheckpointer, architecture_from_checkpoint
from fsd_d2.engine.pretrained import load_pretrained
from fsd_d2.engine.runner import run_stage
from fsd_d2.errors import CheckpointError, ConfigError
from fsd_d2.nas.genotype import CellGenotype, Genotype, save_genotype

CELL = CellGenotype([[("dw_sep_conv_3x3", 0), ("conv_3x3", 1)], [("skip_connect", 0), ("conv_3x3", 2)],
                     [("skip_connect", 1), ("skip_connect", 3)], [("skip_connect", 4), ("skip_connect", 1)]])
STATS = (".running_mean", ".running_var")  # caffe2 ImageNet files fold BatchNorm statistics into scale and bias
RESNET_OF = {"train": "backbone.bottom_up", "search_bone": "backbone.bottom_up.trunk",
             "train_bone": "backbone.bottom_up.trunk"}  # stage (its default model) -> the ImageNet-initialised part

C2_STEM = {"stem.conv1.weight": "conv1_w", "stem.conv1.norm.weight": "res_conv1_bn_s",
           "stem.conv1.norm.bias": "res_conv1_bn_b"}
C2_BRANCH = {"shortcut": "branch1", "conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c"}
C2_SUFFIX = {"weight": "_w", "norm.weight": "_bn_s", "norm.bias": "_bn_b"}
TV_LAYER = {"shortcut": "downsample.0", "shortcut.norm": "downsample.1",
            "conv1.norm": "bn1", "conv2.norm": "bn2", "conv3.norm": "bn3"}


def caffe2_name(key: str) -> str:
    """``res2.0.shortcut.norm.weight`` -> ``res2_0_branch1_bn_s`` (MSRA R-50.pkl)."""
    if key in C2_STEM:
        return C2_STEM[key]
    stage, block, conv, rest = key.split(".", 3)
    return f"{stage}_{block}_{C2_BRANCH[conv]}{C2_SUFFIX[rest]}"


def torchvision_name(key: str) -> str:
    """``res2.0.conv1.norm.weight`` -> ``layer1.0.bn1.weight``, ``res3.0.shortcut.norm.bias`` ->
    ``layer2.0.downsample.1.bias`` (torchvision's resnet50)."""
    module, leaf = key.rsplit(".", 1)
    if module.startswith("stem."):
        return f"{ {'stem.conv1': 'conv1', 'stem.conv1.norm': 'bn1'}[module] }.{leaf}"
    stage, block, layer = module.split(".", 2)
    layer = TV_LAYER.get(layer, layer)  # convK stays convK
    return f"layer{int(stage[3:]) - 1}.{block}.{layer}.{leaf}"


@pytest.mark.parametrize("key, c2, tv", [
    ("stem.conv1.weight", "conv1_w", "conv1.weight"),
    ("stem.conv1.norm.bias", "res_conv1_bn_b", "bn1.bias"),
    ("res2.0.shortcut.weight", "res2_0_branch1_w", "layer1.0.downsample.0.weight"),
    ("res2.0.shortcut.norm.weight", "res2_0_branch1_bn_s", "layer1.0.downsample.1.weight"),
    ("res3.1.conv2.weight", "res3_1_branch2b_w", "layer2.1.conv2.weight"),
    ("res5.2.conv3.norm.weight", "res5_2_branch2c_bn_s", "layer4.2.bn3.weight")])
def test_the_backward_tables_write_the_real_names(key, c2, tv):
    assert caffe2_name(key) == c2 and torchvision_name(key) == tv


def _cfg(compose_cfg, tmp_path, stage, *overrides):
    genotype = save_genotype(Genotype("bone8", {"reduce": CELL}), tmp_path / "genotype_bone.yaml")
    return build_cfg(compose_cfg(stage, f"model.genotype_bone={genotype}", *overrides))


def _imagenet_like(key: str, shape, gen) -> torch.Tensor:
    """Random, but of a trained network's scale, so a detector can train on it: He-scaled convolutions,
    BatchNorm scales and variances near 1, biases and means near 0, and small last scales of the residual
    branches (FrozenBN does not renormalise: 16 blocks would otherwise grow the features ~1000x)."""
    if len(shape) == 4:
        return torch.randn(shape, generator=gen) * (2.0 / (shape[1] * shape[2] * shape[3])) ** 0.5
    if key.endswith("conv3.norm.weight"):
        return 0.1 + 0.2 * torch.rand(shape, generator=gen)
    if key.endswith(("norm.weight", "running_var")):
        return 0.5 + torch.rand(shape, generator=gen)
    return 0.1 * torch.randn(shape, generator=gen)


@pytest.fixture
def imagenet_files(compose_cfg, tmp_path):
    """The tiny ResNet's random weights as the ImageNet files researchers have: {format: path}, {ResNet key: tensor}.
    ``pkl``: Detectron2's caffe2 R-50.pkl; ``pth``: torchvision's resnet50-*.pth; ``d2.pkl``: the output of
    Detectron2's tools/convert-torchvision-to-d2.py."""
    cfg = _cfg(compose_cfg, tmp_path, "train", "model.init=imagenet")
    resnet = build_model(cfg).backbone.bottom_up
    gen = torch.Generator().manual_seed(0)
    tensors = {k: _imagenet_like(k, v.shape, gen) for k, v in resnet.state_dict().items()}
    classifier = torch.rand(1000, resnet.output_shape()["res5"].channels, generator=gen)
    pkl, pth = tmp_path / "R-50.pkl", tmp_path / "resnet50-0676ba61.pth"
    blobs = {caffe2_name(k): v.numpy() for k, v in tensors.items() if not k.endswith(STATS)}
    with open(pkl, "wb") as f:
        pickle.dump({**blobs, "fc1000_w": classifier.numpy(), "fc1000_b": np.zeros(1000, np.float32)}, f)
    state = {torchvision_name(k): v for k, v in tensors.items()}
    state.update({k.replace("running_mean", "num_batches_tracked"): torch.tensor(7)
                  for k in state if k.endswith("running_mean")})
    torch.save({**state, "fc.weight": classifier, "fc.bias": torch.zeros(1000)}, pth)
    converted = tmp_path / "R-50-torchvision.pkl"
    with open(converted, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in tensors.items()}, "__author__": "torchvision",
                     "matching_heuristics": True}, f)
    return {"pkl": str(pkl), "pth": str(pth), "d2.pkl": str(converted)}, tensors


@pytest.mark.parametrize("stage", ["train", "search_bone", "train_bone"])
@pytest.mark.parametrize("fmt", ["pkl", "pth", "d2.pkl"])
def test_imagenet_files_fill_every_tensor_of_the_resnet(compose_cfg, tmp_path, imagenet_files, stage, fmt):
    files, tensors = imagenet_files
    cfg = _cfg(compose_cfg, tmp_path, stage, "model.init=imagenet", f"model.weights={files[fmt]}")
    model = build_model(cfg)
    prefix = RESNET_OF[stage]
    resnet = model.get_submodule(prefix)
    assert resnet.stage_names == (("res2", "res3", "res4", "res5") if stage == "train" else ("res2",))
    loaded = load_pretrained(cfg, model)
    state = model.state_dict()
    keys = list(resnet.state_dict())
    for key in keys:
        if fmt == "pkl" and key.endswith(STATS):  # FrozenBN applies the file's folded scale and bias as they are
            expected = torch.full_like(tensors[key], 0.0 if key.endswith("mean") else 1 - 1e-5)
        else:
            expected = tensors[key]
        assert torch.equal(state[f"{prefix}.{key}"], expected), key
    assert loaded == len([k for k in keys if fmt != "pkl" or not k.endswith(STATS)])


def test_imagenet_defaults_are_detectron2s_and_scratch_stays_groupnorm(compose_cfg, tmp_path):
    scratch = _cfg(compose_cfg, tmp_path, "train_bone")
    imagenet = _cfg(compose_cfg, tmp_path, "train_bone", "model.init=imagenet")
    assert (scratch.MODEL.RESNETS.NORM, scratch.MODEL.BACKBONE.FREEZE_AT) == ("GN", 0)
    assert (imagenet.MODEL.RESNETS.NORM, imagenet.MODEL.BACKBONE.FREEZE_AT) == ("FrozenBN", 2)
    bottom_up = build_model(imagenet).backbone.bottom_up
    assert not any(p.requires_grad for p in bottom_up.trunk.parameters())  # stem + res2 frozen
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in bottom_up.trunk.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in bottom_up.trunk.modules())
    new_norms = [m for m in bottom_up.cells.modules() if isinstance(m, nn.BatchNorm2d)]  # the cells keep their own
    assert new_norms and all(p.requires_grad for p in bottom_up.cells.parameters())
    fpn = build_model(_cfg(compose_cfg, tmp_path, "train", "model.init=imagenet")).backbone.bottom_up
    assert not any(p.requires_grad for p in fpn.res2.parameters())
    assert all(p.requires_grad for p in fpn.res3.parameters())
    scratch_trunk = build_model(scratch).backbone.bottom_up.trunk
    assert any(isinstance(m, nn.GroupNorm) for m in scratch_trunk.modules())
    assert all(p.requires_grad for p in scratch_trunk.parameters())


def test_init_and_weights_must_agree(compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"model.weights=/x/R-50.pkl is set but model.init=scratch ignores it; "
                                          r"add model.init=imagenet"):
        _cfg(compose_cfg, tmp_path, "train", "model.weights=/x/R-50.pkl")
    with pytest.raises(ConfigError, match=r"model.init='pretrained': must be scratch or imagenet"):
        _cfg(compose_cfg, tmp_path, "train", "model.init=pretrained")
    cfg = _cfg(compose_cfg, tmp_path, "train", "model.init=imagenet")  # eval-like stages build it without weights
    with pytest.raises(ConfigError, match=r"model.init=imagenet needs model.weights="):
        load_pretrained(cfg, build_model(cfg))


def test_a_file_of_other_names_stops_with_the_names(compose_cfg, tmp_path):
    other = tmp_path / "encoder.pth"
    torch.save({"encoder.conv.weight": torch.zeros(3), "decoder.bias": torch.zeros(1)}, other)
    cfg = _cfg(compose_cfg, tmp_path, "search_bone", "model.init=imagenet", f"model.weights={other}")
    with pytest.raises(CheckpointError, match=r"does not cover the model's ImageNet-initialised "
                                              r"backbone.bottom_up.trunk \(stem \+ res2\)") as err:
        load_pretrained(cfg, build_model(cfg))
    message = str(err.value)
    assert "model keys that got nothing (" in message and "backbone.bottom_up.trunk.stem.conv1.weight" in message
    assert "file keys that matched nothing (2): encoder.conv.weight, decoder.bias" in message


def test_a_file_of_other_widths_stops_with_the_shapes(compose_cfg, tmp_path, imagenet_files):
    pkl = imagenet_files[0]["pkl"]
    with open(pkl, "rb") as f:
        blobs = pickle.load(f)
    blobs["conv1_w"] = np.zeros((64, 3, 7, 7), np.float32)  # ResNet-50's stem, not the tiny experiment's
    with open(pkl, "wb") as f:
        pickle.dump(blobs, f)
    cfg = _cfg(compose_cfg, tmp_path, "train", "model.init=imagenet", f"model.weights={pkl}")
    with pytest.raises(CheckpointError, match=r"shape differs \(1\): backbone.bottom_up.stem.conv1.weight "
                                              r"\(conv1_w\): file \(64, 3, 7, 7\) vs model \(32, 3, 7, 7\)"):
        load_pretrained(cfg, build_model(cfg))


def test_scratch_logs_that_nothing_was_loaded(compose_cfg, tmp_path):
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    log = logging.getLogger("fsd_d2.engine.pretrained")  # the runner's logging setup stops propagation to caplog
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)
    try:
        cfg = _cfg(compose_cfg, tmp_path, "train")
        assert load_pretrained(cfg, build_model(cfg)) == 0
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert [r.getMessage() for r in records] == ["init=scratch: loaded 0 tensors (ResNet norm GN, FREEZE_AT 0)"]


@pytest.mark.parametrize("stage, fmt, part, extra", [("train", "pth", "whole ResNet", []),
                                                     ("search_bone", "pkl", "stem + res2", ["search.order=1"])])
def test_stages_start_from_the_file_and_keep_the_frozen_part(compose_cfg, tmp_path, imagenet_files, stage, fmt, part,
                                                             extra):
    files, tensors = imagenet_files
    path = files[fmt]
    run = tmp_path / "run"
    run_stage(compose_cfg(stage, "model.init=imagenet", f"model.weights={path}", *extra, output_dir=run))
    prefix = RESNET_OF[stage]
    log = (run / "log.txt").read_text()
    assert re.search(rf"init=imagenet: loaded \d+ tensors from {re.escape(path)} \({re.escape(part)}: {prefix}, "
                     rf"norm FrozenBN, FREEZE_AT 2\)", log), log[-2000:]
    final = torch.load(run / "model_final.pth", map_location="cpu")["model"]
    frozen = [k for k in tensors if k.startswith(("stem.", "res2.")) and not k.endswith(STATS)]
    for key in frozen:  # FREEZE_AT=2: trained, yet still the file's
        assert torch.equal(final[f"{prefix}.{key}"], tensors[key]), key


TORCHVISION = {"STRIDE_IN_1X1": False, "FORMAT": "RGB", "PIXEL_MEAN": [123.675, 116.28, 103.53],
               "PIXEL_STD": [58.395, 57.12, 57.375]}  # Detectron2's tools/convert-torchvision-to-d2.py
CAFFE2 = {"STRIDE_IN_1X1": True, "FORMAT": "BGR", "PIXEL_MEAN": [103.53, 116.28, 123.675], "PIXEL_STD": [1.0] * 3}


def _input_settings(cfg):
    return {"STRIDE_IN_1X1": cfg.MODEL.RESNETS.STRIDE_IN_1X1, "FORMAT": cfg.INPUT.FORMAT,
            "PIXEL_MEAN": pytest.approx(list(cfg.MODEL.PIXEL_MEAN)), "PIXEL_STD": pytest.approx(list(cfg.MODEL.PIXEL_STD))}


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    """torchvision's own resnet50 (random weights, BatchNorm statistics made non-trivial), saved as its file."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet50()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5), m.weight.uniform_(0.1, 0.3)
    path = tmp_path_factory.mktemp("tv") / "resnet50-0676ba61.pth"
    torch.save(net.state_dict(), path)
    return str(path), net.eval()


def test_a_torchvision_file_strides_in_the_3x3_and_takes_its_input_statistics(compose_cfg, tmp_path,
                                                                              torchvision_file):
    """The stride goes where torchvision's weights expect it: the loaded ResNet computes torchvision's features."""
    path, net = torchvision_file
    cfg = _cfg(compose_cfg, tmp_path, "train", "model.init=imagenet", f"model.weights={path}")
    assert cfg.MODEL.IMAGENET_FORMAT == "torchvision" and _input_settings(cfg) == TORCHVISION
    resnet = cfg.MODEL.RESNETS  # ResNet-50's real widths (tiny narrows them), for torchvision's real shapes
    resnet.STEM_OUT_CHANNELS, resnet.WIDTH_PER_GROUP, resnet.RES2_OUT_CHANNELS = 64, 64, 256
    model = build_model(cfg).eval()
    load_pretrained(cfg, model)
    block = model.backbone.bottom_up.res3[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))))
        ours = model.backbone.bottom_up(x)["res3"]
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
        cfg.MODEL.RESNETS.STRIDE_IN_1X1 = True  # what Detectron2's defaults built before: the same weights, wrong
        wrong = build_model(cfg).eval()
        load_pretrained(cfg, wrong)
        off = (wrong.backbone.bottom_up(x)["res3"] - expected).abs().max()
        assert off > 100 * (ours - expected).abs().max() and off > 1e-3


@pytest.mark.parametrize("fmt, expected", [("pkl", CAFFE2), ("pth", TORCHVISION), ("d2.pkl", TORCHVISION)])
def test_each_file_format_sets_its_input_settings(compose_cfg, tmp_path, imagenet_files, fmt, expected):
    cfg = _cfg(compose_cfg, tmp_path, "train", "model.init=imagenet", f"model.weights={imagenet_files[0][fmt]}")
    assert _input_settings(cfg) == expected
    scratch = _cfg(compose_cfg, tmp_path, "train")
    assert scratch.MODEL.IMAGENET_FORMAT == "" and _input_settings(scratch) == CAFFE2  # Detectron2's defaults


def test_an_override_of_what_the_file_sets_is_refused(compose_cfg, tmp_path, imagenet_files):
    with pytest.raises(ConfigError, match=r"d2 override rejected: with model.init=imagenet, MODEL.PIXEL_STD follows "
                                          r"the format of model.weights"):
        _cfg(compose_cfg, tmp_path, "train", "model.init=imagenet", f"model.weights={imagenet_files[0]['pth']}",
             "+d2.MODEL.PIXEL_STD=[57.375,57.120,58.395]")


def test_a_checkpoint_brings_its_initialisation(compose_cfg, tmp_path, imagenet_files):
    """A checkpoint of a torchvision-initialised model loads without restating model.init; a config that names
    another initialisation stops."""
    run = tmp_path / "run"
    run_stage(compose_cfg("train", "model.init=imagenet", f"model.weights={imagenet_files[0]['pth']}",
                          output_dir=run))
    checkpoint = str(run / "model_final.pth")
    assert torch.load(checkpoint, weights_only=True)["init"] == {"init": "imagenet", "imagenet_format": "torchvision"}
    cfg = _cfg(compose_cfg, tmp_path, "eval")
    architecture_from_checkpoint(cfg, checkpoint)
    assert (cfg.MODEL.INIT, cfg.MODEL.RESNETS.NORM, cfg.MODEL.BACKBONE.FREEZE_AT) == ("imagenet", "FrozenBN", 2)
    assert _input_settings(cfg) == TORCHVISION
    AtomicCheckpointer(build_model(cfg)).load_matching(checkpoint)  # the architecture fits
    evaluated = run_stage(compose_cfg("eval", f"checkpoint={checkpoint}", output_dir=tmp_path / "eval"))
    assert evaluated["deeplesion_test"]["bbox"]["AP"] >= 0
    with pytest.raises(ConfigError, match=r"holds a model of model.init=imagenet \(torchvision format\), but the "
                                          r"config asks for model.init=imagenet \(caffe2 format\)"):
        architecture_from_checkpoint(_cfg(compose_cfg, tmp_path, "eval", "model.init=imagenet",
                                          f"model.weights={imagenet_files[0]['pkl']}"), checkpoint)
