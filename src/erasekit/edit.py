"""The result of an erasure: the changed tensors only, plus everything needed to trust them.

An :class:`Edit` is a frozen record of ``{parameter name: new tensor}`` for the parameters a method
changed, the method name and config, the :class:`EraseRequest`, the base model it was made from,
and the package version. It never holds the whole model.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from erasekit.io import save_safetensors_atomic, write_json_atomic
from erasekit.pipeline import base_info

EDIT_TENSORS = "edit.safetensors"
EDIT_META = "edit.json"
EDIT_AUX = "edit_aux.safetensors"


@dataclass(frozen=True)
class EraseRequest:
    """What to remove (``erase``), what must survive (``preserve``), and what an erased concept
    should look like instead (``anchor``; ``None`` means the empty prompt ``""``).

    ``preserve`` may hold the empty prompt ``""`` (a blank or whitespace-only entry becomes ``""``):
    the closed forms (UCE, RECE) then keep the unconditional branch of classifier-free guidance, as
    their authors' code always does. Duplicates are dropped, order kept."""

    erase: list[str]
    preserve: list[str] = field(default_factory=list)
    anchor: str | None = None

    def __post_init__(self) -> None:
        erase = [c.strip() for c in self.erase if c and c.strip()]
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


def _version() -> str:
    from erasekit import __version__

    return __version__


@dataclass(frozen=True)
class Edit:
    """Changed parameters (names as in ``pipe.components``, e.g. ``unet.down_blocks.0...``) and provenance."""

    tensors: dict[str, torch.Tensor]
    method: str
    config: dict[str, Any]
    request: EraseRequest
    base: dict[str, Any]
    version: str = field(default_factory=_version)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    trace: dict[str, Any] = field(default_factory=dict)
    # Tensors kept with the edit that are not model parameters (e.g. RECE's derived embeddings);
    # never applied, saved to ``edit_aux.safetensors``.
    aux: dict[str, torch.Tensor] = field(default_factory=dict)

    # ------------------------------------------------------------------ applying
    def check_base(self, pipe) -> None:
        """Raise if ``pipe`` is not the base model this edit was made from."""
        info = base_info(pipe)
        if info["fingerprint"] != self.base.get("fingerprint"):
            raise ValueError(
                f"This edit was made for base model {self.base.get('id')!r} (fingerprint {self.base.get('fingerprint')}), "
                f"but the pipeline is {info['id']!r} (fingerprint {info['fingerprint']}). Load the edit's base model."
            )

    @torch.no_grad()
    def apply_(self, pipe, *, check: bool = True):
        """Write the edited tensors into ``pipe`` in place and return it."""
        if check:
            self.check_base(pipe)
        for name, value in self.tensors.items():
            param = get_parameter(pipe, name)
            param.copy_(value.to(device=param.device, dtype=param.dtype))
        return pipe

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
        """Read an edit written by :meth:`save` (safetensors only; nothing is unpickled)."""
        d = Path(directory)
        if not (d / EDIT_META).exists() or not (d / EDIT_TENSORS).exists():
            raise FileNotFoundError(f"No edit in {str(d)!r}: expected {EDIT_META} and {EDIT_TENSORS} (written by Edit.save).")
        meta = json.loads((d / EDIT_META).read_text())
        return cls(
            tensors=load_file(d / EDIT_TENSORS),
            method=meta["method"],
            config=meta["config"],
            request=EraseRequest(**meta["request"]),
            base=meta["base"],
            version=meta["version"],
            created=meta["created"],
            trace=meta.get("trace", {}),
            aux=load_file(d / EDIT_AUX) if (d / EDIT_AUX).exists() else {},
        )


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
