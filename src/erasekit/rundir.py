"""One run directory, on one resumable-directory primitive.

A run is a directory in one layout that every command shares::

    run.json            {"layout": 1, "identity": {...}, "created", "erasekit", "git", "stages": [...]}
    edit/               the edit (Edit.save / Edit.load: edit.safetensors, edit.json)
    train/              fine-tuning checkpoints, step log (erasekit.finetune)
    eval/<protocol>/    images/, index.jsonl, metrics.json of one evaluation protocol
    attacks/<name>/     one attack's images, records and cost
    analysis/           spectrum, graph, diff outputs
    report.html         the run's report

:class:`ResumableDir` is the primitive underneath (and what generation and attack folders use
directly): a directory that records the *identity* of its contents (the settings that made them) in
one JSON file and refuses to be continued with other settings, naming each differing key
(``old -> new``); atomic JSON writes relative to it; crash-tolerant JSON-lines indexes
(:func:`erasekit.io.append_jsonl`); an advisory lock (:func:`erasekit.runs.locked`); and the merge of
per-process index shards (``index.rank{r}.jsonl`` -> ``index.jsonl``). :class:`RunDir` is a
:class:`ResumableDir` whose identity file is ``run.json``, with the layout's paths, the edit, the
metrics of each protocol and stage marks.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import re
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from erasekit._version import __version__
from erasekit.edit import EDIT_META, RUN_EDIT_DIR, Edit, edit_folder
from erasekit.io import append_jsonl, atomic_path, jsonable, read_jsonl, write_json_atomic, write_text_atomic
from erasekit.runs import LOCK_FILE, git_commit, locked

LAYOUT = 1
RUN_JSON = "run.json"
IDENTITY_JSON = "identity.json"
SHARD_INFIX = ".rank"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$")


class RunDirMismatch(ValueError):
    """A directory holds results made with other settings than the ones asked for."""

    def __init__(self, path: Path, differences: list[str], what: str = "run directory", *, detail: str = "") -> None:
        self.path = Path(path)
        self.differences = differences
        shown = "; ".join(differences[:8]) + (f"; and {len(differences) - 8} more" if len(differences) > 8 else "")
        detail = detail or f"was made with other settings ({shown})"
        super().__init__(
            f"{what.capitalize()} {str(path)!r} {detail}. Use the original settings, "
            "choose another folder, or pass --force (force=True) to start it again with the new ones; nothing was "
            "overwritten."
        )


def identity_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Every key where two JSON-ready identities differ, as ``"key.sub: old -> new"`` (sorted)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            name = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                out.append(f"{name}: (absent) -> {new[k]!r}")
            elif k not in new:
                out.append(f"{name}: {old[k]!r} -> (absent)")
            else:
                out += identity_diff(old[k], new[k], name)
        return out
    return [] if old == new else [f"{prefix or 'identity'}: {old!r} -> {new!r}"]


def config_settings(config: Any) -> dict[str, Any]:
    """A config dataclass as identity data: every field except those that only control how a run is
    executed (``metadata={"run": True}``: run_dir, resume, checkpointing), plus its preset's name."""
    out = {f.name: getattr(config, f.name) for f in fields(config) if not f.metadata.get("run")}
    preset = getattr(config, "_erasekit_preset", None)
    return jsonable({**out, **({"preset": preset} if preset else {})})


def check_name(kind: str, name: str) -> str:
    """A protocol or attack name used as a folder name: one path component of safe characters."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"`{kind}` must be a non-empty name of letters, digits and _ . = + - (it names a folder), got {name!r}."
        )
    return name


def shard_name(rel: str, rank: int) -> str:
    """The per-process file of index ``rel``: ``index.jsonl`` -> ``index.rank3.jsonl``."""
    stem, dot, ext = rel.rpartition(".")
    return f"{stem}{SHARD_INFIX}{int(rank)}.{ext}" if dot else f"{rel}{SHARD_INFIX}{int(rank)}"


@contextmanager
def _meta_lock(path: Path) -> Iterator[None]:
    """A short, blocking lock around read-modify-write of a directory's identity file (separate from the
    run's own lock, which a writer may hold for hours)."""
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / ".meta.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class ResumableDir:
    """A directory that records the settings that made it and is only continued with the same ones.

    ``ResumableDir(path, identity)`` creates ``path`` and writes ``meta`` (``identity.json``) with
    ``{"layout": 1, "identity": identity, "created", "erasekit", "git"}`` if it is new; if the file
    exists with another identity it raises :class:`RunDirMismatch` naming each differing key, unless
    ``force=True``, which starts the record again with the new identity (earlier files are left for the
    caller to overwrite). Identities are compared as JSON (tuples equal lists). An identity file written
    before the layout existed (a bare dict without ``"layout"``, e.g. an old ``generation.json``) is read
    as that identity, so such folders still resume. ``extra``: top-level fields a new meta file starts with
    beside the identity (never compared; e.g. the torch thread counts of a generation folder).
    """

    def __init__(
        self,
        path: str | Path,
        identity: dict[str, Any],
        *,
        meta: str = IDENTITY_JSON,
        force: bool = False,
        what: str = "directory",
        extra: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(identity, dict):
            raise TypeError(
                f"`identity` must be a dict of the settings that make the directory, got {type(identity).__name__}."
            )
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(f"{what.capitalize()} {str(self.path)!r} is a file; choose another folder.")
        self.meta_name = meta
        self.what = what
        self.identity: dict[str, Any] = jsonable(identity)
        self._extra = jsonable(extra or {})  # top-level fields of a NEW meta file, beside the identity (not compared)
        with _meta_lock(self.path):
            if not force and self.check(self.path, self.identity, meta=meta, what=what):
                return
            self._write_meta(self._fresh_meta())

    @classmethod
    def at(cls, path: str | Path, meta: str = IDENTITY_JSON, *, what: str = "directory") -> ResumableDir:
        """The folder ``path`` as it is, without an identity check (reading, merging shards); its identity
        is the one recorded, or ``{}`` when there is none yet."""
        rd = cls.__new__(cls)
        rd.path, rd.meta_name, rd.what = Path(path), meta, what
        rec = _read_meta_file(rd.path / meta)
        rd.identity = rec["identity"] if rec else {}
        return rd

    @staticmethod
    def read_meta(path: str | Path, meta: str = IDENTITY_JSON) -> dict[str, Any] | None:
        """The identity file ``path/meta`` (``{"layout", "identity", ...}``), or ``None`` if there is none."""
        return _read_meta_file(Path(path) / meta)

    @staticmethod
    def check(
        path: str | Path, identity: dict[str, Any], *, meta: str = IDENTITY_JSON, what: str = "directory"
    ) -> bool:
        """Whether ``path`` already holds results of ``identity`` (``False``: none yet); raises
        :class:`RunDirMismatch` if it holds another identity's. Writes nothing."""
        old = _read_meta_file(Path(path) / meta)
        if old is None:
            return False
        diff = identity_diff(old["identity"], jsonable(identity))
        if diff:
            raise RunDirMismatch(Path(path), diff, what)
        return True

    # ------------------------------------------------------------------ the identity file
    def _fresh_meta(self) -> dict[str, Any]:
        return {
            "layout": LAYOUT,
            "identity": self.identity,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "erasekit": __version__,
            "git": git_commit(),
            **getattr(self, "_extra", {}),
        }

    def _read_meta(self) -> dict[str, Any] | None:
        return _read_meta_file(self.path / self.meta_name)

    def _write_meta(self, meta: dict[str, Any]) -> None:
        write_json_atomic(self.path / self.meta_name, meta)

    @property
    def meta(self) -> dict[str, Any]:
        """The identity file's whole content (identity, created, version, git, and what was added)."""
        return self._read_meta() or self._fresh_meta()

    def update_meta(self, **fields: Any) -> None:
        """Set top-level fields of the identity file beside the identity (e.g. a cost measured once)."""
        if "identity" in fields or "layout" in fields:
            raise ValueError(
                "`identity` and `layout` are set when the directory is made; create it again with force=True."
            )
        with _meta_lock(self.path):
            meta = self.meta
            meta.update(jsonable(fields))
            self._write_meta(meta)

    # ------------------------------------------------------------------ files relative to the directory
    def file(self, rel: str) -> Path:
        """``path/rel``, refused if ``rel`` leaves the directory."""
        p = self.path / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ValueError(f"Path {rel!r} must be relative to the directory and stay inside it.")
        return p

    def write_json(self, rel: str, obj: Any) -> Path:
        """Write ``obj`` as sorted JSON to ``path/rel`` atomically."""
        p = self.file(rel)
        write_json_atomic(p, obj)
        return p

    def read_json(self, rel: str, default: Any = None) -> Any:
        """``path/rel`` parsed, or ``default`` when it does not exist."""
        p = self.file(rel)
        if not p.exists():
            return default
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{str(p)!r} is not valid JSON ({e}); it was changed by hand or by another program."
            ) from e

    def write_png(self, rel: str, image: np.ndarray) -> str:
        """Save a uint8 (H, W, 3) image as PNG at ``path/rel`` atomically; returns ``rel``."""
        with atomic_path(self.file(rel)) as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
        return rel

    def append(self, rel: str, record: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Append one record (or several) to the JSON-lines file ``rel`` (a line cut by a crash is dropped)."""
        append_jsonl(self.file(rel), record)

    def records(self, rel: str, *, valid: Callable[[dict[str, Any]], bool] | None = None) -> list[dict[str, Any]]:
        """The records of ``rel`` (those for which ``valid`` holds, e.g. whose image file exists)."""
        rows = read_jsonl(self.file(rel))
        return rows if valid is None else [r for r in rows if valid(r)]

    @contextmanager
    def lock(self, name: str = LOCK_FILE) -> Iterator[ResumableDir]:
        """Hold the directory's advisory lock (a second writer is told the holder's PID)."""
        with locked(self.path, name):
            yield self

    # ------------------------------------------------------------------ shards of one index
    def shards(self, rel: str) -> list[str]:
        """``rel`` then every per-process shard of it (``index.rank{r}.jsonl``), sorted by rank."""
        stem, dot, ext = rel.rpartition(".")
        head = f"{stem}{SHARD_INFIX}" if dot else f"{rel}{SHARD_INFIX}"
        tail = f".{ext}" if dot else ""
        parent = self.file(rel).parent
        prefix = Path(head).name

        def rank_of(p: Path) -> int:
            mid = p.name[len(prefix) : len(p.name) - len(tail)]
            return int(mid) if mid.isdigit() else 1 << 30

        found = [p for p in parent.glob(f"{prefix}*{tail}") if rank_of(p) != 1 << 30] if parent.exists() else []
        rel_parent = str(Path(rel).parent)
        names = [p.name if rel_parent == "." else f"{rel_parent}/{p.name}" for p in sorted(found, key=rank_of)]
        return [rel, *names]

    def merged_records(
        self,
        rel: str,
        key: Callable[[dict[str, Any]], Hashable],
        *,
        valid: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[Hashable, dict[str, Any]]:
        """Every record of ``rel`` and its shards, first occurrence of each ``key`` kept."""
        out: dict[Hashable, dict[str, Any]] = {}
        for name in self.shards(rel):
            for r in self.records(name, valid=valid):
                out.setdefault(key(r), r)
        return out

    def merge(
        self,
        rel: str,
        key: Callable[[dict[str, Any]], Hashable],
        *,
        order: list[Hashable] | None = None,
        valid: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[Hashable, dict[str, Any]]:
        """Merge ``rel`` and its shards into ``rel`` (atomically, keys in ``order`` first) and remove the
        shards. Call it only when no process is writing them. Returns the merged records by key."""
        done = self.merged_records(rel, key, valid=valid)
        first = [k for k in dict.fromkeys(order or []) if k in done]
        keys = first + [k for k in done if k not in set(first)]
        write_text_atomic(self.file(rel), "".join(json.dumps(done[k], sort_keys=True) + "\n" for k in keys))
        for name in self.shards(rel)[1:]:
            self.file(name).unlink(missing_ok=True)
        return {k: done[k] for k in keys}


def _read_meta_file(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}); it was changed by hand or by another program.") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{str(path)!r} does not hold a JSON object; it was not written by EraseKit.")
    if "layout" not in meta:  # written before the layout: the whole file is the identity
        return {"layout": 0, "identity": meta}
    return meta


StageStatus = Literal["done", "failed"]


class RunDir(ResumableDir):
    """A run: ``run.json`` (identity and stage marks), ``edit/``, ``train/``, ``eval/<protocol>/``,
    ``attacks/<name>/``, ``analysis/``, ``report.html`` (see the module docstring).

    ``RunDir.create(path, identity)`` makes a new run or continues one made with the same identity;
    ``RunDir.open(path)`` reads an existing one. A folder of the layout before run.json (an edit saved
    directly in it, with ``config.json``) opens too: its identity is its ``config.json``.
    """

    def __init__(self, path: str | Path, identity: dict[str, Any], *, force: bool = False) -> None:
        super().__init__(path, identity, meta=RUN_JSON, force=force, what="run directory")

    @classmethod
    def create(cls, path: str | Path, identity: dict[str, Any], *, force: bool = False) -> RunDir:
        """Make the run directory ``path`` (or continue it: same identity), writing ``run.json`` atomically.
        Another identity in ``run.json`` raises :class:`RunDirMismatch` naming the differing keys;
        ``force=True`` rewrites the identity (and clears the stage marks)."""
        return cls(path, identity, force=force)

    @staticmethod
    def is_run(path: str | Path) -> bool:
        """Whether ``path`` has a ``run.json`` of this layout."""
        meta = _read_meta_file(Path(path) / RUN_JSON)
        return meta is not None and meta["layout"] >= 1

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """The existing run directory ``path``; a clear error if it is not one."""
        p = Path(path)
        meta = _read_meta_file(p / RUN_JSON)
        rd = cls.__new__(cls)
        rd.path, rd.meta_name, rd.what = p, RUN_JSON, "run directory"
        if meta is not None and meta["layout"] >= 1:
            rd.identity = meta["identity"]
            return rd
        # the layout before run.json: a flat run.json (fine-tuning) or config.json (erase --out) beside the edit
        legacy = meta or _read_meta_file(p / "config.json")
        if legacy is None and not (p / EDIT_META).exists():
            raise FileNotFoundError(
                f"{str(p)!r} is not a run directory: it has no {RUN_JSON} (make one with `erasekit erase --out "
                f"{p}` or erasekit.rundir.RunDir.create)."
            )
        rd.identity = legacy["identity"] if legacy else {}
        rd._legacy = True
        return rd

    _legacy = False

    def _read_meta(self) -> dict[str, Any] | None:
        # an older folder has no layout-1 run.json: the first mark writes one (its identity: the old record)
        return None if self._legacy and not self._upgraded() else super()._read_meta()

    def _upgraded(self) -> bool:
        meta = _read_meta_file(self.path / RUN_JSON)
        return meta is not None and meta["layout"] >= 1

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ------------------------------------------------------------------ the layout
    @property
    def edit_dir(self) -> Path:
        """``edit/``: the folder :meth:`Edit.save` writes."""
        return self.path / RUN_EDIT_DIR

    @property
    def train_dir(self) -> Path:
        """``train/``: fine-tuning checkpoints and the step log."""
        return self.path / "train"

    def eval_dir(self, protocol: str) -> Path:
        """``eval/<protocol>/``: images, ``index.jsonl`` and ``metrics.json`` of one protocol."""
        return self.path / "eval" / check_name("protocol", protocol)

    def attack_dir(self, name: str) -> Path:
        """``attacks/<name>/``: one attack's outputs."""
        return self.path / "attacks" / check_name("attack", name)

    @property
    def analysis_dir(self) -> Path:
        """``analysis/``: spectrum, graph and diff outputs."""
        return self.path / "analysis"

    @property
    def report_path(self) -> Path:
        """``report.html``."""
        return self.path / "report.html"

    # ------------------------------------------------------------------ the edit
    def _edit_folder(self) -> Path | None:
        return edit_folder(self.path)  # edit/, or the top of the folder in the layout before run.json

    def has_edit(self) -> bool:
        """Whether the run holds an edit (in ``edit/``, or at the top in the older layout)."""
        return self._edit_folder() is not None

    def save_edit(self, edit: Edit) -> Path:
        """Save ``edit`` to ``edit/`` (atomically, see :meth:`Edit.save`)."""
        return edit.save(self.edit_dir)

    def edit_digest(self) -> str | None:
        """The digest the run's edit recorded when saved (``None``: no edit, or one saved without a digest);
        read from its metadata without loading the tensors (:meth:`load_edit` checks them against it)."""
        d = self._edit_folder()
        return None if d is None else json.loads((d / EDIT_META).read_text()).get("digest")

    def load_edit(self) -> Edit:
        """The run's edit (digest-checked by :meth:`Edit.load`)."""
        d = self._edit_folder()
        if d is None:
            raise FileNotFoundError(
                f"Run directory {str(self.path)!r} holds no edit (expected {str(self.edit_dir / EDIT_META)!r}); "
                "run `erasekit erase --out` into it first."
            )
        return Edit.load(d)

    # ------------------------------------------------------------------ metrics
    def metrics(self, protocol: str) -> dict[str, Any] | None:
        """``eval/<protocol>/metrics.json``, or ``None`` if that protocol was not evaluated."""
        return self.read_json(f"eval/{check_name('protocol', protocol)}/metrics.json")

    def write_metrics(self, protocol: str, metrics: dict[str, Any]) -> Path:
        """Write ``eval/<protocol>/metrics.json`` atomically."""
        return self.write_json(f"eval/{check_name('protocol', protocol)}/metrics.json", metrics)

    def evaluated(self) -> list[str]:
        """The protocols with a ``metrics.json`` under ``eval/``, sorted."""
        root = self.path / "eval"
        return sorted(p.parent.name for p in root.glob("*/metrics.json")) if root.exists() else []

    # ------------------------------------------------------------------ stages
    def mark(self, stage: str, status: StageStatus, **info: Any) -> dict[str, Any]:
        """Append ``{"stage", "status", "time", **info}`` to ``run.json``'s ``stages``. A failed stage must
        carry ``error`` (the exception or its text), which is kept as text."""
        check_name("stage", stage)
        if status not in ("done", "failed"):
            raise ValueError(f"`status` must be 'done' or 'failed', got {status!r}.")
        if status == "failed":
            err = info.get("error")
            if err is None:
                raise ValueError("A failed stage needs `error` (the exception or its message).")
            if isinstance(err, BaseException):
                info["error"] = f"{type(err).__name__}: {err}"
        record = {"stage": stage, "status": status, "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
        record.update(jsonable(info))
        with _meta_lock(self.path):
            meta = self._read_meta() or self._fresh_meta()
            meta.setdefault("stages", []).append(record)
            self._write_meta(meta)
        return record

    def stages(self) -> list[dict[str, Any]]:
        """Every stage record, oldest first."""
        meta = self._read_meta()
        return list(meta.get("stages", [])) if meta else []

    def stage(self, stage: str) -> dict[str, Any] | None:
        """The last record of ``stage``, or ``None``."""
        last = [r for r in self.stages() if r.get("stage") == stage]
        return last[-1] if last else None
