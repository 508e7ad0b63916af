"""The methods 04_train can train, and what each reads and optimises (docs/method.md, "Methods in
every run"). The one list of method names: the config's `train.methods` is checked against it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

UNSTAGED = "unstaged"  # the single "stage" of a method trained on all pairs at once


@dataclass(frozen=True)
class MethodSpec:
    objective: str  # "sft" | "dpo"
    pair_set: str  # key of PAIRS_FILES
    staged: bool
    reverse: bool = False
    smoothing: bool = False  # UAL per-sample label smoothing

    def stages(self, order: Sequence[str]) -> list[str]:
        """The stages this method trains, in order: `order` (reversed for udasa_reverse) or one unstaged pass."""
        if not self.staged:
            return [UNSTAGED]
        return list(reversed(order)) if self.reverse else list(order)


METHODS: dict[str, MethodSpec] = {
    "sft": MethodSpec("sft", "combined", staged=False),
    "dpo": MethodSpec("dpo", "combined", staged=False),
    "udasa": MethodSpec("dpo", "combined", staged=True),
    "udasa_reverse": MethodSpec("dpo", "combined", staged=True, reverse=True),
    "ual_sft": MethodSpec("sft", "combined", staged=False, smoothing=True),
    "ual_dpo": MethodSpec("dpo", "combined", staged=False, smoothing=True),
    "udasa_semantic": MethodSpec("dpo", "semantic", staged=True),
    "udasa_factual": MethodSpec("dpo", "factual", staged=True),
    "udasa_value": MethodSpec("dpo", "value", staged=True),
}
