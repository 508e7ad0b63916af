"""01_sample on the tiny model: K responses with exact log-probs, seeded batches, resumable shards."""
import json

import pytest
import torch

from udasa_lib import generation, pipeline, sample
from udasa_lib.io import SchemaError, atomic_write_jsonl

from conftest import SMOKE_CONFIG


def test_k_responses_with_logprobs(tiny_model):
    model, tokenizer = tiny_model
    prompts = [generation.encode_prompt(tokenizer, generation.format_prompt(tokenizer, t, True))
               for t in ("Say hi.", "Name a colour please.")]
    out = sample.generate_batch(model, tokenizer, prompts, k=3, temperature=1.0, top_p=1.0, top_k=0,
                                max_new_tokens=6, seed=1)
    assert len(out) == 2 and all(len(responses) == 3 for responses in out)
    for responses in out:
        for r in responses:
            assert 1 <= len(r["token_ids"]) <= 6 and len(r["token_logprobs"]) == len(r["token_ids"])
            assert all(lp <= 0 for lp in r["token_logprobs"])
            assert r["finish_reason"] in ("eos", "length")


def test_logprobs_equal_a_teacher_forced_forward_pass(tiny_model):
    """The saved log-probs are log pi(y_t | x, y_<t) of the untempered policy, left padding included."""
    model, tokenizer = tiny_model
    prompts = [generation.encode_prompt(tokenizer, t) for t in ("Hello there, how are you", "Hi")]  # left padding
    out = sample.generate_batch(model, tokenizer, prompts, k=2, temperature=0.7, top_p=0.9, top_k=0,
                                max_new_tokens=5, seed=3)
    for prompt_ids, responses in zip(prompts, out):
        for r in responses:
            ids = torch.tensor([prompt_ids + r["token_ids"]])
            with torch.no_grad():
                logits = model(ids).logits[0, len(prompt_ids) - 1: -1]
            expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(r["token_ids"])[:, None])[:, 0]
            assert torch.allclose(expected, torch.tensor(r["token_logprobs"]), atol=1e-3)


def test_same_seed_same_samples(tiny_model):
    model, tokenizer = tiny_model
    kwargs = dict(k=2, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=5)
    hi = [generation.encode_prompt(tokenizer, "Hi")]
    a = sample.generate_batch(model, tokenizer, hi, seed=7, **kwargs)
    b = sample.generate_batch(model, tokenizer, hi, seed=7, **kwargs)
    c = sample.generate_batch(model, tokenizer, hi, seed=8, **kwargs)
    assert a == b and a != c


def test_resume_gives_the_uninterrupted_file(smoke_data):
    # an override of its own gives this test a 01_sample folder no other test touches
    stage = pipeline.open_stage("01_sample", SMOKE_CONFIG, {"sample.top_p": 0.99})
    sample.run_sampling(stage)
    full = (stage.dir / sample.SAMPLES_FILE).read_bytes()
    shards = sorted((stage.dir / "shards").rglob("*.jsonl"))
    assert len(shards) == 5  # alignment 5 prompts / 2 + sentiment 4 / 2
    mtimes = {p: p.stat().st_mtime_ns for p in shards}
    # simulate a kill after three batches: the later shards and the merged file never got written
    for path in shards[3:]:
        path.unlink()
    (stage.dir / sample.SAMPLES_FILE).unlink()
    result = sample.run_sampling(stage)
    assert (stage.dir / sample.SAMPLES_FILE).read_bytes() == full
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in shards[:3]), "finished batches were redone"
    assert sum(t["generated_batches"] for t in result["timing"]["per_task"].values()) == 2
    records = sample.load_samples(stage.dir / sample.SAMPLES_FILE)
    assert [len(r["responses"]) for r in records] == [3] * 9
    ids = [x["sample_id"] for r in records for x in r["responses"]]
    assert len(set(ids)) == len(ids)


def test_worker_processes_write_the_file_one_process_writes(smoke_data):
    import shutil

    one = pipeline.open_stage("01_sample", SMOKE_CONFIG, {"sample.top_p": 0.98})
    sample.run_sampling(one)
    alone = (one.dir / sample.SAMPLES_FILE).read_bytes()
    shutil.rmtree(one.dir / "shards")
    (one.dir / sample.SAMPLES_FILE).unlink()
    two = pipeline.open_stage("01_sample", SMOKE_CONFIG, {"sample.top_p": 0.98, "runtime.workers": 2})
    assert two.dir == one.dir, "runtime settings are not part of the stage key"
    result = sample.run_sampling(two)
    assert result["timing"]["workers"] == 2
    assert (two.dir / sample.SAMPLES_FILE).read_bytes() == alone


def test_malformed_samples_name_the_record(tmp_path):
    good = {"prompt_id": "p1", "task": "t", "prompt": "x", "formatted_prompt": "x", "prompt_token_ids": [5],
            "responses": []}
    path = atomic_write_jsonl(tmp_path / "samples.jsonl", [good])
    with pytest.raises(SchemaError, match=r"line 1 \(prompt p1\): empty response list"):
        sample.load_samples(path)
    bad = dict(good, responses=[{"sample_id": "p1-s0", "text": ""}])
    atomic_write_jsonl(path, [bad])
    with pytest.raises(SchemaError, match=r"prompt p1\) response 0: missing key 'token_ids'"):
        sample.load_samples(path)


def test_too_few_prompts_is_an_error(smoke_data):
    stage = pipeline.open_stage("01_sample", SMOKE_CONFIG, {"sample.tasks.sentiment.sources.sentiment_train": 999})
    with pytest.raises(ValueError, match="sentiment_train' has 16 prompts, 999 requested"):
        sample.run_sampling(stage)
