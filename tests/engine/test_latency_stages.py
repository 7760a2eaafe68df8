"""+stage=profile_ops and the latency-aware search at smoke-test size."""
import json

import pytest
import torch

from fsd_d2.engine.runner import run_stage
from fsd_d2.errors import ConfigError
from fsd_d2.nas.genotype import load_genotype
from fsd_d2.nas.latency_io import load_table

FAST = ("stage.warmup=0", "stage.repeats=1")


@pytest.fixture
def bone_table(compose_cfg, tmp_path):
    results = run_stage(compose_cfg("profile_ops", *FAST, output_dir=tmp_path / "profile"))
    return results["table"]


def test_profile_ops_writes_a_table_of_every_derived_cell(compose_cfg, tmp_path, bone_table):
    table = load_table(bone_table)
    assert bone_table.endswith("op_latency_bone.yaml") and table.pool == "bone8"
    assert [c.position.name for c in table.cells] == ["res3.normal0", "res3.reduce", "res4.normal0", "res4.reduce",
                                                      "res5.normal0", "res5.reduce"]
    assert (tmp_path / "profile" / "op_latency_bone.png").stat().st_size > 0
    cheapest = load_genotype(tmp_path / "profile" / "genotype_bone_cheapest.yaml", cell_types=["reduce"])
    assert cheapest == table.cheapest()
    head = run_stage(compose_cfg("profile_ops", "model=fsd_search_head", *FAST, output_dir=tmp_path / "head"))
    table = load_table(head["table"])
    assert table.kind == "head" and len(table.ops) == 13
    assert [c.position.name for c in table.cells] == ["head.normal0", "head.normal1", "head.reduce"]
    assert table.cells[0].position.inputs[0] == (32, 32, 8, 8)  # POST_NMS_TOPK_TEST ROIs of fpn_channels, 8x8


def test_profile_ops_needs_a_search_model(compose_cfg):
    with pytest.raises(ConfigError, match="model=fsd_search_bone .* or model=fsd_search_head"):
        run_stage(compose_cfg("profile_ops", "model=fpn_r50", *FAST))


def test_latency_aware_search_logs_and_reports_the_latency(compose_cfg, tmp_path, bone_table):
    out = tmp_path / "search"
    results = run_stage(compose_cfg("search_bone", "search.order=1", "search.latency_weight=1.0",
                                    f"search.latency_table={bone_table}", output_dir=out))
    report = results["latency"]
    assert report["table"] == bone_table and report["latency_weight"] == 1.0
    assert len(report["cells"]) == 6 and report["predicted_ms"] > 0 and report["measured_ms"] > 0
    assert report["predicted_ms"] == pytest.approx(sum(c["predicted_ms"] for c in report["cells"]))
    assert report["expected_ms"] < report["uniform_ms"]  # the alpha step lowered the expected latency
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert "expected_latency_ms" in metrics[-1] and metrics[-1]["arch_penalty"] > 0
    assert json.loads((out / "results.json").read_text())["latency"]["measured_ms"] == report["measured_ms"]


def test_a_zero_latency_weight_is_the_paper_search(compose_cfg, tmp_path, bone_table):
    plain = run_stage(compose_cfg("search_bone", "search.order=1", output_dir=tmp_path / "plain"))
    priced = run_stage(compose_cfg("search_bone", "search.order=1", f"search.latency_table={bone_table}",
                                   output_dir=tmp_path / "priced"))
    assert "latency" not in plain and priced["latency"]["predicted_ms"] > 0
    key = "backbone.bottom_up.arch.logits.reduce"
    alphas = [torch.load(tmp_path / run / "model_final.pth", map_location="cpu")["model"][key]
              for run in ("plain", "priced")]
    assert torch.equal(*alphas)


def test_latency_weight_without_a_fitting_table_stops_naming_both_keys(compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"search.latency_weight=0.5 needs search.latency_table=<op_latency_bone"):
        run_stage(compose_cfg("search_bone", "search.latency_weight=0.5"))
    head = run_stage(compose_cfg("profile_ops", "model=fsd_search_head", *FAST, output_dir=tmp_path / "head"))
    with pytest.raises(ConfigError, match=rf"{head['table']} is the op-latency table of the head search"):
        run_stage(compose_cfg("search_bone", "search.latency_weight=0.5", f"search.latency_table={head['table']}",
                              output_dir=tmp_path / "search"))
    with pytest.raises(ConfigError, match=r"search.latency_weight=-1.0: must be >= 0"):
        run_stage(compose_cfg("search_bone", "search.latency_weight=-1", output_dir=tmp_path / "negative"))


def test_a_tight_latency_target_derives_a_genotype_under_it(compose_cfg, tmp_path, bone_table):
    table = load_table(bone_table)
    floor = sum(table.predict(table.cheapest()))
    base = ("search_bone", "search.order=1", f"search.latency_table={bone_table}")
    plain = run_stage(compose_cfg(*base, output_dir=tmp_path / "plain"))  # no target: the search of before
    assert plain["latency"]["target_ms"] == 0.0
    target = round(floor + 0.25 * (plain["latency"]["predicted_ms"] - floor), 4)  # tight: a quarter above the floor
    repaired = run_stage(compose_cfg(*base, f"search.latency_target_ms={target}", output_dir=tmp_path / "repaired"))
    genotype = load_genotype(tmp_path / "repaired" / "genotype_bone.yaml")
    assert repaired["latency"]["predicted_ms"] == pytest.approx(sum(table.predict(genotype)))
    assert sum(table.predict(genotype)) <= target < plain["latency"]["predicted_ms"]
    assert repaired["latency"]["target_ms"] == target
    log = (tmp_path / "repaired" / "log.txt").read_text()  # each genotype written logs its repairs once
    assert log.count("latency target: the derived bone cells are predicted") == log.count("predicted latency") >= 1
    plain_cells = load_genotype(tmp_path / "plain" / "genotype_bone.yaml").cells
    for t, cell in genotype.cells.items():  # weight 0: the same alphas, so the repair alone changed ops, not inputs
        assert [[j for _, j in node] for node in cell.edges] == [[j for _, j in node] for node in plain_cells[t].edges]
    steered = run_stage(compose_cfg(*base, "search.latency_weight=1.0", f"search.latency_target_ms={target}",
                                    output_dir=tmp_path / "steered"))
    assert steered["latency"]["predicted_ms"] <= target


def test_an_unreachable_latency_target_stops_the_search_naming_the_key(compose_cfg, tmp_path, bone_table):
    floor = sum(load_table(bone_table).predict(load_table(bone_table).cheapest()))
    with pytest.raises(ConfigError, match=rf"search.latency_target_ms=0.01 is below the {floor:.2f} ms .* set "
                                          rf"search.latency_target_ms to at least {floor:.2f}"):
        run_stage(compose_cfg("search_bone", f"search.latency_table={bone_table}", "search.latency_target_ms=0.01",
                              output_dir=tmp_path / "search"))
    with pytest.raises(ConfigError, match=r"search.latency_target_ms=5.0 needs search.latency_table=<op_latency_bone"):
        run_stage(compose_cfg("search_bone", "search.latency_target_ms=5", output_dir=tmp_path / "no_table"))
