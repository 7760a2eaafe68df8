"""Stages in several processes through Detectron2's launch (gloo on CPU): rank 0 writes the run directory."""
import json

import pytest
import torch

from fsd_d2.engine.runner import run_stage

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def test_search_runs_in_two_processes_with_one_set_of_alphas(compose_cfg, tmp_path):
    results = run_stage(compose_cfg("search_bone", "search.order=1", "solver.epochs=4", "num_gpus=2"))
    assert results == json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "genotype_bone.yaml").read_text().startswith("# FSD-D2 genotype")
    assert (tmp_path / "log.txt").exists() and (tmp_path / "log.txt.rank1").exists()
    alphas = torch.load(tmp_path / "model_final.pth", map_location="cpu")["model"]["backbone.bottom_up.arch.logits.reduce"]
    assert alphas.abs().max() > 1e-2  # the architect moved them, with the gradient averaged over both ranks


def test_training_runs_in_two_cpu_processes(compose_cfg, tmp_path):
    """Why FSDTrainer builds itself instead of calling DefaultTrainer.__init__: Detectron2's create_ddp_model gives
    DDP the local rank as device_ids, which DDP refuses for a CPU model; data_parallel gives it none."""
    results = run_stage(compose_cfg("train", "num_gpus=2"))
    assert results == json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "log.txt").exists() and (tmp_path / "log.txt.rank1").exists()
    final = torch.load(tmp_path / "model_final.pth", map_location="cpu")
    iterations = [json.loads(line)["iteration"] for line in (tmp_path / "metrics.json").read_text().splitlines()
                  if "total_loss" in line]
    assert iterations and final["iteration"] == max(iterations)


def test_eval_in_two_processes_gives_the_single_process_numbers(compose_cfg, tmp_path):
    run_stage(compose_cfg("train", output_dir=tmp_path / "train"))
    given = [f"checkpoint={tmp_path / 'train' / 'model_final.pth'}", "dataset.test=[deeplesion_train]",  # 5 images
             "model.score_thresh_test=0.0"]  # an untrained model: keep its low scores
    one = run_stage(compose_cfg("eval", *given, output_dir=tmp_path / "one"))
    two = run_stage(compose_cfg("eval", *given, "num_gpus=2", output_dir=tmp_path / "two"))
    # The test split is sharded over the ranks and gathered for the metrics: the same images, detections, numbers.
    saved = [json.loads((tmp_path / run / "eval" / "metrics_deeplesion_train.json").read_text()) for run in ("one", "two")]
    assert saved[0]["num_images"] == saved[1]["num_images"] > 1
    assert saved[0]["num_detections"] == saved[1]["num_detections"] > 0
    assert two["deeplesion_train"]["bbox"] == pytest.approx(one["deeplesion_train"]["bbox"])
