"""The DARTS architect: the alpha half of the bi-level search (paper supp. eq. 3-4).

Weights are trained on one half of the training split by the search trainer's SGD; the architecture
parameters (alphas) are trained on the other half by the Adam optimizer owned here. The two optimizers
never share a parameter list, so a checkpoint can hold both states and a search resumes exactly.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, NamedTuple, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fsd_d2.errors import ConfigError

LossFn = Callable[[nn.Module, Any], Tensor | dict[str, Tensor]]  # a loss, or a dict of losses to sum


class GradientPass(NamedTuple):
    """One forward-backward pass: the loss terms and the raw gradient of their sum (None: a parameter the loss
    does not reach)."""
    losses: dict[str, Tensor]
    grads: list[Tensor | None]


class Architect:
    """Owns the alpha optimizer and the (optionally unrolled) architecture step.

    ``order=1`` uses dL_val(w, a)/da. ``order=2`` is DARTS' unrolled gradient: one virtual SGD step
    w' = w - eta * (momentum * buf + dL_train/dw + wd * w), with momentum and weight decay read from the
    weight optimizer's param groups and state as quark0/darts does (no buffer yet: momentum 0; no
    optimizer: a plain gradient step), then
    dL_val(w', a)/da - eta * H v, where H v = d2 L_train(w, a)/da dw . dL_val(w')/dw' by central finite
    differences at w +- eps * v, eps = fd_epsilon / ||v||. The weights are copied back from a saved
    copy afterwards (bitwise equal; re-subtracting would drift in float).

    Detectors are stochastic (RPN/ROI sampling): the finite difference is only meaningful if L_train at
    w, w+ and w- sees the same sampling, so the torch (and current CUDA device) RNG state is saved before
    the unrolled loss and restored before each HVP evaluation; it ends where the validation draw left it.
    Forwards run in the model's current mode (train mode for a detector, which needs its losses), so
    BatchNorm running statistics see these evaluations as in DARTS. A DDP-wrapped model may be passed:
    the gradients here come from ``autograd.grad``, which the DDP reducer never sees, so the alpha
    gradient is averaged over processes here instead.

    ``arch_penalty()``, if given, is a term of the alpha objective that depends on the alphas only (the
    latency-aware search's weight x E_alpha[latency]): it has no weight dependence to unroll, so its exact
    gradient is added to the (averaged) hypergradient, outside the finite-difference Hessian-vector product.

    With ``keep_train_pass``, a second-order step keeps its first pass, L_train and dL_train/dw at the step's
    starting point, as ``train_pass``: a trainer may take its weight step from it instead of a fresh
    forward-backward pass (at the alphas before this step's update, where DARTS' weight step sees them after it).
    Without, that gradient is freed when the step ends.

    ``autocast()`` (mixed precision, e.g. bfloat16 autocast on CUDA) wraps the loss evaluations but the two
    finite-difference ones: their difference is eps = fd_epsilon / ||v|| small, below bfloat16's resolution,
    so they stay in float32.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, arch_params: list[nn.Parameter],
                 weight_params: list[nn.Parameter], lr: float, weight_decay: float, betas=(0.5, 0.999),
                 order: int = 2, fd_epsilon: float = 0.01, arch_penalty: Callable[[], Tensor] | None = None,
                 autocast: Callable[[], ContextManager] = contextlib.nullcontext, keep_train_pass: bool = False):
        if order not in (1, 2):
            raise ConfigError(f"Architect: order must be 1 (first-order DARTS) or 2 (unrolled), got {order}; "
                              "set search.order accordingly")
        arch_params, weight_params = list(arch_params), list(weight_params)
        if not arch_params:
            raise ValueError("Architect: arch_params is empty; pass the model's alpha parameters")
        shared = {id(p) for p in arch_params} & {id(p) for p in weight_params}
        if shared:
            raise ValueError(f"Architect: {len(shared)} parameter(s) are both in arch_params and weight_params; "
                             "alphas must stay out of the weight optimizer's parameter list")
        for kind, params in (("arch_params", arch_params), ("weight_params", weight_params)):
            if any(not p.requires_grad for p in params):
                raise ValueError(f"Architect: {kind} contains parameters with requires_grad=False; "
                                 "pass only the parameters that are being optimized")
        self.model, self.loss_fn = model, loss_fn
        self.arch_params, self.weight_params = arch_params, weight_params
        self.order, self.fd_epsilon, self.arch_penalty = order, fd_epsilon, arch_penalty
        self.autocast, self.keep_train_pass = autocast, keep_train_pass
        self.train_pass: GradientPass | None = None
        self.optimizer = torch.optim.Adam(arch_params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)

    def step(self, train_batch, val_batch, *, eta: float,
             weight_optimizer: torch.optim.Optimizer | None) -> dict[str, float]:
        """One Adam step on the alphas; weights and the weight optimizer are left as they were."""
        grads, loss_val, penalty = self._arch_gradient(train_batch, val_batch, eta, weight_optimizer)
        for a, g in zip(self.arch_params, grads):
            a.grad = g
        self.optimizer.step()
        stats = {"loss_val": loss_val, "alpha_grad_norm": _norm(grads)}
        return stats if penalty is None else {**stats, "arch_penalty": penalty}

    def arch_gradient(self, train_batch, val_batch, *, eta: float,
                      weight_optimizer: torch.optim.Optimizer | None) -> list[Tensor]:
        """The alpha gradient that ``step`` applies, one tensor per arch param."""
        return self._arch_gradient(train_batch, val_batch, eta, weight_optimizer)[0]

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def _arch_gradient(self, train_batch, val_batch, eta,
                       weight_optimizer) -> tuple[list[Tensor], float, float | None]:
        """The alpha gradient, L_val, and the penalty's value (None without one)."""
        if self.order == 1:
            loss_val, grads = self._grads(val_batch, self.arch_params)
        else:
            loss_val, grads = self._unrolled_gradient(train_batch, val_batch, eta, weight_optimizer)
        grads = average_over_processes(grads)
        if self.arch_penalty is None:
            return grads, loss_val, None
        penalty = self.arch_penalty()
        extra = torch.autograd.grad(penalty, self.arch_params, allow_unused=True)
        return [g if e is None else g + e.detach() for g, e in zip(grads, extra)], loss_val, penalty.item()

    def _unrolled_gradient(self, train_batch, val_batch, eta, weight_optimizer) -> tuple[float, list[Tensor]]:
        w0 = [p.detach().clone() for p in self.weight_params]
        rng_train = _get_rng()
        train_pass = self._pass(train_batch, self.weight_params)
        if self.keep_train_pass:
            self.train_pass = train_pass
        dw = _zeros_for_unused(self.weight_params, train_pass.grads)
        try:
            _assign(self.weight_params, w0, _sgd_direction(self.weight_params, w0, dw, weight_optimizer), -eta)
            loss_val, g = self._grads(val_batch, self.arch_params + self.weight_params)
            rng_after = _get_rng()
            g_alpha, v = g[:len(self.arch_params)], g[len(self.arch_params):]
            v_norm = _norm(v)
            if v_norm == 0.0:  # L_val does not depend on the weights: no implicit term
                return loss_val, g_alpha
            eps = self.fd_epsilon / v_norm
            hvp_terms = []
            for sign in (1.0, -1.0):
                _assign(self.weight_params, w0, v, sign * eps)
                _set_rng(rng_train)
                hvp_terms.append(self._grads(train_batch, self.arch_params, mixed=False)[1])
            _set_rng(rng_after)
        finally:
            _assign(self.weight_params, w0)
        return loss_val, [ga - eta * (gp - gm) / (2 * eps) for ga, gp, gm in zip(g_alpha, *hvp_terms)]

    def _grads(self, batch, params: Sequence[Tensor], mixed: bool = True) -> tuple[float, list[Tensor]]:
        """Loss on ``batch`` (under ``autocast`` if ``mixed``) and its gradient w.r.t. ``params``; unused params
        get zeros."""
        losses, grads = self._pass(batch, params, mixed)
        return sum(losses.values()).item(), _zeros_for_unused(params, grads)

    def _pass(self, batch, params: Sequence[Tensor], mixed: bool = True) -> GradientPass:
        """The loss terms on ``batch`` and the raw gradient of their sum w.r.t. ``params``."""
        with self.autocast() if mixed else contextlib.nullcontext():
            losses = self.loss_fn(self.model, batch)
        losses = losses if isinstance(losses, dict) else {"loss": losses}
        grads = torch.autograd.grad(sum(losses.values()), params, allow_unused=True)
        return GradientPass({k: v.detach() for k, v in losses.items()},
                            [None if g is None else g.detach() for g in grads])


def average_over_processes(tensors: list[Tensor]) -> list[Tensor]:
    """The mean of each tensor over the processes of a launch (one all-reduce); the tensors themselves in one.

    Gradients from ``autograd.grad`` bypass the DDP reducer, so whoever applies them averages them here."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    return [f.view_as(t) for f, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def _zeros_for_unused(params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> list[Tensor]:
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _sgd_direction(params, w0, dw, optimizer) -> list[Tensor]:
    """momentum * buf + dw + wd * w per parameter, with its own param group's hyper-parameters."""
    if optimizer is None:
        return dw
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    out = []
    for i, (p, w, d) in enumerate(zip(params, w0, dw)):
        if id(p) not in groups:
            raise ValueError(f"Architect: weight_params[{i}] (shape {tuple(p.shape)}) is not in the weight "
                             "optimizer; pass the same parameter list to both")
        group = groups[id(p)]
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        step = d + group.get("weight_decay", 0.0) * w
        if buf is not None and group.get("momentum", 0.0):
            step = step + group["momentum"] * buf
        out.append(step)
    return out


@torch.no_grad()
def _assign(params: Sequence[Tensor], values: Sequence[Tensor], direction: Sequence[Tensor] = (),
            alpha: float = 0.0) -> None:
    """params = values (+ alpha * direction), in place: no full-size temporary copy of the weights."""
    for p, value in zip(params, values):
        p.copy_(value)
    for p, d in zip(params, direction):
        p.add_(d, alpha=alpha)


def _norm(tensors: Sequence[Tensor]) -> float:
    return torch.stack([t.detach().double().norm() for t in tensors]).norm().item() if tensors else 0.0


def _get_rng():
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)
