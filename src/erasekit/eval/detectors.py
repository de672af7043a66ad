"""Detectors turn images into per-concept scores; metrics read their top-k.

A detector has a ``name``, a ``version``, ``heads`` (head name -> class names) and
``predict(images) -> {head: probabilities (N, C)}`` for uint8 images (N, H, W, 3). Detectors are
plug-ins: a module registers a loader by name with :func:`register_detector` (the miniature's
``"shapes"`` CNN, :class:`erasekit.world.detector.ShapesWorldDetector`, with heads ``object``,
``colour``, ``background``, ``style`` and ``unsafe``) into :data:`DETECTORS` (a
:class:`erasekit.registry.Registry`), and :func:`load_detector` imports the modules of
:data:`DETECTOR_MODULES` first, so eval never imports the world that defines one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from erasekit.registry import Registry

# Every module that registers detectors (the discovery list; add a new detector module here).
DETECTOR_MODULES = ("erasekit.world.detector",)
DetectorLoader = Callable[..., "Detector"]
DETECTORS: Registry[DetectorLoader] = Registry(
    "detector",
    DETECTOR_MODULES,
    unknown="Unknown detector {name!r}; expected one of {valid} or a folder with a saved detector.",
)
_FOLDER_LOADERS: list[DetectorLoader] = []


class Detector(Protocol):
    """What metrics need from a detector."""

    name: str
    version: str
    heads: dict[str, list[str]]

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Class probabilities per head for uint8 images (N, H, W, 3)."""
        ...


def register_detector(name: str, *, folders: bool = False) -> Callable[[DetectorLoader], DetectorLoader]:
    """Register ``loader(**kwargs) -> Detector`` under ``name``; with ``folders`` it also loads a folder
    given as the name (``loader(directory, **kwargs)``)."""

    def deco(loader: DetectorLoader) -> DetectorLoader:
        DETECTORS.register(name, loader)
        if folders and loader not in _FOLDER_LOADERS:
            _FOLDER_LOADERS.append(loader)
        return loader

    return deco


def load_detector(name: str = "shapes", **kwargs: Any) -> Detector:
    """A detector by name (``"shapes"``: the miniature's CNN) or a folder holding one."""
    if name in DETECTORS:  # discovers first
        return DETECTORS.get(name)(**kwargs)
    if Path(name).is_dir() and _FOLDER_LOADERS:
        return _FOLDER_LOADERS[0](name, **kwargs)
    raise DETECTORS.unknown_error(name)
