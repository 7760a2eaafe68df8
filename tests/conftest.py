"""Shared fixtures: compose the project's Hydra config the way the CLI does, at smoke-test size."""
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from fsd_d2.config import register_config_groups

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
register_config_groups()  # offers Hydra the generated group bases and the packaged pools, as fsd_d2/run.py does


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> str:
    """One tiny synthetic DeepLesion folder for the whole session (generation is cached by parameters)."""
    return str(tmp_path_factory.mktemp("data") / "synthetic_tiny")


@pytest.fixture
def compose_cfg(tmp_path, synthetic_root):
    """``compose_cfg(stage, *overrides)`` -> the Hydra config of ``+stage=<stage> +experiment=tiny ...``."""

    def _compose(stage: str = "train", *overrides: str, output_dir=None):
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            return compose("config", overrides=[
                f"+stage={stage}", "+experiment=tiny", f"output_dir={output_dir or tmp_path}",
                f"dataset.root={synthetic_root}", *overrides])

    return _compose
