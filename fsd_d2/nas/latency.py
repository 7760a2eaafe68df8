"""Op-latency tables and the expected latency of a search's alphas (the latency-aware search).

Why: DARTS ranks operations by the detection loss alone, so a searched FSD can be slower than the ResNet it
replaces although it has fewer parameters. A table of op latencies measured on the target device at every
cell of the *derived* network (the one that is deployed, not the search's proxy) turns the alphas into an
expected latency, differentiable in them:

    E_alpha[latency] = sum_cells sum_edges sum_ops softmax(alpha)_op * lat(cell, edge, op)

A cell's edges see one of two shapes: those leaving the cell's two inputs (stride 2 in a reduction cell) and
those leaving its intermediate nodes (stride 1, at the cell's output resolution), so the table keeps two
latencies per op and cell. ``none`` costs 0: a derived cell never runs it. What a cell costs whatever its ops
(its two 1x1 preprocessing convolutions, the node sums and the output concatenation) is kept per cell as
``overhead_ms``, so that a genotype's predicted latency can be compared with the measured latency of its
derived cells, and so that the table shows the floor no choice of ops goes below (:meth:`LatencyTable.cheapest`).
"""
from __future__ import annotations

import dataclasses
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import yaml

from fsd_d2.errors import ConfigError, MissingFileError
from fsd_d2.nas.cells import DerivedCell
from fsd_d2.nas.genotype import (CellGenotype, Genotype, edge_sources, input_name, kept_share, strongest_edges,
                                 write_text_atomically)
from fsd_d2.nas.ops import OPS
from fsd_d2.nas.searchable import CellAlphas

Shape = Tuple[int, int, int, int]  # N, C, H, W
FORMAT = 1  # version of the table file; a file of another version is refused
KINDS = ("bone", "head")


@dataclass(frozen=True)
class CellPosition:
    """One cell of the derived network: the genotype cell it is built from and the tensors it receives."""

    name: str  # e.g. res3.normal0, head.reduce
    cell_type: str  # the genotype cell (alpha matrix) that builds it: normal or reduce
    reduction: bool
    reduction_prev: bool
    channels: int  # C of its edges
    inputs: Tuple[Shape, Shape]  # s0 and s1 as the cell receives them (before its 1x1 preprocessing)

    def edge_shapes(self) -> Tuple[Tuple[int, Shape], Tuple[int, Shape]]:
        """``(stride, input shape)`` of the edges leaving the cell's inputs and of those leaving its nodes."""
        n, _, h, w = self.inputs[1]
        x = (n, self.channels, h, w)
        if not self.reduction:
            return (1, x), (1, x)
        return (2, x), (1, (n, self.channels, -(-h // 2), -(-w // 2)))

    def same_cell(self) -> "CellPosition":
        """This position without its name: cells with equal keys cost the same."""
        return dataclasses.replace(self, name="")


@dataclass(frozen=True)
class CellLatency:
    position: CellPosition
    overhead_ms: float  # whatever the ops: the two 1x1 preprocessing convolutions, node sums, concatenation
    ms: Dict[str, Tuple[float, float]]  # op -> (an edge leaving an input, an edge leaving a node)

    def op_ms(self, op: str, source: int) -> float:
        """``op`` on an edge from ``source`` (0, 1: the cell's inputs; 2 on: its nodes), as the table prices it."""
        return self.ms[op][0 if source < 2 else 1]


@dataclass(frozen=True)
class LatencyTable:
    """Milliseconds per candidate operation at every cell of one derived network (``kind`` bone or head)."""

    kind: str
    pool: str
    ops: List[str]
    num_nodes: int
    cells: List[CellLatency]
    meta: Dict[str, Any] = field(default_factory=dict)  # device, torch version, threads, sizes, repeats

    def edge_matrices(self, pool: Sequence[str]) -> Dict[str, torch.Tensor]:
        """Per cell type, the (num_edges x len(pool)) latencies of its edges summed over the cells it builds:
        E_alpha[latency] is then sum_t (softmax(alpha_t) * M_t).sum()."""
        sources = edge_sources(self.num_nodes)
        out: Dict[str, torch.Tensor] = {}
        for cell in self.cells:
            m = torch.tensor([[cell.op_ms(op, j) for op in pool] for j in sources], dtype=torch.float64)
            t = cell.position.cell_type
            out[t] = out[t] + m if t in out else m
        return out

    def predict(self, genotype: Genotype) -> List[float]:
        """Per cell, the predicted milliseconds of ``genotype``'s derived cell: overhead + its chosen ops."""
        return [cell.overhead_ms + sum(cell.op_ms(op, j)
                                       for node in genotype.cells[cell.position.cell_type].edges for op, j in node)
                for cell in self.cells]

    def cheapest(self, pool: Optional[Sequence[str]] = None) -> Genotype:
        """The genotype the table predicts fastest over ``pool`` (default: the table's ops): per node, the two
        incoming edges whose cheapest non-``none`` op costs least (summed over the cells of its type), each with
        that op. Its predicted latency is the floor that no latency weight or target can take the search below."""
        ops = [op for op in (self.ops if pool is None else pool) if op != "none"]
        cells = {}
        for t, m in self.edge_matrices(ops).items():
            cost, best = m.min(dim=1)
            cells[t] = strongest_edges(-cost, best, ops, self.num_nodes)  # the cheapest are the strongest
        return Genotype(self.pool, cells)

    def floor_ms(self, pool: Optional[Sequence[str]] = None) -> float:
        """The predicted milliseconds of :meth:`cheapest`: what no search over ``pool`` on this table goes below."""
        return sum(self.predict(self.cheapest(pool)))

    def check(self, where: str, kind: str, pool_ops: Sequence[str], num_nodes: int) -> None:
        """Refuse a table that cannot price the alphas of the ``kind`` search over ``pool_ops``; ``where`` is
        the file, named in every message with the command that writes a fitting one."""
        fix = f"write one with +stage=profile_ops model=fsd_search_{kind} and the search's search_space/model.num_nodes"
        if self.kind != kind:
            raise ConfigError(f"{where} is the op-latency table of the {self.kind} search but this is the {kind} "
                              f"search; pass its op_latency_{kind}.yaml as search.latency_table ({fix})")
        missing = [op for op in pool_ops if op not in self.ops]
        if missing:
            raise ConfigError(f"{where} has no latencies for {missing} of the search's pool {list(pool_ops)} "
                              f"(it was measured for pool {self.pool}: {self.ops}); {fix}")
        if self.num_nodes != num_nodes:
            raise ConfigError(f"{where} was measured for cells of {self.num_nodes} nodes, the search's have "
                              f"{num_nodes} (model.num_nodes); {fix}")


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
    return torch.randn(shape, device=device)


def _any_cell(pool: Sequence[str], num_nodes: int) -> CellGenotype:
    """A valid cell over ``pool`` (its first op on every edge), for what does not depend on the genotype."""
    op = next(o for o in pool if o != "none")
    return CellGenotype(tuple(((op, 0), (op, 1)) for _ in range(num_nodes)))


def _derived_cell(cell: CellGenotype, position: CellPosition, device: str) -> DerivedCell:
    p = position
    return DerivedCell(cell, p.inputs[0][1], p.inputs[1][1], p.channels, p.reduction, p.reduction_prev).to(device).eval()


def profile_ops(kind: str, pool_name: str, pool: Sequence[str], num_nodes: int, positions: Sequence[CellPosition],
                *, device: str = "cpu", warmup: int = 2, repeats: int = 10, meta: Optional[Dict[str, Any]] = None,
                progress: Callable[[str], None] = lambda msg: None) -> LatencyTable:
    """Measure every op of ``pool`` (inference mode, affine BN as in derived cells) at every cell position.
    Equal shapes are measured once; ``progress`` receives one line per cell."""
    if kind not in KINDS:
        raise ValueError(f"profile_ops: kind must be one of {KINDS}, got {kind!r}")
    cache: Dict[Any, float] = {}

    def op_ms(op: str, stride: int, shape: Shape) -> float:
        if op == "none":
            return 0.0
        key = (op, stride, shape)
        if key not in cache:
            module, x = OPS[op](shape[1], stride, True).to(device).eval(), _random(shape, device)
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
    predicts), in inference mode; equal positions are measured once."""
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


def expected_latency(weights: Dict[str, torch.Tensor], matrices: Dict[str, torch.Tensor]) -> torch.Tensor:
    """E_alpha[latency] in ms: ``weights`` are the softmaxed alphas by cell type, ``matrices`` the table's
    :meth:`LatencyTable.edge_matrices` (on the alphas' device and dtype)."""
    return sum((weights[t] * m).sum() for t, m in matrices.items())


class LatencyObjective:
    """``weight * E_alpha[latency] / E_uniform[latency]``: the latency term of the alpha objective; with a
    ``target_ms`` > 0, TuNAS' absolute-value term ``weight * |E_alpha[derived latency] / target - 1|`` instead.

    Normalised by the expected latency at uniform alphas (the search's start), the term is 1 x weight at the
    start whatever the device and image size, so ``search.latency_weight`` carries from a CPU table to a GPU
    one: 0.1 trades the whole expected cell latency against 0.1 of detection loss. It depends on the alphas
    only, so the architect adds its gradient to the hypergradient directly.

    A target is a latency of the derived cells (what :meth:`LatencyTable.predict` sums), so its term compares it
    with :meth:`expected_derived_ms`, the mixture's cost scaled to the two edges a derived node keeps, plus the
    cells' overhead. The absolute value steers to the target from both sides (TuNAS): a search far under it may
    spend the difference on accuracy. :func:`meet_latency_target` enforces it on the derived genotype.
    """

    def __init__(self, table: LatencyTable, alphas: CellAlphas, weight: float, target_ms: float = 0.0):
        self.table, self.alphas, self.weight, self.target_ms = table, alphas, float(weight), float(target_ms)
        like = next(iter(alphas.logits.values()))
        self.matrices = {t: m.to(like) for t, m in table.edge_matrices(alphas.pool).items()}
        unknown = sorted(set(self.matrices) - set(alphas.logits))
        if unknown:
            raise ConfigError(f"op-latency table of the {table.kind} search has cells of type {unknown} that the "
                              f"searched module does not have (it has {sorted(alphas.logits)})")
        self.uniform_ms = float(sum(m.mean(dim=1).sum() for m in self.matrices.values()))
        if self.uniform_ms <= 0:
            raise ConfigError(f"the op-latency table of the {table.kind} search prices every op of {alphas.pool} at "
                              "0 ms, so there is no latency to weigh; profile the pool again with +stage=profile_ops")
        self.overhead_ms = sum(c.overhead_ms for c in table.cells)
        # the derivation keeps 2 of node i's 2 + i incoming edges: each edge's expected cost counts that share of it
        kept = torch.tensor(kept_share(table.num_nodes)).to(like)
        self.derived_matrices = {t: m * kept[:, None] for t, m in self.matrices.items()}

    def expected_ms(self) -> torch.Tensor:
        return expected_latency(self.alphas.weights(), self.matrices)

    def expected_derived_ms(self) -> torch.Tensor:
        """E_alpha of the derived cells' latency (overhead included), comparable with the target."""
        return self.overhead_ms + expected_latency(self.alphas.weights(), self.derived_matrices)

    def __call__(self) -> torch.Tensor:
        if self.target_ms > 0:
            return self.weight * (self.expected_derived_ms() / self.target_ms - 1).abs()
        return self.weight * self.expected_ms() / self.uniform_ms


def meet_latency_target(table: LatencyTable, genotype: Genotype, target_ms: float, pool: Sequence[str],
                        max_skip: Optional[int] = None,
                        log: Callable[[str], None] = lambda msg: None) -> Genotype:
    """``genotype`` if the table predicts it at or under ``target_ms``; else repaired: the dearest op of any
    edge (summed over the cells of its type) is replaced by the cheapest op of ``pool`` on the same input, so
    the node keeps its inputs, again and again until the prediction is under the target. ``max_skip`` caps the
    skip connections per cell as the derivation does. ``log`` gets the prediction and every repair. Raises a
    :class:`ConfigError` naming ``search.latency_target_ms`` when even the cheapest ops stay above it."""
    ops = [op for op in pool if op != "none"]

    def cost(cell_type: str, op: str, source: int) -> float:
        return sum(c.op_ms(op, source) for c in table.cells if c.position.cell_type == cell_type)

    def frozen() -> Genotype:
        return Genotype(genotype.pool, {t: CellGenotype(nodes) for t, nodes in cells.items()})

    cells = {t: [list(node) for node in c.edges] for t, c in genotype.cells.items()}
    predicted = sum(table.predict(genotype))
    log(f"latency target: the derived {table.kind} cells are predicted at {predicted:.2f} ms, the target "
        f"search.latency_target_ms is {target_ms:g} ms")
    while predicted > target_ms:
        repairs = []  # (current cost, saving, cell type, node, edge, cheaper op)
        for t, nodes in cells.items():
            skips = sum(op == "skip_connect" for node in nodes for op, _ in node)
            for n, node in enumerate(nodes):
                for e, (op, j) in enumerate(node):
                    allowed = [o for o in ops if o != "skip_connect" or op == o or max_skip is None or skips < max_skip]
                    best = min(allowed, key=lambda o: cost(t, o, j))
                    if cost(t, best, j) < cost(t, op, j):
                        repairs.append((cost(t, op, j), cost(t, op, j) - cost(t, best, j), t, n, e, best))
        if not repairs:
            floor = table.floor_ms(pool)
            fix = (f"set search.latency_target_ms to at least {floor:.2f} (or 0: no target)" if floor > target_ms else
                   f"other edges reach it (the table's cheapest genotype: {floor:.2f} ms): search with "
                   f"search.latency_weight > 0, or set search.latency_target_ms to at least {predicted:.2f}")
            raise ConfigError(f"search.latency_target_ms={target_ms:g}: the derived {table.kind} cells are predicted "
                              f"at {predicted:.2f} ms even with the cheapest op of the pool on every edge they keep; "
                              f"{fix}")
        _, saving, t, n, e, best = max(repairs)
        op, j = cells[t][n][e]
        cells[t][n][e] = (best, j)
        predicted = sum(table.predict(frozen()))
        source = input_name(j) if j < 2 else f"node {j - 2}"
        log(f"latency target: {t} node {n}: {op} -> {best} on its edge from {source} (-{saving:.2f} ms), "
            f"now {predicted:.2f} ms")
    return frozen()


# --- the file ---

def table_to_dict(table: LatencyTable) -> Dict[str, Any]:
    cells = [{"name": c.position.name, "cell_type": c.position.cell_type, "reduction": c.position.reduction,
              "reduction_prev": c.position.reduction_prev, "channels": c.position.channels,
              "inputs": [list(s) for s in c.position.inputs], "overhead_ms": round(c.overhead_ms, 4),
              "ms": {op: [round(v, 4) for v in c.ms[op]] for op in table.ops}} for c in table.cells]
    return {"format": FORMAT, "kind": table.kind, "pool": table.pool, "ops": list(table.ops),
            "num_nodes": table.num_nodes, "meta": dict(table.meta), "cells": cells}


_HEADER = """\
# Op-latency table written by +stage=profile_ops: milliseconds of each operation of the pool at every cell of
# the derived FSD (inference, one image; head cells on every proposal). Per cell and op: [an edge leaving the
# cell's inputs (stride 2 in a reduction cell), an edge leaving an intermediate node]; overhead_ms is what the
# cell costs whatever its ops (1x1 preprocessing, node sums, concatenation). Use: search.latency_table=<this file>.
"""


def save_table(table: LatencyTable, path: Union[str, Path]) -> Path:
    """Write ``table`` as YAML atomically (temp file + os.replace)."""
    text = _HEADER + yaml.safe_dump(table_to_dict(table), sort_keys=False, default_flow_style=None, width=120)
    return write_text_atomically(path, text)


def load_table(path: Union[str, Path]) -> LatencyTable:
    """Read and validate a table file; errors name the file, the entry and the command that rewrites it."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: op-latency table not found; write it with +stage=profile_ops "
                               "(model=fsd_search_bone or model=fsd_search_head) and pass its "
                               "op_latency_<kind>.yaml as search.latency_table")
    try:
        data = yaml.safe_load(path.read_text())
        return _parse(data)
    except (yaml.YAMLError, _Invalid) as e:
        what = " ".join(str(e).split())  # YAML's messages span lines
        raise ConfigError(f"{path}: not a valid op-latency table ({what}); write it again with +stage=profile_ops")


class _Invalid(Exception):
    pass


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise _Invalid(what)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0


def _shape(v) -> bool:
    return isinstance(v, list) and len(v) == 4 and all(isinstance(x, int) and x > 0 for x in v)


def _parse(data) -> LatencyTable:
    _need(isinstance(data, dict), f"expected a mapping, got {type(data).__name__}")
    _need(data.get("format") == FORMAT, f"format {data.get('format')!r}, this version reads format {FORMAT}")
    _need(data.get("kind") in KINDS, f"kind {data.get('kind')!r} is not one of {KINDS}")
    ops, num_nodes, cells = data.get("ops"), data.get("num_nodes"), data.get("cells")
    _need(isinstance(ops, list) and ops and all(o in OPS for o in ops), f"ops {ops!r} is not a list of known ops")
    _need(isinstance(num_nodes, int) and num_nodes > 0, f"num_nodes {num_nodes!r}")
    _need(isinstance(cells, list) and cells, "no cells")
    parsed = []
    for i, c in enumerate(cells):
        at = f"cells[{i}]"
        _need(isinstance(c, dict), f"{at} is not a mapping")
        _need(c.get("cell_type") in ("normal", "reduce"), f"{at}.cell_type {c.get('cell_type')!r}")
        inputs = c.get("inputs")
        _need(isinstance(inputs, list) and len(inputs) == 2 and all(_shape(s) for s in inputs),
              f"{at}.inputs {inputs!r} is not two [N, C, H, W] shapes")
        _need(isinstance(c.get("channels"), int) and c["channels"] > 0, f"{at}.channels {c.get('channels')!r}")
        _need(_number(c.get("overhead_ms")), f"{at}.overhead_ms {c.get('overhead_ms')!r}")
        ms = c.get("ms")
        _need(isinstance(ms, dict) and set(ms) == set(ops), f"{at}.ms does not list exactly the table's ops")
        for op, v in ms.items():
            _need(isinstance(v, list) and len(v) == 2 and all(_number(x) for x in v),
                  f"{at}.ms.{op} {v!r} is not [input-edge ms, node-edge ms]")
        position = CellPosition(str(c.get("name", i)), c["cell_type"], bool(c.get("reduction")),
                                bool(c.get("reduction_prev")), c["channels"], tuple(tuple(s) for s in inputs))
        parsed.append(CellLatency(position, float(c["overhead_ms"]), {op: tuple(map(float, v)) for op, v in ms.items()}))
    return LatencyTable(data["kind"], str(data.get("pool", "")), list(ops), num_nodes, parsed, dict(data.get("meta") or {}))
