"""Stage 03: combine the three uncertainties, build preference pairs, split them into stages
(UDASA steps 3-4).

Per prompt, each dimension is min-max normalised over its K responses (a constant dimension
becomes 0: it cannot tell the responses apart), then u = sum_d w_d u_d with weights
normalised to sum to 1. chosen = argmin u; rejected by `rejected_strategy` (max, second
lowest, or random among the others); delta_u = u(rejected) - u(chosen) lies in [0, 1]. Pairs
whose delta_u is below epsilon (ties) or whose two texts are identical are dropped.
Stages by delta_u, per task: conservative = the largest third (the clearest preferences),
moderate, exploratory = the smallest third; or fixed cut points [low, high].

The same function with one-hot weights gives the per-dimension ablation pair sets.
"""
from __future__ import annotations

import random
from typing import Mapping, Sequence

import numpy as np

from udasa_lib.generation import FINISH_EOS
from udasa_lib.score import DIMENSIONS

STAGE_NAMES = ("conservative", "moderate", "exploratory")
PAIRS_FILE = "pairs.jsonl"
SUMMARY_FILE = "summary.json"  # pairs, drops and cut responses per pair set
PAIR_SCHEMA = {"pair_id": str, "task": str, "prompt": str, "formatted_prompt": str, "chosen": str, "rejected": str,
               "prompt_token_ids": list, "chosen_token_ids": list, "rejected_token_ids": list,
               "chosen_finish_reason": str, "rejected_finish_reason": str,
               "delta_u": float, "stage": str, "uncertainty_chosen": float, "pair_uncertainty": float}


def minmax_within(values: Sequence[float]) -> np.ndarray:
    """(v - min) / (max - min) over one prompt's K responses; all zeros when the values are constant."""
    v = np.asarray(values, dtype=float)
    span = v.max() - v.min()
    return np.zeros_like(v) if span <= 1e-12 else (v - v.min()) / span


def normalised_weights(weights: Mapping[str, float]) -> dict[str, float]:
    unknown = set(weights) - set(DIMENSIONS)
    if unknown:
        raise ValueError(f"pairs.weights: unknown dimension(s) {sorted(unknown)}; use {DIMENSIONS}")
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"pairs.weights must be non-negative with a positive sum, got {dict(weights)}")
    total = sum(weights.values())
    return {d: weights.get(d, 0.0) / total for d in DIMENSIONS}


def combine(dimension_scores: Mapping[str, Sequence[float]], weights: Mapping[str, float]) -> tuple[np.ndarray, dict]:
    """u per response and the per-dimension normalised scores it was built from."""
    w = normalised_weights(weights)
    normalised = {d: minmax_within(dimension_scores[d]) for d in DIMENSIONS}
    return sum(w[d] * normalised[d] for d in DIMENSIONS), normalised


def pick_pair(u: np.ndarray, strategy: str, rng: random.Random,
              eligible: Sequence[int] | None = None) -> tuple[int, int]:
    """(chosen, rejected) indices among `eligible` (default: all, at least two); ties in u break
    towards the lower index, so results are stable."""
    candidates = list(range(len(u))) if eligible is None else list(eligible)
    if len(candidates) < 2:
        raise ValueError(f"a pair needs two candidate responses, got {len(candidates)}")
    order = sorted(candidates, key=lambda i: (u[i], i))
    chosen = order[0]
    if strategy == "max":
        rejected = max(candidates, key=lambda i: (u[i], -i))
    elif strategy == "second":
        rejected = order[1]
    elif strategy == "random":
        rejected = rng.choice(order[1:])
    else:
        raise ValueError(f"pairs.rejected_strategy: unknown {strategy!r} (max, second, random)")
    return chosen, rejected


def assign_stages(delta_u: Sequence[float], cut_points: Sequence[float] = ()) -> list[str]:
    """Stage per pair. Tertiles by rank (largest delta_u first, index breaking ties) so the three
    stages are equal to within one pair even when delta_u values tie; or fixed [low, high]:
    conservative if delta_u > high, exploratory if delta_u <= low, else moderate."""
    n = len(delta_u)
    if cut_points:
        if len(cut_points) != 2 or cut_points[0] > cut_points[1]:
            raise ValueError(f"pairs.cut_points must be [low, high] with low <= high, got {list(cut_points)}")
        low, high = cut_points
        return ["conservative" if d > high else "exploratory" if d <= low else "moderate" for d in delta_u]
    ranked = sorted(range(n), key=lambda i: (-delta_u[i], i))
    stages = [""] * n
    for name, block in zip(STAGE_NAMES, np.array_split(np.array(ranked, dtype=int), 3)):
        for i in block:
            stages[int(i)] = name
    return stages


def is_cut(response: dict) -> bool:
    """The response ended at max_new_tokens, not with an EOS."""
    return response["finish_reason"] != FINISH_EOS


def pair_record(record: dict, chosen: int, rejected: int, u: np.ndarray, normalised: Mapping[str, np.ndarray],
                raw: Mapping[str, Sequence[float]]) -> dict:
    """One pair of PAIR_SCHEMA (stage added later) from a sampled record and two response indices,
    with the token ids as sampled and every dimension's score of both responses."""
    responses = record["responses"]
    delta = float(u[rejected] - u[chosen])
    pair = {
        "pair_id": f"{record['prompt_id']}-pair", "prompt_id": record["prompt_id"], "task": record["task"],
        "prompt": record["prompt"], "formatted_prompt": record["formatted_prompt"],
        "chosen": responses[chosen]["text"], "rejected": responses[rejected]["text"],
        "chosen_sample_id": responses[chosen]["sample_id"],
        "rejected_sample_id": responses[rejected]["sample_id"],
        "prompt_token_ids": record["prompt_token_ids"],
        "chosen_token_ids": responses[chosen]["token_ids"],
        "rejected_token_ids": responses[rejected]["token_ids"],
        "chosen_finish_reason": responses[chosen]["finish_reason"],
        "rejected_finish_reason": responses[rejected]["finish_reason"],
        "u_chosen": float(u[chosen]), "u_rejected": float(u[rejected]), "delta_u": delta,
        # UAL's per-sample uncertainty: of the chosen response for SFT; of the preference
        # itself for DPO, where a small gap is an uncertain preference.
        "uncertainty_chosen": float(u[chosen]), "pair_uncertainty": 1.0 - delta,
    }
    for d in DIMENSIONS:
        pair[f"{d}_chosen"] = float(normalised[d][chosen])
        pair[f"{d}_rejected"] = float(normalised[d][rejected])
        pair[f"{d}_raw_chosen"] = float(raw[d][chosen])
        pair[f"{d}_raw_rejected"] = float(raw[d][rejected])
    return pair


def build_pairs(samples: list[dict], scores: list[dict], weights: Mapping[str, float], strategy: str,
                epsilon: float, cut_points: Sequence[float], seed: int,
                truncated: Mapping[str, str] | None = None) -> tuple[list[dict], dict]:
    """Pairs of every task with their stage, plus a count of what was dropped and why.

    `truncated` maps task -> keep | drop (default keep): with drop, a response cut at max_new_tokens
    can be neither chosen nor rejected, and a prompt with fewer than two finished responses gives no
    pair. u is still normalised over all K responses, so the scores do not depend on the knob.
    Each pair carries the prompt's and both responses' token ids as sampled: what 04_train trains on.
    """
    by_id = {s["prompt_id"]: s for s in scores}
    rng = random.Random(seed)
    truncated = dict(truncated or {})
    pairs, dropped = [], {"tie": 0, "identical_text": 0, "truncated": 0}
    for record in samples:
        score = by_id.get(record["prompt_id"])
        if score is None:
            raise ValueError(f"prompt {record['prompt_id']}: in samples.jsonl but not in scores.jsonl")
        if score["sample_ids"] != [r["sample_id"] for r in record["responses"]]:
            raise ValueError(f"prompt {record['prompt_id']}: scores were computed for other samples")
        raw = {d: score[d]["u"] for d in DIMENSIONS}
        u, normalised = combine(raw, weights)
        responses = record["responses"]
        eligible = None
        if truncated.get(record["task"], "keep") == "drop":
            eligible = [j for j, r in enumerate(responses) if not is_cut(r)]
            if len(eligible) < 2:
                dropped["truncated"] += 1
                continue
        chosen, rejected = pick_pair(u, strategy, rng, eligible)
        delta = float(u[rejected] - u[chosen])
        texts = [r["text"] for r in responses]
        if delta < epsilon:
            dropped["tie"] += 1
            continue
        if texts[chosen].strip() == texts[rejected].strip():
            dropped["identical_text"] += 1
            continue
        pairs.append(pair_record(record, chosen, rejected, u, normalised, raw))
    for task in sorted({p["task"] for p in pairs}):
        members = [p for p in pairs if p["task"] == task]
        for pair, name in zip(members, assign_stages([p["delta_u"] for p in members], cut_points)):
            pair["stage"] = name
    return pairs, dropped


def cut_counts(samples: list[dict], pairs: list[dict], truncated: Mapping[str, str]) -> dict[str, dict]:
    """Per task: how many sampled responses and how many pairs' responses were cut at max_new_tokens."""
    out = {}
    for task in sorted({r["task"] for r in samples}):
        responses = [r for record in samples if record["task"] == task for r in record["responses"]]
        n_cut = sum(is_cut(r) for r in responses)
        mine = [p for p in pairs if p["task"] == task]
        chosen_cut = sum(p["chosen_finish_reason"] != FINISH_EOS for p in mine)
        rejected_cut = sum(p["rejected_finish_reason"] != FINISH_EOS for p in mine)
        out[task] = {
            "policy": truncated.get(task, "keep"),
            "responses": len(responses), "responses_cut": n_cut,
            "responses_cut_share": round(n_cut / max(1, len(responses)), 3),
            "pairs": len(mine), "pairs_chosen_cut": chosen_cut, "pairs_rejected_cut": rejected_cut,
            "pairs_any_cut": sum(p["chosen_finish_reason"] != FINISH_EOS or p["rejected_finish_reason"] != FINISH_EOS
                                 for p in mine),
        }
    return out


def ablation_weights(dimension: str) -> dict[str, float]:
    return {d: 1.0 if d == dimension else 0.0 for d in DIMENSIONS}


def response_table(samples: list[dict], scores: list[dict], weights: Mapping[str, float]) -> list[dict]:
    """One row per response: raw and normalised dimension scores and the combined u."""
    by_id = {s["prompt_id"]: s for s in scores}
    rows = []
    for record in samples:
        score = by_id[record["prompt_id"]]
        raw = {d: score[d]["u"] for d in DIMENSIONS}
        u, normalised = combine(raw, weights)
        for j, response in enumerate(record["responses"]):
            row = {"prompt_id": record["prompt_id"], "sample_id": response["sample_id"], "task": record["task"],
                   "text": response["text"], "u": float(u[j])}
            for d in DIMENSIONS:
                row[d] = float(normalised[d][j])
                row[f"{d}_raw"] = float(raw[d][j])
            rows.append(row)
    return rows


def pair_set_table(summary: Mapping[str, dict]):
    """summary.json as one row per pair set: pairs, drops, stage sizes; for the controls, the pairs
    flipped (random) and the share the combined u orders as the ground truth does (oracle)."""
    import pandas as pd

    return pd.DataFrame([{"pair set": name, "pairs": s["pairs"], **s["dropped"], **s["stage_sizes"],
                          "flipped": s.get("flipped", "-"),
                          "u agrees with oracle": (s.get("u_agrees_with_oracle") or {}).get("u_agrees", "-")}
                         for name, s in summary.items()])


def run_pairs(run) -> dict:
    """03_pairs: pairs.jsonl (combined weights), pairs_<dimension>.jsonl (ablations), responses.jsonl."""
    from udasa_lib.io import atomic_write_json, atomic_write_jsonl
    from udasa_lib.sample import SAMPLES_FILE, load_samples
    from udasa_lib.score import SCORES_FILE, load_scores

    cfg = run.config.pairs
    samples = load_samples(run.upstream["01_sample"] / SAMPLES_FILE)
    scores = load_scores(run.upstream["02_score"] / SCORES_FILE)
    pair_sets = {"combined": cfg.weights, **{d: ablation_weights(d) for d in DIMENSIONS}}
    summary = {}
    for name, weights in pair_sets.items():
        pairs, dropped = build_pairs(samples, scores, weights, cfg.rejected_strategy, cfg.tie_epsilon,
                                     cfg.cut_points, run.config.seed, cfg.truncated)
        atomic_write_jsonl(run.dir / (PAIRS_FILE if name == "combined" else f"pairs_{name}.jsonl"), pairs)
        counts = {f"{task}/{s}": sum(1 for p in pairs if p["task"] == task and p["stage"] == s)
                  for task in sorted({r["task"] for r in samples}) for s in STAGE_NAMES}
        summary[name] = {"pairs": len(pairs), "dropped": dropped, "stage_sizes": counts,
                         "cut": cut_counts(samples, pairs, cfg.truncated)}
    atomic_write_jsonl(run.dir / "responses.jsonl", response_table(samples, scores, cfg.weights))
    atomic_write_json(run.dir / SUMMARY_FILE, summary)
    run.add_to_manifest(pair_sets=summary)
    return summary
