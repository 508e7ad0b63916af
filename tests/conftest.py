"""Shared fixtures: the offline switch, an isolated results folder, the tiny random model."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from udasa_lib import REPO_ROOT  # noqa: E402
from udasa_lib.assets import assets_dir  # noqa: E402

SMOKE_CONFIG = REPO_ROOT / "configs" / "smoke.yaml"


@pytest.fixture
def results_root(tmp_path, monkeypatch) -> Path:
    """Every test that runs stages writes under its own tmp folder, never into results/."""
    root = tmp_path / "results"
    monkeypatch.setenv("UDASA_RESULTS", str(root))
    return root


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    path = assets_dir() / "tiny-random-llama"
    if not (path / "config.json").exists():
        pytest.fail(f"{path} is missing: run `make assets` (make test does it first)")
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_model_path):
    import torch

    from udasa_lib.models import load_causal_lm

    torch.set_num_threads(1)
    return load_causal_lm(str(tiny_model_path), "float32", "cpu")
