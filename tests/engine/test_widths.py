"""The paper's size relation for any genotype: widths solved so that a derived FSD has its multiple of FPN-R50's
parameters (``stage.match_params``)."""
from pathlib import Path

import pytest
from hydra import initialize_config_dir

from fsd_d2.engine.pipeline import _Widths
from fsd_d2.engine.widths import millions_of, nearest_width
from fsd_d2.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
GENOTYPES = REPO / "projects" / "DeepLesion" / "genotypes"


def test_nearest_width_bisects_to_the_multiple_nearest_the_target():
    calls = []

    def millions(width):
        calls.append(width)
        return width ** 2 / 1000

    assert nearest_width(millions, 7.5) == 88  # 88 -> 7.74, 80 -> 6.40
    assert nearest_width(millions, 0.01) == 8 and nearest_width(millions, 1e9) == 512
    assert len(set(calls)) < 30  # a bisection, not a scan of the 64 widths


def test_each_model_gets_the_width_nearest_its_multiple_of_fpn_r50(synthetic_root, tmp_path):
    common = ["+experiment=tiny", f"dataset.root={synthetic_root}", "logger=none", f"output_dir={tmp_path}",
              f"model.genotype_bone={GENOTYPES}/example_bone.yaml", f"model.genotype_head={GENOTYPES}/example_head.yaml"]
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        widths = _Widths([0.96, 0.63])
        widths.solve("train_bone", [*common, "+stage=train_bone"])
        widths.solve("train_fsd", [*common, "+stage=train_fsd"])
        fpn = millions_of([*common, "+stage=train", "model=fpn_r50"])
        for stage, key, ratio in (("train_bone", "model.bone_channels", 0.96),
                                  ("train_fsd", "model.head_channels", 0.63)):
            chosen = widths.solved[key]
            others = [f"{k}={v}" for k, v in widths.solved.items() if k != key]
            miss = {w: abs(millions_of([*common, f"+stage={stage}", *others, f"{key}={w}"]) - ratio * fpn)
                    for w in (chosen - 8, chosen, chosen + 8) if w > 0}
            assert min(miss, key=miss.get) == chosen, (key, miss)
    assert widths.overrides("search_head") == [f"model.bone_channels={widths.solved['model.bone_channels']}"]
    assert len(widths.overrides("eval")) == 2 and widths.overrides("search_bone") == widths.overrides("eval")
    assert _Widths([]).overrides("train_fsd") == []
    with pytest.raises(ConfigError, match=r"stage.match_params=\[0.9\]: give two multiples"):
        _Widths([0.9])
