"""The shared pi_0 log-probs of a pair set (udasa_lib/reference_logps.py): equal to trl's own
per-batch computation, read back instead of recomputed, and recomputed when the pairs or the
model change."""
from __future__ import annotations

import json

import pytest

from udasa_lib import reference_logps, train
from udasa_lib.reference_logps import SharedReference, reference_key

TEXT_PAIRS = [(f"question {i}:", f" answer {i} is good" + " and long" * (i % 3), f" no {i}") for i in range(6)]


def _records(tokenizer):
    return [{"prompt_ids": tokenizer(p)["input_ids"], "chosen_ids": tokenizer(c, add_special_tokens=False)["input_ids"],
             "rejected_ids": tokenizer(r, add_special_tokens=False)["input_ids"]} for p, c, r in TEXT_PAIRS]


def _peft_and_key(tiny_model_path):
    import torch

    from udasa_lib import config as config_mod
    from udasa_lib.models import load_causal_lm
    from tests.conftest import SMOKE_CONFIG

    torch.manual_seed(0)
    cfg = config_mod.resolve(SMOKE_CONFIG)
    base, tokenizer = load_causal_lm(str(tiny_model_path), "float32", "cpu")
    tokenizer.padding_side = "right"
    key = reference_key(base, max_length=cfg.train.max_length, truncation_mode="keep_start", bf16=False)
    model = train._new_adapter(base, cfg)
    with torch.no_grad():  # an adapter away from zero, so policy and reference differ
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.05 * torch.randn_like(param))
    return model, tokenizer, cfg, key


def test_shared_reference_equals_trls_own_per_batch_computation(tiny_model_path, tmp_path):
    import torch
    from datasets import Dataset
    from torch.utils.data import DataLoader

    from udasa_lib.methods import METHODS
    from udasa_lib.trainers import UALDPOTrainer

    model, tokenizer, cfg, key = _peft_and_key(tiny_model_path)
    records = _records(tokenizer)
    shared = SharedReference(records, key, tmp_path / "cache")
    stage = records[1:5]  # a stage is a subset of the set the table covers
    plain_args = train._trainer_args(cfg, "unstaged", tmp_path / "a", "dpo", "cpu", False, 1)
    trl_trainer = train.build_trainer(model, tokenizer, stage, plain_args, METHODS["dpo"])
    shared_args = train._trainer_args(cfg, "unstaged", tmp_path / "b", "dpo", "cpu", False, 1, precompute_reference=True)
    shared_trainer = train.build_trainer(model, tokenizer, stage, shared_args, METHODS["dpo"], shared_reference=shared)
    assert isinstance(shared_trainer, UALDPOTrainer) and shared.computed and shared.path.exists()

    batch_size = cfg.train.batch_size
    trl_batches = DataLoader(Dataset.from_list(stage), batch_size=batch_size, collate_fn=trl_trainer.data_collator)
    shared_batches = DataLoader(shared_trainer.train_dataset, batch_size=batch_size,
                                collate_fn=shared_trainer.data_collator)
    for trl_batch, shared_batch in zip(trl_batches, shared_batches):
        captured = []
        handle = model.register_forward_hook(lambda _m, _a, out: captured.append(out.log_probs))
        with torch.no_grad():
            trl_loss = trl_trainer.compute_loss(model, dict(trl_batch))
        handle.remove()
        # trl's inline reference: the second forward of _compute_loss, adapters disabled
        mask = trl_batch["completion_mask"][:, 1:]
        per_batch = (captured[1][:, -mask.size(1):] * mask).sum(1)
        precomputed = torch.cat([shared_batch["ref_chosen_logps"], shared_batch["ref_rejected_logps"]])
        torch.testing.assert_close(precomputed, per_batch, rtol=0, atol=1e-4)
        with torch.no_grad():
            shared_loss = shared_trainer.compute_loss(model, dict(shared_batch))
        assert shared_loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)


def test_the_table_is_read_back_and_recomputed_when_pairs_or_model_change(tiny_model_path, tmp_path):
    import torch

    model, tokenizer, cfg, key = _peft_and_key(tiny_model_path)
    records = _records(tokenizer)
    calls = []

    def compute(rows):
        calls.append(len(rows))
        return [float(-i) for i in range(len(rows))], [float(-2 * i) for i in range(len(rows))]

    first = SharedReference(records, key, tmp_path)
    first.ensure(compute)
    again = SharedReference(records, key, tmp_path)
    again.ensure(compute)
    assert calls == [len(records)] and not again.computed
    assert again.columns(records[2:4]) == {"ref_chosen_logps": [-2.0, -3.0], "ref_rejected_logps": [-4.0, -6.0]}

    changed = [dict(r) for r in records]
    changed[0] = {**changed[0], "chosen_ids": changed[0]["chosen_ids"][:-1]}
    SharedReference(changed, key, tmp_path).ensure(compute)
    assert calls == [len(records)] * 2, "a changed pair must give a new table"
    with pytest.raises(KeyError, match="not in the shared reference set"):
        again.columns(changed[:1])

    from udasa_lib.models import load_causal_lm

    base, _ = load_causal_lm(str(tiny_model_path), "float32", "cpu")
    assert reference_key(base, max_length=cfg.train.max_length, truncation_mode="keep_start", bf16=False) == key
    with torch.no_grad():
        next(base.parameters()).view(-1)[0] += 1.0
    moved = reference_key(base, max_length=cfg.train.max_length, truncation_mode="keep_start", bf16=False)
    assert moved != key
    SharedReference(records, moved, tmp_path).ensure(compute)
    assert len(calls) == 3, "another reference model must give a new table"

    first.path.write_text("{")  # an unreadable table is recomputed, never trusted
    SharedReference(records, key, tmp_path).ensure(compute)
    assert len(calls) == 4 and json.loads(first.path.read_text())["pairs"] == len(records)


def test_the_cache_lives_under_the_results_root(results_root):
    assert reference_logps.cache_dir() == results_root.resolve() / ".cache" / "reference_logps"
