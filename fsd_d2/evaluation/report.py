"""The evaluator's flat metric dict laid out like the paper's Tables I-IV: :class:`Table` rows and the one
Markdown writer of the project (evaluation reports and sweep tables alike)."""
from typing import Dict, List, NamedTuple, Sequence

import numpy as np
from matplotlib.figure import Figure

from fsd_d2.evaluation.metrics import FPPI_POINTS

CRITERIA = (("IoU", ""), ("IoBB", "_iobb"))  # (row label, metric-key suffix)


class Table(NamedTuple):
    key: str  # short name for W&B
    title: str
    header: List[str]
    rows: List[List]  # label cells first, then numbers


class EvaluationReport(NamedTuple):
    """What an evaluation shows besides its numbers, for a logger to pick up."""

    tables: List[Table]
    froc: Figure
    drawings: List[str]  # PNG paths of images with ground truth and detections


def paper_tables(metrics: Dict[str, float], type_abbr: Sequence[str] = ()) -> List[Table]:
    """Table I (mAP, + recall and parameters), Table II (sensitivity at 0.5..16 FPPI) and, when ``type_abbr`` is
    given, Table III (AP per lesion type, mAP) and Table IV (sensitivity at 4 FPPI per type, recall)."""
    tables = [
        Table("table1", "mAP and recall @[.5:.95] (Table I)", ["", "mAP@[.5:.95]", "Recall@[.5:.95]"],
              [[c, metrics[f"AP{s}"], metrics[f"recall{s}"]] for c, s in CRITERIA]),
        Table("table2", "Sensitivity (%) at FPs per image (Table II)", ["", *[f"{p:g}" for p in FPPI_POINTS]],
              [[c, *[metrics[f"sens{s}@{p:g}"] for p in FPPI_POINTS]] for c, s in CRITERIA]),
    ]
    if "params_total" in metrics:
        tables.insert(1, Table("params", "# of parameters (M)", ["", "total", "backbone", "head"],
                               [["params", metrics["params_total"], metrics["params_backbone"],
                                 metrics["params_head"]]]))
    if type_abbr:
        tables += [
            Table("table3", "Class AP@[.5:.95] (Table III)", ["", *type_abbr, "mAP"],
                  [[c, *[metrics[f"AP{s}-{t}"] for t in type_abbr], metrics[f"AP{s}"]] for c, s in CRITERIA]),
            Table("table4", "Sensitivity (%) at 4 FPPI (Table IV)", ["", *type_abbr, "Recall"],
                  [[c, *[metrics[f"sens{s}@4-{t}"] for t in type_abbr], metrics[f"recall{s}"]] for c, s in CRITERIA]),
        ]
    return tables


def _cell(v) -> str:
    return f"{v:.2f}" if isinstance(v, (float, np.floating)) else str(v)


def to_markdown(title: str, tables: Sequence[Table], notes: Sequence[str] = ()) -> str:
    lines = [f"# {title}", "", *notes]
    for t in tables:
        lines += ["", f"## {t.title}", "", "| " + " | ".join(t.header) + " |", "|" + "---|" * len(t.header)]
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in t.rows]
    return "\n".join(lines) + "\n"
