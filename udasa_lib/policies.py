"""The policies of a run and how the evaluations run them: the base model with one of 04_train's
final adapters merged into a copy, generation from prompt ids, teacher-forced sequence
log-probs, and the per-policy "reuse if written, else generate and write" loop of 05-06.

Every policy of a task is the base model with an adapter merged into a copy, so a task loads
its base model from disk once. `base` is the unmodified model, which is also pi_ref for the KL.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from udasa_lib import generation
from udasa_lib.io import atomic_write_jsonl, read_jsonl

BASE = "base"


def policy_adapters(run, task: str) -> dict[str, Path | None]:
    """Policy name -> final adapter folder of its 04_train variant (None for `base`), config order."""
    from udasa_lib.pipeline import variants

    adapters: dict[str, Path | None] = {BASE: None}
    for variant in variants(run.config, "04_train"):
        variant_task, method = variant.split("/")
        if variant_task == task:
            adapters[method] = run.upstream[f"04_train/{variant}"] / "adapters" / "final"
    return adapters


class PolicySet:
    """The base model and the adapter folders of a task; `use(name)` yields the model acting as that
    policy: the base itself, or a copy with the adapter merged in. Merging costs about a second and
    makes generation several times faster on CPU than peft's unmerged LoRA layers."""

    def __init__(self, model, adapters: dict[str, Path | None]):
        self.base = model
        self.adapters = dict(adapters)
        self.names = list(adapters)

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[Any]:
        if name not in self.names:
            raise KeyError(f"unknown policy {name!r}; this task has {', '.join(self.names)}")
        if self.adapters[name] is None:
            yield self.base
            return
        import copy

        from peft import PeftModel

        from udasa_lib.models import load_pretrained

        policy = load_pretrained(lambda source: PeftModel.from_pretrained(copy.deepcopy(self.base), source),
                                 str(self.adapters[name]), f"adapter of policy {name!r}").merge_and_unload()
        policy.eval()
        try:
            yield policy
        finally:
            del policy


def generate(model, tokenizer, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, batch_size: int,
             temperature: float = 0.0, seed: int = 0, desc: str = "", engine: str = "loop",
             row_seeds: Sequence[int] | None = None, with_logprobs: bool = False) -> list[dict]:
    """One continuation per prompt (ids from `generation.encode_prompt`), batched: text, token ids,
    finish reason. temperature 0 = greedy, > 0 = plain ancestral sampling (top_k=0, top_p=1), seeded
    per batch so a batch size change is the only thing that changes the draws; with `row_seeds`
    (one per prompt, `generation.sample_seed`) each row is seeded alone, the same under every
    policy and every batching (common random numbers). `with_logprobs` adds token_logprobs, the
    untempered policy's log-prob of each generated token (`generation.generate`)."""
    from tqdm.auto import tqdm

    records: list[dict] = []
    batches = range(0, len(prompt_ids), batch_size)
    for index, start in enumerate(tqdm(batches, desc=desc or "generate", leave=False)):
        records += generation.generate(model, tokenizer, prompt_ids[start:start + batch_size],
                                       max_new_tokens=max_new_tokens, temperature=temperature,
                                       seed=generation.batch_seed(seed, desc, index), engine=engine,
                                       row_seeds=None if row_seeds is None else row_seeds[start:start + batch_size],
                                       with_logprobs=with_logprobs)
    return records


def sequence_logprobs(model, tokenizer, prompt_ids: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                      batch_size: int = 16) -> np.ndarray:
    """log pi(y|x) summed over the completion tokens, teacher-forced on the ids (shape [n])."""
    per_token = generation.completion_logprobs(model, tokenizer, prompt_ids, completions, batch_size)
    return np.asarray([sum(row) for row in per_token], dtype=np.float64)


def for_each_policy(policies: PolicySet, out_dir: Path,
                    make_records: Callable[[str, Any], list[dict]]) -> dict[str, list[dict]]:
    """Per policy, `out_dir/<policy>.jsonl`: read it if an earlier (interrupted) run wrote it, else
    `make_records(name, model)` with the model acting as that policy, written atomically.
    Returns every policy's records in policy order."""
    out = {}
    for name in policies.names:
        path = Path(out_dir) / f"{name}.jsonl"
        if not path.exists():
            with policies.use(name) as model:
                atomic_write_jsonl(path, make_records(name, model))
        out[name] = read_jsonl(path)
    return out
