"""A run is a directory: ``config.json`` (everything needed to redo it), the edit, images, metrics.

:func:`run_dir` creates a run directory and removes it again if the block fails before it
finishes, so a bad argument never leaves a half-written run behind.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

from erasekit.io import write_json_atomic


@contextmanager
def run_dir(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Create ``path`` for a run; on failure remove what this call created."""
    p = Path(path)
    existed = p.exists()
    if existed and any(p.iterdir()) and not overwrite:
        raise FileExistsError(f"Run directory {str(p)!r} exists and is not empty; pass --overwrite or choose another --out.")
    p.mkdir(parents=True, exist_ok=True)
    try:
        yield p
    except BaseException:
        if not existed:
            shutil.rmtree(p, ignore_errors=True)
        raise


def git_commit() -> str | None:
    """The source tree's git commit, if it is a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5, check=False
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_run_config(directory: Path, **sections: Any) -> None:
    """``config.json`` with sorted keys, the package version and git commit."""
    from erasekit import __version__

    write_json_atomic(directory / "config.json", {**sections, "erasekit_version": __version__, "git_commit": git_commit()})


def parse_overrides(config_class: type, pairs: list[str]) -> dict[str, Any]:
    """``["lamb=0.1", "templates=['{}','a {}']"]`` -> typed overrides for ``config_class``."""
    import ast

    valid = {f.name: f for f in fields(config_class)}
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise ValueError(f"`--set {pair}` must look like KEY=VALUE, e.g. --set lamb=0.1.")
        if key not in valid:
            raise ValueError(f"`--set {key}`: unknown option; valid options: {sorted(valid)}.")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare string
        out[key] = value
    return out
