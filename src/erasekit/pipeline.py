"""Loading Stable Diffusion pipelines and the few model calls every method shares.

Noise prediction follows the seeds' notation ``eps(theta, z_t, c, t)``: :func:`eps` calls a UNet on
latents ``z_t`` at timesteps ``t`` with text conditioning ``c`` (the text encoder's last hidden
state, shape (B, 77, D)).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

BUNDLED = {"shapes": Path(__file__).parent / "world" / "assets" / "shapes-sd"}
_BASE_ATTR = "_erasekit_base"


def bundled_path(name: str = "shapes") -> Path:
    """Folder of a bundled miniature pipeline."""
    return BUNDLED[name]


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``, refused with a clear error when it is malformed or not present here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"`device` {str(device)!r} is not a torch device; use e.g. cpu, cuda or cuda:1.") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"`device` {str(device)!r}: no CUDA device is available on this machine; use --device cpu.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"`device` {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"`device` {str(device)!r}: MPS is not available on this machine; use --device cpu.")
    return dev


def load_pipeline(
    name_or_path: str | os.PathLike = "shapes",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    revision: str | None = None,
):
    """Load a ``StableDiffusionPipeline``: ``"shapes"`` (the bundled miniature), a local diffusers
    folder, or a hub id (which needs the hub or a populated cache).

    The pipeline remembers its base model (id, revision, weight fingerprint) so an
    :class:`~erasekit.edit.Edit` is applied only to the model it was made from.
    """
    from diffusers import StableDiffusionPipeline

    device = check_device(device)
    name = str(name_or_path)
    # safetensors only: a pickled checkpoint can run code when it is loaded
    kwargs: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False, "use_safetensors": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    if name in BUNDLED:
        path = BUNDLED[name]
        if not (path / "model_index.json").exists():
            raise FileNotFoundError(
                f"The bundled miniature model is missing at {path}. Reinstall erasekit, or rebuild it with "
                "`erasekit world train`."
            )
        pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True, **kwargs)
        model_id, local = name, path
    elif Path(name).expanduser().exists():
        path = Path(name).expanduser()
        if not path.is_dir() or not (path / "model_index.json").exists():
            raise ValueError(
                f"`model` {name!r} is not a diffusers Stable Diffusion folder (no model_index.json in it). "
                "Pass a folder written by `StableDiffusionPipeline.save_pretrained`, a hub id, or 'shapes'."
            )
        index = json.loads((path / "model_index.json").read_text())
        if "unet" not in index or "text_encoder" not in index:
            raise ValueError(
                f"`model` {name!r} has a model_index.json but no unet/text_encoder: it is a "
                f"{index.get('_class_name', 'unknown')} folder, not a Stable Diffusion pipeline."
            )
        pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True, **kwargs)
        model_id = local = str(path.resolve())
    elif name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1:
        raise FileNotFoundError(f"`model` folder {name!r} does not exist. Check the path, or pass 'shapes'.")
    else:
        try:
            pipe = StableDiffusionPipeline.from_pretrained(name, revision=revision, **kwargs)
        except (OSError, ValueError) as e:
            raise OSError(
                f"Could not load `model` {name!r} from the Hugging Face hub or its cache ({type(e).__name__}). "
                "Offline? Download it where the hub is reachable and pass the local folder, or use 'shapes'."
            ) from e
        model_id, local = name, None
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    setattr(
        pipe,
        _BASE_ATTR,
        {"id": model_id, "revision": revision, "path": str(local) if local else None, "fingerprint": fingerprint(pipe)},
    )
    return pipe


def base_info(pipe) -> dict[str, Any]:
    """The base model a pipeline was loaded from: ``{"id", "revision", "fingerprint"}``."""
    info = getattr(pipe, _BASE_ATTR, None)
    if info is None:  # a pipeline built by hand: fingerprint it now
        info = {"id": getattr(pipe, "name_or_path", None) or "unknown", "revision": None, "fingerprint": fingerprint(pipe)}
        setattr(pipe, _BASE_ATTR, info)
    return info


@torch.no_grad()
def fingerprint(pipe) -> str:
    """A short hash of the UNet and text-encoder weights (a strided sample of every tensor)."""
    h = hashlib.sha256()
    for prefix, module in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        for name, p in sorted(module.state_dict().items()):
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 256)].float().cpu()
            h.update(f"{prefix}.{name}{tuple(p.shape)}".encode())
            h.update(sample.numpy().round(6).tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], *, grad: bool = False) -> torch.Tensor:
    """Text-encoder last hidden states for ``prompts``, padded to the tokenizer's max length: (B, 77, D)."""
    tok = pipe.tokenizer(
        list(prompts),
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    with torch.set_grad_enabled(grad):
        return pipe.text_encoder(tok.input_ids.to(pipe.text_encoder.device))[0]


def last_token_index(pipe, prompts: list[str]) -> list[int]:
    """Index of each prompt's last word token (0, the start token, for an empty prompt)."""
    tok = pipe.tokenizer(list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True)
    return [int(sum(m)) - 2 for m in tok["attention_mask"]]


def eps(unet, z_t: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor) -> torch.Tensor:
    """Noise prediction eps_theta(z_t, c, t), the seeds' notation."""
    return unet(z_t, t, encoder_hidden_states=cond).sample


def cross_attention_modules(unet) -> dict[str, torch.nn.Module]:
    """The UNet's cross-attention blocks (``attn2``), by module name."""
    return {n: m for n, m in unet.named_modules() if n.endswith("attn2") and hasattr(m, "to_k")}


def word_pieces(pipe, word: str) -> list[str]:
    """BPE pieces of ``word`` (used to warn when a concept is split into many tokens)."""
    return pipe.tokenizer.tokenize(word)
