"""The trl trainers of 04_train with the smallest hooks this project needs.

- Token-exact pairs (docs/method.md, "What is trained on"): `UALDPOTrainer._prepare_dataset` passes
  tokenised pairs through; trl's text path would re-tokenise prompt + completion as one string
  and append an EOS to every completion. SFT needs no hook: trl takes `input_ids` +
  `completion_mask` as they are.
- UAL's per-sample smoothing (`udasa_lib.ual`): trl's sigmoid DPO loss has no label smoothing and
  its SFT loss none per sample, so the loss is recomputed from the log-probs trl has just computed
  (caught with a forward hook: no extra forward pass) when the batch carries an epsilon column.
- pi_0's log-probs shared across methods and stages (`udasa_lib.reference_logps`): with a
  `shared_reference`, trl's `precompute_ref_log_probs` path reads the table instead of running
  its own pass, and the table is computed by trl's `compute_ref_log_probs` when missing.
- A non-finite loss stops training with an error naming the stage and the step.
Importing this module imports trl; `udasa_lib.train` imports it only when it trains.
"""
from __future__ import annotations

import torch
from trl import DPOTrainer, SFTTrainer

from udasa_lib.reference_logps import PAIR_COLUMNS
from udasa_lib.ual import ual_dpo_loss, ual_sft_loss

EPSILON_KEY = "ual_epsilon"
# trl's tokenised record columns per objective: what train.training_records builds from the sampled ids
TOKEN_COLUMNS = {"dpo": {"prompt_ids", "chosen_ids", "rejected_ids"}, "sft": {"input_ids", "completion_mask"}}


class TrainingError(RuntimeError):
    """Training cannot start or diverged; the message names the stage and the cause."""


def finite_or_raise(loss, where: str, step: int):
    if not torch.isfinite(loss.detach()).all():
        raise TrainingError(f"{where}: loss is {loss.item()} at step {step}; stopping (no manifest written)")
    return loss


class _EpsilonColumnMixin:
    """Keep the per-sample epsilon through trl's column pruning and collator."""

    stage_label = "04_train"

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if EPSILON_KEY not in self._signature_columns:
            self._signature_columns = list(self._signature_columns) + [EPSILON_KEY]

    def _wrap_collator(self):
        inner = self.data_collator

        def collate(examples):
            epsilon = [float(e.pop(EPSILON_KEY)) for e in examples] if EPSILON_KEY in examples[0] else None
            batch = inner(examples)
            if epsilon is not None:
                batch[EPSILON_KEY] = torch.tensor(epsilon)
            return batch

        self.data_collator = collate


class UALDPOTrainer(_EpsilonColumnMixin, DPOTrainer):
    """DPOTrainer on token-exact pairs whose sigmoid loss takes a per-pair epsilon from the batch."""

    def __init__(self, *args, reference: str = "initial", shared_reference=None, **kwargs):
        self.shared_reference = shared_reference
        super().__init__(*args, **kwargs)
        self._wrap_collator()
        if reference == "initial" and "ref" in getattr(self.model, "peft_config", {}):
            # trl made a frozen copy of the current adapter as reference; pi_0 is the base model
            self.model.delete_adapter("ref")
            self.model.set_adapter("default")

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if TOKEN_COLUMNS["dpo"] <= set(dataset.column_names):
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if self.shared_reference is None:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        self.shared_reference.ensure(lambda records: self.reference_pass(records, batch_size))
        columns = self.shared_reference.columns(dataset.select_columns(list(PAIR_COLUMNS)).to_list())
        for column, values in columns.items():
            dataset = dataset.add_column(column, values)
        return dataset

    def reference_pass(self, records, batch_size: int) -> tuple[list[float], list[float]]:
        """pi_0's summed completion log-probs of DPO records (shapes [n], [n]), in order, batch by
        batch through trl's collator and `compute_ref_log_probs`, with every adapter disabled."""
        from torch.utils.data import DataLoader

        unwrapped = self.accelerator.unwrap_model(self.model)
        if "ref" in getattr(unwrapped, "peft_config", {}):
            # trl copied a resumed adapter as "ref"; the shared table is pi_0's, i.e. adapters off
            unwrapped.delete_adapter("ref")
            unwrapped.set_adapter("default")
        loader = DataLoader([{c: r[c] for c in PAIR_COLUMNS} for r in records], batch_size=batch_size,
                            collate_fn=self.data_collator, shuffle=False)
        device = next(unwrapped.parameters()).device
        chosen, rejected = [], []
        for batch in loader:
            c, r = self.compute_ref_log_probs(self.model, {k: v.to(device) for k, v in batch.items()})
            chosen += c.float().cpu().tolist()
            rejected += r.float().cpu().tolist()
        return chosen, rejected

    def _compute_loss(self, model, inputs, return_outputs):
        epsilon = inputs.pop(EPSILON_KEY, None)
        if epsilon is None:
            result = super()._compute_loss(model, inputs, return_outputs)
            finite_or_raise(result[0] if return_outputs else result, self.stage_label, self.state.global_step)
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
        loss = ual_dpo_loss(chosen - rejected, self.beta, epsilon.to(chosen.dtype))
        loss = finite_or_raise(loss, self.stage_label, self.state.global_step)
        return (loss, trl_loss[1]) if return_outputs else loss


class UALSFTTrainer(_EpsilonColumnMixin, SFTTrainer):
    """SFTTrainer whose cross-entropy takes a per-sample label-smoothing value from the batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._wrap_collator()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        epsilon = inputs.pop(EPSILON_KEY, None)
        if epsilon is None:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            finite_or_raise(result[0] if return_outputs else result, self.stage_label, self.state.global_step)
            return result
        model_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
        outputs = model(**model_inputs, use_cache=False)
        loss = ual_sft_loss(outputs.logits, inputs["labels"], epsilon, num_tokens=num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every rank's tokens and DDP averages gradients (as in trl)
            loss = loss * self.accelerator.num_processes
        loss = finite_or_raise(loss, self.stage_label, self.state.global_step)
        return (loss, outputs) if return_outputs else loss
