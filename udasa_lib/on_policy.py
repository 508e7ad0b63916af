"""On-policy rounds of 04_train (`train.on_policy: true`; docs/method.md step 5, an option).

Before each stage after the first, the current policy re-samples that stage's prompts (K
responses each, the `sample:` settings, from the prompt ids the pairs carry), 02_score's
scorers re-score them and 03_pairs's rule re-pairs them; every new pair stays in this stage.
A `self_judge` value scorer is the configured judge (or pi_0, loaded fresh).
"""
from __future__ import annotations

import time

from udasa_lib import sample, score
from udasa_lib.pairs import ablation_weights, build_pairs
from udasa_lib.generation import batch_seed
from udasa_lib.methods import MethodSpec


def resample_stage(run, model, tokenizer, rows: list[dict], spec: MethodSpec, stage_name: str,
                   index: int) -> tuple[list[dict], dict]:
    """New pairs for stage `stage_name` (the `index`-th trained) from the policy as it is now.
    Returns (pairs, {"prompts", "pairs", "dropped", "seconds"})."""
    cfg = run.config
    task = rows[0]["task"]
    started = time.time()
    model.eval()
    records = []
    try:
        for start in range(0, len(rows), cfg.sample.batch_prompts):
            batch = rows[start: start + cfg.sample.batch_prompts]
            generations = sample.generate_batch(
                model, tokenizer, [r["prompt_token_ids"] for r in batch], k=cfg.sample.k,
                temperature=cfg.sample.temperature, top_p=cfg.sample.top_p, top_k=cfg.sample.top_k,
                max_new_tokens=cfg.sample.tasks[task].max_new_tokens,
                seed=batch_seed(cfg.train.seed + 1000 * index, task, start), engine=cfg.runtime.generation_engine)
            records += [sample.sample_record(row["prompt_id"], task, row["prompt"], row["formatted_prompt"],
                                             row["prompt_token_ids"], responses, f"{row['prompt_id']}-round{index}")
                        for row, responses in zip(batch, generations)]
    finally:
        model.train()
    scored, _ = score.score_with_config(records, run, progress=False)
    weights = cfg.pairs.weights if spec.pair_set == "combined" else ablation_weights(spec.pair_set)
    pairs, dropped = build_pairs(records, scored, weights, cfg.pairs.rejected_strategy, cfg.pairs.tie_epsilon,
                                         (), cfg.train.seed, cfg.pairs.truncated)
    for pair in pairs:
        pair["stage"] = stage_name
    return pairs, {"prompts": len(records), "pairs": len(pairs), "dropped": dropped,
                   "seconds": round(time.time() - started, 2)}
