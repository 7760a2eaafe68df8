"""Issues 14's and 24's speed targets in one table: inference of FSD against FPN-R50, the search steps against the
FPN-R50 training step and their operator calls, and images/s per data-loader worker, with the ratios measured in
the same run and each target beside its ratio.

    python benchmarks/performance.py                          # CPU: inference at 512 px, steps at 256 px
    python benchmarks/performance.py --aware-bone outputs/.../genotype_bone.yaml \\
        --aware-head outputs/.../genotype_head.yaml          # adds the latency-aware FSD's row
    python benchmarks/performance.py --tiny                   # smoke-test widths, seconds
    python benchmarks/performance.py --inference-only         # the inference rows alone (PyTorch, ONNX Runtime)

Inference: one ``--size`` image, each model in the form ``+stage=eval`` runs (``model.deploy=true``), the models
timed in turn on every repeat, at equal settings: the same image and the same test proposals for every model
(``--proposals``, default ``model.test_proposals``'s 1000, which an untrained RPN fills). The FSD rows use the
example genotypes at the default width (``--genotype-bone/--genotype-head`` for others) and the genotypes of a
search with ``search.latency_target_ms`` (``--targeted-bone/--targeted-head``, default the synthetic set's in
``projects/DeepLesion/genotypes``, target <= 1.0x FPN-R50), and the trained form's row shows what deploying gains.
With onnxruntime installed (the ``export`` extra), the deployed FPN-R50 and FSD also run as the ONNX files
``+stage=export`` writes, in ONNX Runtime on the CPU with as many threads as torch: the same image and proposals (a
file holds its model's config), timed in turn with the PyTorch rows; ONNX Runtime's FPN-R50 is divided by PyTorch's,
its FSD by its FPN-R50. Training: ``search_cost``'s steps (each in a fresh process) at ``--batch`` and twice that,
so images/s shows how the throughput grows with the per-device batch, and the ATen operator calls of one step
(``search_cost.operator_calls``), which a launch-bound GPU step's time follows; the first-order step with its
candidate ops batched (the default) is divided by the same step with separate candidate ops
(``model.batched_edges=false``), target <= 0.5 of the calls; on CUDA also the kernels launched and the GPU's busy
share of the step (``search_cost.cuda_activity``), before (separate) and after (batched). ``--amp`` (CUDA only:
``solver.amp`` is refused on a CPU) adds the FPN-R50 step and both search orders in mixed precision, each against its
float32 row. Data loading (``benchmarks/data_loading.py``'s measurement, its synthetic slices written at ``--size``):
the training mapper's images/s on one thread, as in one data-loader worker, from the raw slices and from the
``prepare`` cache (target >= 150); ``--no-data-loading`` skips it, ``--no-onnx`` the ONNX Runtime rows.
Progress goes to stderr, the Markdown table to stdout.
"""
import argparse
import copy
import importlib.util
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import cv2
import torch

import data_loading
import search_cost
from _models import EXAMPLE_GENOTYPES, build, compose_cfg, default_device, median_seconds_each
from fsd_d2.evaluation.params import one_image
from fsd_d2.modeling.deploy import deploy_

# search_cost.CONFIGS' rows, by name (a row added there does not shift these)
BASELINE_STEP = "FPN-R50 training step (baseline)"
FIRST = "search, first order"
SECOND = "search, second order"
REUSED = "search, second order, reused train gradient"
PARTIAL = "search, second order + partial channels K=4"
NO_OPS = "search, second order, cells of skip connections only"
SEPARATE = "search, first order, separate candidate ops"
CALLS_ROW = "search, first order, ATen calls: batched / separate candidate ops"
RAW, CACHED = data_loading.ROWS[:2]  # the raw slices and the prepare cache
LATENCY_TARGETED = "FSD, latency-targeted genotypes"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--genotype-bone", type=Path, default=EXAMPLE_GENOTYPES / "example_bone.yaml")
    p.add_argument("--genotype-head", type=Path, default=EXAMPLE_GENOTYPES / "example_head.yaml")
    p.add_argument("--aware-bone", type=Path, help="genotype_bone.yaml of a latency-aware search (with --aware-head)")
    p.add_argument("--aware-head", type=Path, help="genotype_head.yaml of a latency-aware search")
    p.add_argument("--targeted-bone", type=Path, default=EXAMPLE_GENOTYPES / "synthetic_latency_target_bone.yaml",
                   help="genotype_bone.yaml of a search with search.latency_target_ms (default: the synthetic set's)")
    p.add_argument("--targeted-head", type=Path, default=EXAMPLE_GENOTYPES / "synthetic_latency_target_head.yaml",
                   help="genotype_head.yaml of a search with search.latency_target_ms (default: the synthetic set's)")
    p.add_argument("--size", type=int, help="inference image side (default 512; 64 with --tiny)")
    p.add_argument("--step-size", type=int, help="training-step image side (default: 512 on CUDA, 256 on CPU, 64 tiny)")
    p.add_argument("--batch", type=int, default=2, help="images per training step (default 2; also timed at 2x)")
    p.add_argument("--proposals", type=int, help="test proposals per image for every model (default: the config's)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after one warm-up; the median is shown")
    p.add_argument("--tiny", action="store_true", help="experiment=tiny's narrow widths (fast smoke test)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's choice)")
    p.add_argument("--amp", action="store_true", help="add mixed-precision training steps (CUDA only)")
    p.add_argument("--inference-only", action="store_true", help="only the inference rows (no training steps, no "
                   "data loading)")
    p.add_argument("--no-data-loading", action="store_true", help="skip the data-loading rows")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime rows (they run on the CPU; "
                   "the torch 2.11 of the GPU machine exports through torch.export, which these detectors do not pass)")
    args = p.parse_args(argv)
    args.device = args.device or default_device()
    if args.amp and args.device != "cuda":
        p.error("--amp needs CUDA: solver.amp is refused on a CPU")
    args.size = args.size or (64 if args.tiny else 512)
    args.step_size = args.step_size or (64 if args.tiny else 512 if args.device == "cuda" else 256)
    if (args.aware_bone is None) != (args.aware_head is None):
        p.error("--aware-bone and --aware-head go together (the latency-aware search's two genotypes)")
    for path in (args.genotype_bone, args.genotype_head, args.aware_bone, args.aware_head, args.targeted_bone,
                 args.targeted_head):
        if path is not None and not path.is_file():
            p.error(f"{path}: no such file (a genotype written by +stage=search_bone / search_head)")
    return args


def _inference_models(args: argparse.Namespace) -> Dict[str, torch.nn.Module]:
    """label -> model in its inference form, every one with the same test proposals; the first is the baseline the
    others are divided by."""
    genotypes = {"example": (args.genotype_bone, args.genotype_head),
                 "latency-targeted": (args.targeted_bone, args.targeted_head)}
    if args.aware_bone:
        genotypes["latency-aware"] = (args.aware_bone, args.aware_head)
    extra = [f"model.test_proposals={args.proposals}"] if args.proposals else []
    fpn_cfg = compose_cfg("train", "fpn_r50", extra, tiny=args.tiny, device=args.device)
    models = {"FPN-R50": deploy_(build(fpn_cfg))}
    for name, (bone, head) in genotypes.items():
        print(f"performance: building FSD ({name} genotypes) ...", file=sys.stderr)
        cfg = compose_cfg("train", "fsd", [f"model.genotype_bone='{bone.resolve()}'",
                                           f"model.genotype_head='{head.resolve()}'", *extra],
                          tiny=args.tiny, device=args.device)
        trained = build(cfg)
        if name == "example":
            models[f"FSD, {name} genotypes, trained form"] = trained
        models[f"FSD, {name} genotypes"] = deploy_(copy.deepcopy(trained))
    return models


ORT = "ONNX Runtime"


def _onnx_runs(models: Dict[str, torch.nn.Module], size: int) -> Dict[str, Callable[[], object]]:
    """``ONNX Runtime, <label>`` -> one run of that deployed model's ONNX file (exported as ``+stage=export`` does,
    on the CPU) on the image the PyTorch rows see; none without onnxruntime."""
    if importlib.util.find_spec("onnxruntime") is None:
        print("performance: no onnxruntime, so no ONNX Runtime rows (pip install -e '.[export]')", file=sys.stderr)
        return {}
    from fsd_d2.modeling.export import export_onnx, tracing_adapter
    from fsd_d2.modeling.predict_exported import ExportedDetector

    image = one_image(size, "cpu")[0]["image"]
    folder = Path(tempfile.mkdtemp(prefix="fsd_bench_onnx_"))
    meta = {"short_side": size, "max_size": size, "spacing_mm": 0.0, "classes": ["lesion"]}
    runs = {}
    for i, label in enumerate(label for label in models if "trained form" not in label):
        print(f"performance: exporting {label} to ONNX ...", file=sys.stderr)
        model = copy.deepcopy(models[label]).to("cpu").eval()
        detector = ExportedDetector(str(export_onnx(tracing_adapter(model, image), folder / f"{i}.onnx", meta)),
                                    threads=torch.get_num_threads())
        runs[f"{ORT}, {label}"] = lambda d=detector: d.network(image.numpy())
    return runs


def inference_rows(args: argparse.Namespace) -> List[Dict]:
    models = _inference_models(args)
    for model in models.values():
        model.eval()
    inputs = one_image(args.size, args.device)
    runs = {label: (lambda m=m: m(inputs)) for label, m in models.items()}
    runs.update({} if args.no_onnx else _onnx_runs(models, args.size))
    print(f"performance: timing {len(runs)} models in turn at {args.size} px ...", file=sys.stderr)
    with torch.no_grad():
        ms = {label: 1000 * s for label, s in median_seconds_each(runs, args.repeats, args.device == "cuda").items()}
    targets = {"FSD, example genotypes": 1.0, LATENCY_TARGETED: 1.0, "FSD, latency-aware genotypes": 0.8}

    def base(label: str) -> str:  # PyTorch's FPN-R50 for PyTorch and for ONNX Runtime's FPN-R50; else the runtime's
        return f"{ORT}, FPN-R50" if label.startswith(ORT) and label != f"{ORT}, FPN-R50" else "FPN-R50"

    return [{"measure": f"inference, {label}", "time": f"{t:.1f} ms", "images_s": 1000 / t, "mem": None,
             "ratio": t / ms[base(label)], "to": base(label),
             "checks": [("time", t / ms[base(label)], "<=", targets[label])] if label in targets else []}
            for label, t in ms.items()]


def step_rows(args: argparse.Namespace) -> List[Dict]:
    def measure(name: str, batch: int, amp: bool = False) -> Dict[str, float]:
        print(f"performance: measuring '{name}' at batch {batch}{' (amp)' if amp else ''} in a fresh process ...",
              file=sys.stderr)
        return search_cost.measure_in_subprocess(name, size=args.step_size, batch=batch, repeats=args.repeats,
                                                 device=args.device, tiny=args.tiny, threads=args.threads, amp=amp)

    steps = {name: measure(name, args.batch) for name in (BASELINE_STEP, FIRST, SEPARATE, SECOND, REUSED, PARTIAL,
                                                          NO_OPS)}
    doubled = {name: measure(name, 2 * args.batch) for name in (BASELINE_STEP, FIRST)}
    mixed = {name: measure(name, args.batch, amp=True) for name in (BASELINE_STEP, FIRST, SECOND)} if args.amp else {}
    # (row, its measurement, batch, divided by, its label, target time ratio, target memory ratio)
    plan = [(BASELINE_STEP, steps[BASELINE_STEP], args.batch, None, "", None, None),
            (FIRST, steps[FIRST], args.batch, steps[BASELINE_STEP], "FPN-R50 step", 3.0, None),
            (SEPARATE, steps[SEPARATE], args.batch, steps[BASELINE_STEP], "FPN-R50 step", None, None),
            (SECOND, steps[SECOND], args.batch, steps[FIRST], "first order", 2.5, None),
            (REUSED, steps[REUSED], args.batch, steps[FIRST], "first order", 2.5, None),
            (PARTIAL, steps[PARTIAL], args.batch, steps[SECOND], "second order", 0.6, 0.5),
            (NO_OPS, steps[NO_OPS], args.batch, steps[SECOND], "second order", None, None),
            (BASELINE_STEP, doubled[BASELINE_STEP], 2 * args.batch, steps[BASELINE_STEP], f"batch {args.batch}",
             None, None),
            (FIRST, doubled[FIRST], 2 * args.batch, steps[FIRST], f"batch {args.batch}", None, None)]
    plan += [(f"{name}, amp", r, args.batch, steps[name], "float32", 1.0, None) for name, r in mixed.items()]
    rows = []
    for name, r, batch, base, to, target, mem_target in plan:
        row = {"measure": f"{name.replace(' (baseline)', '')}, batch {batch}", "time": f"{r['time_s']:.3f} s",
               "images_s": batch / r["time_s"], "mem": r["peak_mb"], "ratio": None, "to": to, "checks": [],
               "calls": r["aten_calls"]}
        if "cuda_kernels" in r:
            row.update(kernels=r["cuda_kernels"], busy=search_cost.gpu_busy(r))
        if base is not None:
            row["ratio"] = r["time_s"] / base["time_s"]
            row["calls_ratio"] = r["aten_calls"] / base["aten_calls"]
            # A peak RSS growth of 0 (tiny sizes on a CPU: the step fit in memory the process held) divides nothing.
            row["mem_ratio"] = r["peak_mb"] / base["peak_mb"] if base["peak_mb"] > 0 else None
            row["checks"] = [(what, value, "<=", limit) for what, value, limit in
                             (("time", row["ratio"], target), ("mem", row["mem_ratio"], mem_target))
                             if limit is not None]
        rows.append(row)
    # Issue 24's operator-call target: the first-order step with its candidate ops batched (the default) over the
    # same step with each candidate its own calls, both measured above.
    first, separate = steps[FIRST], steps[SEPARATE]
    calls_ratio = first["aten_calls"] / separate["aten_calls"]
    rows.append({"measure": f"{CALLS_ROW}, batch {args.batch}", "time": f"{first['time_s']:.3f} s",
                 "images_s": args.batch / first["time_s"], "mem": None, "ratio": first["time_s"] / separate["time_s"],
                 "to": "separate candidate ops", "calls": first["aten_calls"], "calls_ratio": calls_ratio,
                 "checks": [("calls", calls_ratio, "<=", 0.5)]})
    if "cuda_kernels" in first:
        rows[-1].update(kernels=first["cuda_kernels"], kernels_ratio=first["cuda_kernels"] / separate["cuda_kernels"],
                        busy=search_cost.gpu_busy(first))
    return rows


def data_loading_rows(args: argparse.Namespace) -> List[Dict]:
    """Images/s of one data-loader worker (one thread, as ``benchmarks/data_loading.py`` measures it) at the inference
    size, from the raw slices and from the ``prepare`` cache, on the synthetic set written at that size."""
    loading = argparse.Namespace(size=args.size, images=6 if args.tiny else 48, repeats=args.repeats)
    threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="fsd_bench_loading_") as root:
            measured = {r["label"]: r for r in data_loading.measure(loading, root)}
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv2_threads)
    rows = []
    for label, target in ((RAW, None), (CACHED, 150)):
        ms = measured[label]["mapper"]
        rows.append({"measure": f"data loading per worker, {label}", "time": f"{ms:.2f} ms", "images_s": 1000 / ms,
                     "mem": None, "ratio": None, "to": "",
                     "checks": [] if target is None else [("img/s", 1000 / ms, ">=", target)]})
    return rows


def _verdict(row: Dict) -> str:
    checks = [value <= limit if op == "<=" else value >= limit for _, value, op, limit in row["checks"]
              if value is not None]
    return "" if not checks else "yes" if all(checks) else "**no**"


def format_table(rows: List[Dict]) -> str:
    """The Markdown table; the CUDA kernel columns only where a row has them (steps measured on a GPU)."""
    cuda = any("kernels" in r for r in rows)
    lines = ["| measure | time | images/s | peak mem (MB) | time ratio | memory ratio | to | target | met | ATen calls "
             "| calls ratio |" + (" CUDA kernels | kernels ratio | GPU busy |" if cuda else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if cuda else "")]
    for r in rows:
        target = " ".join(f"{what} {op} {limit}" for what, _, op, limit in r["checks"])
        cells = [r["measure"], r["time"], f"{r['images_s']:.2f}", "" if r["mem"] is None else f"{r['mem']:.0f}",
                 "" if r["ratio"] is None else f"{r['ratio']:.2f}",
                 "" if r.get("mem_ratio") is None else f"{r['mem_ratio']:.2f}", r["to"], target, _verdict(r),
                 f"{r['calls']:,}" if "calls" in r else "", "" if r.get("calls_ratio") is None else
                 f"{r['calls_ratio']:.2f}"]
        if cuda:
            cells += [f"{r['kernels']:,}" if "kernels" in r else "",
                      "" if r.get("kernels_ratio") is None else f"{r['kernels_ratio']:.2f}",
                      f"{100 * r['busy']:.0f} %" if "busy" in r else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ort_version() -> str:
    if importlib.util.find_spec("onnxruntime") is None:
        return "(not installed)"
    import onnxruntime
    return onnxruntime.__version__


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loading = not (args.inference_only or args.no_data_loading)
    rows = inference_rows(args) + ([] if args.inference_only else step_rows(args))
    rows += data_loading_rows(args) if loading else []
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} torch threads)"
    proposals = args.proposals or "the config's"
    print(f"{where}, torch {torch.__version__}{', tiny widths' if args.tiny else ''}. Inference: one "
          f"{args.size}x{args.size} image, {proposals} test proposals for every model (model.test_proposals), "
          f"deployed form unless marked ({ORT} rows: onnxruntime {_ort_version()}, CPU, the same threads)"
          f"{'' if args.inference_only else f'; training steps: {args.step_size}x{args.step_size} px'}"
          f"{f'; data loading: the training mapper on 1 thread, synthetic slices of {args.size} px' if loading else ''}"
          f". Median of {args.repeats} after 1 warm-up; ratios from this run.\n")
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
