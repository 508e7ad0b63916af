"""00_data: seeded splits are disjoint, deterministic, stratified; bad sources name their line."""
import pytest

from udasa_lib import config, data
from udasa_lib.splits import stratified_split

from conftest import SMOKE_CONFIG


@pytest.fixture(scope="module")
def splits():
    return data.build_splits(config.resolve(SMOKE_CONFIG).data)


def _norm(text):
    return " ".join(text.lower().split())


@pytest.mark.parametrize("a,b", data.DISJOINT)
def test_train_and_test_share_no_id_and_no_text(splits, a, b):
    assert splits[a] and splits[b]
    assert not {r["id"] for r in splits[a]} & {r["id"] for r in splits[b]}
    assert not {_norm(r["text"]) for r in splits[a]} & {_norm(r["text"]) for r in splits[b]}


def test_sentiment_reserve_is_disjoint_from_every_prefix_review(splits):
    prefix_reviews = {r["review_id"] for name in ("sentiment_train", "sentiment_test") for r in splits[name]}
    reserve = splits["sentiment_classifier"]
    assert len(reserve) == 400 and not prefix_reviews & {r["id"] for r in reserve}
    # no reserved review text is the review a prompt was cut from
    assert all(not any(r["text"].startswith(p["text"]) and r["id"] == p["review_id"] for r in reserve)
               for p in splits["sentiment_test"])


def test_splits_are_deterministic_and_seeded(splits):
    cfg = config.resolve(SMOKE_CONFIG).data
    again = data.build_splits(cfg)
    assert [r["id"] for r in again["harmful_test"]] == [r["id"] for r in splits["harmful_test"]]
    other = data.build_splits(config.resolve(SMOKE_CONFIG, {"data.split_seed": 1}).data)
    assert [r["id"] for r in other["harmful_test"]] != [r["id"] for r in splits["harmful_test"]]


def test_sizes_and_sources(splits):
    assert {r["source"] for r in splits["harmful_test"]} == {"advbench", "do-not-answer"}
    assert len(splits["benign_train"]) + len(splits["benign_test"]) >= 150
    assert {r["category"] for r in splits["benign_test"]} == set(data.BENIGN_CATEGORIES)
    assert len(splits["truthful_mc"]) >= 200
    for prompt in splits["sentiment_train"] + splits["sentiment_test"]:
        assert 1 <= len(prompt["text"].split()) <= 8 and "<br" not in prompt["text"]
    labels = [p["label"] for p in splits["sentiment_train"]]
    assert labels.count(0) == labels.count(1)


def test_stratified_split_holds_out_each_stratum():
    records = [{"id": f"{c}{i}", "text": f"{c}{i}", "c": c} for c in "ab" for i in range(10)]
    train, test = stratified_split(records, "c", 0.3, seed=0)
    assert sorted(r["c"] for r in test) == ["a"] * 3 + ["b"] * 3
    assert len(train) == 14 and not {r["id"] for r in train} & {r["id"] for r in test}


def test_check_disjoint_catches_overlap():
    splits = {"x": [{"id": "1", "text": "Same text"}], "y": [{"id": "2", "text": "same  TEXT"}]}
    with pytest.raises(data.DataError, match="share 1 texts"):
        data.check_disjoint({**splits, "sentiment_train": [], "sentiment_test": [], "sentiment_classifier": []},
                            pairs=(("x", "y"),))


def test_bad_benign_category_names_the_line(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text('{"id": "b1", "category": "writing", "instruction": "Write."}\n'
                    '{"id": "b2", "category": "cooking", "instruction": "Cook."}\n')
    with pytest.raises(data.DataError, match=r"b\.jsonl line 2: category 'cooking'"):
        data.load_benign(path)
