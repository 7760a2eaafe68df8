"""Collect a multirun's per-job results into the paper's multi-type tables (III: per-type AP; IV: sensitivity).

Used as a Hydra callback by ``+experiment=table3``: when the sweep ends, every job's ``results.json`` and
``config.yaml`` are read and ``table3.md`` / ``table4.md`` are written beside them (each job has already
logged its own metrics to W&B; the tables are plain Markdown files).
"""
import json
import logging
from pathlib import Path
from typing import Dict, List

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fsd_d2.data.deeplesion import LESION_TYPE_ABBR
from fsd_d2.errors import MissingFileError
from fsd_d2.evaluation.report import CRITERIA, Table, to_markdown

logger = logging.getLogger(__name__)
_MODEL_LABEL = {"fpn_r50": "FPN", "fsd": "FSD"}


def _jobs(sweep_dir: Path) -> List[Dict]:
    rows = []
    for results in sorted(sweep_dir.glob("*/results.json")):
        config = yaml.safe_load((results.parent / "config.yaml").read_text())
        metrics = next(iter(json.loads(results.read_text()).values()))["bbox"]
        label = _MODEL_LABEL.get(config["model"]["name"], config["model"]["name"])
        graph = "w/ Graph" if config["model"].get("graph_enabled") else "w/o Graph"
        rows.append({"name": f"{label} {graph}", "metrics": metrics})
    return rows


def _table(key: str, title: str, rows: List[Dict], columns: List[str], metric, last: str, last_metric) -> Table:
    """One row per (job, overlap criterion): the per-type ``metric(type, suffix)`` columns, then ``last``."""
    cells = [[row["name"], criterion, *[row["metrics"].get(metric(c, suffix), float("nan")) for c in columns],
              row["metrics"].get(last_metric(suffix), float("nan"))]
             for row in rows for criterion, suffix in CRITERIA]
    return Table(key, title, ["", "", *columns, last], cells)


def multitype_tables(sweep_dir: Path) -> Dict[str, str]:
    """Markdown of Table III (AP@[.5:.95] per type) and Table IV (sensitivity at 4 FPPI per type)."""
    rows = _jobs(sweep_dir)
    if not rows:
        raise MissingFileError(f"no */results.json under {sweep_dir}: did the sweep's jobs finish?")
    types = list(LESION_TYPE_ABBR)
    tables = [_table("table3", "Class AP@[.5:.95] (Table III)", rows, types, lambda t, s: f"AP{s}-{t}", "mAP",
                     lambda s: f"AP{s}"),
              _table("table4", "Sensitivity (%) at 4 FPPI (Table IV)", rows, types, lambda t, s: f"sens{s}@4-{t}",
                     "Recall", lambda s: f"recall{s}")]
    return {f"{t.key}.md": to_markdown(f"Multi-type detection: {sweep_dir.name}", [t]) for t in tables}


class WriteMultitypeTables(Callback):
    """Hydra callback: after a multirun, write the paper-style tables into the sweep directory."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        for name, text in multitype_tables(sweep_dir).items():
            (sweep_dir / name).write_text(text)
            logger.info(f"{sweep_dir / name}:\n{text}")
