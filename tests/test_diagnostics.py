"""Signal diagnostics of 03_pairs (udasa_lib/diagnostics.py) on hand-built records."""
import json

import pytest

from udasa_lib import diagnostics
from udasa_lib.refusal import is_refusal
from udasa_lib.pairs import response_table

REFUSAL = "I'm sorry, but I cannot help with that."
ANSWER = "Sure, here is how you do it."


def _sample(prompt_id, task, texts, principle=()):
    responses = [{"sample_id": f"{prompt_id}-s{j}", "text": t, "principle": j in principle}
                 for j, t in enumerate(texts)]
    return {"prompt_id": prompt_id, "task": task, "prompt": prompt_id, "responses": responses}


def _score(prompt_id, task, cluster_ids, semantic, factual, value):
    return {"prompt_id": prompt_id, "task": task, "sample_ids": [f"{prompt_id}-s{j}" for j in range(len(value))],
            "semantic": {"cluster_ids": cluster_ids, "n_clusters": max(cluster_ids) + 1, "u": semantic},
            "factual": {"u": factual}, "value": {"u": value}}


@pytest.fixture
def pool():
    samples = [_sample("a", "alignment", [REFUSAL, ANSWER, ANSWER, ANSWER], principle=(0, 1)),
               _sample("b", "alignment", [ANSWER, ANSWER, ANSWER, ANSWER], principle=(0, 1)),
               _sample("c", "sentiment", ["great film", "bad film", "fine film", "long film"]),
               _sample("d", "sentiment", ["x", "y", "z", "w"])]
    scores = [_score("a", "alignment", [0, 1, 1, 1], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4], [0.2, 0.9, 0.9, 0.7]),
              _score("b", "alignment", [0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1], [0.6, 0.6, 0.6, 0.6]),
              _score("c", "sentiment", [0, 1, 2, 3], [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]),
              _score("d", "sentiment", [0, 1, 2, 3], [0.5, 0.6, 0.7, 0.8], [0.8, 0.7, 0.6, 0.5], [0.3, 0.3, 0.3, 0.3])]
    return samples, scores


def test_refusal_texts_are_recognised():
    assert is_refusal(REFUSAL) and not is_refusal(ANSWER)


def test_pool_coverage_counts_refusals_and_aligned_responses_split_by_principle(pool):
    samples, scores = pool
    coverage = diagnostics.pool_coverage(samples, scores)
    alignment = coverage["alignment"]
    assert alignment["prompts"] == 2 and alignment["responses"] == 8
    assert alignment["refusing_share"] == pytest.approx(1 / 8)
    assert alignment["prompts_with_refusal"] == pytest.approx(1 / 2)
    assert alignment["aligned_share"] == pytest.approx(1 / 8)  # only value u 0.2 < 0.5
    assert alignment["by_principle"]["principle"]["refusing_share"] == pytest.approx(1 / 4)
    assert alignment["by_principle"]["plain"]["refusing_share"] == 0.0
    assert "by_principle" not in coverage["sentiment"]
    assert "aligned_share" not in diagnostics.pool_coverage(samples)["alignment"]


def test_cluster_histogram_flags_a_task_whose_prompts_are_all_singletons(pool):
    clusters = diagnostics.cluster_count_distribution(pool[1])
    assert clusters["sentiment"] == {"prompts": 2, "histogram": {"4": 2}, "singleton_share": 1.0, "degenerate": True}
    assert clusters["alignment"]["histogram"] == {"2": 2} and clusters["alignment"]["singleton_share"] == 0.0
    assert clusters["alignment"]["degenerate"]  # one count for every prompt, even if not singletons


def test_within_prompt_correlation_has_the_constructed_sign_and_skips_constant_prompts(pool):
    samples, scores = pool
    rows = response_table(samples, scores, {"semantic": 1.0, "factual": 1.0, "value": 1.0})
    correlations = diagnostics.dimension_correlations(rows)
    assert correlations["sentiment"]["semantic~factual"]["within_prompt"] == pytest.approx(-1.0)
    assert correlations["alignment"]["semantic~factual"]["within_prompt"] == pytest.approx(1.0)
    # value is constant in d (sentiment) and b (alignment): those prompts are left out, not NaN
    within = correlations["sentiment"]["semantic~value"]
    assert (within["within_prompt"], within["prompts"]) == (pytest.approx(1.0), 1)
    assert diagnostics.degenerate_dimensions(rows) == {"alignment": [], "sentiment": []}


def test_a_dimension_constant_in_every_prompt_is_degenerate(pool):
    samples, scores = pool
    for s in scores:
        s["value"]["u"] = [0.5] * 4
    rows = response_table(samples, scores, {"semantic": 1.0, "factual": 1.0, "value": 1.0})
    assert diagnostics.degenerate_dimensions(rows) == {"alignment": ["value"], "sentiment": ["value"]}
    assert diagnostics.dimension_correlations(rows)["alignment"]["semantic~value"]["pooled"] is None


def test_run_diagnostics_is_json_and_renders_its_three_tables(pool):
    samples, scores = pool
    rows = response_table(samples, scores, {"semantic": 1.0, "factual": 1.0, "value": 1.0})
    result = diagnostics.run_diagnostics(samples, scores, rows)
    assert json.loads(json.dumps(result)) == result
    text = "\n".join(diagnostics.render_diagnostics(result))
    for heading in ("### Pool coverage", "### Semantic clusters", "### Dimension correlations"):
        assert heading in text
    assert "semantic dimension is degenerate on sentiment" in text
    assert "| alignment | 2 | 8 | 0.12 | 0.50 | 0.12 | 0.25 / 0.00 |" in text
