"""The benchmark scripts run end to end at smoke-test size, and the default-width rows of Table I share what their
models share: backbones, the FC head, and a graph of the same, bounded size on both heads."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import data_loading  # noqa: E402
import params  # noqa: E402
import performance  # noqa: E402
import search_cells  # noqa: E402
import search_cost  # noqa: E402


def _table(text: str):
    """Rows of the Markdown table in ``text`` (header and separator dropped), as lists of cell strings."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len(lines) > 2, f"no Markdown table in:\n{text}"
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def _positive(cells):
    values = [float(c) for c in cells]
    assert all(v > 0 for v in values), cells
    return values


def test_help_describes_both_scripts(capsys):
    for script in (search_cost, params, performance, data_loading):
        with pytest.raises(SystemExit) as done:
            script.main(["--help"])
        assert done.value.code == 0
        assert "--tiny" in capsys.readouterr().out


NO_OPS_ROW = "search, second order, cells of skip connections only"


def test_search_cost_tiny_prints_one_row_per_config():
    # One torch thread: with other jobs on the CPUs, multi-threaded steps stall (seconds instead of ms).
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "search_cost.py"), "--tiny", "--repeats", "1",
                           "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _table(proc.stdout)
    assert [r[0] for r in rows] == list(search_cost.CONFIGS)
    for r in rows:
        _positive(r[1:7])
    assert rows[0][2] == rows[0][4] == rows[0][6] == "1.00"  # the baseline is its own unit
    calls = {r[0]: (int(r[5]), [int(n) for n in r[7].split(" / ")]) for r in rows}
    assert calls["FPN-R50 training step (baseline)"][1][0] > 0  # its convolutions are counted
    # A second-order step runs the cells' convolutions more often than a first-order one; cells of skips run none.
    first, second = calls["search, first order"], calls["search, second order"]
    assert second[0] > first[0] and second[1][0] > first[1][0] > calls[NO_OPS_ROW][1][0]
    assert "search, second order" in proc.stderr  # progress goes to stderr, not into the table


def test_search_cost_in_turn_steps_the_named_configs_alternately_in_one_process():
    """--in-turn: only the named rows, stepped one after the other on every repeat (so a drifting machine slows
    them alike), each divided by the first."""
    first, separate = "search, first order", "search, first order, separate candidate ops"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "search_cost.py"), "--tiny", "--repeats", "2",
                           "--threads", "1", "--in-turn", separate, first], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _table(proc.stdout)
    assert [r[0] for r in rows] == [separate, first] and rows[0][2] == "1.00"
    assert float(rows[1][2]) == pytest.approx(float(rows[1][1]) / float(rows[0][1]), abs=0.02)
    calls = [line.split(": call ")[0].strip() for line in proc.stderr.splitlines() if ": call " in line]
    assert calls == [separate, first] * 3  # warm-up and two repeats, in turn


def test_search_cells_tiny_times_both_layouts_of_both_searches_on_one_input(monkeypatch):
    """Each search's searchable part in both layouts, fed the same tensor (the unit row first), with fewer
    operator calls batched."""
    fed = []
    step = search_cells._step
    monkeypatch.setattr(search_cells, "_step", lambda module, x: fed.append(x) or step(module, x))
    rows = search_cells.main(["--tiny", "--size", "64", "--rois", "16", "--repeats", "1", "--device", "cpu"])
    layouts = list(search_cells.LAYOUTS)
    assert [(r["search"], r["layout"]) for r in rows] == [(s, k) for s in ("bone", "head") for k in layouts]
    assert fed[0] is fed[1] and fed[2] is fed[3] and fed[0].shape == (2, 3, 64, 64) and fed[2].shape[0] == 2 * 16
    for unit, batched in (rows[:2], rows[2:]):
        assert unit["ratio"] == 1.0 and batched["ms"] > 0 and batched["calls"] < unit["calls"]


def test_data_loading_tiny_times_every_path():
    # A subprocess: the benchmark sets torch and OpenCV to one thread, as in one data-loader worker.
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "data_loading.py"), "--tiny", "--repeats", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _table(proc.stdout)
    assert [r[0] for r in rows] == list(data_loading.ROWS)
    raw, npy, png = rows
    _positive(raw[1:8])  # mapper, decode, window, resize, img/s, workers, MiB read
    assert raw[8] == "–"  # the raw slices are the dataset, no cache
    for r in (npy, png):
        assert r[3] == "–"  # a cached image is windowed already
        _positive(r[1:3] + r[4:])
    assert float(npy[4]) == float(raw[4]) == float(png[4])  # one resize, timed once for all paths


def test_params_tiny_table_with_flops_and_latency(capsys):
    params.main(["--tiny", "--flops", "--latency", "--deploy", "--size", "64", "--repeats", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    rows = _table(out)
    assert [r[0] for r in rows] == [label for label, *_ in params.ROWS]
    assert [r[6] for r in rows] == ["39.5", "37.8", "24.7", "–", "–"]  # the paper's Table I; none for graph models
    assert [r[4] for r in rows[:3]] == ["–"] * 3 and rows[3][4] == rows[4][4]  # graph column: only graph models
    for r in rows:
        total, backbone, head = _positive(r[1:4])
        _positive(r[5:6] + r[8:])
        assert total == pytest.approx(backbone + head, abs=0.016)
    for r in rows[:3]:  # each total over the paper's
        assert float(r[7]) == pytest.approx(float(r[1]) / float(r[6]), abs=1e-3)
    assert rows[0][5] == rows[0][10] == rows[0][12] == "1.00"  # FPN-R50 is the unit of the ratios
    assert "median of 1 after 1 warm-up" in out
    assert "Graph module parameters: FPN-R50 w/ graph (8 types) " in out


def test_default_width_rows_share_backbones_heads_and_graph_size():
    """What the rows hold in common, whatever the genotypes (the FSD / FPN-R50 ratio depends on the genotypes, here
    hand-written examples: benchmarks/params.py prints it, no test can vouch for it)."""
    rows = params.parameter_table(params.EXAMPLE_GENOTYPES / "example_bone.yaml",
                                  params.EXAMPLE_GENOTYPES / "example_head.yaml")
    fpn, fsd_bone, fsd, fpn_graph, fsd_graph = rows
    assert fsd_bone["backbone"] == fsd["backbone"]  # same genotype and width: only the head differs
    assert fsd_bone["head"] == fpn["head"]  # the FC head, shared with the baseline
    assert fsd["head"] < fpn["head"]  # FSD's cell head replaces it (not stacked on it)
    # Issue 11: the graph's own parameters are equal on the FC and the FSD head, and at most 1.1M.
    assert fpn_graph["graph_params"] == fsd_graph["graph_params"] <= 1.1e6, rows
    assert fpn_graph["backbone"] == fpn["backbone"] and fsd_graph["backbone"] == fsd["backbone"]
    # Issue 20: the default widths give the paper's Table I counts (37.8M and 24.7M) with the example genotypes.
    for row in (fsd_bone, fsd):
        assert row["total"] == pytest.approx(row["paper"], rel=params.PAPER_TOLERANCE), row


def test_solve_widths_recovers_the_widths_that_gave_the_counts():
    """Given the two totals of a known pair of widths, the solver finds that pair (tiny models, real builds)."""
    bone, head = params.EXAMPLE_GENOTYPES / "example_bone.yaml", params.EXAMPLE_GENOTYPES / "example_head.yaml"
    widths = ["model.bone_channels=16", "model.head_channels=24"]
    totals = [params.count_parameters(params.build_row_model(name, False, bone, head, widths, tiny=True))["total"]
              for name in ("fsd_bone", "fsd")]
    assert params.solve_widths(bone, head, tiny=True, targets=totals) == {"bone_channels": 16, "head_channels": 24}


def _ms(cell: str) -> float:
    value, unit = cell.split()
    return float(value) * (1000 if unit == "s" else 1)


def _count(cell: str) -> int:
    return int(cell.replace(",", ""))


def _met(ratio_or_rate: float, op: str, limit: float) -> str:
    return "yes" if (ratio_or_rate <= limit if op == "<=" else ratio_or_rate >= limit) else "**no**"


def test_performance_tiny_inference_rows_check_each_target_against_its_own_baseline():
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "performance.py"), "--tiny", "--inference-only",
                           "--repeats", "1", "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r[0]: r for r in _table(proc.stdout)}
    fpn = _ms(rows["inference, FPN-R50"][1])
    for label in ("inference, FSD, example genotypes", f"inference, {performance.LATENCY_TARGETED}"):
        fsd = rows[label]
        assert fsd[6] == "FPN-R50" and fsd[7] == "time <= 1.0"
        assert float(fsd[4]) == pytest.approx(_ms(fsd[1]) / fpn, abs=0.01)
        assert fsd[8] == _met(_ms(fsd[1]) / fpn, "<=", 1.0)  # the verdict follows the numbers
    assert not any(label.startswith(("search", "FPN-R50 training", "data loading")) for label in rows)
    # ONNX Runtime (the export extra): its FPN-R50 against PyTorch's, its FSD against its own FPN-R50.
    ort_fpn, ort_fsd = rows["inference, ONNX Runtime, FPN-R50"], rows["inference, ONNX Runtime, FSD, example genotypes"]
    assert ort_fpn[6] == "FPN-R50" and ort_fsd[6] == "ONNX Runtime, FPN-R50"
    assert float(ort_fsd[4]) == pytest.approx(_ms(ort_fsd[1]) / _ms(ort_fpn[1]), rel=0.05)
    assert "inference, ONNX Runtime, FSD, example genotypes, trained form" not in rows  # deployed forms only


@pytest.mark.parametrize("separate_calls, met", [(25_000, "yes"), (20_000, "yes"), (19_000, "**no**")])
def test_performance_step_rows_by_name_and_the_operator_call_target(monkeypatch, separate_calls, met):
    """The step rows take search_cost's measurements by name (whatever CONFIGS' order and length), divide each by its
    own baseline, and the operator-call row divides the batched first-order step by the separate one (<= 0.5)."""
    measured = {name: {"time_s": 1.0 + i, "peak_mb": 100.0 * (i + 1), "aten_calls": 1_000 * (i + 1)}
                for i, name in enumerate(search_cost.CONFIGS)}
    measured[performance.FIRST] = {"time_s": 4.0, "peak_mb": 300.0, "aten_calls": 10_000}
    measured[performance.SEPARATE] = {"time_s": 5.0, "peak_mb": 400.0, "aten_calls": separate_calls}
    monkeypatch.setattr(search_cost, "CONFIGS", {"a row added first": (), **search_cost.CONFIGS})

    def fake(name, *, batch, **_):
        return {k: v * batch // 2 for k, v in measured[name].items()}  # batch 4: twice batch 2's

    monkeypatch.setattr(search_cost, "measure_in_subprocess", fake)
    rows = {r["measure"]: r for r in performance.step_rows(performance.parse_args(["--tiny", "--device", "cpu"]))}
    table = {r[0]: r for r in _table(performance.format_table(list(rows.values())))}
    first, separate, base = (measured[n] for n in (performance.FIRST, performance.SEPARATE, performance.BASELINE_STEP))
    assert rows["search, first order, batch 2"]["ratio"] == first["time_s"] / base["time_s"]
    assert rows[f"{performance.SEPARATE}, batch 2"]["calls_ratio"] == separate["aten_calls"] / base["aten_calls"]
    calls = table[f"{performance.CALLS_ROW}, batch 2"]
    assert calls[1] == "4.000 s" and calls[4] == "0.80" and calls[9] == "10,000"  # the batched step, time vs separate
    assert calls[10] == f"{10_000 / separate_calls:.2f}" and calls[7:9] == ["calls <= 0.5", met]
    assert not any(label.startswith("a row added first") for label in rows)  # only the rows the table names


def test_performance_data_loading_rows_per_worker():
    threads = torch.get_num_threads()
    rows = performance.data_loading_rows(performance.parse_args(["--tiny", "--repeats", "1"]))
    assert torch.get_num_threads() == threads  # one thread while it measures, as one worker; this process's after
    table = _table(performance.format_table(rows))
    assert [r[0] for r in table] == [f"data loading per worker, {label}" for label in data_loading.ROWS[:2]]
    raw, cached = table
    for r in (raw, cached):
        ms = _ms(r[1])  # printed to 0.01 ms: images/s lies within what the rounded time allows
        assert 1000 / (ms + 0.005) <= float(r[2]) <= 1000 / (ms - 0.005)
    assert raw[7] == raw[8] == "" and cached[7] == "img/s >= 150" and cached[8] == _met(float(cached[2]), ">=", 150)


def test_performance_verdicts_follow_the_numbers():
    """A target is met when every check holds: at most for ratios, at least for rates; no check, no verdict."""
    def row(*checks):
        return {"measure": "m", "time": "1.0 ms", "images_s": 1.0, "mem": None, "ratio": None, "to": "",
                "checks": list(checks)}

    rows = [row(("calls", 0.5, "<=", 0.5)), row(("calls", 0.51, "<=", 0.5)), row(("img/s", 150.0, ">=", 150)),
            row(("img/s", 149.9, ">=", 150)), row(("time", 0.9, "<=", 1.0), ("mem", 0.6, "<=", 0.5)), row()]
    assert [r[7:9] for r in _table(performance.format_table(rows))] == [
        ["calls <= 0.5", "yes"], ["calls <= 0.5", "**no**"], ["img/s >= 150", "yes"], ["img/s >= 150", "**no**"],
        ["time <= 1.0 mem <= 0.5", "**no**"], ["", ""]]


@pytest.mark.parametrize("script", [search_cost, performance])
def test_mixed_precision_rows_need_cuda(script, capsys):
    with pytest.raises(SystemExit) as done:
        script.main(["--amp", "--device", "cpu"])
    assert done.value.code == 2 and "--amp needs CUDA" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_search_cost_tiny_in_mixed_precision_on_cuda():
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "search_cost.py"), "--tiny", "--repeats", "1", "--amp",
                           "--device", "cuda"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mixed precision" in proc.stdout and len(_table(proc.stdout)) == len(search_cost.CONFIGS)


def _event(name, device, us=0.0, kernels=()):
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    return SimpleNamespace(name=name, device_type=getattr(DeviceType, device),
                           time_range=SimpleNamespace(elapsed_us=lambda: us), kernels=list(kernels))


@pytest.mark.parametrize("listed_as", ["own events", "kernels of their CPU ops"])
def test_cuda_activity_counts_kernel_launches_and_busy_time_once(listed_as):
    """Kernels are launches, copies are not, both are GPU time; whichever way torch lists them, each counts once."""
    from collections import namedtuple

    device = [("void implicit_convolve_sgemm", 30.0), ("Memcpy HtoD (Pageable -> Device)", 5.0),
              ("elementwise_kernel", 2.5), ("Memset (Device)", 1.0)]
    if listed_as == "own events":
        events = [_event("aten::conv2d", "CPU"), *(_event(n, "CUDA", us) for n, us in device)]
    else:
        kernel = namedtuple("Kernel", ["name", "device", "duration"])
        events = [_event("aten::conv2d", "CPU", kernels=[kernel(n, 0, us) for n, us in device[:2]]),
                  _event("aten::add_", "CPU", kernels=[kernel(n, 0, us) for n, us in device[2:]])]
    assert search_cost.cuda_activity(events) == {"cuda_kernels": 2, "gpu_busy_us": 38.5}


def test_performance_cuda_step_rows_show_kernels_before_and_after_batching(monkeypatch):
    """On CUDA each step row has its kernels and the GPU's busy share of its median time; the operator-call row
    divides the batched step's kernels by the separate step's. CPU tables have no such columns."""
    measured = {name: {"time_s": 0.1, "peak_mb": 100.0, "aten_calls": 1_000, "cuda_kernels": 800,
                       "gpu_busy_us": 50_000.0} for name in search_cost.CONFIGS}
    measured[performance.FIRST].update(cuda_kernels=1_000, gpu_busy_us=20_000.0, time_s=0.08)
    measured[performance.SEPARATE].update(cuda_kernels=4_000, gpu_busy_us=20_000.0, time_s=0.2)
    monkeypatch.setattr(search_cost, "measure_in_subprocess", lambda name, **_: dict(measured[name]))
    rows = performance.step_rows(performance.parse_args(["--tiny", "--device", "cpu"]))
    table = {r[0]: r for r in _table(performance.format_table(rows))}
    assert table[f"{performance.CALLS_ROW}, batch 2"][11:14] == ["1,000", "0.25", "25 %"]
    assert table[f"{performance.SEPARATE}, batch 2"][11:14] == ["4,000", "", "10 %"]
    cpu_rows = [{k: v for k, v in r.items() if k not in ("kernels", "kernels_ratio", "busy")} for r in rows]
    assert "CUDA kernels" not in performance.format_table(cpu_rows)
