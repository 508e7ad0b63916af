"""Local AlpacaEval judge: agreement with alpaca_eval's win rate, option-probability reading,
order swapping, truncation, the length baseline and the bootstrap CI."""
from __future__ import annotations

import math
import types
from pathlib import Path

import numpy as np
import pytest

from udasa_lib import eval_winrate as winrate
from udasa_lib.stats import bootstrap_ci, bootstrap_mean_ci
from udasa_lib.eval_winrate import LocalJudge, length_preferences, win_rate

TABLE = [1, 2, 2, 1.5, 2, 1, 2]  # 4 policy wins, 2 base wins, 1 draw


def test_win_rate_agrees_with_alpaca_eval_and_hand_computation():
    ours = win_rate(TABLE)
    theirs = winrate._alpaca_eval().pairwise_to_winrate(TABLE)
    assert ours["win_rate"] == pytest.approx(float(theirs["win_rate"]))
    assert ours["win_rate"] == pytest.approx((4 + 0.5) / 7 * 100)
    assert (ours["n"], ours["n_wins"], ours["n_wins_base"], ours["n_draws"]) == (7, 4, 2, 1)
    assert ours["ci_low"] <= ours["win_rate"] <= ours["ci_high"]
    # weighted (continuous) preferences: mean of (p - 1)
    assert win_rate([1.2, 1.9])["win_rate"] == pytest.approx(55.0)


def test_win_rate_rejects_bad_input():
    with pytest.raises(ValueError, match="preferences"):
        win_rate([])
    with pytest.raises(ValueError, match=r"\[1, 2\]"):
        win_rate([1.0, 2.5])


def test_length_baseline():
    assert length_preferences(["aa", "a", "abc"], ["a", "aa", "xyz"]) == [1.0, 2.0, 1.5]
    assert win_rate(length_preferences(["aa", "a", "abc"], ["a", "aa", "xyz"]))["win_rate"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="outputs_2"):
        length_preferences(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="outputs_1"):
        length_preferences([], [])


def test_bootstrap_ci():
    mean, low, high = bootstrap_mean_ci([1, 2, 3, 4], seed=0)
    assert mean == 2.5 and 1 <= low <= mean <= high <= 4
    assert bootstrap_mean_ci([3.0] * 10) == (3.0, 3.0, 3.0)
    assert all(math.isnan(v) for v in bootstrap_mean_ci([]))
    # same seed -> same resamples: the general version with np.mean reproduces the vectorised one
    values = np.random.default_rng(1).normal(size=50)
    assert bootstrap_ci(values, np.mean, n_boot=500, seed=3) == pytest.approx(
        bootstrap_mean_ci(values, n_boot=500, seed=3))
    assert bootstrap_ci([5.0] * 7, np.median) == (5.0, 5.0, 5.0)


def test_water_fill_cap():
    assert winrate._water_fill_cap([5, 10], 20) is None
    assert winrate._water_fill_cap([5, 100, 100], 45) == 20  # the short text stays whole


@pytest.fixture(scope="module")
def judge(tiny_model):
    model, tokenizer = tiny_model
    return LocalJudge(model, tokenizer)


def _manual_p(model, tokenizer, instruction, first, second):
    """P(first-listed id "m"), P(second id "M") built without LocalJudge: template straight from the package."""
    import torch

    ae = winrate._alpaca_eval()
    import alpaca_eval

    path = Path(alpaca_eval.__file__).parent / "evaluators_configs/alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt"
    text = path.read_text()
    for key, value in (("instruction", instruction), ("output_1", first), ("output_2", second)):
        text = text.replace("{" + key + "}", value, 1)
    rendered = tokenizer.apply_chat_template(ae.prompt_to_chatml(text), tokenize=False, add_generation_prompt=True)
    ids = tokenizer(rendered, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].double()
    m, big_m = (tokenizer.encode(t, add_special_tokens=False)[0] for t in ("m", "M"))
    return torch.softmax(logits[[m, big_m]], dim=-1).tolist()


def test_judge_reads_option_probabilities(judge, tiny_model):
    model, tokenizer = tiny_model
    assert judge.identifier_ids == [tokenizer.encode(t, add_special_tokens=False)[0] for t in ("m", "M")]
    # different lengths, so left padding and batching (2 prompts per batch) are exercised
    items = [("Say hi.", "Hello there, friend!", "hi"),
             ("Add 2 and 3.", "5", "The sum of two and three is five."),
             ("Name a colour.", "Blue is a colour that many people like a lot.", "Red")]
    records = judge.judge_pairs(*map(list, zip(*items)), batch_size=2)
    for (instruction, out_1, out_2), rec in zip(items, records):
        p_normal = _manual_p(model, tokenizer, instruction, out_1, out_2)
        p_swapped = _manual_p(model, tokenizer, instruction, out_2, out_1)
        # output_2 wins: "M" in the normal order, "m" (listed first) in the swapped order
        assert rec["p_first_order"] == pytest.approx(p_normal[1], abs=1e-5)
        assert rec["p_swapped_order"] == pytest.approx(p_swapped[0], abs=1e-5)
        assert rec["p_first_listed"] == pytest.approx((p_normal[0] + p_swapped[0]) / 2, abs=1e-5)
        assert rec["preference"] == pytest.approx(1 + (p_normal[1] + p_swapped[0]) / 2, abs=1e-5)
    assert judge.preferences(*map(list, zip(*items))) == pytest.approx([r["preference"] for r in records])


class _BiasedModel:
    """Always puts all its mass on one token, whatever the prompt: a pure position-bias judge."""

    def __init__(self, token_id: int, vocab: int):
        import torch

        self.token_id, self.vocab, self._p = token_id, vocab, torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        return iter([self._p])

    def __call__(self, input_ids, **kwargs):
        import torch

        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.token_id] = 100.0
        return types.SimpleNamespace(logits=logits)


@pytest.mark.parametrize("favoured", ["m", "M"])
def test_position_biased_judge_gives_a_tie(tiny_model, favoured):
    _, tokenizer = tiny_model
    token = tokenizer.encode(favoured, add_special_tokens=False)[0]
    judge = LocalJudge(_BiasedModel(token, len(tokenizer)), tokenizer)
    records = judge.judge_pairs(["q1", "q2"], ["short", "a much longer answer"], ["a much longer answer", "x"])
    assert [r["preference"] for r in records] == [1.5, 1.5]
    assert records[0]["p_first_listed"] == pytest.approx(1.0 if favoured == "m" else 0.0)


def test_truncation_keeps_prompt_under_max_length(tiny_model):
    model, tokenizer = tiny_model
    judge = LocalJudge(model, tokenizer, max_length=400)
    instruction, long_out, short_out = "Say hi.", "hi " * 500, "hello"
    kept = judge._truncate([instruction, long_out, short_out])
    assert kept[0] == instruction and kept[2] == short_out and long_out.startswith(kept[1].strip())
    assert len(judge._encode(judge._render(*kept))) <= 400
    assert 1 <= judge.preferences([instruction], [long_out], [short_out])[0] <= 2
    with pytest.raises(ValueError, match="max_length"):
        LocalJudge(model, tokenizer, max_length=100).preferences(["a"], ["b"], ["c"])


def test_judge_argument_errors(judge):
    with pytest.raises(ValueError, match="instructions is empty"):
        judge.preferences([], [], [])
    with pytest.raises(ValueError, match="outputs_1"):
        judge.preferences(["a"], ["x", "y"], ["z"])
    with pytest.raises(ValueError, match="outputs_2"):
        judge.preferences(["a"], ["x"], [])
