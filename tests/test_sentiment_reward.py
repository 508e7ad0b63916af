"""Ground-truth sentiment reward: accurate enough, bounded, ordered, saved atomically, seeded."""
import random

import numpy as np
import pytest

from udasa_lib import data
from udasa_lib.sentiment_reward import SentimentReward, fit_sentiment_reward

POSITIVE = "This movie was wonderful, I loved every minute"
NEGATIVE = "Terrible, boring, a waste of time"


@pytest.fixture(scope="module")
def reviews():
    # A seeded subset keeps the module fast; the 10k reserve of 00_data is measured by hand.
    records = data.load_imdb_reviews()
    return random.Random(0).sample(records, 2000)


@pytest.fixture(scope="module")
def fitted(reviews):
    return fit_sentiment_reward(reviews, seed=0)


def test_held_out_accuracy_and_metrics(fitted):
    _, metrics = fitted
    assert set(metrics) == {"accuracy", "n_train", "n_test", "fit_seconds"}
    assert metrics["n_test"] == pytest.approx(400, abs=2) and metrics["n_train"] + metrics["n_test"] == 2000
    assert metrics["accuracy"] > 0.8, metrics


def test_rewards_are_probabilities_and_ordered(fitted, reviews):
    model, _ = fitted
    rewards = model.reward([POSITIVE, NEGATIVE, ""] + [r["text"] for r in reviews[:50]])
    assert rewards.shape == (53,) and rewards.dtype == np.float64
    assert np.all((rewards >= 0) & (rewards <= 1))
    assert rewards[0] > rewards[1]
    assert model.reward([]).shape == (0,)


def test_reward_rejects_a_bare_string_and_non_text(fitted):
    model, _ = fitted
    with pytest.raises(TypeError, match="single str"):
        model.reward(POSITIVE)
    with pytest.raises(TypeError, match="text 1"):
        model.reward([POSITIVE, None])


def test_save_load_round_trip(fitted, reviews, tmp_path):
    model, metrics = fitted
    path = model.save(tmp_path / "sub" / "sentiment_reward.joblib")
    assert [p.name for p in path.parent.iterdir()] == ["sentiment_reward.joblib"]  # no temp file left
    loaded = SentimentReward.load(path)
    texts = [POSITIVE, NEGATIVE] + [r["text"] for r in reviews[:20]]
    np.testing.assert_array_equal(loaded.reward(texts), model.reward(texts))
    assert loaded.metrics == {k: v for k, v in metrics.items() if k != "fit_seconds"}


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.joblib"):
        SentimentReward.load(tmp_path / "missing.joblib")
    import joblib

    joblib.dump({"something": "else"}, tmp_path / "other.joblib")
    with pytest.raises(ValueError, match="other.joblib"):
        SentimentReward.load(tmp_path / "other.joblib")


@pytest.mark.parametrize("bad,match", [
    ({"label": 2}, "review 3 .*label 2"),
    ({"label": True}, "review 3 .*label True"),
    ({"label": None}, "review 3 .*label None"),
    ({"text": ""}, "review 3 .*text"),
    ({"text": None}, "review 3 .*text"),
])
def test_bad_review_raises_naming_its_index(reviews, bad, match):
    records = [dict(r) for r in reviews[:10]]
    records[3].update(bad)
    with pytest.raises(ValueError, match=match):
        fit_sentiment_reward(records)


def test_one_label_only_is_an_error(reviews):
    with pytest.raises(ValueError, match="both labels"):
        fit_sentiment_reward([r for r in reviews[:100] if r["label"] == 1])


def test_deterministic_for_a_seed(reviews):
    subset = reviews[:600]
    first, m1 = fit_sentiment_reward(subset, seed=3)
    second, m2 = fit_sentiment_reward(subset, seed=3)
    other, m3 = fit_sentiment_reward(subset, seed=4)
    texts = [POSITIVE, NEGATIVE] + [r["text"] for r in reviews[600:650]]
    np.testing.assert_array_equal(first.reward(texts), second.reward(texts))
    assert m1["accuracy"] == m2["accuracy"]
    # another seed holds out other reviews, so the fitted model differs
    assert not np.array_equal(first.reward(texts), other.reward(texts))


def test_a_refit_saves_the_same_bytes(tmp_path, reviews):
    """Downstream stage keys hash this file: a refit on the same data must not change them."""
    from udasa_lib.io import sha256_file

    digests = []
    for name in ("a", "b"):
        model, _ = fit_sentiment_reward(reviews, seed=0)
        digests.append(sha256_file(model.save(tmp_path / f"{name}.joblib")))
    assert digests[0] == digests[1]
