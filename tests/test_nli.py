"""The NLI path of 02_score (score.semantic.equivalence: nli, score.factual.agreement: nli), through
the real classifier interface: a sequence-classification folder loaded by NLIEntailment.

The classifier here is assets.tiny_nli_classifier with its weights set by hand so that its answer
is known: attention and MLP outputs are zero, so the last token's embedding alone reaches the
head. A hypothesis ending in "." is entailed (logits +L for entailment, -L for contradiction),
anything else is not (the opposite), whatever the premise. P(entailment) is then
e^L / (e^L + 1 + e^-L) or e^-L / (e^L + 1 + e^-L), and every clustering and SelfCheck score
below is worked out by hand from that rule.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from udasa_lib import REPO_ROOT, config, score
from udasa_lib.assets import MNLI_LABELS, tiny_nli_classifier

L = 2.0
P_YES = math.exp(L) / (math.exp(L) + 1 + math.exp(-L))  # hypothesis ends in "."
P_NO = math.exp(-L) / (math.exp(L) + 1 + math.exp(-L))
REVERSED_LABELS = {0: "ENTAILMENT", 1: "NEUTRAL", 2: "CONTRADICTION"}


def _build(folder, tiny_model_path, id2label):
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    model = tiny_nli_classifier(tokenizer, id2label=id2label)
    period = tokenizer.convert_tokens_to_ids(".")
    hidden = model.config.hidden_size
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = -1.0
        model.model.embed_tokens.weight[period, 0] = 1.0
        # RMSNorm turns +-e_0 into +-sqrt(hidden) e_0; the head maps that to +-L
        head = model.score.weight
        head.zero_()
        labels = {v.lower(): k for k, v in id2label.items()}
        head[labels["entailment"], 0] = L / math.sqrt(hidden)
        head[labels["contradiction"], 0] = -L / math.sqrt(hidden)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=[MNLI_LABELS, REVERSED_LABELS], ids=["mnli-order", "entailment-first"])
def nli(request, tmp_path_factory, tiny_model_path):
    folder = _build(tmp_path_factory.mktemp("nli"), tiny_model_path, request.param)
    return score.NLIEntailment(str(folder), "cpu")


def test_the_label_mapping_is_read_from_the_model_config(nli):
    expected = 0 if nli.labels[0] == "entailment" else 2
    assert nli.entail_index == expected
    probs = nli.probabilities(["whatever", "whatever"], ["A cat sat.", "It rains"])
    assert probs.shape == (2, 3)
    np.testing.assert_allclose(nli.entailment_probability(["x", "y"], ["A cat sat.", "It rains"]), [P_YES, P_NO],
                               atol=1e-4)
    assert nli.entails("It rains", "A cat sat.") and not nli.entails("A cat sat.", "It rains")


def test_the_hand_built_rule_holds_batched_and_padded(nli):
    # pairs of very different lengths in one batch: padding must not move the pooled token
    premises = ["x", "a much longer premise with many words in it", "y", "z"]
    hypotheses = ["Dogs bark.", "It rains", "one two three four five six seven.", "Birds sing"]
    np.testing.assert_allclose(nli.entailment_probability(premises, hypotheses), [P_YES, P_NO, P_YES, P_NO], atol=1e-4)


def test_empty_texts_are_decided_without_the_model(nli):
    # a decoder tokenizer encodes ("", "") to no tokens at all: the model is never asked
    np.testing.assert_allclose(nli.entailment_probability(["", "", "x", " "], ["", "A cat sat.", "", "It rains"]),
                               [1.0, 0.0, 0.0, 0.0])
    assert nli.entailment_matrix(["", "", "A cat sat."]).tolist() == [[True, True, False], [True, True, False],
                                                                      [False, False, True]]
    assert nli.probabilities(["", "x"], ["y", ""]).sum(axis=1).tolist() == [1.0, 1.0]


def test_the_classifier_pads_with_the_id_its_config_names(tmp_path, tiny_model_path):
    import json

    folder = _build(tmp_path, tiny_model_path, MNLI_LABELS)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["pad_token_id"] = 0  # not the tokenizer's pad token: pooling finds the last non-pad by this id
    (folder / "config.json").write_text(json.dumps(cfg))
    loaded = score.NLIEntailment(str(folder))
    assert loaded.tokenizer.pad_token_id == 0
    assert loaded.max_length == cfg["max_position_embeddings"]
    np.testing.assert_allclose(loaded.entailment_probability(["x", "a much longer premise"], ["A cat sat.", "It rains"]),
                               [P_YES, P_NO], atol=1e-4)


def test_equivalence_needs_entailment_in_both_directions(nli):
    texts = ["It rains", "A cat sat.", "Dogs bark.", "Birds sing"]
    entails = nli.entailment_matrix(texts)
    # entails[i, j] depends on text j alone: True where it ends in "."
    assert entails.tolist() == [[True, True, True, False], [False, True, True, False],
                                [False, True, True, False], [False, True, True, True]]
    both = score.cluster_by_equivalence(4, score.bidirectional(lambda a, b: bool(entails[a, b])))
    assert both == [0, 1, 1, 2]
    # either direction alone would cluster differently
    assert score.cluster_by_equivalence(4, lambda a, b: bool(entails[a, b])) == [0, 0, 0, 1]
    assert score.cluster_by_equivalence(4, lambda a, b: bool(entails[b, a])) == [0, 1, 1, 1]


@pytest.mark.parametrize("aggregate", ["mean", "max"])
def test_selfcheck_nli_aggregates_entailment_of_each_sentence(nli, aggregate):
    texts = ["It rains. Birds sing", "A cat sat.", "", "Dogs bark. Fish swim."]
    sentences = [score.split_sentences(t) for t in texts]
    assert sentences == [["It rains.", "Birds sing"], ["A cat sat."], [], ["Dogs bark.", "Fish swim."]]
    # support(s) over the other three samples; the empty sample supports nothing
    if aggregate == "mean":
        expected = [1 - (P_YES + P_NO) / 3, 1 - 2 * P_YES / 3, 1.0, 1 - 2 * P_YES / 3]
    else:
        expected = [1 - (P_YES + P_NO) / 2, 1 - P_YES, 1.0, 1 - P_YES]
    np.testing.assert_allclose(score._selfcheck_nli(sentences, texts, nli, aggregate), expected, atol=1e-4)


def test_score_prompt_takes_the_nli_branches_of_paper_config(nli):
    cfg = config.resolve(REPO_ROOT / "configs" / "paper_smoke.yaml").score
    assert (cfg.semantic.equivalence, cfg.factual.agreement, cfg.factual.aggregate) == ("nli", "nli", "mean")
    texts = ["It rains", "A cat sat.", "Dogs bark.", "Birds sing"]
    record = {"prompt_id": "p0", "task": "alignment",
              "responses": [{"sample_id": f"s{i}", "text": t, "token_logprobs": [-1.0, -1.0]} for i, t in enumerate(texts)]}
    scored = score.score_prompt(record, cfg, embedder=None, nli=nli)
    assert scored["semantic"]["cluster_ids"] == [0, 1, 1, 2]
    # equal likelihoods: the weighted p(c) is |c|/K = 1/4, 2/4, 1/4, so u = -log p / log 4
    np.testing.assert_allclose(scored["semantic"]["u"], [1.0, 0.5, 0.5, 1.0], atol=1e-9)
    np.testing.assert_allclose(scored["factual"]["u"], [1 - P_NO, 1 - P_YES, 1 - P_YES, 1 - P_NO], atol=1e-4)


def test_a_classifier_without_an_entailment_label_is_refused(tmp_path, tiny_model_path):
    folder = _build(tmp_path, tiny_model_path, {0: "contradiction", 1: "neutral", 2: "entailment"})
    import json

    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["id2label"] = {"0": "negative", "1": "neutral", "2": "positive"}
    cfg["label2id"] = {"negative": 0, "neutral": 1, "positive": 2}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no entailment label"):
        score.NLIEntailment(str(folder))
