"""A run directory belongs to one process at a time, and a finished run is never replaced by accident.

The lock is an ``flock`` on ``.fsd_lock``: the kernel drops it when its process ends, however it ends, so a
crashed or killed run never leaves the directory locked. While it holds the lock, a run removes the
temporary files an interrupted write left behind, refuses to start over a finished run unless told how
(``resume=true``, or ``overwrite=true``, which deletes only what runs write), and on resume refuses a config that differs from the saved one in
anything but the keys that are safe to change.
"""
import contextlib
import fcntl
import fnmatch
import json
import logging
import math
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Sequence

import yaml

from fsd_d2.config import flatten
from fsd_d2.errors import ConfigError

logger = logging.getLogger(__name__)

LOCK_NAME = ".fsd_lock"
CONFIG_NAME = "config.yaml"  # the resolved Hydra config of the run, written at its start
_RUN_ARTIFACTS = ("results.json", "last_checkpoint", "model_final.pth")  # what shows a run has been here
_KEPT_ON_OVERWRITE = (LOCK_NAME, ".hydra", "*.log")  # Hydra writes .hydra/ and the job's log for the new run first
# What runs write into their directory (every stage's files, a pipeline's step directories, W&B's folder, the sweep's
# error record): overwrite=true deletes these and nothing else.
RUN_OUTPUTS = ("config.yaml", "d2_config.yaml", "log.txt", "metrics.json", "results.json", "last_checkpoint",
               "model_*.pth", "events.out.tfevents.*", "eval", "wandb", "error.txt", "*.tmp.*", "[0-9]*_*",
               "genotype_*.yaml", "op_latency_*.yaml", "alphas_*.png", "cell_*.png", "op_latency_*.png",
               "graph_*.png")
# Keys a resumed run may change: where and how it runs, how long and how often it saves, what it logs and
# returns to a sweeper.
SAFE_TO_CHANGE_ON_RESUME = ("resume", "overwrite", "output_dir", "device", "num_workers", "num_gpus", "num_machines",
                            "machine_rank", "dist_url", "checkpoint", "solver.epochs",
                            "solver.checkpoint_period_epochs", "solver.eval_period_epochs",
                            "solver.keep_checkpoints", "solver.clip_grad_norm", "logger.", "objective.")


def _safe_to_change(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE_TO_CHANGE_ON_RESUME)


def config_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> Dict[str, tuple]:
    """``{key: (saved value, new value)}`` for every key that differs and is not safe to change on resume.
    ``stage.*`` options other than the stage's name only steer the run, so they may change too."""
    a, b = flatten(saved), flatten(now)
    return {k: (a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not _safe_to_change(k) and not (k.startswith("stage.") and k != "stage.name")}


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _delete_previous_run(out: Path, was_run: bool, found: Sequence[str]) -> None:
    """overwrite=true: delete what the earlier run wrote, and only if that is all the directory holds (a user's
    files beside a stray results.json are not a run's to delete)."""
    if not was_run:
        raise ConfigError(f"overwrite=true: {out} holds {', '.join(found)} but is not a run directory of this project "
                          f"(no {LOCK_NAME}); nothing was deleted. Choose another directory or remove it yourself")
    entries = [e for e in out.iterdir() if not _matches(e.name, _KEPT_ON_OVERWRITE)]
    foreign = sorted(e.name for e in entries if not _matches(e.name, RUN_OUTPUTS))
    if foreign:
        raise ConfigError(f"overwrite=true: {out} holds files no run writes ({', '.join(foreign[:5])}"
                          f"{', ...' if len(foreign) > 5 else ''}); nothing was deleted. Move them elsewhere, or "
                          f"choose another directory")
    for entry in entries:
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    logger.warning(f"overwrite=true: deleted the earlier run in {out} ({', '.join(found)} and the rest)")


def _check_previous_run(out: Path, was_run: bool, resume: bool, overwrite: bool, config: Mapping[str, Any]) -> None:
    found = [name for name in _RUN_ARTIFACTS if (out / name).exists()]
    if not found:
        return
    if overwrite:
        _delete_previous_run(out, was_run, found)
        return
    if not resume:
        raise ConfigError(f"{out} already holds a run ({', '.join(found)}). Continue it with resume=true, or "
                          f"delete it and start again with overwrite=true")
    saved_path = out / CONFIG_NAME
    if saved_path.is_file():
        differences = config_differences(yaml.safe_load(saved_path.read_text()) or {}, config)
        if differences:
            lines = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, (old, new) in differences.items())
            safe = ", ".join(s.rstrip(".") + ("*" if s.endswith(".") else "") for s in SAFE_TO_CHANGE_ON_RESUME)
            raise ConfigError(f"resume=true with a config that differs from the run's {saved_path}:\n{lines}\n"
                              f"A resumed run may change only: {safe}. Start a new run directory for the rest "
                              f"(or overwrite=true to replace this one)")
        _check_not_shorter_than_trained(out, yaml.safe_load(saved_path.read_text()) or {}, config)


def _check_not_shorter_than_trained(out: Path, saved: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """A resume may shorten a run only down to what its last checkpoint has trained: shorter, nothing would run
    and config.yaml would name a schedule the model did not follow. Trained epochs = the checkpoint's iterations
    over the run's MAX_ITER (d2_config.yaml) x its epochs."""
    tag, d2_config = out / "last_checkpoint", out / "d2_config.yaml"
    epochs, new_epochs = flatten(saved).get("solver.epochs"), flatten(config).get("solver.epochs")
    if not (tag.is_file() and d2_config.is_file()) or epochs is None or new_epochs is None or new_epochs >= epochs:
        return
    max_iter = (yaml.safe_load(d2_config.read_text()) or {}).get("SOLVER", {}).get("MAX_ITER")
    name = tag.read_text().strip()
    periodic = re.fullmatch(r"model_(\d+)\.pth", name)
    done = max_iter if name == "model_final.pth" else int(periodic.group(1)) + 1 if periodic else None
    if not max_iter or done is None:  # a tag this project did not write: the resume's load will name it
        return
    trained = epochs * done / max_iter
    if new_epochs < trained - 1e-9:
        raise ConfigError(f"resume=true with solver.epochs={new_epochs}, but {out / name} has trained {trained:g} of the "
                          f"run's {epochs} epochs: nothing would run and config.yaml would describe a schedule the "
                          f"model did not follow. Resume with solver.epochs>={math.ceil(trained - 1e-9)}, or evaluate "
                          f"the checkpoint as it is (+stage=eval checkpoint={out / name})")


def _remove_temporaries(out: Path) -> None:
    """Files an interrupted atomic write left (``<name>.tmp.<pid>``); nobody else writes here now."""
    for tmp in out.glob("*.tmp.*"):
        tmp.unlink()
        logger.info(f"removed {tmp.name}, left by an interrupted write")


@contextlib.contextmanager
def own_run_directory(out: Path, *, resume: bool, overwrite: bool, config: Mapping[str, Any]) -> Iterator[None]:
    """Hold ``out`` for this run: lock it, clean it, and check it against an earlier run (see the module doc)."""
    was_run = (out / LOCK_NAME).exists()  # every run leaves its lock file: the mark of a run directory
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"cannot write the run directory {out} ({e.strerror}); choose another one with "
                          f"hydra.run.dir=... (or output_dir=...)") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            raise ConfigError(f"run directory {out} is in use by {holder}; wait for that run to end, or choose "
                              f"another directory with hydra.run.dir=...") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        _remove_temporaries(out)
        _check_previous_run(out, was_run, resume, overwrite, config)
        yield
    finally:
        os.close(fd)  # closing releases the lock
