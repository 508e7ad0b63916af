"""The preliminary study: does our uncertainty track the sentiment task's ground truth?

UDASA validates its assumptions before training; we do too, on the one task with a
ground-truth reward. Two questions, both answered with 95 % bootstrap intervals resampled over
prompts (responses of one prompt share a prompt and a within-prompt normalisation, so they are
not independent):
  1. Spearman correlation between a response's combined uncertainty u and its reward
     (expected negative: more reliable, more positive);
  2. per stage, the share of pairs where the ground truth agrees with the preference
     (reward(chosen) > reward(rejected)); the conservative stage should agree most.
Each question also gets a test for 07_report's claims table: the within-prompt Spearman
correlation per prompt, against 0 with the paired machinery (`stats.paired_difference`: u is
normalised within a prompt, so the within-prompt correlation is the quantity the method relies
on); conservative against exploratory agreement as two independent samples of pairs
(`stats.independent_difference`).
Analysis only: the reward never reaches scoring or pair selection.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

PRELIM_FILE = "prelim.json"


def _cluster_bootstrap(groups: Sequence[str], statistic: Callable[[np.ndarray], float], n_boot: int,
                       seed: int) -> tuple[float, float]:
    """2.5 and 97.5 percentiles of `statistic(row_indices)` over resamples of whole groups."""
    rng = np.random.default_rng(seed)
    names = sorted(set(groups))
    members = {g: np.flatnonzero(np.asarray(groups) == g) for g in names}
    values = []
    for _ in range(n_boot):
        chosen = rng.choice(len(names), size=len(names), replace=True)
        rows = np.concatenate([members[names[c]] for c in chosen])
        value = statistic(rows)
        if np.isfinite(value):
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def spearman_with_ci(u: Sequence[float], reward: Sequence[float], groups: Sequence[str], n_boot: int = 1000,
                     seed: int = 0) -> dict:
    from scipy.stats import spearmanr

    u, reward = np.asarray(u, float), np.asarray(reward, float)

    def rho(rows):
        return float(spearmanr(u[rows], reward[rows]).statistic) if len(set(u[rows])) > 1 else float("nan")

    low, high = _cluster_bootstrap(groups, rho, n_boot, seed)
    return {"spearman": rho(np.arange(len(u))), "ci_low": low, "ci_high": high, "n_responses": len(u),
            "n_prompts": len(set(groups))}


def within_prompt_spearman(u: Sequence[float], reward: Sequence[float], groups: Sequence[str],
                           n_resamples: int = 2000, seed: int = 0) -> dict:
    """Spearman(u, reward) within each prompt (prompts where either is constant are left out), and
    their mean against 0: `stats.paired_difference` over prompts, plus the per-prompt values."""
    from scipy.stats import spearmanr

    from udasa_lib.stats import paired_difference

    u, reward, groups = np.asarray(u, float), np.asarray(reward, float), np.asarray(groups)
    per_prompt = {}
    for group in dict.fromkeys(groups.tolist()):
        rows = groups == group
        if len(set(u[rows])) > 1 and len(set(reward[rows])) > 1:
            per_prompt[str(group)] = float(spearmanr(u[rows], reward[rows]).statistic)
    values = np.asarray(list(per_prompt.values()))
    return {**paired_difference(values, np.zeros_like(values), n_resamples, seed), "per_prompt": per_prompt}


def stage_agreement_difference(pairs: Sequence[dict], reward_chosen: Sequence[float],
                               reward_rejected: Sequence[float], n_resamples: int = 2000, seed: int = 0,
                               stages: tuple[str, str] = ("conservative", "exploratory")) -> dict:
    """Agreement of the first stage minus the second's, as two independent samples of pairs."""
    from udasa_lib.stats import independent_difference

    agree = (np.asarray(reward_chosen) > np.asarray(reward_rejected)).astype(float)
    stage_of = np.asarray([p["stage"] for p in pairs])
    first, second = (agree[stage_of == name] for name in stages)
    return {"stages": list(stages), **independent_difference(first, second, n_resamples, seed)}


def agreement_by_stage(pairs: Sequence[dict], reward_chosen: Sequence[float], reward_rejected: Sequence[float],
                       n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Per stage (and overall): share of pairs with reward(chosen) > reward(rejected), with its CI."""
    agree = (np.asarray(reward_chosen) > np.asarray(reward_rejected)).astype(float)
    stages = np.asarray([p["stage"] for p in pairs])
    rows = []
    for name in ("conservative", "moderate", "exploratory", "all"):
        mask = np.ones(len(pairs), bool) if name == "all" else stages == name
        values = agree[mask]
        if len(values) == 0:
            continue
        ids = [str(i) for i in range(len(values))]  # one pair per prompt: pairs are the groups
        low, high = _cluster_bootstrap(ids, lambda rows: float(values[rows].mean()), n_boot, seed)
        rows.append({"stage": name, "pairs": int(len(values)), "agreement": float(values.mean()),
                     "ci_low": low, "ci_high": high,
                     "mean_delta_u": float(np.mean([p["delta_u"] for p, m in zip(pairs, mask) if m]))})
    return rows


def run_preliminary_study(run, task: str = "sentiment", n_boot: int = 1000) -> dict:
    """Read 03_pairs's responses and pairs of `task`, score them with 00_data's ground-truth
    reward, and write prelim.json; returns {"spearman": {...}, "agreement": [...], "responses": rows}."""
    import pandas as pd

    from udasa_lib.io import atomic_write_json, read_jsonl
    from udasa_lib.data import SENTIMENT_REWARD_FILE
    from udasa_lib.sentiment_reward import SentimentReward

    reward = SentimentReward.load(run.upstream["00_data"] / SENTIMENT_REWARD_FILE)
    responses = pd.DataFrame(read_jsonl(run.dir / "responses.jsonl"))
    responses = responses[responses["task"] == task].reset_index(drop=True)
    pairs = [p for p in read_jsonl(run.dir / "pairs.jsonl") if p["task"] == task]
    if responses.empty or not pairs:
        raise ValueError(f"preliminary study: no {task} responses or pairs in {run.dir}")
    responses["reward"] = reward.reward(responses["text"].tolist())
    reward_chosen = reward.reward([p["chosen"] for p in pairs])
    reward_rejected = reward.reward([p["rejected"] for p in pairs])
    result = {
        "task": task,
        "spearman_u_vs_reward": spearman_with_ci(responses["u"], responses["reward"], responses["prompt_id"],
                                                 n_boot, run.config.seed),
        "spearman_by_dimension": {d: spearman_with_ci(responses[d], responses["reward"], responses["prompt_id"],
                                                      n_boot, run.config.seed)
                                  for d in ("semantic", "factual", "value")},
        "agreement_by_stage": agreement_by_stage(pairs, reward_chosen, reward_rejected, n_boot, run.config.seed),
        "spearman_within_prompt": within_prompt_spearman(responses["u"], responses["reward"],
                                                         responses["prompt_id"], seed=run.config.seed),
        "agreement_difference": stage_agreement_difference(pairs, reward_chosen, reward_rejected,
                                                           seed=run.config.seed),
    }
    atomic_write_json(run.dir / PRELIM_FILE, result)
    run.add_to_manifest(preliminary_study=result)
    return {**result, "responses": responses}
