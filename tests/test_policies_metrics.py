"""Evaluation helpers: policy switching, KL, refusal detection, the results table, sweeps."""
from __future__ import annotations

import json

import numpy as np
import pytest

from udasa_lib import metrics, sweep
from udasa_lib.policies import PolicySet, generate, sequence_logprobs
from udasa_lib.config import ConfigError
from udasa_lib.io import atomic_write_jsonl


@pytest.fixture(scope="module")
def two_adapters(tiny_model_path, tmp_path_factory):
    """Two random (non-zero) LoRA adapters on the tiny model, saved like 04_train's final adapters."""
    import torch
    from peft import LoraConfig, get_peft_model

    from udasa_lib.models import load_causal_lm

    folders = {}
    for index, name in enumerate(("first", "second")):
        torch.manual_seed(index)
        base, _ = load_causal_lm(str(tiny_model_path), "float32", "cpu")
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        folders[name] = tmp_path_factory.mktemp(name)
        get_peft_model(base, lora).save_pretrained(folders[name])
    return folders


@pytest.fixture(scope="module")
def policy_set(tiny_model_path, two_adapters):
    from udasa_lib.models import load_causal_lm

    model, tokenizer = load_causal_lm(str(tiny_model_path), "float32", "cpu")
    return PolicySet(model, {"base": None, **two_adapters}), tokenizer


TEXTS = ["The movie was", "I think this film", "Honestly, the acting"]


@pytest.fixture(scope="module")
def prompt_ids(policy_set):
    from udasa_lib.generation import encode_prompt

    return [encode_prompt(policy_set[1], t) for t in TEXTS]


def _logits(model, tokenizer, text):
    import torch

    with torch.inference_mode():
        return model(**tokenizer(text, return_tensors="pt")).logits


def test_policy_set_switches_adapters_and_base_is_the_plain_model(policy_set, tiny_model_path):
    import torch

    from udasa_lib.models import load_causal_lm

    policies, tokenizer = policy_set
    plain, _ = load_causal_lm(str(tiny_model_path), "float32", "cpu")
    with policies.use("base") as model:
        base = _logits(model, tokenizer, TEXTS[0])
    with policies.use("first") as model:
        first = _logits(model, tokenizer, TEXTS[0])
    with policies.use("second") as model:
        second = _logits(model, tokenizer, TEXTS[0])
    torch.testing.assert_close(base, _logits(plain, tokenizer, TEXTS[0]))
    assert not torch.allclose(first, base) and not torch.allclose(first, second)
    with pytest.raises(KeyError, match="unknown policy 'third'"):
        with policies.use("third"):
            pass


def test_kl_of_a_policy_against_itself_is_zero(policy_set, prompt_ids):
    policies, tokenizer = policy_set
    with policies.use("first") as model:
        samples = generate(model, tokenizer, prompt_ids, max_new_tokens=6, batch_size=2, temperature=1.0,
                                    seed=3)
        completions = [s["token_ids"] for s in samples]
        logp_policy = sequence_logprobs(model, tokenizer, prompt_ids, completions, batch_size=2)
        logp_again = sequence_logprobs(model, tokenizer, prompt_ids, completions, batch_size=3)
    with policies.use("base") as model:
        logp_reference = sequence_logprobs(model, tokenizer, prompt_ids, completions)
    np.testing.assert_allclose(logp_policy - logp_again, 0.0, atol=1e-4)  # batching must not change it
    assert np.abs(logp_policy - logp_reference).max() > 1e-3  # a different policy is not zero


def test_sequence_logprobs_equal_a_manual_teacher_forced_sum(policy_set, prompt_ids):
    import torch

    policies, tokenizer = policy_set
    completion = tokenizer(" great fun", add_special_tokens=False)["input_ids"]
    with policies.use("second") as model:
        got = sequence_logprobs(model, tokenizer, prompt_ids[:2], [completion, completion[:1]])
        prompt = prompt_ids[0]
        ids = torch.tensor([prompt + completion])
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
    manual = sum(logp[len(prompt) - 1 + t, token].item() for t, token in enumerate(completion))
    assert got[0] == pytest.approx(manual, abs=1e-4)


def test_seeded_sampling_repeats_and_greedy_is_deterministic(policy_set, prompt_ids):
    policies, tokenizer = policy_set
    with policies.use("first") as model:
        a = generate(model, tokenizer, prompt_ids, max_new_tokens=5, batch_size=2, temperature=1.0, seed=1)
        b = generate(model, tokenizer, prompt_ids, max_new_tokens=5, batch_size=2, temperature=1.0, seed=1)
        g1 = generate(model, tokenizer, prompt_ids, max_new_tokens=5, batch_size=3)
        g2 = generate(model, tokenizer, prompt_ids, max_new_tokens=5, batch_size=1)
    assert a == b
    assert [g["token_ids"] for g in g1] == [g["token_ids"] for g in g2]


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
    harmful = [{"p_aligned": 0.9, "refusal": True}, {"p_aligned": 0.2, "refusal": False},
               {"p_aligned": 0.4, "refusal": False}, {"p_aligned": 0.7, "refusal": True}]
    benign = [{"p_aligned": 0.9, "refusal": True}, {"p_aligned": 0.9, "refusal": False}]
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
    with pytest.raises(FileNotFoundError, match="no evaluation stage"):
        metrics.results_table(tmp_path / "empty")


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


def test_metric_rows_keep_order_of_fields(tmp_path):
    row = metrics.metric_row("sentiment", "base", "reward", [0.2, 0.4, 0.6], "05_eval_sentiment", 100, 0)
    assert list(row) == list(metrics.METRIC_FIELDS) and row["value"] == pytest.approx(0.4)
    atomic_write_jsonl(tmp_path / "m.jsonl", [row])


def test_samples_of_one_prompt_count_once_in_the_bootstrap():
    records = [{"id": "a", "reward": 1.0}, {"id": "b", "reward": 0.0}, {"id": "a", "reward": 0.0},
               {"id": "b", "reward": 0.0}, {"id": "c", "reward": 1.0}]
    assert metrics.per_prompt_means(records, "reward") == [0.5, 0.0, 1.0]


def test_the_seeds_sweep_reaches_every_evaluation():
    from udasa_lib import REPO_ROOT, pipeline

    seeds = sweep.load_sweep(REPO_ROOT / "configs" / "sweeps" / "seeds.yaml")
    reached, frontier = set(), [seeds.through]
    while frontier:
        stage = frontier.pop()
        reached.add(stage)
        frontier += [u for u in pipeline.STAGES[stage].upstream if u not in reached]
    assert {s for s in pipeline.STAGES if s.startswith("05_eval_")} <= reached
