"""Sweeps: YAML grids expanded into runs, the frontier plot, the seeds sweep."""
from __future__ import annotations

import json

import numpy as np
import pytest

from udasa_lib import metrics, sweep
from udasa_lib.policies import PolicySet, generate, sequence_logprobs
from udasa_lib.config import ConfigError
from udasa_lib.io import atomic_write_jsonl


def test_sweep_file_expands_to_points_and_rejects_bad_keys(tmp_path):
    loaded = sweep.load_sweep("configs/sweeps/sentiment_beta.yaml")
    points = sweep.points(loaded)
    assert [p["beta"] for p in points] == [0.03, 0.1, 0.3]
    overrides = sweep.point_overrides(loaded, points[0])
    assert overrides["train.beta.moderate"] == 0.03 and overrides["train.beta.unstaged"] == 0.03
    bad = tmp_path / "bad.yaml"
    bad.write_text("config: configs/smoke.yaml\nthrough: 05_eval_sentiment\n"
                   "grid: {beta: {keys: [train.beta.nonsense], values: [1]}}\n")
    with pytest.raises(ConfigError, match="nonsense"):
        sweep.load_sweep(bad)
    bad.write_text("config: configs/smoke.yaml\nthrough: 05_eval_sentiment\ngird: {}\n")
    with pytest.raises(ConfigError, match="unknown key 'gird'"):
        sweep.load_sweep(bad)


def test_frontier_plot_from_a_summary(tmp_path):
    import pandas as pd

    loaded = sweep.load_sweep("configs/sweeps/smoke_beta.yaml")
    rows = []
    for beta in (0.1, 0.5):
        for method in ("dpo", "udasa"):
            for metric, value in (("kl", beta * 2), ("reward", 0.5 + beta / 2)):
                rows.append({"task": "sentiment", "method": method, "metric": metric, "value": value,
                             "ci_low": value - 0.01, "ci_high": value + 0.01, "n": 8, "stage": "05_eval_sentiment",
                             "beta": beta})
    path = sweep.plot_frontier(pd.DataFrame(rows), loaded, tmp_path / "frontier.png")
    assert path.stat().st_size > 1000


def test_the_seeds_sweep_reaches_every_evaluation():
    from udasa_lib import REPO_ROOT, pipeline

    seeds = sweep.load_sweep(REPO_ROOT / "configs" / "sweeps" / "seeds.yaml")
    reached, frontier = set(), [seeds.through]
    while frontier:
        stage = frontier.pop()
        reached.add(stage)
        frontier += [u for u in pipeline.STAGES[stage].upstream if u not in reached]
    assert {s for s in pipeline.STAGES if s.startswith("05_eval_")} <= reached


@pytest.mark.parametrize("name", ["budget", "principle_share", "seeds", "sentiment_beta", "smoke_beta"])
def test_every_shipped_sweep_resolves_at_every_point(name):
    from udasa_lib import REPO_ROOT
    from udasa_lib import config as config_mod

    loaded = sweep.load_sweep(REPO_ROOT / "configs" / "sweeps" / f"{name}.yaml")
    for point in sweep.points(loaded):
        config_mod.resolve(REPO_ROOT / loaded.config, {**loaded.fixed, **sweep.point_overrides(loaded, point)})
