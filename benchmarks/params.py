"""Parameters (total / backbone / head) of FPN-R50, FSD backbone + FC head and FSD, laid out like the paper's Table I.

    python benchmarks/params.py                      # the example genotypes in projects/DeepLesion/genotypes
    python benchmarks/params.py --genotype-bone outputs/search_bone/<run>/genotype_bone.yaml \\
        --genotype-head outputs/search_head/<run>/genotype_head.yaml --flops

Each model is built exactly as ``+stage=train model=<fpn_r50|fsd_bone|fsd>`` builds it (binary detection,
one class). Backbone = ``model.backbone`` including the FPN; head = everything else (RPN, box head, box
predictor). ``--flops`` adds fvcore's count for one 512 x 512 image in inference mode (a multiply-add counts
as one; it depends on the number of proposals, here the config's POST_NMS_TOPK_TEST, which an untrained
RPN fills). The paper's column is Table I's "# of parameters" (millions).
Progress goes to stderr, the Markdown table to stdout.
"""
import argparse
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from _models import EXAMPLE_GENOTYPES, build, compose_cfg
from fsd_d2.evaluation.params import count_parameters

# (row label, model config, the paper's Table I parameter count in millions)
ROWS = [
    ("FPN-R50 (R50 + FC head)", "fpn_r50", 39.5),
    ("FSD backbone + FC head", "fsd_bone", 37.8),
    ("FSD (FSD backbone + FSD head)", "fsd", 24.7),
]
FSD_MAX_RATIO = 0.65  # issue 6: FSD at the default width has at most 0.65x FPN-R50's parameters (paper: 0.63)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--genotype-bone", type=Path, default=EXAMPLE_GENOTYPES / "example_bone.yaml",
                   help="genotype_bone.yaml of the FSD backbone (default: the hand-written example)")
    p.add_argument("--genotype-head", type=Path, default=EXAMPLE_GENOTYPES / "example_head.yaml",
                   help="genotype_head.yaml of the FSD head (default: the hand-written example)")
    p.add_argument("--tiny", action="store_true", help="experiment=tiny's narrow widths (fast smoke test)")
    p.add_argument("--flops", action="store_true", help="also count GFLOPs per image (slow on CPU)")
    p.add_argument("--flops-size", type=int, default=512, help="image side for --flops (default 512, the paper's)")
    args = p.parse_args(argv)
    for flag, path in (("--genotype-bone", args.genotype_bone), ("--genotype-head", args.genotype_head)):
        if not path.is_file():
            p.error(f"{flag} {path}: no such file (a genotype written by +stage=search_bone / search_head)")
    return args


def gflops(model: torch.nn.Module, size: int) -> float:
    """fvcore's GFLOPs of ``model`` on one ``size`` x ``size`` image, in inference mode."""
    from detectron2.utils.analysis import FlopCountAnalysis

    image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        count = FlopCountAnalysis(model, [{"image": image, "height": size, "width": size}])
        return count.unsupported_ops_warnings(False).uncalled_modules_warnings(False).total() / 1e9


def parameter_table(genotype_bone: Path, genotype_head: Path, *, tiny: bool = False,
                    flops_size: int = 0) -> List[Dict]:
    """One dict per row of :data:`ROWS`: model, total, backbone, head (millions), paper, ratio[, gflops]."""
    rows = []
    for label, model_name, paper in ROWS:
        overrides = [] if model_name == "fpn_r50" else [f"model.genotype_bone='{genotype_bone.resolve()}'"]
        if model_name == "fsd":
            overrides.append(f"model.genotype_head='{genotype_head.resolve()}'")
        print(f"params: building {label} ...", file=sys.stderr)
        model = build(compose_cfg("train", model_name, overrides, tiny=tiny))
        row = {"model": label, **count_parameters(model), "paper": paper}
        if flops_size:
            print(f"params: counting FLOPs of {label} at {flops_size} px ...", file=sys.stderr)
            row["gflops"] = gflops(model, flops_size)
        rows.append(row)
    for row in rows:
        row["ratio"] = row["total"] / rows[0]["total"]
    return rows


def format_table(rows: List[Dict]) -> str:
    flops = "gflops" in rows[0]
    head = ["model", "total (M)", "backbone (M)", "head (M)", "x FPN-R50", "paper total (M)"]
    head += ["GFLOPs"] if flops else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], f"{r['total']:.2f}", f"{r['backbone']:.2f}", f"{r['head']:.2f}", f"{r['ratio']:.2f}",
                 f"{r['paper']:.1f}"] + ([f"{r['gflops']:.3g}"] if flops else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    args = parse_args(argv)
    rows = parameter_table(args.genotype_bone, args.genotype_head, tiny=args.tiny,
                           flops_size=args.flops_size if args.flops else 0)
    flops = f" GFLOPs: one {args.flops_size}x{args.flops_size} image (fvcore, multiply-add = 1)." if args.flops else ""
    print(f"Parameters in millions{' (tiny widths)' if args.tiny else ''}; backbone = model.backbone incl. FPN, "
          f"head = the rest (RPN + ROI heads). Genotypes: {os.path.relpath(args.genotype_bone)}, "
          f"{os.path.relpath(args.genotype_head)}.{flops}\n")
    print(format_table(rows))
    fsd, paper = rows[-1], ROWS[-1][2] / ROWS[0][2]
    print(f"\nFSD / FPN-R50 = {fsd['ratio']:.2f} (paper {paper:.2f}; at the default width it should be <= "
          f"{FSD_MAX_RATIO})")
    return rows


if __name__ == "__main__":
    main()
