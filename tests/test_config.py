"""Strict config resolution: every mistake names its key; run ids are deterministic."""
import re

import pytest

from udasa_lib import config
from udasa_lib.pipeline import STAGES, StageError, stage_key

from conftest import SMOKE_CONFIG, REPO_ROOT

DEFAULT = REPO_ROOT / "configs" / "default.yaml"


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(f"inherit: {REPO_ROOT / 'configs' / 'smoke.yaml'}\n{text}")
    return path


@pytest.mark.parametrize("name", ["default", "smoke", "paper"])
def test_shipped_configs_ask_for_no_more_prompts_than_their_splits_hold(name):
    from udasa_lib import data

    cfg = config.resolve(REPO_ROOT / "configs" / f"{name}.yaml")
    sizes = {split: len(records) for split, records in data.build_splits(cfg.data).items()}
    wanted = {f"sample.tasks.{task}.sources.{split}": (split, n)
              for task, spec in cfg.sample.tasks.items() for split, n in spec.sources.items()}
    wanted.update({"eval_harmless.harmful_prompts": ("harmful_test", cfg.eval_harmless.harmful_prompts),
                   "eval_harmless.benign_prompts": ("benign_test", cfg.eval_harmless.benign_prompts),
                   "eval_lmeval.limit": ("truthful_mc", cfg.eval_lmeval.limit),
                   "eval_sentiment.prompts": ("sentiment_test", cfg.eval_sentiment.prompts)})
    too_many = {key: f"{n} > {sizes[split]} in {split}" for key, (split, n) in wanted.items() if n > sizes[split]}
    assert not too_many


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(config.ConfigError, match=r"unknown key 'sample\.kk'"):
        config.resolve(_write(tmp_path, "sample:\n  kk: 3\n"))


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(config.ConfigError, match=r"unknown key 'sampel'"):
        config.resolve(_write(tmp_path, "sampel:\n  k: 3\n"))


def test_bad_type_is_named(tmp_path):
    with pytest.raises(config.ConfigError, match=r"sample\.k: expected an integer"):
        config.resolve(_write(tmp_path, "sample:\n  k: four\n"))
    with pytest.raises(config.ConfigError, match=r"sample\.tasks\.alignment\.chat_template: expected true or false"):
        config.resolve(_write(tmp_path, "sample:\n  tasks:\n    alignment:\n      chat_template: 1\n"))


def test_missing_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 0\n")
    with pytest.raises(config.ConfigError, match=r"missing key 'model'"):
        config.resolve(path)


def test_override_unknown_key_is_named():
    with pytest.raises(config.ConfigError, match=r"unknown key 'kk'"):
        config.resolve(SMOKE_CONFIG, {"sample.kk": 2})


def test_int_accepted_where_float_expected(tmp_path):
    cfg = config.resolve(_write(tmp_path, "sample:\n  temperature: 1\n"))
    assert cfg.sample.temperature == 1.0 and isinstance(cfg.sample.temperature, float)


def test_config_is_frozen():
    cfg = config.resolve(SMOKE_CONFIG)
    with pytest.raises(Exception):
        cfg.sample.k = 9


def test_run_id_deterministic_and_ignores_runtime():
    base = config.resolve(SMOKE_CONFIG)
    assert config.run_id(base, "smoke") == config.run_id(config.resolve(SMOKE_CONFIG), "smoke")
    threads = config.resolve(SMOKE_CONFIG, {"runtime.threads": 7})
    assert config.run_id(threads, "smoke") == config.run_id(base, "smoke")
    changed = config.resolve(SMOKE_CONFIG, {"sample.k": 5})
    assert config.run_id(changed, "smoke") != config.run_id(base, "smoke")
    assert config.run_id(base, "smoke").startswith("smoke-")


def test_stage_keys_follow_only_their_sections(smoke_data):
    base = config.resolve(SMOKE_CONFIG)
    changed = config.resolve(SMOKE_CONFIG, {"sample.temperature": 0.7, "runtime.threads": 2})
    assert stage_key(base, "00_data") == stage_key(changed, "00_data")
    assert stage_key(base, "01_sample") != stage_key(changed, "01_sample")
    assert stage_key(base, "01_sample") == stage_key(config.resolve(SMOKE_CONFIG, {"runtime.threads": 2}), "01_sample")
    data_changed = config.resolve(SMOKE_CONFIG, {"data.split_seed": 3})
    assert stage_key(base, "00_data") != stage_key(data_changed, "00_data")
    # a changed upstream must run before anything downstream has a key
    with pytest.raises(StageError, match="upstream stage 00_data has not finished"):
        stage_key(data_changed, "01_sample")
    assert set(STAGES) >= {"00_data", "01_sample", "02_score", "03_pairs"}


@pytest.mark.parametrize("key, value, rule", [
    ("sample.k", 1, ">= 2"), ("sample.k", -1, ">= 2"), ("sample.temperature", -0.5, ">= 0"),
    ("eval_sentiment.temperature", -1, ">= 0"), ("eval_harmless.temperature", -0.1, ">= 0"),
    ("sample.top_p", 1.5, "in \\(0, 1\\]"), ("sample.top_p", 0.0, "in \\(0, 1\\]"),
    ("sample.batch_prompts", 0, ">= 1"), ("sample.tasks.alignment.max_new_tokens", 0, ">= 1"),
    ("sample.tasks.alignment.sources", {"harmful_train": 0}, ">= 1"),
    ("data.harmful_test_fraction", 1.0, "in \\(0, 1\\)"), ("data.benign_test_fraction", 0, "in \\(0, 1\\)"),
    ("train.batch_size", 0, ">= 1"), ("train.learning_rate", 0, "> 0"), ("train.max_length", 1, ">= 2"),
    ("train.beta", {"conservative": 0, "moderate": 0.1, "exploratory": 0.1, "unstaged": 0.1}, "> 0"),
    ("train.lora.dropout", 1.0, "in \\[0, 1\\)"), ("train.ual.max_epsilon", 0.7, "in \\[0, 0.5\\)"),
    ("eval_sentiment.prompts", 0, ">= 1"), ("silhouette.max_points", 2, ">= 4"), ("bootstrap_samples", 0, ">= 1"),
    ("score.semantic.threshold", 1.5, "in \\[-1, 1\\]"), ("pairs.tie_epsilon", -1e-3, ">= 0"),
    ("train.learning_rate", float("nan"), "> 0"), ("pairs.cut_points", [0.2, 1.5], "in \\[0, 1\\]"),
])
def test_out_of_range_values_fail_at_resolve_time_naming_the_key(key, value, rule):
    """Before any stage runs: the message names the dotted key and the allowed range."""
    leaf = (f"{key}.{next(k for k, v in value.items() if v == 0)}" if isinstance(value, dict)
            else f"{key}[1]" if isinstance(value, list) else key)
    with pytest.raises(config.ConfigError, match=rf"{re.escape(leaf)}: .* out of range; must be {rule}"):
        config.resolve(DEFAULT, {key: value})


@pytest.mark.parametrize("overrides, message", [
    ({"data.sentiment_prefix_min_tokens": 9}, "data.sentiment_prefix_min_tokens: 9 exceeds"),
    ({"train.ual.mean_epsilon": 0.45}, "train.ual.mean_epsilon: 0.45 is outside"),
    ({"pairs.truncated": {"alignment": "keep", "typo": "drop"}}, "pairs.truncated.typo: not a task"),
    ({"pairs.truncated": {"alignment": "cut"}}, "pairs.truncated.alignment: 'cut' is not one of keep, drop"),
])
def test_relations_between_keys_are_checked(overrides, message):
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.resolve(DEFAULT, overrides)


def test_zero_temperature_means_greedy_everywhere():
    from udasa_lib.generation import sampling_kwargs

    for key in ("sample.temperature", "eval_harmless.temperature", "eval_sentiment.temperature"):
        config.resolve(DEFAULT, {key: 0.0})
    assert sampling_kwargs(0.0) == {"do_sample": False}
    assert sampling_kwargs(0.7, 0.9, 0) == {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0}


def test_renamed_keys_fail_with_their_new_names(tmp_path):
    """`stage:` became `pairs:` and stage.order became train.stage_order: old configs and overrides
    say the new name instead of a bare "unknown key"."""
    with pytest.raises(config.ConfigError, match=r"'stage.order' was renamed: use 'train.stage_order'"):
        config.resolve(DEFAULT, {"stage.order": ["moderate"]})
    with pytest.raises(config.ConfigError, match=r"'stage.weights' was renamed: use 'pairs.weights'"):
        config.resolve(DEFAULT, {"stage.weights": {"semantic": 1.0}})
    old = _write(tmp_path, "stage:\n  order: [moderate, conservative, exploratory]\n")
    with pytest.raises(config.ConfigError, match=r"c.yaml: 'stage.order' was renamed: use 'train.stage_order'"):
        config.resolve(old)
    old = _write(tmp_path, "stage:\n  tie_epsilon: 0.01\n")
    with pytest.raises(config.ConfigError, match=r"'stage.tie_epsilon' was renamed: use 'pairs.tie_epsilon'"):
        config.resolve(old)
