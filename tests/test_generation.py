"""The one prompt-to-ids path: position ids under left padding, greedy at temperature 0,
teacher-forced log-probs on ids."""
from __future__ import annotations

import pytest
import torch

from udasa_lib import generation


@pytest.fixture(scope="module")
def tiny_gpt2(tiny_model):
    """A GPT-2 (learned absolute positions), built locally and seeded, with SmolLM2's tokenizer:
    the kind of model that left padding without position ids gets wrong."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tokenizer = tiny_model
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # make positions matter: the default init gives them a tiny scale
        model.transformer.wpe.weight.normal_(0, 1.0)
    return model, tokenizer


ROWS = [[57, 2275, 451, 7704, 436, 1117, 314], [57, 2275], [9690, 198, 2683, 359]]


@pytest.mark.parametrize("which", ["tiny_gpt2", "tiny_model"])
def test_left_padded_batch_equals_one_at_a_time(request, which):
    model, _ = request.getfixturevalue(which)
    with torch.no_grad():
        batched = generation.forward_left_padded(model, ROWS, pad_id=2).logits[:, -1]
        alone = torch.stack([generation.forward_left_padded(model, [row], pad_id=2).logits[0, -1] for row in ROWS])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


def test_without_position_ids_the_learned_position_model_differs(tiny_gpt2):
    """The helper's reason to exist: the same batch with default positions scores padded rows differently."""
    model, _ = tiny_gpt2
    batch = generation.left_pad(ROWS, pad_id=2)
    with torch.no_grad():
        default_positions = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, -1]
        alone = torch.stack([model(input_ids=torch.tensor([row])).logits[0, -1] for row in ROWS])
    assert (default_positions[1] - alone[1]).abs().max() > 1e-2


def test_p_yes_batched_equals_alone_on_a_learned_position_judge(tiny_gpt2):
    from udasa_lib.score import p_yes

    model, tokenizer = tiny_gpt2
    texts = ["Is the sky blue? Answer Yes or No.", "Ok?", "A much longer question about whether water is wet?"]
    batched = p_yes(model, tokenizer, texts, batch_size=3)
    alone = [p_yes(model, tokenizer, [t], batch_size=1)[0] for t in texts]
    assert batched == pytest.approx(alone, abs=1e-5)


def test_left_pad_positions_start_at_each_rows_first_token():
    batch = generation.left_pad([[5, 6, 7], [8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]


def test_generate_greedy_at_temperature_zero_repeats_and_batches_like_alone(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    rows = generation.generate(model, tokenizer, ROWS, max_new_tokens=5, temperature=0.0, num_return_sequences=2)
    assert len(rows) == 6 and rows[0] == rows[1] and rows[4] == rows[5]
    for i, prompt in enumerate(ROWS):
        alone = generation.generate(model, tokenizer, [prompt], max_new_tokens=5, temperature=0.0)[0]
        assert rows[2 * i]["token_ids"] == alone["token_ids"]
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generation.generate(model, tokenizer, ROWS, max_new_tokens=2, temperature=-1.0)


@pytest.mark.parametrize("engine", generation.ENGINES)
def test_generated_logprobs_equal_teacher_forcing(tiny_model, engine):
    model, tokenizer = tiny_model
    rows = generation.generate(model, tokenizer, ROWS, max_new_tokens=6, temperature=1.0, num_return_sequences=2,
                               seed=4, with_logprobs=True, engine=engine)
    prompts = [p for p in ROWS for _ in range(2)]
    forced = generation.completion_logprobs(model, tokenizer, prompts, [r["token_ids"] for r in rows], batch_size=4)
    for row, teacher in zip(rows, forced):
        assert row["token_logprobs"] == pytest.approx(teacher, abs=1e-4)


@pytest.mark.parametrize("which", ["tiny_model", "tiny_gpt2"])
@pytest.mark.parametrize("rule", [{"temperature": 1.0}, {"temperature": 0.7, "top_p": 0.9, "top_k": 20},
                                  {"temperature": 0.0}])
def test_loop_engine_draws_the_same_ids_as_transformers_generate(request, which, rule):
    model, tokenizer = request.getfixturevalue(which)
    n = 1 if rule["temperature"] == 0 else 3

    def run(engine):
        return generation.generate(model, tokenizer, ROWS, max_new_tokens=12, num_return_sequences=n, seed=5,
                                   with_logprobs=True, engine=engine, **rule)

    # extra EOS ids that every other row meets at a different step (same seed, same draws up to
    # there), so rows end at different steps and the loop's finished-row handling is exercised
    drafts = run("hf")
    stops = {row["token_ids"][2 + r % 5] for r, row in enumerate(drafts) if r % 2 == 0}
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, *sorted(stops)]
    try:
        hf, loop = run("hf"), run("loop")
    finally:
        model.generation_config.eos_token_id = saved
    assert [r["token_ids"] for r in loop] == [r["token_ids"] for r in hf]
    assert [r["finish_reason"] for r in loop] == [r["finish_reason"] for r in hf]
    assert "eos" in {r["finish_reason"] for r in loop}
    for a, b in zip(loop, hf):
        assert a["token_logprobs"] == pytest.approx(b["token_logprobs"], abs=1e-4)
    with pytest.raises(ValueError, match="unknown generation engine"):
        generation.generate(model, tokenizer, ROWS, max_new_tokens=2, temperature=1.0, engine="vllm")


def test_common_random_numbers_give_each_row_its_own_stream(tiny_model):
    """row_seeds: a row's draw depends on its seed only (not the batch or its neighbours); the same
    seeds under a different policy give the same draws wherever the distributions agree."""
    import copy

    model, tokenizer = tiny_model
    seeds = [generation.sample_seed(0, f"p{i}", 0) for i in range(len(ROWS))]
    kwargs = dict(max_new_tokens=10, temperature=1.0, engine="loop")
    together = generation.generate(model, tokenizer, ROWS, row_seeds=seeds, **kwargs)
    alone = [generation.generate(model, tokenizer, [row], row_seeds=[s], **kwargs)[0] for row, s in zip(ROWS, seeds)]
    reordered = generation.generate(model, tokenizer, ROWS[::-1], row_seeds=seeds[::-1], **kwargs)[::-1]
    assert [r["token_ids"] for r in together] == [r["token_ids"] for r in alone] == [r["token_ids"] for r in reordered]
    # an identical policy: every paired difference is exactly zero
    twin = copy.deepcopy(model)
    assert [r["token_ids"] for r in generation.generate(twin, tokenizer, ROWS, row_seeds=seeds, **kwargs)] == \
        [r["token_ids"] for r in together]
    # a slightly different policy keeps most draws (shared uniforms); other seeds do not
    with torch.no_grad():
        for parameter in twin.parameters():
            parameter.add_(torch.randn_like(parameter) * 1e-5)
    many = ROWS * 8
    seeds, other_seeds = ([generation.sample_seed(s, f"p{i}", 0) for i in range(len(many))] for s in (0, 1))
    first, nudged, fresh = (generation.generate(m, tokenizer, many, row_seeds=s, max_new_tokens=1, temperature=1.0)
                            for m, s in ((model, seeds), (twin, seeds), (model, other_seeds)))
    same_nudged = sum(a["token_ids"] == b["token_ids"] for a, b in zip(first, nudged))
    same_fresh = sum(a["token_ids"] == b["token_ids"] for a, b in zip(first, fresh))
    assert same_nudged >= 0.8 * len(many) > same_fresh
    assert generation.sample_seed(0, "p0", 0) != generation.sample_seed(0, "p0", 1)
    with pytest.raises(ValueError, match="loop"):
        generation.generate(model, tokenizer, ROWS, row_seeds=seeds, max_new_tokens=2, temperature=1.0, engine="hf")
    with pytest.raises(ValueError, match="3 prompts"):
        generation.generate(model, tokenizer, ROWS, row_seeds=seeds[:2], max_new_tokens=2, temperature=1.0)


@pytest.mark.parametrize("which", ["tiny_gpt2", "tiny_model"])
def test_shared_prefix_forward_equals_the_full_forward(request, which):
    model, _ = request.getfixturevalue(which)
    prefix = [57, 2275, 451, 7704, 436, 1117]
    rows = [prefix + tail for tail in ([314, 9690], [198], [2683, 359, 57, 2275])]
    assert generation.common_prefix_length(rows) == len(prefix)
    assert generation.common_prefix_length([[1, 2], [1, 2]]) == 1, "each row keeps a token of its own"
    shared = generation.SharedPrefix(model, prefix)
    with torch.no_grad():
        full = generation.forward_left_padded(model, rows, pad_id=2).logits[:, -1]
        cached = shared.forward(rows, pad_id=2, logits_to_keep=1).logits[:, -1]
        again = shared.forward(rows[1:], pad_id=2, logits_to_keep=1).logits[:, -1]  # the cache is reusable
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, full[1:], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="must start with the prefix"):
        shared.forward([[1, 2, 3]], pad_id=2)


def test_trim_at_eos():
    assert generation.trim_at_eos([5, 2, 7], {2}) == ([5, 2], "eos")
    assert generation.trim_at_eos([5, 6], {2}) == ([5, 6], "length")
    assert generation.trim_at_eos([2], {2}) == ([2], "eos")
