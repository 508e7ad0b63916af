"""07_report: collate a run into REPORT.md, with verdicts computed from paired tests.

A claim compares two policies on one metric over the same held-out units (prompts, questions,
responses): the per-unit differences better - than (`metrics.unit_table`), their mean with a
paired bootstrap interval and a sign-flip permutation p-value (`stats.paired_difference`, scipy),
Holm's correction across the table's claims (`stats.holm`). Verdicts:

- `supported` / `contradicted`: Holm-adjusted p < report.alpha, the difference in / against the
  claimed direction;
- `no difference detected`: otherwise, printed with the minimum detectable effect (MDE) at
  report.power for this n and this observed spread, at level alpha / m (Holm's strictest step, so
  an effect of that size is found whatever the other claims do), and the n the claim would need
  to detect the effect of interest of its metric (report.effects);
- `instrument not valid`: the metric's instrument has no validity on record or is at chance
  (`instruments.py`); its numbers are shown but it takes no part in the Holm family;
- `not run`: the run lacks a method or metric.
The preliminary study's two claims (03_pairs) join the same family: the within-prompt Spearman
correlation against 0 (paired over prompts) and conservative against exploratory agreement (two
independent samples of pairs, `stats.independent_difference`).
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import yaml

from udasa_lib import REPO_ROOT
from udasa_lib.config import dotted_get
from udasa_lib.io import display_path

SUPPORTED, CONTRADICTED, NO_DIFFERENCE = "supported", "contradicted", "no difference detected"
INSTRUMENT_NOT_VALID, NOT_RUN = "instrument not valid", "not run"
HIGHER, LOWER = "higher", "lower"  # verdicts of the controls, which claim no direction
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
    # and a third time by the LM judge of eval_harmless.judge (judges.py), decided only where
    # 05_validity finds the judge above chance on human labels
    Claim("UDASA", "UDASA is more harmless than DPO (judged compliance)", "alignment",
          "judged_harmful_compliance_rate", "udasa", "dpo", False),
    Claim("UDASA", "UDASA is more harmless than SFT (judged compliance)", "alignment",
          "judged_harmful_compliance_rate", "udasa", "sft", False),
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
    Claim("UAL", "UAL-DPO is more harmless than DPO (judged compliance)", "alignment",
          "judged_harmful_compliance_rate", "ual_dpo", "dpo", False),
    Claim("UAL", "UAL-SFT is more helpful than SFT (win rate vs base)", "alignment", "win_rate", "ual_sft", "sft", True),
    Claim("UAL", "UAL-SFT tightens token clusters vs SFT (last-layer silhouette per response)", "alignment",
          "silhouette_token_last", "ual_sft", "sft", True),
    Claim("UAL", "UAL-DPO tightens token clusters vs DPO (last-layer silhouette per response)", "alignment",
          "silhouette_token_last", "ual_dpo", "dpo", True),
)

# What the controls say a method must show for its mechanism to matter (docs/method.md, "Controls"):
# tested in their own Holm family, so adding controls does not dilute the papers' claims.
CONTROL_CLAIMS: tuple[Claim, ...] = (
    Claim("control", "DPO on uncertainty pairs beats the same pairs in a random direction", "sentiment", "reward",
          "dpo", "dpo_random", True),
    Claim("control", "UDASA beats the same pairs in a random direction", "sentiment", "reward", "udasa",
          "dpo_random", True),
    Claim("control", "UAL-DPO beats DPO with UAL's mean epsilon on every pair", "sentiment", "reward", "ual_dpo",
          "ual_dpo_const", True),
    Claim("control", "UAL-SFT beats SFT with UAL's mean epsilon on every pair", "sentiment", "reward", "ual_sft",
          "ual_sft_const", True),
    Claim("control", "The ground-truth oracle beats base (the budget can move the reward)", "sentiment", "reward",
          "dpo_oracle", "base", True),
    # DPO on coin-flip directions also moves the reward (a generic effect of training on these
    # samples): only the part of the oracle's gain above this is due to the preference direction
    Claim("control", "The ground-truth oracle beats random directions (the direction matters)", "sentiment", "reward",
          "dpo_oracle", "dpo_random", True),
)
ORACLE = "dpo_oracle"

# The metrics every trained method is compared with base on (the controls table), and which way is better.
CONTROL_METRICS: dict[str, tuple[tuple[str, bool], ...]] = {
    "alignment": (("harmful_compliance_rate", False), ("harmful_refusal_rate", True),
                  ("benign_over_refusal_rate", False), ("judged_harmful_compliance_rate", False),
                  ("judged_harmful_refusal_rate", True), ("judged_benign_over_refusal_rate", False),
                  ("udasa_truthful_mc_acc", True)),
    "sentiment": (("reward", True), ("kl", True)),
}


@dataclass(frozen=True)
class Tested:
    """One claim's numbers before the family-wise correction."""
    n: int
    mean: float  # better - than, metric units
    low: float
    high: float
    p: float  # two-sided, uncorrected
    spread: float  # sd of the per-unit differences (paired) or the standard error (independent)
    paired: bool


def paired_values(units: pd.DataFrame, task: str, metric: str, a: str, b: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-unit values of methods a and b on (task, metric), aligned on the unit id; None when either
    is missing. Raises ValueError when the two were measured on different units."""
    part = units[(units.task == task) & (units.metric == metric)]
    by_method = {m: part[part.method == m].set_index("unit")["value"] for m in (a, b)}
    if any(v.empty for v in by_method.values()):
        return None
    if set(by_method[a].index) != set(by_method[b].index):
        only = sorted(set(by_method[a].index) ^ set(by_method[b].index))[:3]
        raise ValueError(f"{task}/{metric}: {a} and {b} were measured on different units (e.g. {only}); "
                         "a paired comparison needs the same held-out prompts")
    order = sorted(by_method[a].index)
    return by_method[a].loc[order].to_numpy(float), by_method[b].loc[order].to_numpy(float)


def paired_test(values: tuple[np.ndarray, np.ndarray] | None, n_resamples: int, seed: int) -> Tested | None:
    from udasa_lib.stats import paired_difference

    if values is None:
        return None
    a, b = values
    result = paired_difference(a, b, n_resamples=n_resamples, seed=seed)
    return Tested(result["n"], result["mean"], result["low"], result["high"], result["p"], result["sd"], True)


def decide(rows: list[dict], alpha: float, power: float, effects: Mapping[str, float],
           directional: bool = True) -> list[dict]:
    """Holm across the rows whose instrument is valid, then each row's verdict, MDE and n needed.
    Each row: {"tested": Tested | None, "valid": bool, "higher_is_better": bool, "effect_key": str, ...}.
    Adds "p (Holm)", "verdict", "MDE", "n needed", "effect of interest" and "below effect of interest"
    (a detected difference smaller than the metric's effect of interest: a paired test finds tiny
    consistent differences too, which `render` flags beside the verdict); the rest of the row is kept."""
    from udasa_lib.stats import detectable_from_se, holm, minimum_detectable_effect, needed_n

    def testable(tested):  # fewer than two units on a side leaves nothing to test
        return tested is not None and math.isfinite(tested.mean) and math.isfinite(tested.p)

    rows = [{**row, "tested": row["tested"] if testable(row["tested"]) else None} for row in rows]
    family = [i for i, r in enumerate(rows) if r["tested"] is not None and r["valid"]]
    adjusted = dict(zip(family, holm([rows[i]["tested"].p for i in family])))
    level = alpha / max(1, len(family))  # Holm's first step: a difference this large is found in any case
    out = []
    for i, row in enumerate(rows):
        tested, verdict, p_holm, mde, n_needed = row["tested"], NOT_RUN, float("nan"), float("nan"), None
        effect = effects.get(row["effect_key"])
        if tested is not None:
            if tested.paired:
                mde = minimum_detectable_effect(tested.spread, tested.n, level, power)
            else:
                mde = detectable_from_se(tested.spread, level, power)
            if effect and tested.paired and math.isfinite(tested.spread) and tested.spread > 0:
                n_needed = needed_n(tested.spread, effect, level, power)
            elif effect and math.isfinite(mde) and mde > 0:  # se scales as 1 / sqrt(n)
                n_needed = int(math.ceil(tested.n * (mde / effect) ** 2))
            if not row["valid"]:
                verdict = INSTRUMENT_NOT_VALID
            elif i in adjusted:
                p_holm = adjusted[i]
                if p_holm < alpha:
                    in_direction = (tested.mean > 0) == row["higher_is_better"]
                    verdict = (SUPPORTED if in_direction else CONTRADICTED) if directional else \
                        (HIGHER if tested.mean > 0 else LOWER)
                else:
                    verdict = NO_DIFFERENCE
        detected = verdict in (SUPPORTED, CONTRADICTED, HIGHER, LOWER)
        out.append({**row, "p (Holm)": p_holm, "verdict": verdict, "MDE": mde, "n needed": n_needed,
                    "effect of interest": effect,
                    "below effect of interest": bool(detected and effect and abs(tested.mean) < effect)})
    return out


def _number(x: float, digits: int = 3, sign: str = "") -> str:
    """Fixed digits, or two significant ones where fixed digits would print a nonzero value as 0."""
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:{sign}.1e}" if 0 < abs(x) < 0.5 * 10 ** -digits else f"{x:{sign}.{digits}f}"


def _p_text(p: float) -> str:
    return "-" if not math.isfinite(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")


def render(rows: list[dict], label: str = "claim") -> pd.DataFrame:
    """The decided rows as the report's table: effect, paired interval, p, Holm p, verdict, MDE, n."""
    table = []
    for row in rows:
        tested = row["tested"]
        digits = 1 if row["effect_key"].endswith("win_rate") else 3
        table.append({
            **({"paper": row["paper"]} if "paper" in row else {}),
            label: row["text"], "metric": row["metric_label"], "instrument": row["instrument"],
            "n": tested.n if tested else "-",
            "difference [95 % CI]": "-" if tested is None else
            f"{_number(tested.mean, digits, '+')} [{_number(tested.low, digits, '+')}, "
            f"{_number(tested.high, digits, '+')}]",
            "p": _p_text(tested.p) if tested else "-", "p (Holm)": _p_text(row["p (Holm)"]),
            "verdict": row["verdict"] + (f" (smaller than the {row['effect of interest']:g} of interest)"
                                         if row.get("below effect of interest") else ""),
            "MDE": _number(row["MDE"], digits),
            "n needed": row["n needed"] if row["n needed"] is not None else "-",
        })
    return pd.DataFrame(table)


def metric_instruments(metrics: Sequence[str], task: str, judges, validity: Mapping[str, dict]) -> pd.DataFrame:
    """Per metric of a task: the instrument that produced it, whether it is valid, and its figures
    (instruments.validity_records), so that no number is read without its instrument's validity."""
    from udasa_lib.instruments import instrument_of

    rows = []
    for metric in metrics:
        instrument = instrument_of(task, metric, judges)
        record = validity[instrument.name]
        rows.append({"metric": metric, "instrument": instrument.name, "valid": "yes" if record["valid"] else "no",
                     "agreement with labels": record["figures"]})
    return pd.DataFrame(rows)


def claim_rows(units: pd.DataFrame, validity: Mapping[str, dict], judge: str, n_resamples: int,
               seed: int, claims: Sequence[Claim] = CLAIMS) -> list[dict]:
    """Undecided rows (see `decide`) of the papers' claims on this run's per-unit values."""
    from udasa_lib.instruments import instrument_of

    rows = []
    for claim in claims:
        instrument = instrument_of(claim.task, claim.metric, judge)
        tested = paired_test(paired_values(units, claim.task, claim.metric, claim.better, claim.than), n_resamples, seed)
        rows.append({"paper": claim.paper, "text": claim.text, "metric_label": f"{claim.task}/{claim.metric} "
                     f"({claim.better} - {claim.than}, {'higher' if claim.higher_is_better else 'lower'} claimed)",
                     "instrument": instrument.name, "valid": validity[instrument.name]["valid"], "tested": tested,
                     "higher_is_better": claim.higher_is_better, "effect_key": claim.metric})
    return rows


def prelim_rows(prelim: Mapping[str, Any] | None, validity: Mapping[str, dict]) -> list[dict]:
    """Undecided rows of the preliminary study's two claims, from 03_pairs's prelim.json."""
    from udasa_lib.instruments import instrument_of

    if not prelim:
        return []
    instrument = instrument_of("sentiment", "agreement")
    valid = validity[instrument.name]["valid"]
    rows = []
    spearman = prelim.get("spearman_within_prompt")
    if spearman:
        tested = Tested(spearman["n"], spearman["mean"], spearman["low"], spearman["high"], spearman["p"],
                        spearman["sd"], True)
        rows.append({"paper": "UDASA", "text": "Self-estimated uncertainty is lower for better responses "
                     "(mean within-prompt Spearman(u, reward) < 0)", "metric_label": "sentiment/prelim spearman (vs 0)",
                     "instrument": instrument.name, "valid": valid, "tested": tested, "higher_is_better": False,
                     "effect_key": "spearman"})
    agreement = prelim.get("agreement_difference")
    if agreement:
        first, second = agreement["stages"]
        tested = Tested(agreement["n"], agreement["mean"], agreement["low"], agreement["high"], agreement["p"],
                        agreement["se"], False)
        rows.append({"paper": "UDASA", "text": "Pairs with a larger uncertainty gap are more often right "
                     f"(ground-truth agreement, {first} > {second})",
                     "metric_label": f"sentiment/prelim agreement ({first} - {second}, independent pairs)",
                     "instrument": instrument.name, "valid": valid, "tested": tested, "higher_is_better": True,
                     "effect_key": "agreement"})
    return rows


def control_rows(units: pd.DataFrame, methods: Mapping[str, Sequence[str]], validity: Mapping[str, dict],
                 judge: str, n_resamples: int, seed: int) -> list[dict]:
    """Undecided rows of every trained method against base on CONTROL_METRICS (no claimed direction)."""
    from udasa_lib.instruments import instrument_of

    rows = []
    for task, task_methods in methods.items():
        for metric, higher_is_better in CONTROL_METRICS.get(task, ()):
            instrument = instrument_of(task, metric, judge)
            for method in task_methods:
                tested = paired_test(paired_values(units, task, metric, method, "base"), n_resamples, seed)
                if tested is None:
                    continue
                rows.append({"text": f"{method} vs base", "metric_label": f"{task}/{metric}",
                             "instrument": instrument.name, "valid": validity[instrument.name]["valid"],
                             "tested": tested, "higher_is_better": higher_is_better, "effect_key": metric})
    return rows


def oracle_gain_fraction(units: pd.DataFrame, task: str, metric: str, method: str, n_resamples: int,
                         seed: int, oracle: str = ORACLE) -> dict | None:
    """mean(method - base) / mean(oracle - base) over the same units: the share of the positive
    control's gain over base a method reaches (1 = as much as learning from the ground truth), with a
    95 % percentile bootstrap interval resampling units jointly (scipy.stats.bootstrap, paired).
    None when a policy is missing; the interval is NaN when the oracle's gain is not positive in
    every resample's mean, where the ratio has no meaning."""
    from scipy.stats import bootstrap

    gains = [paired_values(units, task, metric, m, "base") for m in (method, oracle)]
    if any(g is None for g in gains):
        return None
    method_gain, oracle_gain = (a - b for a, b in gains)

    def ratio(m, o, axis=-1):
        return np.mean(m, axis=axis) / np.mean(o, axis=axis)

    point = float(ratio(method_gain, oracle_gain)) if oracle_gain.mean() > 0 else float("nan")
    low = high = float("nan")
    if oracle_gain.mean() > 0 and len(oracle_gain) > 1:
        result = bootstrap((method_gain, oracle_gain), ratio, paired=True, vectorized=True, n_resamples=n_resamples,
                           method="percentile", rng=np.random.default_rng(seed))
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return {"method": method, "n": int(len(method_gain)), "gain over base": float(method_gain.mean()),
            "oracle gain over base": float(oracle_gain.mean()), "fraction of oracle gain": point,
            "ci_low": low, "ci_high": high}


def oracle_table(units: pd.DataFrame, methods: Sequence[str], n_resamples: int, seed: int,
                 task: str = "sentiment", metric: str = "reward") -> pd.DataFrame:
    """`oracle_gain_fraction` of every trained method of `task` but the oracle itself."""
    rows = [oracle_gain_fraction(units, task, metric, m, n_resamples, seed) for m in methods if m != ORACLE]
    return pd.DataFrame([r for r in rows if r is not None])


def pooled_units(unit_tables: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Per-unit values pooled over runs (seeds): each unit's mean over the runs that measured it.
    The seeds share their prompts and evaluation seeds, so (prompt x seed) values of one prompt are
    not independent; averaging them first keeps the prompt the unit of resampling, and the paired
    difference of the means is the mean over seeds of the paired differences."""
    from udasa_lib.metrics import UNIT_FIELDS

    if not unit_tables:
        return pd.DataFrame(columns=list(UNIT_FIELDS))
    both = pd.concat(list(unit_tables), ignore_index=True)
    return both.groupby(["task", "method", "metric", "unit"], sort=False, as_index=False)["value"].mean()


def silhouette_rows(ci_table: pd.DataFrame) -> pd.DataFrame:
    """06_silhouette's last-layer token view as metric rows of the results table's shape."""
    part = ci_table[ci_table.view == "token"]
    return pd.DataFrame({"task": "alignment", "method": part["method"], "metric": "silhouette_token_last",
                         "value": part["silhouette"], "ci_low": part["ci_low"], "ci_high": part["ci_high"],
                         "n": part["n_responses"], "stage": "06_silhouette"})


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
CONTROLS_FILE = "controls.csv"
CONTROL_CLAIMS_FILE = "control_claims.csv"
ORACLE_FILE = "oracle_fraction.csv"
TABLE_FILE = "results_table.csv"
FIGURE_SOURCES = {  # figure -> the upstream stage that draws it
    "harmless.png": "05_eval_harmless", "winrate.png": "05_eval_winrate", "lmeval.png": "05_eval_lmeval",
    "reward_kl.png": "05_eval_sentiment", "silhouette_layers.png": "06_silhouette", "projection.png": "06_silhouette",
    "validity.png": "05_validity",
}


def write_report(run) -> dict:
    """Stage 07_report: REPORT.md laid out as a results section (the claims with paired tests and
    verdicts; the instruments and their validity; every method against base; the preliminary
    study; seeds pooled when a seeds sweep trained on this run's pairs; then the method x metric
    tables, figures, pairs, inferred choices and the resolved config), claims.csv,
    controls.csv and results_table.csv; links results/<run>/report to this folder. Every file it
    writes is the same bytes in any clone and on any rerun: the machine's facts (git state, stage
    wall times, judge speed, when a sweep was made) are returned for the notebook to show instead.
    Returns {"path", "claims", "controls", "pooled", "wide": {task: table}, "inferred", "times",
    "validity", "cost_speed", "provenance"}."""
    import shutil

    from udasa_lib import diagnostics, metrics, pipeline, silhouette
    from udasa_lib.instruments import Judges
    from udasa_lib.validity import VALIDITY_FILE, read_validity
    from udasa_lib.pairs import SUMMARY_FILE, pair_set_table
    from udasa_lib.prelim import PRELIM_FILE
    from udasa_lib.io import atomic_write_text

    run_dir, cfg = run.run_dir, run.config
    settings = cfg.report
    resolved = json.loads((run_dir / "config.json").read_text())
    silhouette_ci = pd.read_csv(run.upstream["06_silhouette"] / silhouette.CI_FILE)
    table = pd.concat([metrics.results_table(run_dir), silhouette_rows(silhouette_ci)], ignore_index=True)
    unit_stages = (*pipeline.EVAL_STAGES, "06_silhouette")  # every stage that writes units.jsonl
    units = metrics.unit_table(run_dir, unit_stages)
    prelim = json.loads((run.upstream["03_pairs"] / PRELIM_FILE).read_text())
    stage_summary = json.loads((run.upstream["03_pairs"] / SUMMARY_FILE).read_text())
    signal = json.loads((run.upstream["03_pairs"] / diagnostics.DIAGNOSTICS_FILE).read_text())
    trained = {task: list(dict.fromkeys(v.split("/")[1] for v in pipeline.variants(cfg, "04_train")
                                        if v.startswith(f"{task}/")))
               for task in ("alignment", "sentiment")}
    methods = ["base", *dict.fromkeys(m for ms in trained.values() for m in ms)]
    wide = {task: metrics.wide_table(table, task, methods) for task in ("alignment", "sentiment")}
    manifest_harmless = json.loads((run.upstream["05_eval_harmless"] / "manifest.json").read_text())
    manifest_winrate = json.loads((run.upstream["05_eval_winrate"] / "manifest.json").read_text())
    manifest_sentiment = json.loads((run.upstream["05_eval_sentiment"] / "manifest.json").read_text())
    judge = Judges(manifest_winrate["extra"]["judge"], manifest_harmless["extra"]["judge"])
    validity = read_validity(run.upstream["05_validity"], manifest_sentiment["extra"]["reward_model"], judge)

    def decided(rows, directional=True):
        return decide(rows, settings.alpha, settings.power, settings.effects, directional)

    n_resamples, seed = cfg.bootstrap_samples, cfg.seed
    claim_results = decided(claim_rows(units, validity, judge, n_resamples, seed) + prelim_rows(prelim, validity))
    control_results = decided(control_rows(units, trained, validity, judge, n_resamples, seed), directional=False)
    claims, controls = render(claim_results), render(control_results, label="comparison")
    against_controls = render(decided(claim_rows(units, validity, judge, n_resamples, seed, CONTROL_CLAIMS)))
    oracle = oracle_table(units, trained.get("sentiment", []), n_resamples, seed)
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
    sweeps_made: dict[str, str] = {}  # when each sweep shown was made: for the manifest, not the report
    frontier = sweeps_root / "sentiment_beta" / "frontier.png"
    frontier_note = "not run (`make sweep SWEEP=configs/sweeps/sentiment_beta.yaml`)"
    if frontier.exists():
        frontier_note = sweep_mismatch(frontier.parent, pairs_dir)
        if frontier_note is None:
            shutil.copyfile(frontier, figures_dir / "frontier.png")
            figures.append("frontier.png")
            frontier_note = f"from `{display_path(frontier.parent, pipeline.results_root())}`"
            sweeps_made["sentiment_beta"] = f"{pd.Timestamp(frontier.stat().st_mtime, unit='s'):%Y-%m-%d %H:%M} UTC"
    seeds_dir = sweeps_root / "seeds"
    spread, pooled = pd.DataFrame(), pd.DataFrame()
    spread_note = "one seed; `make sweep SWEEP=configs/sweeps/seeds.yaml` trains and evaluates seeds 0-2 on these pairs"
    if (seeds_dir / "summary.csv").exists():
        spread_note = sweep_mismatch(seeds_dir, pairs_dir)
        if spread_note is None:
            spread = seed_spread(pd.read_csv(seeds_dir / "summary.csv"))
            points = json.loads((seeds_dir / "points.json").read_text())
            pooled_table = pooled_units([metrics.unit_table(Path(p["run_dir"]), unit_stages) for p in points])
            pooled = render(decided(claim_rows(pooled_table, validity, judge, n_resamples, seed)))
            spread_note = f"from `{display_path(seeds_dir, pipeline.results_root())}` ({len(points)} seeds)"
            sweeps_made["seeds"] = f"{pd.Timestamp((seeds_dir / 'summary.csv').stat().st_mtime, unit='s'):%Y-%m-%d %H:%M} UTC"
    times = stage_times(run_dir)
    sizes = pair_set_table(stage_summary)
    agreement = pd.DataFrame(prelim["agreement_by_stage"])
    spearman = pd.DataFrame({"combined u": prelim["spearman_u_vs_reward"], **prelim["spearman_by_dimension"]}).T
    validity_table = pd.DataFrame([{k: v for k, v in record.items()} for record in validity.values()])
    measured_json = json.loads((run.upstream["05_validity"] / VALIDITY_FILE).read_text())
    measured = pd.DataFrame([{"labelled set": r["dataset"], "instrument": r["instrument"],
                              "valid": "yes" if r["valid"] else "no", "figures": r["figures"]}
                             for r in measured_json["rows"]])
    # judgments per second are this machine's wall clock: 05_validity's manifest and 07_report.html show them
    cost = pd.DataFrame([{"judge, role": name, "dtype": c.get("dtype", ""), "judgments": c["judgments"]}
                         for name, c in measured_json["cost"].items()])
    speed = json.loads((run.upstream["05_validity"] / "manifest.json").read_text()).get("extra", {}).get("cost", {})
    cost_speed = pd.DataFrame([{"judge, role": name, "judgments/s": round(c["judgments_per_second"], 3)}
                               for name, c in speed.items() if "judgments_per_second" in c])
    counts = dict(Counter(r["verdict"] for r in claim_results))
    family = sum(math.isfinite(r["p (Holm)"]) for r in claim_results)
    lines = [
        f"# UDASA / UAL replication report: run `{run.run_id}`", "",
        # Byte-identical in every clone and on every rerun: no absolute path, no git state, no wall
        # times here (each stage's manifest.json has them, and 07_report.html shows them).
        f"Config `{display_path(resolved['config_file'])}` with overrides `{json.dumps(resolved['overrides'], sort_keys=True)}`; "
        f"policy model `{resolved['config']['model']['name_or_path']}`; seed {resolved['config']['seed']}. "
        "The code's git commit and each stage's wall time are in the stage manifests and in 07_report.html.", "",
        "## Results: the papers' claims, tested", "",
        "Verdicts: " + ", ".join(f"{v}: {n}" for v, n in counts.items()) + ". Each claim compares two policies on the "
        "same held-out units (prompts, questions or responses; sampled evaluations draw sample j of prompt i with the "
        "same seed under every policy): `difference` is the mean per-unit difference (first method minus second) with "
        "its 95 % paired bootstrap interval, `p` a two-sided paired permutation (sign-flip) p-value, `p (Holm)` "
        f"Holm's correction over the {family} claims whose instrument is valid, at family-wise alpha = "
        f"{settings.alpha}. `no difference detected` is not `no difference`: `MDE` is the smallest true difference "
        f"this run would have detected with {settings.power:.0%} power (at alpha / {max(family, 1)}, Holm's strictest "
        "step), and `n needed` the units a paired test needs for the effect of interest of its metric "
        f"({', '.join(f'{k} {v:g}' for k, v in settings.effects.items())}); `-` where every paired difference was 0 "
        "(no spread to plan from). A claim measured by an instrument whose validity is not on record reads "
        "`instrument not valid` and takes no part in the correction. The intervals are 95 % ones, not adjusted: "
        "one can exclude 0 while Holm's p does not pass. Prompts are resampled and the trained policies held fixed, "
        "so a verdict is about these trained checkpoints (one training seed unless pooled below), not about "
        "every training of the method."
        + (f" With {n_resamples} permutations the smallest p is {2 / (n_resamples + 1):.1e}, which Holm multiplies "
           f"by {family}: raise `bootstrap_samples` for any claim to pass."
           if family * 2 / (n_resamples + 1) >= settings.alpha else ""), "",
        markdown(claims),
        "## Against the controls", "",
        "The controls of `udasa_lib/methods.py` on the sentiment task, where the ground truth exists, as directional "
        "claims in their own Holm family: `dpo_oracle` learns from pairs the ground-truth reward labels (best vs worst "
        "of the same K samples, DPO App. C), so it bounds what self-labelling can reach at this training budget; "
        "`dpo_random` trains on the combined pairs with each direction a seeded coin flip, so a method that does "
        "not beat it gains nothing from the uncertainty's direction; `ual_*_const` give every pair UAL's mean "
        "epsilon, so UAL must beat them for the smoothing to be uncertainty-aware rather than just smoothing. "
        "Read the oracle's row first: if it does not beat base, nothing in this run could have moved.", "",
        markdown(against_controls),
        "Share of the oracle's gain over base each method reaches (`mean(method - base) / mean(oracle - base)` "
        "over the same prompts, 95 % paired bootstrap interval; 1 = as much as learning from the ground truth, "
        "0 = none, below 0 = worse than base):", "",
        markdown(oracle.round(3)),
    ]
    if not pooled.empty:
        lines += ["### Pooled over training seeds", "",
                  f"The same claims over the seeds sweep ({spread_note}): each unit's value is its mean over seeds "
                  "(the seeds share prompts and evaluation draws, so the prompt stays the unit). Averaging over seeds "
                  "narrows what varies between trainings rather than testing against it: read it beside the seed "
                  "spread below.", "", markdown(pooled)]
    lines += [
        "## Instruments", "",
        "What measured each metric, and its agreement with human or ground-truth labels, measured in 05_validity "
        "(`udasa_lib/validity.py`: pyrit's human-graded harm responses, its refusal-labelled responses, and pairs of "
        "known direction built from them) and in 00_data (the sentiment classifier). A claim whose instrument is not "
        "above chance reads `instrument not valid`. The harm probe is also the alignment task's value scorer, so "
        "its compliance rates can flatter methods trained on its preferences: read them beside the judged rates and "
        "the refusal rates.", "", markdown(validity_table), "",
        "Everything 05_validity measured, per labelled set (also the judges this run did not use, such as the "
        "policy's base model judging itself), and how many judgments each judge made (their speed on this "
        "machine: 05_validity's manifest, 07_report.html):", "", markdown(measured),
        "", markdown(cost), "",
        "## Controls: every trained method against base", "",
        "The same paired machinery, one Holm family; `higher` / `lower` say which way the method moved from base "
        "(no direction is claimed). A method that does not differ from base cannot differ from another for the "
        "reason the papers give.", "", markdown(controls),
        "## Pool coverage and signal diagnostics", "",
        "What the sampled pool and the uncertainty signals can teach before any training (03_pairs, "
        "`udasa_lib/diagnostics.py`): a pool without refusals cannot teach refusal however the pairs are chosen; "
        "a dimension constant within every prompt adds nothing to u. How the gap relates to the ground truth "
        "per stage is the preliminary study's agreement table below.", "",
        *diagnostics.render_diagnostics(signal), "",
        "## Preliminary study (does self-estimated uncertainty track the ground-truth sentiment reward?)", "",
        "Its two claims are tested in the table above; the per-stage agreement and the pooled Spearman "
        "correlations (95 % cluster-bootstrap intervals over prompts) are:", "",
        markdown(agreement), "", markdown(spearman.reset_index(names="dimension")),
        "## Seeds", "", f"Spread over training seeds (`train.seed`; sampling, pairs and the evaluation seed are "
        f"shared): {spread_note}.", "", markdown(spread),
        "## Details: every policy and metric", "",
        "Per-policy values with 95 % bootstrap intervals over units (win rates in %). The silhouette row is the "
        "token-weighted score with a cluster-bootstrap interval over responses; its claims above pair per-response "
        "means.", "",
    ]
    for task, frame in wide.items():
        lines += [f"### {task}", "", markdown(frame, index=True), "",
                  f"The instrument of each {task} metric and its agreement with human or ground-truth labels:", "",
                  markdown(metric_instruments(frame.columns, task, judge, validity))]
    lines += ["## Figures", ""] + [f"![{name}](figures/{name})" for name in figures] + [
        "", f"Beta-sweep frontier: {frontier_note}.", "",
        "## Pairs and stages", "", markdown(sizes),
        "Responses cut at max_new_tokens (trained without an EOS):", "", markdown(cut_table(stage_summary)),
        "## Inferred choices", "", markdown(inferred),
        "## Resolved config", "", "```yaml", yaml.safe_dump(resolved["config"], sort_keys=False).rstrip(), "```", ""]
    report_path = atomic_write_text(run.dir / REPORT_FILE, "\n".join(lines))
    atomic_write_text(run.dir / CLAIMS_FILE, claims.to_csv(index=False))
    atomic_write_text(run.dir / CONTROLS_FILE, controls.to_csv(index=False))
    atomic_write_text(run.dir / CONTROL_CLAIMS_FILE, against_controls.to_csv(index=False))
    atomic_write_text(run.dir / ORACLE_FILE, oracle.to_csv(index=False))
    atomic_write_text(run.dir / TABLE_FILE, table.to_csv(index=False))
    pipeline.link(run_dir / "report", run.home)  # not run.dir: under --force that is the staging folder
    run.add_to_manifest(verdicts=counts, figures=figures, sweeps_made=sweeps_made)
    provenance = {"git": manifest_harmless["git"], "config_file": resolved["config_file"],
                  "stage_wall_time_min": round(float(times.wall_time_s.sum()) / 60, 1) if not times.empty else 0.0,
                  "sweeps_made": sweeps_made}
    return {"path": run_dir / "report" / REPORT_FILE, "claims": claims, "controls": controls, "pooled": pooled,
            "against_controls": against_controls, "oracle": oracle,
            "wide": wide, "inferred": inferred, "times": times, "validity": validity_table,
            "cost_speed": cost_speed, "provenance": provenance, "report_path": report_path}
