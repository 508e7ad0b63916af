"""Loading causal LMs and tokenizers from a hub id or a local folder, on CPU or GPU.

The same function loads the embedded SmolLM2 folder, the tiny test model, or any hub id a user
with network names in a config. fp32 on CPU (bf16 matmul there is ~90x slower), bf16 on CUDA.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, TypeVar

from udasa_lib import REPO_ROOT

T = TypeVar("T")


class ModelLoadError(RuntimeError):
    """A model, tokenizer, embedder or adapter cannot be loaded; the message names the id, or the
    file of a local folder that is truncated or corrupt."""


def resolve_name_or_path(name_or_path: str) -> str:
    """A relative path that exists under the repo wins; otherwise the string is a hub id or absolute path."""
    candidate = Path(name_or_path)
    if not candidate.is_absolute():
        candidate = REPO_ROOT / candidate
    if candidate.exists():
        return str(candidate)
    if name_or_path.startswith((".", "/")) or name_or_path.startswith("results"):
        raise FileNotFoundError(f"model folder {name_or_path!r} not found (for the embedded models run `make assets`)")
    return name_or_path


def configure_threads(threads: int) -> int:
    """Set torch's CPU threads: $UDASA_THREADS, else the config value, else torch's default (0)."""
    import torch

    threads = int(os.environ.get("UDASA_THREADS", threads) or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"runtime.device is {device!r} but no CUDA device is visible")
    return torch.device(device)


def resolve_dtype(dtype: str, device):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"model.dtype: unknown dtype {dtype!r} (auto, float32, bfloat16, float16)") from None


def _unreadable_file(folder: Path) -> tuple[Path, str] | None:
    """The first weights or JSON file under `folder` that cannot be read, with the reason; None
    when all can. Only headers are read (safetensors checks that its header covers the file, so a
    cut file is caught without loading a tensor)."""
    from safetensors import safe_open

    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt"):
                    pass
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
        except Exception as error:  # safetensors raises its own type, not an OSError
            return path, f"{type(error).__name__}: {error}"
    return None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cached_snapshot(hub_id: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:  # not in the cache, or not a valid repo id at all
        return None


def load_pretrained(load: Callable[[str], T], name_or_path: str, what: str = "model") -> T:
    """`load(resolved path or hub id)`: the one door for every from_pretrained-style call (causal
    LM, tokenizer, sentence-transformers embedder, NLI classifier, PEFT adapter), so that every
    failure explains itself the same way. `what` names the thing in the message.

    Raises FileNotFoundError for a relative folder that does not exist (resolve_name_or_path), and
    ModelLoadError when loading fails: naming the file for a truncated or corrupt file of a local
    folder or cached snapshot, else naming the id and, offline, saying that the hub cannot be
    reached (HF_HUB_OFFLINE) and a local folder or an already cached id is needed. The loader's own
    exception is chained as the cause."""
    source = resolve_name_or_path(name_or_path)
    try:
        return load(source)
    except Exception as error:
        raise ModelLoadError(_load_failure(name_or_path, source, what, error)) from error


def _load_failure(name_or_path: str, source: str, what: str, error: Exception) -> str:
    cause = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    folder = Path(source) if Path(source).is_dir() else _cached_snapshot(source)
    if folder is not None:
        bad = _unreadable_file(folder)
        if bad is not None:
            return (f"{what} {name_or_path!r}: file {bad[0]} is truncated or corrupt ({bad[1]}); rebuild or re-copy "
                    f"it (`make assets` for the embedded models)")
        return f"{what} {name_or_path!r}: cannot be loaded from {folder} ({cause})"
    if _hub_offline():
        return (f"{what} {name_or_path!r}: no local folder of that name and not in the Hugging Face cache, and the hub "
                f"is not reachable offline (HF_HUB_OFFLINE=1); name a local folder (e.g. .cache/assets/...) or a hub "
                f"id that is already cached ({cause})")
    return f"{what} {name_or_path!r}: not a local folder and not loadable from the Hugging Face hub ({cause})"


def load_tokenizer(name_or_path: str, padding_side: str = "left"):
    """Left padding, because batched generation appends to the right end of every row.
    Raises ModelLoadError (load_pretrained) when the tokenizer cannot be loaded."""
    from transformers import AutoTokenizer

    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, name_or_path, "tokenizer")
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def weights_fit_one_gpu(name_or_path: str, dtype, device) -> bool:
    """Whether the model's weights in `dtype` take under 90 % of `device`'s free memory, counted
    from its config on the meta device (nothing is loaded)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = load_pretrained(AutoConfig.from_pretrained, name_or_path, "model config")
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config)
    empty.tie_weights()  # not tied on the meta device until asked: a tied head would count twice
    size = sum(p.numel() for p in empty.parameters()) * torch.finfo(dtype).bits // 8
    free, _ = torch.cuda.mem_get_info(device)
    return size < 0.9 * free


def load_causal_lm(name_or_path: str, dtype: str = "auto", device: str = "auto", shard: bool = False):
    """Return (model in eval mode on its device, tokenizer).

    `shard=True` (the judges: paper.yaml names a 72B one, about 135 GiB in bf16, which one GPU
    cannot hold with room to run) spreads the layers over every visible GPU with accelerate's
    device_map="auto", but only where it is needed: on CUDA, with more than one GPU visible, in
    a process that is not one rank of several (WORLD_SIZE; each rank would spread its own copy
    over all GPUs), and when the weights do not fit `device` (weights_fit_one_gpu). Otherwise
    the model goes to `device`, as every policy does.
    Raises ModelLoadError (load_pretrained) when the model or its tokenizer cannot be loaded."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if (shard and torch_device.type == "cuda" and torch.cuda.device_count() > 1
            and int(os.environ.get("WORLD_SIZE", "1")) == 1
            and not weights_fit_one_gpu(name_or_path, torch_dtype, torch_device)):
        model = load_pretrained(lambda source: AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, device_map="auto"), name_or_path, "causal LM")
    else:
        model = load_pretrained(lambda source: AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype),
                                name_or_path, "causal LM").to(torch_device)
    model.eval()
    return model, load_tokenizer(name_or_path)
