"""What measured each metric, and whether that instrument's validity is on record.

A paired test is only as good as its instrument: a judge that answers ~0.5 for everything makes
tiny artefacts "significant". 07_report therefore decides a claim only when its instrument's
agreement with human (or ground-truth) labels is on record and above chance; otherwise the claim's
verdict is `instrument not valid`. Three kinds of instrument:

- exact: the metric is computed, not judged (KL, silhouette) or scored against the dataset's own
  labelled answer (multiple-choice accuracy): valid by construction;
- measured: a classifier whose held-out accuracy against human labels was measured by this
  project (the harm probe on human-graded responses, the IMDb sentiment classifier); valid when its
  balanced accuracy is above 0.5 by a one-sided binomial test at level 0.05 (scipy.stats.binomtest);
- not on record: the refusal keywords (GCG's test_prefixes) and the local pairwise judge, whose
  agreement with human labels this project has not measured yet.
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
REFUSAL_KEYWORDS = Instrument("refusal keywords", NOT_ON_RECORD, "GCG's refusal prefixes (refusal.REFUSAL_MARKERS)")
GOLD_ANSWERS = Instrument("labelled answers", EXACT, "the dataset's labelled correct choice, lm-eval's acc")
COMPUTED = Instrument("computed", EXACT, "a quantity computed from the model, no judgement involved")


def judge_instrument(judge: str) -> Instrument:
    return Instrument(f"pairwise judge {judge}", NOT_ON_RECORD, "local LM judge, alpaca_eval template, both orders")


def instrument_of(task: str, metric: str, judge: str = "") -> Instrument:
    """The instrument behind one (task, metric) of the results table.
    Raises KeyError for a metric this registry does not know (add it here when adding a metric)."""
    if metric in ("harmful_compliance_rate", "harmful_p_aligned"):
        return HARM_PROBE
    if metric in ("harmful_refusal_rate", "benign_over_refusal_rate"):
        return REFUSAL_KEYWORDS
    if metric in ("win_rate", "judge_first_listed_rate"):
        return judge_instrument(judge)
    if metric == "length_win_rate" or metric in ("kl", "silhouette_token_last"):
        return COMPUTED
    if metric.endswith("_acc") or metric.endswith("_acc_norm"):
        return GOLD_ANSWERS
    if task == "sentiment" and metric in ("reward", "agreement", "spearman"):
        return SENTIMENT_CLASSIFIER
    raise KeyError(f"no instrument is registered for {task}/{metric} (udasa_lib/instruments.py)")


def above_chance(balanced_accuracy: float, n: int, level: float = CHANCE_LEVEL) -> tuple[bool, float]:
    """(valid, p): balanced accuracy above 0.5 by a one-sided binomial test on n held-out labels."""
    from scipy.stats import binomtest

    if n < 1:
        return False, float("nan")
    p = float(binomtest(int(round(balanced_accuracy * n)), n, 0.5, alternative="greater").pvalue)
    return p < level, p


def validity_records(harm_probe_metrics: dict, sentiment_classifier_metrics: dict, judge: str) -> dict[str, dict]:
    """Per instrument name: {"instrument", "kind", "what", "valid", "figures"} from the measurements
    00_data made (harm_probe_metrics.json; the sentiment reward model's metrics, which give plain
    accuracy: IMDb is balanced by construction, 25k positive and 25k negative reviews, so it stands
    in for balanced accuracy)."""
    judge_ = judge_instrument(judge)
    records = {REFUSAL_KEYWORDS: (False, "agreement with human refusal labels not measured"),
               judge_: (False, "agreement with human preferences not measured"),
               GOLD_ANSWERS: (True, "valid by construction"), COMPUTED: (True, "valid by construction")}
    for instrument, measured in ((HARM_PROBE, harm_probe_metrics), (SENTIMENT_CLASSIFIER, sentiment_classifier_metrics)):
        balanced = measured.get("balanced_accuracy", measured["accuracy"])
        valid, p = above_chance(balanced, int(measured["n_test"]))
        figures = f"held-out balanced accuracy {balanced:.3f} (n = {measured['n_test']}, p = {p:.2g} vs 0.5)"
        if "roc_auc" in measured:
            figures += f", ROC AUC {measured['roc_auc']:.3f}"
        records[instrument] = (valid, figures)
    order = (HARM_PROBE, SENTIMENT_CLASSIFIER, REFUSAL_KEYWORDS, judge_, GOLD_ANSWERS, COMPUTED)
    return {i.name: {"instrument": i.name, "kind": i.kind, "what": i.what, "valid": records[i][0],
                     "figures": records[i][1]} for i in order}


def read_validity(data_dir: Path, sentiment_classifier_metrics: dict, judge: str) -> dict[str, dict]:
    """validity_records from 00_data's harm_probe_metrics.json."""
    import json

    from udasa_lib.value_probe import HARM_PROBE_METRICS

    return validity_records(json.loads((Path(data_dir) / HARM_PROBE_METRICS).read_text()),
                            sentiment_classifier_metrics, judge)
