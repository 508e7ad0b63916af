"""Byte-stable, location-independent stage products: the same inputs give the same bytes in any
clone, under any hash seed, on any rerun, so every stage key downstream is the same too (keys hash
upstream products' sha256, `pipeline.products_fingerprint`). Wall times, git state and absolute
paths live in manifest.json (not a product) or in the executed notebook, never in a stage's files."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from udasa_lib import REPO_ROOT, pipeline
from conftest import SMOKE_CONFIG

# Files a stage writes that are records of this particular execution, not products: the only
# ones allowed to differ between two identical runs.
RECORDS = {
    # papermill's executed notebook (cell start/end times, the kernel's absolute paths in outputs)
    # and its HTML export (07_report): the run's log, kept beside the products for reading
    "{stage}.ipynb", "{stage}.html",
}


def is_record(stage: str, name: str) -> bool:
    return name in {pattern.format(stage=stage) for pattern in RECORDS}


# --- unit: the canonicalisations ---------------------------------------------------------------

def test_a_saved_adapter_is_canonical_whatever_the_hash_seed(tiny_model_path, tmp_path):
    """peft keeps target_modules as a set (its order follows PYTHONHASHSEED) and writes the absolute
    path the base was loaded from into adapter_config.json and README.md: after
    `train.canonicalize_adapter` two saves that differ only in those are the same bytes, and the
    folder still loads."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from udasa_lib import train
    from udasa_lib.models import load_causal_lm

    torch.manual_seed(0)
    base, _ = load_causal_lm(str(tiny_model_path), "float32", "cpu")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
    folders = []
    for name, order in (("first", targets), ("second", targets[::-1])):
        folder = tmp_path / name
        model.save_pretrained(folder)
        config = json.loads((folder / train.ADAPTER_CONFIG).read_text())
        assert config["base_model_name_or_path"] == str(tiny_model_path)  # what peft writes: absolute
        config["target_modules"] = order  # what another hash seed writes
        (folder / train.ADAPTER_CONFIG).write_text(json.dumps(config))
        folders.append(train.canonicalize_adapter(folder, ".cache/assets/tiny-random-llama"))
    first, second = folders
    for name in (train.ADAPTER_CONFIG, train.ADAPTER_CARD, "adapter_model.safetensors"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    config = json.loads((first / train.ADAPTER_CONFIG).read_text())
    assert config["target_modules"] == sorted(targets)
    assert config["base_model_name_or_path"] == ".cache/assets/tiny-random-llama"
    for name in (train.ADAPTER_CONFIG, train.ADAPTER_CARD):
        text = (first / name).read_text()
        assert str(REPO_ROOT) not in text and str(tiny_model_path) not in text and str(tmp_path) not in text, name
    fresh, _ = load_causal_lm(str(tiny_model_path), "float32", "cpu")  # get_peft_model changed `base` in place
    reloaded = PeftModel.from_pretrained(fresh, first)
    assert set(reloaded.peft_config["default"].target_modules) == set(targets)


def test_curves_are_the_same_bytes_after_a_resume(tmp_path):
    """A finished stage's curve rows come back from its stage.json with sorted keys (and JSON's
    floats); a fresh stage's come in logging order: curves.csv is the same either way."""
    from udasa_lib import train

    history = [{"loss": 0.6931, "grad_norm": 1.25, "learning_rate": 5e-06, "rewards/chosen": 0.0,
                "rewards/rejected": 0.0, "rewards/margins": 0.0, "rewards/accuracies": 0.0, "epoch": 0.5, "step": s}
               for s in (1, 2)] + [{"train_runtime": 3.2, "train_samples_per_second": 1.9, "train_loss": 0.69,
                                    "epoch": 1.0, "step": 2}]
    fresh = train._log_rows(history, "conservative")
    resumed = json.loads(json.dumps(fresh, sort_keys=True))
    train._write_curves(tmp_path / "fresh.csv", fresh)
    train._write_curves(tmp_path / "resumed.csv", resumed)
    assert (tmp_path / "fresh.csv").read_bytes() == (tmp_path / "resumed.csv").read_bytes()
    header = (tmp_path / "fresh.csv").read_text().splitlines()[0].split(",")
    assert header == list(train.CURVE_COLUMNS) and not any("runtime" in c or "per_second" in c for c in header)
    assert train.without_timing({"seconds": 1, "stages": [{"pairs": 3, "pairs_per_s": 2.0,
                                                          "on_policy": {"seconds": 4, "pairs": 2}}]}) == \
        {"stages": [{"pairs": 3, "on_policy": {"pairs": 2}}]}


def test_lm_eval_results_name_no_absolute_path_and_no_date():
    from udasa_lib.eval_lmeval import canonical_results

    raw = {"results": {"t": {"acc,none": 0.5}}, "date": 1722.5, "git_hash": "abc",
           "config": {"model": "hf", "model_args": {"pretrained": "/x/clone/.cache/assets/m", "peft": "/r/.stages/04/k/final"}},
           "configs": {"t": {"dataset_kwargs": {"data_files": "/r/.stages/00/k/truthful_mc.jsonl"}}}}
    out = canonical_results(raw, {"/x/clone/.cache/assets/m": ".cache/assets/m", "/r/.stages/04/k/final": ".stages/04/k/final",
                                  "/r/.stages/00/k/truthful_mc.jsonl": "00_data/truthful_mc.jsonl"})
    assert "date" not in out and "git_hash" not in out
    assert out["config"]["model_args"] == {"pretrained": ".cache/assets/m", "peft": ".stages/04/k/final"}
    assert out["configs"]["t"]["dataset_kwargs"]["data_files"] == "00_data/truthful_mc.jsonl"


def test_the_report_names_files_relative_to_the_repo():
    from udasa_lib.io import display_path

    assert display_path(REPO_ROOT / "configs" / "smoke.yaml") == "configs/smoke.yaml"
    assert display_path("/elsewhere/mine.yaml") == "/elsewhere/mine.yaml"


# --- acceptance: the smoke chain in another folder ---------------------------------------------

def _clone(destination: Path) -> Path:
    """The working tree's files (tracked, and untracked ones git does not ignore) copied into
    `destination`, with .cache pointing at this checkout's built assets (the models are large)."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                                cwd=REPO_ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    except (subprocess.CalledProcessError, FileNotFoundError):
        pytest.skip("the checkout is not a git working tree: cannot list its files")
    destination.mkdir(parents=True, exist_ok=True)
    for relative in filter(None, listed):
        source = REPO_ROOT / relative
        if source.is_file():
            (destination / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / relative)
    from udasa_lib.assets import cache_root

    (destination / ".cache").symlink_to(cache_root(), target_is_directory=True)
    return destination


def _stage_folders(root: Path) -> dict[tuple[str, str], Path]:
    """(stage, variant) -> its finished folder under root/.stages, for the smoke config's keys."""
    folders = {}
    for manifest in (root / ".stages").glob("*/*/manifest.json"):
        data = json.loads(manifest.read_text())
        folders[(data["stage"], data["variant"])] = manifest.parent
    return folders


def start_elsewhere(base: Path) -> tuple[subprocess.Popen, Path, Path]:
    """Start the smoke chain through 07_report in a copy of the repo under `base`, in a subprocess
    with another PYTHONHASHSEED and its own results folder. Returns (process, results root, log).
    conftest starts it as soon as the session is collected, so that it runs on the core the rest
    of the suite (one torch thread) leaves idle; `two_chains` waits for it."""
    clone = _clone(base / "another" / "checkout")
    there_root = base / "results"
    seed = str(random.Random(os.environ.get("PYTHONHASHSEED", "")).randrange(1, 2**31))
    if os.environ.get("PYTHONHASHSEED") == seed:
        seed = str(int(seed) + 1)
    env = {**os.environ, "UDASA_RESULTS": str(there_root), "PYTHONPATH": str(clone), "PYTHONHASHSEED": seed,
           "UDASA_THREADS": "1"}
    script = ("import pathlib, udasa_lib; assert udasa_lib.REPO_ROOT == pathlib.Path.cwd().resolve(); "
              "from udasa_lib import pipeline; pipeline.run_through('07_report', 'configs/smoke.yaml')")
    log = base / "chain.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-c", script], cwd=clone, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    return process, there_root, log


@pytest.fixture(scope="module")
def two_chains(shared_results, tmp_path_factory, request):
    """The smoke chain through 07_report twice: in a copy of the repo in another folder (started
    at collection, see start_elsewhere), and here (00-06 shared with the session's other chain
    tests; 07_report again in a results folder of its own, since the seeds sweep that test_chain
    runs in the shared folder shows up in its report, by design outside the key).
    Returns (here, there): (stage, variant) -> its folder."""
    from udasa_lib import config as config_mod

    from conftest import ELSEWHERE

    started = time.time()
    elsewhere, there_root, log = (request.config.stash.get(ELSEWHERE, None)
                                  or start_elsewhere(tmp_path_factory.mktemp("stability-elsewhere")))
    try:
        for upstream in pipeline.STAGES["07_report"].upstream:
            pipeline.run_through(upstream, SMOKE_CONFIG)
        cfg = config_mod.resolve(SMOKE_CONFIG)
        report_root = tmp_path_factory.mktemp("stability-here")
        for stage in [name for name in pipeline.STAGES if name != "07_report"]:  # the shared folders, no sweeps
            for variant in pipeline.variants(cfg, stage):
                store = pipeline.stage_dir(cfg, stage, variant)
                link = report_root / ".stages" / stage / store.name
                if not link.exists():
                    link.parent.mkdir(parents=True, exist_ok=True)
                    link.symlink_to(store, target_is_directory=True)
        with pipeline.results_root_at(report_root):
            pipeline.run_stage("07_report", SMOKE_CONFIG)
        returncode = elsewhere.wait()
    finally:
        if elsewhere.poll() is None:
            elsewhere.kill()
            elsewhere.wait()
    assert returncode == 0, log.read_text()[-6000:]
    print(f"two_chains: {time.time() - started:.0f} s")
    return _stage_folders(report_root), _stage_folders(there_root)


def test_the_smoke_chain_in_another_folder_gives_the_same_products_and_keys(two_chains):
    """Every stage and variant has the same key in both places, and every file of its folder has
    the same sha256 in both manifests' `outputs`, records (RECORDS) excepted."""
    from udasa_lib import config as config_mod

    here, there = two_chains
    cfg = config_mod.resolve(SMOKE_CONFIG)
    expected = {(stage, variant) for stage in pipeline.STAGES for variant in pipeline.variants(cfg, stage)}
    assert set(here) == set(there) == expected
    differences = {}
    for stage, variant in sorted(expected):
        a, b = here[(stage, variant)], there[(stage, variant)]
        label = f"{stage} {variant}".strip()
        assert a.name == b.name, f"{label}: key {a.name} here, {b.name} in the other folder"
        outputs_a = json.loads((a / pipeline.MANIFEST).read_text())["outputs"]
        outputs_b = json.loads((b / pipeline.MANIFEST).read_text())["outputs"]
        bad = sorted(name for name in set(outputs_a) | set(outputs_b)
                     if outputs_a.get(name) != outputs_b.get(name) and not is_record(stage, Path(name).name))
        if bad:
            differences[label] = bad
    assert not differences, f"files that differ between two identical runs: {differences}"
