"""02_score: the three uncertainties on hand-computed cases and against scipy, the self-judge, the leakage guard."""
import ast
import math
import random

import numpy as np
import pytest
from scipy.stats import entropy as scipy_entropy
from sklearn.preprocessing import minmax_scale

from udasa_lib import pairs as pairing
from udasa_lib import score
from udasa_lib import REPO_ROOT


# ----------------------------------------------------------------------------- semantic

def test_clustering_rule_with_a_stub_equivalence():
    texts = ["apple", "avocado", "banana", "apricot", "blueberry", "cherry"]
    ids = score.cluster_by_equivalence(len(texts), lambda a, b: texts[a][0] == texts[b][0])
    assert ids == [0, 0, 1, 0, 1, 2]


def test_bidirectional_entailment_needs_both_directions():
    # 0 entails 1 but not back (1 is vaguer); 2 and 0 entail each other
    one_way = {(0, 1), (0, 2), (2, 0), (1, 1), (0, 0), (2, 2)}
    equivalent = score.bidirectional(lambda a, b: (a, b) in one_way)
    assert score.cluster_by_equivalence(3, equivalent) == [0, 1, 0]


def test_clustering_compares_with_the_first_member_only():
    # 1 ~ 0 and 2 ~ 1 but 2 !~ 0: Kuhn et al. compare with the cluster's first member, so 2 opens a cluster
    similar = {(0, 1), (1, 2)}
    ids = score.cluster_by_equivalence(3, lambda a, b: (min(a, b), max(a, b)) in similar)
    assert ids == [0, 0, 1]


def test_discrete_semantic_entropy_matches_scipy():
    p = score.cluster_probabilities([0, 0, 1, 2])
    np.testing.assert_allclose(p, [0.5, 0.25, 0.25])
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert score.semantic_entropy(p) == pytest.approx(expected)
    assert score.semantic_entropy(p) == pytest.approx(scipy_entropy([2, 1, 1]))


def test_weighted_semantic_entropy():
    # likelihood mass 0.2 + 0.2 in cluster 0, 0.6 in cluster 1
    p = score.cluster_probabilities([0, 0, 1], weights=[0.2, 0.2, 0.6])
    np.testing.assert_allclose(p, [0.4, 0.6])
    assert score.semantic_entropy(p) == pytest.approx(scipy_entropy([0.4, 0.6]))
    # all-zero weights (e.g. only empty responses) fall back to counts
    np.testing.assert_allclose(score.cluster_probabilities([0, 1], weights=[0, 0]), [0.5, 0.5])
    assert score.length_normalised_likelihood([math.log(0.5), math.log(0.5)]) == pytest.approx(0.5)
    assert score.length_normalised_likelihood([]) == 0.0


def test_semantic_uncertainty_per_response():
    ids = [0, 0, 1, 2]
    u = score.semantic_uncertainty(ids, score.cluster_probabilities(ids))
    assert u == pytest.approx([0.5, 0.5, 1.0, 1.0])  # -log(1/2)/log 4 and -log(1/4)/log 4
    assert score.semantic_uncertainty([0, 0, 0], np.array([1.0])) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="K >= 2"):
        score.semantic_uncertainty([0], np.array([1.0]))


# ----------------------------------------------------------------------------- factual

def test_selfcheck_on_hand_made_embeddings():
    e = np.eye(3)
    # y0 = {x}, y1 = {x, y}, y2 = {z}, y3 = nothing
    sentences = [e[[0]], e[[0, 1]], e[[2]], np.zeros((0, 3))]
    u = score.selfcheck_uncertainty(sentences, "mean")
    # y0's sentence x: agreement with y1 = 1, y2 = 0, y3 = 0 -> support 1/3
    assert u[0] == pytest.approx(1 - 1 / 3)
    # y1: x -> (1 + 0 + 0)/3, y -> 0 -> mean support 1/6
    assert u[1] == pytest.approx(1 - 1 / 6)
    assert u[2] == pytest.approx(1.0) and u[3] == 1.0
    assert score.selfcheck_uncertainty(sentences, "max")[0] == pytest.approx(0.0)


def test_sentence_split_and_token_nll():
    assert score.split_sentences("One. Two!  Three?\nFour") == ["One.", "Two!", "Three?", "Four"]
    assert score.split_sentences("") == []
    assert score.token_nll([-1.0, -3.0]) == pytest.approx(2.0)
    assert score.token_nll([]) == 0.0


# ----------------------------------------------------------------------------- combination and pairs

def test_minmax_matches_sklearn_and_constant_is_zero():
    values = [0.2, 0.5, 0.9, 0.2]
    np.testing.assert_allclose(pairing.minmax_within(values), minmax_scale(values))
    np.testing.assert_array_equal(pairing.minmax_within([0.7, 0.7, 0.7]), [0, 0, 0])


def test_vader_maps_sentiment_to_p_aligned():
    p = score.vader_p_aligned(["What a wonderful, moving film.", "Awful and boring.", ""])
    assert p[0] > 0.5 > p[1] and p[2] == pytest.approx(0.5)


def test_ground_truth_reward_is_not_reachable_from_scoring_pairing_or_training():
    """No import path, direct or through other modules (function-level imports included), leads from
    what builds or trains on pairs to the evaluator's ground truth."""
    from udasa_lib.pipeline import module_closure

    for module in ("score", "value_probe", "pairs", "train", "trainers", "on_policy", "ual", "methods"):
        reached = module_closure(module)
        assert "udasa_lib/sentiment_reward.py" not in reached, f"{module} reaches the ground truth: {reached}"
        assert "udasa_lib/controls.py" not in reached, f"{module} reaches the oracle pairs' builder: {reached}"


def test_only_the_positive_control_trains_on_evaluator_labelled_pairs():
    from udasa_lib import controls, train
    from udasa_lib.methods import EVALUATOR_PAIR_SETS, METHODS

    readers = {name for name, spec in METHODS.items() if spec.pair_set in EVALUATOR_PAIR_SETS}
    assert readers == {"dpo_oracle"}
    assert {train.PAIRS_FILES[s] for s in EVALUATOR_PAIR_SETS} == {controls.ORACLE_FILE}
    assert all(METHODS[m].needs_ground_truth for m in readers)


def test_empty_generations_are_scored_not_crashed_on():
    from udasa_lib import config
    from conftest import SMOKE_CONFIG

    cfg = config.resolve(SMOKE_CONFIG).score
    record = {"prompt_id": "p", "task": "sentiment", "responses": [
        {"sample_id": "p-s0", "text": "", "token_logprobs": [], "token_ids": []},
        {"sample_id": "p-s1", "text": "A fine film. I liked it.", "token_logprobs": [-1.0, -2.0], "token_ids": [1, 2]},
        {"sample_id": "p-s2", "text": "A fine movie. I enjoyed it.", "token_logprobs": [-1.5], "token_ids": [3]}]}
    result = score.score_prompt(record, cfg, score.Embedder(cfg.embedder), None)
    assert result["factual"]["u"][0] == 1.0 and result["empty"] == [True, False, False]
    assert all(0 <= u <= 1 for u in result["semantic"]["u"])
    assert result["semantic"]["n_clusters"] in (2, 3)


def test_a_single_response_is_a_clear_error():
    from udasa_lib import config
    from conftest import SMOKE_CONFIG

    cfg = config.resolve(SMOKE_CONFIG).score
    record = {"prompt_id": "lonely", "task": "t", "responses": [{"sample_id": "x", "text": "a", "token_logprobs": []}]}
    with pytest.raises(ValueError, match="prompt lonely: 1 response"):
        score.score_prompt(record, cfg, None, None)
