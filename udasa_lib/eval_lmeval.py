"""Truthfulness evaluation through lm-evaluation-harness, on task YAMLs kept in this repo.

Why lm-eval and not our own scorer (truthful_mc.py only builds the data): its scores are the
ones other papers report, and its config/version block records exactly what was run. The
repo task `udasa_truthful_mc` (lm_eval_tasks/udasa_truthful_mc.yaml, versions in
lm_eval_tasks/CHANGELOG.md) scores a local JSONL offline; the built-in `truthfulqa_mc1` /
`truthfulqa_mc2` need the hub and are only a pass-through here.

Usage::

    from udasa_lib.eval_lmeval import run_truthful, write_results
    result = run_truthful("HuggingFaceTB/SmolLM2-135M-Instruct", Path("truthful_mc.jsonl"),
                          adapter_dir=Path("runs/lora"))
    result["lm_eval"]["results"]["udasa_truthful_mc"]["acc,none"]
    write_results(result, Path("out"))

Adapters are evaluated unmerged: lm-eval's HFLM wraps the base in peft.PeftModel itself.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from udasa_lib.io import atomic_write_json, atomic_write_jsonl

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
TASK_FILE = TASKS_DIR / "udasa_truthful_mc.yaml"
REPO_TASK = "udasa_truthful_mc"
DATA_PLACEHOLDER = "__UDASA_TRUTHFUL_MC_JSONL__"
# lm-eval's own TruthfulQA tasks; they download truthfulqa/truthful_qa from the hub.
BUILTIN_TRUTHFUL_TASKS: tuple[str, ...] = ("truthfulqa_mc1", "truthfulqa_mc2")
# lm-eval's results JSON minus "samples": that goes to samples.jsonl, reduced to what a
# bootstrap over questions needs.
RESULT_KEYS = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
               "higher_is_better", "n-samples", "config", "git_hash", "date")
# what a stage's results.json leaves out: when it ran and the checkout's git state (the stage's
# manifest.json records both); a product must be the same bytes on every rerun and in every clone
UNSTABLE_RESULT_KEYS = ("git_hash", "date")


def task_config(data_file: Path, task_file: Path = TASK_FILE) -> dict[str, Any]:
    """The YAML's task dict with the data placeholder replaced by data_file's absolute path."""
    config = yaml.safe_load(Path(task_file).read_text(encoding="utf-8"))
    kwargs = config.get("dataset_kwargs") or {}
    if kwargs.get("data_files") != DATA_PLACEHOLDER:
        raise ValueError(f"{task_file}: dataset_kwargs.data_files should be {DATA_PLACEHOLDER!r}")
    data_file = Path(data_file).resolve()
    if not data_file.is_file():
        raise FileNotFoundError(data_file)
    config["dataset_kwargs"] = {**kwargs, "data_files": str(data_file)}
    return config


def _local_or_hub(name: str) -> str:
    # A relative folder would be re-resolved against whatever cwd lm-eval runs in.
    return str(Path(name).resolve()) if Path(name).exists() else name


def _per_question(task: str, samples: list[dict[str, Any]], metrics: Sequence[str]) -> list[dict]:
    rows = []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        doc = sample.get("doc") or {}
        row = {"task": task, "doc_id": sample["doc_id"], "id": doc.get("id"),
               "target": sample.get("target")}
        row.update({m: float(sample[m]) for m in metrics if m in sample})
        # multiple_choice responses are one (loglikelihood, is_greedy) pair per choice
        row["loglikelihoods"] = [float(r[0]) for r in sample.get("filtered_resps", [])]
        rows.append(row)
    return rows


def run_truthful(
    model_name_or_path: str,
    data_file: Path,
    adapter_dir: Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
    task_file: Path = TASK_FILE,
    seed: int = 0,
    tasks: Sequence[str] = (REPO_TASK,),
) -> dict[str, Any]:
    """Evaluate a model (plus an optional unmerged PEFT adapter) with lm-eval.

    `tasks` may name the repo task and/or lm-eval built-ins (BUILTIN_TRUTHFUL_TASKS); the
    built-ins need network access. Returns {"lm_eval": lm-eval's results JSON without its
    samples, made JSON-safe, "per_question": one row per task and doc with the task's
    metrics (0/1 for acc, acc_norm), target and per-choice log-likelihoods}.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    specs: list[str | dict[str, Any]] = [
        task_config(data_file, task_file) if name == REPO_TASK else name for name in tasks
    ]
    # `limit` in lm-eval takes the first n documents, and the file is ordered by source; a seeded
    # sample of question indices keeps a limited run representative of every source instead.
    samples = None
    if limit and REPO_TASK in tasks:
        import numpy as np

        n_docs = sum(1 for line in Path(data_file).read_text(encoding="utf-8").splitlines() if line.strip())
        chosen = np.random.default_rng(seed).choice(n_docs, size=min(limit, n_docs), replace=False)
        samples, limit = {REPO_TASK: sorted(int(i) for i in chosen)}, None  # lm-eval takes one or the other
    model_args = {"pretrained": _local_or_hub(model_name_or_path), "dtype": dtype}
    if adapter_dir is not None:
        model_args["peft"] = str(Path(adapter_dir).resolve())
    # Indexing lm-eval's built-in task YAMLs costs ~9 s; skip it when only ours runs.
    manager = TaskManager(include_defaults=any(isinstance(s, str) for s in specs))
    # device and batch_size go only here: HFLM gets them as keywords, and also listing
    # them in model_args would pass them twice.
    raw = lm_eval.simple_evaluate(
        model="hf", model_args=model_args, tasks=specs, task_manager=manager,
        batch_size=batch_size, device=device, limit=limit, samples=samples, log_samples=True,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if raw is None:  # only non-zero ranks of a distributed run get None
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    # Round-trip through json so callers get plain types (numpy scalars, dtypes, sets).
    safe = json.loads(json.dumps({k: raw[k] for k in RESULT_KEYS if k in raw},
                                 default=handle_non_serializable))
    per_question = []
    for task, samples in raw.get("samples", {}).items():
        metrics = [m["metric"] for m in safe["configs"][task].get("metric_list", [])]
        per_question += _per_question(task, samples, metrics)
    return {"lm_eval": safe, "per_question": per_question}


def canonical_results(lm_eval_json: dict[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    """lm-eval's results JSON as a stage product: without UNSTABLE_RESULT_KEYS, and every string
    that is, or starts with, one of the absolute paths in `names` (the model folder, the adapter,
    the data file that run_truthful handed lm-eval) written with that path's name instead (the
    config's model.name_or_path, a folder relative to the results root, ...)."""
    by_length = sorted(names.items(), key=lambda item: -len(item[0]))

    def rename(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: rename(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rename(v) for v in value]
        if isinstance(value, str):
            for path, name in by_length:
                if value == path or value.startswith(path.rstrip("/") + "/"):
                    return name + value[len(path):]
        return value

    return rename({k: v for k, v in lm_eval_json.items() if k not in UNSTABLE_RESULT_KEYS})


def write_results(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write lm-eval's JSON to out_dir/results.json and per-question rows to samples.jsonl."""
    out_dir = Path(out_dir)
    return (atomic_write_json(out_dir / "results.json", result["lm_eval"]),
            atomic_write_jsonl(out_dir / "samples.jsonl", result["per_question"]))


# --- the stage --------------------------------------------------------------------------------

RESULTS_DIR = "lm_eval"
FIGURE_FILE = "lmeval.png"


def run_eval_lmeval(run) -> dict:
    """Stage 05_eval_lmeval: every alignment policy (adapters unmerged) on `eval_lmeval.tasks`;
    a policy whose lm_eval/<policy>/samples.jsonl exists is not evaluated again (resume).
    Returns {"rows": metric rows (acc, acc_norm per task with a bootstrap CI over questions),
    "policies": names}."""
    from udasa_lib import metrics
    from udasa_lib.data import TRUTHFUL_FILE
    from udasa_lib.io import read_jsonl
    from udasa_lib.models import configure_threads, resolve_device, resolve_dtype, resolve_name_or_path
    from udasa_lib.pipeline import results_root
    from udasa_lib.policies import policy_adapters

    cfg, params = run.config, run.config.eval_lmeval
    configure_threads(cfg.runtime.threads)
    data_file = run.upstream["00_data"] / TRUTHFUL_FILE
    adapters = policy_adapters(run, "alignment")
    device = resolve_device(cfg.runtime.device)
    dtype = str(resolve_dtype(cfg.model.dtype, device)).removeprefix("torch.")
    rows = []
    for name, adapter in adapters.items():
        out_dir = run.dir / RESULTS_DIR / name
        if not (out_dir / "samples.jsonl").exists():
            model_path = resolve_name_or_path(cfg.model.name_or_path)
            result = run_truthful(model_path, data_file, adapter_dir=adapter,
                                  limit=params.limit or None, batch_size=params.batch_size, device=str(device),
                                  dtype=dtype, seed=cfg.seed, tasks=params.tasks)
            # the paths lm-eval was handed (absolute: see run_truthful), named as in any clone
            names = {_local_or_hub(model_path): cfg.model.name_or_path,
                     str(Path(data_file).resolve()): f"00_data/{TRUTHFUL_FILE}"}
            if adapter is not None:
                names[str(Path(adapter).resolve())] = Path(os.path.relpath(Path(adapter).resolve(),
                                                                           results_root())).as_posix()
            write_results({**result, "lm_eval": canonical_results(result["lm_eval"], names)}, out_dir)
        # lm-eval's raw per-choice log-likelihoods may be -inf; only the 0/1 acc columns are used
        per_question = read_jsonl(out_dir / "samples.jsonl", allow_nonfinite=True)
        for task in params.tasks:
            answered = [q for q in per_question if q["task"] == task]
            for metric in ("acc", "acc_norm"):
                scored = [q for q in answered if q.get(metric) is not None]
                if scored:
                    rows.append(metrics.metric_row("alignment", name, f"{task}_{metric}", [q[metric] for q in scored],
                                                   run.name, cfg.bootstrap_samples, cfg.seed,
                                                   [q["id"] if q.get("id") is not None else q["doc_id"] for q in scored]))
    metrics.write_metrics(run.dir / metrics.METRICS_FILE, rows)
    run.add_to_manifest(tasks=list(params.tasks), questions=rows[0]["n"] if rows else 0)
    names = list(dict.fromkeys(r["metric"] for r in rows))
    metrics.plot_intervals(rows, names, list(adapters), run.dir / FIGURE_FILE,
                           title="truthfulness, 95 % CI over questions")
    return {"rows": rows, "policies": list(adapters)}
