"""The stage graph, content-addressed stage folders, manifests, and the papermill runner.

Layout of results/ (everything in it is made, and deletable):

    results/<run_id>/config.json          the resolved config of the run
    results/<run_id>/NN_<stage>  ->  results/.stages/NN_<stage>/<key>/   (relative symlink)
    results/.stages/NN_<stage>/<key>/      the stage's outputs, executed notebook, manifest.json

A stage's key hashes what determines its outputs: its config sections, the seed, the sha256 of
the upstream products it reads, the code of its notebook and module, and its data inputs. Two runs that
agree on all of that share the stage folder, so changing a training knob reruns training and
what follows it, never sampling. A stage is done only once manifest.json is in its folder;
an interrupted stage keeps its partial work in the same keyed folder and resumes there.
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import importlib.metadata
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from udasa_lib import REPO_ROOT
from udasa_lib import config as config_mod
from udasa_lib.io import atomic_write_json, display_path, sha256_file, sha256_json


@dataclass(frozen=True)
class StageSpec:
    name: str
    sections: tuple[str, ...]  # config sections (and top-level keys such as seed) the stage reads
    upstream: tuple[str, ...]
    code: tuple[str, ...]  # repo-relative files whose content defines the computation
    inputs: tuple[str, ...] = ()  # repo-relative data files read directly
    products: tuple[str, ...] = ("*.jsonl",)  # globs of the outputs downstream stages read
    variants: tuple[str, ...] = ()  # list-valued config keys whose product names the stage's variants
    html: bool = False  # also export the executed notebook to <stage>.html (the report)

    @property
    def notebook(self) -> Path:
        return REPO_ROOT / "notebooks" / f"{self.name}.ipynb"


def module_closure(*modules: str) -> tuple[str, ...]:
    """Repo paths of the given udasa_lib modules and of every udasa_lib module they import,
    transitively (imports inside functions included), sorted. What a stage's code key must cover."""
    import ast

    package = REPO_ROOT / "udasa_lib"
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen or not (package / f"{name}.py").exists():
            continue
        seen.add(name)
        for node in ast.walk(ast.parse((package / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("udasa_lib"):
                parts = node.module.split(".")
                todo += [alias.name for alias in node.names] if len(parts) == 1 else [parts[1]]
            elif isinstance(node, ast.Import):
                todo += [a.name.split(".")[1] for a in node.names if a.name.startswith("udasa_lib.")]
    return tuple(sorted(f"udasa_lib/{name}.py" for name in seen))


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec(
            "00_data",
            sections=("data",),
            upstream=(),
            code=("notebooks/00_data.ipynb", "udasa_lib/assets.py", "udasa_lib/data.py", "udasa_lib/io.py",
                  "udasa_lib/methods.py", "udasa_lib/models.py", "udasa_lib/sentiment_reward.py",
                  "udasa_lib/splits.py", "udasa_lib/truthful_mc.py", "udasa_lib/value_probe.py"),
            inputs=("data/benign_instructions.jsonl",),
            products=("*.jsonl", "*.joblib"),
        ),
        StageSpec(
            "01_sample",
            # the principles file: principle-prompted samples (sample.tasks.<task>.principle_share)
            sections=("seed", "model", "sample", "score.value.principles"),
            upstream=("00_data",),
            code=("notebooks/01_sample.ipynb", "udasa_lib/generation.py", "udasa_lib/io.py",
                  "udasa_lib/methods.py", "udasa_lib/models.py", "udasa_lib/sample.py"),
            inputs=("configs/principles.yaml",),
        ),
        StageSpec(
            "02_score",
            sections=("seed", "model", "score"),
            upstream=("00_data", "01_sample"),
            code=("notebooks/02_score.ipynb", "udasa_lib/assets.py", "udasa_lib/generation.py",
                  "udasa_lib/io.py", "udasa_lib/methods.py", "udasa_lib/models.py", "udasa_lib/sample.py",
                  "udasa_lib/score.py", "udasa_lib/splits.py", "udasa_lib/value_probe.py"),
            inputs=("configs/principles.yaml",),
        ),
        StageSpec(
            "03_pairs",
            sections=("seed", "pairs"),
            upstream=("00_data", "01_sample", "02_score"),
            code=("notebooks/03_pairs.ipynb", "udasa_lib/assets.py", "udasa_lib/controls.py",
                  "udasa_lib/data.py", "udasa_lib/diagnostics.py", "udasa_lib/generation.py",
                  "udasa_lib/io.py", "udasa_lib/methods.py", "udasa_lib/models.py", "udasa_lib/pairs.py",
                  "udasa_lib/prelim.py", "udasa_lib/refusal.py", "udasa_lib/sample.py", "udasa_lib/score.py",
                  "udasa_lib/sentiment_reward.py", "udasa_lib/splits.py", "udasa_lib/stats.py",
                  "udasa_lib/truthful_mc.py", "udasa_lib/value_probe.py"),
        ),
        StageSpec(
            "04_train",
            # on-policy rounds re-sample, re-score and re-pair: they read sample, score and pairs too
            sections=("seed", "model", "sample", "score", "pairs", "train"),
            upstream=("00_data", "01_sample", "02_score", "03_pairs"),
            code=("notebooks/04_train.ipynb", "udasa_lib/assets.py", "udasa_lib/generation.py",
                  "udasa_lib/io.py", "udasa_lib/methods.py", "udasa_lib/models.py", "udasa_lib/on_policy.py",
                  "udasa_lib/pairs.py", "udasa_lib/reference_logps.py", "udasa_lib/sample.py",
                  "udasa_lib/score.py", "udasa_lib/splits.py", "udasa_lib/train.py", "udasa_lib/trainers.py",
                  "udasa_lib/ual.py", "udasa_lib/value_probe.py"),
            products=("adapters/final/*",),
            variants=("train.methods",),  # one trained policy per task/method
        ),
        StageSpec(
            "05_eval_harmless",
            sections=("seed", "model", "eval_harmless", "bootstrap_samples"),
            upstream=("00_data", "04_train"),
            code=("notebooks/05_eval_harmless.ipynb", "udasa_lib/judges.py", "udasa_lib/sample.py", "udasa_lib/score.py", "udasa_lib/assets.py", "udasa_lib/eval_harmless.py",
                  "udasa_lib/generation.py", "udasa_lib/io.py", "udasa_lib/methods.py", "udasa_lib/metrics.py",
                  "udasa_lib/models.py", "udasa_lib/policies.py", "udasa_lib/refusal.py",
                  "udasa_lib/splits.py", "udasa_lib/stats.py", "udasa_lib/value_probe.py"),
            products=("generations/*.jsonl", "metrics.jsonl", "units.jsonl"),
        ),
        StageSpec(
            "05_eval_winrate",
            sections=("seed", "model", "eval_winrate", "bootstrap_samples"),
            upstream=("05_eval_harmless",),
            code=("notebooks/05_eval_winrate.ipynb", "udasa_lib/judges.py", "udasa_lib/sample.py", "udasa_lib/score.py", "udasa_lib/assets.py", "udasa_lib/eval_harmless.py",
                  "udasa_lib/eval_winrate.py", "udasa_lib/generation.py", "udasa_lib/io.py",
                  "udasa_lib/methods.py", "udasa_lib/metrics.py", "udasa_lib/models.py",
                  "udasa_lib/policies.py", "udasa_lib/refusal.py", "udasa_lib/splits.py", "udasa_lib/stats.py",
                  "udasa_lib/value_probe.py"),
            products=("metrics.jsonl", "units.jsonl", "annotations.jsonl"),
        ),
        StageSpec(
            "05_eval_lmeval",
            sections=("seed", "model", "eval_lmeval", "bootstrap_samples"),
            upstream=("00_data", "04_train"),
            code=("notebooks/05_eval_lmeval.ipynb", "udasa_lib/assets.py", "udasa_lib/data.py",
                  "udasa_lib/eval_lmeval.py", "udasa_lib/generation.py", "udasa_lib/io.py",
                  "udasa_lib/methods.py", "udasa_lib/metrics.py", "udasa_lib/models.py",
                  "udasa_lib/policies.py", "udasa_lib/refusal.py", "udasa_lib/sentiment_reward.py",
                  "udasa_lib/splits.py", "udasa_lib/stats.py", "udasa_lib/truthful_mc.py",
                  "udasa_lib/value_probe.py", "udasa_lib/lm_eval_tasks/udasa_truthful_mc.yaml"),
            products=("metrics.jsonl", "units.jsonl", "lm_eval/*"),
        ),
        StageSpec(
            "05_eval_sentiment",
            sections=("seed", "model", "eval_sentiment", "bootstrap_samples"),
            upstream=("00_data", "04_train"),
            code=("notebooks/05_eval_sentiment.ipynb", "udasa_lib/assets.py", "udasa_lib/data.py",
                  "udasa_lib/eval_sentiment.py", "udasa_lib/generation.py", "udasa_lib/io.py",
                  "udasa_lib/methods.py", "udasa_lib/metrics.py", "udasa_lib/models.py",
                  "udasa_lib/policies.py", "udasa_lib/refusal.py", "udasa_lib/sentiment_reward.py",
                  "udasa_lib/splits.py", "udasa_lib/stats.py", "udasa_lib/truthful_mc.py",
                  "udasa_lib/value_probe.py"),
            products=("metrics.jsonl", "units.jsonl", "generations/*.jsonl"),
        ),
        StageSpec(
            "05_validity",
            # which judges it measures (eval_*.judge) and how they read; the probe's split seed
            sections=("seed", "model", "validity", "data.probe_seed", "data.probe_embedder", "eval_harmless.judge",
                      "eval_harmless.judge_dtype", "eval_harmless.judge_batch_size", "eval_harmless.judge_max_response_tokens", "eval_winrate",
                      "bootstrap_samples"),
            upstream=("00_data",),
            code=("notebooks/05_validity.ipynb", "udasa_lib/assets.py", "udasa_lib/eval_harmless.py",
                  "udasa_lib/eval_winrate.py", "udasa_lib/generation.py", "udasa_lib/instruments.py",
                  "udasa_lib/io.py", "udasa_lib/judges.py", "udasa_lib/methods.py", "udasa_lib/metrics.py",
                  "udasa_lib/models.py", "udasa_lib/policies.py", "udasa_lib/refusal.py",
                  "udasa_lib/sample.py", "udasa_lib/score.py", "udasa_lib/splits.py", "udasa_lib/stats.py",
                  "udasa_lib/validity.py", "udasa_lib/value_probe.py"),
            products=("validity.json",),
        ),
        StageSpec(
            "06_silhouette",
            sections=("seed", "model", "silhouette"),
            upstream=("04_train", "05_eval_harmless"),
            code=("notebooks/06_silhouette.ipynb", "udasa_lib/judges.py", "udasa_lib/sample.py", "udasa_lib/score.py", "udasa_lib/assets.py", "udasa_lib/eval_harmless.py",
                  "udasa_lib/generation.py", "udasa_lib/io.py", "udasa_lib/methods.py", "udasa_lib/metrics.py",
                  "udasa_lib/models.py", "udasa_lib/policies.py", "udasa_lib/refusal.py",
                  "udasa_lib/silhouette.py", "udasa_lib/splits.py", "udasa_lib/stats.py",
                  "udasa_lib/value_probe.py"),
            products=("silhouette.csv", "units.jsonl"),
        ),
        StageSpec(
            "07_report",
            sections=("seed", "report", "bootstrap_samples"),  # and every upstream stage's products
            upstream=("00_data", "03_pairs", "04_train", "05_eval_harmless", "05_eval_winrate", "05_eval_lmeval",
                      "05_eval_sentiment", "05_validity", "06_silhouette"),
            code=("notebooks/07_report.ipynb", "udasa_lib/eval_winrate.py", "udasa_lib/judges.py", "udasa_lib/validity.py", "udasa_lib/assets.py", "udasa_lib/data.py",
                  "udasa_lib/diagnostics.py", "udasa_lib/eval_harmless.py", "udasa_lib/generation.py",
                  "udasa_lib/instruments.py", "udasa_lib/io.py", "udasa_lib/methods.py",
                  "udasa_lib/metrics.py", "udasa_lib/models.py", "udasa_lib/pairs.py", "udasa_lib/policies.py",
                  "udasa_lib/prelim.py", "udasa_lib/refusal.py", "udasa_lib/report.py", "udasa_lib/sample.py",
                  "udasa_lib/score.py", "udasa_lib/sentiment_reward.py", "udasa_lib/silhouette.py",
                  "udasa_lib/splits.py", "udasa_lib/stats.py", "udasa_lib/truthful_mc.py",
                  "udasa_lib/value_probe.py"),
            inputs=("configs/inferred_choices.yaml",),
            products=("REPORT.md",),
            html=True,
        ),
    )
}

EVAL_STAGES = tuple(name for name in STAGES if name.startswith("05_eval_"))

MANIFEST = "manifest.json"
MANIFEST_EXTRA = "manifest_extra.json"
PACKAGES_RECORDED = (
    "torch", "transformers", "tokenizers", "accelerate", "peft", "trl", "datasets", "lm_eval",
    "papermill", "sentence-transformers", "scikit-learn", "numpy", "pandas",
)


class StageError(RuntimeError):
    """A stage cannot run or did not finish; the message names the stage."""


def results_root() -> Path:
    return Path(os.environ.get("UDASA_RESULTS", REPO_ROOT / "results")).resolve()


@contextlib.contextmanager
def results_root_at(root: Path | str) -> Iterator[Path]:
    """results_root() is `root` inside the block (UDASA_RESULTS, so subprocesses see it too), and
    what it was before afterwards."""
    previous = os.environ.get("UDASA_RESULTS")
    os.environ["UDASA_RESULTS"] = str(root)
    try:
        yield Path(root)
    finally:
        if previous is None:
            os.environ.pop("UDASA_RESULTS", None)
        else:
            os.environ["UDASA_RESULTS"] = previous


def _code_fingerprint(relpath: str) -> str:
    path = REPO_ROOT / relpath
    if not path.exists():
        return "absent"
    if path.suffix == ".ipynb":
        # Only code cells define the computation; outputs and markdown edits must not rerun a stage.
        notebook = json.loads(path.read_text())
        sources = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
        return sha256_json(sources)
    return sha256_file(path)


def variants(config: config_mod.Config, stage: str) -> list[str]:
    """Variant names of a stage, else [""]. A list-valued key contributes its items, a mapping
    `task -> [methods]` contributes `task/method`; several keys multiply."""
    spec = STAGES[stage]
    if not spec.variants:
        return [""]
    names = [""]
    for key in spec.variants:
        value = config_mod.dotted_get(config, key)
        items = [f"{k}/{v}" for k, vs in value.items() for v in vs] if isinstance(value, Mapping) else list(value)
        names = [f"{prefix}/{v}" if prefix else v for prefix in names for v in items]
    return names


def training_order(names: Sequence[str]) -> list[str]:
    """04_train variants in the order `make -j` should start them: DPO-type methods first, their
    tasks alternating, so that two variants that start together need different pi_0 tables (one
    would otherwise wait on the other's lock) and the short SFT runs fill the end; otherwise the
    config's order."""
    from udasa_lib.methods import METHODS

    def task_of(name):
        return name.split("/")[0]

    dpo = [n for n in names if METHODS[n.split("/")[1]].objective == "dpo"]
    rest = [n for n in names if n not in dpo]
    tasks = list(dict.fromkeys(task_of(n) for n in dpo))
    queues = {task: [n for n in dpo if task_of(n) == task] for task in tasks}
    interleaved = []
    while any(queues.values()):
        for task in tasks:
            if queues[task]:
                interleaved.append(queues[task].pop(0))
    return interleaved + rest


def _check_variant(config: config_mod.Config, stage: str, variant: str) -> None:
    known = variants(config, stage)
    if known == [""] and variant:
        raise StageError(f"{stage} has no variants, got {variant!r}")
    if known != [""] and variant not in known:
        raise StageError(f"{stage}: unknown variant {variant!r}; this config has {', '.join(known)}")


def _stage_params(config: config_mod.Config, stage: str, variant: str = "") -> dict[str, Any]:
    """The config sections a stage reads, without its variant lists: adding a method to
    train.methods must not retrain the methods already there. For one training variant,
    train.on_policy is reduced to whether that method runs on-policy rounds, for the same reason
    (and so that `[]` and `false` are one key)."""
    spec = STAGES[stage]
    params = {s: _as_plain(config.section(s)) for s in spec.sections}
    for dotted in spec.variants:
        section, *rest = dotted.split(".")
        node = params[section]
        for part in rest[:-1]:
            node = node[part]
        node.pop(rest[-1], None)
    if variant and "train" in params:
        params["train"]["on_policy"] = config.train.on_policy_for(variant.split("/")[-1])
    return params


def stage_key(config: config_mod.Config, stage: str, variant: str = "") -> str:
    """Hash of what determines the stage's outputs. Upstream stages enter through the sha256 of
    their products (the files this stage reads), not their keys: a code change upstream that
    leaves its products byte-identical does not rerun what follows (DVC's rule)."""
    spec = STAGES[stage]
    payload = {
        "stage": stage,
        **({"variant": variant} if variant else {}),
        "params": _stage_params(config, stage, variant),
        "upstream": {u: products_fingerprint(config, u) for u in spec.upstream},
        "code": {f: _code_fingerprint(f) for f in spec.code},
        "inputs": {f: sha256_file(REPO_ROOT / f) for f in spec.inputs},
    }
    return sha256_json(payload)[:16]


def stage_dir(config: config_mod.Config, stage: str, variant: str = "") -> Path:
    return results_root() / ".stages" / stage / stage_key(config, stage, variant)


def products_fingerprint(config: config_mod.Config, stage: str) -> str:
    """sha256 over the stage's products as its manifest lists them, over all its variants (so
    adding a trained method reruns the evaluations); the stage must be done."""
    per_variant = {}
    for variant in variants(config, stage):
        folder = stage_dir(config, stage, variant)
        if not (folder / MANIFEST).exists():
            label = f"{stage} {variant}".strip()
            raise StageError(f"upstream stage {label} has not finished for this config (run it first)")
        per_variant[variant] = verified_products(folder, stage, variant)
    return sha256_json(per_variant[""] if list(per_variant) == [""] else per_variant)


def _rerun_hint(stage: str, variant: str = "") -> str:
    return (f"rerun it with `python -m udasa_lib.pipeline run {stage}{f' --variant {variant}' if variant else ''} "
            f"--force --config ...` (or delete the folder)")


def read_manifest(folder: Path, stage: str, variant: str = "") -> dict[str, Any]:
    """The manifest of a stage folder. Raises StageError naming the file when it is unreadable
    (truncated, empty, not a JSON object without its `outputs`): never a bare JSONDecodeError."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StageError(f"{path}: unreadable manifest ({error}); {_rerun_hint(stage, variant)}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("outputs"), dict):
        raise StageError(f"{path}: not a stage manifest (no `outputs` mapping); {_rerun_hint(stage, variant)}")
    return manifest


def _file_stat(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def verified_products(folder: Path, stage: str, variant: str = "") -> dict[str, str]:
    """{product file: sha256} of a done stage folder, each file checked against its manifest:
    size and mtime as recorded (fast path), else its sha256 recomputed. Raises StageError
    naming the file when a product is missing or its content differs from the manifest's hash."""
    manifest = read_manifest(folder, stage, variant)
    stats = manifest.get("stats", {})
    products = {name: digest for name, digest in manifest["outputs"].items()
                if any(fnmatch.fnmatch(name, pattern) for pattern in STAGES[stage].products)}
    for name, digest in products.items():
        path = folder / name
        if not path.is_file():
            raise StageError(f"{path}: listed in {folder / MANIFEST} but missing; {_rerun_hint(stage, variant)}")
        if stats.get(name) == _file_stat(path):
            continue
        if sha256_file(path) != digest:
            raise StageError(f"{path}: content differs from its manifest's sha256 (changed after the stage "
                             f"finished); {_rerun_hint(stage, variant)}")
    return products


def _as_plain(section: Any) -> Any:
    import dataclasses

    return dataclasses.asdict(section) if dataclasses.is_dataclass(section) else section


@dataclass
class StageRun:
    """What a stage notebook needs: its config, its folder, and its upstream folders."""

    name: str
    config: config_mod.Config
    run_id: str
    key: str
    dir: Path
    run_dir: Path
    upstream: dict[str, Path] = field(default_factory=dict)
    config_path: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    run_name: str = ""
    variant: str = ""  # e.g. "alignment/udasa" for 04_train; "" for stages without variants
    # the keyed folder the result lives in once done: `dir`, except under --force, where `dir` is
    # the staging folder swapped in at the end (link to `home`, write into `dir`)
    home: Path | None = None

    def __post_init__(self) -> None:
        self.home = self.home or self.dir

    def add_to_manifest(self, **entries: Any) -> None:
        """Facts the stage wants in its manifest (e.g. scorer accuracies); merged when it finishes."""
        path = self.dir / MANIFEST_EXTRA
        current = json.loads(path.read_text()) if path.exists() else {}
        atomic_write_json(path, {**current, **entries})

    def params(self) -> dict[str, Any]:
        return _stage_params(self.config, self.name, self.variant)


def run_name_for(config_path: Path | str, run_name: str | None = None) -> str:
    """The run's name: `run_name`, else the config file's stem. Raises StageError unless it is a
    safe folder name (config_mod.SAFE_NAME: letters, digits, `._-`, no leading dot or slash)."""
    name = run_name or Path(config_path).stem
    if not config_mod.SAFE_NAME.fullmatch(name):
        raise StageError(f"run name {name!r}: {config_mod.SAFE_NAME_RULE}")
    return name


def open_stage(
    stage: str,
    config_path: Path | str,
    overrides: Mapping[str, Any] | str | None = None,
    run_name: str | None = None,
    variant: str = "",
) -> StageRun:
    """Resolve the config, check upstream stages are done, and create this stage's folder."""
    if stage not in STAGES:
        raise StageError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
    if isinstance(overrides, str):
        overrides = json.loads(overrides or "{}")
    config_path = _repo_path(config_path)
    cfg = config_mod.resolve(config_path, overrides)
    rid = config_mod.run_id(cfg, run_name_for(config_path, run_name))
    root = results_root()
    run_dir = root / rid
    upstream = {}
    for up in STAGES[stage].upstream:
        for up_variant in variants(cfg, up):  # a stage with variants is upstream as "04_train/task/method"
            up_dir = stage_dir(cfg, up, up_variant)
            label = f"{up}/{up_variant}" if up_variant else up
            if not (up_dir / MANIFEST).exists():
                raise StageError(f"{stage}: upstream stage {label} has not finished for run {rid} (run it first)")
            upstream[label] = up_dir
            link(run_dir / label, up_dir)
    _check_variant(cfg, stage, variant)
    key = stage_key(cfg, stage, variant)
    store = home = root / ".stages" / stage / key
    link(run_dir / stage / variant if variant else run_dir / stage, home)
    # `--force` computes in a staging folder swapped in when complete (run_stage); the notebook
    # and its worker processes learn it from the environment they inherit
    staging = os.environ.get(STAGING_ENV, "")
    if staging and Path(staging).name.startswith(f".{key}."):
        store = Path(staging)
    store.mkdir(parents=True, exist_ok=True)
    resolved = run_dir / "config.json"
    if not resolved.exists():
        atomic_write_json(resolved, {"run_id": rid, "config_file": display_path(config_path), "overrides": dict(overrides or {}),
                                     "config": cfg.to_dict()})
    return StageRun(stage, cfg, rid, key, store, run_dir, upstream, config_path, dict(overrides or {}),
                    run_name_for(config_path, run_name), variant, home)


def _repo_path(path: Path | str) -> Path:
    path = Path(path)
    return path if path.is_absolute() else (REPO_ROOT / path)


def link(path: Path, target: Path) -> None:
    """Point the symlink `path` at `target` (relative, swapped in atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    relative = os.path.relpath(target, path.parent)
    if path.is_symlink() and os.readlink(path) == relative:
        return
    tmp = path.with_name(f".{path.name}.tmp-link")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(relative, target_is_directory=True)
    os.replace(tmp, path)


def is_done(run: StageRun) -> bool:
    """Whether the stage's folder holds a finished result for its key. Raises StageError when its
    manifest is unreadable or a product no longer matches it (`--force` recomputes)."""
    if not (run.dir / MANIFEST).exists():
        return False
    if read_manifest(run.dir, run.name, run.variant).get("key") != run.key:
        return False
    verified_products(run.dir, run.name, run.variant)
    return True


def _git_state() -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True,
                                    text=True, check=True).stdout.strip())
        return {"commit": commit, "dirty": dirty}
    except (subprocess.CalledProcessError, FileNotFoundError):
        return {"commit": None, "dirty": None}


def _package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES_RECORDED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def write_manifest(run: StageRun, wall_time_s: float, extra: Mapping[str, Any] | None = None) -> Path:
    """Hash every output and write manifest.json last: from then on the stage counts as done."""
    outputs, stats = {}, {}
    for path in sorted(run.dir.rglob("*")):
        rel = path.relative_to(run.dir).as_posix()
        if path.is_file() and rel not in (MANIFEST, MANIFEST_EXTRA) and not rel.startswith("shards/") and not path.name.startswith("."):
            stats[rel] = _file_stat(path)
            outputs[rel] = sha256_file(path)
    spec = STAGES[run.name]
    manifest = {
        "stage": run.name,
        "variant": run.variant,
        "key": run.key,
        "run_id": run.run_id,
        "params": run.params(),
        "seed": run.config.seed,
        "upstream": {u: {"key": d.name, "manifest_sha256": sha256_file(d / MANIFEST)} for u, d in run.upstream.items()},
        "inputs": {f: sha256_file(REPO_ROOT / f) for f in spec.inputs},
        "code": {f: _code_fingerprint(f) for f in spec.code},
        "outputs": outputs,
        "stats": stats,  # [bytes, mtime_ns] per output: verified_products' fast path
        "git": _git_state(),
        "packages": _package_versions(),
        "python": sys.version.split()[0],
        "wall_time_s": round(wall_time_s, 2),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    extra_path = run.dir / MANIFEST_EXTRA
    if extra_path.exists():
        manifest["extra"] = json.loads(extra_path.read_text())
    if extra:
        manifest.update(extra)
    return atomic_write_json(run.dir / MANIFEST, manifest)


def run_stage(
    stage: str,
    config_path: Path | str,
    overrides: Mapping[str, Any] | None = None,
    run_name: str | None = None,
    force: bool = False,
    variant: str = "",
    wait: bool = True,
) -> StageRun:
    """Execute the stage notebook with papermill into its folder, unless its key is already done
    (its products verified against its manifest). Holds the stage's lock throughout (stage_lock);
    `force` recomputes from scratch in a staging folder swapped in only when complete."""
    overrides = dict(overrides or {})
    run = open_stage(stage, config_path, overrides, run_name, variant)
    label = f"{stage} {variant}".strip()
    with stage_lock(run.dir, label, wait=wait):
        _recover_swap(run.dir)
        if not force and is_done(run):
            (run.dir / MANIFEST).touch()  # make compares mtimes; the content is already right
            print(f"[{label}] up to date ({run.run_id}, key {run.key})")
            return run
        if not force:
            (run.dir / MANIFEST).unlink(missing_ok=True)
            _execute(run, config_path, overrides, run_name)
            return run
        # --force: recompute from nothing in a staging folder; the previous result and its manifest
        # stay in place until the new one is complete
        for stale in run.dir.parent.glob(f".{run.key}.force-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = run.dir.with_name(f".{run.key}.force-{os.getpid()}")
        os.environ[STAGING_ENV] = str(staging)
        try:
            forced = open_stage(stage, config_path, overrides, run_name, variant)
            _execute(forced, config_path, overrides, run_name)
        except BaseException:
            print(f"[{label}] --force failed; the previous result is untouched (partial work: {staging})")
            raise
        finally:
            os.environ.pop(STAGING_ENV, None)
        _swap_in(staging, run.dir)
        return run


STAGING_ENV = "UDASA_STAGING_DIR"
LOCK_SUFFIX = ".lock"


@contextlib.contextmanager
def stage_lock(folder: Path, label: str, wait: bool = True) -> Iterator[None]:
    """Hold the stage folder's lock (filelock: an OS lock that dies with its process, so a kill
    leaves nothing stale). A second run of the same stage and key waits for the holder, then
    finds the stage done; with wait=False it raises StageError naming the holder."""
    from filelock import FileLock, Timeout

    folder.parent.mkdir(parents=True, exist_ok=True)
    lock_path = folder.with_name(f".{folder.name}{LOCK_SUFFIX}")
    holder_path = lock_path.with_name(lock_path.name + ".holder")
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = _read_holder(holder_path)
        if not wait:
            raise StageError(f"{label}: {folder} is locked by {holder}; wait for it or stop it") from None
        print(f"[{label}] waiting for {holder}, which holds {lock_path}", flush=True)
        lock.acquire()
    try:
        atomic_write_json(holder_path, {"pid": os.getpid(), "host": socket.gethostname(),
                                        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                        "command": " ".join(sys.argv)})
        yield
    finally:
        holder_path.unlink(missing_ok=True)
        lock.release()


def _read_holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        return f"process {holder['pid']} on {holder['host']} (since {holder['since']}: {holder['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _swap_in(staging: Path, target: Path) -> None:
    """Replace `target` by the finished `staging` folder: two renames, so a crash between them
    leaves the old result as `.<key>.previous`, which _recover_swap puts back."""
    previous = target.with_name(f".{target.name}.previous")
    shutil.rmtree(previous, ignore_errors=True)
    if target.exists():
        os.replace(target, previous)
    os.replace(staging, target)
    shutil.rmtree(previous, ignore_errors=True)


def _recover_swap(target: Path) -> None:
    """Undo a swap interrupted between its renames (the result folder gone, the previous one kept)."""
    previous = target.with_name(f".{target.name}.previous")
    if previous.exists() and not (target / MANIFEST).exists():
        shutil.rmtree(target, ignore_errors=True)
        os.replace(previous, target)


def _execute(run: StageRun, config_path: Path | str, overrides: Mapping[str, Any], run_name: str | None) -> None:
    """Run the stage notebook into run.dir with papermill, then write its manifest (the stage is done)."""
    import papermill

    stage, variant = run.name, run.variant
    label = f"{stage} {variant}".strip()
    print(f"[{label}] running -> {run.run_dir / stage / variant}")
    started = time.time()
    try:
        papermill.execute_notebook(
            str(STAGES[stage].notebook),
            str(run.dir / f"{stage}.ipynb"),
            parameters={
                "config_path": str(_repo_path(config_path)),
                "overrides": json.dumps(overrides, sort_keys=True),
                "run_name": run_name or "",
                **({"variant": variant} if variant else {}),
            },
            kernel_name="python3",
            cwd=str(REPO_ROOT),
            log_output=True,
            progress_bar=False,
        )
    except Exception as error:  # papermill wraps the notebook's exception; keep its message
        raise StageError(f"{label} failed (no manifest written): {error}") from None
    if stage_key(run.config, stage, variant) != run.key:
        # its code or inputs were edited while it ran: the outputs may come from either version
        raise StageError(f"{label}: code or inputs changed while the stage ran; run it again (no manifest written)")
    if STAGES[stage].html:
        export_html(run.dir / f"{stage}.ipynb")
    write_manifest(run, time.time() - started)
    print(f"[{label}] done in {time.time() - started:.1f} s")


def run_through(
    target: str,
    config_path: Path | str,
    overrides: Mapping[str, Any] | None = None,
    run_name: str | None = None,
) -> list[StageRun]:
    """Run `target` and every stage it reads, in graph order, all variants; done stages are skipped
    by their keys. The Makefile does the same with file targets; sweeps call this in-process."""
    needed: list[str] = []

    def visit(stage: str) -> None:
        for up in STAGES[stage].upstream:
            visit(up)
        if stage not in needed:
            needed.append(stage)

    visit(target)
    cfg = config_mod.resolve(_repo_path(config_path), overrides)
    return [run_stage(stage, config_path, overrides, run_name, variant=variant)
            for stage in needed for variant in variants(cfg, stage)]


def export_html(notebook: Path) -> Path:
    """The executed notebook as a standalone HTML page beside it (input prompts hidden)."""
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter()
    exporter.exclude_input_prompt = exporter.exclude_output_prompt = True
    body, _ = exporter.from_notebook_node(nbformat.read(notebook, as_version=4))
    from udasa_lib.io import atomic_write_text

    return atomic_write_text(notebook.with_suffix(".html"), body)


def schedule(cfg: config_mod.Config) -> tuple[int, int]:
    """(processes sharing the CPU, torch threads of each): runtime.workers, and runtime.threads
    shared among them (at least one each; 0 keeps torch's default)."""
    import os

    jobs = cfg.runtime.workers
    threads = cfg.runtime.threads or os.cpu_count() or 1
    return jobs, max(1, threads // jobs)


def _stage_state(cfg: config_mod.Config, stage: str, variant: str) -> str:
    """One status line: the key and done / to run, or why the stage cannot be keyed or reused."""
    try:
        key = stage_key(cfg, stage, variant)
    except StageError as error:
        if "has not finished" in str(error):
            return f"{'-' * 16}  waits for an upstream stage"
        return f"{'-' * 16}  upstream broken: {error}"
    folder = results_root() / ".stages" / stage / key
    if not (folder / MANIFEST).exists():
        return f"{key}  to run"
    try:
        verified_products(folder, stage, variant)
    except StageError as error:
        return f"{key}  broken: {error}"
    return f"{key}  done"


def verify_run(cfg: config_mod.Config) -> int:
    """Check every finished stage of the config against its manifest; print the broken ones.
    Returns the exit status of `pipeline verify`: 2 when any stage is broken, else 0."""
    broken = 0
    for stage in STAGES:
        for variant in variants(cfg, stage):
            state = _stage_state(cfg, stage, variant)
            if "broken" in state:
                broken += 1
                print(f"error: {stage} {variant}".rstrip() + f": {state.split('broken: ', 1)[1]}", file=sys.stderr)
    return min(broken, 1) * 2


def _parse_sets(items: list[str]) -> dict[str, Any]:
    return dict(config_mod.parse_override(item) for item in items)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m udasa_lib.pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "run-dir", "status", "verify", "variants", "schedule"):
        p = sub.add_parser(name)
        if name == "run":
            p.add_argument("stage", choices=list(STAGES))
            p.add_argument("--force", action="store_true",
                           help="recompute from scratch (a staging folder swapped in when complete)")
            p.add_argument("--no-wait", action="store_true",
                           help="stop instead of waiting when another process runs this stage")
            p.add_argument("--variant", default="", help="e.g. alignment/udasa for 04_train")
        if name == "variants":
            p.add_argument("stage", choices=list(STAGES))
            p.add_argument("--make-order", action="store_true", help="04_train: the order make -j starts them")
        p.add_argument("--config", default="configs/default.yaml")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
        p.add_argument("--name", default=None, help="run name (default: the config file's stem)")
    args = parser.parse_args(argv)
    try:
        overrides = _parse_sets(args.set)
        if args.command == "run":
            run_stage(args.stage, args.config, overrides, args.name, force=args.force, variant=args.variant,
                      wait=not args.no_wait)
        elif args.command == "verify":
            return verify_run(config_mod.resolve(_repo_path(args.config), overrides))
        elif args.command == "variants":
            names = variants(config_mod.resolve(_repo_path(args.config), overrides), args.stage)
            print(" ".join(training_order(names) if args.make_order and args.stage == "04_train" else names))
        elif args.command == "schedule":
            print(" ".join(map(str, schedule(config_mod.resolve(_repo_path(args.config), overrides)))))
        elif args.command == "run-dir":
            cfg = config_mod.resolve(_repo_path(args.config), overrides)
            print(results_root() / config_mod.run_id(cfg, run_name_for(args.config, args.name)))
        else:
            cfg = config_mod.resolve(_repo_path(args.config), overrides)
            for stage in STAGES:
                for variant in variants(cfg, stage):
                    label = f"{stage} {variant}".strip()
                    print(f"{label:32s} {_stage_state(cfg, stage, variant)}")
    except (config_mod.ConfigError, StageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
