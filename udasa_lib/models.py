"""Loading causal LMs and tokenizers from a hub id or a local folder, on CPU or GPU.

The same function loads the embedded SmolLM2 folder, the tiny test model, or any hub id a user
with network names in a config. fp32 on CPU (bf16 matmul there is ~90x slower), bf16 on CUDA.
"""
from __future__ import annotations

import os
from pathlib import Path

from udasa_lib import REPO_ROOT


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


def load_tokenizer(name_or_path: str, padding_side: str = "left"):
    """Left padding, because batched generation appends to the right end of every row."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_name_or_path(name_or_path))
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name_or_path: str, dtype: str = "auto", device: str = "auto"):
    """Return (model in eval mode on its device, tokenizer)."""
    from transformers import AutoModelForCausalLM

    torch_device = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(
        resolve_name_or_path(name_or_path), dtype=resolve_dtype(dtype, torch_device)
    ).to(torch_device)
    model.eval()
    return model, load_tokenizer(name_or_path)
