"""The registry of named evaluation protocols, with one explicit discovery list.

A protocol module registers its functions with :func:`register_protocol` when it is imported;
:func:`get_protocol` first imports every module of :data:`PROTOCOL_MODULES`, so a protocol is found
whatever the caller imported before (``evaluate(pipe, "shapes-attack")`` works without importing
``erasekit.attacks`` first). Modules register *into* this one and never import each other for it,
so there is no import cycle between the miniature's and the real models' protocols.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

ProtocolFn = Callable[..., dict[str, Any]]
PROTOCOLS: dict[str, ProtocolFn] = {}
# Every module that registers protocols (the discovery list; add a new protocol module here).
PROTOCOL_MODULES = ("erasekit.eval.protocols", "erasekit.eval.real_protocols", "erasekit.attacks.asr")


def register_protocol(name: str) -> Callable[[ProtocolFn], ProtocolFn]:
    """Register an evaluation protocol under ``name``."""

    def deco(fn: ProtocolFn) -> ProtocolFn:
        PROTOCOLS[name] = fn
        return fn

    return deco


def discover_protocols() -> dict[str, ProtocolFn]:
    """Import every protocol module of :data:`PROTOCOL_MODULES`; returns the registry."""
    for module in PROTOCOL_MODULES:
        importlib.import_module(module)
    return PROTOCOLS


def get_protocol(name: str) -> ProtocolFn:
    """Look a protocol up by name, with a helpful error."""
    protocols = discover_protocols()
    if name not in protocols:
        raise ValueError(f"Unknown protocol {name!r}; available: {', '.join(sorted(protocols))}.")
    return protocols[name]
