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


def _table(rows: List[Dict], columns: List[str], key, last: str, last_key) -> str:
    head = ["", "", *columns, last]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        for overlap in ("IoU", "IoBB"):
            m = row["metrics"]
            cells = [f"{m.get(key(c, overlap), float('nan')):.2f}" for c in columns]
            lines.append(f"| {row['name']} | {overlap} | " + " | ".join(cells)
                         + f" | {m.get(last_key(overlap), float('nan')):.1f} |")
    return "\n".join(lines) + "\n"


def multitype_tables(sweep_dir: Path) -> Dict[str, str]:
    """Markdown of Table III (AP@[.5:.95] per type) and Table IV (sensitivity at 4 FPPI per type)."""
    rows = _jobs(sweep_dir)
    if not rows:
        raise FileNotFoundError(f"no */results.json under {sweep_dir}: did the sweep's jobs finish?")
    suffix = {"IoU": "", "IoBB": "_iobb"}
    types = list(LESION_TYPE_ABBR)
    return {
        "table3.md": _table(rows, types, lambda t, o: f"AP{suffix[o]}-{t}", "mAP", lambda o: f"AP{suffix[o]}"),
        "table4.md": _table(rows, types, lambda t, o: f"sens{suffix[o]}@4-{t}", "Recall",
                            lambda o: f"recall{suffix[o]}"),
    }


class WriteMultitypeTables(Callback):
    """Hydra callback: after a multirun, write the paper-style tables into the sweep directory."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        for name, text in multitype_tables(sweep_dir).items():
            (sweep_dir / name).write_text(text)
            logger.info(f"{sweep_dir / name}:\n{text}")
