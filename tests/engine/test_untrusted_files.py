"""A checkpoint or weights file is data: a crafted file that would run code when unpickled is refused at every
entry point (``checkpoint=`` of eval, train and search_head, ``resume=true``, ``model.weights=`` .pth and .pkl),
with a message naming it, and nothing it asked for runs."""
import os
import pickle
import shutil

import pytest
import torch

from fsd_d2.config import build_cfg
from fsd_d2.engine.runner import run_stage
from fsd_d2.errors import CheckpointError


class Payload:
    """What a malicious file holds: unpickling it calls os.system (here: touch a marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "code_ran"
    assert not path.exists()
    yield path
    assert not path.exists(), "a crafted file ran code"


def _crafted_pth(path, marker):
    torch.save({"model": {"backbone.weight": torch.zeros(1)}, "trainer": Payload(marker)}, path)
    return str(path)


def test_the_payload_would_run_if_unpickled(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("stage", ["eval", "train", "search_head"])
def test_checkpoint_option_refuses_a_crafted_file(compose_cfg, tmp_path, marker, stage):
    evil = _crafted_pth(tmp_path / "model_final.pth", marker)
    extra = ["model.genotype_bone=projects/DeepLesion/genotypes/example_bone.yaml"] if stage == "search_head" else []
    with pytest.raises(CheckpointError, match=rf"checkpoint {evil} was refused: it is not a plain file of weights"):
        run_stage(compose_cfg(stage, f"checkpoint={evil}", *extra, output_dir=tmp_path / "run"))


def test_a_pkl_checkpoint_is_not_unpickled(compose_cfg, tmp_path, marker):
    evil = tmp_path / "model.pkl"
    evil.write_bytes(pickle.dumps({"model": {"w": Payload(marker)}, "__author__": "x"}))
    with pytest.raises(CheckpointError, match=r"only \.pth checkpoints .* are loaded here"):
        run_stage(compose_cfg("eval", f"checkpoint={evil}", output_dir=tmp_path / "run"))


def test_resume_refuses_a_crafted_last_checkpoint(compose_cfg, tmp_path, marker):
    run = tmp_path / "run"
    run_stage(compose_cfg("train", output_dir=run))
    last = run / (run / "last_checkpoint").read_text().strip()
    _crafted_pth(last, marker)
    with pytest.raises(CheckpointError, match=rf"checkpoint {last} was refused"):
        run_stage(compose_cfg("train", "resume=true", output_dir=run))


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_imagenet_weights_refuse_a_crafted_file(compose_cfg, tmp_path, marker, suffix):
    evil = tmp_path / f"resnet50{suffix}"
    if suffix == ".pkl":
        evil.write_bytes(pickle.dumps({"conv1_w": Payload(marker)}))
    else:
        _crafted_pth(evil, marker)
    with pytest.raises(CheckpointError, match=rf"model.weights={evil} was refused: it is not a plain file of weights "
                                              rf"\(it asks for posix\.system\)"):
        build_cfg(compose_cfg("train", "model.init=imagenet", f"model.weights={evil}"))


def test_real_layout_files_still_load(compose_cfg, tmp_path):
    """The project's own checkpoints load with weights_only (train, then evaluate and resume from them)."""
    run = tmp_path / "run"
    run_stage(compose_cfg("train", output_dir=run))
    shutil.copy(run / "model_final.pth", tmp_path / "copy.pth")
    results = run_stage(compose_cfg("eval", f"checkpoint={tmp_path / 'copy.pth'}", output_dir=tmp_path / "eval"))
    assert "deeplesion_test" in results
    run_stage(compose_cfg("train", "resume=true", output_dir=run))
