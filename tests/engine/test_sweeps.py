"""Sweeps at cluster scale: parallel local jobs (submitit), Optuna on the returned objective, one summary per
sweep (failed jobs marked, exit 1), the SLURM rendezvous, and training in several CPU processes (gloo DDP)."""
import csv
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import wandb
import yaml
from detectron2.engine import launch
from detectron2.utils import comm
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fsd_d2.engine.cluster import slurm_rendezvous
from fsd_d2.engine.runner import run_stage
from fsd_d2.engine.sweep import SweepSummary
from fsd_d2.engine.sweep_job import objective_value
from fsd_d2.errors import ConfigError
from fsd_d2.modeling.architecture import unwrap

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
TINY = ["+stage=train", "+experiment=tiny"]


def _sweep(sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "fsd_d2.run", "--multirun", f"hydra.sweep.dir={sweep_dir}", *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def _log_span(job_dir: Path):
    """(first, last) timestamp of a job's log.txt, e.g. ('11/26 06:22:03', '11/26 06:22:22')."""
    lines = (job_dir / "log.txt").read_text().splitlines()
    return lines[0][1:15], lines[-1][1:15]


def test_local_launcher_runs_the_jobs_in_parallel_and_a_failed_job_is_marked(synthetic_root, tmp_path):
    sweep = tmp_path / "sweep"
    proc = _sweep(sweep, "hydra/launcher=local", *TINY, f"dataset.root={synthetic_root}",
                  "solver.lr_per_image=-1,0.005,0.01")
    assert proc.returncode == 1, proc.stderr[-3000:]  # the failed job's exit status, at the end
    assert "1 job(s) of the sweep" in proc.stderr and "0: overrides: +stage=train" in proc.stderr
    assert list((sweep / ".submitit").glob("*/*_log.out")), "the jobs did not go through submitit"
    (start1, end1), (start2, end2) = _log_span(sweep / "1"), _log_span(sweep / "2")
    assert start1 <= end2 and start2 <= end1, "the two jobs ran one after the other"
    # One table: a row per job, the swept key, the metrics, the failure with its error.
    summary = (sweep / "sweep_summary.md").read_text()
    assert "| job | solver.lr_per_image | AP | AP_iobb | recall | sens@0.5 |" in summary
    assert "| 0 | -1 | - |" in summary and "ConfigError: solver.lr_per_image=-1.0: must be > 0 |" in summary
    rows = list(csv.DictReader(open(sweep / "sweep_summary.csv")))
    assert [r["solver.lr_per_image"] for r in rows] == ["-1", "0.005", "0.01"]
    for row, job in zip(rows[1:], ("1", "2")):
        bbox = json.loads((sweep / job / "results.json").read_text())["deeplesion_test"]["bbox"]
        assert float(row["sens@4"]) == bbox["sens@4"] and float(row["params_total"]) == bbox["params_total"]
        assert row["error"] == ""
    assert rows[0]["AP"] == "" and rows[0]["error"].startswith("ConfigError")
    assert (sweep / "sweep_solver.lr_per_image.png").stat().st_size > 0


def test_a_rerun_sweep_summarises_the_jobs_as_they_last_ran(synthetic_root, tmp_path):
    sweep = tmp_path / "sweep"
    first = _sweep(sweep, *TINY, f"dataset.root={synthetic_root}", "solver.lr_per_image=-1,0.005")
    assert first.returncode == 1 and (sweep / "0" / "error.txt").exists()
    # Job 0 now runs and succeeds; job 1 is refused (its directory holds a finished run) and must not be shown
    # with the earlier run's metrics under the new overrides.
    again = _sweep(sweep, *TINY, f"dataset.root={synthetic_root}", "solver.lr_per_image=0.005,0.01")
    assert again.returncode == 1, again.stderr[-3000:]
    assert not (sweep / "0" / "error.txt").exists() and (sweep / "0" / "results.json").exists()
    rows = {r["job"]: r for r in csv.DictReader(open(sweep / "sweep_summary.csv"))}
    assert rows["0"]["error"] == "" and rows["0"]["sens@4"] != ""
    assert rows["1"]["error"].startswith("ConfigError:") and "already holds a run" in rows["1"]["error"]
    assert rows["1"]["sens@4"] == "" and "best: job 0" in (sweep / "sweep_summary.md").read_text()


def test_a_bug_is_recorded_as_its_exception_and_message_then_the_traceback(tmp_path):
    from hydra.core.hydra_config import HydraConfig

    from fsd_d2.engine.sweep import read_jobs
    from fsd_d2.engine.sweep_job import record_failed_job
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        job = compose("config", overrides=["+stage=train", "hydra.job.num=0"], return_hydra_config=True)
    (tmp_path / "0" / ".hydra").mkdir(parents=True)
    (tmp_path / "0" / ".hydra" / "overrides.yaml").write_text("- +stage=train\n")
    HydraConfig.instance().set_config(job)
    try:
        {}["anchor_sizes"]
    except KeyError as e:
        record_failed_job(str(tmp_path / "0"), e)
    finally:
        HydraConfig.instance().cfg = None
    assert read_jobs(tmp_path)[0].error == "KeyError: 'anchor_sizes'"
    assert "Traceback (most recent call last):" in (tmp_path / "0" / "error.txt").read_text()


def test_optuna_tunes_anchors_and_learning_rate_on_the_returned_objective(synthetic_root, tmp_path):
    sweep = tmp_path / "optuna"
    proc = _sweep(sweep, "+stage=train", "+experiment=[tiny,tune_anchors]", f"dataset.root={synthetic_root}",
                  "hydra.sweeper.n_trials=2", "objective.metric=AP", "model.score_thresh_test=0.0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    values = {}
    for job in ("0", "1"):
        given = yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text())
        overrides = dict(o.split("=", 1) for o in given)
        assert overrides["model.anchor_scales"] in ("[2,3,4,6,12]", "[2,4,8,16,32]", "[1,2,3,4,6]")
        assert 0.001 <= float(overrides["solver.lr_per_image"]) <= 0.02
        values[job] = json.loads((sweep / job / "results.json").read_text())["deeplesion_test"]["bbox"]["AP"]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(values.values())  # each job returned its AP to the study
    assert set(best["best_params"]) == {"model.anchor_scales", "solver.lr_per_image"}
    assert "maximize `AP`" in (sweep / "sweep_summary.md").read_text()


def test_an_optuna_study_whose_every_trial_fails_is_still_summarised(synthetic_root, tmp_path):
    """Optuna raises when no trial completed, and Hydra then skips the end-of-sweep callback: the summary is
    written as the process exits, the failed trials marked with their errors, and the status is 1."""
    sweep = tmp_path / "optuna_failing"
    proc = _sweep(sweep, *TINY, f"dataset.root={synthetic_root}", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2",
                  "solver.lr_per_image=interval(-2,-1)")
    assert proc.returncode == 1
    assert "No trials are completed yet" in proc.stderr and "its summary describes the jobs that ran" in proc.stderr
    summary = (sweep / "sweep_summary.md").read_text()
    assert "2 job(s), 2 failed" in summary and summary.count(": must be > 0 |") == 2


def _job(sweep: Path, num: int, overrides, metrics=None, error=None, config=None) -> None:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    if metrics is not None:
        (job / "results.json").write_text(json.dumps({"deeplesion_test": {"bbox": metrics}}))
    if error is not None:
        (job / "error.txt").write_text(f"overrides: {' '.join(overrides)}\n{error}\n")
    if config is not None:
        (job / "config.yaml").write_text(yaml.safe_dump(config))


def _metrics(ap: float, **extra) -> dict:
    return {"AP": ap, "AP_iobb": ap + 1, "recall": 50.0, **{f"sens@{p:g}": ap / 2 for p in (0.5, 1, 2, 4, 8, 16)},
            "params_total": 4.38, **extra}


def _sweep_config(sweep: Path, **logger):
    return OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}, "stage": {"name": "train"},
                             "objective": {"metric": "sens@4", "split": None, "direction": "maximize"},
                             "logger": {"enabled": False, "project": "fsd-d2", "entity": "", "mode": "offline",
                                        "group": "", "tags": [], **logger}})


def test_summary_table_plots_and_wandb_run_then_exit_1(tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweep"
    common = ["+stage=train", "+experiment=tiny"]
    _job(sweep, 0, [*common, "model.anchor_scales=[2,3,4]", "solver.lr_per_image=0.001"], _metrics(10.0))
    _job(sweep, 1, [*common, "model.anchor_scales=[2,3,4]", "solver.lr_per_image=0.01"], _metrics(30.0))
    _job(sweep, 2, [*common, "model.anchor_scales=[4,8,16]", "solver.lr_per_image=0.1"],
         error="DivergenceError: training diverged at iteration 3: loss is nan | inf")
    _job(sweep, 10, [*common, "model.anchor_scales=[4,8,16]", "solver.lr_per_image=0.005"], _metrics(20.0))
    logged = []
    fake_run = SimpleNamespace(id="fake", dir=str(sweep), log=logged.append, finish=lambda: None)
    monkeypatch.setattr(wandb, "init", lambda **kw: logged.append(kw) or fake_run)
    with pytest.raises(SystemExit) as exit_:
        SweepSummary().on_multirun_end(_sweep_config(sweep, enabled=True))
    assert exit_.value.code == 1
    assert "1 job(s) of the sweep" in capsys.readouterr().err
    text = (sweep / "sweep_summary.md").read_text()
    assert "| job | model.anchor_scales | solver.lr_per_image | AP | AP_iobb | recall | sens@0.5 |" in text
    assert "| 1 | [2,3,4] | 0.01 | 30.00 | 31.00 | 50.00 | 15.00 |" in text
    assert "| 2 | [4,8,16] | 0.1 | - |" in text and "loss is nan \\| inf |" in text  # escaped for Markdown
    assert text.index("| 2 |") < text.index("| 10 |")  # job order, not text order
    assert "4 job(s), 1 failed" in text and "best: job 1 (sens@4 = 15.00" in text
    rows = list(csv.DictReader(open(sweep / "sweep_summary.csv")))
    assert [r["job"] for r in rows] == ["0", "1", "2", "10"] and rows[0]["params_total"] == "4.38"
    for key in ("model.anchor_scales", "solver.lr_per_image"):
        assert (sweep / f"sweep_{key}.png").stat().st_size > 0
    init, data = logged
    assert init["job_type"] == "sweep" and init["group"] == "train-sweep" and init["mode"] == "offline"
    assert isinstance(data["sweep/summary"], wandb.Table) and len(data["sweep/summary"].data) == 4
    assert isinstance(data["sweep_summary/solver.lr_per_image"], wandb.Image)


def test_table3_is_a_view_of_the_sweep_summary(tmp_path):
    sweep = tmp_path / "sweep"
    types = ["BN", "AB", "ME", "LV", "LU", "KD", "ST", "PV"]
    per_type = {f"{kind}{s}-{t}": 1.0 for kind in ("AP", "sens@4") for s in ("", "_iobb") for t in types}
    per_type = {k.replace("sens@4_iobb", "sens_iobb@4"): v for k, v in per_type.items()}
    for i, (model, graph) in enumerate([("fpn_r50", False), ("fsd", True)]):
        _job(sweep, i, ["+stage=finetune_graph", f"model={model}", f"model.graph_enabled={graph}"],
             _metrics(10.0 * (i + 1), recall_iobb=60.0, **per_type),
             config={"model": {"name": model, "graph_enabled": graph}})
    SweepSummary(tables=["fsd_d2.engine.tables.multitype_tables"]).on_multirun_end(_sweep_config(sweep))
    table3 = (sweep / "table3.md").read_text()
    assert "| FPN w/o Graph | IoU | 1.00 |" in table3 and "| FSD w/ Graph | IoBB |" in table3
    assert "| BN | AB | ME | LV | LU | KD | ST | PV | mAP |" in table3 and "| 20.00 |" in table3
    assert "Recall" in (sweep / "table4.md").read_text()
    assert "| model | model.graph_enabled |" in (sweep / "sweep_summary.md").read_text()


def test_objective_is_a_metric_of_the_first_or_named_test_split():
    results = {"split_a": {"bbox": {"AP": 1.0, "sens@4": 40.0}}, "split_b": {"bbox": {"AP": 2.0, "sens@4": 60.0}}}
    assert objective_value(results, "sens@4") == 40.0
    assert objective_value(results, "AP", "split_b") == 2.0
    assert objective_value({"stages": {}, "results": {"train_fsd": results, "eval": {}}}, "AP") == 1.0  # pipeline
    assert objective_value({"genotype": "genotype_bone.yaml", "iterations": 4}, "AP") is None  # a search
    with pytest.raises(ConfigError, match=r"objective.metric=mAP is not a metric of split_a; its metrics: \['AP'"):
        objective_value(results, "mAP")
    with pytest.raises(ConfigError, match="objective.split=split_c was not evaluated"):
        objective_value(results, "AP", "split_c")


SLURM_NODE_1_OF_2 = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2",
                     "SLURM_NTASKS": "2", "SLURM_NODEID": "1", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
                     "SLURM_JOB_NODELIST": "gpu-[07-08]"}


def test_slurm_rendezvous_comes_from_the_allocation(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert slurm_rendezvous(2) is None  # not a SLURM job: the config's values stand
    for key, value in SLURM_NODE_1_OF_2.items():
        monkeypatch.setenv(key, value)
    assert slurm_rendezvous(2) == {"machine_rank": 1, "dist_url": "tcp://gpu-07:24242"}
    assert slurm_rendezvous(2, "tcp://10.0.0.1:1234")["dist_url"] == "tcp://10.0.0.1:1234"
    with pytest.raises(ConfigError, match="num_machines=1 but the SLURM job has 2 node"):
        slurm_rendezvous(1)
    one_node = {"SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS": "1", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "cpu-3"}
    with monkeypatch.context() as m:
        for key, value in one_node.items():
            m.setenv(key, value)
        assert slurm_rendezvous(1) == {"machine_rank": 0, "dist_url": "tcp://cpu-3:24242"}  # as on many nodes
    monkeypatch.setenv("SLURM_NTASKS", "16")
    with pytest.raises(ConfigError, match="one task per node"):
        slurm_rendezvous(2)


def _with_hydra_config(*overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose("config", overrides=["+stage=train", *overrides], return_hydra_config=True)


def test_launchers_and_sweeper_follow_the_run_config():
    cfg = _with_hydra_config("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "device=cuda", "num_gpus=8",
                             "num_machines=2")
    slurm = cfg.hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.partition == "gpu"
    assert (slurm.gpus_per_node, slurm.nodes, slurm.tasks_per_node, slurm.cpus_per_task, slurm.mem_gb) == \
        (8, 2, 1, 10, 64)
    # A CPU run asks for no GPUs (a cluster without them refuses the request), a core and 4 GB per process.
    for num_gpus, cpus, mem_gb in ((0, 1, 4), (1, 1, 4), (2, 2, 8)):
        slurm = _with_hydra_config("hydra/launcher=slurm", f"num_gpus={num_gpus}").hydra.launcher
        assert (slurm.gpus_per_node, slurm.cpus_per_task, slurm.mem_gb) == (None, cpus, mem_gb)
    cfg = _with_hydra_config("hydra/launcher=local", "num_gpus=2")
    assert cfg.hydra.launcher._target_.endswith("LocalLauncher") and cfg.hydra.launcher.gpus_per_node == 2
    cfg = _with_hydra_config("+experiment=tune_anchors", "objective.direction=minimize")
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.direction == "minimize"
    assert cfg.hydra.callbacks.sweep_summary._target_ == "fsd_d2.engine.sweep.SweepSummary"


# Every anchor and proposal is used (random subsampling would differ between one process's RNG and two) and
# every image has the same number of proposals, so DDP's mean of per-process losses is the one-process mean.
SAME_LOSS = ["+d2.MODEL.RPN.BATCH_SIZE_PER_IMAGE=100000", "+d2.MODEL.RPN.POST_NMS_TOPK_TRAIN=8",
             "+d2.MODEL.ROI_HEADS.PROPOSAL_APPEND_GT=false", "+d2.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE=100000"]


def _train_and_save_rank_weights(hcfg) -> None:
    """A process of a 2-process launch (as the runner starts them): the train stage, and each rank's trained
    weights saved before the final evaluation."""
    from fsd_d2.engine import train

    evaluate = train.evaluate

    def save_then_evaluate(cfg, model, trainer_cls):
        torch.save(unwrap(model).state_dict(), Path(cfg.OUTPUT_DIR) / f"weights_rank{comm.get_rank()}.pth")
        return evaluate(cfg, model, trainer_cls)

    train.evaluate = save_then_evaluate
    run_stage(hcfg)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_training_in_two_cpu_processes_matches_one_process(compose_cfg, tmp_path):
    run_stage(compose_cfg("train", *SAME_LOSS, output_dir=tmp_path / "one"))
    two = compose_cfg("train", *SAME_LOSS, "num_gpus=2", output_dir=tmp_path / "two")
    launch(_train_and_save_rank_weights, 2, dist_url="auto",
           args=(OmegaConf.create(OmegaConf.to_container(two, resolve=True)),))
    rank0, rank1 = (torch.load(tmp_path / "two" / f"weights_rank{r}.pth") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "the ranks' weights drifted apart"
    one = torch.load(tmp_path / "one" / "model_final.pth")["model"]
    moved = max((one[k] - rank0[k]).abs().max().item() for k in rank0 if rank0[k].is_floating_point())
    assert moved < 1e-3, f"two processes trained other weights than one (max difference {moved})"
    # The logged loss is the ranks' mean (gathered by Detectron2): the same as one process on the whole batch.
    losses = [json.loads((tmp_path / run / "metrics.json").read_text().splitlines()[-1])["total_loss"]
              for run in ("one", "two")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
    assert (tmp_path / "two" / "log.txt.rank1").exists()
