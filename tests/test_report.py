"""Verdicts, tables and the inferred-choices listing of 07_report, on hand-made numbers."""
import pandas as pd
import pytest

from udasa_lib import REPO_ROOT, metrics, report
from udasa_lib import config as config_mod

DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"


def _row(value, low, high, metric="reward"):
    return {"metric": metric, "value": value, "ci_low": low, "ci_high": high}


VALID = {name: {"valid": True} for name in ("harm probe", "IMDb sentiment classifier", "refusal keywords",
                                            "labelled answers", "computed", "pairwise judge j", "length baseline",
                                            "judge j: harmful compliance", "judge j: refusal")}


def _units(task, metric, method, values):
    return pd.DataFrame([{"task": task, "method": method, "metric": metric, "unit": f"p{i}", "value": v}
                         for i, v in enumerate(values)])


def _decided(units, validity=VALID, claims=report.CLAIMS):
    rows = report.claim_rows(units, validity, "j", n_resamples=500, seed=0, claims=claims)
    return {r["text"]: r for r in report.decide(rows, alpha=0.05, power=0.8, effects={"reward": 0.03})}


def test_paired_claims_are_decided_by_holm_adjusted_permutation_p():
    import numpy as np

    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.8, 60)
    units = pd.concat([
        _units("sentiment", "reward", "dpo", base),
        _units("sentiment", "reward", "udasa", base + 0.1 + rng.normal(0, 0.02, 60)),  # clearly better
        _units("sentiment", "reward", "udasa_reverse", base + 0.1 + rng.normal(0, 0.02, 60)),  # clearly worse
        _units("sentiment", "reward", "udasa_semantic", base + 0.1 + rng.normal(0, 0.3, 60)),  # noisy: not detected
    ])
    units.loc[units.method == "udasa_reverse", "value"] += 0.2
    decided = _decided(units)
    better = decided["UDASA beats DPO on controlled sentiment (reward)"]
    assert better["verdict"] == report.SUPPORTED and better["tested"].mean == pytest.approx(0.1, abs=0.01)
    assert better["tested"].paired and better["tested"].n == 60
    assert decided["Staged order beats the reversed order (reward)"]["verdict"] == report.CONTRADICTED
    noisy = decided["All three dimensions beat semantic only (reward)"]
    assert noisy["verdict"] == report.NO_DIFFERENCE
    # the MDE is at alpha / m for the m tested claims, and n needed is its inverse for report.effects
    from udasa_lib.stats import minimum_detectable_effect, needed_n

    m = sum(1 for r in decided.values() if r["tested"] is not None)
    assert m == 3 and noisy["MDE"] == pytest.approx(minimum_detectable_effect(noisy["tested"].spread, 60, 0.05 / m))
    assert noisy["n needed"] == needed_n(noisy["tested"].spread, 0.03, 0.05 / m)
    # Holm: adjusted p's are at least the raw ones and the smallest is multiplied by m
    smallest = min(decided.values(), key=lambda r: r["tested"].p if r["tested"] else 2)
    assert smallest["p (Holm)"] == pytest.approx(min(1.0, 3 * smallest["tested"].p))
    assert decided["UAL-DPO beats DPO on controlled sentiment (reward)"]["verdict"] == report.NOT_RUN
    assert not better["below effect of interest"]
    # a consistent but tiny difference is detected, and flagged as smaller than what matters
    tiny = pd.concat([_units("sentiment", "reward", "ual_dpo", base + 1e-4), _units("sentiment", "reward", "dpo", base)])
    flagged = _decided(tiny)["UAL-DPO beats DPO on controlled sentiment (reward)"]
    assert flagged["verdict"] == report.SUPPORTED and flagged["below effect of interest"]
    cell = report.render([flagged]).iloc[0]
    assert cell["verdict"] == "supported (smaller than the 0.03 of interest)"
    assert cell["difference [95 % CI]"].startswith("+1.0e-04")
    table = report.render(list(decided.values()))
    assert list(table.columns) == ["paper", "claim", "metric", "instrument", "n", "difference [95 % CI]", "p",
                                   "p (Holm)", "verdict", "MDE", "n needed"]


def test_a_claim_on_an_instrument_without_validity_is_not_decided():
    units = pd.concat([_units("alignment", "win_rate", "udasa", [90.0, 80.0, 95.0, 85.0] * 5),
                       _units("alignment", "win_rate", "dpo", [10.0, 20.0, 5.0, 15.0] * 5)])
    units["unit"] = [f"p{i}" for i in range(20)] * 2
    decided = _decided(units, validity={**VALID, "pairwise judge j": {"valid": False}})
    row = decided["UDASA is more helpful than DPO (win rate vs base)"]
    assert row["verdict"] == report.INSTRUMENT_NOT_VALID and row["tested"].mean == pytest.approx(75.0)
    assert row["p (Holm)"] != row["p (Holm)"]  # NaN: not in the family


def test_policies_measured_on_different_prompts_are_refused():
    units = pd.concat([_units("sentiment", "reward", "udasa", [0.1, 0.2]), _units("sentiment", "reward", "dpo", [0.1])])
    units.loc[units.method == "dpo", "unit"] = "other"
    with pytest.raises(ValueError, match="different units"):
        report.paired_values(units, "sentiment", "reward", "udasa", "dpo")


def test_pooling_seeds_averages_each_unit_first():
    a = _units("sentiment", "reward", "dpo", [0.2, 0.4])
    b = _units("sentiment", "reward", "dpo", [0.4, 0.8])
    pooled = report.pooled_units([a, b])
    assert pooled.value.tolist() == pytest.approx([0.3, 0.6]) and pooled.unit.tolist() == ["p0", "p1"]


def test_controls_compare_every_method_with_base_without_a_direction():
    units = pd.concat([_units("sentiment", "reward", "base", [0.5] * 30),
                       _units("sentiment", "reward", "dpo", [0.3 + 0.01 * (i % 3) for i in range(30)])])
    rows = report.control_rows(units, {"sentiment": ["dpo", "udasa"]}, VALID, "j", 500, 0)
    decided = report.decide(rows, 0.05, 0.8, {}, directional=False)
    assert [(r["text"], r["verdict"]) for r in decided] == [("dpo vs base", report.LOWER)]


def test_instruments_registry_and_validity():
    from udasa_lib import instruments

    judges = instruments.Judges("models/pairwise-j", "models/role-j")
    assert instruments.instrument_of("alignment", "win_rate", judges).name == "pairwise judge pairwise-j"
    assert instruments.instrument_of("alignment", "judged_harmful_compliance_rate", judges).name == \
        "judge role-j: harmful compliance"
    assert instruments.instrument_of("alignment", "judged_benign_over_refusal_rate", judges).name == "judge role-j: refusal"
    assert instruments.instrument_of("alignment", "length_win_rate", judges) == instruments.LENGTH_BASELINE
    assert instruments.instrument_of("alignment", "udasa_truthful_mc_acc").kind == instruments.EXACT
    with pytest.raises(KeyError, match="no instrument"):
        instruments.instrument_of("alignment", "made_up_metric")
    rows = [{"dataset": "harm", "instrument": "harm probe", "valid": True, "figures": "ba 0.78"},
            {"dataset": "harm", "instrument": "refusal keywords", "valid": True, "figures": "ba 0.70"},
            {"dataset": "refusal", "instrument": "refusal keywords", "valid": False, "figures": "ba 0.52"},
            {"dataset": "refusal", "instrument": "judge role-j: refusal", "valid": True, "figures": "ba 0.9"},
            {"dataset": "harm", "instrument": "judge role-j: harmful compliance", "valid": False, "figures": "ba 0.5"}]
    records = instruments.validity_records(rows, {"accuracy": 0.52, "n_test": 20}, judges)
    assert records["harm probe"]["valid"] and not records["IMDb sentiment classifier"]["valid"]  # 0.52 on 20: chance
    # an instrument is decided on its primary set (keywords: refusal labels), the others shown beside
    assert not records["refusal keywords"]["valid"]
    assert records["refusal keywords"]["figures"] == "refusal set: ba 0.52; harm set: ba 0.70"
    assert records["judge role-j: refusal"]["valid"] and not records["judge role-j: harmful compliance"]["valid"]
    # measured by nobody: not valid, and said so
    assert not records["pairwise judge pairwise-j"]["valid"]
    assert "not measured" in records["pairwise judge pairwise-j"]["figures"]
    assert records["labelled answers"]["valid"]
    # every claim's and control's metric has an instrument with a validity record
    for claim in (*report.CLAIMS, *report.CONTROL_CLAIMS):
        assert instruments.instrument_of(claim.task, claim.metric, judges).name in records
    for task, metrics in report.CONTROL_METRICS.items():
        for metric, _ in metrics:
            assert instruments.instrument_of(task, metric, judges).name in records


def test_wide_table_orders_methods_and_marks_missing_cells():
    table = [
        {"task": "alignment", "method": "dpo", **_row(0.5, 0.4, 0.6, "refusal_rate")},
        {"task": "alignment", "method": "base", **_row(0.3, 0.2, 0.4, "refusal_rate")},
        {"task": "alignment", "method": "base", **_row(48.0, 40.0, 56.0, "win_rate")},
        {"task": "sentiment", "method": "dpo", **_row(0.7, 0.6, 0.8)},
    ]
    wide = metrics.wide_table(table, "alignment", ["base", "dpo"])
    assert list(wide.index) == ["base", "dpo"]
    assert wide.loc["base", "win_rate"] == "48.0 [40.0, 56.0]"
    assert wide.loc["dpo", "win_rate"] == "-"
    assert "| base " in report.markdown(wide, index=True)
    assert report.markdown(pd.DataFrame()) == "_(none)_\n"


def test_seed_spread_summarises_each_method_and_metric():
    summary = pd.DataFrame([{"task": "sentiment", "method": "dpo", "metric": "reward", "seed": s, "value": v}
                            for s, v in [(0, 0.5), (1, 0.7), (2, 0.6)]])
    spread = report.seed_spread(summary).iloc[0]
    assert (spread["mean"], spread["low"], spread["high"], spread["seeds"]) == (0.6, 0.5, 0.7, 3)
    assert spread["sd"] == pytest.approx(0.1)


def test_every_inferred_choice_names_a_real_config_key():
    choices = report.inferred_choices_table(config_mod.resolve(DEFAULT_CONFIG).to_dict())
    assert len(choices) > 5 and choices.knob.is_unique


def test_an_inferred_choice_with_an_unknown_key_names_the_entry(tmp_path):
    bad = tmp_path / "choices.yaml"
    bad.write_text("- {choice: reference model, keys: [train.no_such_knob], why: test}\n")
    with pytest.raises(ValueError, match=r"entry 0 \(reference model\): 'train.no_such_knob'"):
        report.inferred_choices_table(config_mod.resolve(DEFAULT_CONFIG).to_dict(), bad)


def test_a_sweep_is_shown_only_when_it_trained_on_this_runs_pairs(tmp_path):
    import json

    pairs, other_pairs = tmp_path / ".stages" / "03_pairs" / "k1", tmp_path / ".stages" / "03_pairs" / "k2"
    runs = []
    for name, target in (("point-a", pairs), ("point-b", pairs), ("point-c", other_pairs)):
        target.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).mkdir()
        (tmp_path / name / "03_pairs").symlink_to(target)
        runs.append({"seed": len(runs), "run_dir": str(tmp_path / name)})
    sweep_dir = tmp_path / "sweeps" / "seeds"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "points.json").write_text(json.dumps(runs[:2]))
    assert report.sweep_mismatch(sweep_dir, pairs) is None
    (sweep_dir / "points.json").write_text(json.dumps(runs))
    assert "other pairs" in report.sweep_mismatch(sweep_dir, pairs)


def test_oracle_gain_fraction_is_the_ratio_of_mean_gains_with_a_paired_interval():
    import numpy as np

    rng = np.random.default_rng(1)
    base = rng.uniform(0.2, 0.6, 80)
    oracle_gain = 0.2 + rng.normal(0, 0.05, 80)
    units = pd.concat([_units("sentiment", "reward", "base", base),
                       _units("sentiment", "reward", "dpo_oracle", base + oracle_gain),
                       _units("sentiment", "reward", "dpo", base + 0.5 * oracle_gain),
                       _units("sentiment", "reward", "dpo_random", base + rng.normal(0, 0.05, 80))])
    table = report.oracle_table(units, ["dpo", "dpo_random", "dpo_oracle"], n_resamples=500, seed=0)
    assert list(table.method) == ["dpo", "dpo_random"]
    dpo, random_row = table.set_index("method").loc["dpo"], table.set_index("method").loc["dpo_random"]
    assert dpo["fraction of oracle gain"] == pytest.approx(0.5, abs=1e-9)  # the ratio of the two means
    assert dpo["ci_low"] <= 0.5 <= dpo["ci_high"] and dpo["ci_high"] - dpo["ci_low"] < 0.1
    assert random_row["ci_low"] < 0 < random_row["ci_high"]
    # an oracle that gained nothing leaves nothing to divide by
    flat = units.copy()
    flat.loc[flat.method == "dpo_oracle", "value"] = base - 0.01
    assert np.isnan(report.oracle_gain_fraction(flat, "sentiment", "reward", "dpo", 200, 0)["fraction of oracle gain"])


def test_control_claims_ask_each_method_to_beat_its_control():
    import numpy as np

    rng = np.random.default_rng(2)
    base = rng.uniform(0.2, 0.6, 60)
    units = pd.concat([_units("sentiment", "reward", m, base + shift + rng.normal(0, 0.01, 60))
                       for m, shift in (("base", 0), ("dpo_oracle", 0.2), ("dpo", 0.1), ("dpo_random", 0.1),
                                        ("udasa", 0.15), ("ual_dpo", 0.1), ("ual_dpo_const", 0.1))])
    decided = _decided(units, claims=report.CONTROL_CLAIMS)
    verdict = {text.split(" beats")[0] + (" vs random" if "direction matters" in text else ""): row["verdict"]
               for text, row in decided.items()}
    assert verdict["The ground-truth oracle"] == report.SUPPORTED
    assert verdict["The ground-truth oracle vs random"] == report.SUPPORTED
    assert verdict["UDASA"] == report.SUPPORTED
    assert verdict["DPO on uncertainty pairs"] == report.NO_DIFFERENCE
    assert verdict["UAL-DPO"] == report.NO_DIFFERENCE
    assert verdict["UAL-SFT"] == report.NOT_RUN
