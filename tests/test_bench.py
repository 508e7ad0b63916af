"""`make bench`'s own arithmetic and a run of its generation part on the tiny model (speed goals
are measured by `make bench`, never asserted here)."""
from __future__ import annotations

import json

from udasa_lib import bench


def test_flops_per_token_counts_every_linear_layer_once(tiny_model):
    import torch

    model, _ = tiny_model
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert bench.flops_per_token(model) == 2 * sum(m.weight.numel() for m in linear)
    assert any(m is model.get_output_embeddings() for m in linear), "the LM head is a matmul per token"
    assert bench.matmul_rate(model, rows=4, repeats=1) > 0


def test_generation_bench_runs_and_writes_its_figures(tmp_path):
    out = tmp_path / "bench"
    assert bench.main(["--config", "configs/smoke.yaml", "--only", "generation", "--prompts", "4",
                       "--baseline-prompts", "1", "--out", str(out)]) == 0
    result = json.loads((out / bench.BENCH_FILE).read_text())
    generation = result["generation"]
    assert generation["identical_rows"] == generation["rows"] == 4 * generation["k"]
    for engine in ("hf", "loop"):
        assert generation[engine]["tokens"] > 0
        assert generation[engine]["max_abs_logprob_diff_vs_teacher_forcing"] < 1e-4
    assert (out / bench.BENCH_FIGURE).exists()


def test_judge_bench_runs_and_the_prefix_cache_changes_no_value(tmp_path):
    out = tmp_path / "bench"
    assert bench.main(["--config", "configs/smoke.yaml", "--only", "judge", "--judge-texts", "6",
                       "--out", str(out)]) == 0
    judge = json.loads((out / bench.BENCH_FILE).read_text())["judge"]
    paths = judge["paths"]
    assert set(paths) == {"shared prefix, float32", "no prefix cache, float32", "pairwise (both orders), float32",
                          "shared prefix, bfloat16"}
    assert paths["no prefix cache, float32"]["max_abs_p_yes_diff_vs_today"] < 1e-5
    assert all(row["judgments_per_s"] > 0 for row in paths.values())
