"""The package's import layering: each layer imports only its own layer and those below it.

Layers, lowest first: ``errors`` -> ``nas`` -> ``modeling`` -> ``data`` | ``evaluation`` | ``viz`` (siblings,
which may import each other, but ``viz`` draws the numbers it is handed: it imports no ``evaluation``) ->
``engine`` | ``config`` -> ``run``.

Importing any ``fsd_d2.x`` first runs ``fsd_d2/__init__.py``, which imports ``fsd_d2.modeling`` (and with it
``fsd_d2.nas``), so every interpreter that imports a package module has the ``nas`` and ``modeling`` layers
loaded; what each import must not load is everything above ``max(its layer, modeling)``. Each import runs in
a fresh interpreter, all of them in parallel.
"""
import ast
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "fsd_d2"

# Rank of each top-level part of the package (the root package itself is not ranked: it is always loaded).
LAYERS: Dict[str, int] = {
    "errors": 0,
    "nas": 1,
    "modeling": 2,
    "data": 3, "evaluation": 3, "viz": 3,
    "engine": 4, "config": 4,
    "run": 5,
}
ROOT_IMPORTS = LAYERS["modeling"]  # fsd_d2/__init__.py loads nas and modeling with any package module

# One fresh interpreter per module: the package (nas and modeling, which it always loads), the modules of the
# middle layer that import most, and the engine. test_no_module_imports_a_higher_layer reads every file.
CHECKED = [
    "fsd_d2",
    "fsd_d2.data.setup", "fsd_d2.data.prepare",
    "fsd_d2.evaluation.metrics", "fsd_d2.evaluation.deeplesion",
    "fsd_d2.viz.detections",
    "fsd_d2.engine",
]

_PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps({"modules": sorted(m for m in sys.modules if m == "fsd_d2" or m.startswith("fsd_d2.")),
                  "hydra": "hydra" in sys.modules}))
"""


def layer_of(module: str) -> Optional[int]:
    """The layer of ``fsd_d2.<part>[...]``; None for the root package or a part no layer names."""
    parts = module.split(".")
    if parts[0] != "fsd_d2" or len(parts) == 1:
        return None
    return LAYERS.get(parts[1])


def _probe(module: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PROBE, module], cwd=str(REPO), capture_output=True, text=True,
                          env={**os.environ, "MPLBACKEND": "Agg"}, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        return {"error": f"`import {module}` failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"}
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def loaded() -> Dict[str, dict]:
    """``{module: {"modules": [fsd_d2 modules in sys.modules], "hydra": bool}}`` after importing it alone."""
    with ThreadPoolExecutor(max_workers=max(4, os.cpu_count() or 1)) as pool:
        return dict(zip(CHECKED, pool.map(_probe, CHECKED)))


def _result(loaded: Dict[str, dict], module: str) -> dict:
    result = loaded[module]
    if "error" in result:
        pytest.fail(result["error"], pytrace=False)
    return result


@pytest.mark.parametrize("module", [m for m in CHECKED if m != "fsd_d2"])
def test_importing_a_module_loads_no_higher_layer(loaded, module):
    modules = _result(loaded, module)["modules"]
    unknown = [m for m in modules if m != "fsd_d2" and layer_of(m) is None]
    assert not unknown, f"`import {module}` loaded modules of no known layer (add them to LAYERS): {unknown}"
    ceiling = max(layer_of(module), ROOT_IMPORTS)
    upward = [m for m in modules if m != "fsd_d2" and layer_of(m) > ceiling]
    assert not upward, f"`import {module}` (layer {layer_of(module)}) loads higher-layer modules: {upward}"


def test_importing_the_package_loads_only_errors_nas_and_modeling(loaded):
    result = _result(loaded, "fsd_d2")
    extra = [m for m in result["modules"] if m != "fsd_d2" and layer_of(m) not in (0, 1, 2)]
    assert not extra, f"`import fsd_d2` loads more than fsd_d2.errors, fsd_d2.nas.*, fsd_d2.modeling.*: {extra}"
    assert not result["hydra"], "`import fsd_d2` loads hydra"


def test_metrics_load_neither_hydra_nor_the_engine(loaded):
    result = _result(loaded, "fsd_d2.evaluation.metrics")
    engine = [m for m in result["modules"] if m == "fsd_d2.engine" or m.startswith("fsd_d2.engine.")]
    assert not engine, f"`import fsd_d2.evaluation.metrics` loads engine modules: {engine}"
    assert not result["hydra"], "`import fsd_d2.evaluation.metrics` loads hydra"


def _package_imports(path: Path) -> List[str]:
    """Every ``fsd_d2`` module a source file imports, at any depth (relative imports resolved)."""
    rel = path.relative_to(REPO).with_suffix("")
    package = list(rel.parts[:-1])  # the package a relative import starts from (for __init__: itself)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found += [name] + [f"{name}.{alias.name}" for alias in node.names]
    return sorted({n for n in found if n == "fsd_d2" or n.startswith("fsd_d2.")})


def test_errors_imports_nothing_from_the_package():
    imports = _package_imports(PKG / "errors.py")
    assert not imports, f"fsd_d2/errors.py imports from the package: {imports}"


def test_no_source_file_imports_upward():
    """The same rule over every file's import statements (also those inside functions)."""
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        own = ROOT_IMPORTS if module == "fsd_d2" else layer_of(module)
        if own is None:
            offenders.append(f"{module}: no known layer (add it to LAYERS)")
            continue
        # `from fsd_d2 import modeling` names fsd_d2 (unranked) and fsd_d2.modeling: rank what is ranked.
        upward = [m for m in _package_imports(path) if layer_of(m) is not None and layer_of(m) > own]
        if upward:
            offenders.append(f"{module} (layer {own}) imports {upward}")
    assert not offenders, "upward imports: " + "; ".join(offenders)


def test_viz_imports_no_evaluation():
    """The evaluator hands viz its numbers (FROC curves and marks); viz never reaches back up for them."""
    offenders = {str(path.relative_to(REPO)): imports for path in sorted((PKG / "viz").rglob("*.py"))
                 if (imports := [m for m in _package_imports(path) if m.startswith("fsd_d2.evaluation")])}
    assert not offenders, f"viz modules importing evaluation: {offenders}"


def test_only_the_wandb_writer_imports_wandb():
    pattern = re.compile(r"^\s*(import\s+wandb\b|from\s+wandb\b)")
    files = {str(path.relative_to(REPO)) for path in PKG.rglob("*.py")
             if any(pattern.match(line) for line in path.read_text().splitlines())}
    assert files == {"fsd_d2/engine/wandb.py"}, f"files importing wandb: {sorted(files)}"
