"""Each operation is what its name says: measured receptive fields, groups, identity, zeros and hand-counted
parameters; every op keeps channels at both strides; pool files and their errors."""
import pytest
import torch
from torch import nn

from fsd_d2.nas.ops import OPS, POOL_DIR, load_pool, validate_pool

HEAD13 = load_pool("head13")
C = 16


def square(r):
    return {(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)}


def dilated(d):
    return {(dy, dx) for dy in (-d, 0, d) for dx in (-d, 0, d)}


def positive(module: nn.Module) -> nn.Module:
    """Strictly positive weights and BN in eval mode: positive inputs then stay positive through every ReLU,
    so an input pixel gets a non-zero gradient exactly when it lies in the receptive field."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.abs() + 0.01)
    return module.eval()


def footprint(module: nn.Module, stride: int, size: int = 21, dim: str = "space"):
    """Input positions (offsets from the centre pixel) or channels reaching output channel 0 at the centre."""
    x = (torch.rand(1, C, size, size) + 0.1).requires_grad_()
    centre = size // 2
    module(x)[0, 0 if dim == "channels" else slice(None), centre // stride, centre // stride].sum().backward()
    if dim == "channels":
        return {int(c) for c in x.grad[0].abs().sum((1, 2)).nonzero()[:, 0]}
    return {(int(r) - centre, int(c) - centre) for r, c in x.grad[0].abs().sum(0).nonzero()}


RECEPTIVE_FIELDS = {  # (op, stride): input offsets seen by one output pixel
    ("conv_3x3", 1): square(1), ("conv_3x3", 2): square(1),
    ("dw_sep_conv_3x3", 1): square(1), ("dw_sep_conv_3x3", 2): square(1),
    ("dw_sep_conv_5x5", 1): square(2), ("dw_sep_conv_5x5", 2): square(2),
    ("dil_conv_3x3_d3", 1): dilated(3), ("dil_conv_3x3_d3", 2): dilated(3),  # 3x3 taps spread over 7x7
    ("dil_conv_3x3_d5", 1): dilated(5), ("dil_conv_3x3_d5", 2): dilated(5),  # 3x3 taps spread over 11x11
    ("fac_conv_5x5", 1): square(2), ("fac_conv_5x5", 2): square(2),  # 1x5 then 5x1 covers the full 5x5
    # Res2Net: group i sees group i-1's output, so 3x3, 5x5, 7x7 fields; at stride 2 the links are dropped.
    ("res2conv_3x3", 1): square(3), ("res2conv_3x3", 2): square(1),
    ("avg_pool_3x3", 1): square(1), ("avg_pool_3x3", 2): square(1),
}


@pytest.mark.parametrize("op, stride", sorted(RECEPTIVE_FIELDS))
def test_receptive_field(op, stride):
    torch.manual_seed(0)
    assert footprint(positive(OPS[op](C, stride, True)), stride) == RECEPTIVE_FIELDS[op, stride]


@pytest.mark.parametrize("op", ["non_local", "se"])
def test_attention_ops_see_the_whole_map(op):
    torch.manual_seed(0)
    assert footprint(positive(OPS[op](C, 1, True)), 1, size=9) == square(4)


@pytest.mark.parametrize("op, kernel", [("dw_sep_conv_3x3", 3), ("dw_sep_conv_5x5", 5)])
def test_depthwise_separable_filters_each_channel_then_mixes(op, kernel):
    module = OPS[op](C, 1, True)
    depthwise, pointwise = [m for m in module if isinstance(m, nn.Conv2d)]
    assert depthwise.groups == C and depthwise.kernel_size == (kernel, kernel)
    assert pointwise.groups == 1 and pointwise.kernel_size == (1, 1)
    torch.manual_seed(0)
    assert footprint(positive(nn.Sequential(depthwise)), 1, dim="channels") == {0}  # one channel in
    assert footprint(positive(module), 1, dim="channels") == set(range(C))  # the pointwise conv mixes all


def test_dilated_convs_are_dense_3x3_kernels():
    for op, dilation in [("conv_3x3", 1), ("dil_conv_3x3_d3", 3), ("dil_conv_3x3_d5", 5)]:
        (conv,) = [m for m in OPS[op](C, 1, True).modules() if isinstance(m, nn.Conv2d)]
        assert (conv.kernel_size, conv.dilation, conv.groups) == ((3, 3), (dilation, dilation), 1), op


def test_skip_connect_is_the_identity_at_stride_1():
    x = torch.randn(2, C, 7, 7)
    assert torch.equal(OPS["skip_connect"](C, 1, True)(x), x)


@pytest.mark.parametrize("stride", [1, 2])
def test_none_outputs_zeros(stride):
    out = OPS["none"](C, stride, True)(torch.randn(2, C, 7, 7))
    assert out.shape == (2, C, (7 + stride - 1) // stride, (7 + stride - 1) // stride)
    assert not out.any()


BN = 2 * C  # an affine BatchNorm: a scale and a shift per channel
FACTORIZED_REDUCE = 2 * C * (C // 2) + BN  # two strided 1x1 convs to C/2 channels each
PARAMETERS = {  # (op, stride): hand count at C = 16, affine BN
    ("none", 1): 0,
    ("skip_connect", 1): 0,
    ("skip_connect", 2): FACTORIZED_REDUCE,  # 288
    ("conv_3x3", 1): C * C * 9 + BN,  # 2336
    ("dw_sep_conv_3x3", 1): C * 9 + C * C + BN,  # depthwise 144 + pointwise 256 + BN = 432
    ("dw_sep_conv_5x5", 1): C * 25 + C * C + BN,  # 400 + 256 + 32 = 688
    ("fac_conv_5x5", 1): 2 * C * C * 5 + BN,  # 1x5 and 5x1: 2592
    ("res2conv_3x3", 1): 3 * (4 * 4 * 9 + 2 * 4) + C * C + BN,  # 3 groups of 4 channels, 1x1 fuse: 744
    ("dil_conv_3x3_d3", 1): C * C * 9 + BN,  # dilation adds no weight: 2336
    ("dil_conv_3x3_d5", 1): C * C * 9 + BN,
    ("dw_sep_conv_5x5", 2): C * 25 + C * C + BN,  # striding adds no weight
    ("avg_pool_3x3", 1): BN,
    ("max_pool_3x3", 1): BN,
    ("non_local", 1): 3 * (C * 8 + 8) + 8 * C + BN,  # theta, phi, g to C/2 (with bias); W back, BN: 568
    ("non_local", 2): FACTORIZED_REDUCE + 3 * (C * 8 + 8) + 8 * C + BN,
    ("se", 1): (C * 4 + 4) + (4 * C + C),  # squeeze to C/4 and excite back, with biases: 148
    ("se", 2): FACTORIZED_REDUCE + (C * 4 + 4) + (4 * C + C),
}


def test_parameter_counts_cover_every_op():
    assert {op for op, _ in PARAMETERS} == set(OPS)


@pytest.mark.parametrize("op, stride", sorted(PARAMETERS))
def test_parameter_count(op, stride):
    assert sum(p.numel() for p in OPS[op](C, stride, True).parameters()) == PARAMETERS[op, stride]


@pytest.mark.parametrize("op", HEAD13)
@pytest.mark.parametrize("stride", [1, 2])
def test_op_keeps_channels_and_strides(op, stride):
    """The cells' contract: C channels out; stride 2 gives ceil(H / 2), odd sizes too (ROI features)."""
    torch.manual_seed(0)
    module = OPS[op](8, stride, False)
    for size in (16, 7):
        out = module(torch.randn(2, 8, size, size))
        assert out.shape == (2, 8, (size + stride - 1) // stride, (size + stride - 1) // stride), (op, size)
        assert torch.isfinite(out).all()


def test_search_ops_have_no_bn_affine():
    for op in HEAD13:
        assert not any(m.affine for m in OPS[op](8, 1, False).modules() if isinstance(m, nn.BatchNorm2d)), op


def test_res2conv_splits_channels_unevenly():
    module = OPS["res2conv_3x3"](10, 1, True)
    assert module.widths == [4, 2, 2, 2]  # 10 = 4 + 3 x 2: what does not split evenly goes to group 0
    assert module(torch.randn(1, 10, 8, 8)).shape == (1, 10, 8, 8)


def test_pools_load_and_head13_extends_bone8():
    bone8 = load_pool("bone8")
    assert len(bone8) == 8 and len(HEAD13) == 13
    assert HEAD13[:8] == bone8
    assert not any("pool" in op for op in bone8)  # the paper removes pooling from the backbone space
    assert [op for op in HEAD13 if op.startswith("dw_")] == ["dw_sep_conv_3x3", "dw_sep_conv_5x5"]
    assert load_pool(POOL_DIR / "bone8.yaml") == bone8


def test_validate_pool_returns_list():
    assert validate_pool(("none", "conv_3x3"), "tiny") == ["none", "conv_3x3"]


@pytest.mark.parametrize("ops, message", [
    (["none", "conv_7x7"], r"unknown operation\(s\) \['conv_7x7'\] \(known: none, skip_connect"),
    (["skip_connect", "conv_3x3"], "has no 'none' operation"),
    (["none", "conv_3x3", "conv_3x3"], r"\['conv_3x3'\] listed more than once"),
    ([], "is empty"),
    (["none"], "has only 'none'; add the operations to search over"),
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
