"""A thin stand-in for ``erasekit.rundir`` (the RunDir contract), until that module lands on main.

Only what a study cell needs, with exactly the contract's names, so switching to the real module is
an import change: ``RunDir.create / open``, ``path``, ``identity``, ``edit_dir``, ``train_dir``,
``eval_dir``, ``attack_dir``, ``analysis_dir``, ``report_path``, ``write_json / read_json``,
``append / records``, ``lock``, ``has_edit / save_edit / load_edit``, ``metrics / write_metrics``,
``mark / stage``. Layout: ``run.json``, ``edit/``, ``train/``, ``eval/<protocol>/``,
``attacks/<name>/``, ``analysis/``, ``report.html``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from erasekit.io import append_jsonl, read_jsonl, write_json_atomic

RUN_JSON = "run.json"
LAYOUT = 1


class RunDirMismatch(ValueError):
    """A run directory holds another identity than the one asked for."""


def _canon(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def identity_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``["key: old -> new", ...]`` for the (nested) keys whose values differ."""
    out: list[str] = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


class RunDir:
    """A run directory: ``run.json`` (identity, stages) and the contract's sub-folders."""

    def __init__(self, path: Path, identity: dict[str, Any]) -> None:
        self.path = Path(path)
        self.identity = identity

    # ---------------------------------------------------------------- create / open
    @classmethod
    def create(cls, path: str | Path, identity: dict[str, Any], *, force: bool = False) -> RunDir:
        """Make (or reopen) the folder for ``identity``; another identity there is :class:`RunDirMismatch`."""
        from erasekit import __version__
        from erasekit.runs import git_commit

        p = Path(path)
        identity = _canon(identity)
        meta_path = p / RUN_JSON
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta.get("identity") == identity:
                return cls(p, identity)
            if not force:
                diff = identity_diff(meta.get("identity") or {}, identity)
                raise RunDirMismatch(
                    f"{str(p)!r} holds another run (differing: {'; '.join(diff)}); pass --force to rewrite its "
                    "identity, or choose another folder."
                )
            meta["identity"] = identity
            write_json_atomic(meta_path, meta)
            return cls(p, identity)
        p.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            meta_path,
            {
                "layout": LAYOUT,
                "identity": identity,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "erasekit": __version__,
                "git": git_commit(),
                "stages": [],
            },
        )
        return cls(p, identity)

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """An existing run directory (``run.json`` must be there)."""
        p = Path(path)
        if not (p / RUN_JSON).exists():
            raise FileNotFoundError(f"{str(p)!r} is not a run directory ({RUN_JSON} missing).")
        return cls(p, json.loads((p / RUN_JSON).read_text())["identity"])

    # ---------------------------------------------------------------- layout
    @property
    def edit_dir(self) -> Path:
        return self.path / "edit"

    @property
    def train_dir(self) -> Path:
        return self.path / "train"

    def eval_dir(self, protocol: str) -> Path:
        return self.path / "eval" / protocol

    def attack_dir(self, name: str) -> Path:
        return self.path / "attacks" / name

    @property
    def analysis_dir(self) -> Path:
        return self.path / "analysis"

    @property
    def report_path(self) -> Path:
        return self.path / "report.html"

    # ---------------------------------------------------------------- files
    def write_json(self, rel: str, obj: Any) -> None:
        write_json_atomic(self.path / rel, obj)

    def read_json(self, rel: str, default: Any = None) -> Any:
        p = self.path / rel
        return json.loads(p.read_text()) if p.exists() else default

    def append(self, rel: str, record: dict[str, Any]) -> None:
        append_jsonl(self.path / rel, record)

    def records(self, rel: str) -> list[dict[str, Any]]:
        p = self.path / rel
        return read_jsonl(p) if p.exists() else []

    @contextmanager
    def lock(self) -> Iterator[Path]:
        from erasekit.runs import locked

        with locked(self.path) as p:
            yield p

    # ---------------------------------------------------------------- edit, metrics, stages
    def has_edit(self) -> bool:
        return (self.edit_dir / "edit.json").exists()

    def save_edit(self, edit: Any) -> None:
        edit.save(self.edit_dir)

    def load_edit(self) -> Any:
        from erasekit.edit import Edit

        return Edit.load(self.edit_dir)

    def metrics(self, protocol: str) -> dict[str, Any] | None:
        return self.read_json(f"eval/{protocol}/metrics.json")

    def write_metrics(self, protocol: str, metrics: dict[str, Any]) -> None:
        self.write_json(f"eval/{protocol}/metrics.json", metrics)

    def mark(self, stage: str, status: str, **info: Any) -> None:
        if status not in ("done", "failed"):
            raise ValueError(f"`status` must be 'done' or 'failed', got {status!r}.")
        meta = self.read_json(RUN_JSON)
        rec = {"stage": stage, "status": status, "at": datetime.now(UTC).isoformat(timespec="seconds"), **info}
        meta.setdefault("stages", []).append(_canon(rec))
        self.write_json(RUN_JSON, meta)

    def stage(self, stage: str) -> dict[str, Any] | None:
        meta = self.read_json(RUN_JSON) or {}
        recs = [r for r in meta.get("stages", []) if r.get("stage") == stage]
        return recs[-1] if recs else None
