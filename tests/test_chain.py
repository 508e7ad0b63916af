"""The whole chain on configs/smoke.yaml through papermill, 00_data to 07_report, and the rule
that a training change reruns training and what follows it, nothing before."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from udasa_lib import config as config_mod
from udasa_lib import pipeline, report
from conftest import SMOKE_CONFIG


@pytest.fixture(scope="module")
def chain(smoke_data):
    return pipeline.run_through("07_report", SMOKE_CONFIG)


def test_every_stage_has_its_manifest(chain):
    cfg = config_mod.resolve(SMOKE_CONFIG)
    expected = {(stage, variant) for stage in pipeline.STAGES for variant in pipeline.variants(cfg, stage)}
    assert {(run.name, run.variant) for run in chain} == expected
    for run in chain:
        manifest = json.loads((run.dir / pipeline.MANIFEST).read_text())
        assert manifest["key"] == run.key and manifest["outputs"], f"{run.name} {run.variant}"


def test_report_tables_are_present_and_not_empty(chain):
    run_dir = chain[-1].run_dir
    report_dir = run_dir / "report"
    text = (report_dir / "REPORT.md").read_text()
    for heading in ("## Results: the papers' claims, tested", "## Instruments", "## Controls", "## Inferred choices",
                    "## Preliminary study", "## Details", "## Resolved config"):
        assert heading in text
    claims = pd.read_csv(report_dir / "claims.csv")
    assert len(claims) == len(report.CLAIMS) + 2  # + the preliminary study's two
    assert set(claims.verdict.str.split(" [(]").str[0]) <= {
        report.SUPPORTED, report.CONTRADICTED, report.NO_DIFFERENCE, report.INSTRUMENT_NOT_VALID, report.NOT_RUN}
    # the smoke config trains one method per task: the preliminary study's claims are tested, and
    # every trained method against base on paired units
    tested = claims[claims.verdict != report.NOT_RUN]
    assert len(tested) >= 1 and (tested["n"].astype(int) >= 2).all()  # smoke: too few pairs per stage for the other
    # every instrument's agreement with human labels was measured by 05_validity and is printed
    assert "not measured" not in text and "known-direction agreement" in text and "balanced accuracy" in text
    controls = pd.read_csv(report_dir / "controls.csv")
    assert set(controls.comparison) >= {f"{m} vs base" for m in cfg_methods() if m != "base"}
    table = pd.read_csv(report_dir / "results_table.csv")
    cfg = config_mod.resolve(SMOKE_CONFIG)
    for task, methods in cfg.train.methods.items():
        assert set(table[table.task == task].method) == {"base", *methods}
    # evaluation rows are complete; the tiny model's token view of the silhouette may be missing (no repeats)
    evaluations = table[table.stage.str.startswith("05_eval_")]
    assert evaluations[["value", "ci_low", "ci_high"]].notna().all().all()
    assert (report_dir / "07_report.html").stat().st_size > 10_000
    for figure in ("harmless.png", "winrate.png", "reward_kl.png", "silhouette_layers.png", "validity.png"):
        assert (report_dir / "figures" / figure).stat().st_size > 1000


def test_sampled_evaluations_share_their_seeds_across_policies(chain):
    """Common random numbers: sample j of prefix i has one seed, whatever the policy, and the seeds
    differ between samples."""
    from udasa_lib.io import read_jsonl

    folder = chain[-1].run_dir / "05_eval_sentiment" / "generations"
    seeds = {path.stem: [(r["id"], r["sample"], r["seed"]) for r in read_jsonl(path)] for path in folder.glob("*.jsonl")}
    assert len(seeds) >= 2 and len({tuple(v) for v in seeds.values()}) == 1
    draws = next(iter(seeds.values()))
    assert len({seed for _, _, seed in draws}) == len(draws) and {j for _, j, _ in draws} == {0, 1}
    # and the sampler follows them: base's samples, drawn again one at a time from their seeds alone
    from udasa_lib.generation import encode_prompt, generate
    from udasa_lib.models import load_causal_lm

    cfg = config_mod.resolve(SMOKE_CONFIG)
    model, tokenizer = load_causal_lm(cfg.model.name_or_path, cfg.model.dtype, "cpu")
    for record in read_jsonl(folder / "base.jsonl")[:3]:
        again = generate(model, tokenizer, [encode_prompt(tokenizer, record["prefix"])], row_seeds=[record["seed"]],
                         max_new_tokens=cfg.eval_sentiment.max_new_tokens, temperature=cfg.eval_sentiment.temperature)
        assert again[0]["token_ids"] == record["token_ids"]


def cfg_methods():
    cfg = config_mod.resolve(SMOKE_CONFIG)
    return {m for methods in cfg.train.methods.values() for m in methods}


GOLDEN = Path(__file__).parent / "golden" / "smoke_metrics.csv"


def test_golden_numbers_of_the_smoke_chain(chain):
    """Every evaluation metric of the smoke chain equals its recorded value (lm-eval's testdata
    habit): a silent change in generation, scoring, training or an evaluation fails here.
    After an intended change: UDASA_UPDATE_GOLDEN=1 pytest tests/test_chain.py -k golden, and
    say in the commit why the numbers moved."""
    import os

    table = pd.read_csv(chain[-1].run_dir / "report" / "results_table.csv")
    table = table[table.stage.str.startswith("05_eval_")][["task", "method", "metric", "value", "n"]]
    table = table.sort_values(["task", "method", "metric"]).reset_index(drop=True)
    if os.environ.get("UDASA_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        table.to_csv(GOLDEN, index=False, float_format="%.6g")
    golden = pd.read_csv(GOLDEN)
    merged = golden.merge(table, on=["task", "method", "metric"], how="outer", suffixes=("_golden", ""),
                          indicator=True)
    assert (merged["_merge"] == "both").all(), merged[merged["_merge"] != "both"]
    assert (merged.n_golden == merged.n).all()
    assert np.allclose(merged.value, merged.value_golden, rtol=1e-4, atol=1e-6), \
        merged[~np.isclose(merged.value, merged.value_golden, rtol=1e-4, atol=1e-6)]


def test_a_stage_order_change_retrains_though_the_pairs_are_the_same(chain):
    reversed_order = {"train.stage_order": ["exploratory", "moderate", "conservative"]}
    pipeline.run_stage("03_pairs", SMOKE_CONFIG, reversed_order)
    before, after = config_mod.resolve(SMOKE_CONFIG), config_mod.resolve(SMOKE_CONFIG, reversed_order)
    assert pipeline.products_fingerprint(before, "03_pairs") == pipeline.products_fingerprint(after, "03_pairs")
    for variant in pipeline.variants(after, "04_train"):
        assert pipeline.stage_key(before, "04_train", variant) != pipeline.stage_key(after, "04_train", variant)


def test_a_training_change_reruns_training_and_what_follows_only(chain):
    before = config_mod.resolve(SMOKE_CONFIG)
    after = config_mod.resolve(SMOKE_CONFIG, {"train.learning_rate": 1.0e-3})
    for stage in ("00_data", "01_sample", "02_score", "03_pairs"):
        assert pipeline.stage_key(before, stage) == pipeline.stage_key(after, stage)
    for variant in pipeline.variants(after, "04_train"):
        assert pipeline.stage_key(before, "04_train", variant) != pipeline.stage_key(after, "04_train", variant)
    # evaluations read the new adapters, which do not exist yet: they are due to run again
    with pytest.raises(pipeline.StageError, match="has not finished"):
        pipeline.stage_key(after, "05_eval_harmless")


def test_a_seeds_sweep_is_pooled_into_the_report(chain, tmp_path):
    """`make sweep SWEEP=configs/sweeps/seeds.yaml` then `make report`, on the smoke config: the
    report tests the claims again on units pooled over the seeds (the seed-0 point reuses the
    chain's stages: same keys)."""
    from udasa_lib import sweep

    grid = tmp_path / "seeds.yaml"  # the report looks for the sweep named "seeds"
    grid.write_text(f"config: {SMOKE_CONFIG}\nthrough: 07_report\n"
                    "grid:\n  seed:\n    keys: [train.seed]\n    values: [0, 1]\n")
    out = sweep.run_sweep(sweep.load_sweep(grid))
    assert len(json.loads((out / "points.json").read_text())) == 2
    run = pipeline.run_stage("07_report", SMOKE_CONFIG, force=True)
    text = (run.run_dir / "report" / "REPORT.md").read_text()
    assert "### Pooled over training seeds" in text and "(2 seeds)" in text
