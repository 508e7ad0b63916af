"""Per-layer cluster tightness of response-token representations (the UAL feature analysis).

UAL (Uncertainty-Aware Learning, arXiv 2406.04854) argues that uncertainty-aware fine-tuning
tightens the clusters that token representations form, and shows it with silhouette scores per
layer and 2-D projections. This module supplies the pieces: teacher-forced hidden states of the
response tokens, cosine silhouette per layer under a chosen labelling (token identity or prompt
category), a 2-D projection, and the two plots. Notebooks compare base vs. tuned models with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from udasa_lib.io import atomic_save_figure


def _device_of(model):
    return next(model.parameters()).device


def response_hidden_states(model, tokenizer, prompts: list[list[int]], responses: list[list[int]],
                           batch_size: int = 8, max_length: int = 256, layers: list[int] | None = None) -> dict:
    """Hidden states of the response tokens under teacher forcing, on the ids as generated
    (prompt ids as fed, response ids as sampled: nothing is re-tokenised).

    Returns token_ids [N] int64, example_index [N] int64 and layers [len(layers) or L+1, N, H]
    float32 (index 0 is the embedding output; `layers` indexes that L+1 tuple). Over-long pairs
    keep the prompt's tail and the response's head, the response getting at least half the budget.
    """
    import torch

    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    pairs = []
    for p, r in zip(prompts, responses):
        p, r = list(p), list(r)
        n_r = min(len(r), max(max_length - len(p), max_length // 2))
        n_p = min(len(p), max_length - n_r)
        pairs.append((p[len(p) - n_p:], r[:n_r]))

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = _device_of(model)
    token_chunks, index_chunks, state_chunks = [], [], []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        width = max(len(p) + len(r) for p, r in batch)
        # Right padding: with a causal mask, pads after a sequence cannot change its real tokens,
        # and the default position ids stay correct without passing them.
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        rows, cols = [], []
        for row, (p, r) in enumerate(batch):
            input_ids[row, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
            mask[row, :len(p) + len(r)] = 1
            rows += [row] * len(r)
            cols += range(len(p), len(p) + len(r))
            token_chunks.append(np.asarray(r, dtype=np.int64))
            index_chunks.append(np.full(len(r), start + row, dtype=np.int64))
        with torch.inference_mode():
            out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
        hidden = out.hidden_states
        chosen = [hidden[i] for i in layers] if layers is not None else list(hidden)
        rows_t, cols_t = torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)
        # Gather on the model's device, then move only the response tokens to CPU float32.
        state_chunks.append(torch.stack([h[rows_t.to(h.device), cols_t.to(h.device)] for h in chosen])
                            .float().cpu().numpy())

    n_layers = len(layers) if layers is not None else model.config.get_text_config().num_hidden_layers + 1
    hidden_size = state_chunks[0].shape[-1] if state_chunks else model.config.get_text_config().hidden_size
    return {
        "token_ids": np.concatenate(token_chunks) if token_chunks else np.zeros(0, np.int64),
        "example_index": np.concatenate(index_chunks) if index_chunks else np.zeros(0, np.int64),
        "layers": (np.concatenate(state_chunks, axis=1) if state_chunks
                   else np.zeros((n_layers, 0, hidden_size), np.float32)).astype(np.float32, copy=False),
    }


def content_ids(record: dict) -> list[int]:
    """A generation record's response ids without the EOS that ended it: EOS is not content, and
    as the last token it cannot change the hidden states before it."""
    ids = list(record["token_ids"])
    return ids[:-1] if record["finish_reason"] == "eos" and ids else ids


@dataclass(frozen=True)
class Subsample:
    """Which tokens a silhouette is computed on: `indices` (sorted) and how many labels they cover."""
    indices: np.ndarray
    labels_kept: int
    labels_eligible: int  # labels with 2+ tokens before the budget
    whole: bool  # every kept label kept all of its tokens

    def describe(self) -> str:
        how = "whole labels" if self.whole else "labels, each with 2+ of its tokens"
        return (f"{len(self.indices)} tokens of {self.labels_kept} {how} "
                f"({self.labels_eligible} labels had 2+ tokens)")


def token_subsample(labels: np.ndarray, max_points: int, seed: int) -> Subsample:
    """At most max_points tokens covering as many labels as the budget allows, each kept label with
    at least 2 tokens (a single token has no within-cluster distance: sklearn would score it 0).

    Every label with 2+ tokens is kept whole when they fit. Otherwise the largest
    min(#labels, max_points // 2) labels are kept (equal sizes in a seeded order), each gets 2
    tokens and the rest of the budget is shared in proportion to their remaining tokens
    (a stratified, seeded draw within each label). The same subsample serves every layer and the
    last layer's interval. Raises ValueError when fewer than 2 labels can be kept."""
    labels = np.asarray(labels)
    values, counts = np.unique(labels, return_counts=True)
    rng = np.random.default_rng(seed)
    eligible = [(int(c), v) for v, c in zip(values, counts) if c >= 2]
    n_labels = min(len(eligible), max_points // 2)
    if n_labels < 2:
        raise ValueError(f"silhouette needs at least 2 labels with 2+ tokens within max_points={max_points}; "
                         f"{n_labels} fit ({len(eligible)} of {len(values)} labels have 2+ tokens)")
    tiebreak = rng.permutation(len(eligible))
    ranked = [label for label, _ in sorted(zip(eligible, tiebreak), key=lambda item: (-item[0][0], item[1]))]
    kept = ranked[:n_labels]
    total = sum(count for count, _ in kept)
    if total <= max_points:
        return Subsample(np.flatnonzero(np.isin(labels, [v for _, v in kept])), n_labels, len(eligible), True)
    spare, capacity = max_points - 2 * n_labels, total - 2 * n_labels
    indices = []
    for count, value in kept:
        members = np.flatnonzero(labels == value)
        take = min(count, 2 + (spare * (count - 2)) // capacity if capacity else 2)
        indices.append(np.sort(rng.choice(members, size=take, replace=False)))
    return Subsample(np.sort(np.concatenate(indices)), n_labels, len(eligible), False)


def describe_subsample(labels: np.ndarray, max_points: int, seed: int) -> str:
    """What `token_subsample` keeps, in words, or why nothing could be kept."""
    try:
        return token_subsample(labels, max_points, seed).describe()
    except ValueError as error:
        return str(error)


def silhouette_by_layer(hidden: np.ndarray, labels: np.ndarray, metric: str = "cosine", max_points: int = 2000,
                        seed: int = 0) -> np.ndarray:
    """Silhouette score of `labels` in every layer of hidden [L, N, H]; returns [L].

    The same token subsample is used in every layer so the curve compares like with like.
    """
    from sklearn.metrics import silhouette_score

    labels = np.asarray(labels)
    if hidden.ndim != 3 or hidden.shape[1] != len(labels):
        raise ValueError(f"hidden must be [L, N, H] with N == len(labels); got {hidden.shape} and {len(labels)}")
    keep = token_subsample(labels, max_points, seed).indices
    return np.array([silhouette_score(layer[keep], labels[keep], metric=metric) for layer in hidden],
                    dtype=np.float64)


def top_token_labels(token_ids: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask [N], labels [mask.sum()]): tokens whose id is among the n most frequent; label = id."""
    token_ids = np.asarray(token_ids, dtype=np.int64)
    values, counts = np.unique(token_ids, return_counts=True)
    order = np.lexsort((values, -counts))  # most frequent first, ties to the smaller id
    mask = np.isin(token_ids, values[order[:n]])
    return mask, token_ids[mask]


def category_labels(example_index: np.ndarray, categories_per_example: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """(labels [N] int64, names): each token gets its example's category; names[label] is the string."""
    names = sorted(set(categories_per_example))
    code = {name: i for i, name in enumerate(names)}
    per_example = np.array([code[c] for c in categories_per_example], dtype=np.int64)
    return per_example[np.asarray(example_index, dtype=np.int64)], names


def project_2d(points: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """[N, 2] projection of L2-normalised points, so Euclidean geometry mirrors the cosine metric."""
    from sklearn.decomposition import PCA

    if method != "pca":
        raise ValueError(f"unknown projection method {method!r} (only 'pca')")
    points = np.asarray(points, dtype=np.float64)
    unit = points / np.maximum(np.linalg.norm(points, axis=1, keepdims=True), 1e-12)
    return PCA(n_components=2, random_state=seed).fit_transform(unit).astype(np.float32)


def plot_layer_curves(df, out_path: Path | str) -> Path:
    """Silhouette vs. layer, one line per method, one panel per view (columns method/layer/silhouette/view)."""
    import seaborn as sns
    from matplotlib.figure import Figure  # no pyplot: no global backend state, safe headless

    views = list(dict.fromkeys(df["view"]))
    fig = Figure(figsize=(4.5 * len(views), 3.5))
    from matplotlib.ticker import MaxNLocator

    axes = fig.subplots(1, len(views), squeeze=False, sharey=True)[0]
    for i, (ax, view) in enumerate(zip(axes, views)):
        sns.lineplot(data=df[df["view"] == view], x="layer", y="silhouette", hue="method", marker="o", ax=ax,
                     legend=i == len(views) - 1)
        ax.set_title(str(view))
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return atomic_save_figure(fig, out_path)


def plot_projection_pair(proj_a: np.ndarray, labels_a: np.ndarray, title_a: str, proj_b: np.ndarray,
                         labels_b: np.ndarray, title_b: str, out_path: Path | str,
                         label_names: Mapping | None = None, max_legend: int = 20) -> Path:
    """Two scatter panels side by side, coloured by label with one shared colour per label."""
    import seaborn as sns
    from matplotlib.figure import Figure

    classes = sorted(set(np.asarray(labels_a).tolist()) | set(np.asarray(labels_b).tolist()))
    palette = dict(zip(classes, sns.color_palette("husl", len(classes))))
    fig = Figure(figsize=(10, 4.5))
    axes = fig.subplots(1, 2)
    for ax, proj, labels, title in ((axes[0], proj_a, labels_a, title_a), (axes[1], proj_b, labels_b, title_b)):
        labels = np.asarray(labels)
        for label in classes:
            sel = labels == label
            if sel.any():
                name = str(label_names.get(label, label) if label_names is not None else label)
                # Decoded tokens often differ only by leading whitespace; repr makes that visible.
                ax.scatter(proj[sel, 0], proj[sel, 1], s=6, alpha=0.6, color=palette[label],
                           label=name if name.strip() == name and name else repr(name))
        ax.set_title(title)
    if len(classes) <= max_legend:
        axes[1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=2, frameon=False)
    return atomic_save_figure(fig, out_path)


def last_layer_ci(points: np.ndarray, labels: np.ndarray, examples: np.ndarray, max_points: int = 2000,
                  n_boot: int = 50, seed: int = 0) -> tuple[float, float, float, dict[int, float]]:
    """(silhouette, low, high, per response) of one layer: the mean of per-token silhouettes on a
    deterministic subsample, with a 95 % cluster-bootstrap interval over responses (`examples`),
    since tokens of one response are dependent, and each response's mean silhouette {example: value}
    (the units 07_report pairs across policies: the subsample depends on the labels only, and every
    policy reads the same token ids). Resampling tokens into the clustering itself would duplicate
    points at distance 0 and inflate the score, so the per-token values are computed once and resampled."""
    from sklearn.metrics import silhouette_samples

    rows = token_subsample(labels, max_points, seed).indices  # the tokens silhouette_by_layer scores
    rng = np.random.default_rng(seed)
    per_token = silhouette_samples(points[rows], labels[rows], metric="cosine")
    groups, group_of = np.unique(examples[rows], return_inverse=True)
    sums, sizes = np.bincount(group_of, weights=per_token), np.bincount(group_of)
    per_response = {int(g): float(total / size) for g, total, size in zip(groups, sums, sizes)}
    if n_boot < 1:
        return float(per_token.mean()), float("nan"), float("nan"), per_response
    index = rng.integers(0, len(groups), size=(n_boot, len(groups)))
    means = sums[index].sum(axis=1) / sizes[index].sum(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(per_token.mean()), float(low), float(high), per_response


# --- the stage --------------------------------------------------------------------------------

CURVES_FILE = "silhouette.csv"
CI_FILE = "silhouette_ci.csv"
UNIT_METRIC = "silhouette_token_last"  # per-response mean of the last layer's token silhouettes
LAYERS_FIGURE = "silhouette_layers.png"
PROJECTION_FIGURE = "projection.png"


def run_silhouette(run) -> dict:
    """Stage 06_silhouette: the base model's answers of 05_eval_harmless, teacher-forced on their
    ids through every alignment policy; silhouette per layer under two labellings (token: the
    `top_tokens` most frequent response tokens; category: the prompt's category), the last
    layer's score with a cluster-bootstrap interval over responses, and the projections of the
    two `silhouette.compare` policies. Returns {"curves": DataFrame, "ci": DataFrame, "figures": [paths]}."""
    import pandas as pd

    from udasa_lib.eval_harmless import GENERATIONS_DIR
    from udasa_lib.io import atomic_write_text, read_jsonl
    from udasa_lib.metrics import UNITS_FILE, write_units
    from udasa_lib.models import configure_threads, load_causal_lm
    from udasa_lib.policies import BASE, PolicySet, policy_adapters

    cfg, params = run.config, run.config.silhouette
    configure_threads(cfg.runtime.threads)
    adapters = policy_adapters(run, "alignment")
    unknown = [name for name in params.compare if name not in adapters]
    if unknown or len(params.compare) != 2:
        raise ValueError(f"silhouette.compare: needs two of {', '.join(adapters)}; got {list(params.compare)}")
    records = read_jsonl(run.upstream["05_eval_harmless"] / GENERATIONS_DIR / f"{BASE}.jsonl")
    records = [r for r in records if content_ids(r)][:params.responses]  # empty answers have no tokens
    model, tokenizer = load_causal_lm(cfg.model.name_or_path, cfg.model.dtype, cfg.runtime.device)
    policies = PolicySet(model, adapters)
    prompts, responses = [r["prompt_token_ids"] for r in records], [content_ids(r) for r in records]
    categories = [r["category"] or r["split"] for r in records]
    curves, last_layers, ci_rows, notes, unit_rows = [], {}, [], [], []
    for name in policies.names:
        with policies.use(name) as policy:
            states = response_hidden_states(policy, tokenizer, prompts, responses)
        token_mask, token_labels = top_token_labels(states["token_ids"], params.top_tokens)
        category_ids, _ = category_labels(states["example_index"], categories)
        views = {"token": (states["layers"][:, token_mask], token_labels, states["example_index"][token_mask]),
                 "category": (states["layers"], category_ids, states["example_index"])}
        for view, (hidden, labels, examples) in views.items():
            try:
                scores = silhouette_by_layer(hidden, labels, max_points=params.max_points, seed=cfg.seed)
            except ValueError as error:  # e.g. no token repeats in a tiny sample: recorded as missing, not dropped
                notes.append(f"{name}/{view}: {error}")
                scores = np.full(len(hidden), np.nan)
            curves += [{"method": name, "view": view, "layer": layer, "silhouette": float(s)}
                       for layer, s in enumerate(scores)]
            mean, low, high, per_response = (last_layer_ci(hidden[-1], labels, examples, params.max_points,
                                                           params.bootstrap, cfg.seed)
                                             if np.isfinite(scores[-1]) else (np.nan, np.nan, np.nan, {}))
            if view == "token" and per_response:
                unit_rows.append({"task": "alignment", "method": name, "metric": UNIT_METRIC,
                                  "units": [records[e]["id"] for e in per_response],
                                  "unit_values": list(per_response.values())})
            ci_rows.append({"method": name, "view": view, "layer": len(scores) - 1, "silhouette": float(mean),
                            "ci_low": float(low), "ci_high": float(high), "n_responses": len(records),
                            "n_tokens": int(len(labels)),
                            "subsample": describe_subsample(labels, params.max_points, cfg.seed)})
            if view == "token" and name in params.compare:
                last_layers[name] = (hidden[-1], labels)
    curves, ci_table = pd.DataFrame(curves), pd.DataFrame(ci_rows)
    atomic_write_text(run.dir / CURVES_FILE, curves.to_csv(index=False))
    atomic_write_text(run.dir / CI_FILE, ci_table.to_csv(index=False))
    write_units(run.dir / UNITS_FILE, unit_rows)
    plot_layer_curves(curves, run.dir / LAYERS_FIGURE)
    (name_a, (hidden_a, labels_a)), (name_b, (hidden_b, labels_b)) = [(n, last_layers[n]) for n in params.compare]
    names = {int(t): tokenizer.decode([int(t)]) for t in np.unique(np.concatenate([labels_a, labels_b]))}
    plot_projection_pair(project_2d(hidden_a, seed=cfg.seed), labels_a, f"{name_a}, last layer",
                         project_2d(hidden_b, seed=cfg.seed), labels_b, f"{name_b}, last layer",
                         run.dir / PROJECTION_FIGURE, label_names=names)
    run.add_to_manifest(responses=len(records), top_tokens=params.top_tokens)
    return {"curves": curves, "ci": ci_table, "notes": notes,
            "figures": [run.dir / LAYERS_FIGURE, run.dir / PROJECTION_FIGURE]}
