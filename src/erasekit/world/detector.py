"""The miniature detector: a small CNN with one head per kind of ShapesWorld concept, registered as the
``"shapes"`` detector of :func:`erasekit.eval.detectors.load_detector`.

It plays the role the ImageNet ResNet-50 (objects), NudeNet (the unsafe motif) and a style
classifier play for real Stable Diffusion: :mod:`erasekit.eval.metrics` reads its top-k.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from erasekit.eval.detectors import register_detector
from erasekit.io import file_digest, save_safetensors_atomic, write_json_atomic
from erasekit.world.shapes import BACKGROUNDS, COLOURS, OBJECTS, STYLE_NAMES

BUNDLED_DETECTOR = Path(__file__).resolve().parent / "assets" / "detector"


def _default_heads() -> dict[str, list[str]]:
    return {
        "object": list(OBJECTS),
        "colour": list(COLOURS),
        "background": list(BACKGROUNDS),
        "style": list(STYLE_NAMES),
        "unsafe": ["safe", "unsafe"],
    }


@dataclass
class DetectorConfig:
    """Architecture of :class:`ShapesDetector`; saved beside its weights."""

    channels: tuple[int, ...] = (16, 32, 64)
    image_size: int = 32
    heads: dict[str, list[str]] = field(default_factory=_default_heads)


class ShapesDetector(nn.Module):
    """Conv-BN-ReLU blocks, global pooling, and a linear head per concept kind."""

    def __init__(self, config: DetectorConfig | None = None) -> None:
        super().__init__()
        self.config = config or DetectorConfig()
        layers: list[nn.Module] = []
        c_in = 3
        for c in self.config.channels:
            layers += [
                nn.Conv2d(c_in, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.Conv2d(c, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({k: nn.Linear(c_in, len(v)) for k, v in self.config.heads.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head for images in [-1, 1], shape (B, 3, H, W)."""
        h = self.features(images)  # (B, C)
        return {k: head(h) for k, head in self.heads.items()}

    def save(self, directory: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        write_json_atomic(d / "config.json", asdict(self.config))
        save_safetensors_atomic({k: v.contiguous() for k, v in self.state_dict().items()}, d / "model.safetensors")

    @classmethod
    def load(cls, directory: str | Path) -> ShapesDetector:
        """Load a detector saved by :meth:`save` (safetensors only), in eval mode."""
        d = Path(directory)
        cfg = json.loads((d / "config.json").read_text())
        cfg["channels"] = tuple(cfg["channels"])
        model = cls(DetectorConfig(**cfg))
        model.load_state_dict(load_file(d / "model.safetensors"))
        return model.eval()


@register_detector("shapes", folders=True)
class ShapesWorldDetector:
    """The miniature's CNN (:class:`erasekit.world.detector.ShapesDetector`), batched, on CPU or GPU."""

    name = "shapesworld-cnn"

    def __init__(
        self, directory: str | Path = BUNDLED_DETECTOR, device: str | torch.device = "cpu", batch_size: int = 500
    ):
        directory = Path(directory)
        if not (directory / "model.safetensors").exists():
            raise FileNotFoundError(
                f"No miniature detector at {directory}. Reinstall erasekit or rebuild it with `erasekit world train-detector`."
            )
        self.model = ShapesDetector.load(directory).to(device)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.heads = self.model.config.heads
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
