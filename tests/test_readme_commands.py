"""Every ``python -m fsd_d2.run ...`` command in the READMEs composes with Hydra and converts to the CfgNode.

Commands are read from the fenced code blocks of ``README.md`` and ``projects/DeepLesion/README.md``
(continuation lines ending in ``\\`` joined, unquoted ``#`` comments dropped, ``$VAR`` expanded from the
``VAR="..."`` lines of the same files). Placeholders (``...``, ``<run>/...``, ``$DL``) become a dummy path,
``hydra.*`` overrides and ``--multirun`` are dropped, and a sweep ``key=a,b`` is composed with its first and
with its last value; so is a sweep that the command's experiment declares (``hydra.sweeper.params`` as a comma
list, e.g. a study's seeds and arms), unless the command sets that key itself. The generic synopsis
``+stage=<stage> [group=option ...]`` is skipped.
"""
import pickle
import re
import shlex
from pathlib import Path
from typing import Dict, List, NamedTuple, Tuple

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import fsd_d2.engine  # noqa: F401  (registers the stages)
from fsd_d2.config import build_cfg
from fsd_d2.engine.stages import get_stage, make_stage_args

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
READMES = [REPO / "README.md", REPO / "projects" / "DeepLesion" / "README.md"]
PLACEHOLDER = "/tmp/placeholder"
OUTPUT_DIR = "/tmp/readme_cmd"
ENTRY = ["python", "-m", "fsd_d2.run"]


class Command(NamedTuple):
    source: str  # file:line of the command's first line
    text: str  # the command as written (continuations joined, comment dropped)
    args: Tuple[str, ...]  # what follows `python -m fsd_d2.run`, variables expanded


def _code_lines(path: Path) -> List[Tuple[int, str]]:
    """(line number, logical line) of every fenced code block, continuation lines joined."""
    out, in_block, pending, start = [], False, "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_block, pending = not in_block, ""
            continue
        if not in_block:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    return out


def _variables() -> Dict[str, str]:
    """``NAME="value"`` assignments in the READMEs' code blocks (``COMMON`` of the DeepLesion study)."""
    found = {}
    for path in READMES:
        for _, line in _code_lines(path):
            match = re.fullmatch(r'\s*([A-Z_][A-Z0-9_]*)="([^"]*)"\s*(#.*)?', line)
            if match:
                found[match.group(1)] = match.group(2)
    return found


def readme_commands() -> List[Command]:
    variables = _variables()
    commands = []
    for path in READMES:
        for number, line in _code_lines(path):
            if " ".join(ENTRY) not in line:  # other blocks hold prose (an apostrophe is no shell quote)
                continue
            tokens = shlex.split(line, comments=True)
            starts = [i for i in range(len(tokens)) if tokens[i:i + len(ENTRY)] == ENTRY]
            if not starts:
                continue
            args = []
            for token in tokens[starts[0] + len(ENTRY):]:
                if re.fullmatch(r"\$[A-Za-z_]\w*", token) and token[1:] in variables:
                    args += shlex.split(variables[token[1:]])
                else:
                    args.append(token)
            commands.append(Command(f"{path.relative_to(REPO)}:{number}", " ".join(tokens), tuple(args)))
    return commands


def _split_top_level(value: str) -> List[str]:
    """``a,b`` -> [a, b]; commas inside brackets, braces, parentheses or quotes do not split."""
    parts, depth, quote, current = [], 0, "", ""
    for ch in value:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += ch
    return parts + [current]


def overrides_of(args: Tuple[str, ...]) -> List[List[str]]:
    """The override lists to compose: one, or two (first and last sweep values) when the command sweeps."""
    first, last, sweeps = [], [], False
    for arg in args:
        if arg in ("--multirun", "-m", "...") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        if key.lstrip("+~").startswith("hydra."):
            continue
        if value == "..." or "<" in value or "$" in value:
            value = PLACEHOLDER
        values = _split_top_level(value)
        sweeps |= len(values) > 1
        first.append(f"{key}={values[0]}")
        last.append(f"{key}={values[-1]}")
    if not any(o.split("=", 1)[0].lstrip("+") == "output_dir" for o in first):
        first.append(f"output_dir={OUTPUT_DIR}")
        last.append(f"output_dir={OUTPUT_DIR}")
    return [first, last] if sweeps else [first]


COMMANDS = [c for c in readme_commands() if "+stage=<stage>" not in c.args]  # skip the generic synopsis
CASES = [pytest.param(overrides, id=f"{c.source} {c.text}" + (f" [sweep {i}]" if len(sets) > 1 else ""))
         for c in COMMANDS for sets in [overrides_of(c.args)] for i, overrides in enumerate(sets)]


def test_the_readmes_hold_the_commands():
    assert len(COMMANDS) >= 8, f"found only {len(COMMANDS)} commands: {[c.text for c in COMMANDS]}"
    assert {c.source.split(":")[0] for c in COMMANDS} == {str(p.relative_to(REPO)) for p in READMES}


def _weights_on_disk(overrides: List[str], folder: Path) -> List[str]:
    """``model.weights=<path>`` pointed at a stand-in file of the same kind (an empty caffe2 pickle or torch file):
    the config reads the weights' format from the file, and the READMEs' paths are placeholders."""
    out = []
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+") == "model.weights" and value:
            stand_in = folder / Path(value).name
            if stand_in.suffix == ".pkl":
                stand_in.write_bytes(pickle.dumps({}))
            else:
                torch.save({}, stand_in)
            override = f"{key}={stand_in}"
        out.append(override)
    return out


@pytest.mark.parametrize("overrides", CASES)
def test_readme_command_composes_and_converts(overrides, tmp_path):
    overrides = _weights_on_disk(overrides, tmp_path)
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        declared = compose("config", overrides=overrides, return_hydra_config=True).hydra.sweeper.get("params") or {}
        given = {o.split("=", 1)[0] for o in overrides}
        for pick in (0, -1):  # the declared sweep's first and last jobs
            swept = [f"{k}={_split_top_level(str(v))[pick]}" for k, v in declared.items()
                     if k not in given and "(" not in str(v)]  # a comma list; Optuna's choice(...) is its own
            hcfg = compose("config", overrides=overrides + swept)
            _composes_and_converts(hcfg)


def _composes_and_converts(hcfg) -> None:
    cfg = build_cfg(hcfg)
    assert cfg.FSD_STAGE == hcfg.stage.name
    stage = get_stage(hcfg.stage.name)
    options = OmegaConf.to_container(hcfg.stage, resolve=True)
    options.pop("name")
    make_stage_args(stage, {"resume": bool(hcfg.resume), "checkpoint": str(hcfg.checkpoint or "")}, options)
