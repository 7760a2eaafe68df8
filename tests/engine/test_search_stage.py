"""Bi-level search stages at smoke-test size: artifacts, exact resume, first-order and partial channels."""
import shutil

import pytest
import torch

from fsd_d2.nas.genotype import load_genotype
from fsd_d2.engine.runner import run_stage


def _state(path):
    return torch.load(path, map_location="cpu")


@pytest.mark.parametrize("mode", [["solver.order=1"], ["model.partial_channels=2"]])
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
