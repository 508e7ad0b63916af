"""Seeded train/test splits: a leaf module, so the data stage and the reward model that both split
records need not import each other."""
from __future__ import annotations

import random
from collections import defaultdict


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
