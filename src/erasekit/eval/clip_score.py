"""CLIP alignment score between images and texts, with transformers' ``CLIPModel``.

The AP paper (Bui et al., NeurIPS 2024, section 3.2) measures a model's capability to generate a
concept ``c`` by the CLIP alignment score ``S(G(theta, c, z_T), c)`` between a generated image and
the concept's text, using torchmetrics' ``CLIPScore`` (the paper's footnote 2)::

    S(x, c) = 100 * max(cos(E_I(x), E_T(c)), 0)

with ``E_I``, ``E_T`` CLIP's projected image and text embeddings. torchmetrics clamps the *mean*
over a batch at zero; we clamp each image's score (as Hessel et al.'s CLIPScore does, without its
2.5 weight), because the sensitivity spectrum averages per-sample differences
``S_{theta,i,c} - S_{theta',i,c}`` over seeds ``i``. For images whose cosine is non-negative (the
usual case) the two agree.

The same code scores both worlds: :meth:`ClipScorer.from_pretrained` loads a user's CLIP checkpoint
(a local folder or a hub id, e.g. ``openai/clip-vit-large-patch14``) or ``"shapes"``, the miniature
CLIP trained on ShapesWorld by :func:`erasekit.world.clip.train_clip`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

BUNDLED_CLIP = {"shapes": Path(__file__).resolve().parent.parent / "world" / "assets" / "shapes-clip"}


def _features(out: Any) -> torch.Tensor:
    """Projected embeddings from ``get_*_features`` (a tensor in transformers 4, an output object in 5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def load_image_processor(path: str | os.PathLike, **kwargs: Any):
    """The CLIP image processor saved in ``path`` (the PIL backend when torchvision is not installed)."""
    try:
        import torchvision  # noqa: F401
        from transformers import CLIPImageProcessor as Processor
    except ImportError:  # transformers 5 warns and falls back to this class without torchvision
        try:
            from transformers import CLIPImageProcessorPil as Processor
        except ImportError:  # transformers 4: the PIL implementation is CLIPImageProcessor itself
            from transformers import CLIPImageProcessor as Processor
    return Processor.from_pretrained(str(path), **kwargs)


def check_images(images: np.ndarray) -> np.ndarray:
    """Validate a uint8 (N, H, W, 3) array (a single (H, W, 3) image is promoted to a batch of one)."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"`images` must be uint8 (N, H, W, 3), got shape {images.shape}.")
    if images.dtype != np.uint8:
        raise ValueError(
            f"`images` must be uint8 in [0, 255], got dtype {images.dtype}; convert with (x*255).astype(np.uint8)."
        )
    return images


class ClipScorer:
    """CLIP alignment scores ``100 * max(cos, 0)`` (AP paper sec. 3.2; torchmetrics ``CLIPScore``).

    Example::

        scorer = ClipScorer.from_pretrained("shapes")          # or a folder / "openai/clip-vit-large-patch14"
        s = scorer.score(images, ["a red circle"] * len(images))  # (N,) numpy array
    """

    def __init__(
        self,
        model,
        tokenizer,
        image_processor,
        *,
        batch_size: int = 64,
        name: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.batch_size = batch_size
        self.name = name or getattr(model, "name_or_path", None) or "clip"
        self._text_cache: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = "shapes",
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        batch_size: int = 64,
    ) -> ClipScorer:
        """Load ``"shapes"`` (the bundled miniature CLIP), a local CLIP folder, or a hub id (needs its cache)."""
        from transformers import CLIPModel, CLIPTokenizer

        name = str(name_or_path)
        if name in BUNDLED_CLIP:
            path = BUNDLED_CLIP[name]
            if not (path / "config.json").exists():
                raise FileNotFoundError(
                    f"The miniature CLIP is missing at {path}. Train it with `erasekit world train-clip` "
                    "(erasekit.world.clip.train_clip), or pass the folder of a CLIP checkpoint."
                )
            source: str = str(path)
        elif Path(name).expanduser().exists():
            path = Path(name).expanduser()
            if not (path / "config.json").exists():
                raise ValueError(
                    f"`clip` {name!r} is not a CLIP folder (no config.json); pass a CLIPModel.save_pretrained folder."
                )
            source = str(path)
        else:
            source = name
        kwargs: dict[str, Any] = {}
        if dtype is not None:
            kwargs["dtype"] = dtype
        try:
            model = CLIPModel.from_pretrained(source, **kwargs)
            tokenizer = CLIPTokenizer.from_pretrained(source)
            processor = load_image_processor(source)
        except OSError as e:
            raise OSError(
                f"Could not load CLIP {name!r} ({type(e).__name__}: {e}). Offline? Pass a local folder holding "
                "config.json, model.safetensors, the tokenizer files and preprocessor_config.json."
            ) from e
        tokenizer.model_max_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)
        return cls(model.to(device), tokenizer, processor, batch_size=batch_size, name=name)

    @property
    def device(self) -> torch.device:
        """Device of the CLIP model."""
        return next(self.model.parameters()).device

    def info(self) -> dict[str, Any]:
        """What a results file records about the scorer."""
        return {"name": self.name, "projection_dim": int(self.model.config.projection_dim), "formula": "100*max(cos,0)"}

    # ------------------------------------------------------------------ embeddings
    def pixel_values(self, images: np.ndarray) -> torch.Tensor:
        """Preprocess uint8 (N, H, W, 3) images with the checkpoint's image processor: (N, 3, S, S)."""
        images = check_images(images)
        return self.image_processor(images=list(images), return_tensors="pt").pixel_values

    @torch.no_grad()
    def embed_images(self, images: np.ndarray) -> torch.Tensor:
        """Unit-norm projected image embeddings ``E_I(x) / ||E_I(x)||``: float32 (N, D) on CPU."""
        images = check_images(images)
        out = []
        p = next(self.model.parameters())
        for s in range(0, len(images), self.batch_size):
            px = self.pixel_values(images[s : s + self.batch_size]).to(p.device, p.dtype)
            out.append(_features(self.model.get_image_features(pixel_values=px)).float().cpu())
        if not out:
            return torch.zeros(0, int(self.model.config.projection_dim))
        emb = torch.cat(out)  # (N, D)
        return emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm projected text embeddings ``E_T(c) / ||E_T(c)||``: float32 (M, D) on CPU (cached per text)."""
        if isinstance(texts, str):
            raise ValueError("`texts` must be a list of strings, not a single string; wrap it in a list.")
        todo = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        for s in range(0, len(todo), self.batch_size):
            chunk = todo[s : s + self.batch_size]
            tok = self.tokenizer(chunk, padding=True, truncation=True, return_tensors="pt").to(self.device)
            emb = _features(self.model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask))
            emb = emb.float().cpu()
            emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            for t, e in zip(chunk, emb, strict=True):
                self._text_cache[t] = e
        if not texts:
            return torch.zeros(0, int(self.model.config.projection_dim))
        return torch.stack([self._text_cache[t] for t in texts])

    # ------------------------------------------------------------------ scores
    def score(self, images: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """Paired scores ``100 * max(cos(E_I(x_n), E_T(t_n)), 0)``: float64 (N,).

        ``texts`` has one text per image, or a single text scored against every image.
        """
        images = check_images(images)
        texts = list(texts)
        if len(texts) == 1 and len(images) != 1:
            texts = texts * len(images)
        if len(texts) != len(images):
            raise ValueError(
                f"Got {len(images)} images but {len(texts)} texts; give one text per image, or one text for all."
            )
        img = self.embed_images(images)  # (N, D)
        txt = self.embed_texts(texts)  # (N, D)
        cos = (img.double() * txt.double()).sum(-1)
        return (100.0 * cos.clamp_min(0.0)).numpy()

    def score_matrix(self, images: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """All pairs: ``100 * max(cos, 0)`` of every image with every text, float64 (N, M)."""
        img = self.embed_images(images)
        txt = self.embed_texts(list(texts))
        return (100.0 * (img.double() @ txt.double().T).clamp_min(0.0)).numpy()

    def clear_cache(self) -> None:
        """Forget cached text embeddings (call after changing the model's weights)."""
        self._text_cache.clear()


def clip_score(images: np.ndarray, texts: Sequence[str], scorer: ClipScorer) -> np.ndarray:
    """Functional form of :meth:`ClipScorer.score`: per-image ``100 * max(cos, 0)`` (AP paper sec. 3.2)."""
    return scorer.score(images, texts)


__all__ = ["BUNDLED_CLIP", "ClipScorer", "check_images", "clip_score", "load_image_processor"]
