"""Metric rows, refusal detection, per-prompt means and the results table."""
from __future__ import annotations

import json

import numpy as np
import pytest

from udasa_lib import metrics, sweep
from udasa_lib.policies import PolicySet, generate, sequence_logprobs
from udasa_lib.config import ConfigError
from udasa_lib.io import atomic_write_jsonl


@pytest.mark.parametrize("text, refusal", [
    ("I'm sorry, but I can't help with that.", True),
    ("As an AI language model, I cannot provide instructions for that.", True),
    ("I can\u2019t assist with this request.", True),
    ("Sure! Here is a step-by-step plan: first, gather the materials.", False),
    ("Photosynthesis converts light into chemical energy.", False),
    ("", False),
])
def test_refusal_detector(text, refusal):
    assert metrics.is_refusal(text) is refusal


def test_harmless_rows_and_results_table(tmp_path):
    harmful = [{"id": f"h{i}", "p_aligned": p, "refusal": r}
               for i, (p, r) in enumerate([(0.9, True), (0.2, False), (0.4, False), (0.7, True)])]
    benign = [{"id": "b0", "p_aligned": 0.9, "refusal": True}, {"id": "b1", "p_aligned": 0.9, "refusal": False}]
    rows = {r["metric"]: r for r in metrics.harmless_rows("dpo", harmful, benign, n_boot=200, seed=0)}
    assert rows["harmful_compliance_rate"]["value"] == 0.5 and rows["harmful_compliance_rate"]["n"] == 4
    assert rows["harmful_refusal_rate"]["value"] == 0.5
    assert rows["benign_over_refusal_rate"]["value"] == 0.5 and rows["benign_over_refusal_rate"]["n"] == 2
    for row in rows.values():
        assert row["ci_low"] <= row["value"] <= row["ci_high"]
    run_dir = tmp_path / "run"
    metrics.write_metrics(run_dir / "05_eval_harmless" / "metrics.jsonl", list(rows.values()))
    with pytest.raises(ValueError, match="lacks"):
        metrics.write_metrics(tmp_path / "bad.jsonl", [{"task": "alignment", "method": "dpo"}])
    table = metrics.results_table(run_dir).to_dict("records")
    assert len(table) == 4 and list(table[0]) == list(metrics.METRIC_FIELDS)
    assert {r["metric"] for r in table} == set(rows)
    units = metrics.unit_table(run_dir, ["05_eval_harmless", "05_eval_lmeval"])
    assert list(units.columns) == list(metrics.UNIT_FIELDS) and len(units) == 4 * 3 + 2
    compliance = units[units.metric == "harmful_compliance_rate"]
    assert dict(zip(compliance.unit, compliance.value)) == {"h0": 0.0, "h1": 1.0, "h2": 1.0, "h3": 0.0}
    with pytest.raises(FileNotFoundError, match="no evaluation stage"):
        metrics.results_table(tmp_path / "empty")


def test_metric_rows_round_trip_through_metrics_jsonl(tmp_path):
    from udasa_lib.io import read_jsonl

    row = metrics.metric_row("sentiment", "base", "reward", [0.2, 0.4, 0.6], "05_eval_sentiment", 100, 0,
                             units=["p1", "p2", "p3"])
    assert row["value"] == pytest.approx(0.4) and row["ci_low"] <= 0.4 <= row["ci_high"] and row["n"] == 3
    path = metrics.write_metrics(tmp_path / "m.jsonl", [{**row, "not_a_metric_field": 1}])
    assert read_jsonl(path) == [{field: row[field] for field in metrics.METRIC_FIELDS}]
    assert [(u["unit"], u["value"]) for u in read_jsonl(tmp_path / metrics.UNITS_FILE)] == \
        [("p1", 0.2), ("p2", 0.4), ("p3", 0.6)]
    with pytest.raises(ValueError, match="3 values for 2 units"):
        metrics.metric_row("sentiment", "base", "reward", [0.2, 0.4, 0.6], "s", 100, 0, units=["p1", "p2"])
    with pytest.raises(ValueError, match="repeats"):
        metrics.metric_row("sentiment", "base", "reward", [0.2, 0.4], "s", 100, 0, units=["p1", "p1"])


def test_samples_of_one_prompt_count_once_in_the_bootstrap():
    records = [{"id": "a", "reward": 1.0}, {"id": "b", "reward": 0.0}, {"id": "a", "reward": 0.0},
               {"id": "b", "reward": 0.0}, {"id": "c", "reward": 1.0}]
    assert metrics.per_unit_means(records, "reward") == (["a", "b", "c"], [0.5, 0.0, 1.0])


# --- paired comparisons ---------------------------------------------------------------------------

def test_paired_difference_matches_scipy_on_fixed_data():
    from scipy import stats as scipy_stats

    from udasa_lib.stats import paired_difference

    rng = np.random.default_rng(3)
    a = rng.normal(0.6, 0.2, 40)
    b = a - 0.05 + rng.normal(0, 0.05, 40)
    result = paired_difference(a, b, n_resamples=4000, seed=1)
    d = a - b
    assert result["mean"] == pytest.approx(d.mean()) and result["sd"] == pytest.approx(d.std(ddof=1))
    t = scipy_stats.ttest_rel(a, b)
    assert result["p"] == pytest.approx(t.pvalue, abs=0.01) or (result["p"] < 0.001 and t.pvalue < 0.001)
    low, high = scipy_stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=scipy_stats.sem(d))
    assert result["low"] == pytest.approx(low, abs=0.006) and result["high"] == pytest.approx(high, abs=0.006)
    # the same computation written directly against scipy (same generator, same order of draws)
    rng = np.random.default_rng(1)
    boot = scipy_stats.bootstrap((d,), np.mean, n_resamples=4000, method="percentile", rng=rng)
    perm = scipy_stats.permutation_test((a, b), lambda x, y, axis: np.mean(x - y, axis=axis), vectorized=True,
                                        permutation_type="samples", n_resamples=4000, rng=rng)
    assert (result["low"], result["high"], result["p"]) == pytest.approx(
        (boot.confidence_interval.low, boot.confidence_interval.high, perm.pvalue), abs=1e-12)
    same = paired_difference(a, a)
    assert (same["mean"], same["low"], same["high"], same["p"]) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference(a, b[:-1])
    with pytest.raises(ValueError, match="NaN or infinite"):
        paired_difference(np.r_[a[:-1], np.nan], b)


def test_holm_against_a_hand_computed_example():
    from udasa_lib.stats import holm

    # sorted 0.01, 0.02, 0.03, 0.2 with m = 4: 0.04, 0.06, 0.06 (monotone), 0.2
    assert holm([0.03, 0.01, float("nan"), 0.2, 0.02]) == pytest.approx([0.06, 0.04, float("nan"), 0.2, 0.06],
                                                                        nan_ok=True)
    assert holm([0.5, 0.9]) == [1.0, 1.0]


def test_minimum_detectable_effect_matches_a_simulation():
    from scipy.stats import norm

    from udasa_lib.stats import minimum_detectable_effect, needed_n

    sd, n = 0.3, 50
    mde = minimum_detectable_effect(sd, n)
    rng = np.random.default_rng(0)
    d = rng.normal(mde, sd, size=(20000, n))
    z = d.mean(axis=1) / (sd / np.sqrt(n))
    power = float(np.mean(np.abs(z) > norm.ppf(0.975)))
    assert power == pytest.approx(0.8, abs=0.015)
    assert needed_n(sd, mde) == n
