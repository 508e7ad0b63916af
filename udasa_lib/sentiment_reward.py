"""Ground-truth reward of the controlled-sentiment task: P(positive) of a sentiment classifier.

DPO (Rafailov et al. 2023, App. C) scores a continuation of an IMDb prefix with a pretrained
sentiment classifier. No transformer sentiment classifier is available offline, so ours is
TF-IDF (word 1-2 grams, sublinear tf, min_df=2) + logistic regression (C=10), fitted in 00_data
on the `sentiment_classifier` split only: whole IMDb reviews disjoint from every review a prompt
prefix was cut from. Its accuracy is measured on a seeded stratified held-out part of that
reserve, never on prompt reviews.

This classifier is the EVALUATOR. It must never score, filter, pair or select training data:
a policy trained on pairs chosen by the evaluator would be graded by its own teacher
(evaluator leakage). Only 00_data (fit), the preliminary study (udasa_lib.prelim) and the
evaluation stages may import this module; scoring and pairing use their own value scorers
(tests/test_score_math.py checks that score, value_probe and stage do not import it).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from udasa_lib.io import atomic_write_with

FORMAT = "udasa-sentiment-reward/1"  # bumped if the saved payload changes shape


class SentimentReward:
    """A fitted TF-IDF + logistic-regression pipeline; `.reward` gives P(positive) per text.

    The DPO paper leaves open whether the reward is the classifier's positive-class
    probability or its logit; we use the probability, so rewards are bounded in [0, 1] and
    comparable across classifiers and runs (the logit is recoverable as log(p / (1 - p))).
    """

    def __init__(self, pipeline, metrics: dict | None = None):
        self.pipeline = pipeline
        self.metrics = dict(metrics or {})
        classes = list(getattr(pipeline, "classes_", []))
        if 1 not in classes:
            raise ValueError(f"sentiment classifier has classes {classes}; expected the positive label 1")
        # predict_proba's columns follow classes_, not the label values.
        self._positive_column = classes.index(1)

    def reward(self, texts: Sequence[str]) -> np.ndarray:
        """P(positive) of each text, float64 in [0, 1], in input order."""
        if isinstance(texts, str):
            raise TypeError("reward() takes a list of texts, got a single str")
        texts = list(texts)
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"reward(): text {index} is {type(text).__name__}, expected str")
        if not texts:
            return np.zeros(0, dtype=np.float64)
        return self.pipeline.predict_proba(texts)[:, self._positive_column].astype(np.float64)

    def save(self, path: Path | str) -> Path:
        """joblib-dump to a temp file beside `path`, then os.replace: never a half-written model."""
        import joblib
        import sklearn

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Same data, same seed -> the same bytes, or every downstream stage key would change on a
        # refit: timings stay out of the file, and so does TF-IDF's _stop_words_id (the id() of
        # its stop-word list, a per-process memory address used only to cache a warning check).
        for step in getattr(self.pipeline, "named_steps", {}).values():
            if hasattr(step, "_stop_words_id"):
                del step._stop_words_id
        stable_metrics = {k: v for k, v in (self.metrics or {}).items() if not k.endswith("seconds")}
        payload = {"format": FORMAT, "pipeline": self.pipeline, "metrics": stable_metrics,
                   "sklearn_version": sklearn.__version__}
        atomic_write_with(path, lambda handle: joblib.dump(payload, handle), binary=True)
        return path

    @classmethod
    def load(cls, path: Path | str) -> "SentimentReward":
        """Load a model written by `save` (a pickle: only load files this project wrote)."""
        import joblib

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no sentiment reward model (has 00_data run?)")
        payload = joblib.load(path)
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
            raise ValueError(f"{path}: not a sentiment reward model of format {FORMAT!r} (found {found!r})")
        return cls(payload["pipeline"], payload.get("metrics"))


def _check_reviews(reviews: Sequence[dict]) -> None:
    for index, review in enumerate(reviews):
        if not isinstance(review, dict):
            raise ValueError(f"review {index}: expected a dict, got {type(review).__name__}")
        text = review.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"review {index} (id {review.get('id')!r}): missing or empty 'text'")
        label = review.get("label")
        # bool is an int subclass; True is not a label.
        if isinstance(label, bool) or label not in (0, 1):
            raise ValueError(f"review {index} (id {review.get('id')!r}): label {label!r} not in {{0, 1}}")


def build_pipeline(seed: int = 0):
    """The unfitted classifier: word 1-2 gram TF-IDF with sublinear tf, then logistic regression (C=10)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2, strip_accents="unicode"),
        # C=10: 5-fold CV on the training part of the default 10k reserve (seed 0) gave 0.873,
        # 0.884, 0.887, 0.887 for C = 1, 3, 10, 30; chosen without looking at the held-out part.
        # lbfgs is deterministic; random_state only matters for other solvers but pins it anyway.
        LogisticRegression(C=10.0, max_iter=1000, random_state=seed),
    )


def fit_sentiment_reward(reviews: list[dict], seed: int = 0,
                         test_fraction: float = 0.2) -> tuple[SentimentReward, dict]:
    """Fit on a seeded stratified (1 - test_fraction) of `reviews`, measure accuracy on the rest.

    `reviews` are records {"id", "text", "label": 0/1}, the `sentiment_classifier` split. The
    returned model is the one fitted on the training part, so the metrics describe exactly the
    model that is saved (no refit on all reviews). Metrics: accuracy, n_train, n_test,
    fit_seconds (vectoriser + regression fit, not the evaluation).
    """
    from udasa_lib.splits import stratified_split

    _check_reviews(reviews)
    labels = {review["label"] for review in reviews}
    if labels != {0, 1}:
        raise ValueError(f"sentiment reviews need both labels 0 and 1, got {sorted(labels)}")
    train, test = stratified_split(list(reviews), "label", test_fraction, seed)
    if {r["label"] for r in train} != {0, 1}:
        raise ValueError(f"{len(reviews)} reviews leave a training part without both labels; need more")

    pipeline = build_pipeline(seed)
    start = time.perf_counter()
    pipeline.fit([r["text"] for r in train], np.array([r["label"] for r in train]))
    fit_seconds = time.perf_counter() - start

    predicted = pipeline.predict([r["text"] for r in test])
    accuracy = float(np.mean(predicted == np.array([r["label"] for r in test])))
    metrics = {"accuracy": accuracy, "n_train": len(train), "n_test": len(test),
               "fit_seconds": round(fit_seconds, 3)}
    return SentimentReward(pipeline, metrics), metrics
