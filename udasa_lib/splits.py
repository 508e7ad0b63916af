"""Seeded train/test splits and the text key that decides when two texts are the same prompt:
a leaf module, so the data stage, the harm probe and the reward model need not import each other."""
from __future__ import annotations

import random
import re
from collections import defaultdict


def normalise(text: str) -> str:
    """Whitespace folded, trimmed, lower case: the identity of a prompt for deduplication and disjointness."""
    return re.sub(r"\s+", " ", text or "").strip().lower()


def stratified_split(records: list[dict], by: str, test_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Shuffle within each stratum, hold out round(test_fraction * n) of each, shuffle both sides."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test fraction must lie in (0, 1), got {test_fraction}")
    rng = random.Random(seed)
    groups: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        groups[record[by]].append(record)
    train, test = [], []
    for name in sorted(groups):
        group = list(groups[name])
        rng.shuffle(group)
        n_test = max(1, round(test_fraction * len(group)))
        test.extend(group[:n_test])
        train.extend(group[n_test:])
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test
