"""Stage 04_train: one LoRA policy per (task, method), all read from the same 03_pairs pairs.

Methods (docs/method.md, "Methods in every run"):

    sft             SFT on the chosen responses, all pairs at once
    dpo             DPO on all pairs, shuffled, no stages
    udasa           DPO stage by stage in `train.stage_order` (conservative -> moderate -> exploratory)
    udasa_reverse   the same stages in reverse order
    ual_sft         SFT with per-sample label smoothing from the chosen response's uncertainty
    ual_dpo         DPO with per-sample conservative-DPO smoothing from the pair's uncertainty
    udasa_<dim>     UDASA on the pair set built from one uncertainty dimension only

Training is trl's DPOTrainer / SFTTrainer with a peft LoRA adapter. The adapter is carried from
one stage to the next; the DPO reference is pi_0 (adapter disabled, `reference: initial`) or a
frozen copy of the adapter as it was when the stage started (`reference: previous`, which is
what trl does by itself when handed a model that already has an adapter).

trl is handed the token ids that were sampled (`training_records`). Its trainers, with the
two hooks this project needs (token-exact DPO data, UAL's per-sample smoothing), are in
`udasa_lib/trainers.py`; UAL's math is in `udasa_lib/ual.py`; on-policy rounds in
`udasa_lib/on_policy.py`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from udasa_lib.io import atomic_folder, atomic_write_json, atomic_write_jsonl, atomic_write_text, read_jsonl, sha256_file
from udasa_lib.methods import METHODS, UNSTAGED, MethodSpec
from udasa_lib.trainers import EPSILON_KEY, TrainingError
from udasa_lib.ual import ual_epsilons

PAIRS_FILES = {"combined": "pairs.jsonl", "semantic": "pairs_semantic.jsonl", "factual": "pairs_factual.jsonl",
               "value": "pairs_value.jsonl", "oracle": "pairs_oracle.jsonl", "random": "pairs_random.jsonl"}
STAGE_DONE = "stage.json"
CURVES_FILE = "curves.csv"
CURVES_FIGURE = "curves.png"
TRAIN_LOG = "train_log.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_CARD = "README.md"
# peft keeps these LoraConfig fields as sets and writes them in the process's hash-seed order
ADAPTER_SET_FIELDS = ("target_modules", "exclude_modules")
# trl's log entries, in the fixed column order of curves.csv (no timing columns: train_runtime,
# *_per_second are wall-clock facts and stay out of every file but the manifest)
CURVE_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "mean_token_accuracy", "learning_rate", "grad_norm", "epoch")
CURVE_COLUMNS = ("stage", "step", *CURVE_METRICS)
# a stage's wall-clock facts: kept out of stage.json and train_log.json (files in the stage folder
# must be byte-identical between identical runs), recorded in the manifest only
TIMING_KEYS = ("seconds", "pairs_per_s")


# --- data ---------------------------------------------------------------------------------------

def load_pairs(stage_03: Path, pair_set: str, task: str) -> list[dict]:
    from udasa_lib.pairs import PAIR_SCHEMA

    path = stage_03 / PAIRS_FILES[pair_set]
    schema = {key: (int, float) if kind is float else kind for key, kind in PAIR_SCHEMA.items()}
    return [r for r in read_jsonl(path, schema) if r["task"] == task]


def stage_rows(rows: list[dict], stage_name: str) -> list[dict]:
    return rows if stage_name == UNSTAGED else [r for r in rows if r["stage"] == stage_name]


def training_records(rows: list[dict], spec: MethodSpec, epsilons: dict[str, float] | None) -> list[dict]:
    """Pairs as trl's tokenised records, built from the ids that were sampled (never from text):
    DPO {prompt_ids, chosen_ids, rejected_ids}, the form trl's DPO collator reads; SFT {input_ids,
    completion_mask} = prompt + chosen ids with the chosen part marked, trl's pre-tokenised form.
    A completion keeps its EOS only if it was generated (cut responses end without one)."""
    records = []
    for row in rows:
        prompt = list(row["prompt_token_ids"])
        if spec.objective == "sft":
            chosen = list(row["chosen_token_ids"])
            record = {"input_ids": prompt + chosen, "completion_mask": [0] * len(prompt) + [1] * len(chosen)}
        else:
            record = {"prompt_ids": prompt, "chosen_ids": list(row["chosen_token_ids"]),
                      "rejected_ids": list(row["rejected_token_ids"])}
        if epsilons is not None:
            record[EPSILON_KEY] = epsilons[row["pair_id"]]
        records.append(record)
    return TrainingRecords(records, [row.get("pair_id", f"#{i}") for i, row in enumerate(rows)])


class TrainingRecords(list):
    """training_records' list, with each record's pair id beside it in `pair_ids` (same order), so
    that fit_to_length can name the pairs it drops: an id column in the records themselves would
    reach trl's column pruning and collator."""

    def __init__(self, records: Sequence[dict], pair_ids: Sequence[str]):
        super().__init__(records)
        self.pair_ids = list(pair_ids)


def length_fit(record: dict, max_length: int) -> str:
    """How trl's keep_start truncation to max_length treats one training record: "prompt_fills"
    (no completion token left), "completion_cut" (a completion loses its tail) or "fits"."""
    if "input_ids" in record:
        mask = record["completion_mask"]
        prompt = mask.index(1) if 1 in mask else len(mask)
        completions = [len(mask) - prompt]
    else:
        prompt, completions = len(record["prompt_ids"]), [len(record["chosen_ids"]), len(record["rejected_ids"])]
    if prompt >= max_length:
        return "prompt_fills"
    return "completion_cut" if any(prompt + c > max_length for c in completions) else "fits"


OVER_LONG_EXAMPLES = 5  # pair ids named per stage in the warning and the manifest


def fit_to_length(records: list[dict], max_length: int, label: str,
                  pair_ids: Sequence[str] | None = None) -> tuple[list[dict], dict[str, Any]]:
    """Drop records whose prompt alone fills max_length (trl's keep_start truncation would leave
    no completion token to train on) and warn about them and about completions trl will cut, with
    the count and the first pair ids of each. `pair_ids` defaults to those training_records keeps
    beside its records, else record positions (#i).

    Returns (kept records, counts): {"over_long_prompts": pairs dropped, "completion_cut": pairs
    kept with a cut completion, "over_long_prompt_examples" and "completion_cut_examples": their
    first ids}. 04_train logs it per stage as `max_length`, which the manifest records under
    train.stages[i].max_length."""
    import warnings

    if pair_ids is None:
        pair_ids = getattr(records, "pair_ids", None) or [f"#{i}" for i in range(len(records))]
    fits = [length_fit(r, max_length) for r in records]
    over_long = [pid for pid, fit in zip(pair_ids, fits) if fit == "prompt_fills"]
    cut = [pid for pid, fit in zip(pair_ids, fits) if fit == "completion_cut"]
    counts = {"over_long_prompts": len(over_long), "completion_cut": len(cut),
              "over_long_prompt_examples": over_long[:OVER_LONG_EXAMPLES],
              "completion_cut_examples": cut[:OVER_LONG_EXAMPLES]}
    if over_long:
        warnings.warn(f"{label}: train.max_length={max_length}: {len(over_long)} pair(s) dropped, their prompt "
                      f"alone fills it (e.g. {', '.join(over_long[:OVER_LONG_EXAMPLES])})", stacklevel=2)
    if cut:
        warnings.warn(f"{label}: train.max_length={max_length}: {len(cut)} pair(s) with a completion cut to fit "
                      f"(e.g. {', '.join(cut[:OVER_LONG_EXAMPLES])})", stacklevel=2)
    kept = [(r, pid) for r, pid, fit in zip(records, pair_ids, fits) if fit != "prompt_fills"]
    return TrainingRecords([r for r, _ in kept], [pid for _, pid in kept]), counts


def smoothing_for(rows: list[dict], spec: MethodSpec, ual) -> dict[str, float] | None:
    """UAL's epsilon per pair: SFT reads the chosen response's u, DPO the pair's (1 - delta u); the
    constant-smoothing control gives every pair UAL's mean epsilon (train.ual.mean_epsilon), which
    is also the mean of UAL's per-pair values, so the two differ only in how epsilon is spread."""
    if not spec.smoothing:
        return None
    if spec.smoothing == "constant":
        return {r["pair_id"]: float(ual.mean_epsilon) for r in rows}
    column = "uncertainty_chosen" if spec.objective == "sft" else "pair_uncertainty"
    values = ual_epsilons([float(r[column]) for r in rows], ual.mean_epsilon, ual.slope, ual.min_epsilon,
                          ual.max_epsilon, ual.direction)
    return {r["pair_id"]: e for r, e in zip(rows, values)}


# --- the stage ----------------------------------------------------------------------------------

def stage_steps(stage_sizes: Sequence[int], total: int) -> list[int]:
    """Optimizer steps per stage: `total` (train.steps of the task) split in proportion to the
    stages' pair counts by largest remainder, at least one each, so every stage sees its pairs about
    equally often and every method of a task takes the same number of steps in all.

    stage_sizes: [S] pair counts; returns [S] ints summing to `total`. Raises ValueError when
    total < S (a stage would get no step)."""
    if total < len(stage_sizes):
        raise ValueError(f"train.steps={total} is fewer than the {len(stage_sizes)} stages to train")
    pairs = sum(stage_sizes)
    exact = [total * size / pairs for size in stage_sizes]
    steps = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - steps[i]), i))
    for i in by_remainder[:total - sum(steps)]:
        steps[i] += 1
    for i in range(len(steps)):  # a tiny stage still trains: one step from the largest
        if steps[i] == 0:
            steps[max(range(len(steps)), key=lambda j: (steps[j], -j))] -= 1
            steps[i] = 1
    return steps


def _trainer_args(cfg, stage_name: str, output_dir: Path, objective: str, device: str, bf16: bool,
                  max_steps: int, precompute_reference: bool = False):
    from trl import DPOConfig, SFTConfig

    tc = cfg.train
    common = dict(
        output_dir=str(output_dir),
        max_steps=max_steps,  # the budget is in optimizer steps; the Trainer cycles the pairs as needed
        learning_rate=tc.learning_rate,
        lr_scheduler_type=tc.lr_scheduler,
        warmup_steps=0,
        per_device_train_batch_size=tc.batch_size,
        gradient_accumulation_steps=tc.gradient_accumulation_steps,
        gradient_checkpointing=tc.gradient_checkpointing,
        max_length=tc.max_length,
        seed=cfg.train.seed,
        data_seed=cfg.train.seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=bf16,
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
    )
    if objective == "sft":
        return SFTConfig(**common, completion_only_loss=True)
    # The shared reference table is computed in one batch size whatever the method, so its numbers
    # do not depend on which method computed it first (udasa_lib/reference_logps.py).
    return DPOConfig(**common, beta=tc.beta[stage_name], loss_type=["sigmoid"],
                     precompute_ref_log_probs=precompute_reference, precompute_ref_batch_size=tc.batch_size)


def build_trainer(model, tokenizer, records: list[dict], args, spec: MethodSpec, reference: str = "initial",
                  shared_reference=None):
    """The trl trainer of one stage on `training_records` output (token ids as sampled); DPO reads
    pi_0's log-probs from `shared_reference` (a reference_logps.SharedReference) when given."""
    from datasets import Dataset

    from udasa_lib.trainers import UALDPOTrainer, UALSFTTrainer

    dataset = Dataset.from_list(records)
    if spec.objective == "sft":
        return UALSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    return UALDPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, reference=reference,
                         shared_reference=shared_reference)


def _new_adapter(model, cfg):
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    lora = cfg.train.lora
    set_seed(cfg.train.seed)  # LoRA A matrices are drawn at random
    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=list(lora.targets), task_type="CAUSAL_LM"))


def _log_rows(history: list[dict], stage_name: str) -> list[dict]:
    rows = []
    for entry in history:
        if "loss" in entry and "step" in entry:
            rows.append({"stage": stage_name, "step": entry["step"], **{k: entry.get(k) for k in CURVE_METRICS}})
    return rows


def _write_curves(path: Path, rows: list[dict]) -> None:
    """curves.csv in CURVE_COLUMNS order whatever the rows' key order: a finished stage's rows come
    back from its stage.json with sorted keys, a fresh stage's in logging order, and a resumed run
    must write the same bytes as an uninterrupted one."""
    import pandas as pd

    frame = pd.DataFrame([{column: row.get(column) for column in CURVE_COLUMNS} for row in rows],
                         columns=list(CURVE_COLUMNS))
    atomic_write_text(path, frame.to_csv(index=False))


def without_timing(log: Any) -> Any:
    """`log` without its wall-clock entries (TIMING_KEYS, at any depth): what may enter a file."""
    if isinstance(log, dict):
        return {k: without_timing(v) for k, v in log.items() if k not in TIMING_KEYS}
    if isinstance(log, list):
        return [without_timing(v) for v in log]
    return log


def canonicalize_adapter(folder: Path | str, base_model: str) -> Path:
    """Make a peft adapter folder that `save_pretrained` wrote byte-stable and location-independent:
    adapter_config.json with its set-valued fields (target_modules, ...) sorted, since peft writes
    a set in the process's hash-seed order, and `base_model_name_or_path` set to `base_model` (the
    config's model.name_or_path as written, e.g. a repo-relative folder) instead of the absolute
    path the base was loaded from; README.md (peft's model card, which names that absolute path)
    replaced by a short card naming `base_model`. Loading is unaffected: every loader here hands
    the base model to PeftModel itself. Returns the folder."""
    folder = Path(folder)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    config["base_model_name_or_path"] = base_model
    for key in ADAPTER_SET_FIELDS:
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    atomic_write_json(folder / ADAPTER_CONFIG, config)
    card = ["---", f"base_model: {json.dumps(base_model)}", "library_name: peft", "---", "",
            f"LoRA adapter (peft {config.get('peft_version') or ''}) on `{base_model}`, trained by this "
            "project's stage 04_train; the stage folder's train_log.json and manifest.json say how.", ""]
    atomic_write_text(folder / ADAPTER_CARD, "\n".join(card))
    return folder


def _save_adapter(model, folder: Path, base_model: str) -> Path:
    model.save_pretrained(folder, selected_adapters=["default"])
    return canonicalize_adapter(folder, base_model)


def _recorded_timing(run) -> dict:
    from udasa_lib.pipeline import MANIFEST_EXTRA

    path = run.dir / MANIFEST_EXTRA
    return json.loads(path.read_text()).get("train_timing", {}) if path.exists() else {}


def _record_timing(run, stage_name: str, timing: dict) -> dict:
    """Add one stage's wall-clock facts to the manifest's extra (it outlives an interruption, so a
    resumed run still reports the finished stages' times); returns every stage's so far."""
    recorded = {**_recorded_timing(run), stage_name: timing}
    run.add_to_manifest(train_timing=recorded)
    return recorded


def train_variant(run, is_main_process: bool = True, world_size: int = 1) -> dict:
    """Train one (task, method) policy; every stage leaves adapters/<n>_<stage>/ with stage.json, so an
    interrupted run resumes at the first unfinished stage."""
    import torch
    from peft import PeftModel
    from transformers import set_seed

    from udasa_lib.models import configure_threads, load_causal_lm, load_pretrained, resolve_device, resolve_dtype
    from udasa_lib.on_policy import resample_stage

    cfg = run.config
    task, method = run.variant.split("/")
    spec = METHODS[method]
    if task not in cfg.sample.tasks:
        raise TrainingError(f"04_train {run.variant}: task {task!r} is not sampled in this config")
    threads = configure_threads(cfg.runtime.threads)
    rows = load_pairs(run.upstream["03_pairs"], spec.pair_set, task)
    stage_names = spec.stages(cfg.train.stage_order)
    epsilons = smoothing_for(rows, spec, cfg.train.ual)
    budget = stage_steps([len(stage_rows(rows, name)) for name in stage_names], cfg.train.steps[task])

    device = resolve_device(cfg.runtime.device)
    bf16 = resolve_dtype(cfg.model.dtype, device) == torch.bfloat16
    base, tokenizer = load_causal_lm(cfg.model.name_or_path, cfg.model.dtype, str(device))
    tokenizer.padding_side = "right"
    shared_reference = None
    if spec.objective == "dpo" and cfg.train.reference == "initial":
        from udasa_lib.reference_logps import SharedReference, reference_key

        shared_reference = SharedReference(
            training_records(rows, spec, None),
            reference_key(base, max_length=cfg.train.max_length, truncation_mode="keep_start", bf16=bf16))
    model = None
    resume_from = None
    adapters = run.dir / "adapters"
    log: dict[str, Any] = {"task": task, "method": method, "objective": spec.objective, "pair_set": spec.pair_set,
                           "reference": cfg.train.reference if spec.objective == "dpo" else None,
                           "stages": [], "threads": threads, "device": str(device), "world_size": world_size}
    curves: list[dict] = []
    for index, stage_name in enumerate(stage_names):
        stage_dir = adapters / f"{index + 1}_{stage_name}"
        done_marker = stage_dir / STAGE_DONE
        records = training_records(stage_rows(rows, stage_name), spec, epsilons)
        if not records:
            raise TrainingError(f"04_train {run.variant}: stage {stage_name!r} has zero pairs "
                                f"(03_pairs {PAIRS_FILES[spec.pair_set]}, task {task})")
        if done_marker.exists():  # resume: this stage finished in an earlier, interrupted run
            resume_from = stage_dir
            finished = json.loads(done_marker.read_text())
            timing = _recorded_timing(run).get(stage_name, {})
            log["stages"].append({**finished["log"], **timing, "resumed": True})
            curves.extend(finished["curves"])
            continue
        if model is None:
            # a resumed stage's adapter is loaded like any model: a truncated file is named
            model = (load_pretrained(lambda source: PeftModel.from_pretrained(base, source, is_trainable=True),
                                     str(resume_from), "adapter") if resume_from else _new_adapter(base, cfg))
        on_policy, stage_reference = None, shared_reference
        if cfg.train.on_policy_for(method) and spec.staged and index > 0:
            fresh, on_policy = resample_stage(run, model, tokenizer, stage_rows(rows, stage_name), spec, stage_name, index)
            atomic_write_jsonl(stage_dir.with_name(f"{stage_dir.name}_on_policy_pairs.jsonl"), fresh)
            records = training_records(fresh, spec, smoothing_for(fresh, spec, cfg.train.ual))
            stage_reference = None  # fresh pairs: trl computes pi_0 per batch
            if not records:
                raise TrainingError(f"04_train {run.variant}: the on-policy round of stage {stage_name!r} left zero "
                                    f"pairs (dropped: {on_policy['dropped']})")
        records, lengths = fit_to_length(records, cfg.train.max_length, f"04_train {run.variant} stage {stage_name}")
        if not records:
            raise TrainingError(f"04_train {run.variant}: every pair of stage {stage_name!r} has a prompt of "
                                f"train.max_length={cfg.train.max_length} tokens or more")
        set_seed(cfg.train.seed + index)
        args = _trainer_args(cfg, stage_name, run.dir / "checkpoints", spec.objective, device.type, bf16,
                             budget[index], precompute_reference=stage_reference is not None)
        started = time.time()
        trainer = build_trainer(model, tokenizer, records, args, spec, cfg.train.reference, stage_reference)
        trainer.stage_label = f"04_train {run.variant} stage {stage_name}"
        reference = ("previous" if "ref" in model.peft_config else "initial") if spec.objective == "dpo" else None
        trainer.train()
        if "ref" in model.peft_config:
            model.delete_adapter("ref")
            model.set_adapter("default")
        stage_curves = _log_rows(trainer.state.log_history, stage_name)
        pairs_per_step = cfg.train.batch_size * cfg.train.gradient_accumulation_steps * world_size
        stage_log = {"stage": stage_name, "index": index + 1, "pairs": len(records), "max_length": lengths,
                     "steps": trainer.state.global_step, "steps_budget": budget[index],
                     "epochs": round(trainer.state.global_step * pairs_per_step / len(records), 3),
                     "beta": cfg.train.beta[stage_name] if spec.objective == "dpo" else None,
                     "reference_used": reference, "on_policy": on_policy,
                     "shared_reference_table": None if stage_reference is None else stage_reference.path.name}
        seconds = time.time() - started
        timing = {"seconds": round(seconds, 2),
                  "pairs_per_s": round(trainer.state.global_step * pairs_per_step / seconds, 3)}
        if is_main_process:
            _save_adapter(model, stage_dir, cfg.model.name_or_path)
            atomic_write_json(done_marker, {"log": without_timing(stage_log), "curves": stage_curves})
            _record_timing(run, stage_name, timing)
        trainer.accelerator.wait_for_everyone()
        log["stages"].append({**stage_log, **timing})
        curves.extend(stage_curves)
        del trainer
    if is_main_process:
        final = adapters / "final"
        with atomic_folder(final) as staging:
            shutil.copytree(adapters / f"{len(stage_names)}_{stage_names[-1]}", staging, ignore=shutil.ignore_patterns(STAGE_DONE))
            canonicalize_adapter(staging, cfg.model.name_or_path)  # also a stage saved before canonicalisation
        _write_curves(run.dir / CURVES_FILE, curves)
        log["adapter_sha256"] = adapter_hash(final)
        # the file: what was trained, identical between identical runs; the manifest: all of it,
        # with each stage's wall time, whether it was resumed, and the threads (see run_training)
        atomic_write_json(run.dir / TRAIN_LOG, without_timing(
            {**{k: v for k, v in log.items() if k != "threads"},
             "stages": [{k: v for k, v in stage.items() if k != "resumed"} for stage in log["stages"]]}))
        run.add_to_manifest(train=log)
        shutil.rmtree(run.dir / "checkpoints", ignore_errors=True)
    return log


def adapter_hash(adapter_dir: Path) -> str:
    return sha256_file(Path(adapter_dir) / "adapter_model.safetensors")


def plot_curves(stage_dir: Path, title: str) -> Path:
    """curves.png: loss, reward margin and accuracy per optimizer step, coloured by stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    from udasa_lib.io import atomic_save_figure

    curves = pd.read_csv(Path(stage_dir) / CURVES_FILE)
    curves["global step"] = range(1, len(curves) + 1)
    metrics = [m for m in ("loss", "rewards/margins", "rewards/accuracies") if m in curves and curves[m].notna().any()]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        sns.lineplot(data=curves, x="global step", y=metric, hue="stage", ax=ax, legend=ax is axes[0][0])
    fig.suptitle(title)
    fig.tight_layout()
    path = atomic_save_figure(fig, Path(stage_dir) / CURVES_FIGURE)
    plt.close(fig)
    return path


def run_training(run) -> dict:
    """Stage 04_train for one variant: train (in this process, or under `accelerate launch` when
    runtime.num_processes > 1), record the log in the manifest, draw curves.png."""
    log = _train(run)  # train_variant recorded it in the manifest (also under accelerate launch)
    plot_curves(run.dir, run.variant)
    return log


def _train(run) -> dict:
    runtime = run.config.runtime
    if runtime.num_processes > 1:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(runtime.num_processes)]
        if runtime.accelerate_config:
            from udasa_lib.models import resolve_name_or_path

            command += ["--config_file", resolve_name_or_path(runtime.accelerate_config)]
        if runtime.device == "cpu":
            command += ["--multi_gpu"]  # accelerate's CPU path needs MPI; this is torchrun, gloo on CPU
        command += ["-m", "udasa_lib.train", "--config", str(run.config_path), "--overrides",
                    json.dumps(run.overrides), "--name", run.run_name, "--variant", run.variant]
        subprocess.run(command, check=True)
        from udasa_lib.pipeline import MANIFEST_EXTRA

        return json.loads((run.dir / MANIFEST_EXTRA).read_text())["train"]
    return train_variant(run)


def main(argv: list[str] | None = None) -> int:
    """Entry point for `accelerate launch -m udasa_lib.train`."""
    from udasa_lib.pipeline import open_stage

    parser = argparse.ArgumentParser(prog="python -m udasa_lib.train")
    parser.add_argument("--config", required=True)
    parser.add_argument("--overrides", default="{}")
    parser.add_argument("--name", default="")
    parser.add_argument("--variant", required=True)
    args = parser.parse_args(argv)
    import os

    import torch.distributed as dist

    # torchrun's variables: the Trainer's accelerator joins the process group itself (gloo on CPU)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    run = open_stage("04_train", args.config, args.overrides, args.name or None, args.variant)
    train_variant(run, rank == 0, world_size)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
