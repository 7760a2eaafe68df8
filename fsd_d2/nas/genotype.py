"""Genotypes: the discrete architecture a DARTS search leaves behind, as a small value type and a YAML file.

A cell genotype lists, per intermediate node, two ``(op, input)`` edges. Inputs 0 and 1 are the cell's inputs
``c_{k-2}`` and ``c_{k-1}`` (outputs of the two previous cells); input ``2 + j`` is intermediate node ``j``. The
file form is meant to be read, pasted into a paper or edited by hand::

    pool: bone8
    cells:
      reduce:
        - [[dw_sep_conv_3x3, 0], [conv_3x3, 1]]  # node 0
        - ...

Loading validates it against the operation pool and the cell shape, with errors that name the file and entry.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import yaml

from fsd_d2.errors import GenotypeError, MissingFileError
from fsd_d2.nas.ops import OPS, PARAMETER_FREE_OPS, POOL_DIR, load_pool

CELL_TYPES = ("normal", "reduce")  # backbone search: reduce only; head search: normal and reduce
EDGES_PER_NODE = 2  # DARTS keeps the two strongest incoming edges of every node


def num_edges(num_nodes: int) -> int:
    """Edges of a search cell: intermediate node i has 2 + i inputs (14 for DARTS' 4 nodes)."""
    return sum(2 + i for i in range(num_nodes))


def edge_sources(num_nodes: int) -> List[int]:
    """The input of every edge in alpha-row order, node by node (node i's 2 + i edges read 0, 1: the cell's inputs,
    then 2 + j: node j), the order of :func:`strongest_edges`' ``strength`` and of the alphas' rows."""
    return [j for i in range(num_nodes) for j in range(2 + i)]


def kept_share(num_nodes: int) -> List[float]:
    """Per edge in alpha-row order, the share of its node's incoming edges that :func:`strongest_edges` keeps
    (:data:`EDGES_PER_NODE` of node i's 2 + i): the chance that an edge survives the derivation when all are alike,
    which scales a mixture's expected cost to the derived cell's."""
    return [EDGES_PER_NODE / (2 + i) for i in range(num_nodes) for _ in range(2 + i)]


def input_name(index: int) -> str:
    """Readable name of a node input: c_{k-2}, c_{k-1}, then intermediate nodes 0, 1, ..."""
    return ("c_{k-2}", "c_{k-1}")[index] if index < 2 else str(index - 2)


def _freeze(x):
    return tuple(_freeze(v) for v in x) if isinstance(x, (list, tuple)) else x


@dataclass(frozen=True)
class CellGenotype:
    """Per intermediate node, its two ``(op, input_index)`` edges (lists are accepted and frozen to tuples)."""

    edges: Tuple[Tuple[Tuple[str, int], ...], ...]

    def __post_init__(self):
        object.__setattr__(self, "edges", _freeze(self.edges))

    @property
    def num_nodes(self) -> int:
        return len(self.edges)

    def __str__(self) -> str:
        return "\n".join(f"node {i} <- " + " + ".join(f"{op}({input_name(j)})" for op, j in node)
                         for i, node in enumerate(self.edges))


@dataclass(frozen=True)
class Genotype:
    """A searched architecture: the pool it was searched in and a cell genotype per cell type."""

    pool: str
    cells: Dict[str, CellGenotype]

    def __str__(self) -> str:
        parts = [f"genotype (pool {self.pool})"]
        for cell_type, cell in self.cells.items():
            parts += [f"{cell_type}:"] + ["  " + line for line in str(cell).splitlines()]
        return "\n".join(parts)


_MASKED = -1.0  # a weight below every softmax value: out of both the edge ranking and the op choice


def derive(alphas: torch.Tensor, pool: Sequence[str], num_nodes: int,
           max_skip: Optional[int] = None) -> CellGenotype:
    """DARTS' discretisation of one cell's architecture logits ``alphas`` (num_edges x len(pool)).

    Each edge's weights are the softmax of its logits; an edge's strength is its largest non-``none`` weight.
    Every node keeps its two strongest incoming edges (strongest first), each with its strongest non-``none``
    op, so ``none`` is never chosen even where it dominates (it would remove the edge DARTS is told to keep).

    ``max_skip`` is P-DARTS' cap on skip connections (Chen et al. 2019, who keep 2): while more than ``max_skip``
    edges of the cell have ``skip_connect`` as their strongest op, the weakest of those skips is removed from its
    edge, whose next op (and strength) then count; the cell is derived from what is left, so it holds at most
    ``max_skip`` skips. None: no cap (DARTS).
    """
    pool = list(pool)
    expected = (num_edges(num_nodes), len(pool))
    if tuple(alphas.shape) != expected:
        raise ValueError(f"derive: alphas have shape {tuple(alphas.shape)}, expected {expected} "
                         f"(edges of a {num_nodes}-node cell x ops of the pool)")
    if "none" not in pool:
        raise ValueError(f"derive: the pool {pool} has no 'none' operation")
    weights = torch.softmax(alphas.detach().float(), dim=-1)
    weights[:, pool.index("none")] = _MASKED
    if max_skip is not None and "skip_connect" in pool:
        _cap_skips(weights, pool.index("skip_connect"), max_skip, pool)
    strength, best_op = weights.max(dim=-1)
    return strongest_edges(strength, best_op, pool, num_nodes)


def strongest_edges(strength: torch.Tensor, best_op: torch.Tensor, ops: Sequence[str], num_nodes: int) -> CellGenotype:
    """DARTS' choice of a cell's edges: every node keeps its :data:`EDGES_PER_NODE` incoming edges of highest
    ``strength`` (one value per edge, edges numbered node by node), strongest first, each with ``ops[best_op]``."""
    nodes = []
    for i in range(num_nodes):
        first = num_edges(i)  # node i's edges follow the 2 + 0, ..., 2 + (i - 1) edges of the nodes before it
        top = sorted(range(2 + i), key=lambda j: -strength[first + j].item())[:EDGES_PER_NODE]
        nodes.append(tuple((ops[best_op[first + j].item()], j) for j in top))
    return CellGenotype(tuple(nodes))


def _cap_skips(weights: torch.Tensor, skip: int, max_skip: int, pool: Sequence[str]) -> None:
    """P-DARTS' rule, in place on the masked weights: drop the weakest edge-leading skip until at most
    ``max_skip`` edges lead with it."""
    if max_skip < 0:
        raise ValueError(f"derive: max_skip must be >= 0 (or None: no cap), got {max_skip}")
    if max_skip < len(weights) and len(pool) < 3:
        raise ValueError(f"derive: a cap of {max_skip} skip connections needs another op than 'none' and "
                         f"'skip_connect' in the pool {list(pool)}")
    while True:
        leading = (weights.argmax(dim=-1) == skip).nonzero()[:, 0]
        if len(leading) <= max_skip:
            return
        weights[leading[weights[leading, skip].argmin()], skip] = _MASKED


def op_counts(genotype: "Genotype") -> Dict[str, int]:
    """What collapse checks count in a derived genotype: its ``edges``, ``skip_connections`` and
    ``parameter_free_ops`` (skips and pools, :data:`fsd_d2.nas.ops.PARAMETER_FREE_OPS`), over all its cells."""
    ops = [op for cell in genotype.cells.values() for node in cell.edges for op, _ in node]
    return {"edges": len(ops), "skip_connections": ops.count("skip_connect"),
            "parameter_free_ops": sum(op in PARAMETER_FREE_OPS for op in ops)}


def check_cell(edges, where: str, pool_ops: Sequence[str], pool_name: str,
               num_nodes: Optional[int] = None) -> CellGenotype:
    """Validate a cell's edges (parsed YAML or a CellGenotype's) and return the CellGenotype.

    ``where`` prefixes every message (e.g. ``"genotype_bone.yaml: cells.reduce"``) so errors name the entry.
    """
    if isinstance(edges, CellGenotype):
        edges = edges.edges
    if not isinstance(edges, (list, tuple)) or not edges:
        raise GenotypeError(f"{where}: expected a non-empty list of nodes, each a list of {EDGES_PER_NODE} "
                            f"[op, input] edges; got {edges!r}")
    if num_nodes is not None and len(edges) != num_nodes:
        raise GenotypeError(f"{where}: has {len(edges)} nodes but the model's cells have {num_nodes} "
                            "(model.num_nodes); use a genotype searched with the same number of nodes")
    for i, node in enumerate(edges):
        if not isinstance(node, (list, tuple)) or len(node) != EDGES_PER_NODE:
            count = len(node) if isinstance(node, (list, tuple)) else "no"
            raise GenotypeError(f"{where} node {i}: has {count} edges; every node takes exactly {EDGES_PER_NODE} "
                                f"[op, input] edges, got {node!r}")
        for e, edge in enumerate(node):
            at = f"{where} node {i} edge {e}"
            if (not isinstance(edge, (list, tuple)) or len(edge) != 2 or not isinstance(edge[0], str)
                    or not isinstance(edge[1], int) or isinstance(edge[1], bool)):
                raise GenotypeError(f"{at}: expected [op, input] (an operation name and an integer), got {edge!r}")
            op, j = edge
            if op == "none":
                raise GenotypeError(f"{at}: op 'none' cannot be an edge of a derived cell; pick another operation")
            if op not in pool_ops:
                raise GenotypeError(f"{at}: op '{op}' is not in pool {pool_name} (known: {', '.join(pool_ops)})")
            if not 0 <= j < 2 + i:
                raise GenotypeError(f"{at}: input {j} is out of range; node {i} reads 0 (c_{{k-2}}), 1 (c_{{k-1}})"
                                 + (f" or earlier nodes 2..{i + 1}" if i else ""))
    return CellGenotype(edges)


def _parse(data, where: str, pool_ops: Optional[Sequence[str]], num_nodes: Optional[int],
           cell_types: Optional[Sequence[str]], model_pool: Optional[str] = None) -> Genotype:
    if not isinstance(data, dict):
        raise GenotypeError(f"{where}: expected a mapping with 'pool:' and 'cells:', got {type(data).__name__}")
    extra = sorted(set(data) - {"pool", "cells"})
    if extra:
        raise GenotypeError(f"{where}: unknown top-level key(s) {extra}; a genotype has only 'pool' and 'cells'")
    pool_name, cells = data.get("pool"), data.get("cells")
    if not isinstance(pool_name, str) or not pool_name:
        raise GenotypeError(f"{where}: missing 'pool:' (the name of the operation pool it was searched in)")
    if not isinstance(cells, dict) or not cells:
        raise GenotypeError(f"{where}: 'cells:' must map cell types ({', '.join(CELL_TYPES)}) to node lists")
    for cell_type in cells:
        if cell_type not in CELL_TYPES:
            raise GenotypeError(f"{where}: unknown cell type '{cell_type}' (known: {', '.join(CELL_TYPES)})")
    for cell_type in cell_types or ():
        if cell_type not in cells:
            raise GenotypeError(f"{where}: missing cell type '{cell_type}' (has {sorted(cells)}); is it a genotype "
                                "of the other search (backbone vs head)?")
    if pool_ops is None:  # the named packaged pool if there is one, else any registered operation
        pool_ops = load_pool(pool_name) if (POOL_DIR / f"{pool_name}.yaml").is_file() else list(OPS)
    named = pool_name if model_pool in (None, pool_name) else (
        f"{model_pool}, the model's (the file was searched in {pool_name}: a genotype of the other search, backbone "
        f"vs head?)")
    return Genotype(pool_name, {t: check_cell(c, f"{where}: cells.{t}", list(pool_ops), named, num_nodes)
                                for t, c in cells.items()})


def genotype_to_text(g: Genotype) -> str:
    """The genotype file's text (what :func:`save_genotype` writes and checkpoints record)."""
    lines = ["# FSD-D2 genotype: per cell type, one line per intermediate node with its two [op, input] edges;",
             "# input 0 = c_{k-2}, 1 = c_{k-1} (the two previous cells), 2 + j = intermediate node j.",
             yaml.safe_dump({"pool": g.pool}).strip(), "cells:"]
    for cell_type, cell in g.cells.items():
        lines.append(f"  {cell_type}:")
        for i, node in enumerate(cell.edges):
            flow = yaml.safe_dump([list(e) for e in node], default_flow_style=True, width=10_000).strip()
            lines.append(f"    - {flow}  # node {i}")
    return "\n".join(lines) + "\n"


def save_genotype(g: Genotype, path: Union[str, Path]) -> Path:
    """Validate ``g`` and write it atomically (temp file + os.replace): readers never see half a genotype."""
    path = Path(path)
    text = genotype_to_text(g)
    _parse(yaml.safe_load(text), f"save_genotype({path})", None, None, None)
    return write_text_atomically(path, text)


def write_text_atomically(path: Union[str, Path], text: str) -> Path:
    """Write to a temporary file beside ``path`` and rename: a killed run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would hide a genotype from the rest of the team
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def genotype_from_text(text: str, where: str, **checks) -> Genotype:
    """Parse and validate a genotype file's text; ``where`` names its origin in errors, ``checks`` are
    :func:`load_genotype`'s ``pool_ops``, ``model_pool``, ``num_nodes`` and ``cell_types``."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise GenotypeError(f"{where}: not valid YAML ({e})") from e
    return _parse(data, where, checks.get("pool_ops"), checks.get("num_nodes"), checks.get("cell_types"),
                  checks.get("model_pool"))


def genotype_differences(a: Genotype, b: Genotype) -> List[str]:
    """Readable differences between two genotypes (pool, cell types, edges); empty when they are equal."""
    diffs = [f"pool {a.pool} vs {b.pool}"] if a.pool != b.pool else []
    for cell_type in sorted(set(a.cells) | set(b.cells)):
        if cell_type not in a.cells or cell_type not in b.cells:
            diffs.append(f"cell {cell_type} only in the {'first' if cell_type in a.cells else 'second'}")
            continue
        nodes_a, nodes_b = a.cells[cell_type].edges, b.cells[cell_type].edges
        if len(nodes_a) != len(nodes_b):
            diffs.append(f"cell {cell_type}: {len(nodes_a)} vs {len(nodes_b)} nodes")
            continue
        for i, (node_a, node_b) in enumerate(zip(nodes_a, nodes_b)):
            for e, (edge_a, edge_b) in enumerate(zip(node_a, node_b)):
                if edge_a != edge_b:
                    diffs.append(f"cell {cell_type} node {i} edge {e}: {edge_a[0]}({input_name(edge_a[1])}) vs "
                                 f"{edge_b[0]}({input_name(edge_b[1])})")
    return diffs


def load_genotype(path: Union[str, Path], pool_ops: Optional[Sequence[str]] = None,
                  num_nodes: Optional[int] = None, cell_types: Optional[Sequence[str]] = None,
                  model_pool: Optional[str] = None) -> Genotype:
    """Read and validate a genotype file.

    ``pool_ops``: operations it may use (default: its named packaged pool, else all of ``OPS``); ``model_pool``:
    their pool's name, which errors name (a file of another pool is likely the other search's genotype);
    ``num_nodes``: required nodes per cell; ``cell_types``: cell types that must be present.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: genotype file not found (written by +stage=search_bone or search_head)")
    return genotype_from_text(path.read_text(), str(path), pool_ops=pool_ops, num_nodes=num_nodes,
                              cell_types=cell_types, model_pool=model_pool)
