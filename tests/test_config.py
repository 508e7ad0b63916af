"""Strict config resolution: every mistake names its key; run ids are deterministic."""
import pytest

from udasa_lib import config
from udasa_lib.pipeline import STAGES, StageError, stage_key

from conftest import SMOKE_CONFIG, REPO_ROOT


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
    assert set(STAGES) >= {"00_data", "01_sample", "02_score", "03_stage"}
