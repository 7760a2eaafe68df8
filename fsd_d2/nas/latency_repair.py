"""Meeting a latency target at derivation: the derived genotype repaired, op by op, until the op-latency table
predicts it at or under ``search.latency_target_ms``. The search's latency term steers the alphas towards the
target; this makes the genotype it leaves behind keep it."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from fsd_d2.errors import ConfigError
from fsd_d2.nas.genotype import CellGenotype, Genotype, input_name
from fsd_d2.nas.latency import LatencyTable


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
