"""Does the search pay? A study of arms over seeds: ``python -m fsd_d2.run --multirun +experiment=study_small``.

An arm (``+arm=<name>``, ``conf/arm/``) is one way of building the detector: the hand-designed FPN-R50, FSD with
both cells searched by DARTS (plain, latency-aware, with a collapse remedy), or FSD with both cells drawn at random
from the same spaces (:mod:`fsd_d2.engine.random_arch`). A study sweeps arms x seeds on the same data, with the
same schedule, optimizer, image size and test proposals: only the architecture differs (Li & Talwalkar 2019,
Yang et al. 2020: an architecture search has to beat random architectures from its own space, over seeds).

When the sweep ends, :class:`StudySummary` writes the sweep summary (it is one) and, from the same jobs:
``study.md`` (the paper's Table I layout: per arm and detector, parameters, GFLOPs, deployed CPU latency at the
study's proposals, sensitivity at 0.5-16 FPPI and mAP as mean ± std over seeds, search cost, skip connections of
the derived cells), the paired differences searched − random and searched − FPN-R50 per seed, ``study_sens4.png``
(sensitivity at 4 FPPI per arm, each seed a dot), and with W&B one run of job type ``study`` in the sweep's group.
"""
import json
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from matplotlib.figure import Figure
from omegaconf import DictConfig

from fsd_d2.config import base_cfg
from fsd_d2.engine.checkpoint import AtomicCheckpointer
from fsd_d2.engine.sweep import Job, SweepSummary
from fsd_d2.engine.timing import median_ms_each
from fsd_d2.evaluation.metrics import FPPI_POINTS
from fsd_d2.evaluation.params import gflops, one_image
from fsd_d2.evaluation.report import Table, to_markdown
from fsd_d2.modeling.deploy import deploy_
from fsd_d2.viz import save_figure

logger = logging.getLogger(__name__)
KINDS = ("baseline", "searched", "random")  # what an arm is: hand-designed, searched, drawn at random
SEARCH_STAGES = ("profile_bone", "profile_head", "search_bone", "search_head", "random_bone", "random_head")
METRICS = (*[f"sens@{p:g}" for p in FPPI_POINTS], "AP")  # mean ± std over seeds, in this order


@dataclass
class Detector:
    """One trained detector of a study job: the FSD arms train two (FSD backbone + FC head, then FSD)."""

    arm: str
    kind: str  # of KINDS
    label: str  # FPN-R50, FSD backbone + FC head, FSD
    final: bool  # the arm's detector that the paired differences and the plot compare (its last)
    seed: int
    run_dir: Path  # holds its d2_config.yaml and model_final.pth
    metrics: Dict[str, float]
    search_seconds: float = 0.0  # the job's search stages (profiling included)
    skip_connections: Optional[int] = None  # in the derived cells (bone + head)
    cost: Dict[str, float] = field(default_factory=dict)  # gflops, latency_ms


def _bbox(results: Dict, split: str) -> Dict[str, float]:
    return dict(results.get(split, {}).get("bbox", {}))


def job_detectors(job: Job, job_dir: Path) -> List[Detector]:
    """The detectors a finished study job trained, with their test metrics: a train job's one, a pipeline's two."""
    arm = job.config.get("arm", {})
    seed = int(job.config.get("seed", 0))
    results = json.loads((job_dir / "results.json").read_text())
    if "stages" not in results:  # +stage=train: the baseline
        return [Detector(arm["name"], arm["kind"], arm.get("label", "FPN-R50"), True, seed, job_dir,
                         _bbox(results, job.split))]
    stages, by_stage = {k: Path(v) for k, v in results["stages"].items()}, results["results"]
    searched = [by_stage[s] for s in SEARCH_STAGES if s in by_stage]
    skips = sum(r["op_counts"]["skip_connections"] for r in searched if "op_counts" in r)
    common = dict(search_seconds=sum(r.get("wall_seconds", 0.0) for r in searched), skip_connections=skips)
    return [Detector(arm["name"], arm["kind"], "FSD backbone + FC head", False, seed, stages["train_bone"],
                     _bbox(by_stage["train_bone"], job.split), **common),
            Detector(arm["name"], arm["kind"], "FSD", True, seed, stages["train_fsd"],
                     _bbox(by_stage["eval"], job.split), **common)]


def load_detector(run_dir: Path) -> Tuple[CfgNode, torch.nn.Module]:
    """The deployed detector a run trained, built from the run's own config on the CPU."""
    cfg = base_cfg()
    cfg.merge_from_file(str(run_dir / "d2_config.yaml"), allow_unsafe=False)
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    AtomicCheckpointer(model).load_matching(str(run_dir / "model_final.pth"))
    return cfg, deploy_(model)


def measure_costs(detectors: Sequence[Detector], repeats: int = 5) -> None:
    """GFLOPs and deployed CPU latency of each detector on one image of its short side, the models timed in turn
    (so their ratios hold on a shared machine), every one with the study's test proposals."""
    models, sizes = {}, {}
    for i, det in enumerate(detectors):
        cfg, models[i] = load_detector(det.run_dir)
        sizes[i] = det.cost["size"] = cfg.INPUT.SHORT_SIDE
        det.cost["gflops"] = gflops(models[i], sizes[i])
    calls = {i: (lambda m=m, x=one_image(sizes[i], "cpu"): m(x)) for i, m in models.items()}
    for i, ms in median_ms_each(calls, "cpu", warmup=1, repeats=repeats).items():
        detectors[i].cost["latency_ms"] = ms


def _spread(values: Sequence[float]) -> str:
    """``mean ± sample std`` (``mean`` alone for one value)."""
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ± {statistics.stdev(values):.2f}"


def _groups(detectors: Sequence[Detector]) -> Dict[Tuple[str, str], List[Detector]]:
    """Detectors by (arm, label): the arms by kind (the baseline first) and then in the sweep's order, each arm's
    final detector last (Table I's order)."""
    arms = list(dict.fromkeys(d.arm for d in detectors))
    groups: Dict[Tuple[str, str], List[Detector]] = {}
    for det in sorted(detectors, key=lambda d: (KINDS.index(d.kind), arms.index(d.arm), d.final)):
        groups.setdefault((det.arm, det.label), []).append(det)
    return groups


def study_table(detectors: Sequence[Detector]) -> Table:
    """Table I's layout, one row per arm and detector, every number over the seeds."""
    groups = _groups(detectors)
    baseline = [d.cost["latency_ms"] for d in detectors if d.kind == "baseline" and "latency_ms" in d.cost]
    base_ms = statistics.fmean(baseline) if baseline else None
    rows = []
    for (arm, label), dets in groups.items():
        ms = [d.cost["latency_ms"] for d in dets if "latency_ms" in d.cost]
        skips = [d.skip_connections for d in dets if d.skip_connections is not None]
        rows.append([arm, label, len(dets), _spread([d.metrics["params_total"] for d in dets]),
                     _spread([d.cost["gflops"] for d in dets if "gflops" in d.cost]), _spread(ms),
                     "-" if base_ms is None or not ms else f"{statistics.fmean(ms) / base_ms:.2f}",
                     *[_spread([d.metrics[m] for d in dets if m in d.metrics]) for m in METRICS],
                     _spread([d.search_seconds / 60 for d in dets]) if dets[0].kind != "baseline" else "-",
                     _spread(skips) if skips else "-"])
    header = ["arm", "detector", "seeds", "params (M)", "GFLOPs", "latency (ms)", "x FPN-R50",
              *[f"sens@{p:g}" for p in FPPI_POINTS], "mAP", "search (min)", "skips"]
    return Table("study", "Arms over seeds (Table I layout): mean ± std", header, rows)


def paired_differences(detectors: Sequence[Detector], metric: str = "sens@4") -> Table:
    """Per seed, each searched arm's FSD minus the mean of that seed's random FSDs, and minus that seed's FPN-R50:
    differences paired by seed take out what the seed does to every arm (its data order, its initialisation)."""
    fsd = [d for d in detectors if d.final and metric in d.metrics]
    seeds = sorted({d.seed for d in fsd})
    by = {(d.kind, d.arm, d.seed): d.metrics[metric] for d in fsd}
    random = {s: [v for (k, _, seed), v in by.items() if k == "random" and seed == s] for s in seeds}
    baseline = {seed: v for (k, _, seed), v in by.items() if k == "baseline"}
    baseline_name = next((d.arm for d in fsd if d.kind == "baseline"), "baseline")
    rows = []
    for arm in dict.fromkeys(a for (k, a, _) in by if k == "searched"):
        for other, reference in (("random", {s: statistics.fmean(v) for s, v in random.items() if v}),
                                 (baseline_name, baseline)):
            diffs = {s: by[("searched", arm, s)] - reference[s] for s in seeds
                     if ("searched", arm, s) in by and s in reference}
            rows.append([f"{arm} − {other}", *[f"{diffs[s]:+.2f}" if s in diffs else "-" for s in seeds],
                         _spread(list(diffs.values()))])
    return Table(f"pairs_{metric.replace('@', '')}", f"Paired by seed: {metric} of each searched FSD minus the mean of "
                 f"the random FSDs and minus the baseline", ["", *[f"seed {s}" for s in seeds], "mean ± std"], rows)


def plot_metric(detectors: Sequence[Detector], path: Path, metric: str = "sens@4") -> Path:
    """``metric`` per arm's final detector, each seed a dot and the mean a bar."""
    groups = {key: dets for key, dets in _groups(detectors).items() if dets[0].final}
    fig = Figure(figsize=(1.2 + 1.1 * len(groups), 3.6))
    ax = fig.subplots()
    for x, ((arm, _), dets) in enumerate(groups.items()):
        values = [d.metrics[metric] for d in dets if metric in d.metrics]
        ax.scatter([x] * len(values), values, zorder=3)
        if values:
            ax.hlines(statistics.fmean(values), x - 0.3, x + 0.3, colors="k")
    ax.set_xticks(range(len(groups)), [arm for arm, _ in groups], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{metric} of each arm's detector, one dot per seed, bar = mean", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    return save_figure(fig, path)


class StudySummary(SweepSummary):
    """The sweep summary of a study, plus its Table I, the paired differences and the plot (see the module), logged
    to W&B as one run of job type ``study``."""

    job_type = "study"

    def extend(self, config: DictConfig, sweep_dir: Path, jobs: Sequence[Job]) -> Tuple[List[Table], Dict[str, Path]]:
        detectors = [det for job in jobs if not job.error and job.config.get("arm")
                     for det in job_detectors(job, sweep_dir / job.name)]
        if not detectors:
            logger.warning(f"study: no finished arm in {sweep_dir}; no study table")
            return [], {}
        logger.info(f"study: measuring GFLOPs and deployed CPU latency of {len(detectors)} detectors in turn")
        measure_costs(detectors)
        tables = [study_table(detectors), paired_differences(detectors), paired_differences(detectors, "AP")]
        path = sweep_dir / "study.md"
        path.write_text(to_markdown(f"Study {sweep_dir.name}", tables, study_notes(detectors)))
        logger.info(f"study: {path}\n{path.read_text()}")
        return tables, {"study/sens4": plot_metric(detectors, sweep_dir / "study_sens4.png")}


def study_notes(detectors: Sequence[Detector]) -> List[str]:
    """What the numbers are, under the title of ``study.md``."""
    seeds = sorted({d.seed for d in detectors})
    size = {d.cost.get("size") for d in detectors}
    return [f"Seeds {seeds}; metrics of the test split in percent, mean ± sample standard deviation over the seeds "
            f"(a spread of one seed is not shown). Latency: the deployed model on one {'/'.join(map(str, size))}-px "
            f"image on this machine's CPU, the models timed in turn, every arm with the same test proposals; "
            f"x FPN-R50 against the mean of the baseline's seeds. Search (min): the wall time of the arm's search "
            f"stages (op profiling included), beside the training budget, which is every arm's own. Skips: skip "
            f"connections in the derived (or drawn) backbone and head cells."]
