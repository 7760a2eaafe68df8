"""Device timing: the median milliseconds of calls, and what the op-latency table holds measured that way, every op of
a pool at every cell of the derived FSD (:func:`profile_ops`, ``+stage=profile_ops``) and a genotype's derived cells
(:func:`measure_cells`, a search's predicted-versus-measured report). CUDA is synchronised around each call so that
queued kernels count."""
from __future__ import annotations

import platform
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from fsd_d2.modeling.deploy import deploy_cell_
from fsd_d2.nas.cells import DerivedCell
from fsd_d2.nas.genotype import CellGenotype, Genotype
from fsd_d2.nas.latency import KINDS, CellLatency, CellPosition, LatencyTable, Shape
from fsd_d2.nas.ops import OPS


def median_ms(fn: Callable[[], Any], device: str, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls after ``warmup`` calls (which pick kernels and allocate),
    synchronised on CUDA so that queued kernels count."""
    return median_ms_each({0: fn}, device, warmup, repeats)[0]


def median_ms_each(fns: Dict[Any, Callable[[], Any]], device: str, warmup: int, repeats: int) -> Dict[Any, float]:
    """:func:`median_ms` of each of ``fns``, called in turn on every repeat, so that a load which comes and goes on a
    shared machine weighs on all of them alike and their ratios hold."""
    cuda = torch.device(device).type == "cuda"
    times: Dict[Any, List[float]] = {key: [] for key in fns}
    with torch.no_grad():
        for i in range(warmup + repeats):
            for key, fn in fns.items():
                if cuda:
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                fn()
                if cuda:
                    torch.cuda.synchronize(device)
                if i >= warmup:
                    times[key].append(time.perf_counter() - start)
    return {key: 1e3 * statistics.median(t) for key, t in times.items()}


def _random(shape: Shape, device: str) -> torch.Tensor:
    """A feature map as a deployed detector hands it to a cell: channels-last on CPU (see ``modeling.deploy``)."""
    x = torch.randn(shape, device=device)
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x


def _any_cell(pool: Sequence[str], num_nodes: int) -> CellGenotype:
    """A valid cell over ``pool`` (its first op on every edge), for what does not depend on the genotype."""
    op = next(o for o in pool if o != "none")
    return CellGenotype(tuple(((op, 0), (op, 1)) for _ in range(num_nodes)))


def _derived_cell(cell: CellGenotype, position: CellPosition, device: str) -> DerivedCell:
    p = position
    return deploy_cell_(DerivedCell(cell, p.inputs[0][1], p.inputs[1][1], p.channels, p.reduction,
                                    p.reduction_prev).to(device))


def profile_ops(kind: str, pool_name: str, pool: Sequence[str], num_nodes: int, positions: Sequence[CellPosition],
                *, device: str = "cpu", warmup: int = 2, repeats: int = 10, meta: Optional[Dict[str, Any]] = None,
                progress: Callable[[str], None] = lambda msg: None) -> LatencyTable:
    """Measure every op of ``pool`` at every cell position in the deployed form of derived cells (inference mode,
    BN folded into the convolutions, channels-last on CPU: what ``+stage=eval`` runs). Equal shapes are measured
    once; ``progress`` receives one line per cell."""
    if kind not in KINDS:
        raise ValueError(f"profile_ops: kind must be one of {KINDS}, got {kind!r}")
    cache: Dict[Any, float] = {}

    def op_ms(op: str, stride: int, shape: Shape) -> float:
        if op == "none":
            return 0.0
        key = (op, stride, shape)
        if key not in cache:
            module, x = deploy_cell_(OPS[op](shape[1], stride, True).to(device)), _random(shape, device)
            cache[key] = median_ms(lambda: module(x), device, warmup, repeats)
        return cache[key]

    cells = []
    for i, pos in enumerate(positions):
        (s_in, x_in), (s_node, x_node) = pos.edge_shapes()
        ms = {op: (op_ms(op, s_in, x_in), op_ms(op, s_node, x_node)) for op in pool}
        key = ("overhead", pos.same_cell())
        if key not in cache:
            cell = _derived_cell(_any_cell(pool, num_nodes), pos, device)
            s0, s1, node = (_random(s, device) for s in (*pos.inputs, x_node))

            def fixed():
                cell.preprocess0(s0), cell.preprocess1(s1)
                return torch.cat([node + node for _ in range(num_nodes)], dim=1)

            cache[key] = median_ms(fixed, device, warmup, repeats)
        cells.append(CellLatency(pos, cache[key], ms))
        ranked = sorted((o for o in pool if o != "none"), key=lambda o: sum(ms[o]))
        progress(f"{pos.name} ({i + 1}/{len(positions)}): overhead {cache[key]:.2f} ms, cheapest {ranked[0]} "
                 f"{ms[ranked[0]][0]:.2f}/{ms[ranked[0]][1]:.2f} ms, dearest {ranked[-1]} "
                 f"{ms[ranked[-1]][0]:.2f}/{ms[ranked[-1]][1]:.2f} ms (input/node edge)")
    return LatencyTable(kind, pool_name, list(pool), num_nodes, cells,
                        {**device_info(device), "warmup": warmup, "repeats": repeats, **(meta or {})})


def measure_cells(genotype: Genotype, positions: Sequence[CellPosition], *, device: str = "cpu", warmup: int = 2,
                  repeats: int = 10) -> List[float]:
    """Measured milliseconds of ``genotype``'s derived cell at every position (what :meth:`LatencyTable.predict`
    predicts), deployed as in :func:`profile_ops`; equal positions are measured once."""
    cache: Dict[CellPosition, float] = {}
    for pos in positions:
        key = pos.same_cell()
        if key not in cache:
            cell = _derived_cell(genotype.cells[pos.cell_type], pos, device)
            s0, s1 = (_random(s, device) for s in pos.inputs)
            cache[key] = median_ms(lambda: cell(s0, s1), device, warmup, repeats)
    return [cache[pos.same_cell()] for pos in positions]


def device_info(device: str) -> Dict[str, Any]:
    """What a latency depends on besides the shapes: the device, its name, torch and the CPU threads."""
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    return {"device": dev.type, "device_name": str(name), "torch": str(torch.__version__),
            "threads": torch.get_num_threads()}
