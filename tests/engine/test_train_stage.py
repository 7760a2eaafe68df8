"""The train/eval stages end to end at smoke-test size: one run, resume, a multirun, bad checkpoints."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fsd_d2.engine.checkpoint import CheckpointError
from fsd_d2.engine.runner import run_stage


def _iterations(run_dir: Path):
    lines = (run_dir / "metrics.json").read_text().splitlines()
    return [json.loads(x)["iteration"] for x in lines if "total_loss" in x]


def test_train_writes_checkpoint_metrics_wandb_and_resumes(compose_cfg, tmp_path):
    results = run_stage(compose_cfg("train", "logger=wandb"))
    split = next(iter(results))
    assert {"AP", "AP_iobb", "sens@4", "params_total"} <= set(results[split]["bbox"])
    for name in ["model_final.pth", "last_checkpoint", "metrics.json", "config.yaml", "d2_config.yaml", "results.json"]:
        assert (tmp_path / name).exists(), name
    assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline W&B run written"
    first = _iterations(tmp_path)
    final_iter = torch.load(tmp_path / "model_final.pth", map_location="cpu")["iteration"]
    assert final_iter == max(first)

    # "Kill" after the first epoch: a longer schedule with resume=true continues from the last checkpoint.
    run_stage(compose_cfg("train", "solver.epochs=2", "resume=true"))
    resumed = _iterations(tmp_path)[len(first):]
    assert resumed and min(resumed) > final_iter
    assert torch.load(tmp_path / "model_final.pth", map_location="cpu")["iteration"] == 2 * (final_iter + 1) - 1


def test_eval_stage_checks_checkpoints(compose_cfg, tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt.pth could not be read"):
        run_stage(compose_cfg("eval", f"checkpoint={corrupt}", output_dir=tmp_path / "e1"))
    other = tmp_path / "other.pth"
    torch.save({"model": {"backbone.bottom_up.stem.conv1.weight": torch.zeros(1)}}, other)
    with pytest.raises(CheckpointError, match="does not match the model") as err:
        run_stage(compose_cfg("eval", f"checkpoint={other}", output_dir=tmp_path / "e2"))
    assert "shape differs (1): backbone.bottom_up.stem.conv1.weight" in str(err.value)
    with pytest.raises(ValueError, match="needs checkpoint="):
        run_stage(compose_cfg("eval", output_dir=tmp_path / "e3"))


def test_multirun_sweep_runs_each_job_in_its_own_directory(tmp_path, synthetic_root):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "fsd_d2.run", "--multirun", "+stage=train", "+experiment=tiny",
         "solver.lr_per_image=0.005,0.01", f"dataset.root={synthetic_root}", f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, lr in [("0", 0.005), ("1", 0.01)]:
        assert (sweep / job / "results.json").exists()
        d2 = (sweep / job / "d2_config.yaml").read_text()
        assert f"LR_PER_IMAGE: {lr}" in d2
