"""03_pairs's control pair sets: the oracle follows the ground truth, the random set is a seeded coin flip."""
import json
from collections import Counter

import pytest

from conftest import SMOKE_CONFIG
from test_pairs import _record, _scores
from udasa_lib import controls, pipeline
from udasa_lib.io import read_jsonl

WEIGHTS = {"semantic": 1, "factual": 1, "value": 1}


def test_oracle_pairs_take_the_best_and_worst_response_by_the_ground_truth():
    samples = [_record("a", ["meh", "great", "awful", "fine"], "sentiment"),
               _record("b", ["x", "y", "z"], "sentiment"),
               _record("tie", ["p", "q"], "sentiment"),
               _record("skip", ["not", "graded"], "alignment")]
    scores = [_scores("a", [0.9, 0.1, 0.5, 0.2], [1, 0, 1, 0], [0, 0, 1, 1], "sentiment"),
              _scores("b", [0, 1, 2], [0, 1, 2], [0, 1, 2], "sentiment"),
              _scores("tie", [0, 1], [0, 1], [0, 1], "sentiment"),
              _scores("skip", [0, 1], [0, 1], [0, 1], "alignment")]
    rewards = {"a-s0": 0.4, "a-s1": 0.95, "a-s2": 0.05, "a-s3": 0.6,
               "b-s0": 0.2, "b-s1": 0.1, "b-s2": 0.9, "tie-s0": 0.5, "tie-s1": 0.5}
    pairs, dropped = controls.oracle_pairs(samples, scores, rewards, WEIGHTS)
    assert dropped["tie"] == 1 and {p["task"] for p in pairs} == {"sentiment"}
    by_prompt = {p["prompt_id"]: p for p in pairs}
    assert (by_prompt["a"]["chosen"], by_prompt["a"]["rejected"]) == ("great", "awful")
    assert (by_prompt["b"]["chosen"], by_prompt["b"]["rejected"]) == ("z", "y")
    for pair in pairs:
        assert pair["reward_chosen"] == max(rewards[s] for s in rewards if s.startswith(pair["prompt_id"] + "-"))
        assert pair["reward_chosen"] > pair["reward_rejected"]
    # u is the combined uncertainty's: in b it ranks z (the best by reward) worst, so delta_u < 0
    assert by_prompt["b"]["delta_u"] < 0 < by_prompt["a"]["delta_u"]
    assert controls.oracle_agreement(pairs) == {"pairs": 2, "u_agrees": 0.5}
    with pytest.raises(KeyError, match="a-s3"):
        controls.oracle_pairs(samples[:1], scores[:1], {k: v for k, v in rewards.items() if k != "a-s3"}, WEIGHTS)


def _pairs(n):
    samples = [_record(f"p{i}", [f"good {i}", f"bad {i}"]) for i in range(n)]
    scores = [_scores(f"p{i}", [0, 1], [0, 1], [0, 1]) for i in range(n)]
    from udasa_lib import pairs as pairing

    return pairing.build_pairs(samples, scores, WEIGHTS, "max", 1e-6, (), 0)[0]


def test_random_direction_is_a_seeded_fair_coin_on_the_same_pairs():
    pairs = _pairs(400)
    first, again, other = (controls.random_direction(pairs, seed) for seed in (0, 0, 1))
    assert first == again and [p["flipped"] for p in first] != [p["flipped"] for p in other]
    flips = Counter(p["flipped"] for p in first)
    assert 160 < flips[True] < 240  # Binomial(400, 1/2): 4.5 sd each side
    for original, control in zip(pairs, first):
        assert {control["chosen"], control["rejected"]} == {original["chosen"], original["rejected"]}
        if control["flipped"]:
            assert control["chosen"] == original["rejected"] and control["chosen_token_ids"] == original["rejected_token_ids"]
            assert control["delta_u"] == -original["delta_u"] and control["u_chosen"] == original["u_rejected"]
            assert control["semantic_chosen"] == original["semantic_rejected"]
        else:
            assert control == {**original, "flipped": False}
    # a pair's flip does not depend on the other pairs
    assert controls.random_direction(pairs[5:6], 0)[0] == first[5]


def test_03_pairs_writes_both_control_sets_on_the_smoke_run(smoke_data):
    for stage in ("01_sample", "02_score", "03_pairs"):
        run = pipeline.run_stage(stage, SMOKE_CONFIG)
    oracle = read_jsonl(run.dir / controls.ORACLE_FILE)
    randomised = read_jsonl(run.dir / controls.RANDOM_FILE)
    combined = read_jsonl(run.dir / "pairs.jsonl")
    assert oracle and {p["task"] for p in oracle} == {"sentiment"}
    assert [p["pair_id"] for p in randomised] == [p["pair_id"] for p in combined]
    summary = json.loads((run.dir / "summary.json").read_text())
    assert summary["oracle"]["pairs"] == len(oracle) and summary["random"]["flipped"] == sum(p["flipped"] for p in randomised)
