"""Bi-level search stages at smoke-test size: artifacts, exact resume, first order, partial channels, and the
second-order step whose weight step reuses the unrolled step's gradient."""
import itertools
import json
import shutil

import pytest
import torch
from detectron2.modeling import build_model

from fsd_d2.config import build_cfg
from fsd_d2.engine.runner import run_stage
from fsd_d2.engine.search import SearchTrainer
from fsd_d2.nas.genotype import load_genotype


def _state(path):
    return torch.load(path, map_location="cpu")


@pytest.mark.parametrize("mode", [["search.order=1"], ["model.partial_channels=2"]])
def test_search_bone_writes_genotype_plots_and_moves_alphas(compose_cfg, tmp_path, mode):
    results = run_stage(compose_cfg("search_bone", "solver.epochs=2", *mode))
    genotype = load_genotype(results["genotype"], num_nodes=4, cell_types=["reduce"])
    assert genotype.pool == "bone8"
    assert (tmp_path / "alphas_epoch002.png").stat().st_size > 0
    assert (tmp_path / "cell_bone_reduce.png").stat().st_size > 0
    ckpt = _state(tmp_path / "model_final.pth")
    alphas = ckpt["model"]["backbone.bottom_up.arch.logits.reduce"]
    assert alphas.shape == (14, 8)
    assert alphas.abs().max() > 1e-2  # initialised at 1e-3 scale: the architect moved them
    assert {"optimizer", "scheduler", "architect", "rng", "iteration"} <= set(ckpt["trainer"])


def test_killed_search_resumes_to_the_uninterrupted_result(compose_cfg, tmp_path):
    overrides = ("solver.epochs=3", "solver.keep_checkpoints=3")  # keep the first epoch's checkpoint
    run_stage(compose_cfg("search_bone", *overrides, output_dir=tmp_path / "full"))
    run_stage(compose_cfg("search_bone", *overrides, output_dir=tmp_path / "killed"))
    killed = tmp_path / "killed"
    # Pretend the run died after its first checkpoint: drop everything written later.
    for later in sorted(killed.glob("model_*.pth"))[1:]:
        later.unlink()
    first = sorted(killed.glob("model_*.pth"))[0]
    (killed / "last_checkpoint").write_text(first.name)
    assert _state(first)["trainer"]["iteration"] == 0
    run_stage(compose_cfg("search_bone", *overrides, "resume=true", output_dir=killed))
    full, resumed = _state(tmp_path / "full" / "model_final.pth"), _state(killed / "model_final.pth")
    assert resumed["trainer"]["iteration"] == full["trainer"]["iteration"] == 2
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    shutil.rmtree(tmp_path / "full")


def test_search_refuses_an_optimizer_it_does_not_use(compose_cfg):
    from fsd_d2.errors import ConfigError

    with pytest.raises(ConfigError, match="solver.optimizer=adamw: a search trains its weights with SGD"):
        run_stage(compose_cfg("search_bone", "solver.optimizer=adamw"))


def _one_step_trainer(compose_cfg, *overrides):
    """A backbone-search trainer fed one fixed 64 px image with a lesion, and a count of the model's passes."""
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances

    from fsd_d2.config import build_cfg
    from fsd_d2.engine.search import SearchTrainer

    cfg = build_cfg(compose_cfg("search_bone", *overrides))
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    inst = Instances((64, 64), gt_boxes=Boxes(torch.tensor([[10.0, 12.0, 30.0, 28.0]])), gt_classes=torch.tensor([0]))
    batch = [{"image": torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8), "instances": inst}]
    trainer = SearchTrainer(cfg, model, batch, batch, "bone")
    trainer._w_iter = trainer._a_iter = itertools.repeat(batch)
    passes = []
    model.register_forward_hook(lambda *_: passes.append(1))
    return trainer, passes


@pytest.mark.parametrize("clip", [(), ("solver.clip_grad_norm=0.01",)])  # DARTS' 5 (conf/solver/search.yaml), tight
def test_reused_train_gradient_is_the_weight_step(compose_cfg, clip):
    from detectron2.utils.events import EventStorage

    trainer, passes = _one_step_trainer(compose_cfg, "search.reuse_train_gradient=true", *clip)
    assert trainer.cfg.SOLVER.CLIP_GRAD_NORM == (0.01 if clip else 5.0)
    w0 = [p.detach().clone() for p in trainer.weight_params]
    with EventStorage(0) as trainer.storage:
        trainer.run_step()
    assert len(passes) == 4  # unrolled step, validation, two finite differences: no fifth for the weight step
    grads = [torch.zeros_like(w) if g is None else g for w, g in zip(w0, trainer.architect.train_pass.grads)]
    clip = min(1.0, trainer.cfg.SOLVER.CLIP_GRAD_NORM / (torch.stack([g.norm() for g in grads]).norm() + 1e-6))
    group = trainer.optimizer.param_groups[0]
    lr, decay = group["initial_lr"], group["weight_decay"]  # the lr of step 0 (the scheduler has moved on)
    for p, w, g in zip(trainer.weight_params, w0, grads):  # the first SGD step: no momentum buffer yet
        torch.testing.assert_close(p.detach(), w - lr * (clip * g + decay * w), rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(p, w) for p, w in zip(trainer.weight_params, w0))


def test_first_order_alpha_gradient_is_the_validation_loss_gradient(compose_cfg):
    """The gradient the architect's Adam applies in a first-order step equals dL_val/dalpha computed by autograd
    on the detector's validation loss (same RNG, so the same RPN/ROI sampling), and Adam moves the alphas by it."""
    from detectron2.utils.events import EventStorage

    trainer, _ = _one_step_trainer(compose_cfg, "search.order=1")
    alphas = trainer.architect.arch_params
    a0 = [a.detach().clone() for a in alphas]
    batch = next(trainer._a_iter)
    rng = torch.get_rng_state()
    with EventStorage(0):
        reference = torch.autograd.grad(sum(trainer.model(batch).values()), alphas)
    assert all(r.abs().sum() > 0 for r in reference)
    torch.set_rng_state(rng)
    applied = []
    trainer.architect.optimizer.register_step_pre_hook(lambda *_: applied.append([a.grad.clone() for a in alphas]))
    with EventStorage(0) as trainer.storage:
        trainer.run_step()
    for got, want in zip(applied[0], reference):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-8)
    expected = [a.clone().requires_grad_() for a in a0]
    adam = torch.optim.Adam(expected, **{k: trainer.architect.optimizer.defaults[k]
                                         for k in ("lr", "betas", "eps", "weight_decay")})
    for e, g in zip(expected, reference):
        e.grad = g
    adam.step()
    for a, e in zip(alphas, expected):
        torch.testing.assert_close(a.detach(), e.detach())


def test_reusing_the_train_gradient_needs_second_order(compose_cfg):
    from fsd_d2.errors import ConfigError

    with pytest.raises(ConfigError, match="search.reuse_train_gradient=true needs search.order=2"):
        _one_step_trainer(compose_cfg, "search.reuse_train_gradient=true", "search.order=1")


def test_collapse_remedies_reach_the_search_and_its_record(compose_cfg, tmp_path):
    """P-DARTS' cap shapes the written genotype, beta-decay enters the alpha loss (logged as arch_penalty), and every
    epoch's skip and parameter-free counts are logged and in results.json; with both off there is no penalty."""
    capped = run_stage(compose_cfg("search_bone", "search.order=1", "solver.epochs=2", "search.max_skip_connections=0",
                                   "search.beta_decay_weight=1.0", output_dir=tmp_path / "capped"))
    genotype = load_genotype(capped["genotype"])
    assert all(op != "skip_connect" for node in genotype.cells["reduce"].edges for op, _ in node)
    counts = capped["op_counts"]
    assert counts["skip_connections"] == 0 and [h["epoch"] for h in counts["per_epoch"]] == [1, 2]
    assert all(h["edges"] == 8 for h in counts["per_epoch"])
    metrics = [json.loads(line) for line in (tmp_path / "capped" / "metrics.json").read_text().splitlines()]
    assert any("arch_penalty" in m for m in metrics) and any("search/skip_connections" in m for m in metrics)
    model = build_model(build_cfg(compose_cfg("search_bone", "search.order=1")))
    trainer = SearchTrainer(build_cfg(compose_cfg("search_bone", "search.order=1")), model, [{}] * 2, [{}] * 2,
                            "bone")
    assert trainer.architect.arch_penalty is None and trainer.max_skip is None  # the paper's plain DARTS


def test_an_architecture_rate_far_too_high_is_named(compose_cfg, tmp_path):
    """An arch lr of 1e8 saturates every edge within an epoch (ops of equal gradient signs tie at the top, whatever
    the thread count's rounding): the search says so, naming the key; the default rate does not."""
    for name, rate in [("high", ["search.arch_lr_per_image=1e8"]), ("default", [])]:
        run_stage(compose_cfg("search_bone", "search.order=1", "solver.epochs=1", *rate, output_dir=tmp_path / name))
    assert "search.arch_lr_per_image=1e+08 is likely far too high" in (tmp_path / "high" / "log.txt").read_text()
    assert "saturated" not in (tmp_path / "default" / "log.txt").read_text()
