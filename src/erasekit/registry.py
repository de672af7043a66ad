"""The one registry mechanism: named entries that modules register when imported, found by an explicit list.

EraseKit has four registries, each a :class:`Registry`: the erasure methods
(:mod:`erasekit.methods.base`), the attacks (:mod:`erasekit.attacks.base`), the evaluation protocols
(:mod:`erasekit.eval.registry`) and the detectors (:mod:`erasekit.eval.detectors`). They work the same way:

* **Registration.** A module registers its entries with :meth:`Registry.register` when it is imported
  (through the registry's own decorator: ``@register``, ``@register_attack``, ``@register_protocol``,
  ``@register_detector``). A name registered again from another place is an error naming both places;
  the same place registering it again (its module re-run) replaces the entry.
* **Discovery.** Every registry holds an explicit tuple of the modules that register built-ins into it
  (:attr:`Registry.modules`). :meth:`Registry.discover` imports each of them once, and every lookup
  (:meth:`~Registry.get`, :meth:`~Registry.names`, :meth:`~Registry.items`, ``in``) discovers first, so an
  entry is found whatever the caller imported before. The modules are named by string, so the module
  that owns a registry never imports the modules above it that register into it (no arrow back up, no
  circle). A new built-in module is added to its registry's tuple; there is no package scan.
* **Plug-ins.** Anyone may register an entry at runtime (``register_attack(...)(MyAttack)``); it is
  found like a built-in, and :meth:`Registry.unregister` takes it away again.
* **Errors.** An unknown name is a ``ValueError`` listing the valid names (each registry keeps its own
  wording, given as ``unknown``).

This module imports nothing of erasekit: it sits on the bottom floor, below everything that registers.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from types import MappingProxyType
from typing import Any, Generic, TypeVar

T = TypeVar("T")

DEFAULT_UNKNOWN = "Unknown {kind} {name!r}; available: {valid}."


def origin_of(obj: Any) -> str:
    """Where ``obj`` was defined, as ``module.qualname`` (a function or class), for duplicate errors."""
    module = getattr(obj, "__module__", None) or "?"
    qualname = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{module}.{qualname}"


class Registry(Generic[T]):
    """Named entries of one ``kind`` (``"method"``), registered by the modules of ``modules`` when imported.

    ``unknown`` is the message of the ``ValueError`` for an unknown name, a :meth:`str.format` template
    with the fields ``kind``, ``name`` and ``valid`` (the valid names, sorted, comma-separated).
    """

    def __init__(self, kind: str, modules: Iterable[str] = (), *, unknown: str = DEFAULT_UNKNOWN) -> None:
        self.kind = kind
        self.modules: tuple[str, ...] = tuple(modules)
        self.unknown = unknown
        self._entries: dict[str, T] = {}
        self._origins: dict[str, str] = {}
        self._imported: set[str] = set()
        self.view = MappingProxyType(self._entries)  # live and read-only; no discovery

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} registered, modules={self.modules!r})"

    def register(self, name: str, entry: T, *, origin: str | None = None) -> T:
        """Register ``entry`` under ``name``; returns ``entry``. ``origin`` says where it comes from (default:
        :func:`origin_of` the entry). A name already registered from another origin is a ``ValueError``
        naming both; the same origin registering it again replaces the entry (its module was re-run)."""
        origin = origin_of(entry) if origin is None else origin
        if name in self._entries and self._origins[name] != origin:
            raise ValueError(
                f"{self.kind.capitalize()} {name!r} is registered twice: by {self._origins[name]} and by {origin}."
            )
        self._entries[name] = entry
        self._origins[name] = origin
        return entry

    def unregister(self, name: str) -> T:
        """Take ``name`` away (a plug-in's entry, e.g. at the end of a test); returns its entry."""
        self._origins.pop(name, None)
        return self._entries.pop(name)

    def discover(self) -> Registry[T]:
        """Import each module of :attr:`modules` once (each registers its entries); returns the registry.
        A module whose import fails is tried again by the next lookup."""
        for module in self.modules:
            if module not in self._imported:
                importlib.import_module(module)
                self._imported.add(module)
        return self

    def get(self, name: str) -> T:
        """The entry ``name`` (after discovery); an unknown name is a ``ValueError`` listing the valid ones."""
        self.discover()
        if name not in self._entries:
            raise self.unknown_error(name)
        return self._entries[name]

    def unknown_error(self, name: str) -> ValueError:
        """The ``ValueError`` for the unknown ``name``, listing the valid names."""
        return ValueError(self.unknown.format(kind=self.kind, name=name, valid=", ".join(sorted(self._entries))))

    def names(self) -> list[str]:
        """Every registered name (after discovery), sorted."""
        self.discover()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """Every ``(name, entry)`` (after discovery), sorted by name."""
        self.discover()
        return sorted(self._entries.items())

    def as_dict(self) -> dict[str, T]:
        """A new dict of every entry (after discovery), sorted by name."""
        return dict(self.items())

    def __contains__(self, name: object) -> bool:
        self.discover()
        return name in self._entries

    def __len__(self) -> int:
        self.discover()
        return len(self._entries)
