"""Operation registry and pools: every op keeps channels at both strides; pool files and their errors."""
import pytest
import torch

from fsd_d2.nas.ops import OPS, POOL_DIR, load_pool, validate_pool

HEAD13 = load_pool("head13")


def test_pools_load_and_head13_extends_bone8():
    bone8 = load_pool("bone8")
    assert len(bone8) == 8 and len(HEAD13) == 13
    assert HEAD13[:8] == bone8
    assert not any("pool" in op for op in bone8)  # the paper removes pooling from the backbone space
    assert load_pool(POOL_DIR / "bone8.yaml") == bone8


@pytest.mark.parametrize("op", HEAD13)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("affine", [False, True])
def test_op_keeps_channels_and_strides(op, stride, affine):
    torch.manual_seed(0)
    module = OPS[op](8, stride, affine)
    for size in (16, 7):  # odd sizes too: ROI features need not be even
        out = module(torch.randn(2, 8, size, size))
        expected = size if stride == 1 else (size + 1) // 2
        assert out.shape == (2, 8, expected, expected), (op, stride, size)
        assert torch.isfinite(out).all()
    if op not in ("none", "skip_connect", "avg_pool_3x3", "max_pool_3x3"):
        assert sum(p.numel() for p in module.parameters()) > 0  # a real, trainable operation
    if op == "none":
        assert (out == 0).all()


def test_res2conv_splits_channels_unevenly():
    out = OPS["res2conv_3x3"](10, 1, True)(torch.randn(1, 10, 8, 8))  # 10 = 4 + 3 x 2 channels
    assert out.shape == (1, 10, 8, 8)


def test_validate_pool_returns_list():
    assert validate_pool(("none", "conv_3x3"), "tiny") == ["none", "conv_3x3"]


@pytest.mark.parametrize("ops, message", [
    (["none", "conv_7x7"], r"unknown operation\(s\) \['conv_7x7'\] \(known: none, skip_connect"),
    (["skip_connect", "conv_3x3"], "has no 'none' operation"),
    (["none", "conv_3x3", "conv_3x3"], r"\['conv_3x3'\] listed more than once"),
    ([], "is empty"),
])
def test_validate_pool_errors(ops, message):
    with pytest.raises(ValueError, match=message):
        validate_pool(ops, "mine")


def test_load_pool_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no file .*nope\.yaml .*'bone8', 'head13'"):
        load_pool("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nops: [none, conv_3x3\n")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        load_pool(bad)
    bad.write_text("- none\n- conv_3x3\n")
    with pytest.raises(ValueError, match="bad.yaml: expected a mapping"):
        load_pool(bad)
    bad.write_text("name: bad\nops: [conv_3x3]\n")
    with pytest.raises(ValueError, match="pool 'bad' has no 'none'"):
        load_pool(bad)
