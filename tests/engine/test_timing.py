"""The op-latency table prices what a deployed detector runs: each op and cell with its BatchNorms folded into
the convolutions and, on a CPU, channels-last, as ``deploy_`` leaves them in ``+stage=eval``."""
import torch
from torch import nn

from fsd_d2.engine import timing
from fsd_d2.modeling.deploy import deploy_cell_
from fsd_d2.nas.latency import CellPosition
from fsd_d2.nas.cells import DerivedCell
from fsd_d2.nas.ops import ReLUConvBN, load_pool


def _bn_after_conv(module: nn.Module) -> bool:
    return any(isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d)
               for seq in module.modules() if isinstance(seq, nn.Sequential) for a, b in zip(seq, list(seq)[1:]))


def test_deploy_cell_folds_the_bn_and_keeps_the_output():
    torch.manual_seed(0)
    op = ReLUConvBN(8, 8, 3, 1, 1, affine=True)
    op.train()(torch.randn(4, 8, 6, 6))  # running statistics that are not the identity
    x = torch.randn(2, 8, 6, 6)
    expected = op.eval()(x)
    deployed = deploy_cell_(op)
    assert not _bn_after_conv(deployed) and deployed[1].bias is not None  # the BN now lives in the conv's bias
    assert deployed[1].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(deployed(x.contiguous(memory_format=torch.channels_last)), expected,
                               rtol=1e-4, atol=1e-5)


def test_profile_ops_times_every_op_and_cell_in_the_deployed_form(monkeypatch):
    timed = []

    def recording(module):
        module = deploy_cell_(module)
        timed.append(module)
        return module

    monkeypatch.setattr(timing, "deploy_cell_", recording)
    pool = load_pool("bone8")
    position = CellPosition("x.reduce", "reduce", True, False, 4, ((1, 8, 8, 8), (1, 8, 8, 8)))
    timing.profile_ops("bone", "bone8", pool, 2, [position], warmup=0, repeats=1)
    # every op but none at the input edges' stride 2 and the node edges' stride 1, and the cell for its overhead
    assert len(timed) == 2 * (len(pool) - 1) + 1
    assert sum(isinstance(m, DerivedCell) for m in timed) == 1
    assert not any(_bn_after_conv(m) for m in timed)
