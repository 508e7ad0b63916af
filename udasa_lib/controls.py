"""The control pair sets of 03_pairs (docs/method.md, "Controls"): what the trained methods are
measured against besides base.

- `pairs_oracle.jsonl` (positive control, method dpo_oracle): from the same K samples per prompt,
  chosen = the response the ground-truth reward rates highest, rejected = the lowest, the DPO
  paper's protocol for controlled sentiment (Rafailov et al. 2023, App. C: preferences labelled by
  the sentiment classifier). It bounds what any self-labelling method can reach at this budget.
  Only tasks with a ground truth (methods.GROUND_TRUTH_TASKS) have one.
- `pairs_random.jsonl` (negative control, method dpo_random): the combined pairs with chosen and
  rejected swapped by a seeded coin flip per pair, so the same responses are trained on with a
  direction that carries no signal.

The oracle's labels come from the evaluator, so this module imports the ground truth; nothing that
scores, pairs or trains may import this module (tests/test_score.py's leakage guard), and only
dpo_oracle reads pairs_oracle.jsonl (methods.EVALUATOR_PAIR_SETS, checked by the same test).
"""
from __future__ import annotations

import random
from typing import Mapping, Sequence

import numpy as np

from udasa_lib.methods import GROUND_TRUTH_TASKS
from udasa_lib.pairs import STAGE_NAMES, assign_stages, combine, is_cut, pair_record
from udasa_lib.score import DIMENSIONS

ORACLE_FILE = "pairs_oracle.jsonl"
RANDOM_FILE = "pairs_random.jsonl"


def oracle_pairs(samples: Sequence[dict], scores: Sequence[dict], rewards: Mapping[str, float],
                 weights: Mapping[str, float], truncated: Mapping[str, str] | None = None,
                 tasks: Sequence[str] = GROUND_TRUTH_TASKS) -> tuple[list[dict], dict]:
    """Per prompt of `tasks`: chosen = argmax of the ground-truth reward over its K responses,
    rejected = argmin (ties to the lower index), in PAIR_SCHEMA plus reward_chosen / reward_rejected.
    u and delta_u are the combined uncertainty's (`weights`), kept for diagnostics: a negative
    delta_u is a pair the uncertainty would have ordered the other way. Stages are tertiles of the
    reward gap. `truncated` as in pairs.build_pairs. rewards: sample_id -> reward.

    Returns (pairs, dropped counts). Raises KeyError naming a response without a reward."""
    by_id = {s["prompt_id"]: s for s in scores}
    truncated = dict(truncated or {})
    pairs, dropped = [], {"tie": 0, "identical_text": 0, "truncated": 0}
    for record in samples:
        if record["task"] not in tasks:
            continue
        responses = record["responses"]
        missing = [r["sample_id"] for r in responses if r["sample_id"] not in rewards]
        if missing:
            raise KeyError(f"oracle pairs: no ground-truth reward for {missing[0]}")
        eligible = list(range(len(responses)))
        if truncated.get(record["task"], "keep") == "drop":
            eligible = [j for j in eligible if not is_cut(responses[j])]
            if len(eligible) < 2:
                dropped["truncated"] += 1
                continue
        reward = [rewards[r["sample_id"]] for r in responses]
        chosen = max(eligible, key=lambda j: (reward[j], -j))
        rejected = min(eligible, key=lambda j: (reward[j], j))
        if reward[chosen] <= reward[rejected]:
            dropped["tie"] += 1
            continue
        if responses[chosen]["text"].strip() == responses[rejected]["text"].strip():
            dropped["identical_text"] += 1
            continue
        score = by_id[record["prompt_id"]]
        raw = {d: score[d]["u"] for d in DIMENSIONS}
        u, normalised = combine(raw, weights)
        pair = pair_record(record, chosen, rejected, u, normalised, raw)
        pair.update(reward_chosen=float(reward[chosen]), reward_rejected=float(reward[rejected]))
        pairs.append(pair)
    for task in sorted({p["task"] for p in pairs}):
        members = [p for p in pairs if p["task"] == task]
        gaps = [p["reward_chosen"] - p["reward_rejected"] for p in members]
        for pair, name in zip(members, assign_stages(gaps)):
            pair["stage"] = name
    return pairs, dropped


def swap_direction(pair: dict) -> dict:
    """The same pair with chosen and rejected exchanged (texts, token ids, scores); delta_u negated."""
    out = dict(pair)
    for key, value in pair.items():
        if "chosen" in key and key.replace("chosen", "rejected") in pair:
            other = key.replace("chosen", "rejected")
            out[key], out[other] = pair[other], value
    out["delta_u"] = -pair["delta_u"]
    out["uncertainty_chosen"] = out["u_chosen"]
    out["pair_uncertainty"] = 1.0 - out["delta_u"]
    return out


def random_direction(pairs: Sequence[dict], seed: int) -> list[dict]:
    """Each pair kept or swapped by a fair coin seeded by (seed, pair_id), so a pair's flip does not
    depend on which other pairs exist; adds `flipped`. Stages are kept."""
    out = []
    for pair in pairs:
        flipped = random.Random(f"{seed}/{pair['pair_id']}").random() < 0.5
        out.append({**(swap_direction(pair) if flipped else pair), "flipped": flipped})
    return out


def summary_of(pairs: Sequence[dict], dropped: Mapping[str, int], tasks: Sequence[str]) -> dict:
    """The shape of 03_pairs's summary.json entries, for a control pair set."""
    return {"pairs": len(pairs), "dropped": dict(dropped),
            "stage_sizes": {f"{task}/{s}": sum(1 for p in pairs if p["task"] == task and p["stage"] == s)
                            for task in tasks for s in STAGE_NAMES}}


def oracle_agreement(pairs: Sequence[dict]) -> dict:
    """How often the uncertainty orders an oracle pair as the ground truth does (delta_u > 0)."""
    delta = np.asarray([p["delta_u"] for p in pairs], float)
    return {"pairs": int(len(delta)), "u_agrees": float((delta > 0).mean()) if len(delta) else None}


def run_controls(run) -> dict:
    """03_pairs's control pair sets: pairs_oracle.jsonl (ground-truth tasks) and pairs_random.jsonl,
    added to summary.json and the manifest. Returns {name: summary}."""
    import json

    from udasa_lib.data import SENTIMENT_REWARD_FILE
    from udasa_lib.io import atomic_write_json, atomic_write_jsonl, read_jsonl
    from udasa_lib.pairs import PAIRS_FILE, SUMMARY_FILE
    from udasa_lib.sample import SAMPLES_FILE, load_samples
    from udasa_lib.score import SCORES_FILE, load_scores
    from udasa_lib.sentiment_reward import SentimentReward

    cfg = run.config.pairs
    samples = load_samples(run.upstream["01_sample"] / SAMPLES_FILE)
    scores = load_scores(run.upstream["02_score"] / SCORES_FILE)
    tasks = sorted({r["task"] for r in samples})
    graded = [r for record in samples if record["task"] in GROUND_TRUTH_TASKS for r in record["responses"]]
    rewards = {}
    if graded:
        model = SentimentReward.load(run.upstream["00_data"] / SENTIMENT_REWARD_FILE)
        rewards = dict(zip((r["sample_id"] for r in graded), map(float, model.reward([r["text"] for r in graded]))))
    oracle, oracle_dropped = oracle_pairs(samples, scores, rewards, cfg.weights, cfg.truncated)
    randomised = random_direction(read_jsonl(run.dir / PAIRS_FILE), run.config.seed)
    atomic_write_jsonl(run.dir / ORACLE_FILE, oracle)
    atomic_write_jsonl(run.dir / RANDOM_FILE, randomised)
    summary = json.loads((run.dir / SUMMARY_FILE).read_text())
    controls = {
        "oracle": {**summary_of(oracle, oracle_dropped, tasks), "u_agrees_with_oracle": oracle_agreement(oracle)},
        "random": {**summary_of(randomised, {}, tasks), "flipped": sum(p["flipped"] for p in randomised)},
    }
    atomic_write_json(run.dir / SUMMARY_FILE, {**summary, **controls})
    run.add_to_manifest(control_pair_sets=controls)
    return controls
