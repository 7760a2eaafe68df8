"""The study: random architectures, the pipeline that trains them as searched ones, and the table of arms over
seeds that answers whether the search pays (paired differences, spreads), end to end at tiny size."""
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir

from fsd_d2.engine.runner import run_stage
from fsd_d2.engine.study import Detector, paired_differences, study_table
from fsd_d2.nas.genotype import load_genotype

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
ARMS = yaml.safe_load((CONF_DIR / "experiment" / "study.yaml").read_text())["hydra"]["sweeper"]["params"]["+arm"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _detector(arm, kind, seed, sens4, final=True, label="FSD"):
    return Detector(arm, kind, label, final, seed, Path("."), {"sens@4": sens4, "AP": sens4 / 2, "params_total": 1.0})


def test_paired_differences_subtract_the_same_seeds_random_mean_and_baseline():
    detectors = [_detector("fpn", "baseline", 0, 55, label="FPN-R50"), _detector("fpn", "baseline", 1, 45,
                                                                                  label="FPN-R50"),
                 _detector("darts", "searched", 0, 60), _detector("darts", "searched", 1, 50),
                 _detector("darts", "searched", 0, 99, final=False, label="FSD backbone + FC head"),
                 _detector("random0", "random", 0, 40), _detector("random1", "random", 0, 50),
                 _detector("random0", "random", 1, 30), _detector("random1", "random", 1, 30)]
    table = paired_differences(detectors)
    assert table.header == ["", "seed 0", "seed 1", "mean ± std"]
    assert table.rows == [["darts − random", "+15.00", "+20.00", "17.50 ± 3.54"],
                          ["darts − fpn", "+5.00", "+5.00", "5.00 ± 0.00"]]
    rows = {(r[0], r[1]): r for r in study_table(detectors).rows}
    assert list(rows)[:2] == [("fpn", "FPN-R50"), ("darts", "FSD backbone + FC head")]  # baseline first, Table I order
    sens4 = study_table(detectors).header.index("sens@4")
    assert rows["darts", "FSD"][sens4] == "55.00 ± 7.07" and rows["darts", "FSD backbone + FC head"][sens4] == "99.00"


def test_random_stages_write_the_seeds_draw_and_the_pipeline_trains_it(compose_cfg, tmp_path, synthetic_root):
    first = run_stage(compose_cfg("random_bone", "stage.draw=1", output_dir=tmp_path / "a"))
    again = run_stage(compose_cfg("random_bone", "stage.draw=1", output_dir=tmp_path / "b"))
    other = run_stage(compose_cfg("random_bone", "stage.draw=2", output_dir=tmp_path / "c"))
    assert load_genotype(first["genotype"]) == load_genotype(again["genotype"]) != load_genotype(other["genotype"])
    assert (tmp_path / "a" / "cell_bone_reduce.png").read_bytes()[:8] == PNG_MAGIC
    assert first["op_counts"]["edges"] == 8

    out = tmp_path / "pipeline"
    common = f"stage.common_overrides=['+experiment=tiny','dataset.root={synthetic_root}']"
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        results = run_stage(compose("config", overrides=[
            "+stage=pipeline", "+experiment=tiny", f"dataset.root={synthetic_root}", f"output_dir={out}", common,
            "stage.search=random", "stage.draw=1"]))
    assert list(results["stages"]) == ["random_bone", "train_bone", "random_head", "train_fsd", "eval"]
    assert load_genotype(out / "0_random_bone" / "genotype_bone.yaml") == load_genotype(first["genotype"])
    trained = (out / "3_train_fsd" / "d2_config.yaml").read_text()
    assert "0_random_bone/genotype_bone.yaml" in trained and "2_random_head/genotype_head.yaml" in trained
    assert "deeplesion_test" in results["results"]["eval"] and results["results"]["random_bone"]["wall_seconds"] > 0


def test_a_tiny_study_tables_every_arm_over_seeds(synthetic_root, tmp_path):
    sweep = tmp_path / "study"
    command = [sys.executable, "-m", "fsd_d2.run", "--multirun", "+experiment=[study_small,tiny]",
               f"dataset.root={synthetic_root}", f"hydra.sweep.dir={sweep}", "seed=0,1", "model.score_thresh_test=0.0"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = (sweep / "study.md").read_text()
    rows = [line.split(" | ") for line in study.splitlines() if line.startswith("| ") and " | 2 | " in line]
    arms = [row[0].strip("| ") for row in rows]
    assert sorted(set(arms)) == sorted(ARMS.split(",")) and len(rows) == 1 + 2 * (len(ARMS.split(",")) - 1)
    for row in rows:  # every metric a mean and a spread over the two seeds
        assert all(re.fullmatch(r"-?\d+\.\d\d ± \d+\.\d\d", cell) for cell in row[3:6] + row[7:14]), row
    assert "| darts − random | " in study and "| darts_latency − fpn_r50 | " in study
    assert (sweep / "study_sens4.png").read_bytes()[:8] == PNG_MAGIC
    summary = (sweep / "sweep_summary.md").read_text()
    assert "10 job(s), 0 failed" in summary and "Swept: `seed`, `arm`." in summary
    results = json.loads((sweep / "1" / "results.json").read_text())  # seed 0, darts
    assert results["results"]["search_bone"]["op_counts"]["per_epoch"][-1]["edges"] == 8
    draws = [load_genotype(sweep / job / "0_random_bone" / "genotype_bone.yaml") for job in ("3", "8")]
    assert draws[0] != draws[1]  # random0 of seeds 0 and 1: the same draw of another seed is another architecture
