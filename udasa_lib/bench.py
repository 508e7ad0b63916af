"""`make bench`: speed goals measured against this machine's own matmul rate, never asserted in tests.

Everything is measured in one process, one path after the other, so the ratios compare like
with like on a shared, noisy machine.

machine: fp32 GFLOP/s of this CPU on the policy's own linear-layer shapes (every nn.Linear of the
model, the LM head included, `F.linear` as the model calls it), at a decode-like row count (the
sampler's B*K rows) and a training-like one (the tokens of one DPO batch). A path's FLOP bound is
what it would reach if it did nothing but those matmuls at that rate: tokens/s = rate / (2 * linear
parameters) for generation; for training, policy forward + backward (2 x 2 FLOPs per parameter and
token; LoRA's own gradients and attention scores are left out) and one reference forward per pair.

generation: 01_sample's calls on the same prompts, seeds and model with each engine of
`generation.generate`: "hf" (transformers' generate: today's batched path) and "loop" (the
default), both in this process at runtime.threads; then "workers", 01_sample's own layout on CPU
(the default engine in runtime.workers spawned processes, threads split; the slowest process's
generation time counts, start-up is reported beside it). Only response tokens up to and
including EOS count. Also: how many rows the two engines
drew identically, and the largest |log-prob - teacher-forced log-prob| of each engine's tokens.
The old baselines (one prompt per generate call, K or 1 sequences per call) run on a few prompts.

scoring: wall time of 02_score's computation on the samples of CONFIG's own 01_sample stage,
against the time sampling them takes at the rate this run measured for 01_sample's own layout
(its worker processes when runtime.workers > 1, else the default engine); 01_sample's recorded
time is reported beside it. Needs `make reproduce` to have run 01_sample.

training: the DPO-type methods of CONFIG's alignment task on the same pairs of 03_pairs. Today's
path computes pi_0's log-probs in every step of every method; the shared path computes them once
(one reference pass, `udasa_lib/reference_logps.py`) and every method reads them. One method is
trained each way (every DPO-type method runs the same steps on the same pairs); N methods cost N
trainings plus, on the shared path, one reference pass. "side by side" is 04_train's layout
under `make reproduce` (runtime.workers trainings at once, threads split). trl's DPOTrainer with
its defaults is the last path, as before.

judge: the LM judge of CONFIG's 05_eval_harmless (`eval_harmless.judge`) answering its question
(P(Yes), `udasa_lib/judges.py`) on pyrit's refusal-labelled responses cut to the evaluation's answer
length: at its configured dtype with the shared question's KV cache computed once (today's path,
`generation.SharedPrefix`), the same without the cache (every row forwarded whole), and with the
cache in the other CPU dtype (float32 <-> bfloat16); judgments/s each, and the largest |P(Yes)
difference| of each path against today's. Then the pairwise judge (`eval_winrate.LocalJudge`, both
orders) on known-direction pairs: judgments/s.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from udasa_lib import REPO_ROOT, config as config_mod
from udasa_lib.io import atomic_write_json

BENCH_FILE = "bench.json"
BENCH_FIGURE = "bench.png"


# --- the machine --------------------------------------------------------------------------------

def linear_shapes(model) -> list[tuple[int, int]]:
    """(in_features, out_features) of every nn.Linear the forward runs, LM head included."""
    import torch

    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]


def flops_per_token(model) -> int:
    """Matmul FLOPs of one token's forward pass: 2 x the linear layers' parameters."""
    return 2 * sum(i * o for i, o in linear_shapes(model))


def matmul_rate(model, rows: int, repeats: int = 5) -> float:
    """GFLOP/s of `F.linear` on every linear shape of `model` with `rows` input rows, fp32, one
    forward's worth of matmuls per repeat; the median repeat counts (the first is a warm-up)."""
    import torch
    import torch.nn.functional as F

    shapes = linear_shapes(model)
    distinct = {shape: shapes.count(shape) for shape in shapes}
    weights = {shape: torch.randn(shape[1], shape[0]) for shape in distinct}
    inputs = {shape: torch.randn(rows, shape[0]) for shape in distinct}
    flops = sum(2 * rows * i * o * n for (i, o), n in distinct.items())
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            started = time.perf_counter()
            for shape, n in distinct.items():
                for _ in range(n):
                    F.linear(inputs[shape], weights[shape])
            times.append(time.perf_counter() - started)
    return flops / statistics.median(times[1:]) / 1e9


# --- generation ---------------------------------------------------------------------------------

def _bench_prompts(cfg, tokenizer, n_prompts: int) -> list[list[int]]:
    from udasa_lib import data, generation

    task = cfg.sample.tasks["alignment"]
    texts = [r["text"] for r in data.load_benign()[: n_prompts // 2]]
    texts += [r["text"] for r in data.load_advbench()[: n_prompts - len(texts)]]
    return [generation.encode_prompt(tokenizer, generation.format_prompt(tokenizer, t, task.chat_template))
            for t in texts]


def _sample_all(cfg, model, tokenizer, prompts, engine: str, batches: list[int] | None = None
                ) -> tuple[list[dict], float]:
    """01_sample's calls on the bench prompts (only `batches`, if given): (rows, seconds)."""
    from udasa_lib import generation

    task = cfg.sample.tasks["alignment"]
    rows, started = [], time.perf_counter()
    for b, i in enumerate(range(0, len(prompts), cfg.sample.batch_prompts)):
        if batches is not None and b not in batches:
            continue
        rows += generation.generate(model, tokenizer, prompts[i: i + cfg.sample.batch_prompts],
                                    max_new_tokens=task.max_new_tokens, temperature=cfg.sample.temperature,
                                    top_p=cfg.sample.top_p, top_k=cfg.sample.top_k, num_return_sequences=cfg.sample.k,
                                    seed=generation.batch_seed(cfg.seed, "bench", b), with_logprobs=True, engine=engine)
    return rows, time.perf_counter() - started


def _worker_share(cfg, prompts, rank: int, workers: int, threads: int) -> tuple[list[int], list[dict], float]:
    """One of 01_sample's CPU worker processes: batches b % workers == rank with the default engine."""
    import os

    from udasa_lib import generation
    from udasa_lib.models import configure_threads, load_causal_lm

    os.environ["UDASA_THREADS"] = str(threads)
    configure_threads(threads)
    model, tokenizer = load_causal_lm(cfg.model.name_or_path, cfg.model.dtype, "cpu")
    generation.generate(model, tokenizer, prompts[:1], max_new_tokens=4, temperature=1.0)  # warm-up
    mine = [b for b in range(-(-len(prompts) // cfg.sample.batch_prompts)) if b % workers == rank]
    rows, seconds = _sample_all(cfg, model, tokenizer, prompts, cfg.runtime.generation_engine, mine)
    return mine, rows, seconds


def _sample_in_workers(cfg, prompts) -> tuple[list[dict], float, float]:
    """The same calls split across runtime.workers spawned processes (01_sample on CPU): rows in
    batch order, the slowest worker's generation seconds, and the wall seconds including start-up."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from udasa_lib.pipeline import schedule

    workers, threads = schedule(cfg)
    started = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = list(pool.map(_worker_share, [cfg] * workers, [prompts] * workers, range(workers),
                              [workers] * workers, [threads] * workers))
    wall = time.perf_counter() - started
    per_batch = {}
    size = cfg.sample.batch_prompts * cfg.sample.k
    for mine, rows, _ in parts:
        for j, b in enumerate(mine):
            per_batch[b] = rows[j * size:(j + 1) * size]
    return [r for b in sorted(per_batch) for r in per_batch[b]], max(p[2] for p in parts), wall


def _naive_loop(cfg, model, tokenizer, prompts, sequences_per_call: int) -> tuple[int, float]:
    """One prompt per transformers generate call, `sequences_per_call` sequences each (the old baselines)."""
    import torch

    from udasa_lib import generation

    eos = generation.eos_ids(model, tokenizer)
    kwargs = dict(max_new_tokens=cfg.sample.tasks["alignment"].max_new_tokens, pad_token_id=generation.pad_id_of(tokenizer),
                  **generation.sampling_kwargs(cfg.sample.temperature, cfg.sample.top_p, cfg.sample.top_k))
    torch.manual_seed(0)
    tokens, started = 0, time.perf_counter()
    for prompt in prompts:
        input_ids = torch.tensor([prompt], device=model.device)
        for _ in range(cfg.sample.k // sequences_per_call):
            with torch.inference_mode():
                out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                     num_return_sequences=sequences_per_call, **kwargs)
            tokens += sum(len(generation.trim_at_eos(row, eos)[0]) for row in out[:, input_ids.shape[1]:].tolist())
    return tokens, time.perf_counter() - started


def bench_generation(cfg, model, tokenizer, n_prompts: int, baseline_prompts: int, decode_rate: float) -> dict:
    from udasa_lib import generation

    prompts = _bench_prompts(cfg, tokenizer, n_prompts)
    generation.generate(model, tokenizer, prompts[:1], max_new_tokens=4, temperature=1.0)  # warm-up allocations
    bound = decode_rate * 1e9 / flops_per_token(model)
    result: dict = {"prompts": len(prompts), "k": cfg.sample.k, "batch_prompts": cfg.sample.batch_prompts,
                    "rows_per_call": cfg.sample.batch_prompts * cfg.sample.k,
                    "max_new_tokens": cfg.sample.tasks["alignment"].max_new_tokens,
                    "flop_bound_tokens_per_s": round(bound, 1)}
    runs = {}
    for engine in ("hf", "loop"):
        rows, seconds = _sample_all(cfg, model, tokenizer, prompts, engine)
        runs[engine] = rows
        tokens = sum(len(r["token_ids"]) for r in rows)
        expanded = [p for p in prompts for _ in range(cfg.sample.k)]
        forced = generation.completion_logprobs(model, tokenizer, expanded, [r["token_ids"] for r in rows])
        diff = max((abs(a - b) for r, f in zip(rows, forced) for a, b in zip(r["token_logprobs"], f)), default=0.0)
        result[engine] = {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
                          "fraction_of_flop_bound": round(tokens / seconds / bound, 3),
                          "max_abs_logprob_diff_vs_teacher_forcing": float(f"{diff:.2e}")}
    result["identical_rows"] = sum(a["token_ids"] == b["token_ids"] for a, b in zip(runs["hf"], runs["loop"]))
    result["rows"] = len(runs["hf"])
    result["speedup_loop_over_hf"] = round(result["loop"]["tokens_per_s"] / result["hf"]["tokens_per_s"], 2)
    if cfg.runtime.workers > 1 and str(model.device) == "cpu":
        # 01_sample's own layout on CPU: the default engine in runtime.workers processes; the
        # FLOP bound stays the 2-thread one, the machine's whole matmul rate
        rows, seconds, wall = _sample_in_workers(cfg, prompts)
        tokens = sum(len(r["token_ids"]) for r in rows)
        result["workers"] = {"processes": cfg.runtime.workers, "tokens": tokens, "seconds": round(seconds, 2),
                             "wall_seconds_with_start_up": round(wall, 2), "tokens_per_s": round(tokens / seconds, 1),
                             "fraction_of_flop_bound": round(tokens / seconds / bound, 3),
                             "identical_rows_vs_hf": sum(a["token_ids"] == b["token_ids"]
                                                         for a, b in zip(runs["hf"], rows))}
        result["speedup_workers_over_hf"] = round(result["workers"]["tokens_per_s"] / result["hf"]["tokens_per_s"], 2)
    few = prompts[:baseline_prompts]
    for name, per_call in (("one_sequence_per_call", 1), ("k_sequences_per_call", cfg.sample.k)):
        tokens, seconds = _naive_loop(cfg, model, tokenizer, few, per_call)
        result[name] = {"prompts": len(few), "tokens": tokens, "seconds": round(seconds, 2),
                        "tokens_per_s": round(tokens / seconds, 1),
                        "fraction_of_flop_bound": round(tokens / seconds / bound, 3)}
    result["speedup_loop_over_one_sequence_per_call"] = round(
        result["loop"]["tokens_per_s"] / result["one_sequence_per_call"]["tokens_per_s"], 2)
    best = "workers" if "workers" in result else "loop"
    result["goals"] = {"01_sample's path >= 2x hf": result[best]["tokens_per_s"] / result["hf"]["tokens_per_s"] >= 2,
                       "01_sample's path >= 50 % of the FLOP bound": result[best]["fraction_of_flop_bound"] >= 0.5,
                       "identical ids": result["identical_rows"] == result["rows"]}
    return result


def profile_generation(cfg, model, tokenizer, rows: int = 12) -> dict:
    """torch.profiler's top operators for one sampling batch, per engine (self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    from udasa_lib import generation

    prompts = _bench_prompts(cfg, tokenizer, cfg.sample.batch_prompts)
    tables = {}
    for engine in ("hf", "loop"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            generation.generate(model, tokenizer, prompts, max_new_tokens=cfg.sample.tasks["alignment"].max_new_tokens,
                                temperature=cfg.sample.temperature, num_return_sequences=cfg.sample.k, seed=1,
                                with_logprobs=True, engine=engine)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        tables[engine] = {"total_s": round(total / 1e6, 2), "top": [
            {"op": e.key, "self_s": round(e.self_cpu_time_total / 1e6, 3), "share": round(e.self_cpu_time_total / total, 3),
             "calls": e.count} for e in events[:rows]]}
    return tables


# --- scoring ------------------------------------------------------------------------------------

def bench_scoring(cfg: config_mod.Config, config_path: str, sampling_tokens_per_s: float | None) -> dict:
    import json

    from udasa_lib import pipeline
    from udasa_lib.models import configure_threads
    from udasa_lib.sample import SAMPLES_FILE, load_samples
    from udasa_lib.score import load_principles, score_samples
    from udasa_lib.value_probe import HARM_PROBE_FILE, HarmProbe

    sample_dir = pipeline.results_root() / ".stages" / "01_sample" / pipeline.stage_key(cfg, "01_sample")
    if not (sample_dir / pipeline.MANIFEST).exists():
        raise SystemExit(f"bench scoring: 01_sample has not run for {config_path}; run `make reproduce` first")
    timing = json.loads((sample_dir / pipeline.MANIFEST).read_text())["extra"]["timing"]
    recorded_s = sum(t["seconds"] * t["batches"] / max(1, t["generated_batches"]) for t in timing["per_task"].values())
    configure_threads(cfg.runtime.threads)
    records = load_samples(sample_dir / SAMPLES_FILE)
    tokens = sum(len(r["token_ids"]) for record in records for r in record["responses"])
    sampling_s = tokens / sampling_tokens_per_s if sampling_tokens_per_s else recorded_s

    started = time.perf_counter()
    data_dir = pipeline.results_root() / ".stages" / "00_data" / pipeline.stage_key(cfg, "00_data")
    probe = HarmProbe.load(data_dir / HARM_PROBE_FILE) if "harm_probe" in cfg.score.value.scorers.values() else None
    _, report = score_samples(records, cfg.score, cfg.model, cfg.runtime, load_principles(cfg.score.value.principles, "judge"),
                              probe, progress=False)
    scoring_s = time.perf_counter() - started
    return {"responses": sum(len(r["responses"]) for r in records), "tokens": tokens,
            "sampling_seconds": round(sampling_s, 1), "sampling_seconds_recorded_by_01_sample": round(recorded_s, 1),
            "scoring_seconds": round(scoring_s, 1), "scoring_breakdown": report["seconds"],
            "scoring_share_of_sampling": round(scoring_s / sampling_s, 3),
            "goals": {"scoring < 10 % of sampling": scoring_s / sampling_s < 0.10}}


# --- training -----------------------------------------------------------------------------------

def _train_share(cfg, records, table_dir: str, threads: int) -> float:
    """One DPO training on the shared reference table at `threads` threads, as a side-by-side
    04_train stage runs it: its training seconds."""
    import os

    from transformers import set_seed

    from udasa_lib import train
    from udasa_lib.methods import METHODS
    from udasa_lib.models import configure_threads, load_causal_lm
    from udasa_lib.reference_logps import SharedReference, reference_key

    os.environ["UDASA_THREADS"] = str(threads)
    configure_threads(threads)
    set_seed(cfg.seed)
    base, tokenizer = load_causal_lm(cfg.model.name_or_path, cfg.model.dtype, "cpu")
    tokenizer.padding_side = "right"
    shared = SharedReference(records, reference_key(base, max_length=cfg.train.max_length,
                                                    truncation_mode="keep_start", bf16=False), Path(table_dir))
    model = train._new_adapter(base, cfg)
    args = train._trainer_args(cfg, train.UNSTAGED, Path(table_dir) / f"out-{os.getpid()}", "dpo", "cpu", False,
                               one_epoch(records, cfg), precompute_reference=True)
    args.logging_steps = 10**6
    trainer = train.build_trainer(model, tokenizer, records, args, METHODS["dpo"], cfg.train.reference, shared)
    if shared.computed:
        raise RuntimeError("bench: the side-by-side trainings must read the table the shared run wrote")
    started = time.perf_counter()
    trainer.train()
    return time.perf_counter() - started


def one_epoch(records, cfg) -> int:
    """Optimizer steps of one pass over `records`: the bench times passes, not the run's budget."""
    import math

    return math.ceil(len(records) / (cfg.train.batch_size * cfg.train.gradient_accumulation_steps))


def _dpo_methods(cfg) -> list[str]:
    from udasa_lib.methods import METHODS

    return [m for m in cfg.train.methods.get("alignment", [])
            if METHODS[m].objective == "dpo" and METHODS[m].pair_set == "combined"]


def _real_tokens(records, max_length: int) -> int:
    return sum(min(len(r["prompt_ids"]) + len(r[c]), max_length) for r in records for c in ("chosen_ids", "rejected_ids"))


def bench_training(cfg: config_mod.Config, n_pairs: int, train_rate: float, with_trl_default: bool = True) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    from udasa_lib import pipeline, train
    from udasa_lib.methods import METHODS
    from udasa_lib.models import configure_threads, load_causal_lm
    from udasa_lib.reference_logps import SharedReference, reference_key

    stage_dir = pipeline.results_root() / ".stages" / "03_pairs" / pipeline.stage_key(cfg, "03_pairs")
    if not (stage_dir / pipeline.MANIFEST).exists():
        raise SystemExit("bench training: 03_pairs has not run for this config; run `make reproduce` first")
    threads = configure_threads(cfg.runtime.threads)
    rows = train.load_pairs(stage_dir, "combined", "alignment")[:n_pairs]
    records = train.training_records(rows, METHODS["dpo"], None)
    tokens = _real_tokens(records, cfg.train.max_length)
    methods = _dpo_methods(cfg) or ["dpo"]
    scratch = Path(tempfile.mkdtemp(prefix="udasa-bench-"))
    results: dict = {}
    per_token = None

    def fresh():
        set_seed(cfg.seed)
        base, tokenizer = load_causal_lm(cfg.model.name_or_path, cfg.model.dtype, cfg.runtime.device)
        tokenizer.padding_side = "right"
        return base, tokenizer

    for name in ("per_batch_reference", "shared_reference"):
        base, tokenizer = fresh()
        per_token = flops_per_token(base)
        shared = None
        reference_s = 0.0
        if name == "shared_reference":
            shared = SharedReference(records, reference_key(base, max_length=cfg.train.max_length,
                                                            truncation_mode="keep_start", bf16=False), scratch)
        model = train._new_adapter(base, cfg)
        args = train._trainer_args(cfg, train.UNSTAGED, scratch / name, "dpo", base.device.type, False,
                                   one_epoch(records, cfg), precompute_reference=shared is not None)
        args.logging_steps = 10**6
        started = time.perf_counter()
        trainer = train.build_trainer(model, tokenizer, records, args, METHODS["dpo"], cfg.train.reference, shared)
        if shared is not None:
            reference_s = time.perf_counter() - started  # trl's precompute runs in the constructor
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        results[name] = {"pairs": len(records), "train_seconds": round(seconds, 2),
                         "reference_pass_seconds": round(reference_s, 2) if shared else None,
                         "pairs_per_s_one_method": round(len(records) / seconds, 3)}
        del trainer, model, base
    # N methods: N trainings, plus one reference pass on the shared path
    n = len(methods)
    per_batch_s = n * results["per_batch_reference"]["train_seconds"]
    shared_s = n * results["shared_reference"]["train_seconds"] + results["shared_reference"]["reference_pass_seconds"]
    # minimum FLOPs of the work: each method's policy forward + backward, and pi_0's forward once
    # per method (today) or once in all (shared)
    work = {"per_batch_reference": n * 3 * per_token * tokens, "shared_reference": (n * 2 + 1) * per_token * tokens}
    for name, seconds in (("per_batch_reference", per_batch_s), ("shared_reference", shared_s)):
        results[name].update({"methods": n, "seconds_all_methods": round(seconds, 1),
                              "pairs_per_s": round(n * len(records) / seconds, 3),
                              "fraction_of_flop_bound": round(work[name] / seconds / (train_rate * 1e9), 3)})
    if cfg.runtime.workers > 1 and cfg.runtime.device in ("cpu", "auto") and not torch.cuda.is_available():
        # 04_train's layout under make reproduce: runtime.workers trainings side by side, threads split
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        workers, threads_each = pipeline.schedule(cfg)
        started = time.perf_counter()
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            seconds_each = list(pool.map(_train_share, [cfg] * workers, [records] * workers,
                                         [str(scratch)] * workers, [threads_each] * workers))
        wall = time.perf_counter() - started
        rate = workers * len(records) / max(seconds_each)  # pairs/s of the machine, trainings side by side
        seconds = n * len(records) / rate + results["shared_reference"]["reference_pass_seconds"]
        results["shared_reference_side_by_side"] = {
            "pairs": len(records), "processes": workers, "threads_each": threads_each,
            "train_seconds_each": [round(s, 2) for s in seconds_each], "wall_seconds_with_start_up": round(wall, 1),
            "methods": n, "seconds_all_methods": round(seconds, 1), "pairs_per_s": round(n * len(records) / seconds, 3),
            "reference_pass_seconds": results["shared_reference"]["reference_pass_seconds"],
            "fraction_of_flop_bound": round(work["shared_reference"] / seconds / (train_rate * 1e9), 3)}
    if with_trl_default:
        base, tokenizer = fresh()
        text_records = [{"prompt": r["formatted_prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
        lora = cfg.train.lora
        cpu = base.device.type == "cpu"
        args = DPOConfig(output_dir=str(scratch / "trl"), num_train_epochs=1, use_cpu=cpu, bf16=not cpu,
                         report_to="none", save_strategy="no", logging_steps=10**6)
        trainer = DPOTrainer(model=base, args=args, train_dataset=Dataset.from_list(text_records),
                             processing_class=tokenizer,
                             peft_config=LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                    target_modules=list(lora.targets), task_type="CAUSAL_LM"))
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        results["trl_default"] = {"pairs": len(records), "seconds": round(seconds, 2),
                                  "pairs_per_s_one_method": round(len(records) / seconds, 3),
                                  "batch_size": args.per_device_train_batch_size, "max_length": args.max_length,
                                  "gradient_checkpointing": args.gradient_checkpointing}
        del trainer, base
    speedup = results["shared_reference"]["pairs_per_s"] / results["per_batch_reference"]["pairs_per_s"]
    out = {"threads": threads, "model": cfg.model.name_or_path, "methods": methods, "batch_size": cfg.train.batch_size,
           "max_length": cfg.train.max_length, "real_tokens": tokens, **results,
           "speedup_shared_over_per_batch": round(speedup, 2)}
    best = speedup
    if "shared_reference_side_by_side" in results:
        best = results["shared_reference_side_by_side"]["pairs_per_s"] / results["per_batch_reference"]["pairs_per_s"]
        out["speedup_side_by_side_over_per_batch"] = round(best, 2)
    out["goals"] = {"04_train's path >= 1.4x today's configured path": best >= 1.4}
    return out


# --- report -------------------------------------------------------------------------------------

def plot(result: dict, path: Path) -> Path:
    """bench.png: each path's throughput as a fraction of its FLOP bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from udasa_lib.io import atomic_save_figure

    bars = []
    generation = result.get("generation")
    if generation:
        for name in ("one_sequence_per_call", "k_sequences_per_call", "hf", "loop", "workers"):
            if name in generation:
                bars.append((f"generate: {name}", generation[name]["fraction_of_flop_bound"]))
    training = result.get("training")
    if training:
        for name in ("per_batch_reference", "shared_reference", "shared_reference_side_by_side"):
            if name in training:
                bars.append((f"DPO x{training[name]['methods']}: {name}", training[name]["fraction_of_flop_bound"]))
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(bars) + 1.2))
    ax.barh([b[0] for b in bars][::-1], [b[1] for b in bars][::-1], color="tab:blue")
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of the FLOP bound (this CPU's fp32 matmul rate on the model's shapes)")
    machine = result["machine"]
    ax.set_title(f"{machine['threads']} threads: decode {machine['decode_gflops']} GFLOP/s, "
                 f"training {machine['training_gflops']} GFLOP/s", fontsize=9)
    fig.tight_layout()
    out = atomic_save_figure(fig, path)
    plt.close(fig)
    return out


def bench_judge(cfg: config_mod.Config, n: int) -> dict:
    """The judge paths of the module docstring on n texts; {"judge", "paths": {name: {...}}, ratios}."""
    import time

    import numpy as np
    import torch

    from udasa_lib.generation import encode_prompt, forward_left_padded, pad_id_of
    from udasa_lib.eval_winrate import LocalJudge
    from udasa_lib.judges import load_role_judge, role_text
    from udasa_lib.score import yes_no_token_ids
    from udasa_lib.validity import known_direction_pairs, refusal_set

    params = cfg.eval_harmless
    name = params.judge or cfg.model.name_or_path
    examples = refusal_set(n, cfg.validity.seed)
    requests = [e["prompt"] for e in examples]
    dtype = params.judge_dtype if params.judge_dtype != "auto" else "float32"
    other = "bfloat16" if dtype == "float32" else "float32"
    paths: dict = {}

    def timed(label, fn):
        fn_started = time.perf_counter()
        values = np.asarray(fn())
        seconds = time.perf_counter() - fn_started
        paths[label] = {"seconds": round(seconds, 2), "judgments_per_s": round(len(values) / seconds, 3),
                        "values": values}

    judge = load_role_judge(name, dtype, cfg.runtime.device, params.judge_max_response_tokens, params.judge_batch_size)
    tokenizer = judge.tokenizer
    # the evaluation's answers are at most max_new_tokens long
    responses = [tokenizer.decode(tokenizer(e["response"], add_special_tokens=False)["input_ids"][:params.max_new_tokens])
                 for e in examples]
    judge.p_yes(requests[:2], responses[:2])  # warm-up
    timed(f"shared prefix, {dtype}", lambda: judge.p_yes(requests, responses))
    yes_ids, no_ids = yes_no_token_ids(tokenizer)

    def without_cache():
        rows = [encode_prompt(tokenizer, role_text(tokenizer, q, judge._clip(r)))
                for q, r in zip(requests, responses)]
        order, out = np.argsort([len(r) for r in rows], kind="stable"), np.empty(len(rows))
        for start in range(0, len(rows), params.judge_batch_size):
            chunk = order[start: start + params.judge_batch_size]
            with torch.inference_mode():
                logits = forward_left_padded(judge.model, [rows[i] for i in chunk], pad_id_of(tokenizer),
                                             logits_to_keep=1).logits[:, -1].float()
            probs = torch.softmax(logits, dim=-1)
            yes, no = probs[:, yes_ids].sum(-1), probs[:, no_ids].sum(-1)
            out[chunk] = (yes / (yes + no)).numpy()
        return out

    timed(f"no prefix cache, {dtype}", without_cache)
    pairs = known_direction_pairs(max(2, n // 4), cfg.validity.seed)
    pairwise = LocalJudge(judge.model, tokenizer, max_length=cfg.eval_winrate.max_length)
    timed(f"pairwise (both orders), {dtype}", lambda: pairwise.preferences(
        [p["instruction"] for p in pairs], [p["worse"] for p in pairs], [p["better"] for p in pairs],
        batch_size=cfg.eval_winrate.batch_size))
    del judge, pairwise
    judge = load_role_judge(name, other, cfg.runtime.device, params.judge_max_response_tokens, params.judge_batch_size)
    judge.p_yes(requests[:2], responses[:2])
    timed(f"shared prefix, {other}", lambda: judge.p_yes(requests, responses))
    today = paths[f"shared prefix, {dtype}"]
    reference = today["values"]
    for label, row in paths.items():
        values = row.pop("values")
        if not label.startswith("pairwise"):
            row["max_abs_p_yes_diff_vs_today"] = float(np.abs(values - reference).max())
    return {"judge": name, "texts": len(examples), "pairs": len(pairs), "dtype": dtype, "paths": paths,
            "speedup_cache": round(today["judgments_per_s"] / paths[f"no prefix cache, {dtype}"]["judgments_per_s"], 2),
            "speedup_bfloat16_over_float32": round(
                paths["shared prefix, bfloat16"]["judgments_per_s"] / paths["shared prefix, float32"]["judgments_per_s"], 2)}


def _print(result: dict) -> None:
    machine = result["machine"]
    print(f"machine: fp32 matmul on {machine['model']}'s linear shapes, {machine['threads']} threads: "
          f"{machine['decode_gflops']} GFLOP/s at {machine['decode_rows']} rows (decode), "
          f"{machine['training_gflops']} GFLOP/s at {machine['training_rows']} rows (training); "
          f"{machine['gflop_per_token']} GFLOP per token")
    g = result.get("generation")
    if g:
        print(f"generation: {g['prompts']} prompts x K={g['k']}, {g['max_new_tokens']} new tokens, "
              f"{g['rows_per_call']} rows per call; FLOP bound {g['flop_bound_tokens_per_s']} tokens/s")
        for name in ("hf", "loop", "workers", "one_sequence_per_call", "k_sequences_per_call"):
            if name not in g:
                continue
            row = g[name]
            if "max_abs_logprob_diff_vs_teacher_forcing" in row:
                extra = f"  |logp - teacher forcing| <= {row['max_abs_logprob_diff_vs_teacher_forcing']}"
            elif name == "workers":
                extra = (f"  ({row['processes']} processes x 1 thread, {row['wall_seconds_with_start_up']} s with "
                         f"start-up; identical rows {row['identical_rows_vs_hf']})")
            else:
                extra = f"  ({row['prompts']} prompts)"
            print(f"  {name:22s} {row['tokens']:6d} tokens {row['seconds']:7.1f} s {row['tokens_per_s']:7.1f} tokens/s "
                  f"{100 * row['fraction_of_flop_bound']:5.1f} % of bound{extra}")
        print(f"  loop / hf: {g['speedup_loop_over_hf']}x; identical rows {g['identical_rows']}/{g['rows']}; "
              f"loop / one sequence per call: {g['speedup_loop_over_one_sequence_per_call']}x")
        if "workers" in g:
            print(f"  01_sample's path (workers) / hf: {g['speedup_workers_over_hf']}x (goal >= 2x)")
    s = result.get("scoring")
    if s:
        print(f"scoring {s['responses']} responses: {s['scoring_seconds']} s; sampling them takes {s['sampling_seconds']} s "
              f"-> {100 * s['scoring_share_of_sampling']:.1f} % (goal < 10 %); breakdown {s['scoring_breakdown']}; "
              f"01_sample recorded {s['sampling_seconds_recorded_by_01_sample']} s")
    t = result.get("training")
    if t:
        print(f"DPO training, {t['per_batch_reference']['pairs']} pairs ({t['real_tokens']} tokens), methods "
              f"{', '.join(t['methods'])}, batch {t['batch_size']}, max_length {t['max_length']}:")
        for name in ("per_batch_reference", "shared_reference", "shared_reference_side_by_side"):
            if name not in t:
                continue
            row = t[name]
            ref = f", reference pass {row['reference_pass_seconds']} s" if row["reference_pass_seconds"] else ""
            one = (f"one method {row['train_seconds']:6.1f} s" if "train_seconds" in row else
                   f"{row['processes']} at once x {row['threads_each']} thread: {row['train_seconds_each']} s")
            print(f"  {name:29s} {one}{ref}; {row['methods']} methods "
                  f"{row['seconds_all_methods']:6.1f} s = {row['pairs_per_s']:.3f} pairs/s, "
                  f"{100 * row['fraction_of_flop_bound']:.1f} % of bound")
        if "trl_default" in t:
            print(f"  trl_default          one method {t['trl_default']['seconds']:6.1f} s "
                  f"({t['trl_default']['pairs_per_s_one_method']} pairs/s; batch {t['trl_default']['batch_size']}, "
                  f"max_length {t['trl_default']['max_length']})")
        print(f"  shared / per batch: {t['speedup_shared_over_per_batch']}x" + (
            f"; side by side / per batch: {t['speedup_side_by_side_over_per_batch']}x" if
            "speedup_side_by_side_over_per_batch" in t else "") + " (goal >= 1.4x)")
    j = result.get("judge")
    if j:
        print(f"judge {j['judge']}, P(Yes) on {j['texts']} answers, pairwise on {j['pairs']} pairs:")
        for label, row in j["paths"].items():
            diff = row.get("max_abs_p_yes_diff_vs_today")
            print(f"  {label:32s} {row['seconds']:7.1f} s {row['judgments_per_s']:7.3f} judgments/s"
                  + (f"  max |dP(Yes)| vs today {diff:.4f}" if diff is not None else ""))
        print(f"  prefix cache: {j['speedup_cache']}x; bfloat16 / float32: {j['speedup_bfloat16_over_float32']}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m udasa_lib.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--prompts", type=int, default=16, help="prompts in the generation benchmark")
    parser.add_argument("--baseline-prompts", type=int, default=4, help="prompts for the one-call-per-prompt baselines")
    parser.add_argument("--pairs", type=int, default=32, help="pairs in the training benchmark")
    parser.add_argument("--out", default=str(REPO_ROOT / "results" / "bench"))
    parser.add_argument("--only", choices=["generation", "scoring", "training", "judge"], default=None)
    parser.add_argument("--judge-texts", type=int, default=24, help="answers in the judge benchmark")
    parser.add_argument("--no-trl-default", action="store_true", help="skip trl's default DPOTrainer baseline")
    parser.add_argument("--profile", action="store_true", help="also profile one sampling batch per engine")
    args = parser.parse_args(argv)
    cfg = config_mod.resolve(REPO_ROOT / args.config if not args.config.startswith("/") else args.config)

    from udasa_lib.models import configure_threads, load_causal_lm

    threads = configure_threads(cfg.runtime.threads)
    model, tokenizer = load_causal_lm(cfg.model.name_or_path, cfg.model.dtype, cfg.runtime.device)
    decode_rows = cfg.sample.batch_prompts * cfg.sample.k
    training_rows = 2 * cfg.train.batch_size * cfg.train.max_length // 2  # a DPO batch, about half-full rows
    result: dict = {"config": args.config, "machine": {
        "model": cfg.model.name_or_path, "threads": threads, "gflop_per_token": round(flops_per_token(model) / 1e9, 3),
        "decode_rows": decode_rows, "decode_gflops": round(matmul_rate(model, decode_rows), 1),
        "training_rows": training_rows, "training_gflops": round(matmul_rate(model, training_rows, repeats=3), 1)}}
    default_rate = None
    if args.only in (None, "generation"):
        result["generation"] = bench_generation(cfg, model, tokenizer, args.prompts, args.baseline_prompts,
                                                result["machine"]["decode_gflops"])
        # the default config's sampler: 01_sample's worker processes when it uses them
        generation_result = result["generation"]
        default_rate = generation_result["workers" if "workers" in generation_result else
                                         cfg.runtime.generation_engine]["tokens_per_s"]
        if args.profile:
            result["generation_profile"] = profile_generation(cfg, model, tokenizer)
    del model
    if args.only in (None, "scoring"):
        result["scoring"] = bench_scoring(cfg, args.config, default_rate)
    if args.only in (None, "training"):
        result["training"] = bench_training(cfg, args.pairs, result["machine"]["training_gflops"],
                                            with_trl_default=not args.no_trl_default)
    if args.only in (None, "judge"):
        result["judge"] = bench_judge(cfg, args.judge_texts)
    out = Path(args.out)
    atomic_write_json(out / BENCH_FILE, result)
    _print(result)
    if "generation_profile" in result:
        for engine, table in result["generation_profile"].items():
            print(f"profile, engine {engine} (one batch, {table['total_s']} s self CPU):")
            for row in table["top"]:
                print(f"  {row['op'][:52]:52s} {row['self_s']:7.3f} s {100 * row['share']:5.1f} %  {row['calls']} calls")
    if "generation" in result or "training" in result:
        print(f"written to {out / BENCH_FILE} and {plot(result, out / BENCH_FIGURE)}")
    else:
        print(f"written to {out / BENCH_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
