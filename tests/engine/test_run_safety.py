"""Nothing lost, nothing silently wrong: one process per run directory, no accidental overwrite, strict resume,
no non-finite checkpoint, sweeps that survive a bad job, disk hygiene, genotypes that say they are final."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fsd_d2.engine.checkpoint import AtomicCheckpointer
from fsd_d2.engine.rundir import LOCK_NAME, own_run_directory
from fsd_d2.engine.runner import run_stage
from fsd_d2.errors import CheckpointError, ConfigError, DataError, DivergenceError


def _checkpoints(run_dir: Path):
    return sorted(p.name for p in run_dir.glob("model_*.pth"))


def test_a_run_directory_belongs_to_one_process(compose_cfg, tmp_path):
    with own_run_directory(tmp_path, resume=False, overwrite=False, config={}):
        with pytest.raises(ConfigError, match=rf"run directory {tmp_path} is in use by .*\"pid\": {os.getpid()}"):
            run_stage(compose_cfg("train"))
    assert not (tmp_path / "results.json").exists()


def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from fsd_d2.engine.rundir import own_run_directory\n"
        f"with own_run_directory(Path({str(tmp_path)!r}), resume=False, overwrite=False, config={{}}):\n"
        "    print('locked', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(ConfigError, match="in use by"):
        with own_run_directory(tmp_path, resume=False, overwrite=False, config={}):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with own_run_directory(tmp_path, resume=False, overwrite=False, config={}):
        assert (tmp_path / LOCK_NAME).exists()


def test_a_finished_run_is_not_replaced_without_being_asked(compose_cfg, tmp_path):
    run_stage(compose_cfg("train"))
    first = (tmp_path / "metrics.json").read_text()
    with pytest.raises(ConfigError, match=r"already holds a run \(results.json, last_checkpoint, model_final.pth\)"
                                          r".*resume=true.*overwrite=true"):
        run_stage(compose_cfg("train"))
    assert (tmp_path / "metrics.json").read_text() == first
    run_stage(compose_cfg("train", "overwrite=true"))
    assert (tmp_path / "metrics.json").read_text().count("total_loss") == first.count("total_loss")  # not appended

    # Resume may extend the schedule, not change the model it resumes.
    with pytest.raises(ConfigError, match=r"model.fc_dim: 64 -> 128\nA resumed run may change only: .*solver.epochs"):
        run_stage(compose_cfg("train", "resume=true", "model.fc_dim=128"))
    run_stage(compose_cfg("train", "resume=true", "solver.epochs=2"))


def test_overwrite_deletes_only_what_a_run_wrote(compose_cfg, tmp_path):
    (tmp_path / "results.json").write_text("{}")  # a stray results.json beside a user's own work
    (tmp_path / "thesis.tex").write_text("chapter 1")
    (tmp_path / "data").mkdir()
    with pytest.raises(ConfigError, match=rf"overwrite=true: {tmp_path} holds results.json but is not a run "
                                          rf"directory of this project \(no {LOCK_NAME}\); nothing was deleted"):
        run_stage(compose_cfg("train", "overwrite=true"))
    assert (tmp_path / "thesis.tex").read_text() == "chapter 1" and (tmp_path / "data").is_dir()

    run = tmp_path / "run"
    run_stage(compose_cfg("train", output_dir=run))
    (run / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"holds files no run writes \(notes.txt\); nothing was deleted"):
        run_stage(compose_cfg("train", "overwrite=true", output_dir=run))
    assert (run / "notes.txt").exists() and (run / "model_final.pth").exists()
    (run / "notes.txt").unlink()
    (run / "run.log").write_text("the new run's log, which Hydra opened before the run\n")
    run_stage(compose_cfg("train", "overwrite=true", output_dir=run))
    assert (run / "run.log").read_text().startswith("the new run's log") and (run / "model_final.pth").exists()


def test_resume_loads_as_strictly_as_eval(compose_cfg, tmp_path):
    from detectron2.modeling import build_model

    from fsd_d2.config import build_cfg

    run_stage(compose_cfg("train"))
    wider = build_model(build_cfg(compose_cfg("train", "model.fc_dim=128")))
    with pytest.raises(CheckpointError, match=r"does not match the model.*\n.*\n.*\n  shape differs \(6\): "
                                              r"roi_heads.box_head.fc1.weight"):
        AtomicCheckpointer(wider, str(tmp_path)).resume_or_load("", resume=True)
    (tmp_path / "last_checkpoint").write_text("model_0000999.pth")
    with pytest.raises(CheckpointError, match=r"last_checkpoint names .*model_0000999.pth, which does not exist"):
        run_stage(compose_cfg("train", "resume=true"))


def test_divergence_is_never_checkpointed(compose_cfg, tmp_path):
    with pytest.raises(DivergenceError, match=r"training diverged at iteration \d+: .*solver.lr_per_image"):
        run_stage(compose_cfg("train", "solver.lr_per_image=1000", "solver.epochs=3"))
    for name in _checkpoints(tmp_path):
        state = torch.load(tmp_path / name, map_location="cpu")["model"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), name


def test_non_finite_weights_are_neither_saved_nor_loaded(compose_cfg, tmp_path):
    from detectron2.modeling import build_model

    from fsd_d2.config import build_cfg

    model = build_model(build_cfg(compose_cfg("train")))
    checkpointer = AtomicCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000000", iteration=0)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight[0, 0] = float("nan")
    with pytest.raises(DivergenceError, match=r"iteration 7: 1 weight tensors hold NaN.*cls_score.weight"):
        checkpointer.save("model_0000007", iteration=7)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"
    assert not list(tmp_path.glob("*.tmp.*"))
    broken = {"model": model.state_dict()}
    torch.save(broken, tmp_path / "diverged.pth")
    with pytest.raises(CheckpointError, match="diverged.pth holds NaN or infinity in 1 tensors"):
        AtomicCheckpointer(model).load_matching(str(tmp_path / "diverged.pth"))


def test_temporaries_are_cleaned_and_old_checkpoints_pruned(compose_cfg, tmp_path):
    (tmp_path / "model_0000003.pth.tmp.4242").write_bytes(b"half a checkpoint")
    run_stage(compose_cfg("train", "solver.epochs=4", "solver.checkpoint_period_epochs=1", "solver.keep_checkpoints=2"))
    assert not list(tmp_path.glob("*.tmp.*"))
    periodic = [n for n in _checkpoints(tmp_path) if n != "model_final.pth"]
    assert len(periodic) == 2 and "model_final.pth" in _checkpoints(tmp_path)
    # A resume counts the earlier process's files: still the newest 2 after 2 more epochs.
    run_stage(compose_cfg("train", "solver.epochs=6", "solver.checkpoint_period_epochs=1", "solver.keep_checkpoints=2",
                          "resume=true"))
    resumed = [n for n in _checkpoints(tmp_path) if n != "model_final.pth"]
    assert len(resumed) == 2 and resumed[0] > periodic[-1]


def test_a_resumed_run_logs_each_iteration_once(compose_cfg, tmp_path):
    run_stage(compose_cfg("train", "solver.epochs=3", "solver.checkpoint_period_epochs=1", "solver.keep_checkpoints=3"))
    first = _checkpoints(tmp_path)[0]  # as if killed after the first epoch: later files gone, its tag on the first
    for name in _checkpoints(tmp_path)[1:] + ["results.json"]:
        (tmp_path / name).unlink()
    (tmp_path / "last_checkpoint").write_text(first)
    run_stage(compose_cfg("train", "solver.epochs=3", "solver.checkpoint_period_epochs=1", "resume=true"))
    iterations = [json.loads(line)["iteration"] for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert iterations == sorted(set(iterations)) and max(iterations) > int(first[6:13])


def test_a_full_disk_keeps_the_last_good_checkpoint(compose_cfg, tmp_path, monkeypatch):
    """A save that runs out of space stops the run with one line naming the file, leaves no half file, and
    last_checkpoint still names the complete one before it, from which resume=true continues."""
    import errno

    import fsd_d2.engine.checkpoint as checkpoint
    from fsd_d2.errors import StorageError

    real_save, saves = torch.save, []

    def save_until_full(obj, f):
        saves.append(f.name)
        if len(saves) > 1:
            f.write(b"the start of a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f)

    monkeypatch.setattr(checkpoint.torch, "save", save_until_full)
    with pytest.raises(StorageError, match=r"cannot write .*model_\d+\.pth: No space left on device\. Files written "
                                           r"before are kept .*resume=true"):
        run_stage(compose_cfg("train", "solver.epochs=3", "solver.checkpoint_period_epochs=1"))
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert not list(tmp_path.glob("*.tmp.*"))
    assert _checkpoints(tmp_path) == [(tmp_path / "last_checkpoint").read_text()]
    run_stage(compose_cfg("train", "solver.epochs=3", "solver.checkpoint_period_epochs=1", "resume=true"))
    assert (tmp_path / "model_final.pth").exists()


def test_a_failing_job_does_not_sink_the_sweep(synthetic_root, tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "fsd_d2.run", "--multirun", "+stage=train", "+experiment=tiny",
         f"dataset.root={synthetic_root}", "solver.lr_per_image=-1,0.005", f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "error: job 0 (+stage=train +experiment=tiny" in proc.stderr and "solver.lr_per_image=-1" in proc.stderr
    assert "1 job(s) of the sweep" in proc.stderr
    assert "solver.lr_per_image=-1.0: must be > 0" in (sweep / "0" / "error.txt").read_text()
    assert "bbox" in json.loads((sweep / "1" / "results.json").read_text())["deeplesion_test"]


def test_an_unfinished_search_leaves_no_final_genotype(compose_cfg, tmp_path, monkeypatch):
    from fsd_d2.engine import search

    write = search.write_search_artifacts

    def write_then_die(trainer, epoch, final):
        write(trainer, epoch, final)
        raise KeyboardInterrupt  # killed right after the first epoch's artifacts

    monkeypatch.setattr(search, "write_search_artifacts", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_stage(compose_cfg("search_bone", "search.order=1", "solver.epochs=2"))
    assert (tmp_path / "genotype_bone_epoch001.yaml").is_file()
    assert not (tmp_path / "genotype_bone.yaml").exists()


def test_an_unwritable_run_directory_is_named(compose_cfg, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match=r"cannot write the run directory .*a_file/run .*hydra.run.dir"):
        run_stage(compose_cfg("train", output_dir=tmp_path / "a_file" / "run"))


def test_unwritable_data_folders_are_named(tmp_path):
    from fsd_d2.data.synthetic import generate_synthetic

    (tmp_path / "a_file").write_text("")
    with pytest.raises(DataError, match=r"cannot write the synthetic set next to .*a_file/set .*dataset.root"):
        generate_synthetic(str(tmp_path / "a_file" / "set"), num_key_slices=3, image_size=32)


def test_storage_faults_anywhere_read_as_one_line():
    """The entry point turns a full or read-only disk met by any write into the one-line error; other OS errors
    stay bugs with their traceback."""
    import errno

    from fsd_d2.errors import storage_error

    full = storage_error(OSError(errno.EROFS, "Read-only file system", "/runs/x/results.json"))
    assert str(full).startswith("cannot write /runs/x/results.json: Read-only file system. Files written before")
    assert storage_error(OSError(errno.ENOENT, "No such file or directory", "/x")) is None
    assert storage_error(ValueError("not a disk")) is None


def test_a_resume_cannot_shorten_a_run_below_what_it_trained(compose_cfg, tmp_path):
    """Three epochs trained, a resume asking for two stops before touching config.yaml; four continues."""
    run_stage(compose_cfg("train", "solver.epochs=3", "solver.checkpoint_period_epochs=1"))
    saved = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"solver.epochs=2, but .*model_final.pth has trained 3 of the run's 3 "
                                          r"epochs: .*solver.epochs>=3, or evaluate the checkpoint as it is"):
        run_stage(compose_cfg("train", "solver.epochs=2", "resume=true"))
    assert (tmp_path / "config.yaml").read_text() == saved
    run_stage(compose_cfg("train", "solver.epochs=4", "resume=true"))
    assert "epochs: 4" in (tmp_path / "config.yaml").read_text()
