"""Multiple-choice factual-question set built offline from the openai/evals registry.

What it is for: a small (about 450 items), fixed, license-clean (MIT, openai/evals)
factual multiple-choice set with gold answers, to score a model by comparing the
log-likelihood of each choice. It is built only from jsonl files shipped inside the
PyPI wheel ``evals==3.0.1.post1`` (under ``evals/registry/data/``), so it needs no
network and no dependency beyond the standard library.

Usage::

    from pathlib import Path
    from udasa_lib.truthful_mc import build_truthful_mc
    items = build_truthful_mc(Path("/tmp/evals_x"), seed=0)   # folder holding evals/

Each record is ``{"id", "source", "question", "choices", "gold"}``; ``choices[gold]`` is
the right answer. ``id`` is ``"<source>-<line>"`` with the 1-based line number of the
item in its jsonl file, so ids do not move when exclusions or other sources change.

How the sources become multiple choice (``SOURCES`` lists them):

* ``lettered``: the question text already has ``\\nA. ...\\nB. ...`` options and the
  gold is a letter (MMLU items in ``sandbagging/``, CISSP study questions).
* ``inline_lettered``: options inline as ``  a) ...  b) ...``, gold a lower-case letter.
* ``pick_from_list``: the user message is a comma-separated list, the gold is one list
  entry ("which of these is largest by area"); distractors are the other list entries.
* ``born_first``: "Was X born before Y? Answer Y or N." becomes "Which of these people
  was born first?" with the two names as choices.

Choices are shuffled per item with ``random.Random(f"{seed}:{id}")`` (a Random seeded
from the build seed and the item id), so the whole build is deterministic for a seed
and one item's shuffle does not depend on which other items are present. When an item
has more options than ``max_choices``, the gold plus a random sample of distractors
is kept.

Items are dropped, never altered in meaning, when:

* their line is listed in the source's ``exclude_lines`` (reason given there: a gold
  answer that looks wrong, or a question that needs arithmetic) or their ``topic`` is
  in ``exclude_topics``;
* they repeat an earlier (kept or excluded) item of the same source (same question
  and choices; for ``born_first`` the same unordered pair of people);
* an option refers to other options by letter ("Both A and B", "A and C"): shuffling
  would break it;
* they are degenerate (both people the same; the gold text appears twice);
* an option like "All of the above" / "None of these" would have to be dropped to fit
  ``max_choices``. Such options are otherwise kept and placed last, in their original
  order, while the other options are shuffled.

A line that cannot be read as the parser expects (bad JSON, missing fields, no
options found, a gold letter or name that is not among the options, a Git LFS pointer
instead of data) raises ``ValueError`` naming the file and the line number.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

__all__ = ["SOURCES", "Source", "build_truthful_mc", "iter_source_items"]

REGISTRY_DATA = Path("evals") / "registry" / "data"


@dataclass(frozen=True)
class Source:
    """One registry file: its short name, its path inside the unzipped wheel, its parser."""

    name: str
    path: str  # relative to the wheel root (the folder that holds ``evals/``)
    parser: str  # a key of _PARSERS
    question: str | None = None  # fixed question text, for parsers whose lines hold none
    exclude_topics: frozenset[str] = frozenset()
    exclude_lines: Mapping[int, str] = field(default_factory=dict)  # 1-based line -> reason


SOURCES: tuple[Source, ...] = (
    Source(
        name="mmlu",
        path="evals/registry/data/sandbagging/samples-all.jsonl",
        parser="lettered",
        # Topics that are computation, long legal fact patterns, or moral judgement
        # rather than factual recall.
        exclude_topics=frozenset({
            "abstract algebra", "college mathematics", "econometrics",
            "elementary mathematics", "formal logic", "high school mathematics",
            "high school statistics", "moral disputes", "moral scenarios",
            "professional accounting", "professional law", "security studies",
        }),
        exclude_lines={
            22: "gold A ('God is eternal ...') looks wrong for a theme of Japanese culture; B (kami) expected",
            73: "gold C (icosahedral) is wrong: filoviruses are long filamentous threads (B)",
            32: "arithmetic (binary increment)",
            53: "arithmetic",
            54: "physics computation",
            64: "linear-algebra computation",
            68: "pKa computation",
        },
    ),
    Source(
        name="cissp",
        path="evals/registry/data/cissp-study-questions/samples.jsonl",
        parser="lettered",
        exclude_lines={
            89: "'Star Model' question is garbled; gold does not match the *-property",
            103: "gold ('protect the hypervisor and other VMs') is not the goal of virtualization",
            111: "gold 256-bit; 128-bit is the usual minimum recommendation",
            119: "gold 'Technology Convergence' is the opposite of the described redundancy",
            132: "gold 'IP address' is wrong: the transport layer identifies recipients by port",
        },
    ),
    Source(
        name="test_comp_sci",
        path="evals/registry/data/test_comp_sci/questions.jsonl",
        parser="inline_lettered",
        exclude_lines={
            5: "parent formula floor(w-1/2) contradicts the 2w/2w+1 children of line 4",
            9: "counting comparisons; gold (10) is disputable (6 by the usual count)",
            14: "'which is false': option c is false as well as the gold d",
            26: "gold 'cycle sort uses the method of insertion' is disputable",
            27: "counting write operations",
        },
    ),
    Source(
        name="largest_country",
        path="evals/registry/data/largest_country/samples.jsonl",
        parser="pick_from_list",
        question="Which of these countries or territories has the largest surface area?",
        exclude_lines={
            20: "gold Micronesia (702 km2) is outdated: Singapore, also listed, is now ~730 km2",
        },
    ),
    Source(
        name="born_first",
        path="evals/registry/data/born_first/born_first.jsonl",
        parser="born_first",
        question="Which of these people was born first?",
    ),
)


# --------------------------------------------------------------------------- parsing

class _Skip(Exception):
    """An item that is well-formed but unusable (degenerate, duplicate, ...)."""


@dataclass
class _Item:
    line: int
    question: str
    options: list[str]
    gold: int  # index into options
    dedupe_key: Any


def _fail(path: Path, line: int, msg: str) -> ValueError:
    return ValueError(f"{path}:{line}: {msg}")


def _chat_messages(obj: Mapping[str, Any], path: Path, line: int) -> list[Mapping[str, Any]]:
    msgs = obj.get("input")
    if not isinstance(msgs, list) or not msgs or not all(
        isinstance(m, Mapping) and isinstance(m.get("content"), str) for m in msgs
    ):
        raise _fail(path, line, "expected 'input' to be a non-empty list of chat messages")
    return msgs


def _last_user(obj: Mapping[str, Any], path: Path, line: int) -> str:
    users = [m["content"] for m in _chat_messages(obj, path, line) if m.get("role") == "user"]
    if not users:
        raise _fail(path, line, "no user message in 'input'")
    return users[-1]


def _ideal_str(obj: Mapping[str, Any], path: Path, line: int) -> str:
    ideal = obj.get("ideal")
    if isinstance(ideal, list) and len(ideal) == 1:
        ideal = ideal[0]
    if not isinstance(ideal, str) or not ideal.strip():
        raise _fail(path, line, f"expected 'ideal' to be a non-empty string, got {ideal!r}")
    return ideal.strip()


def _clean(text: str) -> str:
    text = re.sub(r"PWR(\d+)</sup>", r"^\1", text)  # test_comp_sci: "O(nPWR2</sup>)" -> "O(n^2)"
    return re.sub(r"[ \t]+", " ", text).strip()


def _split_lettered(text: str, path: Path, line: int, *, inline: bool) -> tuple[str, list[str], list[str]]:
    """Split ``text`` into stem and options A, B, C, ... found in order."""
    if inline:
        marker = lambda letter: re.compile(rf"(?:^|\s){letter.lower()}\)\s")  # noqa: E731
    else:
        marker = lambda letter: re.compile(rf"\n{letter}\.(?:[ \t]|$)", re.M)  # noqa: E731
    starts: list[tuple[int, int]] = []
    pos = 0
    for letter in "ABCDEFGH":
        m = marker(letter).search(text, pos)
        if m is None:
            break
        starts.append((m.start(), m.end()))
        pos = m.end()
    if len(starts) < 2:
        raise _fail(path, line, "could not find lettered options (A., B., ... or a), b), ...)")
    stem = text[: starts[0][0]]
    options = []
    for k, (_, end) in enumerate(starts):
        stop = starts[k + 1][0] if k + 1 < len(starts) else len(text)
        options.append(text[end:stop])
    if not inline:
        options[-1] = re.sub(r"\s*\n\s*Answer:\s*$", "", options[-1])
    letters = list("ABCDEFGH"[: len(starts)])
    return stem, options, letters


def _parse_lettered(obj: Mapping[str, Any], path: Path, line: int, src: Source, *, inline: bool) -> _Item:
    if "question" in obj:  # MMLU-style {"topic", "question", "answer"}
        text, gold = obj.get("question"), obj.get("answer")
        if not isinstance(text, str) or not isinstance(gold, str):
            raise _fail(path, line, "expected string fields 'question' and 'answer'")
        topic = obj.get("topic")
        if topic is not None and topic in src.exclude_topics:
            raise _Skip("excluded topic")
    else:  # chat style {"input": [...], "ideal": "B"}
        text, gold = _last_user(obj, path, line), _ideal_str(obj, path, line)
    stem, options, letters = _split_lettered(text, path, line, inline=inline)
    gold = gold.strip().rstrip(".)").upper()
    if gold not in letters:
        raise _fail(path, line, f"gold letter {gold!r} is not one of the options {letters}")
    stem = _clean(stem)
    if inline and stem.endswith(","):
        stem = stem[:-1] + "."
    options = [_clean(o) for o in options]
    if not stem or not all(options):
        raise _fail(path, line, "empty question or option")
    return _Item(line, stem, options, letters.index(gold), (stem, tuple(options)))


def _parse_pick_from_list(obj: Mapping[str, Any], path: Path, line: int, src: Source) -> _Item:
    listed = [_clean(x) for x in _last_user(obj, path, line).split(",")]
    if not all(listed):
        raise _fail(path, line, "empty entry in the comma-separated list")
    options = list(dict.fromkeys(listed))  # de-duplicate, keep order
    gold = _clean(_ideal_str(obj, path, line))
    if gold not in options:
        raise _fail(path, line, f"gold {gold!r} is not in the listed options")
    if len(options) < 2:
        raise _Skip("fewer than two distinct options")
    question = src.question or _clean(_chat_messages(obj, path, line)[0]["content"])
    return _Item(line, question, options, options.index(gold), frozenset(options))


_BORN = re.compile(r"Was (?P<a>.+?) born before (?P<b>.+?)\?\s*Answer Y or N\.?")


def _parse_born_first(obj: Mapping[str, Any], path: Path, line: int, src: Source) -> _Item:
    m = _BORN.fullmatch(_last_user(obj, path, line).strip())
    if m is None:
        raise _fail(path, line, "expected 'Was <A> born before <B>? Answer Y or N.'")
    a, b = _clean(m["a"]), _clean(m["b"])
    ideal = _ideal_str(obj, path, line).upper()
    if ideal not in ("Y", "N"):
        raise _fail(path, line, f"expected ideal 'Y' or 'N', got {ideal!r}")
    if a == b:
        raise _Skip("same person twice")
    first = a if ideal == "Y" else b
    return _Item(line, src.question or "Which of these people was born first?", [a, b],
                 [a, b].index(first), frozenset((a, b)))


_PARSERS: dict[str, Callable[[Mapping[str, Any], Path, int, Source], _Item]] = {
    "lettered": lambda o, p, n, s: _parse_lettered(o, p, n, s, inline=False),
    "inline_lettered": lambda o, p, n, s: _parse_lettered(o, p, n, s, inline=True),
    "pick_from_list": _parse_pick_from_list,
    "born_first": _parse_born_first,
}


def iter_source_items(wheel_root: Path, src: Source) -> Iterator[_Item]:
    """Parse one source file; yield its usable items (before choice sampling) in file order."""
    if src.parser not in _PARSERS:
        raise ValueError(f"source {src.name!r}: unknown parser {src.parser!r}")
    path = Path(wheel_root) / src.path
    parse = _PARSERS[src.parser]
    seen: dict[Any, _Item] = {}
    excluded: set[Any] = set()
    with path.open(encoding="utf-8") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            if line_no == 1 and raw.startswith("version https://git-lfs"):
                raise _fail(path, line_no, "file is a Git LFS pointer, not data")
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise _fail(path, line_no, f"invalid JSON: {exc}") from None
            if not isinstance(obj, Mapping):
                raise _fail(path, line_no, "expected a JSON object")
            try:
                item = parse(obj, path, line_no, src)
            except _Skip:
                continue
            if line_no in src.exclude_lines:
                excluded.add(item.dedupe_key)  # so that repeats of it go too
                continue
            if item.dedupe_key in excluded:
                continue
            earlier = seen.get(item.dedupe_key)
            if earlier is not None:
                if earlier.options[earlier.gold] != item.options[item.gold]:
                    raise _fail(path, line_no, f"gold contradicts the same question on line {earlier.line}")
                continue
            seen[item.dedupe_key] = item
            yield item


# ------------------------------------------------------------------- choice sampling

# An option that names other options by letter ("Both A and B", "A and C", "A, B or D").
_LETTER_REF = re.compile(
    r"^\s*(?:both\s+|neither\s+|only\s+)?\(?[a-h]\)?(?:\s*(?:,|and|&|or|nor)\s*\(?[a-h]\)?)+\s*\.?\s*$",
    re.I,
)
# An option about the set of options ("All of the above", "None of these").
_SET_REF = re.compile(
    r"\b(?:all|none|both|neither)\s+of\s+(?:the\s+)?(?:above|these|them|those|the\s+following)\s*\.?\s*$",
    re.I,
)


def _make_record(src: Source, item: _Item, seed: int, max_choices: int) -> dict[str, Any] | None:
    gold_text = item.options[item.gold]
    if item.options.count(gold_text) > 1 or any(_LETTER_REF.match(o) for o in item.options):
        return None
    options = list(dict.fromkeys(item.options))
    pinned = [o for o in options if _SET_REF.search(o)]
    free = [o for o in options if o not in pinned]
    if pinned and len(options) > max_choices:
        return None  # cannot drop options without changing what "all of the above" means
    rid = f"{src.name}-{item.line}"
    rng = random.Random(f"{seed}:{rid}")
    if gold_text in free:
        distractors = [o for o in free if o != gold_text]
        keep = rng.sample(distractors, min(len(distractors), max_choices - 1 - len(pinned)))
        free = keep + [gold_text]
    rng.shuffle(free)
    choices = free + pinned
    return {
        "id": rid,
        "source": src.name,
        "question": item.question,
        "choices": choices,
        "gold": choices.index(gold_text),
    }


def build_truthful_mc(
    wheel_root: Path, seed: int, max_choices: int = 4, *, sources: Sequence[Source] | None = None
) -> list[dict]:
    """Build the multiple-choice set from the unzipped ``evals`` wheel at ``wheel_root``.

    ``wheel_root`` is the folder that holds ``evals/``. Returns records
    ``{"id", "source", "question", "choices", "gold"}`` in ``SOURCES`` order, then file
    order; ``choices`` has 2..``max_choices`` distinct strings and ``choices[gold]`` is
    the answer. Deterministic for a given ``seed``. Raises ``ValueError`` (naming file
    and line) on a malformed source line and ``FileNotFoundError`` on a missing file.
    ``sources`` replaces ``SOURCES`` (tests use it with small synthetic files).
    """
    if isinstance(max_choices, bool) or not isinstance(max_choices, int) or max_choices < 2:
        raise ValueError(f"max_choices must be an int >= 2, got {max_choices!r}")
    records: list[dict] = []
    for src in SOURCES if sources is None else sources:
        for item in iter_source_items(Path(wheel_root), src):
            rec = _make_record(src, item, seed, max_choices)
            if rec is not None:
                records.append(rec)
    return records
