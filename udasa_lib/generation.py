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

import functools

from typing import Any, Sequence

FINISH_EOS = "eos"
FINISH_LENGTH = "length"


def _hashed_seed(key: str, hex_digits: int) -> int:
    import hashlib

    return int(hashlib.sha256(key.encode()).hexdigest()[:hex_digits], 16)


def batch_seed(seed: int, task: str, batch_index: int) -> int:
    """The seed of one generation batch, from (seed, task, batch index) only: a resumed or
    re-batched run draws each batch as an uninterrupted one would."""
    return _hashed_seed(f"{seed}/{task}/{batch_index}", 8)


def sample_seed(seed: int, prompt_id: str, sample_index: int) -> int:
    """The seed of prompt `prompt_id`'s `sample_index`-th sample, the same under every policy:
    common random numbers, so that paired differences between policies cancel the shared noise
    (`generate(row_seeds=...)`)."""
    return _hashed_seed(f"crn/{seed}/{prompt_id}/{sample_index}", 15)


def sample_seeds(seed: int, draws: Sequence[tuple[str, int]]) -> list[int]:
    """`sample_seed` of every (prompt id, sample index) draw: the row seeds of an evaluation that
    compares policies (every sampled evaluation passes them, whatever its temperature)."""
    return [sample_seed(seed, prompt_id, j) for prompt_id, j in draws]


def format_prompt(tokenizer, text: str, chat_template: bool, system: str | None = None) -> str:
    """The prompt as the model reads it: a user turn of the chat template, or the raw text.
    `system` puts a system turn before the user turn (in place of any default system text the
    template writes); it needs the chat template, so raw text with one raises ValueError."""
    if system is not None and not (chat_template and tokenizer.chat_template):
        raise ValueError("a system message needs the chat template: chat_template is off or the tokenizer has none")
    if chat_template and tokenizer.chat_template:
        messages = [{"role": "user", "content": text}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
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


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest id prefix every row shares, leaving each row at least one own token."""
    if not rows:
        return 0
    limit = min(len(r) for r in rows) - 1
    first = rows[0]
    length = 0
    while length < limit and all(r[length] == first[length] for r in rows):
        length += 1
    return max(length, 0)


def _full_attention_only(model) -> bool:
    """True for a transformers model whose every layer attends to the whole context."""
    if not hasattr(getattr(model, "config", None), "get_text_config"):
        return False
    config = model.config.get_text_config(decoder=True)
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return all(kind == "full_attention" for kind in layer_types)


class SharedPrefix:
    """Many forward passes over rows that all start with the same ids (a judge's template): the
    prefix is run once and its KV cache reused by every batch, so only each row's own tokens are
    computed. `forward(rows, pad_id, **kwargs)` takes the full rows (prefix included), left-pads
    their remainders after the cached prefix with position ids continuing from it, and returns
    model(...) as a forward over the full rows would (equal up to float rounding; tested).
    Models with sliding-window or linear-attention layers get the plain `forward_left_padded`."""

    def __init__(self, model, prefix: Sequence[int]):
        import torch
        from transformers.cache_utils import DynamicCache

        self.model, self.prefix = model, list(prefix)
        self.layers = None
        if self.prefix and _full_attention_only(model):
            device = next(model.parameters()).device
            cache = DynamicCache()
            with torch.no_grad():  # not inference_mode: the cached tensors are reused in later no_grad passes
                model(input_ids=torch.tensor([self.prefix], device=device), past_key_values=cache, use_cache=True,
                      logits_to_keep=1)
            self.layers = [(layer.keys, layer.values) for layer in cache.layers]

    def forward(self, rows: Sequence[Sequence[int]], pad_id: int, **kwargs):
        import torch
        from transformers.cache_utils import DynamicCache

        if self.layers is None:
            return forward_left_padded(self.model, rows, pad_id, **kwargs)
        n = len(self.prefix)
        if any(list(r[:n]) != self.prefix or len(r) <= n for r in rows):
            raise ValueError("SharedPrefix.forward: every row must start with the prefix and go beyond it")
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in left_pad([r[n:] for r in rows], pad_id).items()}
        size = len(rows)
        cache = DynamicCache(ddp_cache_data=[(k.expand(size, -1, -1, -1).contiguous(),
                                              v.expand(size, -1, -1, -1).contiguous()) for k, v in self.layers])
        attention_mask = torch.cat([batch["attention_mask"].new_ones((size, n)), batch["attention_mask"]], dim=1)
        return self.model(input_ids=batch["input_ids"], attention_mask=attention_mask,
                          position_ids=batch["position_ids"] + n, past_key_values=cache, use_cache=True, **kwargs)


ENGINES = ("loop", "hf")


def generate(model, tokenizer, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float,
             top_p: float = 1.0, top_k: int = 0, num_return_sequences: int = 1, seed: int = 0,
             with_logprobs: bool = False, engine: str = "loop",
             row_seeds: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Continuations of every prompt, prompt-major: rows [i * n + j] is prompt i's j-th continuation.

    Each row: token_ids (to the first EOS inclusive), finish_reason ("eos" | "length"), text (decoded
    without special tokens, stripped: for reading and text scorers only) and, with `with_logprobs`,
    token_logprobs[t] = log softmax(raw logits_t)[y_t], the untempered policy's log-prob (shape [T]).

    engine "loop" (default) is this module's decode loop (`_decode_loop`); "hf" is transformers'
    `generate`, kept as the reference. Both draw from one `torch.manual_seed(seed)` with one
    `torch.multinomial` per step over the same B*n rows and the same logits warpers, so they
    produce the same ids (tests/test_generation.py checks it on the tiny model and `make bench` on
    the default one). Prompts are repeated n times, which draws the same samples as transformers'
    num_return_sequences and also works for greedy decoding.

    `row_seeds` (one per output row, e.g. `sample_seed` of each prompt and sample; loop engine
    only) gives every row its own random stream instead: at each step row r draws one uniform u
    from its own generator and takes the token where the warped CDF first exceeds u (inverse-CDF
    sampling). A row's draw then depends on its seed and its own distribution only, not on the
    batch, and two policies fed the same seeds make the same choice wherever their distributions
    agree: common random numbers for paired comparisons.
    Raises ValueError for n < 1, an unknown engine, or row_seeds of the wrong length or with engine "hf"
    at a temperature > 0 (greedy decoding draws nothing, so any engine takes them).
    """
    import torch

    if num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be >= 1, got {num_return_sequences}")
    if engine not in ENGINES:
        raise ValueError(f"unknown generation engine {engine!r}; choose one of {', '.join(ENGINES)}")
    sampling_kwargs(temperature, top_p, top_k)  # the one temperature rule, checked for both engines
    if row_seeds is not None:
        if engine != "loop" and temperature > 0:  # greedy decoding draws nothing: any engine will do
            raise ValueError("row_seeds (common random numbers) are drawn by the 'loop' engine only; "
                             "set runtime.generation_engine: loop")
        if len(row_seeds) != len(prompt_ids) * num_return_sequences:
            raise ValueError(f"row_seeds: {len(row_seeds)} seeds for {len(prompt_ids)} prompts x "
                             f"{num_return_sequences} sequences")
    if not prompt_ids:
        return []
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    prompts = [list(p) for p in prompt_ids]
    if engine == "loop":
        generated, logprobs = _decode_loop(model, tokenizer, prompts, num_return_sequences, max_new_tokens,
                                           temperature, top_p, top_k, with_logprobs, row_seeds)
    else:
        generated, logprobs = _decode_hf(model, tokenizer, prompts, num_return_sequences, max_new_tokens,
                                         temperature, top_p, top_k, with_logprobs)
    eos = eos_ids(model, tokenizer)
    rows = []
    for r, sequence in enumerate(generated):
        ids, finish = trim_at_eos(sequence, eos)
        row = {"text": tokenizer.decode(ids, skip_special_tokens=True).strip(), "token_ids": ids,
               "finish_reason": finish}
        if with_logprobs:
            row["token_logprobs"] = [round(v, 6) for v in logprobs[r][: len(ids)]]
        rows.append(row)
    return rows


def _decode_hf(model, tokenizer, prompts, n, max_new_tokens, temperature, top_p, top_k, with_logprobs):
    """transformers' generate on the prompts repeated n times: (ids per row, log-probs per row or None)."""
    import torch

    expanded = [p for p in prompts for _ in range(n)]
    batch = left_pad(expanded, pad_id_of(tokenizer))
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model.generate(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens, pad_token_id=pad_id_of(tokenizer), return_dict_in_generate=True,
            output_logits=with_logprobs, **sampling_kwargs(temperature, top_p, top_k),
        )
        generated = out.sequences[:, batch["input_ids"].shape[1]:]
        logprobs = None
        if with_logprobs:
            logits = torch.stack(out.logits, dim=1).float()  # [B*n, T, V]
            logprobs = torch.log_softmax(logits, dim=-1).gather(-1, generated.unsqueeze(-1)).squeeze(-1).tolist()
    return generated.tolist(), logprobs


def _logits_warpers(temperature: float, top_p: float, top_k: int):
    """transformers' sampling warpers in transformers' order (temperature, top-k, top-p), each only
    when it changes the distribution, as `generate` builds them: the same scores, the same draws."""
    from transformers.generation.logits_process import (
        LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    )

    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k=top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p))
    return warpers


@functools.cache
def _preallocated_layer_class():
    """A KV-cache layer whose keys/values live in one buffer sized for the whole generation: each
    step writes one position in place and exposes a view of the filled part, where transformers'
    DynamicLayer concatenates (copies) the whole cache on every step of every layer. Built on
    first use, since transformers is imported lazily here."""
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = capacity

        def lazy_initialization(self, key_states, value_states):
            super().lazy_initialization(key_states, value_states)
            batch, heads = key_states.shape[:2]
            self._key_buffer = key_states.new_empty((batch, heads, self.capacity, key_states.shape[-1]))
            self._value_buffer = value_states.new_empty((batch, heads, self.capacity, value_states.shape[-1]))
            self._length = 0

        def _expose(self):
            self.keys = self._key_buffer[:, :, :self._length]
            self.values = self._value_buffer[:, :, :self._length]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self._length + key_states.shape[-2]
            self._key_buffer[:, :, self._length:end] = key_states
            self._value_buffer[:, :, self._length:end] = value_states
            self._length = end
            self._expose()
            return self.keys, self.values

        def batch_repeat_interleave(self, repeats: int) -> None:
            self._key_buffer = self._key_buffer.repeat_interleave(repeats, dim=0)
            self._value_buffer = self._value_buffer.repeat_interleave(repeats, dim=0)
            self._expose()

        def batch_select_indices(self, indices) -> None:
            self._key_buffer, self._value_buffer = self._key_buffer[indices], self._value_buffer[indices]
            self._expose()

    return PreallocatedLayer


def _new_cache(model, capacity: int):
    """A preallocated cache when every layer attends to the full context (Llama, Qwen, GPT-2, ...);
    transformers' DynamicCache for any other layer structure (sliding windows, linear attention)."""
    from transformers.cache_utils import Cache, DynamicCache

    if not _full_attention_only(model):
        return DynamicCache(config=model.config)
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    return Cache(layers=[_preallocated_layer_class()(capacity) for _ in range(layers)])


def _inverse_cdf_draw(probs, generators):
    """One token per row of probs [R, V]: the first index where row r's CDF exceeds a uniform from
    generators[r] (zero-probability tokens are never chosen: their CDF step is empty)."""
    import torch

    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators]).to(probs.device)
    cdf = probs.double().cumsum(dim=-1)
    u = u * cdf[:, -1]  # the CDF's last value is 1 up to rounding
    return torch.searchsorted(cdf, u[:, None], right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def _decode_loop(model, tokenizer, prompts, n, max_new_tokens, temperature, top_p, top_k, with_logprobs,
                 row_seeds=None):
    """Autoregressive decoding with the prompt read once per prompt rather than once per continuation.

    1. Prefill: the B distinct prompts, left-padded, one forward pass; its cache and last logits are
       repeated n times (rows prompt-major, as the "hf" engine orders them).
    2. Each step: one `torch.multinomial` (or argmax when greedy) over the warped logits of all
       B*n rows, as transformers draws them, and log pi(y_t) = logit[y_t] - logsumexp(logits) of the
       raw logits (no [B*n, T, V] stack).
    3. A row that ended leaves the forward pass (its cache rows are dropped) but keeps its place
       in the sampling tensor: torch.multinomial draws one exponential per element whatever the
       probabilities are, so the random stream, and every other row's draw, stays transformers'.
       With row_seeds, the active rows draw by `_inverse_cdf_draw` from their own generators instead.
    Returns (ids per row, length max_new_tokens or up to the step all rows had ended; log-probs or None).
    """
    import torch

    device = next(model.parameters()).device
    pad = pad_id_of(tokenizer)
    eos = torch.tensor(sorted(eos_ids(model, tokenizer)), device=device)
    sampling = temperature > 0
    warpers = _logits_warpers(temperature, top_p, top_k) if sampling else []
    batch = {k: v.to(device) for k, v in left_pad(prompts, pad).items()}
    cache = _new_cache(model, batch["input_ids"].shape[1] + max_new_tokens)
    rows = len(prompts) * n
    tokens = torch.full((rows, max_new_tokens), pad, dtype=torch.long, device=device)
    logprobs = torch.zeros((rows, max_new_tokens), dtype=torch.float32, device=device) if with_logprobs else None
    with torch.inference_mode():
        out = model(**batch, past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1].float()
        attention_mask, position = batch["attention_mask"], batch["position_ids"][:, -1]
        if n > 1:
            cache.batch_repeat_interleave(n)
            logits = logits.repeat_interleave(n, dim=0)
            attention_mask = attention_mask.repeat_interleave(n, dim=0)
            position = position.repeat_interleave(n, dim=0)
        active = torch.arange(rows, device=device)  # the output row of each row of the forward batch
        generators = ([torch.Generator().manual_seed(int(s)) for s in row_seeds]
                      if row_seeds is not None and sampling else None)
        scores = torch.zeros((rows, logits.shape[-1]), dtype=torch.float32, device=device)
        steps = 0
        for step in range(max_new_tokens):
            if generators is not None:
                warped = warpers(None, logits.clone()) if warpers else logits
                chosen = _inverse_cdf_draw(torch.softmax(warped, dim=-1), [generators[r] for r in active.tolist()])
            elif sampling:
                scores.zero_()
                scores[active] = logits
                if warpers:
                    scores = warpers(None, scores)
                chosen = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)[active]
            else:
                chosen = torch.argmax(logits, dim=-1)
            tokens[active, step] = chosen
            if with_logprobs:
                logprobs[active, step] = logits.gather(1, chosen[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
            steps = step + 1
            running = ~torch.isin(chosen, eos)
            if not bool(running.any()) or steps == max_new_tokens:
                break
            if not bool(running.all()):
                keep = running.nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                active, chosen = active[keep], chosen[keep]
                attention_mask, position = attention_mask[keep], position[keep]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(active), 1))], dim=1)
            position = position + 1
            out = model(input_ids=chosen[:, None], attention_mask=attention_mask, position_ids=position[:, None],
                        past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1].float()
    ids = tokens[:, :steps].tolist()
    return ids, (logprobs[:, :steps].tolist() if with_logprobs else None)


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
        # the logit at position t predicts token t + 1: only positions from the shortest prompt's
        # last token on score a completion, so the LM head runs on those alone
        first = max(min(len(p) for p in prompts) - 1, 0)
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           logits_to_keep=width - first).logits[:, :-1].float()
            targets = ids[:, first + 1:].unsqueeze(-1).to(device)
            logp = (logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)).cpu()
        for i, (p, c) in enumerate(zip(prompts, completions)):
            out.append(logp[i, len(p) - 1 - first: len(p) - 1 - first + len(c)].tolist() if len(c) else [])
    return out
