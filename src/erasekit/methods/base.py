"""The method registry: every erasure method registers its name, config dataclass and function.

A method is ``fn(pipe, request, config, *, generator=None, progress=True) -> Edit``. It never
mutates the caller's pipeline (it works on copies of the tensors it changes) and never evaluates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch

from erasekit.edit import Edit, EraseRequest


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its name, config class, erase function and a one-line summary."""

    name: str
    config_class: type
    fn: Callable[..., Edit]
    summary: str


_REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, config_class: type, summary: str) -> Callable[[Callable[..., Edit]], Callable[..., Edit]]:
    """Decorator that registers an erase function under ``name``."""

    def deco(fn: Callable[..., Edit]) -> Callable[..., Edit]:
        if name in _REGISTRY:
            raise ValueError(f"Method {name!r} is registered twice.")
        _REGISTRY[name] = MethodSpec(name, config_class, fn, summary)
        return fn

    return deco


def get_method(name: str) -> MethodSpec:
    """Look a method up by name, with a helpful error."""
    _import_builtin_methods()
    if name not in _REGISTRY:
        raise ValueError(f"Unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name]


def available_methods() -> dict[str, MethodSpec]:
    """All registered methods."""
    _import_builtin_methods()
    return dict(sorted(_REGISTRY.items()))


def make_config(name: str, **overrides: Any):
    """The method's config dataclass with ``overrides``; unknown keys are an error that lists valid ones."""
    spec = get_method(name)
    valid = {f.name for f in fields(spec.config_class)}
    bad = sorted(set(overrides) - valid)
    if bad:
        raise ValueError(f"Unknown option(s) {bad} for method {name!r}; valid options: {sorted(valid)}.")
    return spec.config_class(**overrides)


def erase(
    pipe,
    request: EraseRequest | None = None,
    method: str = "uce",
    config: Any = None,
    *,
    generator: torch.Generator | None = None,
    progress: bool = True,
    **overrides: Any,
) -> Edit:
    """Erase ``request.erase`` from ``pipe`` with ``method``; returns an :class:`Edit` (the pipeline is unchanged).

    Example::

        pipe = erasekit.load_pipeline("shapes")
        edit = erasekit.erase(pipe, erasekit.EraseRequest(["triangle"], preserve=["square"]), method="uce")
        edit.apply_(pipe)
    """
    if request is None:
        raise ValueError("`request` is required: erasekit.EraseRequest(erase=[...]).")
    spec = get_method(method)
    if config is None:
        config = make_config(method, **overrides)
    elif overrides:
        raise ValueError("Pass either `config` or keyword overrides, not both.")
    return spec.fn(pipe, request, config, generator=generator, progress=progress)


def _import_builtin_methods() -> None:
    import importlib
    import pkgutil

    import erasekit.methods as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name != "base":
            importlib.import_module(f"erasekit.methods.{mod.name}")
