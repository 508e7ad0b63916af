"""Principle-prompted samples (sample.tasks.<task>.principle_share): drawn with the principle as a
system turn, recorded and trained without it; share 0 draws what 01_sample always drew."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from udasa_lib import config as config_mod
from udasa_lib import generation, sample

from conftest import SMOKE_CONFIG

PROMPTS = {"harmful_train": ("h0", "How do I pick a lock?"), "benign_train": ("b0", "Name a colour.")}
PRINCIPLE = sample.load_principles("configs/principles.yaml", "system")["alignment"]
# 01_sample's alignment shard for PROMPTS on the tiny model (smoke config, k=3, 4 new tokens, seed 0),
# written by sample.py before principle_share existed: share 0 must still draw exactly these
BEFORE = [[[26035, 7083, 397, 13645], [34802, 15811, 7514, 1622], [32436, 25304, 43587, 31604]],
          [[34462, 28347, 34360, 42487], [15025, 20108, 17906, 10998], [27755, 10365, 41868, 47662]]]


def _run(tmp_path, overrides: dict | None = None) -> SimpleNamespace:
    """A 01_sample run of the two PROMPTS (one batch) without the chain: the smoke config, its own data."""
    data = tmp_path / "data"
    data.mkdir(parents=True, exist_ok=True)
    for split, (pid, text) in PROMPTS.items():
        (data / f"{split}.jsonl").write_text(json.dumps({"id": pid, "text": text}) + "\n")
    cfg = config_mod.resolve(SMOKE_CONFIG, {"sample.tasks.alignment.sources": {"harmful_train": 1, "benign_train": 1},
                                            "sample.tasks.alignment.max_new_tokens": 4, **(overrides or {})})
    return SimpleNamespace(config=cfg, upstream={"00_data": data}, dir=tmp_path / "out")


def _sample(run, model, tokenizer) -> list[dict]:
    sample.sample_task(run, "alignment", model, tokenizer, progress=False)
    path = run.dir / "shards" / "alignment" / "batch_00000.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _contains(ids: list[int], part: list[int]) -> bool:
    return any(ids[i:i + len(part)] == part for i in range(len(ids) - len(part) + 1))


def test_principle_count_rounds_half_up():
    cases = {(0.0, 4): 0, (0.25, 4): 1, (0.5, 3): 2, (0.3, 5): 2, (0.25, 6): 2, (0.1, 8): 1, (0.34, 3): 1, (1.0, 4): 4,
             (0.5, 5): 3, (0.25, 2): 1, (0.58, 25): 15}  # half up, not half to even; no float drift
    assert {case: config_mod.principle_count(*case) for case in cases} == cases


def test_share_zero_draws_what_the_stage_drew_before(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    run = _run(tmp_path, {"sample.tasks.alignment.principle_share": 0.0})
    records = _sample(run, model, tokenizer)
    assert [[r["token_ids"] for r in record["responses"]] for record in records] == BEFORE
    assert not any(r["principle"] for record in records for r in record["responses"])
    # and the recipe it always used: the plain prompts, K per prompt, the batch seed
    plain = [record["prompt_token_ids"] for record in records]
    again = sample.generate_batch(model, tokenizer, plain, k=3, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=4,
                                  seed=generation.batch_seed(0, "alignment", 0))
    assert [[r["token_ids"] for r in rs] for rs in again] == BEFORE


def test_principle_samples_see_the_principle_and_records_do_not(tiny_model, tmp_path, monkeypatch):
    model, tokenizer = tiny_model
    calls = []
    real = sample.generate_batch

    def recording(model, tokenizer, prompt_ids, **kwargs):
        out = real(model, tokenizer, prompt_ids, **kwargs)
        calls.append({"prompt_ids": [list(p) for p in prompt_ids], "k": kwargs["k"], "out": out})
        return out

    monkeypatch.setattr(sample, "generate_batch", recording)
    run = _run(tmp_path, {"sample.k": 4, "sample.tasks.alignment.principle_share": 0.5})
    records = _sample(run, model, tokenizer)
    principle_ids = tokenizer(PRINCIPLE, add_special_tokens=False)["input_ids"]
    (plain_call,) = [c for c in calls if not _contains(c["prompt_ids"][0], principle_ids)]
    (principle_call,) = [c for c in calls if _contains(c["prompt_ids"][0], principle_ids)]
    assert plain_call["k"] == principle_call["k"] == 2
    for i, ((pid, text), record) in enumerate(zip(PROMPTS.values(), records)):
        plain = generation.format_prompt(tokenizer, text, True)
        assert record["formatted_prompt"] == plain and PRINCIPLE not in record["formatted_prompt"]
        assert record["prompt_token_ids"] == generation.encode_prompt(tokenizer, plain) == plain_call["prompt_ids"][i]
        assert not _contains(record["prompt_token_ids"], principle_ids)
        context = principle_call["prompt_ids"][i]
        with_principle = generation.format_prompt(tokenizer, text, True, system=PRINCIPLE)
        assert context == generation.encode_prompt(tokenizer, with_principle)
        assert [r["principle"] for r in record["responses"]] == [True, True, False, False]
        assert [r["sample_id"] for r in record["responses"]] == [f"{pid}-s{j}" for j in range(4)]
        drawn = principle_call["out"][i] + plain_call["out"][i]
        assert [r["token_ids"] for r in record["responses"]] == [r["token_ids"] for r in drawn]
        # log-probs are those of the context each response was sampled in
        for response, prompt in zip(record["responses"], [context] * 2 + [record["prompt_token_ids"]] * 2):
            ids = torch.tensor([prompt + response["token_ids"]])
            with torch.no_grad():
                logits = model(ids).logits[0, len(prompt) - 1: -1]
            expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(response["token_ids"])[:, None])[:, 0]
            assert torch.allclose(expected, torch.tensor(response["token_logprobs"]), atol=1e-3)
    # deterministic: the same shard again, byte for byte
    again = _run(tmp_path / "again", {"sample.k": 4, "sample.tasks.alignment.principle_share": 0.5})
    assert _sample(again, model, tokenizer) == records


@pytest.mark.parametrize("k, share", [(3, 0.34), (3, 0.5), (4, 0.75), (4, 1.0)])
def test_principle_responses_per_prompt_are_share_times_k_rounded(tiny_model, tmp_path, k, share):
    model, tokenizer = tiny_model
    records = _sample(_run(tmp_path, {"sample.k": k, "sample.tasks.alignment.principle_share": share}),
                      model, tokenizer)
    n = {(3, 0.34): 1, (3, 0.5): 2, (4, 0.75): 3, (4, 1.0): 4}[(k, share)]
    for record in records:
        assert len(record["responses"]) == k
        assert [r["principle"] for r in record["responses"]] == [True] * n + [False] * (k - n)
    (row,) = sample.summarize(records)
    assert row["principle_share"] == round(n / k, 3)


def test_shares_of_the_shipped_configs():
    """default.yaml: half of alignment's K (chosen by measurement, README "Pool coverage"), none on
    raw-text sentiment; paper.yaml: the paper's plain sampling."""
    shares = {path.name: {task: t.principle_share for task, t in config_mod.resolve(path).sample.tasks.items()}
              for path in (SMOKE_CONFIG.parent / "default.yaml", SMOKE_CONFIG.parent / "paper.yaml")}
    assert shares == {"default.yaml": {"alignment": 0.5, "sentiment": 0.0},
                      "paper.yaml": {"alignment": 0.0, "sentiment": 0.0}}


@pytest.mark.parametrize("overrides, message", [
    ({"sample.tasks.alignment.principle_share": 1.5},
     r"sample\.tasks\.alignment\.principle_share: 1\.5 is out of range; must be in \[0, 1\]"),
    ({"sample.tasks.alignment.principle_share": -0.25},
     r"sample\.tasks\.alignment\.principle_share: -0\.25 is out of range"),
    ({"sample.tasks.sentiment.principle_share": 0.5},
     r"sample\.tasks\.sentiment\.principle_share: 0\.5 needs sample\.tasks\.sentiment\.chat_template: true"),
    ({"sample.tasks.alignment.principle_share": 0.1},  # smoke k = 3: 0.3 principle samples
     r"sample\.tasks\.alignment\.principle_share: 0\.1 x sample\.k \(3\) rounds to 0 of 3"),
    ({"sample.tasks.alignment.principle_share": 0.9},  # 2.7 -> all 3: "all" is written 1
     r"sample\.tasks\.alignment\.principle_share: 0\.9 x sample\.k \(3\) rounds to 3 of 3"),
    ({"sample.tasks.alignment.principle_share": True}, r"principle_share: expected a number"),
])
def test_bad_principle_shares_are_config_errors_naming_the_key(overrides, message):
    with pytest.raises(config_mod.ConfigError, match=message):
        config_mod.resolve(SMOKE_CONFIG, overrides)


def test_a_task_without_a_principle_is_an_error_naming_the_file(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    principles = tmp_path / "principles.yaml"
    principles.write_text("judge: {alignment: be safe}\nsystem: {sentiment: be positive}\n")
    run = _run(tmp_path, {"sample.tasks.alignment.principle_share": 0.5, "score.value.principles": str(principles)})
    with pytest.raises(ValueError, match=r"principle_share: score\.value\.principles \(.*\) has no system principle "
                                         r"for task 'alignment'"):
        sample.sample_task(run, "alignment", model, tokenizer, progress=False)


def test_a_principles_file_without_the_role_is_an_error_naming_the_file(tmp_path):
    principles = tmp_path / "principles.yaml"
    principles.write_text("alignment: be safe\n")  # the flat format before the judge/system roles
    with pytest.raises(ValueError, match=rf"{principles}: expected a section 'system' mapping task"):
        sample.load_principles(str(principles), "system")


def test_a_system_turn_needs_the_chat_template(tiny_model):
    _, tokenizer = tiny_model
    with pytest.raises(ValueError, match="a system message needs the chat template"):
        generation.format_prompt(tokenizer, "I thought this movie was", False, system=PRINCIPLE)
