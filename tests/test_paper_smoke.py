"""configs/paper_smoke.yaml: every branch configs/paper.yaml takes, on tiny local models, 00_data to
07_report through papermill; and `make gpu-check DEVICE=cpu`, the GPU check's test mode, which
reuses this chain's stage folders."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from udasa_lib import REPO_ROOT, gpu_check, pipeline
from udasa_lib import config as config_mod
from udasa_lib.methods import METHODS

PAPER = REPO_ROOT / "configs" / "paper.yaml"
PAPER_SMOKE = REPO_ROOT / "configs" / "paper_smoke.yaml"


def start_paper_chain(base: Path) -> tuple[subprocess.Popen, Path, Path]:
    """Start paper_smoke through 07_report in a subprocess with its own results folder under
    `base`. Returns (process, results root, log). conftest starts it as soon as the session is
    collected, so that it runs beside the suite (one torch thread) instead of after it."""
    root = base / "results"
    env = {**os.environ, "UDASA_RESULTS": str(root), "UDASA_THREADS": "1"}
    script = "from udasa_lib import pipeline; pipeline.run_through('07_report', 'configs/paper_smoke.yaml')"
    log = base / "paper_chain.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    return process, root, log


@pytest.fixture(scope="module")
def paper_chain(request, tmp_path_factory):
    """(the runs of paper_smoke through 07_report, their results root)."""
    from conftest import PAPER_CHAIN

    process, root, log = (request.config.stash.get(PAPER_CHAIN, None)
                          or start_paper_chain(tmp_path_factory.mktemp("paper-smoke")))
    try:
        returncode = process.wait(timeout=3600)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert returncode == 0, log.read_text()[-6000:]
    with pipeline.results_root_at(root):
        runs = pipeline.run_through("07_report", PAPER_SMOKE)  # every stage done: reads the manifests
    return runs, root


# Every key where paper_smoke may differ from paper.yaml: sizes, models, the device, and the
# few branches it cannot take offline or on the tiny model (each named in paper_smoke.yaml).
ALLOWED_DIFFERENCES = (
    "model.name_or_path", "runtime.", "data.sentiment_", "sample.batch_prompts", "sample.tasks.alignment.sources",
    "sample.tasks.alignment.max_new_tokens", "sample.tasks.sentiment.sources", "sample.tasks.sentiment.max_new_tokens",
    "score.nli_model", "score.value.batch_size", "train.steps", "train.batch_size", "train.max_length",
    "train.on_policy", "eval_harmless.harmful_prompts", "eval_harmless.benign_prompts",
    "eval_harmless.max_new_tokens", "eval_harmless.batch_size",
    "eval_harmless.temperature",  # the tiny random model emits text only when sampled
    "eval_winrate.judge", "eval_winrate.max_length", "eval_winrate.batch_size",
    "eval_lmeval.tasks",  # lm-eval's built-in truthfulqa tasks need the hub
    "eval_lmeval.limit", "eval_lmeval.batch_size", "eval_sentiment.prompts", "eval_sentiment.samples_per_prompt",
    "eval_sentiment.max_new_tokens", "eval_sentiment.batch_size", "silhouette.", "validity.", "bootstrap_samples",
)


def _flat(node, prefix=""):
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def test_paper_smoke_takes_every_branch_of_paper_yaml():
    paper = _flat(config_mod.resolve(PAPER).to_dict())
    smoke = _flat(config_mod.resolve(PAPER_SMOKE).to_dict())
    assert paper.keys() == smoke.keys()
    differ = sorted(key for key in paper if paper[key] != smoke[key])
    assert differ and not [key for key in differ if not key.startswith(ALLOWED_DIFFERENCES)], differ
    assert smoke["score.nli_model"] and smoke["eval_winrate.judge"]  # a named NLI model and a named judge
    assert smoke["train.on_policy"] == ("udasa",) and paper["train.on_policy"] is False  # the option, on one method
    assert smoke["eval_lmeval.tasks"] == ("udasa_truthful_mc",)
    assert smoke["sample.k"] == 8 and smoke["train.gradient_accumulation_steps"] == 2


def test_every_stage_of_the_paper_chain_has_a_verified_manifest(paper_chain):
    paper_chain, root = paper_chain
    cfg = config_mod.resolve(PAPER_SMOKE)
    expected = {(stage, variant) for stage in pipeline.STAGES for variant in pipeline.variants(cfg, stage)}
    assert {(run.name, run.variant) for run in paper_chain} == expected
    assert len([v for v in pipeline.variants(cfg, "04_train")]) == 22
    for run in paper_chain:
        manifest = pipeline.read_manifest(run.dir, run.name, run.variant)
        assert manifest["key"] == run.key and manifest["outputs"], f"{run.name} {run.variant}"
        pipeline.verified_products(run.dir, run.name, run.variant)
    with pipeline.results_root_at(root):
        assert pipeline.verify_run(cfg) == 0


def test_the_paper_chain_scored_with_nli_and_self_judge_and_trained_as_paper_yaml(paper_chain):
    paper_chain, _ = paper_chain
    runs = {(run.name, run.variant): run for run in paper_chain}
    scores = [json.loads(line) for line in (runs[("02_score", "")].dir / "scores.jsonl").read_text().splitlines()]
    assert {s["task"] for s in scores} == {"alignment", "sentiment"}
    assert all(s["value"]["scorer"] == "self_judge" for s in scores)
    assert all(len(s["sample_ids"]) == 8 and len(s["semantic"]["cluster_ids"]) == 8 for s in scores)
    cfg = config_mod.resolve(PAPER_SMOKE)
    for task, methods in cfg.train.methods.items():
        for method in methods:
            run = runs[("04_train", f"{task}/{method}")]
            adapter = json.loads((run.dir / "adapters" / "final" / "adapter_config.json").read_text())
            assert (adapter["r"], sorted(adapter["target_modules"])) == (16, sorted(cfg.train.lora.targets))
            log = json.loads((run.dir / "train_log.json").read_text())
            staged = METHODS[method].staged
            rounds = [stage["on_policy"] for stage in log["stages"]]
            if method == "udasa":
                assert rounds[0] is None and all(r is not None for r in rounds[1:]), (task, rounds)
            else:
                assert all(r is None for r in rounds), (task, method)
            assert len(log["stages"]) == (3 if staged else 1)
    report = paper_chain[-1].run_dir / "report" / "REPORT.md"
    assert "udasa_reverse" in report.read_text()


def _make_gpu_check(out, results):
    env = {**os.environ, "UDASA_RESULTS": str(results)}
    return subprocess.run(["make", "--no-print-directory", "gpu-check", "DEVICE=cpu", f"GPU_CHECK_OUT={out}"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_make_gpu_check_on_cpu_writes_every_field_and_resumes(paper_chain, tmp_path):
    _, root = paper_chain  # the chain part finds paper_smoke's stages done there
    out = tmp_path / "gpu_check"
    first = _make_gpu_check(out, root)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    fields = {"environment": gpu_check.ENVIRONMENT_FIELDS, "chain": gpu_check.CHAIN_FIELDS,
              "sampling_tiny": gpu_check.SAMPLING_FIELDS, "dpo_tiny": gpu_check.DPO_FIELDS,
              "estimate": gpu_check.ESTIMATE_FIELDS}
    for part, names in fields.items():
        record = json.loads((out / f"{part}.json").read_text())
        assert record["status"] == "ok", (part, record.get("error") or record.get("reason"))
        missing = [name for name in names if name not in record]
        assert not missing, (part, missing)
    chain = json.loads((out / "chain.json").read_text())
    assert chain["device"] == "cpu" and chain["dtype"] == "float32"
    assert [s["stage"] for s in chain["stages"]][:4] == ["00_data", "01_sample", "02_score", "03_pairs"]
    assert sum(s["stage"] == "04_train" for s in chain["stages"]) == 22
    assert chain["stages_run_here"] == 0  # every stage came from the suite's chain: recorded as not run here
    dpo = json.loads((out / "dpo_tiny.json").read_text())
    assert dpo["gradient_checkpointing"] and dpo["lora_r"] == 16 and dpo["gradient_accumulation_steps"] == 2
    assert dpo["trainable_parameters"] < dpo["parameters"] and dpo["pairs_per_s"] > 0
    sampling = json.loads((out / "sampling_tiny.json").read_text())
    assert sampling["generated_tokens"] <= sampling["sequences"] * sampling["max_new_tokens"]
    estimate = json.loads((out / "estimate.json").read_text())
    assert estimate["mode"].startswith("TEST MODE") and "estimate for" not in first.stdout
    assert estimate["seconds_8_gpus_train_steps_divided_by_8"] < estimate["seconds_8_gpus"] < estimate["seconds_1_gpu"]
    assert estimate["work"]["seconds_8_gpus"]["04_train"] == estimate["work"]["seconds_1_gpu"]["04_train"]
    # a rerun resumes: every part that finished is skipped
    again = _make_gpu_check(out, root)
    assert again.returncode == 0
    for part in ("chain", "sampling_tiny", "dpo_tiny"):
        assert f"{part}: done before" in again.stdout


def test_a_part_whose_packages_are_missing_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "missing_modules", lambda modules: [m for m in modules if m in ("trl", "papermill")])
    results = gpu_check.run("cpu", tmp_path, parts=("dpo",))
    record = results["dpo_tiny"]
    assert record["status"] == "skipped"
    assert "trl" in record["reason"] and "make gpu-wheels" in record["reason"]
    assert json.loads((tmp_path / "dpo_tiny.json").read_text())["status"] == "skipped"


def test_on_policy_takes_true_or_a_list_of_staged_methods():
    cfg = config_mod.resolve(PAPER_SMOKE)
    assert cfg.train.on_policy_for("udasa") and not cfg.train.on_policy_for("udasa_reverse")
    assert config_mod.resolve(PAPER_SMOKE, {"train.on_policy": True}).train.on_policy_for("udasa_reverse")
    with pytest.raises(config_mod.ConfigError, match="train.on_policy: dpo is not a staged method"):
        config_mod.resolve(PAPER_SMOKE, {"train.on_policy": ["dpo"]})
    with pytest.raises(config_mod.ConfigError, match="train.on_policy.*'not_a_method' is not one of sft, dpo"):
        config_mod.resolve(PAPER_SMOKE, {"train.on_policy": ["not_a_method"]})
    # a training variant is keyed on whether it runs on-policy rounds, not on the whole list
    params = lambda value, variant: pipeline._stage_params(  # noqa: E731
        config_mod.resolve(PAPER_SMOKE, {"train.on_policy": value}), "04_train", variant)
    assert params(["udasa"], "alignment/dpo") == params(["udasa", "udasa_reverse"], "alignment/dpo") == \
        params(False, "alignment/dpo")
    assert params(["udasa"], "alignment/udasa") == params(True, "alignment/udasa") != params(False, "alignment/udasa")
    assert params([], "sentiment/udasa") == params(False, "sentiment/udasa")
    assert params(["udasa_reverse", "udasa"], "alignment/udasa") == params(["udasa", "udasa_reverse"], "alignment/udasa")


def test_a_judge_is_sharded_only_when_it_does_not_fit_one_gpu(monkeypatch, tiny_model_path):
    """paper.yaml's 72B judge does not fit one GPU: a judge loads with device_map="auto" when it
    does not fit, more than one GPU is visible and the process is not one rank of several; a
    policy never does (the calls are recorded; no GPU is needed)."""
    import torch
    import transformers

    from udasa_lib import models

    class Loaded:
        def __init__(self, kwargs):
            self.kwargs = kwargs
            self.moved_to = None

        def to(self, device):
            self.moved_to = device
            return self

        def eval(self):
            return self

    fits = {"value": False}
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda source, **kw: Loaded(kw))
    monkeypatch.setattr(models, "resolve_device", lambda device: torch.device("cuda", 3))
    monkeypatch.setattr(models, "weights_fit_one_gpu", lambda *args: fits["value"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def load(**kwargs):
        return models.load_causal_lm(str(tiny_model_path), "bfloat16", "cuda:3", **kwargs)[0]

    judge = load(shard=True)
    assert judge.kwargs == {"dtype": torch.bfloat16, "device_map": "auto"} and judge.moved_to is None
    policy = load()
    assert "device_map" not in policy.kwargs and policy.moved_to == torch.device("cuda", 3)
    fits["value"] = True  # an 8B self-judge fits: one GPU, the one asked for
    assert load(shard=True).moved_to == torch.device("cuda", 3)
    fits["value"] = False
    monkeypatch.setenv("WORLD_SIZE", "8")  # a rank of a DDP run (on-policy rounds): never spread over all GPUs
    assert load(shard=True).moved_to == torch.device("cuda", 3)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert load(shard=True).moved_to == torch.device("cuda", 3)


def test_weights_fit_one_gpu_counts_parameters_from_the_config(monkeypatch, tiny_model_path):
    import torch

    from udasa_lib import models

    params = 3_219_776  # the tiny model's, as gpu_check's sampling part reports it
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (int(params * 2 / 0.9) + 10, 0))
    assert models.weights_fit_one_gpu(str(tiny_model_path), torch.bfloat16, torch.device("cuda", 0))
    assert not models.weights_fit_one_gpu(str(tiny_model_path), torch.float32, torch.device("cuda", 0))


def test_the_chain_part_without_data_assets_or_a_carried_00_data_says_what_to_carry(tmp_path, monkeypatch):
    from udasa_lib import assets

    monkeypatch.setattr(assets, "assets_dir", lambda: tmp_path / "no-assets")
    with pytest.raises(gpu_check.PartSkipped, match="make gpu-wheels.*carry"):
        gpu_check.chain("cpu", gpu_check.SETTINGS["cpu"], "04_train", tmp_path / "chain_results")
    assert not (tmp_path / "chain_results" / ".stages").exists()  # nothing was started
