"""Token ids in, token ids out: the one path from a prompt to the ids a model sees and generates.

Every stage that feeds a model a prompt, generates from it or scores a completion goes through
here, so the ids sampled in 01_sample are the ids trained on in 04_train and scored in the
evaluations (docs/method.md, "What is trained on"):

- `encode_prompt` is the only prompt tokenisation: the tokenizer's special tokens are added
  (a Llama-3 tokenizer adds BOS to raw text), and a BOS the chat template already wrote is not
  doubled, so a prompt starts with at most one BOS.
- `generate` samples or decodes greedily from prompt ids and returns, per continuation, its ids
  up to and including the first EOS (finish_reason "eos") or all of them when max_new_tokens
  cut it (finish_reason "length", no EOS), plus the text for people to read.
- `left_pad` builds left-padded batches with position ids counted from each row's first real
  token, so a model with learned absolute positions (GPT-2) scores a padded row exactly as it
  scores the row alone; `forward_left_padded` runs such a batch.
- `sampling_kwargs` is the one temperature rule: 0 means greedy decoding, > 0 plain ancestral
  sampling at that temperature.
"""
from __future__ import annotations

from typing import Any, Sequence

FINISH_EOS = "eos"
FINISH_LENGTH = "length"


def batch_seed(seed: int, task: str, batch_index: int) -> int:
    """The seed of one generation batch, from (seed, task, batch index) only: a resumed or
    re-batched run draws each batch as an uninterrupted one would."""
    import hashlib

    digest = hashlib.sha256(f"{seed}/{task}/{batch_index}".encode()).hexdigest()
    return int(digest[:8], 16)


def format_prompt(tokenizer, text: str, chat_template: bool) -> str:
    """The prompt as the model reads it: a user turn of the chat template, or the raw text."""
    if chat_template and tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return text


def encode_prompt(tokenizer, formatted_prompt: str) -> list[int]:
    """Token ids of a formatted prompt: special tokens added as the tokenizer defines them, with a
    BOS that the chat template wrote and the tokenizer added again kept once."""
    ids = list(tokenizer(formatted_prompt, add_special_tokens=True)["input_ids"])
    bos = tokenizer.bos_token_id
    while bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return ids


def eos_ids(model, tokenizer) -> set[int]:
    """Every id that ends a response: the generation config's EOS ids and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def trim_at_eos(ids: Sequence[int], eos: set[int]) -> tuple[list[int], str]:
    """(ids up to and including the first EOS, "eos") or (all ids, "length") when none was produced."""
    for t, token in enumerate(ids):
        if token in eos:
            return list(ids[: t + 1]), FINISH_EOS
    return list(ids), FINISH_LENGTH


def sampling_kwargs(temperature: float, top_p: float = 1.0, top_k: int = 0) -> dict[str, Any]:
    """`generate` arguments for one temperature rule: 0 = greedy, > 0 = sampling (top_k 0 = off)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k}


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> dict:
    """input_ids, attention_mask and position_ids, each [B, max len], rows flush right.
    Position ids start at 0 on each row's first real token (pads get 0), as if it were alone."""
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            input_ids[i, width - len(row):] = torch.as_tensor(list(row), dtype=torch.long)
            attention_mask[i, width - len(row):] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


def forward_left_padded(model, rows: Sequence[Sequence[int]], pad_id: int, **kwargs):
    """model(...) on a left-padded batch with explicit position ids; kwargs go to the forward call."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in left_pad(rows, pad_id).items()}
    return model(**batch, **kwargs)


def generate(model, tokenizer, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float,
             top_p: float = 1.0, top_k: int = 0, num_return_sequences: int = 1, seed: int = 0,
             with_logprobs: bool = False) -> list[dict[str, Any]]:
    """Continuations of every prompt, prompt-major: rows [i * n + j] is prompt i's j-th continuation.

    Each row: token_ids (to the first EOS inclusive), finish_reason ("eos" | "length"), text (decoded
    without special tokens, stripped: for reading and text scorers only) and, with `with_logprobs`,
    token_logprobs[t] = log softmax(raw logits_t)[y_t], the untempered policy's log-prob (shape [T]).
    Prompts are repeated n times before the call, which draws the same samples as transformers'
    num_return_sequences and also works for greedy decoding.
    """
    import torch

    if num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be >= 1, got {num_return_sequences}")
    if not prompt_ids:
        return []
    expanded = [list(p) for p in prompt_ids for _ in range(num_return_sequences)]
    batch = left_pad(expanded, pad_id_of(tokenizer))
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    with torch.inference_mode():
        out = model.generate(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens, pad_token_id=pad_id_of(tokenizer), return_dict_in_generate=True,
            output_logits=with_logprobs, **sampling_kwargs(temperature, top_p, top_k),
        )
        generated = out.sequences[:, batch["input_ids"].shape[1]:]
        if with_logprobs:
            logits = torch.stack(out.logits, dim=1).float()  # [B*n, T, V]
            logprobs = torch.log_softmax(logits, dim=-1).gather(-1, generated.unsqueeze(-1)).squeeze(-1)
    eos = eos_ids(model, tokenizer)
    rows = []
    for r in range(generated.shape[0]):
        ids, finish = trim_at_eos(generated[r].tolist(), eos)
        row = {"text": tokenizer.decode(ids, skip_special_tokens=True).strip(), "token_ids": ids,
               "finish_reason": finish}
        if with_logprobs:
            row["token_logprobs"] = [round(v, 6) for v in logprobs[r, : len(ids)].tolist()]
        rows.append(row)
    return rows


def completion_logprobs(model, tokenizer, prompt_ids: Sequence[Sequence[int]],
                        completion_ids: Sequence[Sequence[int]], batch_size: int = 16) -> list[list[float]]:
    """Teacher-forced log pi(y_t | x, y_<t) of every completion token, per row (shape [T_i] each).

    The prompt and completion ids are concatenated as ids, never re-tokenised as one string, so
    the completion scored is exactly the one generated. Right padding: with a causal mask, pads
    after a row cannot change its real tokens, and default positions are right.
    """
    import torch

    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    device = next(model.parameters()).device
    pad = pad_id_of(tokenizer)
    out: list[list[float]] = []
    for start in range(0, len(prompt_ids), batch_size):
        prompts = prompt_ids[start:start + batch_size]
        completions = completion_ids[start:start + batch_size]
        rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1).to(device)).squeeze(-1)
        logp = logp.cpu()
        for i, (p, c) in enumerate(zip(prompts, completions)):
            # the logit at position t predicts token t + 1
            out.append(logp[i, len(p) - 1: len(p) - 1 + len(c)].tolist() if len(c) else [])
    return out
