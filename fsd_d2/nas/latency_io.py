"""The op-latency table's file, ``op_latency_<kind>.yaml`` of ``+stage=profile_ops``: written atomically, read with
YAML's safe loader and checked entry by entry, so that a corrupt, foreign or outdated file is refused with a message
naming it and the command that writes it again, not a traceback deep in a search."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Union

import yaml

from fsd_d2.errors import ConfigError, MissingFileError
from fsd_d2.nas.genotype import write_text_atomically
from fsd_d2.nas.latency import KINDS, CellLatency, CellPosition, LatencyTable
from fsd_d2.nas.ops import OPS

FORMAT = 1  # version of the table file; a file of another version is refused


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
