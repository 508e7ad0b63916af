"""Validation at the boundaries: every bad input is stopped where it enters, with an error that
names the file, line or key. One test group per kind of input: records read between stages,
empty inputs, over-long prompts, models, sweeps, overrides. (Config value ranges are checked at
resolve time and tested in test_config.py.)"""
from __future__ import annotations

import re
import shutil

import pytest

from udasa_lib import config as config_mod
from udasa_lib import data, io, metrics, models, sample, score, sweep, train
from udasa_lib.config import ConfigError
from udasa_lib.data import DataError
from udasa_lib.io import SchemaError
from udasa_lib.models import ModelLoadError


# --- records read between stages ------------------------------------------------------------------

class TestRecords:
    def test_non_utf8_bytes_name_file_and_line(self, tmp_path):
        path = tmp_path / "samples.jsonl"
        path.write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n')
        with pytest.raises(SchemaError, match=rf"{re.escape(str(path))} line 2: not UTF-8 \(byte 0xe9"):
            io.read_jsonl(path)

    @pytest.mark.parametrize("literal, shown", [("NaN", "nan"), ("Infinity", "inf"), ("-Infinity", "-inf"),
                                                ("1e999", "inf")])
    def test_non_finite_number_names_file_line_and_nested_key(self, tmp_path, literal, shown):
        path = tmp_path / "scores.jsonl"
        path.write_text('{"semantic": {"u": [0.5, 0.25]}}\n'
                        f'{{"prompt_id": "p1", "semantic": {{"u": [0.5, {literal}]}}}}\n')
        with pytest.raises(SchemaError, match=rf"{re.escape(str(path))} line 2: key 'semantic\.u\[1\]' is {shown};"):
            io.read_jsonl(path)

    def test_opt_out_reads_nan(self, tmp_path):
        path = tmp_path / "metrics.jsonl"
        path.write_text('{"ci_low": NaN}\n')
        [record] = io.read_jsonl(path, allow_nonfinite=True)
        assert record["ci_low"] != record["ci_low"]

    def test_nan_score_stops_03_pairs_reader(self, tmp_path):
        """Known bug: a NaN u in scores.jsonl made 03_pairs drop the pair as identical text."""
        u = {"u": [0.1, float("nan")]}
        path = io.atomic_write_jsonl(tmp_path / score.SCORES_FILE, [
            {"prompt_id": "p1", "task": "alignment", "sample_ids": ["p1-s0", "p1-s1"],
             "semantic": u, "factual": {"u": [0.0, 1.0]}, "value": {"u": [0.0, 1.0]}}])
        with pytest.raises(SchemaError, match=rf"{re.escape(str(path))} line 1: key 'semantic\.u\[1\]' is nan"):
            score.load_scores(path)

    def test_nan_pair_uncertainty_stops_04_train_reader(self, tmp_path):
        """Known bug: a NaN pair_uncertainty trained to "done" in 04_train."""
        pair = {"pair_id": "p1-pair", "task": "alignment", "prompt": "x", "formatted_prompt": "x", "chosen": "a",
                "rejected": "b", "prompt_token_ids": [1], "chosen_token_ids": [2], "rejected_token_ids": [3],
                "chosen_finish_reason": "eos", "rejected_finish_reason": "eos", "delta_u": 0.5, "stage": "easy",
                "uncertainty_chosen": 0.1, "pair_uncertainty": float("nan")}
        path = io.atomic_write_jsonl(tmp_path / train.PAIRS_FILES["combined"], [pair])
        with pytest.raises(SchemaError, match=rf"{re.escape(str(path))} line 1: key 'pair_uncertainty' is nan"):
            train.load_pairs(tmp_path, "combined", "alignment")

    def test_metric_rows_keep_their_legitimate_nan(self, tmp_path):
        """A metric over zero units has NaN value and interval; the results table still reads it."""
        row = metrics.metric_row("alignment", "base", "harmful_p_aligned", [], "05_eval_harmless", 10, 0, [])
        metrics.write_metrics(tmp_path / "05_eval_harmless" / metrics.METRICS_FILE, [row])
        table = metrics.results_table(tmp_path)
        assert len(table) == 1 and table.ci_low.isna().all()


# --- empty inputs -----------------------------------------------------------------------------------

class TestEmptyInputs:
    def test_empty_prompt_split_names_file_and_key(self, tmp_path):
        (tmp_path / "benign_train.jsonl").write_text("")
        with pytest.raises(SchemaError, match=rf"sample\.tasks\.alignment\.sources\.benign_train: split file "
                                            rf"{re.escape(str(tmp_path / 'benign_train.jsonl'))} holds no prompts"):
            sample.select_prompts(tmp_path, {"benign_train": 4}, "alignment")

    def test_more_prompts_than_the_split_holds_names_file_and_key(self, tmp_path):
        io.atomic_write_jsonl(tmp_path / "benign_train.jsonl", [{"id": "b1", "text": "x"}])
        with pytest.raises(ConfigError, match=r"sample\.tasks\.alignment\.sources\.benign_train: split "
                                              r"'benign_train' has 1 prompts, 4 requested \(.*benign_train\.jsonl\)"):
            sample.select_prompts(tmp_path, {"benign_train": 4}, "alignment")

    def test_empty_00_data_split_names_split_and_key(self):
        splits = {name: [{"id": name, "text": name}] for name in data.SPLIT_FILES}
        splits["harmful_test"] = []
        with pytest.raises(DataError, match=r"split 'harmful_test' \(harmful_test\.jsonl\) came out empty; "
                                            r"check data\.harmful_test_fraction"):
            data.check_nonempty(splits)


# --- over-long prompts in 04_train -------------------------------------------------------------------

class TestOverLongPrompts:
    def test_each_dropped_pair_is_counted_and_named(self, tiny_model_path):
        tokenizer = models.load_tokenizer(str(tiny_model_path))
        short = tokenizer("Hi.")["input_ids"]
        long = tokenizer(" ".join(["word"] * 40))["input_ids"]
        rows = [{"pair_id": f"p{i}-pair", "prompt_token_ids": prompt, "chosen_token_ids": short,
                 "rejected_token_ids": short} for i, prompt in enumerate([long, short, long])]
        records = train.training_records(rows, train.METHODS["dpo"], None)
        with pytest.warns(UserWarning, match=r"stage easy: train\.max_length=16: 2 pair\(s\) dropped, their prompt "
                                             r"alone fills it \(e\.g\. p0-pair, p2-pair\)"):
            kept, counts = train.fit_to_length(records, 16, "04_train alignment-dpo stage easy")
        assert len(kept) == 1 and kept.pair_ids == ["p1-pair"]
        # the stage log, and through it the manifest (train.stages[i].max_length), carries these
        assert counts["over_long_prompts"] == 2 and counts["over_long_prompt_examples"] == ["p0-pair", "p2-pair"]


# --- models -----------------------------------------------------------------------------------------

class TestModels:
    def test_unknown_hub_id_says_offline_and_what_is_needed(self):
        with pytest.raises(ModelLoadError) as caught:
            models.load_tokenizer("no-such-org/no-such-model")
        message = str(caught.value)
        assert "'no-such-org/no-such-model'" in message and "HF_HUB_OFFLINE" in message
        assert "local folder" in message and "cached" in message

    def test_unknown_embedder_goes_through_the_same_door(self):
        with pytest.raises(ModelLoadError, match=r"sentence-transformers embedder 'no-such-org/no-such-model'.*"
                                                 r"HF_HUB_OFFLINE"):
            score.Embedder("no-such-org/no-such-model")

    @pytest.fixture
    def cut_model(self, tiny_model_path, tmp_path):
        folder = tmp_path / "tiny-cut"
        shutil.copytree(tiny_model_path, folder)
        weights = folder / "model.safetensors"
        payload = weights.read_bytes()
        weights.write_bytes(payload[: len(payload) // 2])
        return folder

    def test_truncated_weights_name_the_file(self, cut_model):
        weights = re.escape(str(cut_model / "model.safetensors"))
        with pytest.raises(ModelLoadError, match=rf"causal LM .*file {weights} is truncated or corrupt"):
            models.load_causal_lm(str(cut_model), "float32", "cpu")

    def test_truncated_weights_of_a_classifier_name_the_file(self, cut_model):
        weights = re.escape(str(cut_model / "model.safetensors"))
        with pytest.raises(ModelLoadError, match=rf"NLI classifier .*file {weights} is truncated"):
            score.NLIEntailment(str(cut_model))

    def test_corrupt_tokenizer_file_is_named(self, tiny_model_path, tmp_path):
        folder = tmp_path / "tiny-bad-tokenizer"
        shutil.copytree(tiny_model_path, folder)
        (folder / "tokenizer.json").write_text('{"version": "1.0", "trunc')
        tokenizer_file = re.escape(str(folder / "tokenizer.json"))
        with pytest.raises(ModelLoadError, match=rf"tokenizer .*file {tokenizer_file} is truncated"):
            models.load_tokenizer(str(folder))


# --- sweeps -----------------------------------------------------------------------------------------

SWEEP_HEAD = "config: configs/smoke.yaml\nthrough: 03_pairs\n"


class TestSweeps:
    @pytest.mark.parametrize("body, message", [
        ("grid:\n  - seed\n", r"grid must be a mapping, got a list"),
        ("gird: {seed: {keys: [seed], values: [0]}}\n", r"unknown key 'gird'"),
        ("set: [seed]\ngrid: {seed: {keys: [seed], values: [0]}}\n", r"set must be a mapping"),
        ("grid: {seed: {keys: seed, values: [0]}}\n", r"grid\.seed\.keys must be a non-empty list"),
        ("grid: {seed: {keys: [seed], values: 3}}\n", r"grid\.seed\.values must be a non-empty list"),
        ("grid: {}\n", r"grid has no axis"),
        ("grid: {seed: {keys: [sample.nonsense], values: [1]}}\n", r"point \{'seed': 1\}: .*nonsense"),
    ])
    def test_bad_sweep_names_file_and_key(self, tmp_path, body, message):
        path = tmp_path / "bad.yaml"
        path.write_text(SWEEP_HEAD + body)
        with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: {message}"):
            sweep.load_sweep(path)

    def test_top_level_list_names_file(self, tmp_path):
        path = tmp_path / "bad.yaml"
        path.write_text("- config\n- grid\n")
        with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: top level must be a mapping"):
            sweep.load_sweep(path)


# --- overrides --------------------------------------------------------------------------------------

class TestOverrides:
    @pytest.mark.parametrize("text, reason", [
        ("=3", "empty key"), ("   =1", "empty key"), ("seed", "expected dotted.key=value"),
        ("a..b=1", "not a dotted key"), (".a=1", "not a dotted key"), ("a.=1", "not a dotted key"),
        ("sample k=3", "not a dotted key"), ("seed==1", "'==' after the key"), ("seed=[1,", "not valid YAML"),
    ])
    def test_malformed_override_names_its_text(self, text, reason):
        with pytest.raises(ConfigError) as caught:
            config_mod.parse_override(text)
        assert f"override {text!r}" in str(caught.value) and reason in str(caught.value)

    def test_well_formed_overrides_still_parse(self):
        assert config_mod.parse_override("sample.k=8") == ("sample.k", 8)
        assert config_mod.parse_override(" train.methods = {alignment: []}") == ("train.methods", {"alignment": []})
        assert config_mod.parse_override("model.name_or_path=a=b") == ("model.name_or_path", "a=b")
