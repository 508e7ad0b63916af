"""Stage 04_train: one LoRA policy per (task, method), all read from the same 03_stage pairs.

Methods (docs/method.md, "Methods in every run"):

    sft             SFT on the chosen responses, all pairs at once
    dpo             DPO on all pairs, shuffled, no stages
    udasa           DPO stage by stage in `stage.order` (conservative -> moderate -> exploratory)
    udasa_reverse   the same stages in reverse order
    ual_sft         SFT with per-sample label smoothing from the chosen response's uncertainty
    ual_dpo         DPO with per-sample conservative-DPO smoothing from the pair's uncertainty
    udasa_<dim>     UDASA on the pair set built from one uncertainty dimension only

Training is trl's DPOTrainer / SFTTrainer with a peft LoRA adapter. The adapter is carried from
one stage to the next; the DPO reference is pi_0 (adapter disabled, `reference: initial`) or a
frozen copy of the adapter as it was when the stage started (`reference: previous`, which is
what trl does by itself when handed a model that already has an adapter).

The only code that replaces trl's is the per-sample loss for UAL: trl's sigmoid loss has no
label smoothing, and no per-sample weight, so the subclasses below recompute the loss from the
log-probs trl has just computed (caught with a forward hook, no extra forward pass).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from udasa_lib.io import atomic_write_json, atomic_write_jsonl, atomic_write_text, read_jsonl, sha256_file

PAIRS_FILES = {"combined": "pairs.jsonl", "semantic": "pairs_semantic.jsonl", "factual": "pairs_factual.jsonl",
               "value": "pairs_value.jsonl"}
UNSTAGED = "unstaged"
PHASE_DONE = "phase.json"
CURVES_FILE = "curves.csv"
CURVES_FIGURE = "curves.png"
TRAIN_LOG = "train_log.json"
EPSILON_KEY = "ual_epsilon"
# trl's tokenised record columns per objective: what training_records builds from the sampled ids
TOKEN_COLUMNS = {"dpo": {"prompt_ids", "chosen_ids", "rejected_ids"}, "sft": {"input_ids", "completion_mask"}}
WEIGHT_KEY = "sample_weight"


class TrainingError(RuntimeError):
    """Training cannot start or diverged; the message names the stage and the cause."""


@dataclass(frozen=True)
class MethodSpec:
    objective: str  # "sft" | "dpo"
    pair_set: str  # key of PAIRS_FILES
    staged: bool
    reverse: bool = False
    smoothing: bool = False  # UAL per-sample label smoothing

    def phases(self, order: Sequence[str]) -> list[str]:
        if not self.staged:
            return [UNSTAGED]
        return list(reversed(order)) if self.reverse else list(order)


METHODS: dict[str, MethodSpec] = {
    "sft": MethodSpec("sft", "combined", staged=False),
    "dpo": MethodSpec("dpo", "combined", staged=False),
    "udasa": MethodSpec("dpo", "combined", staged=True),
    "udasa_reverse": MethodSpec("dpo", "combined", staged=True, reverse=True),
    "ual_sft": MethodSpec("sft", "combined", staged=False, smoothing=True),
    "ual_dpo": MethodSpec("dpo", "combined", staged=False, smoothing=True),
    "udasa_semantic": MethodSpec("dpo", "semantic", staged=True),
    "udasa_factual": MethodSpec("dpo", "factual", staged=True),
    "udasa_value": MethodSpec("dpo", "value", staged=True),
}


# --- UAL: per-sample smoothing values and the two losses ------------------------------------

def ual_epsilons(uncertainty: Sequence[float], mean_epsilon: float, slope: float, low: float, high: float,
                 direction: str = "uncertain_smoother") -> list[float]:
    """epsilon_i = clip(a + slope * u_i, low, high), with a solved (bisection) so the mean is
    `mean_epsilon`. `certain_smoother` flips u to 1 - u."""
    if not uncertainty:
        return []
    if slope < 0:
        raise ValueError(f"train.ual.slope must be >= 0 (the direction knob flips it), got {slope}")
    if not low <= mean_epsilon <= high:
        raise ValueError(f"train.ual.mean_epsilon {mean_epsilon} is outside [{low}, {high}]")
    u = [1.0 - x if direction == "certain_smoother" else x for x in uncertainty]

    def values(a: float) -> list[float]:
        return [min(high, max(low, a + slope * x)) for x in u]

    lo_a, hi_a = low - slope * max(u), high - slope * min(u)
    for _ in range(200):  # the clipped mean is monotone in a
        mid = (lo_a + hi_a) / 2
        if sum(values(mid)) / len(u) < mean_epsilon:
            lo_a = mid
        else:
            hi_a = mid
    return values((lo_a + hi_a) / 2)


def ual_dpo_loss(logratio_margin, beta: float, epsilon, weight=None):
    """Per-sample conservative DPO (docs/method.md): -(1-e) log s(b h) - e log s(-b h), weighted mean.
    `logratio_margin` h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))."""
    import torch.nn.functional as F

    logits = beta * logratio_margin
    per_pair = -(1 - epsilon) * F.logsigmoid(logits) - epsilon * F.logsigmoid(-logits)
    if weight is None:
        return per_pair.mean()
    return (weight * per_pair).sum() / weight.sum()


def ual_sft_loss(logits, labels, epsilon, weight=None, num_tokens=None):
    """Token-level cross-entropy with per-sample label smoothing (torch's definition: mass e spread
    uniformly over the vocabulary), averaged over the batch's completion tokens."""
    import torch
    import torch.nn.functional as F

    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    log_probs = F.log_softmax(shift_logits, dim=-1)
    nll = -log_probs.gather(-1, shift_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    uniform = -log_probs.mean(dim=-1)
    eps = epsilon.to(log_probs.dtype).unsqueeze(1)
    per_token = (1 - eps) * nll + eps * uniform
    if weight is not None:
        per_token = per_token * weight.to(per_token.dtype).unsqueeze(1)
        return (per_token * mask).sum() / (mask * weight.unsqueeze(1)).sum().clamp(min=1e-12)
    # num_tokens: the target tokens of the whole accumulated batch (transformers' num_items_in_batch),
    # so gradient accumulation sums micro-batches into one token mean, as trl's own SFT loss does
    denominator = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, device=mask.device)
    return (per_token * mask).sum() / denominator.clamp(min=1)


# --- trl subclasses: the smallest hooks ------------------------------------------------------

def _finite_or_raise(loss, where: str, step: int):
    import torch

    if not torch.isfinite(loss.detach()).all():
        raise TrainingError(f"{where}: loss is {loss.item()} at step {step}; stopping (no manifest written)")
    return loss


def _make_trainer_classes():
    """Built lazily so importing this module does not import torch/trl."""
    from trl import DPOTrainer, SFTTrainer

    class _SampleFieldsMixin:
        """Keep the per-sample columns through trl's column pruning and collator."""

        sample_keys = (EPSILON_KEY, WEIGHT_KEY)
        stage_label = "04_train"

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            self._signature_columns = list(self._signature_columns) + [
                k for k in self.sample_keys if k not in self._signature_columns]

        def _wrap_collator(self):
            inner = self.data_collator

            def collate(examples):
                import torch

                extra = {k: torch.tensor([float(e.pop(k)) for e in examples]) for k in self.sample_keys
                         if k in examples[0]}
                batch = inner(examples)
                batch.update(extra)
                return batch

            self.data_collator = collate

    class UALDPOTrainer(_SampleFieldsMixin, DPOTrainer):
        """DPOTrainer whose sigmoid loss takes a per-sample epsilon and weight from the batch."""

        def __init__(self, *args, reference: str = "initial", **kwargs):
            super().__init__(*args, **kwargs)
            self._wrap_collator()
            if reference == "initial" and "ref" in getattr(self.model, "peft_config", {}):
                # trl made a frozen copy of the current adapter as reference; pi_0 is the base model
                self.model.delete_adapter("ref")
                self.model.set_adapter("default")

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            """Token-exact pairs pass through untouched: trl's text path would re-tokenise prompt +
            completion as one string and append an EOS to every completion, cut ones included."""
            if TOKEN_COLUMNS["dpo"] <= set(dataset.column_names):
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def _compute_loss(self, model, inputs, return_outputs):
            import torch

            epsilon = inputs.pop(EPSILON_KEY, None)
            weight = inputs.pop(WEIGHT_KEY, None)
            if epsilon is None and weight is None:
                result = super()._compute_loss(model, inputs, return_outputs)
                _finite_or_raise(result[0] if return_outputs else result, self.stage_label, self.state.global_step)
                return result
            if self.loss_types != ["sigmoid"] or self.ld_alpha is not None or self.f_divergence_type != "reverse_kl":
                raise TrainingError("per-sample smoothing is defined for the plain sigmoid DPO loss only")
            captured: list = []
            target = self.accelerator.unwrap_model(model)
            handle = target.register_forward_hook(lambda _m, _a, out: captured.append(out.log_probs))
            try:
                trl_loss = super()._compute_loss(model, inputs, return_outputs)
            finally:
                handle.remove()
            mask = inputs["completion_mask"][:, 1:]
            seq_len = mask.size(1)
            policy = (captured[0][:, -seq_len:] * mask).sum(dim=1)
            if self.precompute_ref_logps:
                reference = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
            else:
                reference = (captured[1][:, -seq_len:] * mask).sum(dim=1).detach()
            chosen, rejected = (policy - reference).chunk(2)
            eps = epsilon if epsilon is not None else torch.zeros_like(chosen)
            loss = ual_dpo_loss(chosen - rejected, self.beta, eps.to(chosen.dtype), weight)
            loss = _finite_or_raise(loss, self.stage_label, self.state.global_step)
            return (loss, trl_loss[1]) if return_outputs else loss

    class UALSFTTrainer(_SampleFieldsMixin, SFTTrainer):
        """SFTTrainer whose cross-entropy takes a per-sample label-smoothing value from the batch."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._wrap_collator()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            epsilon = inputs.pop(EPSILON_KEY, None)
            weight = inputs.pop(WEIGHT_KEY, None)
            if epsilon is None and weight is None:
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                _finite_or_raise(result[0] if return_outputs else result, self.stage_label, self.state.global_step)
                return result
            import torch

            labels = inputs["labels"]
            model_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
            outputs = model(**model_inputs, use_cache=False)
            eps = epsilon if epsilon is not None else torch.zeros(labels.size(0), device=labels.device)
            loss = ual_sft_loss(outputs.logits, labels, eps, weight, num_tokens=num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                # num_items_in_batch counts every rank's tokens and DDP averages gradients (as in trl)
                loss = loss * self.accelerator.num_processes
            loss = _finite_or_raise(loss, self.stage_label, self.state.global_step)
            return (loss, outputs) if return_outputs else loss

    return UALDPOTrainer, UALSFTTrainer


# --- data ---------------------------------------------------------------------------------------

def load_pairs(stage_03: Path, pair_set: str, task: str) -> list[dict]:
    from udasa_lib.stage import PAIR_SCHEMA

    path = stage_03 / PAIRS_FILES[pair_set]
    schema = {key: (int, float) if kind is float else kind for key, kind in PAIR_SCHEMA.items()}
    return [r for r in read_jsonl(path, schema) if r["task"] == task]


def phase_rows(rows: list[dict], phase: str) -> list[dict]:
    return rows if phase == UNSTAGED else [r for r in rows if r["stage"] == phase]


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
    return records


def length_report(records: list[dict], max_length: int) -> dict[str, int]:
    """How many records trl's keep_start truncation to max_length touches: `prompt_fills` have no
    completion token left (dropped before training), `completion_cut` lose a completion's tail."""
    def lengths(record):
        if "input_ids" in record:
            prompt = record["completion_mask"].index(1) if 1 in record["completion_mask"] else len(record["input_ids"])
            return prompt, [len(record["input_ids"]) - prompt]
        return len(record["prompt_ids"]), [len(record["chosen_ids"]), len(record["rejected_ids"])]

    fills = cut = 0
    for record in records:
        prompt, completions = lengths(record)
        if prompt >= max_length:
            fills += 1
        elif any(prompt + c > max_length for c in completions):
            cut += 1
    return {"prompt_fills": fills, "completion_cut": cut}


def fit_to_length(records: list[dict], max_length: int, label: str) -> tuple[list[dict], dict[str, int]]:
    """Drop records whose prompt alone fills max_length (no completion token would be trained) and
    warn about them and about completions trl will cut; returns (kept records, counts)."""
    import warnings

    counts = length_report(records, max_length)
    if counts["prompt_fills"] or counts["completion_cut"]:
        warnings.warn(f"{label}: train.max_length={max_length}: {counts['prompt_fills']} pair(s) dropped (prompt fills "
                      f"it), {counts['completion_cut']} with a completion cut to fit", stacklevel=2)
    kept = [r for r in records if length_report([r], max_length)["prompt_fills"] == 0]
    return kept, counts


def smoothing_for(rows: list[dict], spec: MethodSpec, ual) -> dict[str, float] | None:
    """UAL's epsilon per pair: SFT reads the chosen response's u, DPO the pair's (1 - delta u)."""
    if not spec.smoothing:
        return None
    column = "uncertainty_chosen" if spec.objective == "sft" else "pair_uncertainty"
    values = ual_epsilons([float(r[column]) for r in rows], ual.mean_epsilon, ual.slope, ual.min_epsilon,
                          ual.max_epsilon, ual.direction)
    return {r["pair_id"]: e for r, e in zip(rows, values)}


# --- on-policy rounds ---------------------------------------------------------------------------

def resample_phase(stage, model, tokenizer, rows: list[dict], spec: MethodSpec, phase: str, index: int) -> tuple[list[dict], dict]:
    """On-policy round: the current policy re-samples this stage's prompts (K responses each, the
    01_sample settings), 02_score's scorers re-score them and 03_stage's rule re-pairs them; every
    new pair stays in this stage. A self_judge value scorer is the configured judge (or pi_0)."""
    from udasa_lib import sample, score
    from udasa_lib.data import HARM_PROBE_FILE
    from udasa_lib.generation import batch_seed
    from udasa_lib import stage as staging
    from udasa_lib.value_probe import HarmProbe

    cfg = stage.config
    task = rows[0]["task"]
    task_cfg = cfg.sample.tasks[task]
    started = time.time()
    model.eval()
    records = []
    try:
        for start in range(0, len(rows), cfg.sample.batch_prompts):
            batch = rows[start: start + cfg.sample.batch_prompts]
            generations = sample.generate_batch(
                model, tokenizer, [r["prompt_token_ids"] for r in batch], k=cfg.sample.k,
                temperature=cfg.sample.temperature, top_p=cfg.sample.top_p, top_k=cfg.sample.top_k,
                max_new_tokens=task_cfg.max_new_tokens, seed=batch_seed(cfg.train.seed + 1000 * index, task, start))
            records += [sample.sample_record(row["prompt_id"], task, row["prompt"], row["formatted_prompt"],
                                             row["prompt_token_ids"], responses, f"{row['prompt_id']}-round{index}")
                        for row, responses in zip(batch, generations)]
    finally:
        model.train()
    scorers = cfg.score.value.scorers
    probe = HarmProbe.load(stage.upstream["00_data"] / HARM_PROBE_FILE) if "harm_probe" in scorers.values() else None
    scored, _ = score.score_samples(records, cfg.score, cfg.model, cfg.runtime,
                                    score.load_principles(cfg.score.value.principles), probe, progress=False)
    weights = cfg.stage.weights if spec.pair_set == "combined" else staging.ablation_weights(spec.pair_set)
    pairs, dropped = staging.build_pairs(records, scored, weights, cfg.stage.rejected_strategy, cfg.stage.tie_epsilon,
                                         (), cfg.train.seed, cfg.stage.truncated)
    for pair in pairs:
        pair["stage"] = phase
    return pairs, {"prompts": len(records), "pairs": len(pairs), "dropped": dropped,
                   "seconds": round(time.time() - started, 2)}


# --- the stage ----------------------------------------------------------------------------------

def _trainer_args(cfg, phase: str, output_dir: Path, objective: str, device: str, bf16: bool):
    from trl import DPOConfig, SFTConfig

    tc = cfg.train
    common = dict(
        output_dir=str(output_dir),
        num_train_epochs=tc.epochs[phase],
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
    return DPOConfig(**common, beta=tc.beta[phase], loss_type=["sigmoid"])


def build_trainer(model, tokenizer, records: list[dict], args, spec: MethodSpec, reference: str = "initial"):
    """The trl trainer of one stage on `training_records` output (token ids as sampled)."""
    from datasets import Dataset

    UALDPOTrainer, UALSFTTrainer = _make_trainer_classes()
    dataset = Dataset.from_list(records)
    if spec.objective == "sft":
        return UALSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    return UALDPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, reference=reference)


def _new_adapter(model, cfg):
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    lora = cfg.train.lora
    set_seed(cfg.train.seed)  # LoRA A matrices are drawn at random
    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=list(lora.targets), task_type="CAUSAL_LM"))


def _log_rows(history: list[dict], phase: str) -> list[dict]:
    keep = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "mean_token_accuracy", "learning_rate", "grad_norm", "epoch")
    rows = []
    for entry in history:
        if "loss" in entry and "step" in entry:
            rows.append({"phase": phase, "step": entry["step"], **{k: entry.get(k) for k in keep}})
    return rows


def _write_curves(path: Path, rows: list[dict]) -> None:
    import pandas as pd

    atomic_write_text(path, pd.DataFrame(rows).to_csv(index=False))


def train_variant(stage, is_main_process: bool = True, world_size: int = 1) -> dict:
    """Train one (task, method) policy; every phase leaves adapters/<phase>/ and phase.json, so an
    interrupted stage resumes at the first unfinished phase."""
    import torch
    from peft import PeftModel
    from transformers import set_seed

    from udasa_lib.models import configure_threads, load_causal_lm, resolve_device, resolve_dtype

    cfg = stage.config
    task, method = stage.variant.split("/")
    spec = METHODS[method]
    if task not in cfg.sample.tasks:
        raise TrainingError(f"04_train {stage.variant}: task {task!r} is not sampled in this config")
    threads = configure_threads(cfg.runtime.threads)
    rows = load_pairs(stage.upstream["03_stage"], spec.pair_set, task)
    phases = spec.phases(cfg.stage.order)
    epsilons = smoothing_for(rows, spec, cfg.train.ual)

    device = resolve_device(cfg.runtime.device)
    bf16 = resolve_dtype(cfg.model.dtype, device) == torch.bfloat16
    base, tokenizer = load_causal_lm(cfg.model.name_or_path, cfg.model.dtype, str(device))
    tokenizer.padding_side = "right"
    model = None
    resume_from = None
    adapters = stage.dir / "adapters"
    log: dict[str, Any] = {"task": task, "method": method, "objective": spec.objective, "pair_set": spec.pair_set,
                           "reference": cfg.train.reference if spec.objective == "dpo" else None,
                           "phases": [], "threads": threads, "device": str(device), "world_size": world_size}
    curves: list[dict] = []
    for index, phase in enumerate(phases):
        phase_dir = adapters / f"{index + 1}_{phase}"
        done_marker = phase_dir / PHASE_DONE
        records = training_records(phase_rows(rows, phase), spec, epsilons)
        if not records:
            raise TrainingError(f"04_train {stage.variant}: stage {phase!r} has zero pairs "
                                f"(03_stage {PAIRS_FILES[spec.pair_set]}, task {task})")
        if done_marker.exists():  # resume: this phase finished in an earlier, interrupted run
            resume_from = phase_dir
            finished = json.loads(done_marker.read_text())
            log["phases"].append({**finished["log"], "resumed": True})
            curves.extend(finished["curves"])
            continue
        if model is None:
            model = (PeftModel.from_pretrained(base, resume_from, is_trainable=True) if resume_from
                     else _new_adapter(base, cfg))
        on_policy = None
        if cfg.train.on_policy and spec.staged and index > 0:
            fresh, on_policy = resample_phase(stage, model, tokenizer, phase_rows(rows, phase), spec, phase, index)
            atomic_write_jsonl(phase_dir.with_name(f"{phase_dir.name}_on_policy_pairs.jsonl"), fresh)
            records = training_records(fresh, spec, smoothing_for(fresh, spec, cfg.train.ual))
            if not records:
                raise TrainingError(f"04_train {stage.variant}: the on-policy round of stage {phase!r} left zero "
                                    f"pairs (dropped: {on_policy['dropped']})")
        records, lengths = fit_to_length(records, cfg.train.max_length, f"04_train {stage.variant} stage {phase}")
        if not records:
            raise TrainingError(f"04_train {stage.variant}: every pair of stage {phase!r} has a prompt of "
                                f"train.max_length={cfg.train.max_length} tokens or more")
        set_seed(cfg.train.seed + index)
        args = _trainer_args(cfg, phase, stage.dir / "checkpoints", spec.objective, device.type, bf16)
        started = time.time()
        trainer = build_trainer(model, tokenizer, records, args, spec, cfg.train.reference)
        trainer.stage_label = f"04_train {stage.variant} stage {phase}"
        reference = ("previous" if "ref" in model.peft_config else "initial") if spec.objective == "dpo" else None
        trainer.train()
        if "ref" in model.peft_config:
            model.delete_adapter("ref")
            model.set_adapter("default")
        phase_curves = _log_rows(trainer.state.log_history, phase)
        phase_log = {"phase": phase, "index": index + 1, "pairs": len(records), "max_length": lengths,
                     "steps": trainer.state.global_step,
                     "epochs": cfg.train.epochs[phase], "beta": cfg.train.beta[phase] if spec.objective == "dpo" else None,
                     "reference_used": reference, "on_policy": on_policy, "seconds": round(time.time() - started, 2),
                     "pairs_per_s": round(len(records) * cfg.train.epochs[phase] / (time.time() - started), 3)}
        if is_main_process:
            model.save_pretrained(phase_dir, selected_adapters=["default"])
            atomic_write_json(done_marker, {"log": phase_log, "curves": phase_curves})
        trainer.accelerator.wait_for_everyone()
        log["phases"].append(phase_log)
        curves.extend(phase_curves)
        del trainer
    if is_main_process:
        final = adapters / "final"
        staging = adapters / ".final.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(adapters / f"{len(phases)}_{phases[-1]}", staging, ignore=shutil.ignore_patterns(PHASE_DONE))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        _write_curves(stage.dir / CURVES_FILE, curves)
        log["adapter_sha256"] = adapter_hash(final)
        atomic_write_json(stage.dir / TRAIN_LOG, log)
        shutil.rmtree(stage.dir / "checkpoints", ignore_errors=True)
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
        sns.lineplot(data=curves, x="global step", y=metric, hue="phase", ax=ax, legend=ax is axes[0][0])
    fig.suptitle(title)
    fig.tight_layout()
    path = atomic_save_figure(fig, Path(stage_dir) / CURVES_FIGURE)
    plt.close(fig)
    return path


def run_training(stage) -> dict:
    """Stage 04_train for one variant: train (in this process, or under `accelerate launch` when
    runtime.num_processes > 1), record the log in the manifest, draw curves.png."""
    log = _train(stage)
    stage.add_to_manifest(train=log)
    plot_curves(stage.dir, stage.variant)
    return log


def _train(stage) -> dict:
    runtime = stage.config.runtime
    if runtime.num_processes > 1:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(runtime.num_processes)]
        if runtime.accelerate_config:
            from udasa_lib.models import resolve_name_or_path

            command += ["--config_file", resolve_name_or_path(runtime.accelerate_config)]
        if runtime.device == "cpu":
            command += ["--multi_gpu"]  # accelerate's CPU path needs MPI; this is torchrun, gloo on CPU
        command += ["-m", "udasa_lib.train", "--config", str(stage.config_path), "--overrides",
                    json.dumps(stage.overrides), "--name", stage.run_name, "--variant", stage.variant]
        subprocess.run(command, check=True)
        return json.loads((stage.dir / TRAIN_LOG).read_text())
    return train_variant(stage)


def load_policy(stage_dir: Path, name_or_path: str, dtype: str = "auto", device: str = "auto"):
    """The trained policy of a 04_train folder: base model + its final adapter, merged for speed."""
    from peft import PeftModel

    from udasa_lib.models import load_causal_lm

    base, tokenizer = load_causal_lm(name_or_path, dtype, device)
    model = PeftModel.from_pretrained(base, Path(stage_dir) / "adapters" / "final").merge_and_unload()
    model.eval()
    return model, tokenizer


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
    stage = open_stage("04_train", args.config, args.overrides, args.name or None, args.variant)
    train_variant(stage, rank == 0, world_size)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
