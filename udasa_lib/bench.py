"""`make bench`: speed goals measured, never asserted in tests.

sampling: tokens/s of the batched sampler (01_sample's path: B prompts x K sequences per
generate call, left padding) against plain `generate` called one prompt at a time, on the same
prompts, model, K and max_new_tokens, in one process, one after the other. Two baselines:
  one_sequence_per_call   the naive loop: K calls per prompt, one sequence each
  k_sequences_per_call    one call per prompt with num_return_sequences=K
Only response tokens up to and including EOS count, so the padding a batch wastes on
sequences that stopped early is charged to the batched path.

scoring: wall time of 02_score's computation (embedder and probe loading and fitting included)
on the samples of CONFIG's own 01_sample stage, against the generation time that stage
recorded in timing.json (a resumed stage's time is extrapolated from its per-batch rate).
Needs `make reproduce` to have run 01_sample for CONFIG.
"""
from __future__ import annotations

import argparse
import sys
import time

from udasa_lib import REPO_ROOT, config as config_mod
from udasa_lib.io import atomic_write_json


def _count_new_tokens(sequences, prompt_length: int, eos_ids: set[int]) -> int:
    total = 0
    for row in sequences[:, prompt_length:].tolist():
        end = next((t + 1 for t, tok in enumerate(row) if tok in eos_ids), len(row))
        total += end
    return total


def bench_sampling(cfg: config_mod.Config, n_prompts: int) -> dict:
    import torch

    from udasa_lib import data, sample
    from udasa_lib.models import configure_threads, load_causal_lm

    threads = configure_threads(cfg.runtime.threads)
    model, tokenizer = load_causal_lm(cfg.model.name_or_path, cfg.model.dtype, cfg.runtime.device)
    task = cfg.sample.tasks["alignment"]
    texts = [r["text"] for r in data.load_benign()[: n_prompts // 2]]
    texts += [r["text"] for r in data.load_advbench()[: n_prompts - len(texts)]]
    prompts = [sample.format_prompt(tokenizer, t, task.chat_template) for t in texts]
    k, max_new = cfg.sample.k, task.max_new_tokens
    eos_ids = sample._eos_ids(model, tokenizer)
    gen_kwargs = dict(do_sample=True, temperature=cfg.sample.temperature, top_p=cfg.sample.top_p,
                      top_k=cfg.sample.top_k, max_new_tokens=max_new, pad_token_id=tokenizer.pad_token_id)

    sample.generate_batch(model, tokenizer, prompts[:1], k=1, temperature=1.0, top_p=1.0, top_k=0,
                          max_new_tokens=4, seed=0)  # warm-up: first-call allocations are not throughput

    started = time.perf_counter()
    batched_tokens = 0
    for i in range(0, len(prompts), cfg.sample.batch_prompts):
        out = sample.generate_batch(model, tokenizer, prompts[i: i + cfg.sample.batch_prompts], k=k,
                                    temperature=cfg.sample.temperature, top_p=cfg.sample.top_p,
                                    top_k=cfg.sample.top_k, max_new_tokens=max_new, seed=i)
        batched_tokens += sum(len(r["token_ids"]) for responses in out for r in responses)
    batched_s = time.perf_counter() - started

    def loop(sequences_per_call: int) -> tuple[int, float]:
        torch.manual_seed(0)
        tokens, begin = 0, time.perf_counter()
        for prompt in prompts:
            encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
            for _ in range(k // sequences_per_call):
                with torch.inference_mode():
                    sequences = model.generate(**encoded, num_return_sequences=sequences_per_call, **gen_kwargs)
                tokens += _count_new_tokens(sequences, encoded["input_ids"].shape[1], eos_ids)
        return tokens, time.perf_counter() - begin

    single_tokens, single_s = loop(1)
    k_tokens, k_s = loop(k)
    batched_rate = batched_tokens / batched_s
    return {
        "model": cfg.model.name_or_path, "threads": threads, "device": str(model.device),
        "prompts": len(prompts), "k": k, "max_new_tokens": max_new, "batch_prompts": cfg.sample.batch_prompts,
        "batched": {"tokens": batched_tokens, "seconds": round(batched_s, 2), "tokens_per_s": round(batched_rate, 1)},
        "one_sequence_per_call": {"tokens": single_tokens, "seconds": round(single_s, 2),
                                  "tokens_per_s": round(single_tokens / single_s, 1)},
        "k_sequences_per_call": {"tokens": k_tokens, "seconds": round(k_s, 2), "tokens_per_s": round(k_tokens / k_s, 1)},
        "speedup_vs_one_sequence_per_call": round(batched_rate / (single_tokens / single_s), 2),
        "speedup_vs_k_sequences_per_call": round(batched_rate / (k_tokens / k_s), 2),
        "goal": "speedup_vs_one_sequence_per_call >= 4 on the default model",
    }


def bench_scoring(cfg: config_mod.Config, config_path: str) -> dict:
    import json

    from udasa_lib import pipeline
    from udasa_lib.models import configure_threads
    from udasa_lib.sample import SAMPLES_FILE, load_samples
    from udasa_lib.score import load_principles, score_samples

    sample_dir = pipeline.results_root() / ".stages" / "01_sample" / pipeline.stage_key(cfg, "01_sample")
    if not (sample_dir / pipeline.MANIFEST).exists():
        raise SystemExit(f"bench scoring: 01_sample has not run for {config_path}; run `make reproduce` first")
    timing = json.loads((sample_dir / "timing.json").read_text())
    sampling_s = sum(t["seconds"] * t["batches"] / max(1, t["generated_batches"]) for t in timing["per_task"].values())
    configure_threads(cfg.runtime.threads)
    records = load_samples(sample_dir / SAMPLES_FILE)
    started = time.perf_counter()
    _, report = score_samples(records, cfg.score, cfg.model, cfg.runtime, load_principles(cfg.score.value.principles),
                              progress=False)
    scoring_s = time.perf_counter() - started
    return {"responses": sum(len(r["responses"]) for r in records), "sampling_seconds": round(sampling_s, 1),
            "scoring_seconds": round(scoring_s, 1), "scoring_breakdown": report["seconds"],
            "scoring_share_of_sampling": round(scoring_s / sampling_s, 3),
            "goal": "scoring_share_of_sampling < 0.10"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m udasa_lib.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--prompts", type=int, default=16, help="prompts in the sampling benchmark")
    parser.add_argument("--out", default=str(REPO_ROOT / "results" / "bench"))
    parser.add_argument("--only", choices=["sampling", "scoring"], default=None)
    args = parser.parse_args(argv)
    cfg = config_mod.resolve(REPO_ROOT / args.config if not args.config.startswith("/") else args.config)
    if args.only in (None, "scoring"):
        scoring = bench_scoring(cfg, args.config)
        path = atomic_write_json(f"{args.out}/scoring.json", scoring)
        print(f"scoring {scoring['responses']} responses: {scoring['scoring_seconds']} s; sampling them took "
              f"{scoring['sampling_seconds']} s -> {100 * scoring['scoring_share_of_sampling']:.1f} % (goal < 10 %)")
        print(f"  breakdown: {scoring['scoring_breakdown']}")
        print(f"written to {path}")
    if args.only == "scoring":
        return 0
    result = bench_sampling(cfg, args.prompts)
    path = atomic_write_json(f"{args.out}/sampling.json", result)
    print(f"sampling on {result['model']} ({result['threads']} threads, {result['device']}), "
          f"{result['prompts']} prompts x K={result['k']}, {result['max_new_tokens']} new tokens max")
    for name in ("batched", "one_sequence_per_call", "k_sequences_per_call"):
        row = result[name]
        print(f"  {name:24s} {row['tokens']:6d} tokens {row['seconds']:8.1f} s {row['tokens_per_s']:8.1f} tokens/s")
    print(f"  speedup vs one sequence per call: {result['speedup_vs_one_sequence_per_call']}x (goal >= 4x)")
    print(f"  speedup vs K sequences per call:  {result['speedup_vs_k_sequences_per_call']}x")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
