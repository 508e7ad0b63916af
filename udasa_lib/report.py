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
from udasa_lib.evaluate import interval_text

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


# What the abstracts claim, each made testable on this project's metrics (method.md).
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


def _dotted(config: dict, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = node[part]
    return node


def inferred_choices_table(config: dict, path: Path = INFERRED_CHOICES_FILE) -> pd.DataFrame:
    entries = yaml.safe_load(Path(path).read_text())
    rows = []
    for index, entry in enumerate(entries):
        missing = {"choice", "keys", "why"} - set(entry)
        if missing:
            raise ValueError(f"{path}: entry {index} lacks {sorted(missing)}")
        for key in entry["keys"]:
            try:
                value = _dotted(config, key)
            except (KeyError, TypeError):
                raise ValueError(f"{path}: entry {index} ({entry['choice']}): {key!r} is not a config key") from None
            rows.append({"choice": entry["choice"], "knob": key, "value": json.dumps(value), "why": entry["why"]})
    return pd.DataFrame(rows)


def sweep_mismatch(sweep_dir: Path, pairs_dir: Path) -> str | None:
    """Why a sweep's results do not belong in this run's report, or None when every point trained
    on this run's pairs (the same 03_stage folder), i.e. the sweep varied this run's training."""
    points = json.loads((Path(sweep_dir) / "points.json").read_text())
    pairs = {(Path(p["run_dir"]) / "03_stage").resolve() for p in points}
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
    """Per task: responses and pairs cut at max_new_tokens (03_stage summary, combined pair set).
    A cut response is trained without an EOS; `stage.truncated` decides whether it may enter a pair."""
    cut = stage_summary["combined"].get("cut", {})
    return pd.DataFrame([{"task": task, "stage.truncated": c["policy"], "responses": c["responses"],
                          "cut": c["responses_cut"], "cut share": c["responses_cut_share"], "pairs": c["pairs"],
                          "chosen cut": c["pairs_chosen_cut"], "rejected cut": c["pairs_rejected_cut"],
                          "pairs dropped (truncated)": stage_summary["combined"]["dropped"].get("truncated", 0)}
                         for task, c in cut.items()])
