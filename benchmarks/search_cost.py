"""Cost of one architecture-search step against one ordinary training step, on the same batch.

    python benchmarks/search_cost.py                 # 256 px on CPU, 512 px on a GPU; batch 2
    python benchmarks/search_cost.py --size 512 --repeats 5
    python benchmarks/search_cost.py --tiny          # the smoke-test widths: seconds on a laptop
    python benchmarks/search_cost.py --in-turn "search, first order, separate candidate ops" "search, first order"

Rows: the FPN-R50 baseline's Detectron2 training step (``SimpleTrainer.run_step``: forward, backward, SGD,
as ``+stage=train`` runs it) and the backbone search's step (``SearchTrainer.run_step`` of
``+stage=search_bone``: the architect's alpha step, then the weight step) in first order, second order, second
order whose weight step reuses the unrolled step's gradient (``search.reuse_train_gradient``), second order with
PC-DARTS partial channels (K=4), second order over a pool of ``none`` and ``skip_connect`` only: the step
without the cost of the candidate operations, the floor that any saving inside the cells (partial channels
included) can reach, and first order with every edge's candidates run on their own (``model.batched_edges=false``,
plain DARTS), against which the batched edges of every other row are measured. Both halves of a search step
get the same batch as the baseline, so the ratios compare equal work.

How it measures: every configuration runs in a fresh subprocess, so one configuration's memory peak cannot
mask another's and allocator caches do not carry over. In each, the model and its trainer are built, one
warm-up step is run (it allocates optimizer state and picks kernels), then ``--repeats`` timed steps; the
table shows the median time. Peak memory is what the training needs on top of the process as it stood before
the model was built: weights, gradients, optimizer state and activations. Every model is initialised from seed
0 (``_models.build``): the untrained RPN's proposals depend on the weights, and the ROI heads' cost on them.
- CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocation before the model, times synchronised with
  ``torch.cuda.synchronize()``. This is tensor memory; the caching allocator's reserve and the CUDA context
  are not counted.
- CPU: growth of the process's peak resident set size (``VmHWM`` on Linux, else ``ru_maxrss``). It also counts
  memory the allocator keeps but no tensor uses, and pages a peak touched only once, so it is coarser than
  the CUDA figure; ratios between rows are what it is for.
The ATen calls are those of one more step under ``torch.profiler`` (nested calls included; convolutions forward and
backward counted apart): on a GPU a search step of many small candidate ops is bound by launches, not arithmetic,
and the number of operator calls is the cost that decides it, one that a CPU can count too. On CUDA the same
profiled step also gives the kernels launched and the GPU's busy share: their kernels' and copies' time over the
median step time; a launch-bound step leaves the GPU idle between small kernels.
``--in-turn`` times only the named rows, built in one process and stepped in turn on every repeat: on a machine
whose speed drifts between the fresh processes (shared cores), their time ratio without that drift.
Progress goes to stderr, the Markdown table to stdout.
"""
import argparse
import contextlib
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

# name -> (stage, model, Hydra overrides); the first row is the baseline the others are divided by.
CONFIGS = {
    "FPN-R50 training step (baseline)": ("train", "fpn_r50", []),
    "search, first order": ("search_bone", "fsd_search_bone", ["search.order=1"]),
    "search, second order": ("search_bone", "fsd_search_bone", ["search.order=2"]),
    "search, second order, reused train gradient": ("search_bone", "fsd_search_bone",
                                                    ["search.order=2", "search.reuse_train_gradient=true"]),
    "search, second order + partial channels K=4": ("search_bone", "fsd_search_bone",
                                                    ["search.order=2", "model.partial_channels=4"]),
    "search, second order, cells of skip connections only": (
        "search_bone", "fsd_search_bone", ["search.order=2", "search_space.ops=[none,skip_connect]"]),
    "search, first order, separate candidate ops": ("search_bone", "fsd_search_bone",
                                                    ["search.order=1", "model.batched_edges=false"]),
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, help="image side in pixels (default: 512 on CUDA, 256 on CPU, 64 with --tiny)")
    p.add_argument("--batch", type=int, default=2, help="images per step (default 2, as solver.ims_per_batch)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up; the median is shown")
    p.add_argument("--tiny", action="store_true", help="experiment=tiny's narrow widths (fast smoke test)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's choice); use 1 on a "
                   "machine other jobs share, where multi-threaded CPU steps stall waiting for descheduled threads")
    p.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)  # one measurement, JSON out
    p.add_argument("--in-turn", nargs="+", choices=list(CONFIGS), metavar="CONFIG",
                   help="only these configurations (quoted names of the table's rows), built in one process and "
                        "stepped in turn: their time ratio without the drift between fresh processes; no memory")
    p.add_argument("--amp", action="store_true", help="mixed precision (solver.amp=true), CUDA only")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.amp and args.device != "cuda":
        p.error("--amp needs CUDA: solver.amp is refused on a CPU")
    args.size = args.size or (64 if args.tiny else 512 if args.device == "cuda" else 256)
    if args.repeats < 1 or args.batch < 1 or args.size < 32:
        p.error("--repeats and --batch must be >= 1 and --size >= 32")
    return args


def _rss_peak_mb() -> float:
    """This process's peak resident set size. On Linux from ``VmHWM``: ``ru_maxrss`` is inherited through fork and
    exec, so a worker started by a parent that had used more (``performance.py`` after its inference rows) read
    the parent's peak before and after its step, a growth of 0."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS, KiB elsewhere


def _make_trainer(name: str, cfg, model, batch: List[dict]):
    """The trainer the stage uses (only its ``run_step`` is called), fed ``batch`` forever."""
    if CONFIGS[name][0] == "train":
        from detectron2.engine import AMPTrainer, SimpleTrainer
        from detectron2.solver import build_optimizer

        trainer_cls = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer  # as DefaultTrainer
        trainer = trainer_cls(model, itertools.repeat(batch), build_optimizer(cfg, model))
    else:
        from fsd_d2.engine.search import SearchTrainer

        trainer = SearchTrainer(cfg, model, batch, batch, "bone")
        trainer._w_iter = trainer._a_iter = itertools.repeat(batch)  # what train() builds from the two halves
    return trainer


def _build_trainer(name: str, batch: List[dict], tiny: bool, device: str, amp: bool, out: str):
    """Configuration ``name``'s model (seed 0) and the trainer its stage runs, fed ``batch``."""
    from _models import build, compose_cfg

    stage, model_name, overrides = CONFIGS[name]
    cfg = compose_cfg(stage, model_name, [*overrides, *(["solver.amp=true"] if amp else [])], tiny=tiny,
                      device=device, output_dir=out)
    model = build(cfg)
    model.train()
    return _make_trainer(name, cfg, model, batch)


def measure(name: str, size: int, batch_size: int, repeats: int, tiny: bool, device: str,
            amp: bool = False) -> Dict[str, float]:
    """Median step time (s) and peak training memory (MB) of configuration ``name``, in this process."""
    from detectron2.utils.events import EventStorage

    from _models import median_seconds, synthetic_batch

    cuda = device == "cuda"
    with tempfile.TemporaryDirectory(prefix="fsd_search_cost_") as out:
        batch = synthetic_batch(size, batch_size)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() / 2 ** 20
        else:
            before = _rss_peak_mb()
        trainer = _build_trainer(name, batch, tiny, device, amp, out)
        with EventStorage(0) as trainer.storage:
            seconds = median_seconds(trainer.run_step, repeats, cuda, name)
            peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else _rss_peak_mb()) - before
            calls = operator_calls(trainer.run_step, cuda)
    return {"time_s": seconds, "peak_mb": peak, **calls}


def measure_in_turn(names: Sequence[str], size: int, batch_size: int, repeats: int, tiny: bool, device: str,
                    amp: bool = False) -> Dict[str, float]:
    """Median step time (s) of each configuration of ``names``, all built in this process and stepped in turn on
    every repeat: a machine whose speed drifts between the fresh processes of the full table (2x within a day on
    shared cores) slows them alike, so their ratio holds. Memory is not measured: the processes share a peak."""
    from detectron2.utils.events import EventStorage

    from _models import median_seconds_each, synthetic_batch

    with tempfile.TemporaryDirectory(prefix="fsd_search_cost_") as out, contextlib.ExitStack() as stack:
        batch = synthetic_batch(size, batch_size)
        steps = {}
        for i, name in enumerate(names):
            folder = os.path.join(out, str(i))  # each trainer's metric files in its own folder
            os.makedirs(folder)
            trainer = _build_trainer(name, batch, tiny, device, amp, folder)
            trainer.storage = stack.enter_context(EventStorage(0))
            steps[name] = trainer.run_step
        return median_seconds_each(steps, repeats, device == "cuda")


def operator_calls(step, cuda: bool = False) -> Dict[str, float]:
    """ATen operator calls of one more ``step``, counted by ``torch.profiler``: what a launch-bound step's cost
    follows on a GPU (each call one or more small kernels), and a count a CPU can take. Nested calls count too
    (``aten::conv2d`` and the ``aten::convolution`` it dispatches to), as the profiler records them. On CUDA also
    the kernels the step launched and the GPU time they took (:func:`cuda_activity`)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    names = [e.name for e in events if e.name.startswith("aten::")]
    calls = {"aten_calls": len(names), "conv_forward": names.count("aten::convolution"),
             "conv_backward": names.count("aten::convolution_backward")}
    return {**calls, **(cuda_activity(events) if cuda else {})}


def cuda_activity(events) -> Dict[str, float]:
    """Kernels launched and the GPU's busy time (us) in profiler ``events``. Copies and memsets take GPU time but
    are not launches of a kernel. Depending on torch's version a device's activity is listed as events of its own
    or only as the ``kernels`` of the CPU op that launched it; both are read, never both counted."""
    from torch.autograd import DeviceType

    spans = [(e.name, e.time_range.elapsed_us()) for e in events if e.device_type == DeviceType.CUDA]
    if not spans:
        spans = [(k.name, k.duration) for e in events for k in e.kernels]
    copies = ("memcpy", "memset")
    return {"cuda_kernels": sum(1 for name, _ in spans if not name.lower().startswith(copies)),
            "gpu_busy_us": float(sum(us for _, us in spans))}


def measure_in_subprocess(name: str, *, size: int, batch: int, repeats: int, device: str, tiny: bool = False,
                          threads: Optional[int] = None, amp: bool = False) -> Dict[str, float]:
    """:func:`measure` of configuration ``name`` in a fresh process (see the module docstring for why)."""
    cmd = [sys.executable, __file__, "--worker", name, "--size", str(size), "--batch", str(batch),
           "--repeats", str(repeats), "--device", device, *(["--tiny"] if tiny else []),
           *(["--threads", str(threads)] if threads else []), *(["--amp"] if amp else [])]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr (progress) passes through
    if proc.returncode != 0:
        raise SystemExit(f"search_cost: measuring '{name}' failed (exit {proc.returncode}); its error is above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gpu_busy(r: Dict[str, float]) -> float:
    """Share of a step's median wall time the GPU spent in its kernels and copies (profiled in one more step:
    the profiler slows the CPU side, not the kernels)."""
    return r["gpu_busy_us"] / (r["time_s"] * 1e6)


def format_table(results: Dict[str, Dict[str, float]]) -> str:
    base = next(iter(results.values()))
    cuda = "cuda_kernels" in base
    lines = ["| config | step time (s) | x baseline | peak mem (MB) | x baseline | ATen calls | x baseline | "
             "conv fwd / bwd |" + (" CUDA kernels | x baseline | GPU busy |" if cuda else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|---|---|" if cuda else "")]
    for name, r in results.items():
        line = (f"| {name} | {r['time_s']:.3f} | {r['time_s'] / base['time_s']:.2f} | "
                f"{r['peak_mb']:.0f} | {r['peak_mb'] / base['peak_mb']:.2f} | {r['aten_calls']} | "
                f"{r['aten_calls'] / base['aten_calls']:.2f} | {r['conv_forward']} / {r['conv_backward']} |")
        if cuda:
            line += (f" {r['cuda_kernels']} | {r['cuda_kernels'] / base['cuda_kernels']:.2f} | "
                     f"{100 * gpu_busy(r):.0f} % |")
        lines.append(line)
    return "\n".join(lines)


def format_in_turn(times: Dict[str, float]) -> str:
    first = next(iter(times))
    lines = ["| config | step time (s) | x " + first + " |", "|---|---|---|"]
    lines += [f"| {name} | {t:.3f} | {t / times[first]:.2f} |" for name, t in times.items()]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, float]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(measure(args.worker, args.size, args.batch, args.repeats, args.tiny, args.device, args.amp)))
        return {}
    if args.in_turn:
        times = measure_in_turn(args.in_turn, args.size, args.batch, args.repeats, args.tiny, args.device, args.amp)
        print(f"One step on a batch of {args.batch} x {args.size}x{args.size} px, the configurations stepped in turn "
              f"in one process; median of {args.repeats} after 1 warm-up.\n")
        print(format_in_turn(times))
        return {name: {"time_s": t} for name, t in times.items()}
    results = {}
    for name in CONFIGS:
        print(f"search_cost: measuring '{name}' in a fresh process ...", file=sys.stderr)
        results[name] = measure_in_subprocess(name, size=args.size, batch=args.batch, repeats=args.repeats,
                                              device=args.device, tiny=args.tiny, threads=args.threads,
                                              amp=args.amp)
    cuda = args.device == "cuda"
    where = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} torch threads)"
    print(f"One step on a batch of {args.batch} x {args.size}x{args.size} px{' (tiny widths)' if args.tiny else ''}; "
          f"{where}, torch {torch.__version__}{', mixed precision' if args.amp else ''}; median of {args.repeats} "
          f"after 1 warm-up; peak memory = "
          f"{'CUDA tensor memory' if cuda else 'peak RSS growth'} from model build to the last step.\n")
    print(format_table(results))
    return results


if __name__ == "__main__":
    main()
