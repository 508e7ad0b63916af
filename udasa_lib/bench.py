"""`make bench`: speed goals measured, never asserted in tests.

sampling: tokens/s of the batched sampler (01_sample's path: B prompts x K sequences per
generate call, left padding) against plain `generate` called one prompt at a time, on the same
prompts, model, K and max_new_tokens, in one process, one after the other. Two baselines:
  one_sequence_per_call   the naive loop: K calls per prompt, one sequence each
  k_sequences_per_call    one call per prompt with num_return_sequences=K
Only response tokens up to and including EOS count, so the padding a batch wastes on
sequences that stopped early is charged to the batched path.

scoring: wall time of 02_score's computation (embedder and probe loading included) on the
samples of CONFIG's own 01_sample stage, against the time sampling them takes. The sampling
time is the stage's generated tokens at the batched rate this same run measured, so a stage
that ran beside other work is not credited with a slow sampler; the time 01_sample recorded
is reported beside it. Needs `make reproduce` to have run 01_sample for CONFIG.

training: DPO pairs/s of 04_train's configured path (UALDPOTrainer, the config's batch size,
max length, LoRA and learning rate) against trl's DPOTrainer with its default DPOConfig (only
output_dir, one epoch and the CPU flag set; the same LoRA, since without it trl trains the
full model against a second copy), on the same pairs of CONFIG's 03_pairs, one after the other.
"""
from __future__ import annotations

import argparse
import sys
import time

from udasa_lib import REPO_ROOT, config as config_mod
from udasa_lib.io import atomic_write_json


def _count_new_tokens(sequences, prompt_length: int, eos_ids: set[int]) -> int:
    from udasa_lib.generation import trim_at_eos

    return sum(len(trim_at_eos(row, eos_ids)[0]) for row in sequences[:, prompt_length:].tolist())


def bench_sampling(cfg: config_mod.Config, n_prompts: int) -> dict:
    import torch

    from udasa_lib import data, generation, sample
    from udasa_lib.models import configure_threads, load_causal_lm

    threads = configure_threads(cfg.runtime.threads)
    model, tokenizer = load_causal_lm(cfg.model.name_or_path, cfg.model.dtype, cfg.runtime.device)
    task = cfg.sample.tasks["alignment"]
    texts = [r["text"] for r in data.load_benign()[: n_prompts // 2]]
    texts += [r["text"] for r in data.load_advbench()[: n_prompts - len(texts)]]
    prompts = [generation.encode_prompt(tokenizer, generation.format_prompt(tokenizer, t, task.chat_template))
               for t in texts]
    k, max_new = cfg.sample.k, task.max_new_tokens
    eos_ids = generation.eos_ids(model, tokenizer)
    gen_kwargs = dict(max_new_tokens=max_new, pad_token_id=tokenizer.pad_token_id,
                      **generation.sampling_kwargs(cfg.sample.temperature, cfg.sample.top_p, cfg.sample.top_k))

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
            input_ids = torch.tensor([prompt], device=model.device)
            for _ in range(k // sequences_per_call):
                with torch.inference_mode():
                    sequences = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                               num_return_sequences=sequences_per_call, **gen_kwargs)
                tokens += _count_new_tokens(sequences, input_ids.shape[1], eos_ids)
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


def bench_scoring(cfg: config_mod.Config, config_path: str, batched_tokens_per_s: float | None) -> dict:
    import json

    from udasa_lib import pipeline
    from udasa_lib.models import configure_threads
    from udasa_lib.sample import SAMPLES_FILE, load_samples
    from udasa_lib.score import load_principles, score_samples

    sample_dir = pipeline.results_root() / ".stages" / "01_sample" / pipeline.stage_key(cfg, "01_sample")
    if not (sample_dir / pipeline.MANIFEST).exists():
        raise SystemExit(f"bench scoring: 01_sample has not run for {config_path}; run `make reproduce` first")
    timing = json.loads((sample_dir / "timing.json").read_text())
    recorded_s = sum(t["seconds"] * t["batches"] / max(1, t["generated_batches"]) for t in timing["per_task"].values())
    configure_threads(cfg.runtime.threads)
    records = load_samples(sample_dir / SAMPLES_FILE)
    tokens = sum(len(r["token_ids"]) for record in records for r in record["responses"])
    sampling_s = tokens / batched_tokens_per_s if batched_tokens_per_s else recorded_s
    from udasa_lib.value_probe import HARM_PROBE_FILE
    from udasa_lib.value_probe import HarmProbe

    started = time.perf_counter()
    data_dir = pipeline.results_root() / ".stages" / "00_data" / pipeline.stage_key(cfg, "00_data")
    probe = HarmProbe.load(data_dir / HARM_PROBE_FILE) if "harm_probe" in cfg.score.value.scorers.values() else None
    _, report = score_samples(records, cfg.score, cfg.model, cfg.runtime, load_principles(cfg.score.value.principles),
                              probe, progress=False)
    scoring_s = time.perf_counter() - started
    return {"responses": sum(len(r["responses"]) for r in records), "tokens": tokens,
            "sampling_seconds": round(sampling_s, 1), "sampling_seconds_recorded_by_01_sample": round(recorded_s, 1),
            "scoring_seconds": round(scoring_s, 1), "scoring_breakdown": report["seconds"],
            "scoring_share_of_sampling": round(scoring_s / sampling_s, 3),
            "goal": "scoring_share_of_sampling < 0.10"}


def bench_training(cfg: config_mod.Config, n_pairs: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    from udasa_lib import pipeline, train
    from udasa_lib.models import configure_threads, load_causal_lm

    stage_dir = pipeline.results_root() / ".stages" / "03_pairs" / pipeline.stage_key(cfg, "03_pairs")
    if not (stage_dir / pipeline.MANIFEST).exists():
        raise SystemExit("bench training: 03_pairs has not run for this config; run `make reproduce` first")
    threads = configure_threads(cfg.runtime.threads)
    rows = train.load_pairs(stage_dir, "combined", "alignment")[:n_pairs]
    records = train.training_records(rows, train.METHODS["dpo"], None)
    # trl's own path re-tokenises text and appends EOS: the baseline the configured path is compared with
    text_records = [{"prompt": r["formatted_prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    results = {}
    for name in ("configured", "trl_default"):
        set_seed(cfg.seed)
        base, tokenizer = load_causal_lm(cfg.model.name_or_path, cfg.model.dtype, cfg.runtime.device)
        tokenizer.padding_side = "right"
        dataset = Dataset.from_list(records if name == "configured" else text_records)
        cpu = base.device.type == "cpu"
        if name == "configured":
            args = train._trainer_args(cfg, train.UNSTAGED, REPO_ROOT / "results" / "bench" / "tmp", "dpo",
                                       base.device.type, base.dtype == torch.bfloat16)
            args.logging_steps = 10**6
            from udasa_lib.trainers import UALDPOTrainer

            trainer = UALDPOTrainer(model=train._new_adapter(base, cfg), args=args, train_dataset=dataset,
                                  processing_class=tokenizer, reference=cfg.train.reference)
        else:
            lora = cfg.train.lora
            args = DPOConfig(output_dir=str(REPO_ROOT / "results" / "bench" / "tmp"), num_train_epochs=1, use_cpu=cpu,
                             bf16=not cpu, report_to="none", save_strategy="no", logging_steps=10**6)
            trainer = DPOTrainer(model=base, args=args, train_dataset=dataset, processing_class=tokenizer,
                                 peft_config=LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                        target_modules=list(lora.targets), task_type="CAUSAL_LM"))
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        results[name] = {"pairs": len(records), "seconds": round(seconds, 2), "pairs_per_s": round(len(records) / seconds, 3),
                         "batch_size": args.per_device_train_batch_size, "max_length": args.max_length,
                         "gradient_checkpointing": args.gradient_checkpointing, "bf16": args.bf16}
        del trainer, base
    return {"threads": threads, "model": cfg.model.name_or_path, **results,
            "ratio_configured_over_trl_default": round(results["configured"]["pairs_per_s"]
                                                       / results["trl_default"]["pairs_per_s"], 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m udasa_lib.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--prompts", type=int, default=16, help="prompts in the sampling benchmark")
    parser.add_argument("--out", default=str(REPO_ROOT / "results" / "bench"))
    parser.add_argument("--pairs", type=int, default=32, help="pairs in the training benchmark")
    parser.add_argument("--only", choices=["sampling", "scoring", "training"], default=None)
    args = parser.parse_args(argv)
    cfg = config_mod.resolve(REPO_ROOT / args.config if not args.config.startswith("/") else args.config)
    batched_rate = None
    if args.only in (None, "sampling"):
        batched_rate = _report_sampling(cfg, args)
    if args.only in (None, "scoring"):
        scoring = bench_scoring(cfg, args.config, batched_rate)
        path = atomic_write_json(f"{args.out}/scoring.json", scoring)
        print(f"scoring {scoring['responses']} responses: {scoring['scoring_seconds']} s; sampling them takes "
              f"{scoring['sampling_seconds']} s -> {100 * scoring['scoring_share_of_sampling']:.1f} % (goal < 10 %)")
        print(f"  breakdown: {scoring['scoring_breakdown']}")
        print(f"  (01_sample itself recorded {scoring['sampling_seconds_recorded_by_01_sample']} s)")
        print(f"written to {path}")
    if args.only in (None, "training"):
        training = bench_training(cfg, args.pairs)
        path = atomic_write_json(f"{args.out}/training.json", training)
        print(f"DPO training, {training['configured']['pairs']} pairs, {training['threads']} threads:")
        for name in ("configured", "trl_default"):
            row = training[name]
            print(f"  {name:12s} {row['pairs_per_s']:7.3f} pairs/s  (batch {row['batch_size']}, max_length "
                  f"{row['max_length']}, gradient checkpointing {row['gradient_checkpointing']})")
        print(f"  ratio configured / trl default: {training['ratio_configured_over_trl_default']}x")
        print(f"written to {path}")
    return 0


def _report_sampling(cfg: config_mod.Config, args) -> float:
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
    return result["batched"]["tokens_per_s"]


if __name__ == "__main__":
    sys.exit(main())
