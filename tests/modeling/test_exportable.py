"""What the export rests on: every operation of the search pools runs in ONNX Runtime as in PyTorch, and the graph
module's traced path (pooling as a gather, no per-image split) computes the eager numbers for any proposal count."""
import io

import numpy as np
import onnxruntime
import pytest
import torch
import torch.nn.functional as F

from fsd_d2.modeling.graph import RegionGraph, pool_bins
from fsd_d2.nas.ops import OPS


def _onnx_run(module: torch.nn.Module, example: torch.Tensor, *others: torch.Tensor, dynamic=None):
    """``module`` exported to ONNX on ``example``, then run in ONNX Runtime on ``example`` and ``others``."""
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module, (example,), buffer, opset_version=16, input_names=["x"], dynamic_axes=dynamic)
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    return [session.run(None, {"x": x.numpy()}) for x in (example, *others)]


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("op", sorted(OPS))
def test_every_pool_operation_runs_in_onnx_runtime_as_in_pytorch(op, stride):
    torch.manual_seed(0)
    module = OPS[op](8, stride, True).eval()
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 8, 10, 10)
    odd = torch.randn(1, 8, 7, 9)  # another size (odd: stride 2 gives ceil(H / 2)) through the same file
    outputs = _onnx_run(module, x, odd, dynamic={"x": {0: "n", 2: "h", 3: "w"}})
    for inp, (got,) in zip((x, odd), outputs):
        with torch.no_grad():
            expected = module(inp).numpy()
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("in_dim,dim", [(64, 1024), (512, 1024), (7168, 1024), (1000, 300), (1024, 1024), (5, 3)])
def test_pool_bins_are_adaptive_average_pooling(in_dim, dim):
    features = torch.randn(6, in_dim)
    index, mask, length = pool_bins(in_dim, dim)
    pooled = (features[:, index] * mask).sum(dim=2) / length
    torch.testing.assert_close(pooled, F.adaptive_avg_pool1d(features[:, None], dim)[:, 0], rtol=1e-6, atol=1e-6)


class _OneImage(torch.nn.Module):
    """The graph on one image's proposals, as the ROI heads call it: (R, d) -> X_e and A_e."""

    def __init__(self, graph: RegionGraph):
        super().__init__()
        self.region_graph = graph  # (not "graph": torch.onnx.export takes a module with one for a ScriptModule)

    def forward(self, x):
        x_e, relations = self.region_graph(x, [x.shape[0]])
        return x_e, relations[0]


@pytest.mark.parametrize("in_dim", [64, 2048])  # D = 1024 divides neither (ONNX's own pooling would refuse 64)
def test_the_traced_graph_computes_the_eager_numbers_for_any_proposal_count(in_dim):
    torch.manual_seed(0)
    module = _OneImage(RegionGraph(in_dim, 1024, 8)).eval()
    traced_on, others = torch.randn(7, in_dim), [torch.randn(12, in_dim), torch.randn(3, in_dim)]
    with torch.no_grad():
        script = torch.jit.trace(module, (traced_on,))
        expected = [module(x) for x in (traced_on, *others)]
        for x, (x_e, a_e) in zip((traced_on, *others), expected):
            got = script(x)
            torch.testing.assert_close(got[0], x_e, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got[1], a_e, rtol=1e-5, atol=1e-6)
    onnx_outputs = _onnx_run(module, traced_on, *others, dynamic={"x": {0: "proposals"}})
    for (x_e, a_e), (got_x, got_a) in zip(expected, onnx_outputs):
        np.testing.assert_allclose(got_x, x_e.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got_a, a_e.numpy(), rtol=1e-4, atol=1e-6)
