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

The table's other jobs have their own modules: its file (:mod:`fsd_d2.nas.latency_io`), the repair of a derived
genotype to a latency target (:mod:`fsd_d2.nas.latency_repair`) and the timing that fills it on a device
(:mod:`fsd_d2.engine.timing`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from fsd_d2.errors import ConfigError
from fsd_d2.nas.genotype import Genotype, edge_sources, kept_share, strongest_edges
from fsd_d2.nas.searchable import CellAlphas

Shape = Tuple[int, int, int, int]  # N, C, H, W
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
        return self._at_cheapest_ops(pool, dearest_edges=False)

    def floor_ms(self, pool: Optional[Sequence[str]] = None) -> float:
        """The predicted milliseconds of :meth:`cheapest`: what no search over ``pool`` on this table goes below."""
        return sum(self.predict(self.cheapest(pool)))

    def safe_target_ms(self, pool: Optional[Sequence[str]] = None) -> float:
        """The tightest ``search.latency_target_ms`` that the repair meets whatever edges a search derives (the
        repair keeps a node's inputs and changes only ops): every node on its two dearest inputs, each at its
        cheapest op. Between :meth:`floor_ms` and this, a target is met or refused depending on the edges chosen
        (``search.max_skip_connections`` can raise it further when skip connections are the cheapest op)."""
        return sum(self.predict(self._at_cheapest_ops(pool, dearest_edges=True)))

    def _at_cheapest_ops(self, pool: Optional[Sequence[str]], dearest_edges: bool) -> Genotype:
        ops = [op for op in (self.ops if pool is None else pool) if op != "none"]
        cells = {}
        for t, m in self.edge_matrices(ops).items():
            cost, best = m.min(dim=1)
            cells[t] = strongest_edges(cost if dearest_edges else -cost, best, ops, self.num_nodes)
        return Genotype(self.pool, cells)

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
    spend the difference on accuracy. :func:`~fsd_d2.nas.latency_repair.meet_latency_target` enforces it on the
    derived genotype.
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
