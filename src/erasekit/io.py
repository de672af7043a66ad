"""Durable, atomic file writing: nothing half-written survives a crash or a power cut.

Every write goes to a temporary file beside its target, is flushed and ``fsync``'d, renamed onto the
target (atomic on POSIX), and the directory entry is ``fsync``'d too. Files are created with the
usual ``0644`` permissions (``mkstemp``'s ``0600`` would hide results from other users of a shared
machine). :func:`append_jsonl` and :func:`read_jsonl` make a line-per-record index that tolerates a
line cut by a crash: the reader drops an unterminated last line and the next append truncates it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


FILE_MODE = 0o644


def fsync_file(path: str | Path) -> None:
    """Flush a file's contents to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (a rename or a new file in it) to stable storage, where the OS allows."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories
    finally:
        os.close(fd)


def append_jsonl(path: str | Path, records: list[dict[str, Any]] | dict[str, Any]) -> None:
    """Append one record (or several) as JSON lines, ``fsync``'d; an unterminated last line left by a
    crash is cut off first, so a record is either whole in the file or absent."""
    path = Path(path)
    rows = [records] if isinstance(records, dict) else list(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                f.seek(0)
                data = f.read()
                f.truncate(data.rfind(b"\n") + 1)
                f.seek(0, os.SEEK_END)
        f.write(b"".join(json.dumps(r, sort_keys=True, default=_json_default).encode() + b"\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, FILE_MODE)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; an unterminated last line (a write cut by a crash) is ignored,
    while a corrupt *terminated* line is an error that names the file and line (never silently mixed)."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    if not data.endswith(b"\n"):
        lines = lines[:-1]  # cut by a crash: the next append_jsonl truncates it
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{str(path)!r} line {i} is not valid JSON ({e}); the file was changed by hand or by another program."
            ) from e
    return out


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as sorted, indented JSON atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Save tensors with safetensors, atomically."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON data (tuples become lists, paths strings, tensors' scalars numbers): the form
    in which two settings compare equal exactly when their JSON files would."""
    return json.loads(json.dumps(obj, sort_keys=True, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if hasattr(o, "item"):
        return o.item()
    if is_dataclass(o) and not isinstance(o, type):  # a composed config (options.py)
        return asdict(o)
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serialisable")


def file_digest(path: str | Path, n: int = 12) -> str:
    """First ``n`` hex digits of a file's SHA-256 (detector and model versions)."""

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:n]
