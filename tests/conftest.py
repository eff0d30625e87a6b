"""Shared fixtures: compose configs with Hydra's compose API, as the CLI would."""

from __future__ import annotations

import os

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub in tests

from transferlab.cli import CONF_DIR  # noqa: E402
from transferlab.config import register_schemas  # noqa: E402

register_schemas()

# Small and quick, still real: digits, the CNN, a couple of epochs, CSV logging only.
FAST = ["logger=csv", "source.epochs=2", "target.epochs=2", "source.lr=1e-2", "target.lr=1e-2",
        "backbone.channels=[8,16]"]


def compose_config(overrides: list[str] | None = None):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides or []))


@pytest.fixture
def make_cfg(tmp_path):
    """Compose a fast config whose outputs (and stage cache) live under this test's tmp_path."""
    return lambda *overrides: compose_config(FAST + [f"paths.output_root={tmp_path / 'outputs'}"] + list(overrides))
