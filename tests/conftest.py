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
def shared_results(tmp_path_factory):
    """One results folder for the session: stage folders are content-addressed, so tests that
    run the same stage with the same config share it instead of recomputing it."""
    root = tmp_path_factory.mktemp("shared-results")
    previous = os.environ.get("UDASA_RESULTS")
    os.environ["UDASA_RESULTS"] = str(root)
    yield root
    if previous is None:
        os.environ.pop("UDASA_RESULTS", None)
    else:
        os.environ["UDASA_RESULTS"] = previous


@pytest.fixture(scope="session")
def smoke_data(shared_results):
    """00_data of the smoke config, run once (about a minute: it fits the harm probe)."""
    from udasa_lib import pipeline

    return pipeline.run_stage("00_data", SMOKE_CONFIG)


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
