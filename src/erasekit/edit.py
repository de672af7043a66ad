"""The result of an erasure: the changed tensors only, plus everything needed to trust them.

An :class:`Edit` is a frozen record of ``{parameter name: new tensor}`` for the parameters a method
changed, the method name and config, the :class:`EraseRequest`, the base model it was made from,
and the package version. It never holds the whole model.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from erasekit._version import __version__
from erasekit.io import save_safetensors_atomic, write_json_atomic
from erasekit.pipeline import base_info

EDIT_TENSORS = "edit.safetensors"
EDIT_META = "edit.json"
EDIT_AUX = "edit_aux.safetensors"
RUN_EDIT_DIR = "edit"  # a run directory's edit folder (erasekit.rundir.RunDir.edit_dir)


@dataclass(frozen=True)
class EraseRequest:
    """What to remove (``erase``), what must survive (``preserve``), and what an erased concept
    should look like instead (``anchor``; ``None`` means the empty prompt ``""``).

    ``preserve`` may hold the empty prompt ``""`` (a blank or whitespace-only entry becomes ``""``):
    the closed forms (UCE, RECE) then keep the unconditional branch of classifier-free guidance, as
    their authors' code always does. Duplicates (in either list) are dropped, order kept; a concept
    both erased and preserved is an error."""

    erase: list[str]
    preserve: list[str] = field(default_factory=list)
    anchor: str | None = None

    def __post_init__(self) -> None:
        erase = list(dict.fromkeys(c.strip() for c in self.erase if c and c.strip()))
        if not erase:
            raise ValueError("`erase` is empty: name at least one concept to erase, e.g. --erase triangle.")
        preserve = list(dict.fromkeys((c or "").strip() for c in self.preserve))
        both = sorted(set(erase) & set(preserve))
        if both:
            raise ValueError(f"Concepts {both} are both erased and preserved; remove them from `preserve` or `erase`.")
        object.__setattr__(self, "erase", erase)
        object.__setattr__(self, "preserve", preserve)

    @property
    def target(self) -> str:
        """The anchor prompt erased concepts are mapped to."""
        return self.anchor or ""


@dataclass(frozen=True)
class Edit:
    """Changed parameters (names as in ``pipe.components``, e.g. ``unet.down_blocks.0...``) and provenance."""

    tensors: dict[str, torch.Tensor]
    method: str
    config: dict[str, Any]
    request: EraseRequest
    base: dict[str, Any]
    version: str = __version__
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    trace: dict[str, Any] = field(default_factory=dict)
    # Tensors kept with the edit that are not model parameters (e.g. RECE's derived embeddings);
    # never applied, saved to ``edit_aux.safetensors``.
    aux: dict[str, torch.Tensor] = field(default_factory=dict)

    # ------------------------------------------------------------------ identity
    def digest(self) -> str:
        """SHA-256 (16 hex digits) of the tensors and aux tensors (names, dtypes, shapes, bytes): what
        ties ``edit.json`` to ``edit.safetensors``."""
        return tensors_digest({**self.tensors, **{f"aux:{k}": v for k, v in self.aux.items()}})

    # ------------------------------------------------------------------ applying
    def check_base(self, pipe) -> None:
        """Raise if ``pipe`` is not the base model this edit was made from (its weight fingerprint).

        The pipeline may carry this edit already (e.g. while images of the edited model are made);
        :meth:`check_untouched` is the stricter check :meth:`apply_` adds.
        """
        info = base_info(pipe)
        if info["fingerprint"] != self.base.get("fingerprint"):
            raise ValueError(
                f"This edit was made for base model {self.base.get('id')!r} (fingerprint {self.base.get('fingerprint')}), "
                f"but the pipeline is {info['id']!r} (fingerprint {info['fingerprint']}). Load the edit's base model."
            )

    def check_untouched(self, pipe) -> None:
        """Raise if the parameters this edit overwrites are not the exact values it was computed from.

        Where the edit recorded them (``base["touched_digest"]``, see :func:`with_touched_digest`), a
        digest of every parameter it will overwrite is compared, so an edit is never applied over
        another edit of the same layers. Exact bytes are comparable only at the dtype the edit was
        made at (an fp32 edit applied to an fp16 copy of its base is legitimate; the fingerprint of
        :meth:`check_base` still guards that case).
        """
        want = self.base.get("touched_digest")
        if want is None:
            return
        current = {n: get_parameter(pipe, n) for n in self.tensors}
        if not all(str(p.dtype) == self.base.get("touched_dtype") for p in current.values()):
            return
        have = tensors_digest(current)
        if have != want:
            raise ValueError(
                f"The {len(self.tensors)} parameters this edit overwrites differ from the ones it was made from "
                f"(digest {have} != {want}): the pipeline already carries another edit of these layers, or is "
                "another model. Apply it to a freshly loaded base model."
            )

    def _targets(self, pipe) -> dict[str, torch.Tensor]:
        """The pipeline's parameter for every edited tensor, all checked (names, shapes) before any is written."""
        targets = {}
        for name, value in self.tensors.items():
            param = get_parameter(pipe, name)
            if tuple(param.shape) != tuple(value.shape):
                raise ValueError(
                    f"Edit tensor {name!r} has shape {tuple(value.shape)} but the pipeline's parameter has "
                    f"{tuple(param.shape)}: the edit is for another architecture."
                )
            targets[name] = param
        return targets

    @torch.no_grad()
    def apply_(self, pipe, *, check: bool = True):
        """Write the edited tensors into ``pipe`` in place and return it.

        All-or-nothing: every name and shape is checked before the first write, and if a write fails
        the parameters already written are restored, so a failed call never leaves a half-edited model.
        """
        if check:
            self.check_base(pipe)
            self.check_untouched(pipe)
        targets = self._targets(pipe)
        saved: dict[str, torch.Tensor] = {}
        try:
            for name, param in targets.items():
                saved[name] = param.detach().clone()
                param.copy_(self.tensors[name].to(device=param.device, dtype=param.dtype))
        except BaseException:
            for name, value in saved.items():
                targets[name].copy_(value)
            raise
        return pipe

    @contextmanager
    def applied(self, pipe, *, check: bool = True) -> Iterator[Any]:
        """Apply the edit to ``pipe`` for the block, then restore the original values exactly::

        with edit.applied(pipe):
            images = pipe(prompt).images
        """
        targets = self._targets(pipe)
        with torch.no_grad():
            saved = {n: p.detach().clone() for n, p in targets.items()}
        self.apply_(pipe, check=check)
        try:
            yield pipe
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    targets[name].copy_(value)

    # ------------------------------------------------------------------ saving
    def metadata(self) -> dict[str, Any]:
        """Everything but the tensors, as JSON-ready data."""
        return {
            "method": self.method,
            "config": self.config,
            "request": asdict(self.request),
            "base": self.base,
            "version": self.version,
            "created": self.created,
            "trace": self.trace,
            "parameters": {k: list(v.shape) for k, v in sorted(self.tensors.items())},
            "digest": self.digest(),
            **({"aux": {k: list(v.shape) for k, v in sorted(self.aux.items())}} if self.aux else {}),
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``edit.safetensors`` and ``edit.json`` into ``directory`` (atomically)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_safetensors_atomic(self.tensors, d / EDIT_TENSORS, metadata={"method": self.method})
        if self.aux:
            save_safetensors_atomic(self.aux, d / EDIT_AUX, metadata={"method": self.method})
        else:
            (d / EDIT_AUX).unlink(missing_ok=True)
        write_json_atomic(d / EDIT_META, self.metadata())
        return d

    @classmethod
    def load(cls, directory: str | Path) -> Edit:
        """Read an edit written by :meth:`save` (safetensors only; nothing is unpickled). ``directory`` may
        also be a run directory (:class:`erasekit.rundir.RunDir`), whose edit is in ``edit/``."""
        d = edit_folder(directory) or Path(directory)
        if not (d / EDIT_META).exists() or not (d / EDIT_TENSORS).exists():
            raise FileNotFoundError(
                f"No edit in {str(d)!r}: expected {EDIT_META} and {EDIT_TENSORS} (written by Edit.save)."
            )
        meta = json.loads((d / EDIT_META).read_text())
        tensors = load_file(d / EDIT_TENSORS)
        listed = set(meta.get("parameters", tensors))
        if set(tensors) != listed:
            extra, missing = sorted(set(tensors) - listed), sorted(listed - set(tensors))
            raise ValueError(
                f"{str(d / EDIT_TENSORS)!r} does not match {EDIT_META}: tensors not listed {extra[:3]}, listed but "
                f"missing {missing[:3]}. The edit was changed after it was saved; re-create it."
            )
        edit = cls(
            tensors=tensors,
            method=meta["method"],
            config=meta["config"],
            request=EraseRequest(**meta["request"]),
            base=meta["base"],
            version=meta["version"],
            created=meta["created"],
            trace=meta.get("trace", {}),
            aux=load_file(d / EDIT_AUX) if (d / EDIT_AUX).exists() else {},
        )
        if "digest" in meta and edit.digest() != meta["digest"]:  # edits saved before 0.2 carry no digest
            raise ValueError(
                f"The tensors in {str(d)!r} do not match the digest in {EDIT_META} ({edit.digest()} != "
                f"{meta['digest']}): the files were corrupted or changed after saving; re-create the edit."
            )
        return edit

    # ------------------------------------------------------------------ exporting (erasekit.export)
    def export(self, pipe, out: str | Path, format: str = "diffusers", **options: Any) -> Any:
        """Write this edit out of EraseKit as ``format`` (diffusers, lora, kohya, unet); ``pipe`` is the
        unedited base. See :func:`erasekit.export.export` (issue 16) for the options."""
        if _EXPORTER is None:
            raise RuntimeError("No exporter is registered; `import erasekit` (it loads erasekit.export) first.")
        return _EXPORTER(self, pipe, out, format, **options)

    def export_diffusers(self, pipe, out: str | Path, **options: Any) -> Any:
        """A pipeline folder stock ``StableDiffusionPipeline.from_pretrained`` loads (base's safety checker kept)."""
        return self.export(pipe, out, "diffusers", **options)

    def export_lora(
        self, pipe, out: str | Path, *, rank: int | str | None = None, energy: float | None = None, **options: Any
    ) -> Any:
        """``pytorch_lora_weights.safetensors`` for stock ``pipe.load_lora_weights(out)`` (truncated SVD at
        ``rank``/``energy``; default full rank, exact)."""
        return self.export(pipe, out, "lora", rank=rank, energy=energy, **options)

    def export_kohya(
        self,
        pipe,
        out: str | Path,
        *,
        rank: int | str | None = None,
        energy: float | None = None,
        drop_bias: bool = False,
        **options: Any,
    ) -> Any:
        """The same LoRA with kohya keys (A1111 / ComfyUI); bias deltas need ``drop_bias=True``."""
        return self.export(pipe, out, "kohya", rank=rank, energy=energy, drop_bias=drop_bias, **options)

    def export_unet(self, pipe, out: str | Path, **options: Any) -> Any:
        """The edited UNet alone, as a diffusers ``UNet2DConditionModel`` folder."""
        return self.export(pipe, out, "unet", **options)


# The function behind Edit.export*: erasekit.export registers it when imported (the package's __init__
# imports it), so that this module never imports its exporters and there is no edit <-> export cycle,
# while the export operations still sit on the edit, as diffusers keeps save/fuse/unfuse on one mixin.
_EXPORTER: Callable[..., Any] | None = None


def register_exporter(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Make ``fn(edit, pipe, out, format, **options)`` the implementation of :meth:`Edit.export`."""
    global _EXPORTER
    _EXPORTER = fn
    return fn


def edit_folder(directory: str | Path) -> Path | None:
    """The folder holding an edit: ``directory`` itself (:meth:`Edit.save`) or its ``edit/`` (a run
    directory); ``None`` if neither holds one."""
    d = Path(directory)
    for cand in (d, d / RUN_EDIT_DIR):
        if (cand / EDIT_META).is_file():
            return cand
    return None


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (16 hex digits) over sorted names, dtypes, shapes and raw bytes of ``tensors``."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def with_touched_digest(edit: Edit, pipe) -> Edit:
    """The edit with ``base["touched_digest"]``: the digest of ``pipe``'s values of every parameter it
    overwrites, taken from the pipeline the edit was computed on (see :meth:`Edit.check_base`)."""

    params = {n: get_parameter(pipe, n) for n in edit.tensors}
    dtypes = {str(p.dtype) for p in params.values()}
    if len(dtypes) != 1:
        return edit  # mixed precision: the exact-bytes check does not apply
    return replace(edit, base={**edit.base, "touched_digest": tensors_digest(params), "touched_dtype": dtypes.pop()})


def get_parameter(pipe, name: str) -> torch.Tensor:
    """Parameter ``component.path.to.weight`` of a pipeline (e.g. ``unet.mid_block...to_k.weight``)."""
    component, _, rest = name.partition(".")
    module = getattr(pipe, component, None)
    if module is None or not isinstance(module, torch.nn.Module):
        raise KeyError(f"Pipeline has no component {component!r} (parameter {name!r}).")
    try:
        return module.get_parameter(rest)
    except AttributeError as e:
        raise KeyError(f"Pipeline component {component!r} has no parameter {rest!r}.") from e


def clean_partial_dir(directory: Path, existed_before: bool) -> None:
    """Remove a run directory this process created if the run failed before finishing."""
    if not existed_before and directory.exists():
        shutil.rmtree(directory, ignore_errors=True)
