"""Atomic file writes, hashing and schema-checked JSONL reading.

Every file a stage writes goes through here so that a crash never leaves a half-written
file that a later stage would mistake for a finished one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Mapping


class SchemaError(ValueError):
    """A record does not match its declared schema; the message names file, line and key."""


def atomic_write_with(path: Path | str, write: Callable[[IO], None], binary: bool = False) -> Path:
    """Call `write(handle)` on a temp file beside `path`, fsync it, then rename it over `path`:
    a crash never leaves a half-written file. The one atomic file write of the project."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path | str, text: str) -> Path:
    return atomic_write_with(path, lambda handle: handle.write(text))


@contextlib.contextmanager
def atomic_folder(target: Path | str) -> Iterator[Path]:
    """Yield an empty staging folder beside `target`; when the block ends without an error, the
    staging folder replaces `target`. An interrupted build leaves only `.<name>.partial`."""
    target = Path(target)
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    yield staging
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def atomic_save_figure(fig, path: Path | str, dpi: int = 120) -> Path:
    """A matplotlib figure to PNG, written to a temp name beside `path` and renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: Path | str, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: Path | str, records: Iterable[Mapping[str, Any]]) -> Path:
    lines = [json.dumps(record, ensure_ascii=False, sort_keys=True) for record in records]
    return atomic_write_text(path, "".join(line + "\n" for line in lines))


def sha256_file(path: Path | str, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def check_record(record: Any, schema: Mapping[str, type | tuple[type, ...]], where: str) -> None:
    """Raise SchemaError unless `record` is a dict with every key of `schema` of its type.

    `where` names the record in the message, e.g. "samples.jsonl line 7".
    Extra keys are allowed: later stages add columns.
    """
    if not isinstance(record, dict):
        raise SchemaError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key, expected in schema.items():
        if key not in record:
            raise SchemaError(f"{where}: missing key {key!r}")
        # bool is an int subclass; a schema asking for int/float must not accept True.
        value = record[key]
        if isinstance(value, bool) and expected in (int, float, (int, float)):
            raise SchemaError(f"{where}: key {key!r} should be {expected}, got bool")
        if not isinstance(value, expected):
            raise SchemaError(
                f"{where}: key {key!r} should be {getattr(expected, '__name__', expected)}, "
                f"got {type(value).__name__}"
            )


def read_jsonl(path: Path | str, schema: Mapping[str, type | tuple[type, ...]] | None = None) -> list[dict]:
    return list(iter_jsonl(path, schema))


def iter_jsonl(path: Path | str, schema: Mapping[str, type | tuple[type, ...]] | None = None) -> Iterator[dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file (has the stage that writes it run?)")
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise SchemaError(f"{path} line {line_number}: not valid JSON ({error.msg})") from None
            if schema is not None:
                check_record(record, schema, f"{path} line {line_number}")
            yield record
