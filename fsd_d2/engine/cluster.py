"""A job on a SLURM allocation: Detectron2's rendezvous from the allocation itself.

``hydra/launcher=slurm`` (conf/hydra/launcher/slurm.yaml) submits each job of a sweep through submitit as one
SLURM job of ``num_machines`` nodes with one task per node; each task starts the node's ``num_gpus`` processes
with Detectron2's ``launch``. The tasks agree on the rendezvous without talking to each other: the node's rank
is ``SLURM_NODEID``, machine 0 is the first host of ``SLURM_JOB_NODELIST`` and the port follows from the job id.
"""
import os
from typing import Any, Dict, Optional

from fsd_d2.errors import ConfigError

PORT_BASE = 20000  # rendezvous ports 20000-39999, one per SLURM job id
PORT_RANGE = 20000


def slurm_rendezvous(num_machines: int, dist_url: str = "auto") -> Optional[Dict[str, Any]]:
    """``{"machine_rank", "dist_url"}`` for this task inside a submitit SLURM job; None anywhere else.

    ``dist_url`` other than ``auto`` is kept (a rendezvous the user chose). The allocation must have one task
    per node and ``num_machines`` nodes: anything else would start the run twice, or wait for absent machines.
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
    if dist_url == "auto" and num_machines > 1:
        port = PORT_BASE + int(env.raw_job_id) % PORT_RANGE
        dist_url = f"tcp://{env.hostnames[0]}:{port}"
    return {"machine_rank": env.node, "dist_url": dist_url}
