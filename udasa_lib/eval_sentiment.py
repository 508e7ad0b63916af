"""Stage 05_eval_sentiment: controlled sentiment generation (DPO paper, App. C).

Every sentiment policy continues held-out IMDb prefixes (`eval_sentiment.samples_per_prompt`
samples each, at `eval_sentiment.temperature`; 0 = greedy). Sample j of prefix i is drawn with
the seed `generation.sample_seed(seed, prefix id, j)` under every policy (common random numbers):
two policies differ in their samples only where their distributions differ, so the paired
differences of 07_report do not carry sampling noise the policies share. Per sample: the
ground-truth reward P(positive) of prefix + continuation from the classifier fitted in 00_data
(kept apart from training), and log pi(y|x) - log pi_ref(y|x) (pi's from the sampler, the
untempered log-probs of the generated ids, in float32; teacher-forced in lower precision; pi_ref =
base teacher-forced on them), whose mean is
the sequence-level KL(pi || pi_ref). Intervals resample prefixes (the samples of one prefix are
averaged first).
"""
from __future__ import annotations

from udasa_lib import metrics, policies
from udasa_lib.generation import encode_prompt, sample_seeds
from udasa_lib.io import read_jsonl

GENERATIONS_DIR = "generations"
FIGURE_FILE = "reward_kl.png"


def run_eval_sentiment(run) -> dict:
    """Generate (or reuse) and score every policy's continuations; write metrics and the figure.
    Returns {"rows": metric rows, "policies": names, "samples": n, "reward_model": its metrics}."""
    import torch

    from udasa_lib.models import configure_threads, load_causal_lm
    from udasa_lib.data import SENTIMENT_REWARD_FILE
    from udasa_lib.sentiment_reward import SentimentReward

    cfg, params = run.config, run.config.eval_sentiment
    configure_threads(cfg.runtime.threads)
    data_dir = run.upstream["00_data"]
    prefixes = read_jsonl(data_dir / "sentiment_test.jsonl", {"id": str, "text": str})
    if len(prefixes) < params.prompts:
        raise ValueError(f"eval_sentiment.prompts: sentiment_test has {len(prefixes)} prefixes, "
                         f"{params.prompts} requested")
    draws = [(r, j) for r in prefixes[:params.prompts] for j in range(params.samples_per_prompt)]  # (prefix, sample)
    prompts = [r for r, _ in draws]
    row_seeds = sample_seeds(cfg.seed, [(r["id"], j) for r, j in draws])
    reward_model = SentimentReward.load(data_dir / SENTIMENT_REWARD_FILE)
    model, tokenizer = load_causal_lm(cfg.model.name_or_path, cfg.model.dtype, cfg.runtime.device)
    policy_set = policies.PolicySet(model, policies.policy_adapters(run, "sentiment"))
    prompt_ids = [encode_prompt(tokenizer, r["text"]) for r in prompts]  # raw prefixes, fed as 01_sample feeds them

    # In float32 the sampler's cached decode gives log pi within 1e-4 of teacher forcing
    # (tests/test_generation.py), so pi is not scored twice; in bf16/fp16 the two paths can differ
    # by more than a small KL, and pi is teacher-forced like pi_ref.
    exact_sampler_logprobs = next(model.parameters()).dtype == torch.float32

    def continuations(name, policy):
        outputs = policies.generate(policy, tokenizer, prompt_ids, max_new_tokens=params.max_new_tokens,
                                    batch_size=params.batch_size, temperature=params.temperature, seed=cfg.seed,
                                    desc=name, engine=cfg.runtime.generation_engine, row_seeds=row_seeds,
                                    with_logprobs=True)
        completions = [o["token_ids"] for o in outputs]
        if exact_sampler_logprobs:
            logp_policy = [sum(o["token_logprobs"]) for o in outputs]
        else:
            logp_policy = policies.sequence_logprobs(policy, tokenizer, prompt_ids, completions, params.batch_size)
        if name == policies.BASE:  # pi is pi_ref: the ratio is 0 by definition, not up to rounding
            logp_reference = logp_policy
        else:
            with policy_set.use(policies.BASE) as reference:
                logp_reference = policies.sequence_logprobs(reference, tokenizer, prompt_ids, completions,
                                                            params.batch_size)
        reviews = [tokenizer.decode(p + c, skip_special_tokens=True) for p, c in zip(prompt_ids, completions)]
        rewards = reward_model.reward(reviews)
        return [{"id": r["id"], "sample": j, "seed": s, "prefix": r["text"], "continuation": o["text"],
                 "token_ids": o["token_ids"], "logp_policy": float(lp), "logp_reference": float(lr),
                 "log_ratio": float(lp - lr), "reward": float(rw)}
                for (r, j), s, o, lp, lr, rw in zip(draws, row_seeds, outputs, logp_policy, logp_reference, rewards)]

    generations = policies.for_each_policy(policy_set, run.dir / GENERATIONS_DIR, continuations)
    rows = []
    for name, records in generations.items():
        for metric, field in (("reward", "reward"), ("kl", "log_ratio")):
            units, values = metrics.per_unit_means(records, field)
            rows.append(metrics.metric_row("sentiment", name, metric, values, run.name, cfg.bootstrap_samples,
                                           cfg.seed, units))
    metrics.write_metrics(run.dir / metrics.METRICS_FILE, rows)
    run.add_to_manifest(reward_model=reward_model.metrics, samples=len(prompts))
    plot_reward_kl(rows, policy_set.names, run.dir / FIGURE_FILE)
    return {"rows": rows, "policies": policy_set.names, "samples": len(prompts), "reward_model": reward_model.metrics}


def plot_reward_kl(rows: list[dict], names: list[str], path) -> None:
    """Reward against KL per policy, both with their 95 % intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from udasa_lib.io import atomic_save_figure

    table = pd.DataFrame(rows)
    wide = table.pivot(index="method", columns="metric", values=["value", "ci_low", "ci_high"]).loc[names]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name in names:
        row = wide.loc[name]
        ax.errorbar(row[("value", "kl")], row[("value", "reward")],
                    xerr=[[row[("value", "kl")] - row[("ci_low", "kl")]], [row[("ci_high", "kl")] - row[("value", "kl")]]],
                    yerr=[[row[("value", "reward")] - row[("ci_low", "reward")]],
                          [row[("ci_high", "reward")] - row[("value", "reward")]]],
                    fmt="o", label=name, capsize=2)
    ax.set_xlabel("KL(π || π_ref), nats per sequence")
    ax.set_ylabel("ground-truth reward P(positive)")
    ax.legend(fontsize=7)
    ax.set_title("controlled sentiment, 95 % CI")
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)
