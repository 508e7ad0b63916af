"""Verdicts, tables and the inferred-choices listing of 07_report, on hand-made numbers."""
import pandas as pd
import pytest

from udasa_lib import REPO_ROOT, metrics, report
from udasa_lib import config as config_mod

DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"


def _row(value, low, high, metric="reward"):
    return {"metric": metric, "value": value, "ci_low": low, "ci_high": high}


@pytest.mark.parametrize("a, b, higher_is_better, verdict", [
    (_row(0.8, 0.7, 0.9), _row(0.5, 0.4, 0.6), True, report.SUPPORTED),
    (_row(0.8, 0.7, 0.9), _row(0.5, 0.4, 0.6), False, report.NOT_SUPPORTED),
    (_row(0.6, 0.5, 0.7), _row(0.55, 0.45, 0.65), True, report.INCONCLUSIVE),
    (_row(0.6, 0.5, 0.7), None, True, report.NOT_RUN),
    (_row(0.6, float("nan"), 0.7), _row(0.5, 0.4, 0.6), True, report.NOT_RUN),
])
def test_verdict_comes_from_the_intervals_only(a, b, higher_is_better, verdict):
    assert report.compare(a, b, higher_is_better) == verdict


def test_sign_verdict():
    assert report.sign_verdict(_row(-0.2, -0.3, -0.1), negative=True) == report.SUPPORTED
    assert report.sign_verdict(_row(0.2, 0.1, 0.3), negative=True) == report.NOT_SUPPORTED
    assert report.sign_verdict(_row(0.0, -0.1, 0.1), negative=True) == report.INCONCLUSIVE


def test_claims_table_reads_the_results_table():
    table = pd.DataFrame([
        {"task": "sentiment", "method": "udasa", **_row(0.9, 0.85, 0.95)},
        {"task": "sentiment", "method": "dpo", **_row(0.5, 0.45, 0.55)},
        {"task": "alignment", "method": "udasa", **_row(55.0, 50.0, 60.0, "win_rate")},
    ])
    claims = report.claims_table(table, prelim=None).set_index("claim")
    assert claims.loc["UDASA beats DPO on controlled sentiment (reward)", "verdict"] == report.SUPPORTED
    assert claims.loc["UDASA beats DPO on controlled sentiment (reward)", "our number"] == (
        "udasa 0.900 [0.850, 0.950] vs dpo 0.500 [0.450, 0.550]")
    assert claims.loc["UDASA is more helpful than DPO (win rate vs base)", "our number"] == (
        "udasa 55.0 [50.0, 60.0] vs dpo -")
    assert claims.loc["UDASA is more helpful than DPO (win rate vs base)", "verdict"] == report.NOT_RUN


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
