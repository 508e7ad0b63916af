"""The policies of a run: adapter switching, generation from prompt ids, teacher-forced log-probs and KL."""
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
