"""The architect's gradients against exact autograd on a tiny mixed-op net in float64."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fsd_d2.nas.architect import Architect

ETA = 0.05


class TinyMixed(nn.Module):
    """Two candidate ops mixed by softmax(alpha); ``noise`` adds torch.rand noise like detector sampling."""

    def __init__(self, noise: bool = False):
        super().__init__()
        self.noise = noise
        self.stem = nn.Linear(4, 6)
        self.ops = nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, 6)])
        self.head = nn.Linear(6, 3)
        self.idle = nn.Linear(2, 2)  # a weight no loss touches: its gradient is None
        self.alpha = nn.Parameter(0.3 * torch.randn(2))
        self.alpha_idle = nn.Parameter(torch.zeros(3))  # an alpha no loss touches

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        mix = F.softmax(self.alpha, dim=0)
        h = mix[0] * torch.tanh(self.ops[0](h)) + mix[1] * torch.sigmoid(self.ops[1](h))
        if self.noise:
            h = h * (0.5 + torch.rand_like(h))
        return self.head(h)

    def arch(self):
        return [self.alpha, self.alpha_idle]

    def weights(self):
        return [p for n, p in self.named_parameters() if not n.startswith("alpha")]


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def make(noise=False, order=2, seed=0, device="cpu"):
    torch.manual_seed(seed)
    model = TinyMixed(noise).double().to(device)
    batches = [(torch.randn(8, 4, dtype=torch.float64, device=device), torch.randint(0, 3, (8,), device=device))
               for _ in range(3)]
    arch = Architect(model, loss_fn, arch_params=model.arch(), weight_params=model.weights(), lr=3e-3,
                     weight_decay=1e-3, order=order)
    return model, arch, batches


def sgd(model, momentum=0.0, warm_batch=None):
    """Plain SGD, or SGD with momentum and two weight-decay groups whose buffers are already filled.

    The decay is far above the paper's 3e-4 so that leaving it out of w' fails the 1e-3 tolerance.
    """
    if not momentum:
        return torch.optim.SGD(model.weights(), lr=ETA)
    decayed = [p for p in model.weights() if p.dim() > 1]
    rest = [p for p in model.weights() if p.dim() == 1]
    opt = torch.optim.SGD([{"params": decayed, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                          lr=ETA, momentum=momentum)
    loss_fn(model, warm_batch).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.alpha.grad = None
    return opt


def exact_unrolled_grad(model, train, val, opt):
    """d/da L_val(w'(a), a) with w'(a) = w - eta * (momentum * buf + dL_train/dw + wd * w), by double backward."""
    names = [n for n, p in model.named_parameters() if not n.startswith("alpha")]
    weights = model.weights()
    dw = torch.autograd.grad(loss_fn(model, train), weights, create_graph=True, allow_unused=True)
    groups = {id(p): g for g in opt.param_groups for p in g["params"]}
    unrolled = {}
    for n, w, d in zip(names, weights, dw):
        g = groups[id(w)]
        step = (torch.zeros_like(w) if d is None else d) + g["weight_decay"] * w
        buf = opt.state.get(w, {}).get("momentum_buffer")
        if buf is not None:
            step = step + g["momentum"] * buf
        unrolled[n] = w - ETA * step
    x, y = val
    loss = F.cross_entropy(functional_call(model, unrolled, (x,)), y)
    return [torch.zeros_like(a) if g is None else g
            for a, g in zip(model.arch(), torch.autograd.grad(loss, model.arch(), allow_unused=True))]


def assert_close_list(got, want, rtol):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=1e-10)


def test_first_order_is_validation_gradient():
    model, arch, (train, val, _) = make(order=1)
    got = arch.arch_gradient(train, val, eta=ETA, weight_optimizer=None)
    want = torch.autograd.grad(loss_fn(model, val), model.alpha)[0]
    torch.testing.assert_close(got[0], want, rtol=0, atol=0)
    assert torch.equal(got[1], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["plain-sgd", "momentum-wd"])
def test_second_order_matches_exact_unrolled_gradient(momentum):
    model, arch, (train, val, warm) = make()
    opt = sgd(model, momentum, warm)
    got = arch.arch_gradient(train, val, eta=ETA, weight_optimizer=opt)
    want = exact_unrolled_grad(model, train, val, opt)
    assert_close_list(got, want, rtol=1e-3)
    first = torch.autograd.grad(loss_fn(model, val), model.alpha)[0]
    assert not torch.allclose(got[0], first, rtol=1e-3)  # the implicit term is not negligible here


def test_mixed_precision_leaves_the_finite_difference_in_float32():
    model, arch, (train, val, warm) = make()
    mixed_calls = []

    def recording_loss(m, batch):
        mixed_calls.append(torch.is_autocast_cpu_enabled())
        return loss_fn(m, batch)

    arch.loss_fn = recording_loss
    arch.autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    opt = sgd(model, 0.9, warm)
    got = arch.arch_gradient(train, val, eta=ETA, weight_optimizer=opt)
    # w' step and L_val(w') under autocast; the two evaluations at w +- eps v in float32
    assert mixed_calls == [True, True, False, False]
    assert_close_list(got, exact_unrolled_grad(model, train, val, opt), rtol=0.05)  # bfloat16's 3 digits


@pytest.mark.parametrize("keep", [False, True])
def test_second_order_keeps_its_train_pass_only_when_asked(keep):
    model, _, (train, val, _) = make()
    arch = Architect(model, loss_fn, arch_params=model.arch(), weight_params=model.weights(), lr=3e-3,
                     weight_decay=1e-3, keep_train_pass=keep)
    want = torch.autograd.grad(loss_fn(model, train), model.weights(), allow_unused=True)  # at the step's start
    arch.step(train, val, eta=ETA, weight_optimizer=None)
    if not keep:
        assert arch.train_pass is None  # freed with the step, not held through the trainer's weight step
        return
    assert set(arch.train_pass.losses) == {"loss"}
    for got, expected in zip(arch.train_pass.grads, want):
        assert (got is None) == (expected is None)  # the idle weight keeps None: the weight step skips it
        if expected is not None:
            torch.testing.assert_close(got, expected)


def test_step_leaves_weights_and_weight_optimizer_alone():
    model, arch, (train, val, warm) = make()
    opt = sgd(model, 0.9, warm)
    for p in model.weights():
        p.grad = torch.full_like(p, 7.0)  # stale weight grads must survive
    weights = [p.detach().clone() for p in model.weights()]
    opt_state = copy.deepcopy(opt.state_dict())
    alpha0 = model.alpha.detach().clone()

    grads = arch.arch_gradient(train, val, eta=ETA, weight_optimizer=opt)
    assert all(torch.equal(p, w) for p, w in zip(model.weights(), weights))
    out = arch.step(train, val, eta=ETA, weight_optimizer=opt)

    assert all(torch.equal(p, w) for p, w in zip(model.weights(), weights))
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.weights())
    after = opt.state_dict()
    assert after["param_groups"] == opt_state["param_groups"]
    for k, s in opt_state["state"].items():
        assert torch.equal(after["state"][k]["momentum_buffer"], s["momentum_buffer"])
    assert torch.equal(model.alpha.grad, grads[0])
    reference = nn.Parameter(alpha0.clone())
    ref_opt = torch.optim.Adam([reference], lr=3e-3, betas=(0.5, 0.999), weight_decay=1e-3)
    reference.grad = grads[0]
    ref_opt.step()
    assert not torch.equal(model.alpha.detach(), alpha0)
    torch.testing.assert_close(model.alpha.detach(), reference.detach(), rtol=0, atol=0)
    assert set(out) == {"loss_val", "alpha_grad_norm"} and out["alpha_grad_norm"] > 0


def test_state_dict_round_trip_restores_adam():
    model, arch, (train, val, _) = make()
    for _ in range(2):
        arch.step(train, val, eta=ETA, weight_optimizer=None)
    saved = copy.deepcopy(arch.state_dict())
    alpha_saved = model.alpha.detach().clone()
    arch.step(train, val, eta=ETA, weight_optimizer=None)
    expected = model.alpha.detach().clone()

    fresh_model, fresh, _ = make(seed=1)
    with torch.no_grad():
        fresh_model.load_state_dict(model.state_dict())
        fresh_model.alpha.copy_(alpha_saved)
    fresh.load_state_dict(saved)
    assert fresh.state_dict()["state"][0]["step"] == 2
    fresh.step(train, val, eta=ETA, weight_optimizer=None)
    torch.testing.assert_close(fresh_model.alpha.detach(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_stochastic_model_sees_the_same_sampling_in_the_finite_difference(device):
    model, arch, (train, val, warm) = make(noise=True, device=device)
    opt = sgd(model, 0.9, warm)
    torch.manual_seed(123)
    got = arch.arch_gradient(train, val, eta=ETA, weight_optimizer=opt)
    after_got = torch.rand(4, device=device)
    torch.manual_seed(123)
    again = arch.arch_gradient(train, val, eta=ETA, weight_optimizer=opt)
    assert all(torch.equal(a, b) for a, b in zip(got, again))
    # The exact gradient draws train noise then val noise once; the FD terms must reuse the train draw.
    torch.manual_seed(123)
    want = exact_unrolled_grad(model, train, val, opt)
    after_exact = torch.rand(4, device=device)
    assert_close_list(got, want, rtol=1e-3)
    assert torch.equal(after_got, after_exact)  # the RNG ends where the validation draw left it


def test_rejects_alphas_in_the_weight_list():
    model = TinyMixed()
    with pytest.raises(ValueError, match="both in arch_params and weight_params"):
        Architect(model, loss_fn, arch_params=model.arch(), weight_params=list(model.parameters()), lr=1e-3,
                  weight_decay=0.0)
    with pytest.raises(ValueError, match="order"):
        Architect(model, loss_fn, arch_params=model.arch(), weight_params=model.weights(), lr=1e-3,
                  weight_decay=0.0, order=3)


def _ddp_worker(rank, store, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model, _, batches = make()
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        arch = Architect(ddp, loss_fn, arch_params=model.arch(), weight_params=model.weights(), lr=1e-3,
                         weight_decay=0.0)
        for _ in range(2):  # a second pass fails if the DDP reducer was left waiting for a backward
            grads = arch.arch_gradient(batches[rank], batches[2], eta=ETA, weight_optimizer=None)
        loss_fn(ddp, batches[rank]).backward()  # the ordinary weight step still syncs afterwards
        torch.save(grads, f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_alpha_gradient_is_averaged_over_ddp_processes(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    local = []
    for rank in range(2):
        _, arch, batches = make()
        local.append(arch.arch_gradient(batches[rank], batches[2], eta=ETA, weight_optimizer=None))
    torch.multiprocessing.spawn(_ddp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    want = [(a + b) / 2 for a, b in zip(*local)]
    for rank in range(2):
        assert_close_list(torch.load(tmp_path / f"rank{rank}.pt"), want, rtol=1e-12)
    assert not torch.allclose(local[0][0], local[1][0])  # the ranks did disagree before averaging
