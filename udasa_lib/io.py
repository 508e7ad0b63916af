"""Atomic file writes, hashing and schema-checked JSONL reading.

Every file a stage writes goes through here so that a crash never leaves a half-written
file that a later stage would mistake for a finished one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
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


def display_path(path: Path | str, root: Path | str | None = None) -> str:
    """How a written file names another file: relative to `root` (default the repo; or the results
    folder) when it is inside it, so that two clones write the same bytes; otherwise as given."""
    from udasa_lib import REPO_ROOT

    path = Path(path)
    if not path.is_absolute():
        return path.as_posix()  # already relative (to the repo, where every command runs)
    try:
        return path.resolve().relative_to(Path(root or REPO_ROOT).resolve()).as_posix()
    except ValueError:
        return path.as_posix()


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


def read_jsonl(path: Path | str, schema: Mapping[str, type | tuple[type, ...]] | None = None, *,
               allow_nonfinite: bool = False) -> list[dict]:
    """Every record of a JSONL file (see `iter_jsonl` for what is checked and raised)."""
    return list(iter_jsonl(path, schema, allow_nonfinite=allow_nonfinite))


# An exponent of three digits or more is the only way a finite-looking JSON number parses to inf
# (1e999); json's parse_constant hook sees NaN/Infinity but not these.
_HUGE_EXPONENT = re.compile(r"[eE]\+?\d{3}")


def _first_nonfinite(value: Any, key: str = "") -> tuple[str, float] | None:
    """(dotted/indexed key, value) of the first NaN or infinity in a parsed JSON value, e.g.
    ("semantic.u[1]", nan); the key is "" when the value itself is one; None when all are finite."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (key, value)
    if isinstance(value, dict):
        items = ((f"{key}.{k}" if key else str(k), v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{key}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for item_key, item in items:
        found = _first_nonfinite(item, item_key)
        if found is not None:
            return found
    return None


def iter_jsonl(path: Path | str, schema: Mapping[str, type | tuple[type, ...]] | None = None, *,
               allow_nonfinite: bool = False) -> Iterator[dict]:
    """Records of a JSONL file, one per non-blank line, checked as they are read.

    Raises FileNotFoundError when the file is missing, and SchemaError naming the file and line
    when a line is not UTF-8, not JSON, holds a NaN or infinity anywhere (the message names the key;
    Python's json writes and reads them silently, and a NaN score or uncertainty then passes every
    comparison as False downstream), or fails `check_record` against `schema`.
    `allow_nonfinite=True` is the opt-out for files where NaN is a legitimate value (metric rows
    with an undefined interval, lm-eval's -inf log-likelihoods).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file (has the stage that writes it run?)")
    constants: list[str] = []

    def constant(name: str) -> float:  # NaN, Infinity, -Infinity
        constants.append(name)
        return float(name)

    decoder = json.JSONDecoder(parse_constant=constant)
    # bytes, decoded line by line: a bad byte is then reported with its line, not as a bare UnicodeDecodeError
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            where = f"{path} line {line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                bad = raw[error.start]
                raise SchemaError(f"{where}: not UTF-8 (byte {bad:#04x} at offset {error.start})") from None
            if not line.strip():
                continue
            constants.clear()
            try:
                record = decoder.decode(line)
            except json.JSONDecodeError as error:
                raise SchemaError(f"{where}: not valid JSON ({error.msg})") from None
            if not allow_nonfinite and (constants or _HUGE_EXPONENT.search(line)):
                found = _first_nonfinite(record)
                if found is not None:
                    raise SchemaError(f"{where}: key {found[0] or '(the record)'!r} is {found[1]}; records "
                                      "read between stages must hold finite numbers")
            if schema is not None:
                check_record(record, schema, where)
            yield record
