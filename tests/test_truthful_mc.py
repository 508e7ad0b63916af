"""Tests for udasa_lib.truthful_mc.

The synthetic tests need nothing but tmp_path. The full build needs the unzipped
``evals==3.0.1.post1`` wheel; point UDASA_EVALS_ROOT at the folder that holds ``evals/``
(default: the copy `make assets` unpacks under .cache/assets/evals).
"""
from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import pytest

from udasa_lib import truthful_mc as tmc  # noqa: E402
from udasa_lib.truthful_mc import SOURCES, Source, build_truthful_mc  # noqa: E402


# ----------------------------------------------------------------------------- helpers

def _check_records(records: list[dict], max_choices: int) -> None:
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "ids must be unique"
    for r in records:
        assert set(r) == {"id", "source", "question", "choices", "gold"}
        assert isinstance(r["id"], str) and r["id"].startswith(r["source"] + "-")
        assert isinstance(r["question"], str) and r["question"].strip()
        choices = r["choices"]
        assert 2 <= len(choices) <= max_choices, r
        assert all(isinstance(c, str) and c.strip() for c in choices), r
        assert len(set(choices)) == len(choices), r
        assert isinstance(r["gold"], int) and not isinstance(r["gold"], bool)
        assert 0 <= r["gold"] < len(choices), r


def _write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _chat(user: str, ideal, system: str = "You are a helpful assistant.") -> dict:
    return {"input": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "ideal": ideal}


def _build(tmp_path: Path, src: Source, rows: list, **kw) -> list[dict]:
    _write_jsonl(tmp_path / src.path, rows)
    return build_truthful_mc(tmp_path, seed=kw.pop("seed", 0), sources=[src], **kw)


def _gold_text(rec: dict) -> str:
    return rec["choices"][rec["gold"]]


# ------------------------------------------------------------------- the real build

@pytest.fixture(scope="module")
def evals_root() -> Path:
    from udasa_lib.assets import assets_dir

    root = Path(os.environ.get("UDASA_EVALS_ROOT") or assets_dir() / "evals")
    if not (root / "evals" / "registry" / "data").is_dir():
        pytest.fail(f"{root} holds no unzipped evals wheel: run `make assets`")
    return root


def test_build_from_wheel(evals_root: Path) -> None:
    records = build_truthful_mc(evals_root, seed=0)
    assert len(records) >= 200
    _check_records(records, max_choices=4)
    counts = Counter(r["source"] for r in records)
    assert set(counts) == {s.name for s in SOURCES}, counts
    # the gold answer is not stuck in one position
    golds = Counter(r["gold"] for r in records if len(r["choices"]) == 4)
    assert len(golds) == 4 and max(golds.values()) < 0.5 * sum(golds.values()), golds


def test_build_is_deterministic(evals_root: Path) -> None:
    a = build_truthful_mc(evals_root, seed=123)
    b = build_truthful_mc(evals_root, seed=123)
    assert a == b
    c = build_truthful_mc(evals_root, seed=124)
    assert [r["id"] for r in c] == [r["id"] for r in a]
    assert any(x["choices"] != y["choices"] for x, y in zip(a, c))
    # same item, same answer, whatever the seed
    assert [_gold_text(x) for x in a] == [_gold_text(y) for y in c]


@pytest.mark.parametrize("max_choices", [2, 3, 8])
def test_build_respects_max_choices(evals_root: Path, max_choices: int) -> None:
    records = build_truthful_mc(evals_root, seed=0, max_choices=max_choices)
    assert len(records) >= 200
    _check_records(records, max_choices=max_choices)


def test_sources_exist_and_are_not_lfs_pointers(evals_root: Path) -> None:
    for src in SOURCES:
        path = evals_root / src.path
        assert path.is_file(), path
        assert not path.read_text(encoding="utf-8")[:200].startswith("version https://git-lfs")


# ------------------------------------------------------------- synthetic: each parser

LETTERED = Source(name="toy_mmlu", path="data/toy_mmlu.jsonl", parser="lettered",
                  exclude_topics=frozenset({"arithmetic"}), exclude_lines={4: "known bad gold"})


def test_lettered_parser(tmp_path: Path) -> None:
    rows = [
        {"topic": "geography", "question": "What is the capital of France?\nA. Berlin\nB. Paris\nC. Rome\nD. Madrid\nAnswer:", "answer": "B"},
        {"topic": "arithmetic", "question": "2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:", "answer": "B"},
        _chat("Which planet is largest?\nA. Mars\nB. Venus\nC. Jupiter\nD. Earth\nAnswer:", "C"),
        {"topic": "geography", "question": "Bad gold here\nA. x\nB. y\nAnswer:", "answer": "A"},
        "",  # blank lines are ignored
        {"topic": "geography", "question": "What is the capital of France?\nA. Berlin\nB. Paris\nC. Rome\nD. Madrid\nAnswer:", "answer": "B"},
        {"topic": "physics", "question": "Polarization is a property of\nA. transverse waves.\nB. longitudinal waves.\nC. all waves.\nD. None of these.\nAnswer:", "answer": "A"},
        {"topic": "econ", "question": "Not counted in GDP?\nA. Pirated DVDs\nB. A physician\nC. Social security\nD. A and C\nAnswer:", "answer": "D"},
    ]
    records = _build(tmp_path, LETTERED, rows)
    _check_records(records, 4)
    # topic 'arithmetic', excluded line 4, the duplicate (line 6) and the "A and C" item go
    assert [r["id"] for r in records] == ["toy_mmlu-1", "toy_mmlu-3", "toy_mmlu-7"]
    by_id = {r["id"]: r for r in records}
    assert by_id["toy_mmlu-1"]["question"] == "What is the capital of France?"
    assert sorted(by_id["toy_mmlu-1"]["choices"]) == ["Berlin", "Madrid", "Paris", "Rome"]
    assert _gold_text(by_id["toy_mmlu-1"]) == "Paris"
    assert _gold_text(by_id["toy_mmlu-3"]) == "Jupiter"
    # "None of these." stays last, the rest is shuffled
    assert by_id["toy_mmlu-7"]["choices"][-1] == "None of these."
    assert _gold_text(by_id["toy_mmlu-7"]) == "transverse waves."
    # fewer choices: an "of these" item cannot be cut down, the others can
    two = _build(tmp_path, LETTERED, rows, max_choices=2)
    _check_records(two, 2)
    assert [r["id"] for r in two] == ["toy_mmlu-1", "toy_mmlu-3"]
    assert _gold_text(two[0]) == "Paris"


def test_lettered_parser_rejects_bad_gold(tmp_path: Path) -> None:
    rows = [{"question": "Q?\nA. x\nB. y\nAnswer:", "answer": "A"},
            {"question": "Q2?\nA. x\nB. y\nAnswer:", "answer": "E"}]
    with pytest.raises(ValueError, match=r"toy_mmlu\.jsonl:2: .*gold letter"):
        _build(tmp_path, LETTERED, rows)


def test_lettered_parser_rejects_missing_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"toy_mmlu\.jsonl:1: .*lettered options"):
        _build(tmp_path, LETTERED, [_chat("What is the capital of France?", "B")])


INLINE = Source(name="toy_inline", path="data/toy_inline.jsonl", parser="inline_lettered")


def test_inline_lettered_parser(tmp_path: Path) -> None:
    rows = [
        _chat("How many children does a binary tree node have at most?  a) 1  b) 2  c) 3  d) any", "b"),
        _chat("Cycle sort is a comparison based sort,  a) true  b) false", "a"),
        _chat("Worst case of cycle sort?  a) O(n)  b) O(nPWR2</sup>)", "b"),
    ]
    records = _build(tmp_path, INLINE, rows)
    _check_records(records, 4)
    assert [_gold_text(r) for r in records] == ["2", "true", "O(n^2)"]
    assert records[1]["question"] == "Cycle sort is a comparison based sort."
    assert sorted(records[0]["choices"]) == ["1", "2", "3", "any"]
    with pytest.raises(ValueError, match=r"toy_inline\.jsonl:1:"):
        _build(tmp_path, INLINE, [_chat("No options here", "a")])


PICK = Source(name="toy_pick", path="data/toy_pick.jsonl", parser="pick_from_list",
              question="Which of these is largest?")


def test_pick_from_list_parser(tmp_path: Path) -> None:
    countries = ["Peru", "Mali", "Bolivia", "Colombia", "Chad", "Angola"]
    rows = [
        _chat(", ".join(countries), "Peru", system="Which is the largest country of these?"),
        _chat("Russia, Canada, Russia", "Russia"),
        _chat("Canada, Russia, Russia", "Russia"),  # same set of options: a duplicate
    ]
    records = _build(tmp_path, PICK, rows)
    _check_records(records, 4)
    assert [r["id"] for r in records] == ["toy_pick-1", "toy_pick-2"]
    first = records[0]
    assert first["question"] == "Which of these is largest?"
    assert len(first["choices"]) == 4 and _gold_text(first) == "Peru"
    assert set(first["choices"]) <= set(countries)
    assert sorted(records[1]["choices"]) == ["Canada", "Russia"]
    # with room for all options, all are kept
    wide = _build(tmp_path, PICK, rows[:1], max_choices=10)
    assert sorted(wide[0]["choices"]) == sorted(countries)
    # seeds change which distractors are drawn, never the gold
    draws = {tuple(_build(tmp_path, PICK, rows[:1], seed=s)[0]["choices"]) for s in range(20)}
    assert len(draws) > 1
    with pytest.raises(ValueError, match=r"toy_pick\.jsonl:1: .*not in the listed options"):
        _build(tmp_path, PICK, [_chat("Peru, Chad", "Brazil")])


BORN = Source(name="toy_born", path="data/toy_born.jsonl", parser="born_first",
              question="Which of these people was born first?")


def test_born_first_parser(tmp_path: Path) -> None:
    rows = [
        _chat("Was Abraham Lincoln born before Franklin Pierce? Answer Y or N.", "N"),
        _chat("Was George Washington born before John Adams? Answer Y or N.", "Y"),
        _chat("Was Franklin Pierce born before Abraham Lincoln? Answer Y or N.", "Y"),  # repeat
        _chat("Was Grover Cleveland born before Grover Cleveland? Answer Y or N.", "Y"),  # degenerate
    ]
    records = _build(tmp_path, BORN, rows)
    _check_records(records, 4)
    assert [r["id"] for r in records] == ["toy_born-1", "toy_born-2"]
    assert [_gold_text(r) for r in records] == ["Franklin Pierce", "George Washington"]
    assert sorted(records[0]["choices"]) == ["Abraham Lincoln", "Franklin Pierce"]
    assert records[0]["question"] == "Which of these people was born first?"


def test_born_first_parser_rejects_contradiction_and_bad_lines(tmp_path: Path) -> None:
    rows = [_chat("Was Abraham Lincoln born before Franklin Pierce? Answer Y or N.", "N"),
            _chat("Was Franklin Pierce born before Abraham Lincoln? Answer Y or N.", "N")]
    with pytest.raises(ValueError, match=r"toy_born\.jsonl:2: .*line 1"):
        _build(tmp_path, BORN, rows)
    with pytest.raises(ValueError, match=r"toy_born\.jsonl:1: .*'Y' or 'N'"):
        _build(tmp_path, BORN, [_chat("Was A born before B? Answer Y or N.", "maybe")])
    with pytest.raises(ValueError, match=r"toy_born\.jsonl:1: .*born before"):
        _build(tmp_path, BORN, [_chat("Who came first, A or B?", "A")])


# ------------------------------------------------------------------ malformed input

def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    rows = [_chat("Was A born before B? Answer Y or N.", "Y"), "{not json"]
    with pytest.raises(ValueError, match=r"toy_born\.jsonl:2: invalid JSON"):
        _build(tmp_path, BORN, rows)


def test_missing_fields_name_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"toy_born\.jsonl:1:"):
        _build(tmp_path, BORN, [{"prompt": "Was A born before B?", "ideal": "Y"}])
    with pytest.raises(ValueError, match=r"toy_born\.jsonl:1:"):
        _build(tmp_path, BORN, [[1, 2, 3]])
    with pytest.raises(ValueError, match=r"toy_born\.jsonl:1:"):
        _build(tmp_path, BORN, [{"input": [{"role": "user", "content": "Was A born before B? Answer Y or N."}]}])


def test_git_lfs_pointer_is_rejected(tmp_path: Path) -> None:
    pointer = ["version https://git-lfs.github.com/spec/v1", "oid sha256:abc", "size 123"]
    with pytest.raises(ValueError, match=r"toy_born\.jsonl:1: .*Git LFS"):
        _build(tmp_path, BORN, pointer)


def test_bad_max_choices_and_parser(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_choices"):
        _build(tmp_path, BORN, [_chat("Was A born before B? Answer Y or N.", "Y")], max_choices=1)
    with pytest.raises(ValueError, match="unknown parser"):
        _build(tmp_path, Source(name="x", path="data/x.jsonl", parser="nope"), ["{}"])


def test_sources_table_is_consistent() -> None:
    names = [s.name for s in SOURCES]
    assert len(names) == len(set(names))
    assert 4 <= len(SOURCES) <= 8
    for src in SOURCES:
        assert src.parser in tmc._PARSERS
        assert src.path.startswith("evals/registry/data/") and src.path.endswith(".jsonl")
        assert all(isinstance(k, int) and k >= 1 and v for k, v in src.exclude_lines.items())
