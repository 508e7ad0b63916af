"""07_report: collate a run into REPORT.md, with verdicts computed from the numbers.

A claim compares two methods on one metric (or one quantity against zero). Its verdict comes
from the 95 % intervals only: `supported` when the intervals are disjoint in the claimed
direction, `not supported` when disjoint the other way, `inconclusive at this size` when they
overlap, `not run` when the run lacks a method or metric. Disjoint 95 % intervals are a
conservative test (roughly p < 0.006 for two independent means), so "inconclusive" is common
at laptop scale, and that is the honest reading.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from udasa_lib import REPO_ROOT
from udasa_lib.config import dotted_get
from udasa_lib.metrics import interval_text

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE, NOT_RUN = "supported", "not supported", "inconclusive at this size", "not run"
INFERRED_CHOICES_FILE = REPO_ROOT / "configs" / "inferred_choices.yaml"


@dataclass(frozen=True)
class Claim:
    paper: str
    text: str
    task: str
    metric: str
    better: str  # method claimed better
    than: str  # method it is compared with
    higher_is_better: bool


# What the abstracts claim, each made testable on this project's metrics (docs/method.md).
CLAIMS: tuple[Claim, ...] = (
    # harmlessness twice: compliance is judged by the harm probe, which also scored the alignment pairs'
    # value dimension; the refusal rate (GCG refusal prefixes) does not depend on the probe
    Claim("UDASA", "UDASA is more harmless than DPO (harm-probe compliance)", "alignment", "harmful_compliance_rate",
          "udasa", "dpo", False),
    Claim("UDASA", "UDASA is more harmless than DPO (refusal rate, probe-independent)", "alignment",
          "harmful_refusal_rate", "udasa", "dpo", True),
    Claim("UDASA", "UDASA is more harmless than SFT (harm-probe compliance)", "alignment", "harmful_compliance_rate",
          "udasa", "sft", False),
    Claim("UDASA", "UDASA is more harmless than SFT (refusal rate, probe-independent)", "alignment",
          "harmful_refusal_rate", "udasa", "sft", True),
    Claim("UDASA", "UDASA is more helpful than DPO (win rate vs base)", "alignment", "win_rate", "udasa", "dpo", True),
    Claim("UDASA", "UDASA is more truthful than DPO", "alignment", "udasa_truthful_mc_acc", "udasa", "dpo", True),
    Claim("UDASA", "UDASA beats DPO on controlled sentiment (reward)", "sentiment", "reward", "udasa", "dpo", True),
    Claim("UDASA", "Staged order beats the reversed order (reward)", "sentiment", "reward", "udasa", "udasa_reverse", True),
    Claim("UDASA", "All three dimensions beat semantic only (reward)", "sentiment", "reward", "udasa", "udasa_semantic", True),
    Claim("UDASA", "All three dimensions beat factual only (reward)", "sentiment", "reward", "udasa", "udasa_factual", True),
    Claim("UDASA", "All three dimensions beat value only (reward)", "sentiment", "reward", "udasa", "udasa_value", True),
    Claim("UAL", "UAL-DPO beats DPO on controlled sentiment (reward)", "sentiment", "reward", "ual_dpo", "dpo", True),
    Claim("UAL", "UAL-SFT beats SFT on controlled sentiment (reward)", "sentiment", "reward", "ual_sft", "sft", True),
    Claim("UAL", "UAL-DPO is more harmless than DPO (harm-probe compliance)", "alignment", "harmful_compliance_rate",
          "ual_dpo", "dpo", False),
    Claim("UAL", "UAL-DPO is more harmless than DPO (refusal rate, probe-independent)", "alignment",
          "harmful_refusal_rate", "ual_dpo", "dpo", True),
    Claim("UAL", "UAL-SFT is more helpful than SFT (win rate vs base)", "alignment", "win_rate", "ual_sft", "sft", True),
    Claim("UAL", "UAL-SFT tightens token clusters vs SFT (last-layer silhouette)", "alignment", "silhouette_token_last",
          "ual_sft", "sft", True),
    Claim("UAL", "UAL-DPO tightens token clusters vs DPO (last-layer silhouette)", "alignment", "silhouette_token_last",
          "ual_dpo", "dpo", True),
)


def compare(a: dict | None, b: dict | None, higher_is_better: bool) -> str:
    if a is None or b is None or any(not math.isfinite(float(x[k])) for x in (a, b) for k in ("ci_low", "ci_high")):
        return NOT_RUN
    a_above = a["ci_low"] > b["ci_high"]
    b_above = b["ci_low"] > a["ci_high"]
    if not (a_above or b_above):
        return INCONCLUSIVE
    return SUPPORTED if a_above == higher_is_better else NOT_SUPPORTED


def sign_verdict(row: dict | None, negative: bool) -> str:
    """A quantity claimed below zero (negative=True) or above it, judged by its interval."""
    if row is None or not all(math.isfinite(float(row[k])) for k in ("ci_low", "ci_high")):
        return NOT_RUN
    if row["ci_high"] < 0:
        return SUPPORTED if negative else NOT_SUPPORTED
    if row["ci_low"] > 0:
        return NOT_SUPPORTED if negative else SUPPORTED
    return INCONCLUSIVE


def silhouette_rows(ci_table: pd.DataFrame) -> pd.DataFrame:
    """06_silhouette's last-layer token view as metric rows of the results table's shape."""
    part = ci_table[ci_table.view == "token"]
    return pd.DataFrame({"task": "alignment", "method": part["method"], "metric": "silhouette_token_last",
                         "value": part["silhouette"], "ci_low": part["ci_low"], "ci_high": part["ci_high"],
                         "n": part["n_responses"], "stage": "06_silhouette"})


def _lookup(table: pd.DataFrame, task: str, metric: str, method: str) -> dict | None:
    hit = table[(table.task == task) & (table.metric == metric) & (table.method == method)]
    return None if hit.empty else hit.iloc[0].to_dict()


def claims_table(table: pd.DataFrame, prelim: dict | None) -> pd.DataFrame:
    rows = []
    for claim in CLAIMS:
        a, b = (_lookup(table, claim.task, claim.metric, m) for m in (claim.better, claim.than))
        rows.append({"paper": claim.paper, "claim": claim.text, "metric": f"{claim.task}/{claim.metric}",
                     "our number": f"{claim.better} {interval_text(a)} vs {claim.than} {interval_text(b)}",
                     "verdict": compare(a, b, claim.higher_is_better)})
    if prelim:
        stages = {s["stage"]: {"metric": "agreement", "value": s["agreement"], "ci_low": s["ci_low"], "ci_high": s["ci_high"]}
                  for s in prelim["agreement_by_stage"]}
        rows.append({"paper": "UDASA", "claim": "Pairs with a larger uncertainty gap are more often right "
                     "(ground-truth agreement, conservative > exploratory)", "metric": "sentiment/prelim agreement",
                     "our number": f"conservative {interval_text(stages.get('conservative'))} vs exploratory "
                                   f"{interval_text(stages.get('exploratory'))}",
                     "verdict": compare(stages.get("conservative"), stages.get("exploratory"), True)})
        spearman = prelim["spearman_u_vs_reward"]
        row = {"metric": "spearman", "value": spearman["spearman"], "ci_low": spearman["ci_low"], "ci_high": spearman["ci_high"]}
        rows.append({"paper": "UDASA", "claim": "Self-estimated uncertainty is lower for better responses "
                     "(Spearman(u, ground-truth reward) < 0)", "metric": "sentiment/prelim spearman",
                     "our number": interval_text(row), "verdict": sign_verdict(row, negative=True)})
    return pd.DataFrame(rows)


def inferred_choices_table(config: dict, path: Path = INFERRED_CHOICES_FILE) -> pd.DataFrame:
    entries = yaml.safe_load(Path(path).read_text())
    rows = []
    for index, entry in enumerate(entries):
        missing = {"choice", "keys", "why"} - set(entry)
        if missing:
            raise ValueError(f"{path}: entry {index} lacks {sorted(missing)}")
        for key in entry["keys"]:
            try:
                value = dotted_get(config, key)
            except (KeyError, TypeError):
                raise ValueError(f"{path}: entry {index} ({entry['choice']}): {key!r} is not a config key") from None
            rows.append({"choice": entry["choice"], "knob": key, "value": json.dumps(value), "why": entry["why"]})
    return pd.DataFrame(rows)


def sweep_mismatch(sweep_dir: Path, pairs_dir: Path) -> str | None:
    """Why a sweep's results do not belong in this run's report, or None when every point trained
    on this run's pairs (the same 03_pairs folder), i.e. the sweep varied this run's training."""
    points = json.loads((Path(sweep_dir) / "points.json").read_text())
    pairs = {(Path(p["run_dir"]) / "03_pairs").resolve() for p in points}
    if pairs != {Path(pairs_dir).resolve()}:
        return f"{sweep_dir} was run on other pairs ({len(pairs)} pair sets, e.g. another config); not shown"
    return None


def stage_times(run_dir: Path) -> pd.DataFrame:
    rows = []
    for manifest in sorted(Path(run_dir).glob("*/manifest.json")) + sorted(Path(run_dir).glob("04_train/*/*/manifest.json")):
        data = json.loads(manifest.read_text())
        label = f"{data['stage']} {data.get('variant', '')}".strip()
        rows.append({"stage": label, "wall_time_s": data["wall_time_s"], "finished_at": data["finished_at"]})
    return pd.DataFrame(rows)


def markdown(frame: pd.DataFrame, index: bool = False) -> str:
    return frame.to_markdown(index=index) + "\n" if not frame.empty else "_(none)_\n"


def seed_spread(summary: pd.DataFrame) -> pd.DataFrame:
    """Mean and spread over seeds (a seeds sweep's summary.csv) per task, method and metric."""
    grouped = summary.groupby(["task", "method", "metric"], sort=False)["value"]
    out = grouped.agg(mean="mean", sd="std", low="min", high="max", seeds="count").reset_index()
    return out.round({"mean": 4, "sd": 4, "low": 4, "high": 4})


def cut_table(stage_summary: dict) -> pd.DataFrame:
    """Per task: responses and pairs cut at max_new_tokens (03_pairs summary, combined pair set).
    A cut response is trained without an EOS; `pairs.truncated` decides whether it may enter a pair."""
    cut = stage_summary["combined"].get("cut", {})
    return pd.DataFrame([{"task": task, "pairs.truncated": c["policy"], "responses": c["responses"],
                          "cut": c["responses_cut"], "cut share": c["responses_cut_share"], "pairs": c["pairs"],
                          "chosen cut": c["pairs_chosen_cut"], "rejected cut": c["pairs_rejected_cut"],
                          "pairs dropped (truncated)": stage_summary["combined"]["dropped"].get("truncated", 0)}
                         for task, c in cut.items()])


# --- the stage --------------------------------------------------------------------------------

REPORT_FILE = "REPORT.md"
CLAIMS_FILE = "claims.csv"
TABLE_FILE = "results_table.csv"
FIGURE_SOURCES = {  # figure -> the upstream stage that draws it
    "harmless.png": "05_eval_harmless", "winrate.png": "05_eval_winrate", "lmeval.png": "05_eval_lmeval",
    "reward_kl.png": "05_eval_sentiment", "silhouette_layers.png": "06_silhouette", "projection.png": "06_silhouette",
}


def write_report(run) -> dict:
    """Stage 07_report: REPORT.md (claims with computed verdicts, the method x metric tables,
    figures, the preliminary study, seeds and sweeps when they trained on this run's pairs, pairs
    and cut responses, stage times, inferred choices, the resolved config), claims.csv and
    results_table.csv; links results/<run>/report to this folder.
    Returns {"path", "claims", "wide": {task: table}, "inferred", "times"}."""
    import shutil

    from udasa_lib import metrics, pipeline, silhouette
    from udasa_lib.pairs import SUMMARY_FILE
    from udasa_lib.prelim import PRELIM_FILE
    from udasa_lib.io import atomic_write_text

    run_dir = run.run_dir
    resolved = json.loads((run_dir / "config.json").read_text())
    silhouette_ci = pd.read_csv(run.upstream["06_silhouette"] / silhouette.CI_FILE)
    table = pd.concat([metrics.results_table(run_dir), silhouette_rows(silhouette_ci)], ignore_index=True)
    prelim = json.loads((run.upstream["03_pairs"] / PRELIM_FILE).read_text())
    stage_summary = json.loads((run.upstream["03_pairs"] / SUMMARY_FILE).read_text())
    methods = ["base", *dict.fromkeys(v.split("/")[1] for v in pipeline.variants(run.config, "04_train"))]
    wide = {task: metrics.wide_table(table, task, methods) for task in ("alignment", "sentiment")}
    claims = claims_table(table, prelim)
    inferred = inferred_choices_table(resolved["config"])

    figures_dir = run.dir / "figures"
    figures_dir.mkdir(exist_ok=True)
    figures = []
    for name, stage_name in FIGURE_SOURCES.items():
        if (run.upstream[stage_name] / name).exists():
            shutil.copyfile(run.upstream[stage_name] / name, figures_dir / name)
            figures.append(name)
    # Sweeps are their own sets of runs (make sweep), not part of this stage's key: shown, dated, when
    # every point trained on this run's pairs
    sweeps_root, pairs_dir = pipeline.results_root() / "sweeps", run.upstream["03_pairs"]
    frontier = sweeps_root / "sentiment_beta" / "frontier.png"
    frontier_note = "not run (`make sweep SWEEP=configs/sweeps/sentiment_beta.yaml`)"
    if frontier.exists():
        frontier_note = sweep_mismatch(frontier.parent, pairs_dir)
        if frontier_note is None:
            shutil.copyfile(frontier, figures_dir / "frontier.png")
            figures.append("frontier.png")
            frontier_note = (f"from {frontier.parent}, made "
                             f"{pd.Timestamp(frontier.stat().st_mtime, unit='s'):%Y-%m-%d %H:%M} UTC")
    seeds_summary = sweeps_root / "seeds" / "summary.csv"
    spread = pd.DataFrame()
    spread_note = "one seed; `make sweep SWEEP=configs/sweeps/seeds.yaml` trains and evaluates seeds 0-2 on these pairs"
    if seeds_summary.exists():
        spread_note = sweep_mismatch(seeds_summary.parent, pairs_dir)
        if spread_note is None:
            spread = seed_spread(pd.read_csv(seeds_summary))
            spread_note = f"from {seeds_summary.parent} ({spread.seeds.max()} seeds)"
    times = stage_times(run_dir)
    sizes = pd.DataFrame([{"pair set": name, "pairs": s["pairs"], **s["stage_sizes"]} for name, s in stage_summary.items()])
    agreement = pd.DataFrame(prelim["agreement_by_stage"])
    spearman = pd.DataFrame({"combined u": prelim["spearman_u_vs_reward"], **prelim["spearman_by_dimension"]}).T

    manifest_harmless = json.loads((run.upstream["05_eval_harmless"] / "manifest.json").read_text())
    manifest_winrate = json.loads((run.upstream["05_eval_winrate"] / "manifest.json").read_text())
    probe = manifest_harmless["extra"]["harm_probe"]
    judge = manifest_winrate["extra"]["judge"]
    counts = claims.verdict.value_counts().to_dict()
    lines = [
        f"# UDASA / UAL replication report: run `{run.run_id}`", "",
        f"Config `{resolved['config_file']}` with overrides `{json.dumps(resolved['overrides'])}`; policy model "
        f"`{resolved['config']['model']['name_or_path']}`; git commit `{manifest_harmless['git']['commit']}`"
        f"{' (dirty tree)' if manifest_harmless['git']['dirty'] else ''}; seed {resolved['config']['seed']}. "
        f"Sum of stage wall times: {times.wall_time_s.sum() / 60:.1f} min.", "",
        "Verdicts: " + ", ".join(f"{v}: {n}" for v, n in counts.items()) + ". A verdict is `supported` only when the two "
        "95 % intervals are disjoint in the claimed direction; with the CPU default's few dozen prompts per metric most "
        "differences are inside the noise, which is a result, not a failure.", "",
        "## What the papers claim vs what this run shows", "", markdown(claims),
        "## Results", "",
        f"Harm probe (alignment harm scorer) held-out accuracy {probe['accuracy']:.3f}, balanced "
        f"{probe['balanced_accuracy']:.3f}, ROC AUC {probe['roc_auc']:.3f}; it is also the alignment task's value scorer, "
        f"so compliance rates can flatter methods trained on its preferences: read them beside the refusal rates. "
        f"Win-rate judge: `{judge}`"
        f"{' (the base model itself: a weak, position-biased judge; see judge_first_listed_rate)' if judge == resolved['config']['model']['name_or_path'] else ''}.",
        "",
    ]
    for task, frame in wide.items():
        lines += [f"### {task}", "", markdown(frame, index=True)]
    lines += ["## Figures", ""] + [f"![{name}](figures/{name})" for name in figures] + [
        "", f"Beta-sweep frontier: {frontier_note}.", "",
        "## Preliminary study (does self-estimated uncertainty track the ground-truth sentiment reward?)", "",
        markdown(agreement), "", markdown(spearman.reset_index(names="dimension")),
        "## Seeds", "", f"Spread over training seeds (`train.seed`; sampling, pairs and the evaluation seed are "
        f"shared): {spread_note}.", "", markdown(spread),
        "## Pairs and stages", "", markdown(sizes),
        "Responses cut at max_new_tokens (trained without an EOS):", "", markdown(cut_table(stage_summary)),
        "## Stage wall times (this machine)", "", markdown(times),
        "## Inferred choices", "", markdown(inferred),
        "## Resolved config", "", "```yaml", yaml.safe_dump(resolved["config"], sort_keys=False).rstrip(), "```", ""]
    report_path = atomic_write_text(run.dir / REPORT_FILE, "\n".join(lines))
    atomic_write_text(run.dir / CLAIMS_FILE, claims.to_csv(index=False))
    atomic_write_text(run.dir / TABLE_FILE, table.to_csv(index=False))
    pipeline.link(run_dir / "report", run.dir)
    run.add_to_manifest(verdicts=counts, figures=figures)
    return {"path": run_dir / "report" / REPORT_FILE, "claims": claims, "wide": wide, "inferred": inferred,
            "times": times, "report_path": report_path}
