"""04_train: the UAL losses against their formulas and trl, and every method on the tiny model."""
from __future__ import annotations

import json
import math

import pytest

from conftest import SMOKE_CONFIG
from udasa_lib import pipeline, train, ual
from udasa_lib.trainers import UALDPOTrainer, UALSFTTrainer

ALL_METHODS = list(train.METHODS)
# dpo_oracle's pairs need a ground truth, which only the sentiment task has
ALIGNMENT_METHODS = [m for m in ALL_METHODS if not train.METHODS[m].needs_ground_truth]


def _task_of(method: str) -> str:
    return "sentiment" if train.METHODS[method].needs_ground_truth else "alignment"


# --- per-sample smoothing values ---------------------------------------------------------------

def test_epsilons_hit_the_target_mean_and_grow_with_uncertainty():
    u = [0.0, 0.1, 0.5, 0.9, 1.0]
    eps = ual.ual_epsilons(u, mean_epsilon=0.1, slope=0.2, low=0.0, high=0.4)
    assert sum(eps) / len(eps) == pytest.approx(0.1, abs=1e-9)
    assert eps == sorted(eps) and eps[0] < eps[-1]
    flipped = ual.ual_epsilons(u, 0.1, 0.2, 0.0, 0.4, direction="certain_smoother")
    assert flipped == sorted(flipped, reverse=True)


def test_epsilons_are_clipped_and_still_average_to_the_target():
    u = [0.0] * 9 + [1.0]
    eps = ual.ual_epsilons(u, mean_epsilon=0.1, slope=5.0, low=0.0, high=0.3)
    assert max(eps) == pytest.approx(0.3) and min(eps) >= 0.0
    assert sum(eps) / len(eps) == pytest.approx(0.1, abs=1e-9)
    # hand-computed: one sample at the cap 0.3, the other nine share 0.7 / 9
    assert eps[0] == pytest.approx(0.7 / 9, abs=1e-9)


def test_epsilon_knobs_are_checked():
    with pytest.raises(ValueError, match="slope"):
        ual.ual_epsilons([0.5], 0.1, -1.0, 0.0, 0.4)
    with pytest.raises(ValueError, match="mean_epsilon"):
        ual.ual_epsilons([0.5], 0.5, 0.1, 0.0, 0.4)


def test_stage_steps_split_the_budget_by_stage_size():
    assert train.stage_steps([10, 10, 10], 12) == [4, 4, 4]
    assert train.stage_steps([14, 13, 13], 10) == [4, 3, 3]  # largest remainder to the largest stage
    assert train.stage_steps([40], 7) == [7]
    assert train.stage_steps([100, 1, 1], 3) == [1, 1, 1]  # every stage trains
    assert sum(train.stage_steps([7, 5, 3], 101)) == 101
    with pytest.raises(ValueError, match="fewer than the 3 stages"):
        train.stage_steps([5, 5, 5], 2)


def _rows(uncertainties):
    return [{"pair_id": f"p{i}", "uncertainty_chosen": u, "pair_uncertainty": u} for i, u in enumerate(uncertainties)]


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_constant_smoothing_is_uals_mean_epsilon_on_every_pair(objective):
    from udasa_lib import config as config_mod

    ual_cfg = config_mod.resolve(SMOKE_CONFIG).train.ual
    rows = _rows([0.05, 0.4, 0.9, 0.6])
    varying = train.smoothing_for(rows, train.METHODS[f"ual_{objective}"], ual_cfg)
    constant = train.smoothing_for(rows, train.METHODS[f"ual_{objective}_const"], ual_cfg)
    assert len(set(varying.values())) > 1
    assert set(constant.values()) == {ual_cfg.mean_epsilon}
    assert sum(constant.values()) == pytest.approx(sum(varying.values()))  # same mean, other spread


# --- the two losses against their formulas -------------------------------------------------

def test_dpo_loss_matches_the_formula_by_hand():
    import torch

    h = torch.tensor([2.0, -1.0, 0.5])
    eps = torch.tensor([0.0, 0.1, 0.3])
    beta = 0.5
    expected = [-(1 - e) * math.log(1 / (1 + math.exp(-beta * x))) - e * math.log(1 / (1 + math.exp(beta * x)))
                for x, e in zip(h.tolist(), eps.tolist())]
    assert ual.ual_dpo_loss(h, beta, eps).item() == pytest.approx(sum(expected) / 3, rel=1e-6)


def test_sft_loss_matches_torch_label_smoothing_at_constant_epsilon():
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[:, :3] = -100  # the prompt
    labels[1, 5:] = -100  # padding
    for eps in (0.0, 0.2):
        ours = ual.ual_sft_loss(logits, labels, torch.full((3,), eps))
        reference = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100,
                                    label_smoothing=eps)
        assert ours.item() == pytest.approx(reference.item(), rel=1e-6)


# --- the hooks inside trl ----------------------------------------------------------------------

def _tiny_peft(tiny_model_path):
    import torch

    from udasa_lib import config as config_mod
    from udasa_lib.models import load_causal_lm

    torch.manual_seed(0)
    cfg = config_mod.resolve(SMOKE_CONFIG)
    model, tokenizer = load_causal_lm(str(tiny_model_path), "float32", "cpu")
    tokenizer.padding_side = "right"
    return train._new_adapter(model, cfg), tokenizer, cfg


PAIRS = [{"prompt": f"question {i}:", "chosen": f" answer {i} is good", "rejected": f" no {i}"} for i in range(4)]


def _dpo_trainer(tiny_model_path, tmp_path, epsilon):
    from datasets import Dataset

    model, tokenizer, cfg = _tiny_peft(tiny_model_path)
    records = [{**p, train.EPSILON_KEY: epsilon} for p in PAIRS]
    args = train._trainer_args(cfg, "unstaged", tmp_path, "dpo", "cpu", False, 1)
    trainer = UALDPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(records),
                            processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer, model, batch


def _sequence_logps(model, batch):
    """Independent of trl: log p(completion) from the logits of a plain forward."""
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    token_logps = torch.log_softmax(logits.float(), -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (token_logps * batch["completion_mask"][:, 1:]).sum(1)


def test_dpo_hook_equals_trl_at_zero_epsilon_and_the_formula_otherwise(tiny_model_path, tmp_path):
    import torch

    trainer, model, batch = _dpo_trainer(tiny_model_path, tmp_path, 0.0)
    assert train.EPSILON_KEY in batch, "the per-sample column must survive trl's column pruning"
    with torch.no_grad():
        # move the adapter away from zero so policy and reference differ
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.05 * torch.randn_like(param))
        ours = trainer.compute_loss(model, dict(batch))
        plain = {k: v for k, v in batch.items() if k != train.EPSILON_KEY}
        trl_loss = trainer.compute_loss(model, plain)
        assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-6)

        policy = _sequence_logps(model, batch)
        with model.disable_adapter():
            reference = _sequence_logps(model, batch)
        chosen, rejected = (policy - reference).chunk(2)
        epsilon = torch.linspace(0.1, 0.3, chosen.numel())
        smoothed = trainer.compute_loss(model, {**batch, train.EPSILON_KEY: epsilon})
        expected = ual.ual_dpo_loss(chosen - rejected, trainer.beta, epsilon)
        assert abs(expected.item() - trl_loss.item()) > 1e-4, "the test needs a non-zero margin"
        assert smoothed.item() == pytest.approx(expected.item(), rel=1e-5)


def test_constant_epsilon_dpo_control_is_uals_loss_with_epsilon_fixed(tiny_model_path, tmp_path):
    import torch

    from udasa_lib import config as config_mod

    mean = config_mod.resolve(SMOKE_CONFIG).train.ual.mean_epsilon
    epsilons = train.smoothing_for(_rows([0.1, 0.5, 0.7, 0.9]), train.METHODS["ual_dpo_const"],
                                   config_mod.resolve(SMOKE_CONFIG).train.ual)
    trainer, model, batch = _dpo_trainer(tiny_model_path, tmp_path, epsilons["p0"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.05 * torch.randn_like(param))
        policy = _sequence_logps(model, batch)
        with model.disable_adapter():
            reference = _sequence_logps(model, batch)
        chosen, rejected = (policy - reference).chunk(2)
        expected = ual.ual_dpo_loss(chosen - rejected, trainer.beta, torch.full_like(chosen, mean))
        plain = trainer.compute_loss(model, {k: v for k, v in batch.items() if k != train.EPSILON_KEY})
        assert abs(expected.item() - plain.item()) > 1e-4, "the control must differ from plain DPO"
        assert trainer.compute_loss(model, dict(batch)).item() == pytest.approx(expected.item(), rel=1e-5)


def test_sft_hook_equals_trl_at_zero_epsilon(tiny_model_path, tmp_path):
    import torch
    from datasets import Dataset

    model, tokenizer, cfg = _tiny_peft(tiny_model_path)
    records = [{"prompt": p["prompt"], "completion": p["chosen"], train.EPSILON_KEY: 0.0} for p in PAIRS]
    args = train._trainer_args(cfg, "unstaged", tmp_path, "sft", "cpu", False, 1)
    trainer = UALSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert train.EPSILON_KEY in batch
    with torch.no_grad():
        ours = trainer.compute_loss(model, dict(batch))
        trl_loss = trainer.compute_loss(model, {k: v for k, v in batch.items() if k != train.EPSILON_KEY})
        # under gradient accumulation transformers passes the token count of all micro-batches
        accumulated = 3 * int((batch["labels"][:, 1:] != -100).sum())
        ours_accumulated = trainer.compute_loss(model, dict(batch), num_items_in_batch=accumulated)
        trl_accumulated = trainer.compute_loss(model, {k: v for k, v in batch.items() if k != train.EPSILON_KEY},
                                               num_items_in_batch=accumulated)
    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-5)
    assert ours_accumulated.item() == pytest.approx(trl_accumulated.item(), rel=1e-5)
    assert ours_accumulated.item() == pytest.approx(ours.item() / 3, rel=1e-5)


# --- every method on the tiny model -------------------------------------------------------------

@pytest.fixture(scope="module")
def staged_smoke(smoke_data):
    for stage in ("01_sample", "02_score", "03_pairs"):
        pipeline.run_stage(stage, SMOKE_CONFIG)


def _train(variant: str, overrides: dict | None = None):
    stage = pipeline.open_stage("04_train", SMOKE_CONFIG, {"train.methods": {"alignment": ALIGNMENT_METHODS, "sentiment": ALL_METHODS},
                                                      **(overrides or {})},
                                variant=variant)
    return stage, train.run_training(stage)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_trains_saves_and_reloads(staged_smoke, tiny_model_path, method):
    import pandas as pd
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    task = _task_of(method)
    stage, log = _train(f"{task}/{method}")
    curves = pd.read_csv(stage.dir / train.CURVES_FILE)
    assert len(curves) == sum(p["steps"] for p in log["stages"]) and curves["loss"].notna().all()
    # every method of a task takes the budget's optimizer steps, staged or not (from the log)
    assert sum(p["steps"] for p in log["stages"]) == stage.config.train.steps[task]
    weights = load_file(stage.dir / "adapters" / "final" / "adapter_model.safetensors")
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and any(w.abs().max() > 0 for w in lora_b), "LoRA B starts at zero; training must move it"

    from udasa_lib.models import load_causal_lm
    from udasa_lib.policies import PolicySet

    base, tokenizer = load_causal_lm(str(tiny_model_path), "float32", "cpu")
    with PolicySet(base, {"trained": stage.dir / "adapters" / "final"}).use("trained") as merged:
        policy = merged
    ids = tokenizer("hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        assert not torch.allclose(policy(ids).logits, base(ids).logits)
    reloaded = PeftModel.from_pretrained(base, stage.dir / "adapters" / "final")
    assert reloaded.peft_config["default"].r == 8
    if method in ("udasa", "udasa_semantic", "udasa_factual", "udasa_value"):
        assert [p["stage"] for p in log["stages"]] == ["conservative", "moderate", "exploratory"]
    if method == "udasa_reverse":
        assert [p["stage"] for p in log["stages"]] == ["exploratory", "moderate", "conservative"]


@pytest.mark.parametrize("reference", ["initial", "previous"])
def test_reference_policy_follows_the_knob(staged_smoke, reference):
    import pandas as pd

    stage, log = _train("alignment/udasa", {"train.reference": reference})
    assert {p["reference_used"] for p in log["stages"]} == {reference}
    curves = pd.read_csv(stage.dir / train.CURVES_FILE)
    # The first step of a later stage is logged before its update: against the policy at the stage
    # start the reward is exactly 0; against pi_0 it is what the earlier stages learned.
    first_of_later_stages = curves.groupby("stage", sort=False).head(1).iloc[1:]
    if reference == "previous":
        assert (first_of_later_stages["rewards/chosen"] == 0).all()
    else:
        assert (first_of_later_stages["rewards/chosen"] != 0).all()


def test_on_policy_rounds_resample_each_later_stage_with_the_current_policy(staged_smoke):
    from udasa_lib.io import read_jsonl

    stage, log = _train("alignment/udasa", {"train.on_policy": True})
    first, *later = log["stages"]
    assert first["on_policy"] is None
    for stage_log in later:
        rounds = stage_log["on_policy"]
        assert rounds["prompts"] >= 1 and rounds["pairs"] == stage_log["pairs"] >= 1
        fresh = read_jsonl(stage.dir / "adapters" / f"{stage_log['index']}_{stage_log['stage']}_on_policy_pairs.jsonl")
        assert {p["stage"] for p in fresh} == {stage_log["stage"]}
        assert all(f"-round{stage_log['index'] - 1}-" in p["chosen_sample_id"] for p in fresh)


def test_same_seed_same_adapter(staged_smoke):
    import shutil

    stage, first = _train("sentiment/udasa", {"train.learning_rate": 1.0e-3})
    shutil.rmtree(stage.dir / "adapters")  # otherwise the second run would resume the finished stages
    _, second = _train("sentiment/udasa", {"train.learning_rate": 1.0e-3})
    assert not any(p.get("resumed") for p in second["stages"])
    assert first["adapter_sha256"] == second["adapter_sha256"]


def test_nan_loss_stops_the_stage_without_manifest(staged_smoke):
    # a NaN knob is refused at resolve time (test_config); a step size this large diverges instead
    overrides = {"train.learning_rate": 1.0e30, "train.methods": {"alignment": ["dpo"], "sentiment": ["dpo"]}}
    with pytest.raises(pipeline.StageError, match="loss is (nan|inf)"):
        pipeline.run_stage("04_train", SMOKE_CONFIG, overrides, variant="alignment/dpo")
    stage = pipeline.open_stage("04_train", SMOKE_CONFIG, overrides, variant="alignment/dpo")
    assert not (stage.dir / pipeline.MANIFEST).exists()


def test_a_stage_with_zero_pairs_is_an_error_naming_it(staged_smoke):
    # delta u <= 1, so fixed cut points at 1 put every pair in the exploratory stage
    overrides = {"pairs.cut_points": [1.0, 1.0]}
    pipeline.run_stage("03_pairs", SMOKE_CONFIG, overrides)
    stage = pipeline.open_stage("04_train", SMOKE_CONFIG, overrides, variant="alignment/udasa")
    with pytest.raises(train.TrainingError, match="'conservative' has zero pairs"):
        train.run_training(stage)


def test_training_stage_through_papermill_writes_its_manifest(staged_smoke):
    run = pipeline.run_stage("04_train", SMOKE_CONFIG, variant="sentiment/ual_dpo")
    manifest = json.loads((run.dir / pipeline.MANIFEST).read_text())
    assert manifest["variant"] == "sentiment/ual_dpo"
    assert manifest["extra"]["train"]["adapter_sha256"] == train.adapter_hash(run.dir / "adapters" / "final")
    assert "adapters/final/adapter_model.safetensors" in manifest["outputs"]
    assert (run.run_dir / "04_train" / "sentiment" / "ual_dpo" / "curves.png").exists()
    with pytest.raises(pipeline.StageError, match="unknown variant"):
        pipeline.open_stage("04_train", SMOKE_CONFIG, variant="sentiment/ppo")


def test_two_cpu_processes_train_the_expected_steps_and_save_one_adapter(staged_smoke):
    # runtime is not part of the key: another learning rate keeps this run from resuming the
    # single-process alignment/dpo folder of the test above
    overrides = {"runtime.num_processes": 2, "runtime.device": "cpu", "train.learning_rate": 4.0e-4}
    stage, log = _train("alignment/dpo", overrides)
    pairs = log["stages"][0]["pairs"]
    cfg = stage.config.train
    assert log["stages"][0]["steps"] == cfg.steps["alignment"]
    assert log["stages"][0]["epochs"] == pytest.approx(cfg.steps["alignment"] * cfg.batch_size * 2 / pairs, abs=1e-3)
    assert sorted(p.name for p in (stage.dir / "adapters").iterdir()) == ["1_unstaged", "final"]
    assert log["world_size"] == 2 and not any(p.get("resumed") for p in log["stages"])
