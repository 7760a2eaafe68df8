"""A job on a SLURM allocation: Detectron2's rendezvous from the allocation itself.

``hydra/launcher=slurm`` (conf/hydra/launcher/slurm.yaml) submits each job of a sweep through submitit as one
SLURM job of ``num_machines`` nodes with one task per node; each task starts the node's ``num_gpus`` processes
with Detectron2's ``launch``. The tasks agree on the rendezvous without talking to each other: the node's rank
is ``SLURM_NODEID``, machine 0 is the first host of ``SLURM_JOB_NODELIST`` and the port follows from the job id.

What a job asks SLURM for follows the run's device: slurm.yaml's resources are written with the resolvers
registered here (``${fsd.by_device:${device},<on cuda>,<on cpu>}``), so that a CPU run asks for no GPUs (a
GPU request on a cluster without GPUs is refused at submission) and a core and a few GB per process.
"""
import os
from typing import Any, Dict, Optional

from omegaconf import OmegaConf

from fsd_d2.errors import ConfigError

PORT_BASE = 20000  # rendezvous ports 20000-39999, one per SLURM job id
PORT_RANGE = 20000


def by_device(device: str, on_cuda: Any, on_cpu: Any) -> Any:
    """``on_cuda`` for a run on GPUs (``device=cuda``, ``cuda:1``), else ``on_cpu``."""
    return on_cuda if str(device).startswith("cuda") else on_cpu


def per_process(num_processes: int, each: float) -> float:
    """``each`` times the processes of a node (at least one: ``num_gpus=0`` still runs one process)."""
    return max(int(num_processes), 1) * each


# Registered on import: fsd_d2.run imports this module (through the runner) before Hydra resolves the launcher.
OmegaConf.register_new_resolver("fsd.by_device", by_device, replace=True)
OmegaConf.register_new_resolver("fsd.per_process", per_process, replace=True)


def slurm_rendezvous(num_machines: int, dist_url: str = "auto") -> Optional[Dict[str, Any]]:
    """``{"machine_rank", "dist_url"}`` for this task inside a submitit SLURM job; None anywhere else.

    ``dist_url`` other than ``auto`` is kept (a rendezvous the user chose). ``auto`` becomes machine 0's host and
    the job's port on one node too: the rendezvous of a many-node job, which a one-node cluster then tests. The
    allocation must have one task per node and ``num_machines`` nodes: anything else would start the run twice,
    or wait for absent machines.
    """
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return None
    import submitit  # installed with the sweep extra, as the launcher that set SUBMITIT_EXECUTOR

    env = submitit.JobEnvironment()
    if env.num_tasks != env.num_nodes:
        raise ConfigError(f"the SLURM job runs {env.num_tasks} tasks on {env.num_nodes} node(s); FSD-D2 needs one "
                          f"task per node (hydra.launcher.tasks_per_node=1): each task starts num_gpus processes")
    if env.num_nodes != num_machines:
        raise ConfigError(f"num_machines={num_machines} but the SLURM job has {env.num_nodes} node(s); set "
                          f"hydra.launcher.nodes to num_machines (hydra/launcher=slurm ties them)")
    if dist_url == "auto":
        port = PORT_BASE + int(env.raw_job_id) % PORT_RANGE
        dist_url = f"tcp://{env.hostnames[0]}:{port}"
    return {"machine_rank": env.node, "dist_url": dist_url}
