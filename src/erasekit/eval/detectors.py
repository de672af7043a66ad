"""Detectors turn images into per-concept scores; metrics read their top-k.

A detector has a ``name``, a ``version``, ``heads`` (head name -> class names) and
``predict(images) -> {head: probabilities (N, C)}`` for uint8 images (N, H, W, 3). The miniature's
:class:`ShapesWorldDetector` has heads ``object``, ``colour``, ``background``, ``style`` and
``unsafe``; real-model detectors (ImageNet ResNet-50, NudeNet) implement the same interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch

BUNDLED_DETECTOR = Path(__file__).resolve().parents[1] / "world" / "assets" / "detector"


class Detector(Protocol):
    """What metrics need from a detector."""

    name: str
    version: str
    heads: dict[str, list[str]]

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Class probabilities per head for uint8 images (N, H, W, 3)."""
        ...


class ShapesWorldDetector:
    """The miniature's CNN (:class:`erasekit.world.detector.ShapesDetector`), batched, on CPU or GPU."""

    name = "shapesworld-cnn"

    def __init__(self, directory: str | Path = BUNDLED_DETECTOR, device: str | torch.device = "cpu", batch_size: int = 500):
        from erasekit.world.detector import ShapesDetector

        directory = Path(directory)
        if not (directory / "model.safetensors").exists():
            raise FileNotFoundError(
                f"No miniature detector at {directory}. Reinstall erasekit or rebuild it with `erasekit world train-detector`."
            )
        self.model = ShapesDetector.load(directory).to(device)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.heads = self.model.config.heads
        from erasekit.io import file_digest

        self.version = file_digest(directory / "model.safetensors")

    @torch.no_grad()
    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Softmax probabilities per head."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"Expected uint8 images (N, H, W, 3), got shape {images.shape}.")
        out: dict[str, list[np.ndarray]] = {h: [] for h in self.heads}
        for s in range(0, len(images), self.batch_size):
            x = torch.from_numpy(images[s : s + self.batch_size]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
            logits = self.model(x.to(self.device))
            for h in self.heads:
                out[h].append(torch.softmax(logits[h], dim=1).cpu().numpy())
        return {h: np.concatenate(v) if v else np.zeros((0, len(self.heads[h]))) for h, v in out.items()}


def load_detector(name: str = "shapes", **kwargs) -> Detector:
    """A detector by name: ``"shapes"`` (the miniature's CNN) or a folder holding one."""
    if name == "shapes":
        return ShapesWorldDetector(**kwargs)
    if Path(name).is_dir():
        return ShapesWorldDetector(name, **kwargs)
    raise ValueError(f"Unknown detector {name!r}; expected 'shapes' or a folder with a saved ShapesDetector.")
