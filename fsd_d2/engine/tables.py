"""The paper's multi-type tables (III: per-type AP; IV: sensitivity at 4 FPPI) as a view of a sweep's jobs.

The columns are the lesion types the jobs were evaluated on (their ``AP-<type>`` metrics): DeepLesion's 8, or the
categories of a COCO dataset's JSON.

``+experiment=table3`` hands :func:`multitype_tables` to the sweep summary (:class:`fsd_d2.engine.sweep.SweepSummary`,
``tables=[...]``): when the sweep ends, the jobs it has read for ``sweep_summary.md`` also become ``table3.md``
and ``table4.md`` beside it, and go to W&B with the summary.
"""
import re
from typing import Callable, List, Sequence

from fsd_d2.data.deeplesion import LESION_TYPE_ABBR
from fsd_d2.engine.sweep import Job
from fsd_d2.evaluation.report import CRITERIA, Table

_MODEL_LABEL = {"fpn_r50": "FPN", "fsd": "FSD"}


def job_label(job: Job) -> str:
    """``FPN w/ Graph``, ``FSD w/o Graph``, ... from the job's saved config."""
    model = job.config.get("model", {})
    name = model.get("name", "?")
    return f"{_MODEL_LABEL.get(name, name)} {'w/ Graph' if model.get('graph_enabled') else 'w/o Graph'}"


def _table(key: str, title: str, jobs: Sequence[Job], columns: List[str], metric: Callable[[str, str], str],
           last: str, last_metric: Callable[[str], str]) -> Table:
    """One row per (job, overlap criterion): the per-type ``metric(type, suffix)`` columns, then ``last``."""
    nan = float("nan")
    cells = [[job_label(job), criterion, *[job.metrics.get(metric(c, suffix), nan) for c in columns],
              job.metrics.get(last_metric(suffix), nan)]
             for job in jobs for criterion, suffix in CRITERIA]
    return Table(key, title, ["", "", *columns, last], cells)


_TYPE_AP = re.compile(r"^AP-(.+)$")  # AP-<type> (IoU); AP_iobb-<type> is the same type


def lesion_types(jobs: Sequence[Job]) -> List[str]:
    """The type abbreviations of the jobs' per-type metrics, in their order; DeepLesion's 8 when none has any."""
    types = dict.fromkeys(m.group(1) for job in jobs for key in job.metrics for m in [_TYPE_AP.match(key)] if m)
    return list(types) or list(LESION_TYPE_ABBR)


def multitype_tables(jobs: Sequence[Job]) -> List[Table]:
    """Table III (AP@[.5:.95] per type, mAP) and Table IV (sensitivity at 4 FPPI per type, recall) of the
    finished jobs (a failed one is marked in the sweep summary)."""
    done = [job for job in jobs if job.metrics]
    types = lesion_types(done)
    return [_table("table3", "Class AP@[.5:.95] (Table III)", done, types, lambda t, s: f"AP{s}-{t}", "mAP",
                   lambda s: f"AP{s}"),
            _table("table4", "Sensitivity (%) at 4 FPPI (Table IV)", done, types, lambda t, s: f"sens{s}@4-{t}",
                   "Recall", lambda s: f"recall{s}")]
