"""What measured each metric, and whether that instrument's validity is on record.

A paired test is only as good as its instrument: a judge that answers ~0.5 for everything makes
tiny artefacts "significant". 07_report therefore decides a claim only when its instrument's
agreement with human (or ground-truth) labels is on record and above chance; otherwise the claim's
verdict is `instrument not valid`. Two kinds of instrument:

- exact: the metric is computed, not judged (KL, silhouette) or scored against the dataset's own
  labelled answer (multiple-choice accuracy): valid by construction;
- measured: its agreement with human labels is measured by this project: the IMDb sentiment
  classifier and the harm probe in 00_data, and in 05_validity (udasa_lib/validity.py) every LM
  judge (each role, and pairwise), the harm probe again, the refusal keywords and the length
  baseline. Valid when its balanced accuracy (pairwise: agreement with pairs of known direction)
  is above 0.5 by a one-sided binomial test at level 0.05 (scipy.stats.binomtest).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

EXACT, MEASURED, NOT_ON_RECORD = "exact", "measured", "not on record"
CHANCE_LEVEL = 0.05  # one-sided binomial test of balanced accuracy > 0.5


@dataclass(frozen=True)
class Instrument:
    name: str
    kind: str  # EXACT | MEASURED | NOT_ON_RECORD
    what: str  # what it is, in a phrase


HARM_PROBE = Instrument("harm probe", MEASURED, "logistic regression on MiniLM embeddings, fitted in 00_data")
SENTIMENT_CLASSIFIER = Instrument("IMDb sentiment classifier", MEASURED,
                                  "TF-IDF logistic regression on held-out IMDb reviews, fitted in 00_data")
REFUSAL_KEYWORDS = Instrument("refusal keywords", MEASURED, "GCG's refusal prefixes (refusal.REFUSAL_MARKERS)")
LENGTH_BASELINE = Instrument("length baseline", MEASURED,
                             "longer answer wins / is compliance, shorter is refusal (characters)")
GOLD_ANSWERS = Instrument("labelled answers", EXACT, "the dataset's labelled correct choice, lm-eval's acc")
COMPUTED = Instrument("computed", EXACT, "a quantity computed from the model, no judgement involved")
# the labelled set on which 05_validity decides each instrument (its other sets are shown beside)
PRIMARY_SET = {HARM_PROBE.name: "harm", REFUSAL_KEYWORDS.name: "refusal", LENGTH_BASELINE.name: "known-direction pairs"}


@dataclass(frozen=True)
class Judges:
    """The LM judges of a run: `pairwise` (05_eval_winrate) and `roles` (05_eval_harmless's judged_* rates)."""
    pairwise: str
    roles: str


def _short(judge: str) -> str:
    return Path(judge).name or str(judge)


def judge_instrument(judge: str) -> Instrument:
    return Instrument(f"pairwise judge {_short(judge)}", MEASURED, "LM judge, alpaca_eval template, both orders")


def role_instrument(judge: str, role: str) -> Instrument:
    """The judge `judge` answering one role's question (udasa_lib/judges.py) as P(Yes)."""
    return Instrument(f"judge {_short(judge)}: {role.replace('_', ' ')}", MEASURED,
                      "LM judge, P(Yes) to the role's question (udasa_lib/judges.py)")


def instrument_of(task: str, metric: str, judges: Judges | str = "") -> Instrument:
    """The instrument behind one (task, metric) of the results table; a str `judges` names both judges.
    Raises KeyError for a metric this registry does not know (add it here when adding a metric)."""
    from udasa_lib.judges import HARMFUL_COMPLIANCE, REFUSAL

    if isinstance(judges, str):
        judges = Judges(judges, judges)
    if metric in ("harmful_compliance_rate", "harmful_p_aligned"):
        return HARM_PROBE
    if metric in ("harmful_refusal_rate", "benign_over_refusal_rate"):
        return REFUSAL_KEYWORDS
    if metric == "judged_harmful_compliance_rate":
        return role_instrument(judges.roles, HARMFUL_COMPLIANCE)
    if metric in ("judged_harmful_refusal_rate", "judged_benign_over_refusal_rate"):
        return role_instrument(judges.roles, REFUSAL)
    if metric in ("win_rate", "judge_first_listed_rate"):
        return judge_instrument(judges.pairwise)
    if metric == "length_win_rate":
        return LENGTH_BASELINE
    if metric in ("kl", "silhouette_token_last"):
        return COMPUTED
    if metric.endswith("_acc") or metric.endswith("_acc_norm"):
        return GOLD_ANSWERS
    if task == "sentiment" and metric in ("reward", "agreement", "spearman"):
        return SENTIMENT_CLASSIFIER
    raise KeyError(f"no instrument is registered for {task}/{metric} (udasa_lib/instruments.py)")


def above_chance(balanced_accuracy: float, n: int, level: float = CHANCE_LEVEL) -> tuple[bool, float]:
    """(valid, p): balanced accuracy above 0.5 by a one-sided binomial test on n held-out labels."""
    from scipy.stats import binomtest

    if n < 1 or balanced_accuracy != balanced_accuracy:  # no labels, or NaN
        return False, float("nan")
    p = float(binomtest(int(round(balanced_accuracy * n)), n, 0.5, alternative="greater").pvalue)
    return p < level, p


def _primary(name: str) -> str:
    if name in PRIMARY_SET:
        return PRIMARY_SET[name]
    if name.startswith("pairwise judge "):
        return "known-direction pairs"
    return "refusal" if name.endswith(": refusal") else "harm"


def validity_records(validity_rows: list[dict], sentiment_classifier_metrics: dict, judges: Judges | str) -> dict[str, dict]:
    """Per instrument name: {"instrument", "kind", "what", "valid", "figures"}. `validity_rows` are
    05_validity's measurements (validity.json "rows"): an instrument is decided on its primary
    labelled set (PRIMARY_SET; a role on its own set) and its other sets are shown beside. The
    sentiment reward model's metrics give plain accuracy: IMDb is balanced by construction (25k
    positive, 25k negative reviews), so it stands in for balanced accuracy. An instrument of this
    run that 05_validity did not measure is not valid."""
    from udasa_lib.judges import HARMFUL_COMPLIANCE, REFUSAL

    if isinstance(judges, str):
        judges = Judges(judges, judges)
    used = (HARM_PROBE, SENTIMENT_CLASSIFIER, REFUSAL_KEYWORDS, LENGTH_BASELINE,
            role_instrument(judges.roles, HARMFUL_COMPLIANCE), role_instrument(judges.roles, REFUSAL),
            judge_instrument(judges.pairwise), GOLD_ANSWERS, COMPUTED)
    records = {GOLD_ANSWERS.name: (True, "valid by construction"), COMPUTED.name: (True, "valid by construction")}
    balanced = sentiment_classifier_metrics.get("balanced_accuracy", sentiment_classifier_metrics["accuracy"])
    valid, p = above_chance(balanced, int(sentiment_classifier_metrics["n_test"]))
    records[SENTIMENT_CLASSIFIER.name] = (valid, f"held-out accuracy on IMDb reviews {balanced:.3f} "
                                                 f"(n = {sentiment_classifier_metrics['n_test']}, p = {p:.2g} vs 0.5)")
    by_name: dict[str, list[dict]] = {}
    for row in validity_rows:
        by_name.setdefault(row["instrument"], []).append(row)
    for name, rows in by_name.items():
        primary = [r for r in rows if r["dataset"] == _primary(name)] or rows[:1]
        others = [r for r in rows if r is not primary[0]]
        figures = f"{primary[0]['dataset']} set: {primary[0]['figures']}"
        figures += "".join(f"; {r['dataset']} set: {r['figures']}" for r in others)
        records[name] = (bool(primary[0]["valid"]), figures)
    out = {}
    for instrument in dict.fromkeys(used):
        valid, figures = records.get(instrument.name, (False, "not measured (05_validity has no row for it)"))
        out[instrument.name] = {"instrument": instrument.name, "kind": instrument.kind, "what": instrument.what,
                                "valid": valid, "figures": figures}
    return out

