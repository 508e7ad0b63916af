"""Token ids are the record between stages: what trl trains on is exactly what was sampled.

Pairs come from real sampling (the embedded SmolLM2 and the tiny model, which share a tokenizer),
on raw IMDb-style prefixes whose continuation starts with a space and on chat prompts; trl's data
preparation then runs through the project's own trainers for every objective, and the prompt and
completion ids in trl's batches are compared with the sampled ids. The same with a Llama-3-style
tokenizer (adds BOS, template writes BOS again): exactly one BOS.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from udasa_lib import config as config_mod
from udasa_lib import generation, sample, train
from udasa_lib.pairs import build_pairs, cut_counts

from conftest import SMOKE_CONFIG

RAW_PREFIXES = ["I thought this movie was", "This film is one of the", "The acting in this movie"]
CHAT_PROMPTS = ["Name a colour.", "How do I boil an egg?"]
METHODS = ["sft", "dpo", "ual_sft", "ual_dpo"]


def _samples(model, tokenizer, texts, chat: bool, task: str, seed: int, max_new_tokens: int = 8) -> list[dict]:
    formatted = [generation.format_prompt(tokenizer, t, chat) for t in texts]
    prompt_ids = [generation.encode_prompt(tokenizer, f) for f in formatted]
    out = sample.generate_batch(model, tokenizer, prompt_ids, k=3, temperature=1.0, top_p=1.0, top_k=0,
                                max_new_tokens=max_new_tokens, seed=seed)
    return [sample.sample_record(f"{task}{i}", task, t, f, ids, responses, f"{task}{i}")
            for i, (t, f, ids, responses) in enumerate(zip(texts, formatted, prompt_ids, out))]


def _pairs(samples: list[dict], truncated: dict | None = None) -> list[dict]:
    """build_pairs on made-up uncertainties: response j of every prompt gets u = j / K."""
    scores = []
    for record in samples:
        k = len(record["responses"])
        u = [j / k for j in range(k)]
        scores.append({"prompt_id": record["prompt_id"], "sample_ids": [r["sample_id"] for r in record["responses"]],
                       **{d: {"u": u} for d in ("semantic", "factual", "value")}})
    pairs, _ = build_pairs(samples, scores, {"semantic": 1, "factual": 1, "value": 1}, "max", 1e-6, (), 0, truncated)
    return pairs


def _trl_rows(tokenizer, pairs, method, tmp_path) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of every sequence in trl's training batches, through the
    project's trainer classes, trl's data preparation, column pruning and collator. The model is
    the tiny one (it shares SmolLM2's tokenizer); trl's data path does not depend on the weights."""
    from udasa_lib.assets import assets_dir
    from udasa_lib.models import load_causal_lm

    model, _ = load_causal_lm(str(assets_dir() / "tiny-random-llama"), "float32", "cpu")
    tokenizer.padding_side = "right"
    cfg = config_mod.resolve(SMOKE_CONFIG)
    spec = train.METHODS[method]
    epsilons = train.smoothing_for(pairs, spec, cfg.train.ual)
    records = train.training_records(pairs, spec, epsilons)
    args = train._trainer_args(cfg, "unstaged", tmp_path / method, spec.objective, "cpu", False, 1)
    trainer = train.build_trainer(train._new_adapter(model, cfg), tokenizer, records, args, spec)
    rows = []
    for batch in trainer.get_train_dataloader():
        if spec.smoothing:
            assert train.EPSILON_KEY in batch, "the per-sample epsilon must survive trl's column pruning"
        ids, attention = batch["input_ids"], batch["attention_mask"]
        if spec.objective == "sft":
            completion = batch["labels"] != -100
        else:
            completion = batch["completion_mask"].bool()
        for i in range(ids.size(0)):
            real = attention[i].bool()
            seq, done = ids[i][real].tolist(), completion[i][real].tolist()
            first = done.index(True)
            assert all(done[first:]), "the completion must be one contiguous tail"
            rows.append((seq[:first], seq[first:]))
    return rows


def _expected(pairs, method) -> Counter:
    if train.METHODS[method].objective == "sft":
        rows = [(p["prompt_token_ids"], p["chosen_token_ids"]) for p in pairs]
    else:
        rows = [(p["prompt_token_ids"], p[key]) for p in pairs for key in ("chosen_token_ids", "rejected_token_ids")]
    return Counter((tuple(a), tuple(b)) for a, b in rows)


def _got(rows) -> Counter:
    return Counter((tuple(a), tuple(b)) for a, b in rows)


@pytest.fixture(scope="module")
def smollm2():
    from udasa_lib.assets import assets_dir
    from udasa_lib.models import load_causal_lm

    path = assets_dir() / "SmolLM2-135M-Instruct"
    if not (path / "config.json").exists():
        pytest.fail(f"{path} is missing: run `make assets` (make test does it first)")
    torch.set_num_threads(1)
    return load_causal_lm(str(path), "float32", "cpu")


@pytest.fixture(scope="module")
def smollm2_pairs(smollm2):
    """Real SmolLM2 samples: raw prefixes (continuations start with a space-prefixed token) and chat prompts."""
    model, tokenizer = smollm2
    raw = _samples(model, tokenizer, RAW_PREFIXES, chat=False, task="sentiment", seed=0)
    chat = _samples(model, tokenizer, CHAT_PROMPTS, chat=True, task="alignment", seed=1)
    starts = [tokenizer.convert_ids_to_tokens(r["token_ids"][0]) for s in raw for r in s["responses"]]
    assert any(t.startswith("Ġ") for t in starts), "the case at stake: a continuation whose first token has a space"
    return _pairs(raw + chat)


@pytest.mark.parametrize("method", METHODS)
def test_trl_trains_on_the_sampled_ids_smollm2(smollm2, smollm2_pairs, tmp_path, method):
    _, tokenizer = smollm2
    assert _got(_trl_rows(tokenizer, smollm2_pairs, method, tmp_path)) == _expected(smollm2_pairs, method)


@pytest.mark.parametrize("method", METHODS)
def test_trl_trains_on_the_sampled_ids_tiny_model(tiny_model_path, tmp_path, method):
    from udasa_lib.models import load_causal_lm

    model, tokenizer = load_causal_lm(str(tiny_model_path), "float32", "cpu")
    pairs = _pairs(_samples(model, tokenizer, RAW_PREFIXES, False, "sentiment", 2)
                   + _samples(model, tokenizer, CHAT_PROMPTS, True, "alignment", 3))
    assert len(pairs) == len(RAW_PREFIXES) + len(CHAT_PROMPTS)
    assert _got(_trl_rows(tokenizer, pairs, method, tmp_path)) == _expected(pairs, method)


@pytest.fixture(scope="module")
def llama3_style_tokenizer(tmp_path_factory):
    """SmolLM2's tokenizer made to add BOS (<|im_start|>, id 1) like Llama-3's; its chat template
    already starts with that token, so a template-rendered prompt holds a BOS of its own."""
    from transformers import AutoTokenizer

    from udasa_lib.assets import assets_dir

    folder = tmp_path_factory.mktemp("llama3-style")
    AutoTokenizer.from_pretrained(assets_dir() / "tiny-random-llama", add_bos_token=True).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id, "the tokenizer must add BOS"
    chat = generation.format_prompt(tokenizer, "hi", True)
    assert tokenizer(chat)["input_ids"][:2] == [tokenizer.bos_token_id] * 2, "the template must write BOS too"
    return tokenizer


def test_encode_prompt_gives_exactly_one_bos(llama3_style_tokenizer):
    tokenizer = llama3_style_tokenizer
    for text, chat in (("I thought this movie was", False), ("Name a colour.", True)):
        ids = generation.encode_prompt(tokenizer, generation.format_prompt(tokenizer, text, chat))
        assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_llama3_style_tokenizer_trains_with_one_bos(llama3_style_tokenizer, tiny_model_path, tmp_path, method):
    from udasa_lib.models import load_causal_lm

    model, _ = load_causal_lm(str(tiny_model_path), "float32", "cpu")
    tokenizer = llama3_style_tokenizer
    pairs = _pairs(_samples(model, tokenizer, RAW_PREFIXES[:2], False, "sentiment", 4)
                   + _samples(model, tokenizer, CHAT_PROMPTS, True, "alignment", 5))
    rows = _trl_rows(tokenizer, pairs, method, tmp_path)
    assert _got(rows) == _expected(pairs, method)
    bos = tokenizer.bos_token_id
    for prompt, _ in rows:
        assert prompt[0] == bos and prompt[1] != bos, f"expected exactly one leading BOS, got {prompt[:3]}"


def test_cut_responses_train_without_eos_and_finished_ones_with_exactly_one(tiny_model, tmp_path):
    _, tokenizer = tiny_model
    eos = tokenizer.eos_token_id
    prompt = generation.encode_prompt(tokenizer, generation.format_prompt(tokenizer, "Tell me a story.", True))
    finished = tokenizer(" Once upon a time.", add_special_tokens=False)["input_ids"] + [eos]
    cut = tokenizer(" Once upon a time, in", add_special_tokens=False)["input_ids"]
    responses = [{"text": "Once upon a time.", "token_ids": finished, "token_logprobs": [-1.0] * len(finished),
                  "finish_reason": "eos"},
                 {"text": "Once upon a time, in", "token_ids": cut, "token_logprobs": [-1.0] * len(cut),
                  "finish_reason": "length"}]
    record = sample.sample_record("a0", "alignment", "Tell me a story.", "", prompt, responses, "a0")
    pairs = _pairs([record])  # u: the finished response is chosen, the cut one rejected
    assert pairs[0]["chosen_finish_reason"] == "eos" and pairs[0]["rejected_finish_reason"] == "length"
    for method in ("dpo", "sft"):
        for _, completion in _trl_rows(tokenizer, pairs, method, tmp_path):
            if completion == cut:
                assert eos not in completion
            else:
                assert completion == finished and completion.count(eos) == 1 and completion[-1] == eos


def test_truncated_knob_keeps_or_drops_cut_responses():
    def response(ids, finish):
        return {"text": str(ids), "token_ids": ids, "token_logprobs": [-1.0] * len(ids), "finish_reason": finish}

    record = sample.sample_record("p", "alignment", "x", "x", [5], [
        response([7, 2], "eos"), response([8, 9], "length"), response([10, 2], "eos")], "p")
    kept = _pairs([record], {"alignment": "keep"})
    assert (kept[0]["chosen_sample_id"], kept[0]["rejected_sample_id"]) == ("p-s0", "p-s2")  # u = 0, 2/3
    record_cut_best = sample.sample_record("q", "alignment", "x", "x", [5], [
        response([8, 9], "length"), response([7, 2], "eos"), response([10, 2], "eos")], "q")
    assert _pairs([record_cut_best], {"alignment": "keep"})[0]["chosen_sample_id"] == "q-s0"
    dropped = _pairs([record_cut_best], {"alignment": "drop"})
    assert (dropped[0]["chosen_sample_id"], dropped[0]["rejected_sample_id"]) == ("q-s1", "q-s2")
    one_finished = sample.sample_record("r", "alignment", "x", "x", [5], [
        response([8, 9], "length"), response([7, 2], "eos"), response([11], "length")], "r")
    assert _pairs([one_finished], {"alignment": "drop"}) == []
    counts = cut_counts([record, record_cut_best, one_finished], _pairs([record_cut_best]), {"alignment": "keep"})
    assert counts["alignment"] == {"policy": "keep", "responses": 9, "responses_cut": 4, "responses_cut_share": 0.444,
                                   "pairs": 1, "pairs_chosen_cut": 1, "pairs_rejected_cut": 0, "pairs_any_cut": 1}


def test_over_long_prompts_are_counted_and_dropped():
    records = [{"prompt_ids": [1] * 10, "chosen_ids": [2] * 3, "rejected_ids": [3]},
               {"prompt_ids": [1] * 4, "chosen_ids": [2] * 3, "rejected_ids": [3] * 9},
               {"prompt_ids": [1] * 2, "chosen_ids": [2], "rejected_ids": [3]}]
    with pytest.warns(UserWarning) as caught:
        kept, counts = train.fit_to_length(records, 8, "test")
    assert [str(w.message) for w in caught] == [
        "test: train.max_length=8: 1 pair(s) dropped, their prompt alone fills it (e.g. #0)",
        "test: train.max_length=8: 1 pair(s) with a completion cut to fit (e.g. #1)"]
    assert counts == {"over_long_prompts": 1, "completion_cut": 1, "over_long_prompt_examples": ["#0"],
                      "completion_cut_examples": ["#1"]} and kept == records[1:]
    sft = {"input_ids": [1] * 9 + [2], "completion_mask": [0] * 9 + [1]}
    assert train.length_fit(sft, 8) == "prompt_fills" and train.length_fit(sft, 10) == "fits"
