"""The search cells alone, batched against separate candidate ops: forward and backward of the searchable part
of each search model, the two layouts timed in turn on the same input.

    python benchmarks/search_cells.py                       # 256 px, batch 2, 128 ROIs per image
    python benchmarks/search_cells.py --size 128 --tiny     # smoke test

Why apart from ``search_cost.py``: a whole search step also runs the untrained RPN and ROI heads, whose work
depends on the proposals, and the two layouts create their parameters in a different order, so from the same seed
they start from different detector weights and proposals. Here both layouts get the same input and the rest of
the detector is left out: the backbone search's cells behind its ResNet trunk (``backbone.bottom_up``) on
``--size`` images, and the head search's cells (``roi_heads.box_head``) on ``--rois`` pooled features per image.
Rows: milliseconds of one forward + backward (median after one warm-up, the
layouts in turn on every repeat) and the ATen operator calls of one more (``search_cost.operator_calls``).
Progress goes to stderr, the Markdown table to stdout.
"""
import argparse
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch

from _models import EXAMPLE_GENOTYPES, build, compose_cfg, default_device, median_seconds_each
from search_cost import operator_calls

LAYOUTS = {"separate candidate ops": "false", "batched": "true"}  # model.batched_edges; the first is the unit


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="image side of the backbone search (default 256)")
    p.add_argument("--batch", type=int, default=2, help="images per step (default 2)")
    p.add_argument("--rois", type=int, default=128, help="pooled ROIs per image for the head search (default 128; "
                   "a training step samples ROI_HEADS.BATCH_SIZE_PER_IMAGE = 512, whose separate-op graph at the "
                   "default widths outgrows 24 GB)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls after one warm-up; the median is shown")
    p.add_argument("--tiny", action="store_true", help="experiment=tiny's narrow widths (fast smoke test)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's choice)")
    args = p.parse_args(argv)
    args.device = args.device or default_device()
    return args


def _step(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One forward and backward of ``module`` on ``x`` (the sum of its outputs as the loss)."""
    def step():
        out = module(x)
        loss = sum(o.sum() for o in out.values()) if isinstance(out, dict) else out.sum()
        loss.backward()
    return step


def searchable_parts(search: str, args: argparse.Namespace) -> Dict[str, Callable[[], None]]:
    """layout -> one forward + backward of the searchable part of the ``search`` (bone or head) model."""
    steps, x = {}, None
    for layout, batched in LAYOUTS.items():
        # the head search runs on a derived backbone: the example's (its cells are not timed here)
        bone = [f"model.genotype_bone='{EXAMPLE_GENOTYPES / 'example_bone.yaml'}'"] if search == "head" else []
        cfg = compose_cfg(f"search_{search}", f"fsd_search_{search}", [f"model.batched_edges={batched}", *bone],
                          tiny=args.tiny, device=args.device)
        model = build(cfg).train()
        if search == "bone":
            part = model.backbone.bottom_up
            shape = (args.batch, 3, args.size, args.size)
        else:
            part = model.roi_heads.box_head
            res = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
            shape = (args.batch * args.rois, cfg.MODEL.FPN.OUT_CHANNELS, res, res)
        if x is None:
            x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(args.device)
        steps[layout] = _step(part, x)
    return steps


def measure(args: argparse.Namespace) -> List[Dict]:
    rows = []
    for search in ("bone", "head"):
        print(f"search_cells: the {search} search's cells, both layouts in turn ...", file=sys.stderr)
        steps = searchable_parts(search, args)
        ms = {k: 1000 * s for k, s in median_seconds_each(steps, args.repeats, args.device == "cuda").items()}
        calls = {k: operator_calls(step)["aten_calls"] for k, step in steps.items()}
        unit = next(iter(LAYOUTS))
        rows += [{"search": search, "layout": k, "ms": ms[k], "ratio": ms[k] / ms[unit], "calls": calls[k],
                  "calls_ratio": calls[k] / calls[unit]} for k in LAYOUTS]
    return rows


def format_table(rows: List[Dict]) -> str:
    lines = ["| search cells | layout | forward + backward (ms) | x separate | ATen calls | x separate |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['search']} | {r['layout']} | {r['ms']:.1f} | {r['ratio']:.2f} | {r['calls']:,} | "
              f"{r['calls_ratio']:.2f} |" for r in rows]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = measure(args)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} torch threads)"
    print(f"{where}, torch {torch.__version__}{', tiny widths' if args.tiny else ''}; bone cells on {args.batch} "
          f"images of {args.size} px, head cells on {args.rois} pooled ROIs per image; median of {args.repeats} "
          f"after 1 warm-up, the layouts in turn.\n")
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
