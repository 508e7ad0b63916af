"""AlpacaEval-style pairwise win rate of a policy against its base model, judged by a LOCAL causal LM.

Why: the paper reports AlpacaEval win rates, but the API judge (GPT-4 turbo) is out of reach
offline. We keep everything else AlpacaEval 2.0 does: its default annotator's prompt
(`weighted_alpaca_eval_gpt4_turbo`, template `alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt`,
read from the installed package) and its weighted preference, 2 - p(first identifier), where p is
the judge's next-token probability renormalised over the two identifiers "m"/"M" (alpaca_eval's
`logprob_parser` with `is_binarize: false`). A local judge is far more position-biased than
GPT-4, so each pair is judged in both presentation orders and the two are averaged.

Convention used throughout (alpaca_eval's): output_1 = BASE model, output_2 = POLICY;
a preference is in [1, 2], 1 = base better, 2 = policy better, 1.5 = tie; the win rate is the
policy's, in percent (alpaca_eval's `pairwise_to_winrate`).
"""
from __future__ import annotations

import functools
import importlib.resources
import types
from collections.abc import Sequence

import numpy as np

from udasa_lib.generation import SharedPrefix, common_prefix_length, encode_prompt, pad_id_of
from udasa_lib.stats import bootstrap_mean_ci

DEFAULT_CONFIG = "weighted_alpaca_eval_gpt4_turbo"


@functools.cache
def _alpaca_eval() -> types.SimpleNamespace:
    """The alpaca_eval pieces we use, imported on first use (the package is slow to import and
    needs `pkg_resources`, hence setuptools < 81 in requirements.txt)."""
    from alpaca_eval.metrics import pairwise_to_winrate
    from alpaca_eval.utils import make_prompts, prompt_to_chatml

    return types.SimpleNamespace(pairwise_to_winrate=pairwise_to_winrate, make_prompts=make_prompts,
                                 prompt_to_chatml=prompt_to_chatml)


def load_annotator(config: str = DEFAULT_CONFIG) -> tuple[str, str, str]:
    """(prompt template, identifier of the first-listed output, of the second) from alpaca_eval's files."""
    import yaml

    _alpaca_eval()
    root = importlib.resources.files("alpaca_eval") / "evaluators_configs"
    spec = yaml.safe_load((root / config / "configs.yaml").read_text())[config]
    parser = spec.get("completion_parser_kwargs", {})
    # Only annotators that answer with ONE identifier token can be read off the next-token logits
    # (the chain-of-thought variants read the last token of a long generation instead).
    if spec.get("fn_completion_parser") != "logprob_parser" or "log_prob_index" in parser:
        raise ValueError(f"alpaca_eval config {config!r} does not read a single-token logprob preference")
    first = parser["numerator_token"]
    second = next(t for t in parser["denominator_tokens"] if t != first)
    template = (root / spec["prompt_template"]).read_text()
    missing = [k for k in ("{instruction}", "{output_1}", "{output_2}") if k not in template]
    if missing:
        raise ValueError(f"template of {config!r} lacks placeholders {missing}")
    return template, first, second


def _check_lists(**lists: Sequence) -> int:
    names = list(lists)
    if len(lists[names[0]]) == 0:
        raise ValueError(f"{names[0]} is empty")
    for name in names[1:]:
        if len(lists[name]) != len(lists[names[0]]):
            raise ValueError(f"{name} has {len(lists[name])} items but {names[0]} has {len(lists[names[0]])}")
    return len(lists[names[0]])


def _water_fill_cap(lengths: Sequence[int], budget: int) -> int | None:
    """Largest per-text token cap c with sum(min(l, c)) <= budget (None: no cut needed), so short
    texts stay whole and only the long ones are shortened."""
    if sum(lengths) <= budget:
        return None
    remaining, ordered = budget, sorted(lengths)
    for i, length in enumerate(ordered):
        if length * (len(ordered) - i) > remaining:
            return max(remaining // (len(ordered) - i), 0)
        remaining -= length
    return None


class LocalJudge:
    """Pairwise judge: a causal LM reading alpaca_eval's prompt and answering with one identifier."""

    def __init__(self, model, tokenizer, config: str = DEFAULT_CONFIG, max_length: int | None = 2048):
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.template, first, second = load_annotator(config)
        context = self._render("", "", "")
        self.identifier_ids = [self._identifier_id(context, first), self._identifier_id(context, second)]
        if self.identifier_ids[0] == self.identifier_ids[1]:
            raise ValueError(f"identifiers {first!r} and {second!r} map to the same token")
        # Template tokens around the texts, plus slack for merges across text boundaries.
        self._overhead = len(self._encode(context)) + 8

    def _render(self, instruction: str, first: str, second: str) -> str:
        import pandas as pd

        ae = _alpaca_eval()
        row = pd.DataFrame([{"instruction": instruction, "output_1": first, "output_2": second}])
        messages = ae.prompt_to_chatml(ae.make_prompts(row, self.template)[0][0])
        if not getattr(self.tokenizer, "chat_template", None):
            return "\n\n".join(m["content"] for m in messages) + "\n"
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError:  # templates without a system role (e.g. Gemma): fold it into the user turn
            merged = [{"role": "user", "content": "\n\n".join(m["content"] for m in messages)}]
            return self.tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)

    def _encode(self, text: str) -> list[int]:
        return encode_prompt(self.tokenizer, text)

    def _identifier_id(self, context: str, identifier: str) -> int:
        """Token id of `identifier` as generated right after the prompt: the token appended when
        the identifier follows the rendered prompt, else whichever of "x" / " x" is one token."""
        base, full = self._encode(context), self._encode(context + identifier)
        if len(full) == len(base) + 1 and full[: len(base)] == base:
            return full[-1]
        for variant in (identifier, " " + identifier):
            ids = self.tokenizer(variant, add_special_tokens=False)["input_ids"]
            if len(ids) == 1:
                return ids[0]
        raise ValueError(f"identifier {identifier!r} is not a single token for this tokenizer")

    def _truncate(self, texts: list[str]) -> list[str]:
        if self.max_length is None:
            return texts
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        budget = self.max_length - self._overhead
        if budget < 3:
            raise ValueError(f"max_length={self.max_length} leaves no room for the texts: the judge's template alone "
                             f"takes {self._overhead} tokens (eval_winrate.max_length; paper.yaml uses 4096)")
        cap = _water_fill_cap([len(i) for i in ids], budget)
        if cap is None:
            return texts
        # Keep each long text's beginning: the judge needs the start of an answer more than its tail.
        return [t if len(i) <= cap else self.tokenizer.decode(i[:cap]) for t, i in zip(texts, ids)]

    def _identifier_probs(self, prompts: list[list[int]], batch_size: int) -> np.ndarray:
        """(n, 2) next-token probabilities of the two identifiers, renormalised over them."""
        import torch

        pad = pad_id_of(self.tokenizer)
        out = np.empty((len(prompts), 2))
        # every prompt opens with the same template text: its KV cache is computed once
        shared = SharedPrefix(self.model, prompts[0][:common_prefix_length(prompts)]) if prompts else None
        order = np.argsort([len(p) for p in prompts], kind="stable")  # similar lengths share a batch
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            with torch.no_grad():
                logits = shared.forward([prompts[r] for r in rows], pad, logits_to_keep=1).logits[:, -1]
            out[rows] = torch.softmax(logits[:, self.identifier_ids].double(), dim=-1).cpu().numpy()
        return out

    def judge_pairs(self, instructions: Sequence[str], outputs_1: Sequence[str], outputs_2: Sequence[str],
                    batch_size: int = 8) -> list[dict[str, float]]:
        """Per item: p_first_order = P(output_2 better) with output_1 listed first, p_swapped_order
        = the same with output_2 listed first, p_first_listed = mean P(the first-listed output is
        picked) (0.5 = no position bias), preference = 1 + mean(p_first_order, p_swapped_order)."""
        n = _check_lists(instructions=instructions, outputs_1=outputs_1, outputs_2=outputs_2)
        prompts = []
        for item in zip(instructions, outputs_1, outputs_2):
            instruction, out_1, out_2 = self._truncate(list(item))
            prompts.append(self._encode(self._render(instruction, out_1, out_2)))
            prompts.append(self._encode(self._render(instruction, out_2, out_1)))
        probs = self._identifier_probs(prompts, batch_size)
        records = []
        for i in range(n):
            # Normal order: output_2 is the second identifier. Swapped: output_2 is the first one.
            p_first, p_swapped = probs[2 * i, 1], probs[2 * i + 1, 0]
            records.append({"p_first_order": float(p_first), "p_swapped_order": float(p_swapped),
                            "p_first_listed": float((probs[2 * i, 0] + probs[2 * i + 1, 0]) / 2),
                            "preference": float(1 + (p_first + p_swapped) / 2)})
        return records

    def preferences(self, instructions: Sequence[str], outputs_1: Sequence[str], outputs_2: Sequence[str],
                    batch_size: int = 8) -> list[float]:
        """alpaca_eval preferences in [1, 2] (2 = output_2 better), order-averaged."""
        return [r["preference"] for r in self.judge_pairs(instructions, outputs_1, outputs_2, batch_size)]


def length_preferences(outputs_1: Sequence[str], outputs_2: Sequence[str]) -> list[float]:
    """"Longer answer wins" baseline (characters): 1 if output_1 is longer, 2 if output_2, 1.5 on ties."""
    _check_lists(outputs_1=outputs_1, outputs_2=outputs_2)
    return [1.0 if len(a) > len(b) else 2.0 if len(b) > len(a) else 1.5 for a, b in zip(outputs_1, outputs_2)]


def win_rate(preferences: Sequence[float], n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Policy (output_2) win rate in percent from alpaca_eval's `pairwise_to_winrate`, plus n and a
    95% percentile-bootstrap CI over prompts of the same quantity (mean of preference - 1)."""
    _check_lists(preferences=preferences)
    values = np.asarray(preferences, dtype=float)
    if not np.all((values >= 1) & (values <= 2)):  # alpaca_eval would silently drop these
        raise ValueError("preferences must all lie in [1, 2] (1 = output_1/base better, 2 = output_2/policy)")
    ae = _alpaca_eval().pairwise_to_winrate(list(values))
    _, low, high = bootstrap_mean_ci((values - 1) * 100, n_boot=n_boot, seed=seed)
    return {"win_rate": float(ae["win_rate"]), "standard_error": float(ae["standard_error"]),
            "ci_low": low, "ci_high": high, "n": int(ae["n_total"]), "n_wins": int(ae["n_wins"]),
            "n_wins_base": int(ae["n_wins_base"]), "n_draws": int(ae["n_draws"])}


# --- the stage --------------------------------------------------------------------------------

ANNOTATIONS_FILE = "annotations.jsonl"
FIGURE_FILE = "winrate.png"


def run_eval_winrate(run) -> dict:
    """Stage 05_eval_winrate: every alignment policy's benign answers (05_eval_harmless) against the
    base model's, judged in both orders; writes annotations, metrics and the figure.
    Returns {"rows": metric rows, "policies": method names, "judge": judge id}."""
    from udasa_lib import metrics
    from udasa_lib.eval_harmless import GENERATIONS_DIR
    from udasa_lib.io import atomic_write_jsonl, read_jsonl
    from udasa_lib.models import configure_threads, load_causal_lm
    from udasa_lib.pipeline import variants
    from udasa_lib.policies import BASE

    cfg, params = run.config, run.config.eval_winrate
    configure_threads(cfg.runtime.threads)
    generation_dir = run.upstream["05_eval_harmless"] / GENERATIONS_DIR
    methods = [v.split("/")[1] for v in variants(cfg, "04_train") if v.startswith("alignment/")]
    base = [r for r in read_jsonl(generation_dir / f"{BASE}.jsonl") if r["split"] == "benign"]
    judge_name = params.judge or cfg.model.name_or_path
    judge_model, judge_tokenizer = load_causal_lm(judge_name, params.judge_dtype, cfg.runtime.device, shard=True)
    judge = LocalJudge(judge_model, judge_tokenizer, max_length=params.max_length)
    annotations, rows = [], []
    for method in methods:
        policy = [r for r in read_jsonl(generation_dir / f"{method}.jsonl") if r["split"] == "benign"]
        if [r["id"] for r in policy] != [r["id"] for r in base]:
            raise ValueError(f"{generation_dir}/{method}.jsonl: prompts differ from {BASE}.jsonl")
        instructions = [r["prompt"] for r in base]
        outputs_base, outputs_policy = [r["output"] for r in base], [r["output"] for r in policy]
        judged = judge.judge_pairs(instructions, outputs_base, outputs_policy, batch_size=params.batch_size)
        by_length = length_preferences(outputs_base, outputs_policy)
        for r, o1, o2, j, lp in zip(base, outputs_base, outputs_policy, judged, by_length):
            annotations.append({"instruction": r["prompt"], "output_1": o1, "output_2": o2, "generator_1": BASE,
                                "generator_2": method, "annotator": f"local:{judge_name}", **j,
                                "length_preference": lp})
        units = [r["id"] for r in base]
        for metric, preferences in (("win_rate", [j["preference"] for j in judged]), ("length_win_rate", by_length)):
            result = win_rate(preferences, n_boot=cfg.bootstrap_samples, seed=cfg.seed)
            rows.append(metrics.metric_row("alignment", method, metric, [(p - 1) * 100 for p in preferences],
                                           run.name, cfg.bootstrap_samples, cfg.seed, units, value=result["win_rate"]))
        rows.append(metrics.metric_row("alignment", method, "judge_first_listed_rate",
                                       [j["p_first_listed"] for j in judged], run.name, cfg.bootstrap_samples,
                                       cfg.seed, units))
    atomic_write_jsonl(run.dir / ANNOTATIONS_FILE, annotations)
    metrics.write_metrics(run.dir / metrics.METRICS_FILE, rows)
    run.add_to_manifest(judge=judge_name, judge_dtype=params.judge_dtype, annotator_config=DEFAULT_CONFIG,
                        pairs=len(annotations))
    metrics.plot_intervals(rows, ["win_rate", "length_win_rate"], methods, run.dir / FIGURE_FILE,
                           title="win rate against base, % (95 % CI)", reference=50)
    return {"rows": rows, "policies": methods, "judge": judge_name}
