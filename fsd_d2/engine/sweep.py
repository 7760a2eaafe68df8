"""The summary of a sweep (``--multirun``): one table per sweep, written when it ends.

:class:`SweepSummary` (a Hydra callback) reads every job's overrides and results into ``sweep_summary.md`` /
``.csv`` in the sweep directory (a column per swept key and per metric, a row per job, failed jobs with their
error), plots the objective against each swept key (``sweep_<key>.png``, :mod:`fsd_d2.viz.sweep`), logs the
table and plots to W&B as one run of job type ``sweep`` in the sweep's group, and exits with status 1 when a job
failed. What each job returns and records is :mod:`fsd_d2.engine.sweep_job`.
"""
import atexit
import csv
import json
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml
from hydra.experimental.callback import Callback
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from fsd_d2.engine.rundir import CONFIG_NAME
from fsd_d2.engine.sweep_job import ERROR_NAME, split_metrics, sweep_group
from fsd_d2.engine.wandb import log_sweep
from fsd_d2.errors import ConfigError
from fsd_d2.evaluation.metrics import FPPI_POINTS
from fsd_d2.evaluation.report import Table, to_markdown
from fsd_d2.viz.sweep import plot_against

logger = logging.getLogger(__name__)
SUMMARY_NAME = "sweep_summary"  # .md and .csv in the sweep directory
# The metrics of the Markdown summary (the CSV holds every metric of the split): Tables I-II's IoU columns + IoBB AP.
HEADLINE_METRICS = ("AP", "AP_iobb", "recall", *[f"sens@{p:g}" for p in FPPI_POINTS])


@dataclass
class Job:
    """One job of a sweep as its run directory holds it."""

    name: str  # the job's directory (hydra.job.num)
    overrides: Dict[str, str]  # key -> value as given, from .hydra/overrides.yaml
    config: Dict[str, Any] = field(default_factory=dict)  # the resolved config the run saved
    split: str = ""
    metrics: Dict[str, float] = field(default_factory=dict)  # the split's bbox metrics
    error: str = ""  # first line of the error; empty for a finished job


def _override_items(lines: Sequence[str]) -> Dict[str, str]:
    items = {}
    for line in lines:
        key, _, value = line.partition("=")
        items[key.lstrip("+~")] = value
    return items


def _error_line(job_dir: Path) -> str:
    path = job_dir / ERROR_NAME
    if path.is_file():
        lines = path.read_text().splitlines()
        return next((ln for ln in lines[1:] if ln.strip()), "failed") if lines else "failed"
    if not (job_dir / "results.json").is_file():
        return "no results.json: the job did not finish"
    return ""


def read_jobs(sweep_dir: Path, split: Optional[str] = None) -> List[Job]:
    """Every job directory of ``sweep_dir`` (those Hydra wrote ``.hydra/overrides.yaml`` into), in job order."""
    dirs = [p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")]
    jobs = []
    for d in sorted(dirs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name)):
        job = Job(d.name, _override_items(yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text()) or []))
        if (d / CONFIG_NAME).is_file():
            job.config = yaml.safe_load((d / CONFIG_NAME).read_text()) or {}
        job.error = _error_line(d)
        if (d / "results.json").is_file() and not job.error:  # a failed job's results.json is an earlier run's
            try:
                job.split, job.metrics = split_metrics(json.loads((d / "results.json").read_text()), split)
            except ConfigError as e:
                job.error = job.error or str(e)
        jobs.append(job)
    return jobs


def swept_keys(jobs: Sequence[Job]) -> List[str]:
    """The override keys whose value is not the same in every job, in the order they were given."""
    keys = list(dict.fromkeys(k for job in jobs for k in job.overrides))
    return [k for k in keys if len({job.overrides.get(k) for job in jobs}) > 1]


def _metric_columns(jobs: Sequence[Job], objective: str, every: bool) -> List[str]:
    found = list(dict.fromkeys(k for job in jobs for k in job.metrics))
    chosen = found if every else [m for m in HEADLINE_METRICS if m in found]
    return chosen + [objective] if objective in found and objective not in chosen else chosen


def summary_table(jobs: Sequence[Job], keys: Sequence[str], metrics: Sequence[str]) -> Table:
    """One row per job: its name, the swept keys' values, the metrics (None where missing) and its error."""
    rows = [[job.name, *[job.overrides.get(k, "") for k in keys], *[job.metrics.get(m) for m in metrics],
             job.error] for job in jobs]
    return Table("summary", "Jobs", ["job", *keys, *metrics, "error"], rows)


def _markdown_cell(value: Any) -> Any:
    """``-`` for a missing metric, ``|`` escaped in text."""
    if value is None:
        return "-"
    return value.replace("|", "\\|") if isinstance(value, str) else value


def _first_sentence(error: str, limit: int = 120) -> str:
    first = re.split(r"\.\s+(?=[A-Z])", error)[0]
    return first if len(first) <= limit else first[:limit - 3] + "..."


def _best(jobs: Sequence[Job], metric: str, direction: str) -> Optional[Job]:
    scored = [j for j in jobs if metric in j.metrics and not math.isnan(j.metrics[metric])]
    if not scored:
        return None
    pick = max if direction == "maximize" else min
    return pick(scored, key=lambda j: j.metrics[metric])


@dataclass
class SweepSummaryFiles:
    markdown: Path
    csv: Path
    plots: Dict[str, Path]  # swept key -> PNG
    tables: List[Table]  # the summary, then those of the callback's ``tables``


def write_sweep_summary(sweep_dir: Path, jobs: Sequence[Job], *, metric: str, direction: str,
                        tables: Sequence[Callable[[Sequence[Job]], List[Table]]] = ()) -> SweepSummaryFiles:
    """Write ``sweep_summary.md`` / ``.csv``, one ``sweep_<key>.png`` per swept key, and ``<key>.md`` for each
    table of ``tables`` (views of the same jobs, e.g. :func:`fsd_d2.engine.tables.multitype_tables`)."""
    keys = swept_keys(jobs)
    table = summary_table(jobs, keys, _metric_columns(jobs, metric, every=False))
    full = summary_table(jobs, keys, _metric_columns(jobs, metric, every=True))
    csv_path = sweep_dir / f"{SUMMARY_NAME}.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(full.header)
        writer.writerows([["" if v is None else v for v in row] for row in full.rows])
    failed = [j for j in jobs if j.error]
    split = next((j.split for j in jobs if j.split), "")
    swept = ", ".join(f"`{k}`" for k in keys) or "-"
    notes = [f"{len(jobs)} job(s), {len(failed)} failed. Metrics of `{split or 'the first test split'}` in "
             f"percent; every metric of each job: `{csv_path.name}`. Swept: {swept}."]
    best = _best(jobs, metric, direction)
    if best is not None:
        chosen = " ".join(f"{k}={best.overrides.get(k, '')}" for k in keys)
        notes += ["", f"Objective: {direction} `{metric}`; best: job {best.name} ({metric} = "
                     f"{best.metrics[metric]:.2f}{', ' + chosen if chosen else ''})."]
    md_table = table._replace(rows=[[_markdown_cell(v) for v in [*row[:-1], _first_sentence(row[-1])]]
                                    for row in table.rows])  # the error's first sentence; the CSV has it all
    md_path = sweep_dir / f"{SUMMARY_NAME}.md"
    md_path.write_text(to_markdown(f"Sweep {sweep_dir.name}", [md_table], notes))
    plots = {}
    if any(metric in j.metrics for j in jobs):
        for key in keys:
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", key)
            others = [k for k in keys if k != key]
            points = [(job.overrides.get(key, ""), " ".join(f"{k}={job.overrides.get(k, '')}" for k in others),
                       job.metrics[metric]) for job in jobs if metric in job.metrics]
            plots[key] = plot_against(points, key, metric, sweep_dir / f"sweep_{name}.png",
                                      missing=len(jobs) - len(points))
    views = [t for view in tables for t in view(jobs)]
    for t in views:
        (sweep_dir / f"{t.key}.md").write_text(to_markdown(f"Sweep {sweep_dir.name}", [t]))
    return SweepSummaryFiles(md_path, csv_path, plots, [table, *views])


class SweepSummary(Callback):
    """Hydra callback (conf/config.yaml): at the end of a multirun, write the sweep's summary (and the extra
    ``tables``, dotted names of functions ``jobs -> [Table]``), log it to W&B as a run of :attr:`job_type`, and
    exit with status 1 when a job failed. A subclass adds its own view of the jobs through :meth:`extend`."""

    job_type = "sweep"

    def __init__(self, tables: Sequence[str] = ()):
        self.tables = [get_method(name) for name in tables]
        self._unsummarised: Optional[DictConfig] = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        """Hydra skips ``on_multirun_end`` when the sweep itself raises (an Optuna study whose every trial failed,
        a parallel job killed by a signal): the summary is then written as the process exits."""
        self._unsummarised = config
        atexit.register(self._summarise_a_sweep_that_raised)

    def _summarise_a_sweep_that_raised(self) -> None:
        if self._unsummarised is not None:
            print("the sweep stopped with the error above; its summary describes the jobs that ran", file=sys.stderr)
            try:
                self.on_multirun_end(self._unsummarised)
            except SystemExit:  # the process already exits with Hydra's status 1
                pass

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        self._unsummarised = None
        sweep_dir = Path(config.hydra.sweep.dir)
        objective = config.objective
        jobs = read_jobs(sweep_dir, objective.split)
        if not jobs:
            logger.warning(f"no job directories under {sweep_dir}: no sweep summary")
            return
        files = write_sweep_summary(sweep_dir, jobs, metric=objective.metric, direction=objective.direction,
                                    tables=self.tables)
        logger.info(f"sweep summary: {files.markdown} (+ .csv{', plots' if files.plots else ''})\n"
                    f"{files.markdown.read_text()}")
        tables, images = self.extend(config, sweep_dir, jobs)
        self._log_to_wandb(config, sweep_dir, [*files.tables, *tables],
                           {**{f"{SUMMARY_NAME}/{key}": p for key, p in files.plots.items()}, **images})
        self._report_failures(sweep_dir, jobs)

    def extend(self, config: DictConfig, sweep_dir: Path, jobs: Sequence[Job]) -> Tuple[List[Table], Dict[str, Path]]:
        """More tables and pictures of the same jobs, written beside the summary and logged with it (none here)."""
        return [], {}

    def _log_to_wandb(self, config: DictConfig, sweep_dir: Path, tables: Sequence[Table],
                      images: Mapping[str, Path]) -> None:
        settings = OmegaConf.to_container(config.logger, resolve=True)
        if not settings["enabled"]:
            return
        stage = OmegaConf.select(config, "stage.name", default="no_stage")
        settings["group"] = settings.get("group") or sweep_group(stage, str(sweep_dir))
        log_sweep(settings, name=f"{self.job_type}-{settings['group']}", directory=str(sweep_dir), tables=tables,
                  images={key: str(p) for key, p in images.items()}, job_type=self.job_type)

    @staticmethod
    def _report_failures(sweep_dir: Path, jobs: Sequence[Job]) -> None:
        failed = [j for j in jobs if j.error]
        if not failed:
            return
        lines = []
        for job in failed:
            path = sweep_dir / job.name / ERROR_NAME
            first = path.read_text().splitlines()[0] if path.is_file() else job.error
            lines.append(f"  {job.name}: {first}")
        print(f"error: {len(failed)} job(s) of the sweep in {sweep_dir} failed (marked in {SUMMARY_NAME}.md):\n"
              + "\n".join(lines), file=sys.stderr)
        sys.exit(1)
