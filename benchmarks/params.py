"""Parameters (total / backbone / head / graph) of FPN-R50, FSD backbone + FC head and FSD, laid out like the paper's
Table I, and of the two graph models of Table III.

    python benchmarks/params.py                      # the example genotypes in projects/DeepLesion/genotypes
    python benchmarks/params.py --genotype-bone outputs/search_bone/<run>/genotype_bone.yaml \\
        --genotype-head outputs/search_head/<run>/genotype_head.yaml --flops --latency

Each model is built exactly as ``+stage=train model=<fpn_r50|fsd_bone|fsd>`` builds it (binary detection,
one class). The "w/ graph" rows are built as ``+stage=finetune_graph model=<fpn_r50|fsd>`` builds them: 8 lesion
types and the region-aware graph module. Backbone = ``model.backbone`` including the FPN; head = everything else
(RPN, box head, box predictor, graph); graph = the graph's own parameters (``roi_heads.graph*``: relation maps, σ
and its part of the classifier), the same on both heads by design. The paper's column is Table I's
"# of parameters" (millions); the paper gives none for its graph models.
On one ``--size`` x ``--size`` image (default 512, the paper's short side) in inference mode:
``--flops`` adds fvcore's GFLOPs (a multiply-add counts as one) and ``--latency`` the median time of a forward
pass over ``--repeats`` after one warm-up (synchronised on CUDA), with its ratio to FPN-R50 measured in the
same run, the models timed in turn on each repeat. ``--deploy`` adds the time of the inference form that ``+stage=eval`` runs (``model.deploy=true``:
BatchNorm folded into the FSD cells' convolutions, channels-last on CPU, see ``fsd_d2.modeling.deploy``), with
its ratio to the deployed FPN-R50. Both depend on the number of proposals, the config's POST_NMS_TOPK_TEST
(``--proposals`` sets it for every model), which an untrained RPN fills, so every model's ROI heads see the
same count.
``--solve-widths`` finds the default widths instead: the FSD backbone's cell width (a multiple of 8) whose
"FSD backbone + FC head" lands nearest Table I's 37.8M, then the head's cell width whose FSD lands nearest 24.7M
(the FC head is Detectron2's, so the two totals fix the two widths). With ``--experiment`` (an experiment's narrow
networks, e.g. ``study_small``) it keeps the paper's size relation instead: 37.8 / 39.5 and 24.7 / 39.5 of that
experiment's FPN-R50.
Progress goes to stderr, the Markdown table to stdout.
"""
import argparse
import copy
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from _models import EXAMPLE_GENOTYPES, build, compose_cfg, default_device, median_seconds_each
from fsd_d2.config import apply_num_classes
from fsd_d2.data.deeplesion import LESION_TYPES
from fsd_d2.engine.widths import WIDTH_STEP, nearest_width
from fsd_d2.evaluation.params import count_parameters, gflops, one_image
from fsd_d2.modeling.deploy import deploy_

# (row label, model config, with the graph (8 lesion types), the paper's Table I parameter count in millions)
ROWS = [
    ("FPN-R50 (R50 + FC head)", "fpn_r50", False, 39.5),
    ("FSD backbone + FC head", "fsd_bone", False, 37.8),
    ("FSD (FSD backbone + FSD head)", "fsd", False, 24.7),
    ("FPN-R50 w/ graph (8 types)", "fpn_r50", True, None),
    ("FSD w/ graph (8 types)", "fsd", True, None),
]
FSD_BONE_ROW, FSD_ROW = 1, 2  # the binary FSD rows, compared with FPN-R50 (row 0)
PAPER_TOLERANCE = 0.05  # the default widths put both FSD rows within 5 % of the paper's counts


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--genotype-bone", type=Path, default=EXAMPLE_GENOTYPES / "example_bone.yaml",
                   help="genotype_bone.yaml of the FSD backbone (default: the hand-written example)")
    p.add_argument("--genotype-head", type=Path, default=EXAMPLE_GENOTYPES / "example_head.yaml",
                   help="genotype_head.yaml of the FSD head (default: the hand-written example)")
    p.add_argument("--tiny", action="store_true", help="experiment=tiny's narrow widths (fast smoke test)")
    p.add_argument("--experiment", default="", help="build every model with +experiment=<this> (e.g. study_small)")
    p.add_argument("--flops", action="store_true", help="also count GFLOPs per image (slow on CPU)")
    p.add_argument("--latency", action="store_true", help="also time one inference pass per image")
    p.add_argument("--size", type=int, default=512, help="image side for --flops/--latency (default 512, the paper's)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes for --latency after 1 warm-up (median shown)")
    p.add_argument("--deploy", action="store_true", help="with --latency: also time each model's deployed form")
    p.add_argument("--proposals", type=int, help="test proposals per image for every model (default: the config's)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="where --latency runs (default: cuda if available)")
    p.add_argument("--solve-widths", action="store_true",
                   help="find the cell widths whose FSD rows come nearest the paper's counts (prints them)")
    args = p.parse_args(argv)
    args.device = args.device or default_device()
    if args.repeats < 1 or args.size < 32 or (args.proposals is not None and args.proposals < 1):
        p.error("--repeats and --proposals must be >= 1 and --size >= 32")
    if args.deploy and not args.latency:
        p.error("--deploy times the deployed models: add --latency")
    for flag, path in (("--genotype-bone", args.genotype_bone), ("--genotype-head", args.genotype_head)):
        if not path.is_file():
            p.error(f"{flag} {path}: no such file (a genotype written by +stage=search_bone / search_head)")
    return args


def latency_ms(models: Dict[str, torch.nn.Module], size: int, repeats: int, device: str) -> Dict[str, float]:
    """Median milliseconds of one inference pass of each model on a ``size`` x ``size`` image, after one warm-up
    pass, the models timed in turn (so their ratios hold on a shared machine)."""
    inputs = one_image(size, device)
    for model in models.values():
        model.eval()
    with torch.no_grad():
        seconds = median_seconds_each({label: (lambda m=m: m(inputs)) for label, m in models.items()}, repeats,
                                      device == "cuda")
    return {label: 1000 * s for label, s in seconds.items()}


def build_row_model(model_name: str, with_graph: bool, genotype_bone: Path, genotype_head: Path,
                    overrides: Sequence[str] = (), *, tiny: bool = False, experiment: str = "",
                    device: str = "cpu") -> torch.nn.Module:
    """A row's model as ``+stage=train`` (``finetune_graph`` with the graph) builds ``model=<model_name>``."""
    genotypes = {"fpn_r50": [], "fsd_bone": [f"model.genotype_bone='{genotype_bone.resolve()}'"]}
    genotypes["fsd"] = genotypes["fsd_bone"] + [f"model.genotype_head='{genotype_head.resolve()}'"]
    cfg = compose_cfg("finetune_graph" if with_graph else "train", model_name, [*genotypes[model_name], *overrides],
                      tiny=tiny, experiment=experiment, device=device)
    if with_graph:
        apply_num_classes(cfg, len(LESION_TYPES))  # what the stage takes from the 8-type splits
    return build(cfg)


def paper_relation(genotype_bone: Path, genotype_head: Path, experiment: str) -> Tuple[float, float]:
    """Table I's FSD totals scaled to the FPN-R50 of ``experiment``: the paper's size relation at its widths."""
    fpn = count_parameters(build_row_model("fpn_r50", False, genotype_bone, genotype_head,
                                           experiment=experiment))["total"]
    return tuple(fpn * ROWS[row][3] / ROWS[0][3] for row in (FSD_BONE_ROW, FSD_ROW))


def solve_widths(genotype_bone: Path, genotype_head: Path, *, tiny: bool = False, experiment: str = "",
                 targets: Sequence[float] = (ROWS[FSD_BONE_ROW][3], ROWS[FSD_ROW][3])) -> Dict[str, int]:
    """The cell widths whose FSD rows come nearest ``targets`` (Table I's 37.8M and 24.7M): the backbone width from
    "FSD backbone + FC head" (the FC head does not depend on it), then the head width from FSD at that backbone."""
    counts: Dict[Tuple[str, int, int], float] = {}

    def total(model_name: str, bone: int, head: int) -> float:
        if (model_name, bone, head) not in counts:
            model = build_row_model(model_name, False, genotype_bone, genotype_head,
                                    [f"model.bone_channels={bone}", f"model.head_channels={head}"], tiny=tiny,
                                    experiment=experiment)
            counts[model_name, bone, head] = count_parameters(model)["total"]
            print(f"params: {model_name} at bone {bone}, head {head}: {counts[model_name, bone, head]:.2f}M",
                  file=sys.stderr)
        return counts[model_name, bone, head]

    bone = nearest_width(lambda w: total("fsd_bone", w, WIDTH_STEP), targets[0])
    head = nearest_width(lambda w: total("fsd", bone, w), targets[1])
    return {"bone_channels": bone, "head_channels": head}


def parameter_table(genotype_bone: Path, genotype_head: Path, *, tiny: bool = False, experiment: str = "",
                    flops: bool = False, latency: bool = False, size: int = 512, repeats: int = 5,
                    device: str = "cpu", deploy: bool = False, proposals: Optional[int] = None) -> List[Dict]:
    """One dict per row of :data:`ROWS`: model, total, backbone, head (millions), graph_params (exact count, None
    without graph), paper (None where the paper gives none), ratio[, gflops][, latency_ms, latency_ratio]
    [, deployed_ms, deployed_ratio]."""
    rows, timed = [], {}
    for label, model_name, with_graph, paper in ROWS:
        extra = [] if proposals is None else [f"model.test_proposals={proposals}"]
        print(f"params: building {label} ...", file=sys.stderr)
        model = build_row_model(model_name, with_graph, genotype_bone, genotype_head, extra, tiny=tiny,
                                experiment=experiment, device=device)
        graph = sum(p.numel() for name, p in model.named_parameters() if name.startswith("roi_heads.graph"))
        row = {"model": label, **count_parameters(model), "graph_params": graph if with_graph else None,
               "paper": paper}
        if flops:
            print(f"params: counting FLOPs of {label} at {size} px ...", file=sys.stderr)
            row["gflops"] = gflops(model, size)
        if latency:
            timed[label] = model
        if latency and deploy:
            timed[f"{label}, deployed"] = deploy_(copy.deepcopy(model))
        rows.append(row)
    for row in rows:
        row["ratio"] = row["total"] / rows[0]["total"]
    if latency:
        print(f"params: timing {len(timed)} models in turn at {size} px on {device} ...", file=sys.stderr)
        ms, unit = latency_ms(timed, size, repeats, device), rows[0]["model"]
        for row in rows:
            row["latency_ms"], row["latency_ratio"] = ms[row["model"]], ms[row["model"]] / ms[unit]
            if deploy:
                deployed = ms[f"{row['model']}, deployed"]
                row["deployed_ms"], row["deployed_ratio"] = deployed, deployed / ms[f"{unit}, deployed"]
    return rows


def format_table(rows: List[Dict]) -> str:
    flops, latency, deployed = "gflops" in rows[0], "latency_ms" in rows[0], "deployed_ms" in rows[0]
    head = ["model", "total (M)", "backbone (M)", "head (M)", "graph (M)", "x FPN-R50", "paper total (M)", "x paper"]
    head += (["GFLOPs"] if flops else []) + (["ms / image", "time x FPN-R50"] if latency else [])
    head += ["deployed ms / image", "deployed time x FPN-R50"] if deployed else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        graph = "–" if r["graph_params"] is None else f"{r['graph_params'] / 1e6:.2f}"
        paper, of_paper = ("–", "–") if r["paper"] is None else (f"{r['paper']:.1f}", f"{r['total'] / r['paper']:.3f}")
        cells = [r["model"], f"{r['total']:.2f}", f"{r['backbone']:.2f}", f"{r['head']:.2f}", graph,
                 f"{r['ratio']:.2f}", paper, of_paper] + ([f"{r['gflops']:.3g}"] if flops else [])
        cells += [f"{r['latency_ms']:.1f}", f"{r['latency_ratio']:.2f}"] if latency else []
        cells += [f"{r['deployed_ms']:.1f}", f"{r['deployed_ratio']:.2f}"] if deployed else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    args = parse_args(argv)
    if args.solve_widths:
        targets = ((ROWS[FSD_BONE_ROW][3], ROWS[FSD_ROW][3]) if not args.experiment else
                   paper_relation(args.genotype_bone, args.genotype_head, args.experiment))
        widths = solve_widths(args.genotype_bone, args.genotype_head, tiny=args.tiny, experiment=args.experiment,
                              targets=targets)
        print(f"Widths nearest {', '.join(f'{t:.2f}M' for t in targets)} (Table I's counts"
              f"{', scaled to this FPN-R50' if args.experiment else ''}; multiples of {WIDTH_STEP}; genotypes "
              f"{os.path.relpath(args.genotype_bone)}, {os.path.relpath(args.genotype_head)}): "
              + " ".join(f"model.{k}={v}" for k, v in widths.items()))
        return [widths]
    rows = parameter_table(args.genotype_bone, args.genotype_head, tiny=args.tiny, experiment=args.experiment,
                           flops=args.flops, latency=args.latency, size=args.size, repeats=args.repeats,
                           device=args.device, deploy=args.deploy, proposals=args.proposals)
    flops = f" GFLOPs: one {args.size}x{args.size} image (fvcore, multiply-add = 1)." if args.flops else ""
    if args.latency:
        where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
        proposals = args.proposals or "the config's"
        flops += (f" Time: one {args.size}x{args.size} image, inference, median of {args.repeats} after 1 warm-up, "
                  f"{where}, torch {torch.__version__}, {proposals} test proposals.")
        flops += " Deployed: model.deploy=true's inference form, ratio to the deployed FPN-R50." if args.deploy else ""
    widths = " (tiny widths)" if args.tiny else f" (+experiment={args.experiment})" if args.experiment else ""
    print(f"Parameters in millions{widths}; backbone = model.backbone incl. FPN, "
          f"head = the rest (RPN + ROI heads), graph = roi_heads.graph* (part of head). "
          f"Genotypes: {os.path.relpath(args.genotype_bone)}, "
          f"{os.path.relpath(args.genotype_head)}.{flops}\n")
    print(format_table(rows))
    graphs = ", ".join(f"{r['model']} {r['graph_params']:,}" for r in rows if r["graph_params"] is not None)
    print(f"\nGraph module parameters: {graphs} (they depend on model.graph_dim, not on the box head)")
    print(f"\nFSD / FPN-R50 = {rows[FSD_ROW]['ratio']:.2f} (paper {ROWS[FSD_ROW][3] / ROWS[0][3]:.2f}); "
          f"x paper: each total over Table I's count (the default widths put both FSD rows within "
          f"{PAPER_TOLERANCE:.0%} of it with the example genotypes, benchmarks/params.py --solve-widths)")
    return rows


if __name__ == "__main__":
    main()
