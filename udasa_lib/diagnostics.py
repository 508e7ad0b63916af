"""Diagnostics of the sampled pool and of the uncertainty signals (03_pairs, issue 14).

They say what the pairs can and cannot teach before any training:

- **pool coverage**: per task, the share of sampled responses that refuse (GCG's refusal openings,
  `refusal.is_refusal`) and that the value scorer rates aligned (value u < 0.5, i.e. P(aligned) > 0.5),
  split by principle-prompted vs plain samples. A pool without refusals cannot teach refusal however
  the pairs are chosen.
- **semantic clusters**: the distribution of cluster counts per prompt. When every prompt splits
  into K singletons, semantic entropy is log K everywhere and u_sem ranks responses by likelihood
  alone; when one count covers every prompt the dimension is flagged degenerate.
- **dimension correlations**: Spearman between the normalised semantic, factual and value scores,
  pooled over responses and as the mean within-prompt correlation (u is a within-prompt quantity).
  Two dimensions that rank the same way add little to each other.
- **degenerate dimensions**: constant within every prompt, so they cannot rank a prompt's responses.

How Δu relates to the ground truth per stage is the preliminary study's `agreement_by_stage`
(`udasa_lib/prelim.py`); the report shows both.
"""
from __future__ import annotations

import itertools
from collections import Counter
from typing import Any, Mapping, Sequence

import numpy as np

from udasa_lib.refusal import is_refusal
from udasa_lib.pairs import DIMENSIONS

DIAGNOSTICS_FILE = "diagnostics.json"
ALIGNED_BELOW = 0.5  # value u = 1 - P(aligned): below 0.5 the value scorer rates the response aligned


def _coverage(responses: Sequence[dict], value_u: Sequence[float] | None) -> dict:
    refusing = [is_refusal(r["text"]) for r in responses]
    row = {"responses": len(responses), "refusing_share": float(np.mean(refusing)) if responses else None}
    if value_u is not None:
        row["aligned_share"] = float(np.mean(np.asarray(value_u) < ALIGNED_BELOW)) if len(value_u) else None
    return row


def pool_coverage(samples: Sequence[dict], scores: Sequence[dict] | None = None) -> dict[str, dict]:
    """Per task: prompts, responses, refusing_share, prompts_with_refusal (share of prompts with at
    least one refusing response), aligned_share (value u < 0.5; needs `scores`, 02_score's records
    with `value.u` per response), and the same under `by_principle` {"principle", "plain"} where any
    response was drawn with the principle (01_sample's `principle`). Shares in [0, 1]."""
    value_by_prompt = {s["prompt_id"]: s["value"]["u"] for s in scores} if scores is not None else None
    result = {}
    for task in sorted({r["task"] for r in samples}):
        records = [r for r in samples if r["task"] == task]
        groups: dict[str, tuple[list, list]] = {"all": ([], []), "principle": ([], []), "plain": ([], [])}
        for record in records:
            values = value_by_prompt[record["prompt_id"]] if value_by_prompt is not None else [None] * len(
                record["responses"])
            for response, value in zip(record["responses"], values):
                for group in ("all", "principle" if response.get("principle") else "plain"):
                    groups[group][0].append(response)
                    groups[group][1].append(value)
        with_refusal = [any(is_refusal(x["text"]) for x in r["responses"]) for r in records]
        row = {"prompts": len(records), **_coverage(*_with_values(groups["all"], scores)),
               "prompts_with_refusal": float(np.mean(with_refusal)) if records else None}
        if groups["principle"][0]:
            row["by_principle"] = {g: _coverage(*_with_values(groups[g], scores)) for g in ("principle", "plain")}
        result[task] = row
    return result


def _with_values(group: tuple[list, list], scores) -> tuple[list, list | None]:
    return group[0], (group[1] if scores is not None else None)


def cluster_count_distribution(scores: Sequence[dict]) -> dict[str, dict]:
    """Per task: `histogram` {n_clusters: prompts}, `singleton_share` (prompts whose K responses are K
    clusters), `degenerate` (one count for every prompt: semantic entropy is then the same
    everywhere and u_sem only a likelihood rank within the prompt)."""
    result = {}
    for task in sorted({s["task"] for s in scores}):
        rows = [s for s in scores if s["task"] == task]
        counts = [int(s["semantic"]["n_clusters"]) for s in rows]
        singletons = [n == len(s["sample_ids"]) for n, s in zip(counts, rows)]
        histogram = dict(sorted(Counter(counts).items()))
        result[task] = {"prompts": len(rows), "histogram": {str(n): c for n, c in histogram.items()},
                        "singleton_share": float(np.mean(singletons)), "degenerate": len(histogram) == 1}
    return result


def _spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    from scipy.stats import spearmanr

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    rho = spearmanr(x, y).statistic
    return None if np.isnan(rho) else float(rho)


def dimension_correlations(rows: Sequence[dict]) -> dict[str, dict]:
    """Per task and pair of dimensions: `pooled` Spearman over all responses and `within_prompt`,
    the mean of the per-prompt Spearman over the `prompts` where neither dimension is constant.
    `rows` are `pairs.response_table` rows (normalised dimension scores). None where undefined."""
    result: dict[str, dict] = {}
    for task in sorted({r["task"] for r in rows}):
        task_rows = [r for r in rows if r["task"] == task]
        by_prompt: dict[str, list[dict]] = {}
        for r in task_rows:
            by_prompt.setdefault(r["prompt_id"], []).append(r)
        result[task] = {}
        for a, b in itertools.combinations(DIMENSIONS, 2):
            within = [rho for group in by_prompt.values()
                      if (rho := _spearman([r[a] for r in group], [r[b] for r in group])) is not None]
            result[task][f"{a}~{b}"] = {
                "pooled": _spearman([r[a] for r in task_rows], [r[b] for r in task_rows]),
                "within_prompt": float(np.mean(within)) if within else None, "prompts": len(within)}
    return result


def degenerate_dimensions(rows: Sequence[dict]) -> dict[str, list[str]]:
    """Per task: the dimensions whose normalised score is constant within every prompt (they cannot
    rank a prompt's responses, so they add nothing to u)."""
    result = {}
    for task in sorted({r["task"] for r in rows}):
        by_prompt: dict[str, list[dict]] = {}
        for r in (r for r in rows if r["task"] == task):
            by_prompt.setdefault(r["prompt_id"], []).append(r)
        result[task] = [d for d in DIMENSIONS
                        if all(np.ptp([r[d] for r in group]) == 0 for group in by_prompt.values())]
    return result


def run_diagnostics(samples: Sequence[dict], scores: Sequence[dict], rows: Sequence[dict]) -> dict[str, Any]:
    """All diagnostics, JSON-serialisable: samples (01_sample), scores (02_score), rows
    (`pairs.response_table`)."""
    return {"pool_coverage": pool_coverage(samples, scores), "semantic_clusters": cluster_count_distribution(scores),
            "dimension_correlations": dimension_correlations(rows), "degenerate_dimensions": degenerate_dimensions(rows)}


def run_stage_diagnostics(run) -> dict[str, Any]:
    """03_pairs: diagnostics.json from the stage's inputs and responses.jsonl; the pool coverage and
    the degenerate dimensions also go to the manifest."""
    from udasa_lib.io import atomic_write_json, read_jsonl
    from udasa_lib.sample import SAMPLES_FILE, load_samples
    from udasa_lib.score import SCORES_FILE, load_scores

    diagnostics = run_diagnostics(load_samples(run.upstream["01_sample"] / SAMPLES_FILE),
                                  load_scores(run.upstream["02_score"] / SCORES_FILE),
                                  read_jsonl(run.dir / "responses.jsonl"))
    atomic_write_json(run.dir / DIAGNOSTICS_FILE, diagnostics)
    run.add_to_manifest(pool_coverage=diagnostics["pool_coverage"],
                        degenerate_dimensions=diagnostics["degenerate_dimensions"])
    return diagnostics


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.2f}" if isinstance(x, float) else str(x)


def render_diagnostics(diagnostics: Mapping[str, Any]) -> list[str]:
    """Markdown lines for REPORT.md and the 03 notebook: three tables and the degenerate dimensions."""
    lines = ["### Pool coverage", "",
             "| task | prompts | responses | refusing | prompts with a refusal | rated aligned (value u < 0.5) |"
             " principle / plain refusing |", "|:--|--:|--:|--:|--:|--:|:--|"]
    for task, c in diagnostics["pool_coverage"].items():
        split = c.get("by_principle")
        split_text = (f"{_fmt(split['principle']['refusing_share'])} / {_fmt(split['plain']['refusing_share'])}"
                      if split else "no principle samples")
        lines.append(f"| {task} | {c['prompts']} | {c['responses']} | {_fmt(c['refusing_share'])} | "
                     f"{_fmt(c['prompts_with_refusal'])} | {_fmt(c.get('aligned_share'))} | {split_text} |")
    lines += ["", "### Semantic clusters", "", "| task | clusters per prompt: prompts | all singletons | degenerate |",
              "|:--|:--|--:|:--|"]
    for task, c in diagnostics["semantic_clusters"].items():
        histogram = ", ".join(f"{n}: {count}" for n, count in c["histogram"].items())
        lines.append(f"| {task} | {histogram} | {_fmt(c['singleton_share'])} | {'yes' if c['degenerate'] else 'no'} |")
    lines += ["", "### Dimension correlations", "",
              "| task | dimensions | Spearman, pooled | Spearman, mean within prompt | prompts |", "|:--|:--|--:|--:|--:|"]
    for task, table in diagnostics["dimension_correlations"].items():
        for dims, c in table.items():
            lines.append(f"| {task} | {dims} | {_fmt(c['pooled'])} | {_fmt(c['within_prompt'])} | {c['prompts']} |")
    degenerate = {t: d for t, d in diagnostics["degenerate_dimensions"].items() if d}
    lines += ["", ("Degenerate at this scale (constant within every prompt): " + "; ".join(
        f"{t}: {', '.join(d)}" for t, d in degenerate.items())) if degenerate
        else "No dimension is constant within every prompt.", ""]
    for task, c in diagnostics["semantic_clusters"].items():
        if c["degenerate"]:
            lines.append(f"The semantic dimension is degenerate on {task}: every prompt has "
                         f"{next(iter(c['histogram']))} cluster(s), so semantic entropy is the same for all "
                         "prompts and u_sem only ranks responses by likelihood within a prompt.")
    return lines
