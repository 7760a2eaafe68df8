"""Shared by the benchmark scripts: configs and models built exactly as the stages build them.

Every model comes from Hydra's composition of ``conf/`` (``+stage=... model=...``), then
:func:`fsd_d2.config.build_cfg` and Detectron2's ``build_model``, so a benchmark measures what users run.
"""
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from hydra import compose, initialize_config_dir

import fsd_d2  # noqa: F401  (registers the FSD backbones and heads with Detectron2)
from fsd_d2.config import build_cfg, register_config_groups

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
EXAMPLE_GENOTYPES = REPO / "projects" / "DeepLesion" / "genotypes"
register_config_groups()  # offers Hydra the generated group bases and the packaged pools, as fsd_d2/run.py does


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def compose_cfg(stage: str, model: str, overrides: Sequence[str] = (), *, tiny: bool = False,
                experiment: str = "", device: str = "cpu", output_dir: str = "") -> CfgNode:
    """The CfgNode of ``python -m fsd_d2.run +stage=<stage> model=<model> <overrides>`` (W&B off).

    ``tiny`` adds ``+experiment=tiny`` (the narrow smoke-test widths), ``experiment`` another experiment (e.g.
    ``study_small``); ``output_dir`` defaults to a new temporary folder (trainers open their metric files there).
    """
    experiments = ["tiny"] * tiny + [experiment] * bool(experiment)
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        hcfg = compose("config", overrides=[
            f"+stage={stage}", f"model={model}", "logger=none", f"device={device}",
            f"output_dir={output_dir or tempfile.mkdtemp(prefix='fsd_bench_')}",
            *([f"+experiment=[{','.join(experiments)}]"] if experiments else []), *overrides])
    return build_cfg(hcfg)


def build(cfg: CfgNode, seed: int = 0) -> torch.nn.Module:
    """Detectron2's ``build_model``, initialised from ``seed``: an untrained RPN's proposals, and so the work of
    the ROI heads and NMS (the time they take), depend on the initial weights; fixed, runs compare."""
    torch.manual_seed(seed)
    return build_model(cfg)


def synthetic_batch(size: int, batch_size: int, seed: int = 0, boxes_per_image: int = 3) -> List[dict]:
    """Detectron2 training inputs: ``size`` x ``size`` uint8 3-slice images with a few small lesion boxes.

    The pixels are noise: the cost of a step does not depend on them, only on the image size, the number
    of boxes and the sampling sizes of the config.
    """
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(batch_size):
        image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
        wh = size * (0.04 + 0.11 * torch.rand(boxes_per_image, 2, generator=g))  # lesions: 4-15% of the side
        xy = (size - wh) * torch.rand(boxes_per_image, 2, generator=g)
        instances = Instances((size, size))
        instances.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        instances.gt_classes = torch.zeros(boxes_per_image, dtype=torch.int64)
        batch.append({"image": image, "height": size, "width": size, "instances": instances})
    return batch


def median_seconds_each(fns: Dict[str, Callable[[], object]], repeats: int, cuda: bool) -> Dict[str, float]:
    """Median wall time of each of ``fns`` over ``repeats`` calls after one warm-up call (it allocates buffers and
    picks kernels), synchronised on CUDA so queued kernels count; each time goes to stderr as progress.

    The functions are called in turn on every repeat, so that a load which comes and goes on a shared machine
    weighs on all of them alike and their ratios hold.
    """
    times: Dict[str, List[float]] = {label: [] for label in fns}
    for i in range(repeats + 1):
        for label, fn in fns.items():
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times[label].append(time.perf_counter() - start)
            print(f"  {label}: call {i}{' (warm-up)' if i == 0 else ''} {times[label][-1]:.3f} s", file=sys.stderr)
    return {label: statistics.median(t[1:]) for label, t in times.items()}


def median_seconds(fn: Callable[[], object], repeats: int, cuda: bool, label: str) -> float:
    """:func:`median_seconds_each` of one function."""
    return median_seconds_each({label: fn}, repeats, cuda)[label]
