"""The registry of named evaluation protocols, with one explicit discovery list.

A protocol module registers its functions with :func:`register_protocol` when it is imported, into
:data:`PROTOCOL_REGISTRY` (a :class:`erasekit.registry.Registry`);
:func:`get_protocol` first imports every module of :data:`PROTOCOL_MODULES`, so a protocol is found
whatever the caller imported before (``evaluate(pipe, "shapes-attack")`` works without importing
``erasekit.attacks`` first). Modules register *into* this one and never import each other for it,
so there is no import cycle between the miniature's and the real models' protocols.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from erasekit.registry import Registry

ProtocolFn = Callable[..., dict[str, Any]]
# Every module that registers protocols (the discovery list; add a new protocol module here).
# Plug-ins by name, so that eval imports none of them (the world and the attacks sit above eval).
PROTOCOL_MODULES = ("erasekit.world.protocols", "erasekit.eval.real_protocols", "erasekit.attacks.asr")
PROTOCOL_REGISTRY: Registry[ProtocolFn] = Registry(
    "protocol", PROTOCOL_MODULES, unknown="Unknown protocol {name!r}; available: {valid}."
)
PROTOCOLS: Mapping[str, ProtocolFn] = PROTOCOL_REGISTRY.view  # live, read-only; no discovery


WRITES_METRICS: set[str] = set()  # protocols that write ``out_dir/metrics.json`` themselves


def register_protocol(name: str, *, writes_metrics: bool = False) -> Callable[[ProtocolFn], ProtocolFn]:
    """Register an evaluation protocol under ``name``. ``writes_metrics``: the protocol takes ``out_dir``
    as its own folder and writes ``metrics.json`` there itself (the real-model protocols, which stream
    thousands of images); for the others the caller writes the result where it wants it."""

    def deco(fn: ProtocolFn) -> ProtocolFn:
        PROTOCOL_REGISTRY.register(name, fn)
        if writes_metrics:
            WRITES_METRICS.add(name)
        return fn

    return deco


def writes_metrics(name: str) -> bool:
    """Whether protocol ``name`` writes its own ``metrics.json`` into ``out_dir``."""
    get_protocol(name)
    return name in WRITES_METRICS


def discover_protocols() -> dict[str, ProtocolFn]:
    """Import every protocol module of :data:`PROTOCOL_MODULES`; returns every protocol, by name."""
    return PROTOCOL_REGISTRY.as_dict()


def get_protocol(name: str) -> ProtocolFn:
    """Look a protocol up by name, with a helpful error."""
    return PROTOCOL_REGISTRY.get(name)
