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
    from udasa_lib.pipeline import results_root_at

    with results_root_at(tmp_path_factory.mktemp("shared-results")) as root:
        yield root


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


# a stage, or a stage's own work (00_data's splits and fitted scorers), makes a test a chain test
CHAIN_FIXTURES = {"smoke_data", "shared_results", "staged_smoke", "results_root", "base_run", "built", "fitted",
                  "splits", "reviews", "paper_chain"}
CHAIN_CALLS = ("pipeline.run_stage", "build_splits(")
MODEL_FIXTURES = {"tiny_model", "tiny_model_path", "smollm2", "smollm2_pairs", "policy_set", "two_adapters",
                  "tiny_gpt2", "llama3_style_tokenizer"}
EQUIVALENCE_WORDS = ("matches", "equals", "equal_", "agrees", "against_", "same_as")


def pytest_collection_modifyitems(config, items):
    """One layer marker per test from the fixtures it reaches (chain > tiny_model > unit), plus
    `equivalence` for tests that hold a computation to a reference (by name, or marked by hand)."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & CHAIN_FIXTURES or any(call in _source(item) for call in CHAIN_CALLS):
            item.add_marker(pytest.mark.chain)
        elif fixtures & MODEL_FIXTURES:
            item.add_marker(pytest.mark.tiny_model)
        else:
            item.add_marker(pytest.mark.unit)
        if any(word in item.name for word in EQUIVALENCE_WORDS):
            item.add_marker(pytest.mark.equivalence)


def _source(item) -> str:
    import inspect

    try:
        return inspect.getsource(item.function)
    except (OSError, TypeError, AttributeError):
        return ""


# The acceptance test of byte-stability runs the whole smoke chain a second time in another
# folder (about 7 minutes on one core): started as soon as the session is collected, it runs
# beside the suite, whose stages use one torch thread, instead of after it.
ELSEWHERE = pytest.StashKey()
ELSEWHERE_TEST = "test_the_smoke_chain_in_another_folder_gives_the_same_products_and_keys"


# The same for configs/paper_smoke.yaml's chain (about 6 minutes), which tests/test_paper_smoke.py
# checks: it has its own results folder, so it never waits on the suite's stage locks.
PAPER_CHAIN = pytest.StashKey()


def pytest_collection_finish(session):
    import tempfile

    if any(item.name == ELSEWHERE_TEST for item in session.items):
        from test_stability import start_elsewhere

        base = Path(tempfile.mkdtemp(prefix="udasa-stability-"))
        session.config.stash[ELSEWHERE] = start_elsewhere(base)
    if any("paper_chain" in getattr(item, "fixturenames", ()) for item in session.items):
        from test_paper_smoke import start_paper_chain

        base = Path(tempfile.mkdtemp(prefix="udasa-paper-smoke-"))
        session.config.stash[PAPER_CHAIN] = start_paper_chain(base)


def pytest_sessionfinish(session):
    import shutil

    for key in (ELSEWHERE, PAPER_CHAIN):
        handle = session.config.stash.get(key, None)
        if handle is not None:
            process, root, _ = handle
            if process.poll() is None:
                process.kill()
                process.wait()
            shutil.rmtree(root.parent, ignore_errors=True)
