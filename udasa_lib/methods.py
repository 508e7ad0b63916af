"""The methods 04_train can train, and what each reads and optimises (docs/method.md, "Methods in
every run"). The one list of method names: the config's `train.methods` is checked against it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

UNSTAGED = "unstaged"  # the single "stage" of a method trained on all pairs at once
# Tasks with a ground-truth reward (the sentiment classifier of 00_data): only they have oracle pairs.
GROUND_TRUTH_TASKS = ("sentiment",)
# Pair sets whose labels come from the evaluator. Only the positive control reads one; the leakage
# guard (tests/test_score.py) checks that no other method does.
EVALUATOR_PAIR_SETS = ("oracle",)


@dataclass(frozen=True)
class MethodSpec:
    objective: str  # "sft" | "dpo"
    pair_set: str  # key of train.PAIRS_FILES
    staged: bool
    reverse: bool = False
    smoothing: str = ""  # "" | "uncertainty" (UAL's per-sample epsilon) | "constant" (UAL's mean epsilon, every sample)
    control: str = ""  # "" | "positive" | "negative" | "constant smoothing": what the control isolates

    def stages(self, order: Sequence[str]) -> list[str]:
        """The stages this method trains, in order: `order` (reversed for udasa_reverse) or one unstaged pass."""
        if not self.staged:
            return [UNSTAGED]
        return list(reversed(order)) if self.reverse else list(order)

    @property
    def needs_ground_truth(self) -> bool:
        return self.pair_set in EVALUATOR_PAIR_SETS


METHODS: dict[str, MethodSpec] = {
    "sft": MethodSpec("sft", "combined", staged=False),
    "dpo": MethodSpec("dpo", "combined", staged=False),
    "udasa": MethodSpec("dpo", "combined", staged=True),
    "udasa_reverse": MethodSpec("dpo", "combined", staged=True, reverse=True),
    "ual_sft": MethodSpec("sft", "combined", staged=False, smoothing="uncertainty"),
    "ual_dpo": MethodSpec("dpo", "combined", staged=False, smoothing="uncertainty"),
    "udasa_semantic": MethodSpec("dpo", "semantic", staged=True),
    "udasa_factual": MethodSpec("dpo", "factual", staged=True),
    "udasa_value": MethodSpec("dpo", "value", staged=True),
    # Controls (docs/method.md, "Controls"). The oracle bounds what self-labelling can reach at this
    # budget (DPO App. C: pairs labelled by the ground-truth reward); the random direction is what
    # the same pairs teach when their direction carries no signal; constant smoothing separates
    # "uncertainty-aware" from "smoothed".
    "dpo_oracle": MethodSpec("dpo", "oracle", staged=False, control="positive"),
    "dpo_random": MethodSpec("dpo", "random", staged=False, control="negative"),
    "ual_sft_const": MethodSpec("sft", "combined", staged=False, smoothing="constant", control="constant smoothing"),
    "ual_dpo_const": MethodSpec("dpo", "combined", staged=False, smoothing="constant", control="constant smoothing"),
}
