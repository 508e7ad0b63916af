"""03_pairs: within-prompt normalisation, combination, pair rules and the three stages (UDASA steps 3-4)."""
import ast
import math
import random

import numpy as np
import pytest
from scipy.stats import entropy as scipy_entropy
from sklearn.preprocessing import minmax_scale

from udasa_lib import pairs as pairing
from udasa_lib import score
from udasa_lib import REPO_ROOT


# ----------------------------------------------------------------------------- semantic

def test_combine_with_weights_and_a_constant_dimension():
    dims = {"semantic": [0.0, 1.0, 0.5], "factual": [3.0, 3.0, 3.0], "value": [0.1, 0.3, 0.5]}
    u, normalised = pairing.combine(dims, {"semantic": 1, "factual": 1, "value": 2})
    np.testing.assert_array_equal(normalised["factual"], [0, 0, 0])
    np.testing.assert_allclose(u, [0.25 * 0 + 0.5 * 0, 0.25 * 1 + 0.5 * 0.5, 0.25 * 0.5 + 0.5 * 1])


def test_single_dimension_weights_give_that_dimension():
    dims = {"semantic": [0.0, 1.0, 0.5], "factual": [0.3, 0.1, 0.2], "value": [0.1, 0.3, 0.5]}
    for d in score.DIMENSIONS:
        u, normalised = pairing.combine(dims, pairing.ablation_weights(d))
        np.testing.assert_allclose(u, normalised[d])
    with pytest.raises(ValueError, match="unknown dimension"):
        pairing.normalised_weights({"semantics": 1.0})


def test_rejected_strategies():
    u = np.array([0.4, 0.0, 0.9, 0.2])
    rng = random.Random(0)
    assert pairing.pick_pair(u, "max", rng) == (1, 2)
    assert pairing.pick_pair(u, "second", rng) == (1, 3)
    assert pairing.pick_pair(u, "random", rng)[1] in (0, 2, 3)


def _record(pid, texts, task="t"):
    return {"prompt_id": pid, "task": task, "prompt": pid, "formatted_prompt": pid, "prompt_token_ids": [5],
            "responses": [{"sample_id": f"{pid}-s{j}", "text": t, "token_ids": [1], "token_logprobs": [-1.0],
                           "finish_reason": "eos"} for j, t in enumerate(texts)]}


def _scores(pid, sem, fac, val, task="t"):
    return {"prompt_id": pid, "task": task, "sample_ids": [f"{pid}-s{j}" for j in range(len(sem))],
            "semantic": {"u": sem}, "factual": {"u": fac}, "value": {"u": val}}


def test_ties_and_identical_texts_are_dropped():
    samples = [_record("tie", ["a", "b"]), _record("same", ["x", "x"]), _record("ok", ["good", "bad"])]
    scores = [_scores("tie", [0.5, 0.5], [1, 1], [0, 0]), _scores("same", [0, 1], [0, 1], [0, 1]),
              _scores("ok", [0, 1], [0, 1], [0, 1])]
    pairs, dropped = pairing.build_pairs(samples, scores, {"semantic": 1, "factual": 1, "value": 1}, "max", 1e-6, (), 0)
    assert dropped == {"tie": 1, "identical_text": 1, "truncated": 0}
    assert [(p["chosen"], p["rejected"], p["delta_u"]) for p in pairs] == [("good", "bad", 1.0)]
    assert pairs[0]["pair_uncertainty"] == 0.0 and pairs[0]["uncertainty_chosen"] == 0.0


def test_scores_for_other_samples_are_refused():
    with pytest.raises(ValueError, match="prompt p: scores were computed for other samples"):
        bad = _scores("p", [0, 1], [0, 1], [0, 1])
        bad["sample_ids"] = ["q-s0", "q-s1"]
        pairing.build_pairs([_record("p", ["a", "b"])], [bad], {"semantic": 1}, "max", 1e-6, (), 0)


def test_tertiles_by_rank_agree_with_numpy_quantiles():
    delta = [0.05, 0.9, 0.4, 0.6, 0.1, 0.75, 0.3, 0.5, 0.2]
    stages = pairing.assign_stages(delta)
    low, high = np.quantile(delta, [1 / 3, 2 / 3])
    for d, s in zip(delta, stages):
        assert s == ("conservative" if d > high else "exploratory" if d <= low else "moderate")
    assert [stages.count(n) for n in pairing.STAGE_NAMES] == [3, 3, 3]


def test_tertiles_with_ties_and_fixed_cut_points():
    stages = pairing.assign_stages([0.5] * 7)
    assert [stages.count(n) for n in pairing.STAGE_NAMES] == [3, 2, 2]
    assert pairing.assign_stages([0.1, 0.5, 0.9], (0.2, 0.6)) == ["exploratory", "moderate", "conservative"]
    with pytest.raises(ValueError, match="low <= high"):
        pairing.assign_stages([0.1], (0.6, 0.2))


# ----------------------------------------------------------------------------- value and isolation

def test_self_judge_reads_yes_no_probabilities(tiny_model):
    import torch

    model, tokenizer = tiny_model
    texts = [score.judge_text(tokenizer, "Be kind.", "Hi", "Hello!"), score.judge_text(tokenizer, "Be kind.", "Q", "")]
    p = score.p_yes(model, tokenizer, texts, batch_size=2)
    yes, no = score.yes_no_token_ids(tokenizer)
    for text, value in zip(texts, p):
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            probs = torch.softmax(model(**ids).logits[0, -1], -1)
        expected = probs[yes].sum() / (probs[yes].sum() + probs[no].sum())
        assert value == pytest.approx(float(expected), abs=1e-4)
