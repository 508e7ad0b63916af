"""udasa_lib.silhouette: silhouette maths on synthetic clusters, labelling helpers, the
teacher-forced hidden-state extraction on the tiny model, and the plot helpers."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import silhouette_score

from udasa_lib import silhouette as sil


def _two_layers(n_per: int = 100, k: int = 4, dim: int = 32, seed: int = 0):
    """Layer 0: tight clusters around k random directions; layer 1: pure noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim))
    labels = np.repeat(np.arange(k), n_per)
    clustered = centres[labels] * 10 + rng.normal(size=(len(labels), dim))
    noise = rng.normal(size=(len(labels), dim))
    return np.stack([clustered, noise]).astype(np.float32), labels


def test_silhouette_separated_vs_random_and_matches_sklearn():
    hidden, labels = _two_layers()
    scores = sil.silhouette_by_layer(hidden, labels)
    assert scores.shape == (2,)
    assert scores[0] > 0.8
    assert abs(scores[1]) < 0.1
    for layer in range(2):
        assert scores[layer] == pytest.approx(silhouette_score(hidden[layer], labels, metric="cosine"), abs=1e-6)


def test_silhouette_subsamples_deterministically():
    hidden, labels = _two_layers(n_per=200)
    a = sil.silhouette_by_layer(hidden, labels, max_points=300, seed=1)
    b = sil.silhouette_by_layer(hidden, labels, max_points=300, seed=1)
    np.testing.assert_array_equal(a, b)
    assert a[0] > 0.8 and abs(a[1]) < 0.1


def test_silhouette_drops_singletons_and_needs_two_labels():
    hidden, labels = _two_layers(n_per=20, k=2)
    labels = labels.copy()
    labels[0] = 99  # a single-member label: it must be ignored, not scored as 0
    keep = labels != 99
    expected = silhouette_score(hidden[0][keep], labels[keep], metric="cosine")
    assert sil.silhouette_by_layer(hidden, labels)[0] == pytest.approx(expected, abs=1e-6)

    one_label = np.zeros(len(labels), dtype=int)
    one_label[0] = 5  # singleton dropped -> one label left
    with pytest.raises(ValueError, match="at least 2 labels"):
        sil.silhouette_by_layer(hidden, one_label)


def test_subsample_keeps_as_many_labels_as_fit_each_with_two_tokens():
    pairs_of_two = np.repeat(np.arange(30), 2)  # 30 labels of 2 tokens
    kept = sil.token_subsample(pairs_of_two, max_points=30, seed=0)
    assert (kept.labels_kept, len(kept.indices), kept.labels_eligible) == (15, 30, 30)
    assert set(np.unique(pairs_of_two[kept.indices], return_counts=True)[1]) == {2}
    assert sil.token_subsample(pairs_of_two, max_points=20, seed=0).labels_kept == 10
    assert sil.token_subsample(pairs_of_two, max_points=21, seed=0).labels_kept == 10
    everything = sil.token_subsample(pairs_of_two, max_points=60, seed=0)
    assert everything.whole and everything.labels_kept == 30 and len(everything.indices) == 60
    assert sil.describe_subsample(pairs_of_two, 30, 0).startswith("30 tokens of 15 whole labels")

    # labels of 2, 3, 5 and 40 tokens and a singleton, budget 10: all four kept, 2 tokens each,
    # the 2 spare tokens go to the label with the most tokens left
    mixed = np.array([0] * 2 + [1] * 3 + [2] * 5 + [3] * 40 + [4])
    kept = sil.token_subsample(mixed, max_points=10, seed=0)
    assert (kept.labels_kept, kept.labels_eligible, kept.whole) == (4, 4, False)
    assert np.unique(mixed[kept.indices], return_counts=True)[1].tolist() == [2, 2, 2, 3]
    # four labels of 200 tokens, budget 300: all four labels, 75 tokens each
    big = np.repeat(np.arange(4), 200)
    assert np.unique(big[sil.token_subsample(big, 300, seed=1).indices], return_counts=True)[1].tolist() == [75] * 4
    a, b = sil.token_subsample(big, 300, seed=3), sil.token_subsample(big, 300, seed=3)
    np.testing.assert_array_equal(a.indices, b.indices)
    with pytest.raises(ValueError, match="1 fit"):
        sil.token_subsample(np.array([0] * 3 + [1] * 50), max_points=3, seed=0)


def test_top_token_labels_and_category_labels():
    ids = np.array([5, 3, 5, 7, 3, 9, 7, 5, 1])
    # counts: 5->3, 3->2, 7->2, 1->1, 9->1; the 3-vs-7 tie goes to the smaller id
    mask, labels = sil.top_token_labels(ids, 2)
    np.testing.assert_array_equal(mask, [True, True, True, False, True, False, False, True, False])
    np.testing.assert_array_equal(labels, [5, 3, 5, 3, 5])
    mask, labels = sil.top_token_labels(ids, 4)  # 1 and 9 tie at count 1: 1 wins
    np.testing.assert_array_equal(labels, [5, 3, 5, 7, 3, 7, 5, 1])

    cats, names = sil.category_labels(np.array([0, 0, 1, 2, 2]), ["harm", "benign", "harm"])
    assert names == ["benign", "harm"]
    np.testing.assert_array_equal(cats, [1, 1, 0, 1, 1])


def test_response_hidden_states_on_tiny_model(tiny_model):
    import torch

    model, tokenizer = tiny_model
    prompts = ["<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>user\nTell me a much longer story about cats and dogs<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>user\nOk<|im_end|>\n<|im_start|>assistant\n"]
    responses = ["Hello!", "Once upon a time there were two friends who lived together.", "Sure"]
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    responses = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in responses]
    out = sil.response_hidden_states(model, tokenizer, prompts, responses, batch_size=2)

    n_resp = [len(r) for r in responses]
    cfg = model.config
    assert out["layers"].shape == (cfg.num_hidden_layers + 1, sum(n_resp), cfg.hidden_size)
    assert out["layers"].dtype == np.float32
    assert out["token_ids"].dtype == np.int64
    np.testing.assert_array_equal(out["example_index"], np.repeat(np.arange(3), n_resp))

    # Example 0 is padded to example 1's length in the first batch: its response vectors must
    # equal an unpadded single forward pass, which pins both the padding and the boundary.
    p, r = prompts[0], responses[0]
    with torch.inference_mode():
        direct = model(input_ids=torch.tensor([p + r]), output_hidden_states=True).hidden_states
    sel = out["example_index"] == 0
    np.testing.assert_array_equal(out["token_ids"][sel], r)
    np.testing.assert_allclose(out["layers"][-1][sel], direct[-1][0, len(p):].numpy(), atol=1e-4)
    np.testing.assert_allclose(out["layers"][0][sel], direct[0][0, len(p):].numpy(), atol=1e-5)

    only = sil.response_hidden_states(model, tokenizer, prompts, responses, batch_size=8, layers=[-1])
    assert only["layers"].shape == (1, sum(n_resp), cfg.hidden_size)
    np.testing.assert_allclose(only["layers"][0], out["layers"][-1], atol=1e-4)


def test_project_2d_and_plots_write_pngs(tmp_path):
    hidden, labels = _two_layers(n_per=30, k=3)
    proj = sil.project_2d(hidden[0])
    assert proj.shape == (90, 2)
    # scale-invariant, because the points are L2-normalised first
    np.testing.assert_allclose(np.abs(sil.project_2d(hidden[0] * 7.0)), np.abs(proj), atol=1e-4)

    df = pd.DataFrame([{"method": m, "layer": layer, "silhouette": s, "view": v}
                       for m in ("base", "ual") for v in ("top tokens", "category")
                       for layer, s in enumerate(np.linspace(0, 0.5, 3) + (m == "ual") * 0.1)])
    curves = sil.plot_layer_curves(df, tmp_path / "curves.png")
    pair = sil.plot_projection_pair(proj, labels, "base", sil.project_2d(hidden[1]), labels, "ual",
                                    tmp_path / "sub" / "pair.png", label_names={0: " the", 1: "cat", 2: "\n"})
    for path in (curves, pair):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert not list(tmp_path.rglob("*.tmp"))


def test_last_layer_ci_is_the_score_with_an_interval_over_responses():
    from sklearn.metrics import silhouette_samples, silhouette_score

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 40)
    points = rng.normal(size=(120, 8)) + labels[:, None] * 1.5
    examples = np.arange(120) // 6  # 20 "responses" of 6 tokens
    value, low, high, per_response = sil.last_layer_ci(points, labels, examples, max_points=500, n_boot=200, seed=0)
    assert value == pytest.approx(silhouette_score(points, labels, metric="cosine"), abs=1e-9)
    assert low < value < high
    # every response once, its tokens' mean; equal-sized responses average back to the score
    per_token = silhouette_samples(points, labels, metric="cosine")
    assert list(per_response) == list(range(20))
    assert per_response[3] == pytest.approx(per_token[18:24].mean(), abs=1e-12)
    assert np.mean(list(per_response.values())) == pytest.approx(value, abs=1e-9)
    with pytest.raises(ValueError, match="2 labels"):
        sil.last_layer_ci(points, np.arange(120), examples)
