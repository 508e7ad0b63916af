"""pi_0's log-probs of a DPO pair set, computed once and shared by every DPO-type method and stage.

With `train.reference: initial`, every DPO-type method (dpo, udasa, udasa_reverse, ual_dpo, and
each stage of the staged ones) compares its policy with the same pi_0 on pairs of the same
03_pairs file, so log pi_0(y_w|x) and log pi_0(y_l|x) are the same numbers whichever method or
stage trains on a pair. trl recomputes them in every step of every method (one extra forward pass
per batch); here they are computed once per pair set by trl's own
`DPOTrainer.compute_ref_log_probs` (`trainers.UALDPOTrainer`) and handed to trl as its
`ref_chosen_logps` / `ref_rejected_logps` columns (trl's `precompute_ref_log_probs` path).

The table of a pair set is one JSON file, results/.cache/reference_logps/<set key>.json, where
the set key is the sha256 of
- the reference key: the reference model's weights (trl's `hash_module`), its dtype, the device
  type, bf16 autocast, `train.max_length`, the truncation mode and trl's version, and
- every pair's (prompt_ids, chosen_ids, rejected_ids), in the pair file's order.
Any change to the pairs or the model gives another key: a stale table is never read, only left
behind. The whole set is computed in file order with a fixed batch size, whichever method asks
first, so the numbers (and every product trained on them) do not depend on which ran first.
Stages that need the same table at once take turns through a file lock: one computes, the rest read.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Mapping, Sequence

from udasa_lib.io import atomic_write_json

REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
CACHE_DIR_NAME = "reference_logps"


def cache_dir() -> Path:
    from udasa_lib.pipeline import results_root

    return results_root() / ".cache" / CACHE_DIR_NAME


def pair_key(record: Mapping) -> str:
    """sha256 of one DPO record's (prompt_ids, chosen_ids, rejected_ids)."""
    ids = [list(map(int, record[column])) for column in PAIR_COLUMNS]
    return hashlib.sha256(json.dumps(ids, separators=(",", ":")).encode()).hexdigest()


def reference_key(model, *, max_length: int | None, truncation_mode: str, bf16: bool) -> str:
    """Everything besides the pairs that changes pi_0's log-probs, as one sha256. `model` is the
    reference itself (the base model before an adapter is added)."""
    import trl
    from trl.trainer.utils import hash_module

    device = next(model.parameters()).device.type
    return hashlib.sha256(json.dumps({
        "weights": hash_module(model), "dtype": str(next(model.parameters()).dtype), "device": device,
        "bf16": bf16, "max_length": max_length, "truncation_mode": truncation_mode, "trl": trl.__version__,
    }, sort_keys=True).encode()).hexdigest()


class SharedReference:
    """The reference log-probs of one pair set under one reference model.

    `records` are every DPO record of the set (training_records output, all stages), in file order.
    `ensure(compute)` reads the table, or calls compute(records) -> (chosen [n], rejected [n]) and
    writes it; `columns(rows)` gives any subset's two columns, looked up by pair key.
    Raises KeyError (naming the pair) for a record outside the set.
    """

    def __init__(self, records: Sequence[Mapping], key_of_reference: str, directory: Path | None = None):
        self.records = [{column: list(r[column]) for column in PAIR_COLUMNS} for r in records]
        self.pair_keys = [pair_key(r) for r in self.records]
        self.set_key = hashlib.sha256("\n".join([key_of_reference, *self.pair_keys]).encode()).hexdigest()
        self.path = Path(directory or cache_dir()) / f"{self.set_key}.json"
        self.computed = False  # True when this process computed the table rather than read it
        self._table: dict[str, list[float]] | None = None

    def ensure(self, compute: Callable[[list[dict]], tuple[Sequence[float], Sequence[float]]]) -> None:
        if self._table is not None:
            return
        from filelock import FileLock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        # two stages that need the same table at once (make -j): one computes, the other reads it
        with FileLock(str(self.path) + ".lock"):
            self._read_or_compute(compute)

    def _read_or_compute(self, compute) -> None:
        if self.path.exists():
            try:
                self._table = json.loads(self.path.read_text())["logps"]
                return
            except (ValueError, KeyError):  # an unreadable table is recomputed, never trusted
                pass
        chosen, rejected = compute(self.records)
        if len(chosen) != len(self.records) or len(rejected) != len(self.records):
            raise RuntimeError(f"reference pass returned {len(chosen)}/{len(rejected)} values for "
                               f"{len(self.records)} pairs")
        self._table = {key: [float(c), float(r)] for key, c, r in zip(self.pair_keys, chosen, rejected)}
        atomic_write_json(self.path, {"pairs": len(self.records), "logps": self._table})
        self.computed = True

    def columns(self, rows: Sequence[Mapping]) -> dict[str, list[float]]:
        if self._table is None:
            raise RuntimeError("SharedReference.columns before ensure()")
        chosen, rejected = [], []
        for row in rows:
            key = pair_key(row)
            if key not in self._table:
                raise KeyError(f"pair {key[:12]} is not in the shared reference set {self.path.name}")
            chosen.append(self._table[key][0])
            rejected.append(self._table[key][1])
        return dict(zip(REFERENCE_COLUMNS, (chosen, rejected)))
