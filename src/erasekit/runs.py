"""A run is a directory: ``config.json`` (everything needed to redo it), the edit, images, metrics.

:func:`run_dir` creates a run directory and removes it again if the block fails before it
finishes, so a bad argument never leaves a half-written run behind.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from erasekit._version import __version__
from erasekit.io import write_json_atomic
from erasekit.options import coerce_option, parse_overrides  # noqa: F401 - their home is erasekit.options

LOCK_FILE = ".lock"
RESUMABLE = ("checkpoints", "train")
STALE_ON_OVERWRITE = ("report.html", "metrics.json")  # sub-folders that hold resumable work: never deleted on failure


class RunDirInUse(RuntimeError):
    """Another live process holds a run directory's lock."""


@contextmanager
def locked(path: str | Path, name: str = LOCK_FILE) -> Iterator[Path]:
    """Hold the advisory lock ``name`` of directory ``path`` (created if missing) for the block.

    A second writer, in this process or another, gets :class:`RunDirInUse` naming the holder's PID.
    The lock is an ``flock`` on ``path/<name>`` (``.lock``; writers of separate files in one directory,
    such as the processes of a distributed generation, take one lock per file): the OS releases it when its holder dies (even by
    ``kill -9``), so a stale lock from a dead process is simply taken over.
    """
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    fd = os.open(p / name, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RunDirInUse(
                f"Run directory {str(p)!r} is in use by PID {holder} (lock {name}); wait for that process to "
                "finish or choose another output directory."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield p
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _holds_resumable_work(p: Path) -> bool:
    return any((p / name).exists() for name in RESUMABLE) or any(
        (sub / name).exists() for sub in p.iterdir() if sub.is_dir() for name in RESUMABLE
    )


@contextmanager
def run_dir(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Create ``path`` for a run and hold its lock; on failure remove what this call created.

    A directory that holds resumable work (checkpoints) is never removed, whatever the failure
    (Ctrl-C included): the run can be resumed from it.
    """
    p = Path(path)
    existed = p.exists()
    if existed and not p.is_dir():
        raise NotADirectoryError(f"Run directory {str(p)!r} is a file; choose another --out.")
    visible = [c for c in p.iterdir() if not c.name.endswith(LOCK_FILE)] if existed else []
    if visible and not overwrite:
        raise FileExistsError(
            f"Run directory {str(p)!r} exists and is not empty; pass --overwrite or choose another --out."
        )
    try:
        with locked(p):  # first the lock: a live writer's directory is refused before anything is deleted
            if visible:  # --overwrite: the outputs derived from the previous edit would now describe the wrong one
                for name in STALE_ON_OVERWRITE:
                    (p / name).unlink(missing_ok=True)
            yield p
    except RunDirInUse:
        raise
    except BaseException:
        if not existed and p.exists() and not _holds_resumable_work(p):
            shutil.rmtree(p, ignore_errors=True)
        raise


def git_commit() -> str | None:
    """The source tree's git commit, if it is a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_run_config(directory: Path, **sections: Any) -> None:
    """``config.json`` with sorted keys, the package version and git commit."""
    write_json_atomic(
        directory / "config.json", {**sections, "erasekit_version": __version__, "git_commit": git_commit()}
    )
