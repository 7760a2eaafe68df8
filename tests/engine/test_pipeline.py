"""Algorithm 1 end to end at smoke-test size, then the multi-type fine-tuning and Fig. 4 on its result."""
import json
from pathlib import Path

import pytest
import torch
from detectron2.data import DatasetCatalog
from hydra import compose, initialize_config_dir

from fsd_d2.engine.runner import run_stage
from conftest import CONF_DIR


def _run(out, *overrides, root):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return run_stage(compose("config", overrides=[f"output_dir={out}", *overrides, "+experiment=tiny",
                                                      f"dataset.root={root}"]))


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory, synthetic_root):
    out = tmp_path_factory.mktemp("pipeline")
    common = f"stage.common_overrides=['+experiment=tiny','dataset.root={synthetic_root}']"
    _run(out, "+stage=pipeline", common, "stage.fsd_from_train_bone=true", root=synthetic_root)
    return out


def test_pipeline_runs_every_stage_on_the_previous_artifacts(pipeline_dir):
    for stage in ["0_search_bone", "1_train_bone", "2_search_head", "3_train_fsd", "4_eval"]:
        assert (pipeline_dir / stage / "results.json").exists(), stage
    assert (pipeline_dir / "0_search_bone" / "genotype_bone.yaml").exists()
    assert (pipeline_dir / "2_search_head" / "genotype_head.yaml").exists()
    fsd_cfg = (pipeline_dir / "3_train_fsd" / "d2_config.yaml").read_text()
    assert "NAME: FSDBoxHead" in fsd_cfg and "0_search_bone/genotype_bone.yaml" in fsd_cfg
    results = json.loads((pipeline_dir / "4_eval" / "results.json").read_text())
    assert "params_total" in next(iter(results.values()))["bbox"]


def test_head_search_leaves_the_frozen_backbone_untouched(pipeline_dir):
    trained = torch.load(pipeline_dir / "1_train_bone" / "model_final.pth", map_location="cpu")["model"]
    searched = torch.load(pipeline_dir / "2_search_head" / "model_final.pth", map_location="cpu")["model"]
    backbone = [k for k in trained if k.startswith("backbone.")]
    assert backbone
    for key in backbone:  # weights and BatchNorm statistics alike
        assert torch.equal(trained[key], searched[key]), key
    assert {k for k in searched if ".arch." in k} == {"roi_heads.box_head.arch.logits.normal",
                                                       "roi_heads.box_head.arch.logits.reduce"}


def test_fsd_starts_from_the_trained_backbone_and_only_its_head_is_new(pipeline_dir):
    trained = torch.load(pipeline_dir / "1_train_bone" / "model_final.pth", map_location="cpu")["model"]
    fsd = torch.load(pipeline_dir / "3_train_fsd" / "model_final.pth", map_location="cpu")["model"]
    convs = [k for k in trained if k.startswith("backbone.bottom_up.cells.") and k.endswith(".weight")
             and trained[k].dim() == 4]
    assert convs
    for key in convs:  # a few small steps later, still the trained weights (an independent init correlates ~0)
        a, b = trained[key].flatten(), fsd[key].flatten()
        assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.9, key
    assert fsd["roi_heads.box_predictor.cls_score.weight"].shape != trained["roi_heads.box_predictor.cls_score.weight"].shape


def test_rerun_skips_finished_stages(pipeline_dir, synthetic_root):
    stamp = (pipeline_dir / "1_train_bone" / "model_final.pth").stat().st_mtime_ns
    common = f"stage.common_overrides=['+experiment=tiny','dataset.root={synthetic_root}']"
    _run(pipeline_dir, "+stage=pipeline", common, "resume=true", root=synthetic_root)
    assert (pipeline_dir / "1_train_bone" / "model_final.pth").stat().st_mtime_ns == stamp


def test_finetune_graph_then_visualize(pipeline_dir, synthetic_root, tmp_path):
    genotypes = [f"model.genotype_bone={pipeline_dir}/0_search_bone/genotype_bone.yaml",
                 f"model.genotype_head={pipeline_dir}/2_search_head/genotype_head.yaml"]
    binary = pipeline_dir / "3_train_fsd" / "model_final.pth"
    results = _run(tmp_path / "ft", "+stage=finetune_graph", "model=fsd", *genotypes, f"checkpoint={binary}",
                   root=synthetic_root)
    metrics = results["deeplesion_types_test"]["bbox"]
    assert {"AP-BN", "AP_iobb-LV", "sens@4-LU"} <= set(metrics)
    ckpt = torch.load(tmp_path / "ft" / "model_final.pth", map_location="cpu")["model"]
    assert ckpt["roi_heads.box_predictor.cls_score.weight"].shape[0] == 9  # 8 types + background
    assert any(k.startswith("roi_heads.graph.") for k in ckpt)
    # No genotype files: visualize takes them from the checkpoint, which records what it was trained with.
    images = _run(tmp_path / "viz", "+stage=visualize", "model=fsd",
                  f"checkpoint={tmp_path / 'ft' / 'model_final.pth'}", "stage.num_images=2", root=synthetic_root)
    assert (tmp_path / "viz" / "genotype_head.yaml").read_text() == Path(genotypes[1].split("=")[1]).read_text()
    available = len(DatasetCatalog.get("deeplesion_types_test"))  # the tiny set's test split may hold just 1
    assert len(images["images"]) == min(2, available) >= 1
    for path in images["images"]:
        assert path.endswith(".png") and (tmp_path / "viz").joinpath(path.split("/")[-1]).stat().st_size > 0


def test_table3_multirun_collects_the_four_ablation_rows(pipeline_dir, synthetic_root, tmp_path):
    import subprocess
    import sys

    _run(tmp_path / "fpn", "+stage=train", root=synthetic_root)
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "fsd_d2.run", "--multirun", "+stage=finetune_graph", "+experiment=[tiny,table3]", f"dataset.root={synthetic_root}", f"hydra.sweep.dir={sweep}",
         f"table3.fpn_r50.checkpoint={tmp_path / 'fpn' / 'model_final.pth'}",
         f"table3.fsd.checkpoint={pipeline_dir / '3_train_fsd' / 'model_final.pth'}",
         f"table3.fsd.genotype_bone={pipeline_dir / '0_search_bone' / 'genotype_bone.yaml'}",
         f"table3.fsd.genotype_head={pipeline_dir / '2_search_head' / 'genotype_head.yaml'}"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table3 = (sweep / "table3.md").read_text()
    for row in ["FPN w/o Graph | IoU", "FPN w/ Graph | IoBB", "FSD w/o Graph | IoU", "FSD w/ Graph | IoBB"]:
        assert row in table3
    assert "| BN | AB | ME | LV | LU | KD | ST | PV | mAP |" in table3
    assert "Recall" in (sweep / "table4.md").read_text()


def test_an_experiment_for_the_pipeline_leaves_the_stages_their_own_options():
    from fsd_d2.engine.stages import get_stage, make_stage_args
    from fsd_d2.errors import ConfigError

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        hcfg = compose("config", overrides=["+stage=train_fsd", "+experiment=pipeline_small"])
    options = {k: v for k, v in hcfg.stage.items() if k != "name"}
    assert "stage_overrides" in options  # the experiment sets the pipeline's per-stage lists
    assert make_stage_args(get_stage("train_fsd"), {}, options) == make_stage_args(get_stage("train_fsd"), {}, {})
    with pytest.raises(ConfigError, match="stage.num_imagez is not an option of this stage"):
        make_stage_args(get_stage("visualize"), {}, {"num_imagez": 2})  # a typo still stops
