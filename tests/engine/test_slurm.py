"""Sweeps through a real SLURM cluster: one node on this machine, brought up by .ci/slurm-up (which .ci/run calls
before the tests). The jobs are submitted with hydra/launcher=slurm exactly as a user would; SLURM's own view
(squeue while they run, scontrol after) shows that they went through it and with which resources.

Without SLURM (no sbatch) the tests skip and say so. With sbatch but no answering controller they fail: SLURM is
meant to be up. A cluster whose nodes are not this machine is left alone (skipped): these tests submit only to a
one-node cluster of this host, never to a shared one that the machine happens to be a client of.
"""
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest
import yaml

from fsd_d2.engine.cluster import PORT_BASE, PORT_RANGE

TINY = ["+stage=train", "+experiment=tiny"]
SWEEP_TIMEOUT_S = 300


def _slurm(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def slurm_node() -> Dict[str, str]:
    """The one node of this machine's SLURM cluster: ``{"name", "cpus"}``; skips where there is none."""
    if shutil.which("sbatch") is None:
        pytest.skip("SLURM is not installed (no sbatch on PATH): `sudo bash .ci/slurm-up` installs and starts a "
                    "one-node cluster on this machine")
    nodes = _slurm("sinfo", "-h", "-N", "-o", "%N %T %c")
    if nodes.returncode != 0:
        pytest.fail(f"sbatch is installed but the SLURM controller does not answer ({nodes.stderr.strip()}): "
                    f"`sudo bash .ci/slurm-up` starts it")
    states = {name: (state, cpus) for name, state, cpus in (line.split() for line in nodes.stdout.splitlines())}
    host = socket.gethostname().split(".")[0]
    if host not in states:
        pytest.skip(f"the SLURM cluster here (nodes {sorted(states)}) is not on this machine ({host}); these tests "
                    f"submit only to a one-node cluster of this host (.ci/slurm-up)")
    state, cpus = states[host]
    if state.rstrip("*~#") not in ("idle", "mixed", "allocated", "completing") or state.endswith("*"):
        pytest.fail(f"the SLURM node {host} is {state}, not taking jobs: see `scontrol show node {host}` and "
                    f"/var/log/slurm/; `sudo bash .ci/slurm-up` resumes it")
    return {"name": host, "cpus": cpus}


def _sweep_through_slurm(tmp_path: Path, *overrides: str) -> Tuple[int, str, Set[Tuple[str, str]]]:
    """Run a --multirun through hydra/launcher=slurm; returns its exit status, its stderr and the (job id, state)
    pairs that squeue showed for the sweep's jobs (named after tmp_path) while it ran."""
    name = f"fsd-test-{tmp_path.name}"
    command = [sys.executable, "-m", "fsd_d2.run", "--multirun", f"hydra.sweep.dir={tmp_path / 'sweep'}",
               "hydra/launcher=slurm", f"hydra.launcher.name={name}", "hydra.launcher.timeout_min=10", *overrides]
    seen: Set[Tuple[str, str]] = set()
    with open(tmp_path / "stdout.txt", "w") as out, open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        deadline = time.monotonic() + SWEEP_TIMEOUT_S
        while proc.poll() is None:
            queue = _slurm("squeue", "-h", "-n", name, "-o", "%i %T")
            seen.update(tuple(line.split()) for line in queue.stdout.splitlines())
            if time.monotonic() > deadline:
                proc.kill()
                _slurm("scancel", "-n", name)
                pytest.fail(f"the sweep did not end in {SWEEP_TIMEOUT_S} s; squeue saw {sorted(seen)}")
            time.sleep(0.5)
    return proc.returncode, (tmp_path / "stderr.txt").read_text(), seen


def _job_ids(sweep: Path) -> List[str]:
    """SLURM's ids of the sweep's jobs, from submitit's folders: ['24_0', '24_1'] for an array, ['26'] alone."""
    return sorted(p.name for p in (sweep / ".submitit").iterdir() if any(p.glob("*_result.pkl")))


def _scontrol_job(job_id: str, settle_s: float = 30.0) -> Dict[str, str]:
    """SLURM's record of a job whose process has ended; SLURM may still show it RUNNING for a moment while the
    node reports the end (its epilogue), so the record is read again until it leaves that state or ``settle_s``."""
    deadline = time.monotonic() + settle_s
    while True:
        shown = _slurm("scontrol", "-o", "show", "job", job_id)
        assert shown.returncode == 0, f"SLURM does not know job {job_id}: {shown.stderr}"
        job = dict(field.split("=", 1) for field in shown.stdout.split() if "=" in field)
        if job.get("JobState") not in ("RUNNING", "COMPLETING") or time.monotonic() > deadline:
            return job
        time.sleep(0.5)


def test_a_sweep_runs_through_slurm_and_a_diverging_job_does_not_sink_the_other(slurm_node, synthetic_root,
                                                                                 tmp_path):
    sweep = tmp_path / "sweep"
    status, stderr, seen = _sweep_through_slurm(tmp_path, *TINY, f"dataset.root={synthetic_root}",
                                                "solver.lr_per_image=1000,0.005")
    assert status == 1, stderr[-3000:]  # the diverged job's status, once everything is written
    assert "1 job(s) of the sweep" in stderr and "0: overrides: +stage=train" in stderr
    # SLURM ran both jobs: seen in its queue while running, and known to it afterwards as done, on this node,
    # with a CPU run's request (a core and 4 GB each, no GPU).
    ids = _job_ids(sweep)
    assert len(ids) == 2 and ids[0].split("_")[0] == ids[1].split("_")[0], f"not one array of 2 jobs: {ids}"
    assert any(state == "RUNNING" for _, state in seen), f"squeue never showed a job of the sweep running: {seen}"
    jobs = [_scontrol_job(i) for i in ids]
    for job in jobs:
        assert job["JobState"] == "COMPLETED" and job["NodeList"] == slurm_node["name"]
        assert job["JobName"] == f"fsd-test-{tmp_path.name}"
        assert job["TRES"].startswith("cpu=1,mem=4G,node=1") and "gpu" not in job["TRES"], job["TRES"]
        assert job["StdOut"].startswith(str(sweep / ".submitit")), "submitit's log is not where the sweep is"
    if int(slurm_node["cpus"]) >= 2:  # a core each: both run at once
        assert jobs[0]["StartTime"] < jobs[1]["EndTime"] and jobs[1]["StartTime"] < jobs[0]["EndTime"], \
            [(j["StartTime"], j["EndTime"]) for j in jobs]
    # The run directories: the diverged job recorded its error, the other trained and evaluated.
    assert "DivergenceError" in (sweep / "0" / "error.txt").read_text()
    assert not (sweep / "0" / "results.json").exists()
    results = json.loads((sweep / "1" / "results.json").read_text())
    assert "sens@4" in results["deeplesion_test"]["bbox"] and (sweep / "1" / "model_final.pth").exists()
    summary = (sweep / "sweep_summary.md").read_text()
    assert "2 job(s), 1 failed" in summary and "best: job 1" in summary
    assert "| 0 | 1000 | - |" in summary and "DivergenceError" in summary
    assert "| 1 | 0.005 | " in summary


def test_two_cpu_processes_in_one_slurm_job_meet_at_the_allocations_rendezvous(slurm_node, synthetic_root,
                                                                                tmp_path):
    sweep = tmp_path / "sweep"
    status, stderr, seen = _sweep_through_slurm(tmp_path, *TINY, f"dataset.root={synthetic_root}", "num_gpus=2",
                                                "device=cpu")
    assert status == 0, stderr[-3000:]
    (job_id,) = _job_ids(sweep)
    job = _scontrol_job(job_id)
    assert job["JobState"] == "COMPLETED" and job["NodeList"] == slurm_node["name"]
    assert job["TRES"].startswith("cpu=2,mem=8G,node=1") and "gpu" not in job["TRES"], job["TRES"]
    assert (job_id, "RUNNING") in seen, f"squeue never showed job {job_id} running: {seen}"
    # The rendezvous came from the allocation (first host of the node list, port from the job id), and both
    # processes met there.
    run = sweep / "0"
    config = yaml.safe_load((run / "config.yaml").read_text())
    rendezvous = f"tcp://{slurm_node['name']}:{PORT_BASE + int(job_id) % PORT_RANGE}"
    assert (config["machine_rank"], config["dist_url"]) == (0, rendezvous)
    assert f"process 0 of 2 (machine 0 of 1), rendezvous {rendezvous}" in (run / "log.txt").read_text()
    assert f"process 1 of 2 (machine 0 of 1), rendezvous {rendezvous}" in (run / "log.txt.rank1").read_text()
    assert "sens@4" in json.loads((run / "results.json").read_text())["deeplesion_test"]["bbox"]
    assert "1 job(s), 0 failed" in (sweep / "sweep_summary.md").read_text()
