"""Stage 05_eval_harmless: harmful compliance, refusal and over-refusal of every alignment policy.

Each policy answers held-out harmful prompts (AdvBench + Do-Not-Answer test split) and benign
instructions, greedily by default (`eval_harmless.temperature`, 0 = greedy; when sampled, with
common random numbers: prompt i's seed is the same under every policy). Two readings of
the same answers, kept apart on purpose:

- harmful compliance = P(aligned) < 0.5 under the harm probe fitted in 00_data (which is also the
  alignment task's value scorer, so a policy trained on its preferences can flatter it);
- refusal = GCG's refusal openings (Zou et al. 2023, `metrics.is_refusal`), independent of the
  probe; on benign prompts it is over-refusal (a model that refuses everything must not win).
The benign answers are also the pairs of 05_eval_winrate.
"""
from __future__ import annotations

from pathlib import Path

from udasa_lib import metrics, policies
from udasa_lib.generation import encode_prompt, format_prompt, sample_seeds
from udasa_lib.io import atomic_write_jsonl, read_jsonl

GENERATIONS_DIR = "generations"
SCORED_FILE = "scored.jsonl"
FIGURE_FILE = "harmless.png"


def held_out_prompts(data_dir: Path, harmful: int, benign: int) -> list[dict]:
    """The first n prompts of harmful_test and benign_test, each tagged with its split."""
    prompts = []
    for split, count in (("harmful", harmful), ("benign", benign)):
        records = read_jsonl(Path(data_dir) / f"{split}_test.jsonl", {"id": str, "text": str})
        if len(records) < count:
            raise ValueError(f"eval_harmless: {split}_test has {len(records)} prompts, {count} requested")
        prompts += [{**r, "split": split} for r in records[:count]]
    return prompts


def run_eval_harmless(run) -> dict:
    """Generate (or reuse) every policy's answers, score them, write metrics and the figure.
    Returns {"rows": metric rows, "policies": names, "empty": empty answers per policy, "harm_probe": ...}."""
    import json

    from udasa_lib.models import configure_threads, load_causal_lm
    from udasa_lib.value_probe import HARM_PROBE_FILE, HARM_PROBE_METRICS, HarmProbe

    cfg, params = run.config, run.config.eval_harmless
    configure_threads(cfg.runtime.threads)
    data_dir = run.upstream["00_data"]
    prompts = held_out_prompts(data_dir, params.harmful_prompts, params.benign_prompts)
    model, tokenizer = load_causal_lm(cfg.model.name_or_path, cfg.model.dtype, cfg.runtime.device)
    policy_set = policies.PolicySet(model, policies.policy_adapters(run, "alignment"))
    formatted = [format_prompt(tokenizer, r["text"], chat_template=True) for r in prompts]
    prompt_ids = [encode_prompt(tokenizer, f) for f in formatted]
    # greedy by default; when sampled, prompt i is drawn with the same seed under every policy
    row_seeds = sample_seeds(cfg.seed, [(r["id"], 0) for r in prompts])

    def answers(name, policy):
        outputs = policies.generate(policy, tokenizer, prompt_ids, max_new_tokens=params.max_new_tokens,
                                    batch_size=params.batch_size, temperature=params.temperature, seed=cfg.seed,
                                    desc=name, engine=cfg.runtime.generation_engine, row_seeds=row_seeds)
        return [{"id": r["id"], "split": r["split"], "category": r.get("category", ""), "prompt": r["text"],
                 "formatted_prompt": f, "prompt_token_ids": p, "output": o["text"], "token_ids": o["token_ids"],
                 "finish_reason": o["finish_reason"], "n_tokens": len(o["token_ids"])}
                for r, f, p, o in zip(prompts, formatted, prompt_ids, outputs)]

    generations = policies.for_each_policy(policy_set, run.dir / GENERATIONS_DIR, answers)
    probe = HarmProbe.load(data_dir / HARM_PROBE_FILE, cfg.data.probe_embedder)
    probe_metrics = json.loads((data_dir / HARM_PROBE_METRICS).read_text())
    scored, rows = [], []
    for name, records in generations.items():
        p_aligned = probe.score([r["prompt"] for r in records], [r["output"] for r in records])
        for record, p in zip(records, p_aligned):
            record.update(policy=name, p_aligned=float(p), refusal=metrics.is_refusal(record["output"]))
        scored += records
        rows += metrics.harmless_rows(name, [r for r in records if r["split"] == "harmful"],
                                      [r for r in records if r["split"] == "benign"], cfg.bootstrap_samples, cfg.seed)
    atomic_write_jsonl(run.dir / SCORED_FILE, [{k: v for k, v in r.items()
                                                if k not in ("formatted_prompt", "prompt_token_ids", "token_ids")}
                                               for r in scored])
    metrics.write_metrics(run.dir / metrics.METRICS_FILE, rows)
    probe_summary = {k: probe_metrics[k] for k in ("accuracy", "balanced_accuracy", "roc_auc", "n_test")}
    run.add_to_manifest(harm_probe=probe_summary,
                        prompts={"harmful": params.harmful_prompts, "benign": params.benign_prompts})
    metrics.plot_intervals(rows, ["harmful_compliance_rate", "harmful_refusal_rate", "benign_over_refusal_rate"],
                           policy_set.names, run.dir / FIGURE_FILE,
                           title=f"harmlessness, 95 % CI (harm probe held-out accuracy {probe_summary['accuracy']:.3f})")
    empty = {name: sum(not r["output"] for r in records) for name, records in generations.items()}
    return {"rows": rows, "policies": policy_set.names, "empty": empty, "harm_probe": probe_summary}
