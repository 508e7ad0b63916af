"""Stage 01: sample K responses per prompt, with the policy's token log-probs (UDASA step 1).

Prompts are generated in batches of `sample.batch_prompts`, each repeated K times, left-padded,
through `generation.generate`; each record keeps the prompt's ids exactly as fed and each
response's ids exactly as generated, which are what 04_train trains on. Every batch has its own seed derived from (seed, task,
batch index) and is written as a shard the moment it finishes, so an interrupted run resumes
at the first missing batch and ends with exactly the file an uninterrupted run writes.

Log-probs are those of the *untempered* policy (log-softmax of the raw logits), since
likelihood-weighted semantic entropy, token NLL and KL(pi || pi_ref) all need log pi(y|x),
not the sampling distribution. The EOS token, when produced, is part of the response; a response
cut at max_new_tokens has none (finish_reason "length").
Under `accelerate launch` (runtime.num_processes > 1), or in `runtime.workers` spawned processes
on CPU, rank r takes batches b with b % world == r.

Principle-prompted samples (`sample.tasks.<task>.principle_share`, docs/method.md): of each
prompt's K responses the first n = `config.principle_count(share, K)` are drawn from the prompt
with the task's principle (score.value.principles) as a system message, in a generate call of
their own seeded from (seed, "<task>/principle", batch index); the other K - n as above. The record's
formatted_prompt and prompt_token_ids are the plain prompt for all K, so 03_pairs and 04_train
train every response without the principle (context distillation); each response says
`principle: true/false`. Share 0 draws exactly what the stage drew before the option existed.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from udasa_lib import generation
from udasa_lib.config import ConfigError, principle_count  # the rule config validation applies
# SchemaError, not data.DataError: importing udasa_lib.data would put the sentiment ground truth
# within reach of scoring (tests/test_score.py checks the import closure)
from udasa_lib.io import SchemaError, atomic_write_json, atomic_write_jsonl, read_jsonl

PROMPT_SCHEMA = {"id": str, "text": str}
SAMPLE_SCHEMA = {"prompt_id": str, "task": str, "prompt": str, "formatted_prompt": str, "prompt_token_ids": list,
                 "responses": list}
RESPONSE_SCHEMA = {"sample_id": str, "text": str, "token_ids": list, "token_logprobs": list, "finish_reason": str,
                   "principle": bool}
SAMPLES_FILE = "samples.jsonl"


def select_prompts(data_dir: Path, sources: dict[str, int], task: str = "<task>") -> list[dict]:
    """The first n prompts of each named split (splits are already shuffled by 00_data).

    Raises SchemaError when a split file holds no prompt, and ConfigError when
    sample.tasks.<task>.sources.<split> asks for more prompts than the split holds (no silent
    minimum: the run would otherwise sample fewer prompts than its config says); both name the
    split file and that key."""
    prompts = []
    for split, count in sources.items():
        path = Path(data_dir) / f"{split}.jsonl"
        key = f"sample.tasks.{task}.sources.{split}"
        records = read_jsonl(path, PROMPT_SCHEMA)
        if not records:
            raise SchemaError(f"{key}: split file {path} holds no prompts (rerun 00_data, or drop the split)")
        if len(records) < count:
            raise ConfigError(f"{key}: split {split!r} has {len(records)} prompts, {count} requested ({path})")
        prompts.extend(records[:count])
    return prompts


PRINCIPLE_ROLES = ("judge", "system")


def load_principles(path: str, role: str) -> dict[str, str]:
    """One role's texts from the principles file (score.value.principles): task -> text.

    role "judge": the principle a self_judge asks about (02_score, score.value.scorers: self_judge).
    role "system": the system turn of principle-prompted samples (01_sample, principle_share), an
    instruction addressed to the policy (Sun et al. 2023's principle-driven prompting).
    Raises ValueError naming the file when it is not {judge: {task: text}, system: {task: text}}."""
    import yaml

    from udasa_lib.models import resolve_name_or_path

    if role not in PRINCIPLE_ROLES:
        raise ValueError(f"load_principles: role {role!r} is not one of {PRINCIPLE_ROLES}")
    resolved = resolve_name_or_path(path)
    principles = yaml.safe_load(open(resolved)) or {}
    texts = principles.get(role) if isinstance(principles, dict) else None
    if not isinstance(texts, dict) or not all(isinstance(v, str) for v in texts.values()):
        raise ValueError(f"{path}: expected a section {role!r} mapping task -> principle text "
                         f"(sections: {', '.join(PRINCIPLE_ROLES)})")
    return texts


def generate_batch(
    model, tokenizer, prompt_ids: Sequence[Sequence[int]], *, k: int, temperature: float, top_p: float, top_k: int,
    max_new_tokens: int, seed: int, engine: str = "loop",
) -> list[list[dict[str, Any]]]:
    """Sample k continuations of each prompt (ids from `generation.encode_prompt`); returns, per
    prompt, k dicts of text, token_ids, token_logprobs and finish_reason (`generation.generate`)."""
    rows = generation.generate(model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, top_k=top_k, num_return_sequences=k, seed=seed, with_logprobs=True,
                               engine=engine)
    return [rows[i * k:(i + 1) * k] for i in range(len(prompt_ids))]


def sample_record(prompt_id: str, task: str, prompt: str, formatted_prompt: str, prompt_ids: Sequence[int],
                  responses: list[dict], sample_id_prefix: str, meta: dict | None = None) -> dict:
    """One samples.jsonl record (SAMPLE_SCHEMA): the prompt as text and as the ids it was fed as,
    its responses numbered `<prefix>-s<j>`. 01_sample and the on-policy rounds both build them here.
    A response that does not say otherwise was drawn from `formatted_prompt` itself (principle false)."""
    for j, response in enumerate(responses):
        response["sample_id"] = f"{sample_id_prefix}-s{j}"
        response.setdefault("principle", False)
    return {"prompt_id": prompt_id, "task": task, "prompt": prompt, "formatted_prompt": formatted_prompt,
            "prompt_token_ids": list(prompt_ids), "responses": responses, "meta": dict(meta or {})}


def _shard_path(stage_dir: Path, task: str, batch_index: int) -> Path:
    return stage_dir / "shards" / task / f"batch_{batch_index:05d}.jsonl"


def sample_task(run, task: str, model, tokenizer, rank: int = 0, world: int = 1, progress: bool = True) -> dict:
    """Generate every missing shard of one task assigned to this rank; return token and time counts."""
    from tqdm.auto import tqdm

    cfg = run.config.sample
    task_cfg = cfg.tasks[task]
    prompts = select_prompts(run.upstream["00_data"], task_cfg.sources, task)
    n_principle = principle_count(task_cfg.principle_share, cfg.k)
    principle = None
    if n_principle:
        principles = load_principles(run.config.score.value.principles, "system")
        if task not in principles:
            raise ValueError(f"sample.tasks.{task}.principle_share: score.value.principles "
                             f"({run.config.score.value.principles}) has no system principle for task {task!r}")
        principle = principles[task]
    settings = dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                    max_new_tokens=task_cfg.max_new_tokens, engine=run.config.runtime.generation_engine)
    batches = [prompts[i: i + cfg.batch_prompts] for i in range(0, len(prompts), cfg.batch_prompts)]
    mine = [b for b in range(len(batches)) if b % world == rank]
    todo = [b for b in mine if not _shard_path(run.dir, task, b).exists()]
    tokens, started = 0, time.time()
    for b in tqdm(todo, desc=f"sampling {task}", disable=not progress, initial=len(mine) - len(todo), total=len(mine)):
        batch = batches[b]
        formatted = [generation.format_prompt(tokenizer, p["text"], task_cfg.chat_template) for p in batch]
        prompt_ids = [generation.encode_prompt(tokenizer, text) for text in formatted]
        generations = [[] for _ in batch]
        if n_principle < cfg.k:  # with share 0: the one call, seed and k the stage always made
            generations = [[dict(r, principle=False) for r in responses] for responses in generate_batch(
                model, tokenizer, prompt_ids, k=cfg.k - n_principle,
                seed=generation.batch_seed(run.config.seed, task, b), **settings)]
        if n_principle:
            # Drawn in the principle's context, so their token_logprobs are log pi(y | principle, x),
            # not log pi(y | x): the context they were sampled in (02_score's weighted semantic
            # probability reads them as such). The record keeps the plain prompt to train on.
            contexts = [generation.encode_prompt(tokenizer, generation.format_prompt(
                tokenizer, p["text"], task_cfg.chat_template, system=principle)) for p in batch]
            drawn = generate_batch(model, tokenizer, contexts, k=n_principle,
                                   seed=generation.batch_seed(run.config.seed, f"{task}/principle", b), **settings)
            generations = [[dict(r, principle=True) for r in with_principle] + plain
                           for with_principle, plain in zip(drawn, generations)]
        records = [sample_record(p["id"], task, p["text"], text, ids, responses, p["id"],
                                 {key: value for key, value in p.items() if key not in ("id", "text")})
                   for p, text, ids, responses in zip(batch, formatted, prompt_ids, generations)]
        tokens += sum(len(r["token_ids"]) for responses in generations for r in responses)
        atomic_write_jsonl(_shard_path(run.dir, task, b), records)
    return {"batches": len(batches), "generated_batches": len(todo), "tokens": tokens, "seconds": time.time() - started}


def merge_shards(run) -> Path:
    """Concatenate every task's shards in batch order into samples.jsonl, checking none is missing."""
    records = []
    for task, task_cfg in run.config.sample.tasks.items():
        n_prompts = sum(task_cfg.sources.values())
        n_batches = -(-n_prompts // run.config.sample.batch_prompts)
        for b in range(n_batches):
            path = _shard_path(run.dir, task, b)
            if not path.exists():
                raise RuntimeError(f"01_sample: shard {path} is missing; rerun the stage to resume")
            records.extend(read_jsonl(path, SAMPLE_SCHEMA))
    return atomic_write_jsonl(run.dir / SAMPLES_FILE, records)


def load_samples(path: Path) -> list[dict]:
    """Read samples.jsonl and check every record and response against the schema."""
    from udasa_lib.io import SchemaError, check_record

    records = read_jsonl(path, SAMPLE_SCHEMA)
    for line, record in enumerate(records, start=1):
        where = f"{path} line {line} (prompt {record['prompt_id']})"
        if not record["responses"]:
            raise SchemaError(f"{where}: empty response list")
        for j, response in enumerate(record["responses"]):
            check_record(response, RESPONSE_SCHEMA, f"{where} response {j}")
    return records


def summarize(records: list[dict]) -> list[dict]:
    """Per task: prompts, responses, mean/max response tokens, share of empty and truncated responses."""
    by_task: dict[str, list[dict]] = {}
    for record in records:
        by_task.setdefault(record["task"], []).extend(record["responses"])
    rows = []
    for task, responses in by_task.items():
        lengths = [len(r["token_ids"]) for r in responses]
        rows.append({
            "task": task,
            "prompts": sum(1 for r in records if r["task"] == task),
            "responses": len(responses),
            "mean_tokens": round(sum(lengths) / len(lengths), 1),
            "max_tokens": max(lengths),
            "empty_share": round(sum(1 for r in responses if not r["text"]) / len(responses), 3),
            "truncated_share": round(sum(1 for r in responses if r["finish_reason"] == "length") / len(responses), 3),
            "principle_share": round(sum(1 for r in responses if r["principle"]) / len(responses), 3),
        })
    return rows


def _sample_in_process(run, rank: int = 0, world: int = 1, device: str | None = None) -> dict:
    from udasa_lib.models import configure_threads, load_causal_lm

    threads = configure_threads(run.config.runtime.threads)
    model, tokenizer = load_causal_lm(run.config.model.name_or_path, run.config.model.dtype,
                                      device or run.config.runtime.device)
    counts = {task: sample_task(run, task, model, tokenizer, rank, world, progress=rank == 0)
              for task in run.config.sample.tasks}
    return {"threads": threads, "device": str(model.device), "per_task": counts}


def _worker(run, rank: int, world: int, threads: int) -> dict:
    """One of `runtime.workers` CPU processes: its share of every task's batches at `threads` threads."""
    import os

    os.environ["UDASA_THREADS"] = str(threads)
    return _sample_in_process(run, rank, world, device="cpu")


def _sample_in_workers(run, workers: int) -> dict:
    """Batches b with b % workers == r sampled by process r, each with threads // workers threads
    (spawned; every batch keeps its own seed, so the shards are those one process would write)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from udasa_lib.pipeline import schedule

    _, threads = schedule(run.config)
    started = time.time()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = list(pool.map(_worker, [run] * workers, range(workers), [workers] * workers, [threads] * workers))
    seconds = time.time() - started
    per_task = {task: {"batches": parts[0]["per_task"][task]["batches"],
                       "generated_batches": sum(p["per_task"][task]["generated_batches"] for p in parts),
                       "tokens": sum(p["per_task"][task]["tokens"] for p in parts),
                       "seconds": max(p["per_task"][task]["seconds"] for p in parts)} for task in parts[0]["per_task"]}
    return {"threads": threads, "workers": workers, "device": "cpu", "per_task": per_task,
            "wall_seconds_all_tasks": round(seconds, 1)}


def run_sampling(run) -> dict:
    """Sample every task (in this process, in `runtime.workers` CPU processes, or under
    `accelerate launch`), merge, and summarise."""
    from udasa_lib.models import resolve_device

    n_processes = run.config.runtime.num_processes
    cpu_workers = run.config.runtime.workers if resolve_device(run.config.runtime.device).type == "cpu" else 1
    if n_processes > 1:
        command = ["accelerate", "launch", "--num_processes", str(n_processes), "-m", "udasa_lib.sample",
                   "--config", str(run.config_path), "--overrides", json.dumps(run.overrides),
                   "--name", run.run_name]
        subprocess.run(command, check=True)
        from udasa_lib.pipeline import MANIFEST_EXTRA

        timing = json.loads((run.dir / MANIFEST_EXTRA).read_text())["timing"]  # written by main() on rank 0
    elif cpu_workers > 1:
        timing = _sample_in_workers(run, cpu_workers)
    else:
        timing = _sample_in_process(run)
    merge_shards(run)
    tokens = sum(c["tokens"] for c in timing["per_task"].values())
    seconds = sum(c["seconds"] for c in timing["per_task"].values())
    timing["tokens_per_s_this_session"] = round(tokens / seconds, 1) if seconds and tokens else None
    run.add_to_manifest(timing=timing)  # wall times live in the manifest, never in a product
    summary = summarize(load_samples(run.dir / SAMPLES_FILE))
    atomic_write_json(run.dir / "summary.json", summary)
    return {"summary": summary, "timing": timing}


def main(argv: list[str] | None = None) -> int:
    """Entry point for `accelerate launch -m udasa_lib.sample`: each rank samples its batches."""
    from accelerate import PartialState

    from udasa_lib.pipeline import open_stage

    parser = argparse.ArgumentParser(prog="python -m udasa_lib.sample")
    parser.add_argument("--config", required=True)
    parser.add_argument("--overrides", default="{}")
    parser.add_argument("--name", default="")
    args = parser.parse_args(argv)
    state = PartialState()
    run = open_stage("01_sample", args.config, args.overrides, args.name or None)
    timing = _sample_in_process(run, state.process_index, state.num_processes, device=str(state.device))
    state.wait_for_everyone()
    if state.is_main_process:
        run.add_to_manifest(timing=timing)
    return 0


if __name__ == "__main__":
    sys.exit(main())
