"""The preliminary study's two tests (03_pairs), against scipy on hand-made data."""
import numpy as np
import pytest

from udasa_lib import prelim


def test_within_prompt_spearman_is_paired_over_prompts():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    groups = np.repeat([f"p{i}" for i in range(30)], 4)
    u = rng.uniform(size=120)
    reward = -u + rng.normal(0, 0.3, 120)  # lower uncertainty, higher reward
    reward[:4] = 1.0  # a prompt with a constant reward has no correlation: left out
    result = prelim.within_prompt_spearman(u, reward, groups, n_resamples=500, seed=0)
    assert result["n"] == 29 and "p0" not in result["per_prompt"]
    assert result["per_prompt"]["p3"] == pytest.approx(spearmanr(u[12:16], reward[12:16]).statistic)
    assert result["mean"] == pytest.approx(np.mean(list(result["per_prompt"].values())))
    assert result["mean"] < 0 and result["high"] < 0 and result["p"] < 0.01


def test_stage_agreement_difference_is_two_independent_samples():
    pairs = [{"stage": s} for s in ["conservative"] * 40 + ["exploratory"] * 40 + ["moderate"] * 5]
    chosen = np.r_[np.ones(36), np.zeros(4), np.ones(20), np.zeros(20), np.ones(5)]
    rejected = np.zeros(85)
    result = prelim.stage_agreement_difference(pairs, chosen, rejected, n_resamples=500, seed=0)
    assert result["stages"] == ["conservative", "exploratory"] and result["n"] == 80
    assert result["mean"] == pytest.approx(0.9 - 0.5) and result["low"] < 0.4 < result["high"]
    assert result["se"] == pytest.approx(np.sqrt(0.9 * 0.1 / 39 * 40 / 40 + 0.25 * 40 / 39 / 40), rel=1e-6)
    assert result["p"] < 0.01


def test_perfectly_separated_stages_are_still_tested():
    pairs = [{"stage": s} for s in ["conservative"] * 12 + ["exploratory"] * 12]
    chosen, rejected = np.r_[np.ones(12), np.zeros(12)], np.zeros(24)
    result = prelim.stage_agreement_difference(pairs, chosen, rejected, n_resamples=500, seed=0)
    assert (result["mean"], result["low"], result["high"], result["se"]) == (1.0, 1.0, 1.0, 0.0)
    assert result["p"] < 0.01
