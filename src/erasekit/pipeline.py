"""Loading Stable Diffusion pipelines and the few model calls every method shares.

Noise prediction follows the seeds' notation ``eps(theta, z_t, c, t)``: :func:`eps` calls a UNet on
latents ``z_t`` at timesteps ``t`` with text conditioning ``c`` (the text encoder's last hidden
state, shape (B, 77, D)).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import urllib.parse
from pathlib import Path
from typing import Any

import torch

from erasekit.families import family_for_index, family_of

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
            raise ValueError(
                f"`device` {str(device)!r}: no CUDA device is available on this machine; use --device cpu."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"`device` {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"`device` {str(device)!r}: MPS is not available on this machine; use --device cpu.")
    return dev


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_dtype(dtype: torch.dtype | None, device: torch.device) -> None:
    """Refuse a weight ``dtype`` that ``device`` cannot run (before anything is loaded or written)."""
    if dtype is None:
        return
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"`dtype` {dtype} is not a weight dtype EraseKit runs; use float32, float16 or bfloat16.")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"`dtype` bfloat16: CUDA device {device} has no bfloat16 support (pre-Ampere GPU); use float16 or float32."
        )
    if dtype == torch.bfloat16 and device.type == "mps":
        raise ValueError("`dtype` bfloat16 is not supported on MPS by every diffusers op; use float16 or float32.")


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``) accepts a TCP connection within ``timeout`` s.

    Checked once before a hub id is loaded, so that an offline machine fails in a moment with a clear
    message instead of waiting out huggingface_hub's retry backoff (about 45 s per file) and so that a
    cached model loads offline. ``HF_HUB_OFFLINE=1`` answers False without a connection.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    if not url.hostname:
        return False
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def _read_index(name: str, revision: str | None, *, online: bool) -> dict[str, Any] | None:
    """The hub model's ``model_index.json`` (from the hub, or only the cache when not ``online``), or
    None when it cannot be read."""
    try:
        from diffusers import DiffusionPipeline

        return dict(DiffusionPipeline.load_config(name, revision=revision, local_files_only=not online))
    except Exception:  # noqa: BLE001 - any failure here is reported by the load itself below
        return None


def _pipeline_class(family: str):
    import diffusers

    return getattr(
        diffusers,
        {"sd1": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline"}[
            family
        ],
    )


def load_pipeline(
    name_or_path: str | os.PathLike = "shapes",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    revision: str | None = None,
):
    """Load a diffusers pipeline of a supported family: ``"shapes"`` (the bundled miniature), a local
    diffusers folder, or a hub id (which needs the hub or a populated cache).

    Families (:mod:`erasekit.families`): ``StableDiffusionPipeline`` (SD 1.x, SD 2.x with epsilon or
    v-prediction), ``StableDiffusionXLPipeline`` and ``StableDiffusion3Pipeline``, recognised from
    ``model_index.json``'s ``_class_name``; any other folder is refused with an error naming what it
    is. The pipeline remembers its base model (id, revision, weight fingerprint, family and
    prediction type, and ``dtype`` when it is not float32) so an :class:`~erasekit.edit.Edit` is applied
    only to the model it was made from. ``revision`` (a hub branch, tag or commit) applies to a hub id
    only: with ``"shapes"`` or a local folder it is refused rather than ignored. ``dtype`` is checked
    against ``device`` (:func:`check_dtype`) before anything is loaded.
    """
    device = check_device(device)
    check_dtype(dtype, device)
    name = str(name_or_path)
    # safetensors only: a pickled checkpoint can run code when it is loaded
    kwargs: dict[str, Any] = {"use_safetensors": True}
    sd_kwargs = {"safety_checker": None, "requires_safety_checker": False}
    if dtype is not None:
        kwargs["dtype"] = dtype  # `torch_dtype` is deprecated in the pinned diffusers (0.42)
    if revision is not None and (name in BUNDLED or Path(name).expanduser().exists()):
        what = "the bundled miniature, which has one version" if name in BUNDLED else "a local folder"
        raise ValueError(
            f"`revision` (--revision) {revision!r} names a branch, tag or commit of a hub model, but `model` "
            f"{name!r} is {what}: drop --revision, or pass a hub id."
        )
    if name in BUNDLED:
        path = BUNDLED[name]
        if not (path / "model_index.json").exists():
            raise FileNotFoundError(
                f"The bundled miniature model is missing at {path}. Reinstall erasekit, or rebuild it with "
                "`erasekit world train`."
            )
        cls = _pipeline_class("sd1")
        pipe = cls.from_pretrained(path, local_files_only=True, **kwargs, **sd_kwargs)
        model_id, local = name, path
    elif Path(name).expanduser().exists():
        path = Path(name).expanduser()
        if not path.is_dir() or not (path / "model_index.json").exists():
            raise ValueError(
                f"`model` {name!r} is not a diffusers pipeline folder (no model_index.json in it). "
                "Pass a folder written by a diffusers pipeline's `save_pretrained`, a hub id, or 'shapes'."
            )
        index = json.loads((path / "model_index.json").read_text())
        family = family_for_index(index, what=f"`model` {name!r}")
        need = {"sd1": ("unet", "text_encoder"), "sdxl": ("unet", "text_encoder_2"), "sd3": ("transformer",)}[family]
        if any(k not in index for k in need):
            raise ValueError(
                f"`model` {name!r} says it is a {index.get('_class_name')} but its model_index.json has no "
                f"{'/'.join(k for k in need if k not in index)}: the folder is incomplete."
            )
        cls = _pipeline_class(family)
        # components saved as absent (e.g. SD3 without T5: [null, null]) are passed as None explicitly
        absent = {k: None for k, v in index.items() if not k.startswith("_") and v in ([None, None], None)}
        extra = {**(sd_kwargs if family == "sd1" else {}), **absent}
        pipe = cls.from_pretrained(path, local_files_only=True, **kwargs, **extra)
        model_id = local = str(path.resolve())
    elif name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1:
        raise FileNotFoundError(f"`model` folder {name!r} does not exist. Check the path, or pass 'shapes'.")
    else:
        online = hub_reachable()
        index = _read_index(name, revision, online=online)
        if index is None and not online:
            raise OSError(
                f"`model` {name!r} is not in the local Hugging Face cache and the hub is unreachable "
                "(offline, or HF_HUB_OFFLINE=1). Download it where the hub is reachable and pass the local "
                "folder, or use 'shapes'."
            )
        family = family_for_index(index, what=f"`model` {name!r}") if index is not None else "sd1"
        try:
            cls = _pipeline_class(family)
            extra = sd_kwargs if family == "sd1" else {}
            pipe = cls.from_pretrained(name, revision=revision, local_files_only=not online, **kwargs, **extra)
        except (OSError, ValueError) as e:
            where = "the Hugging Face hub or its cache" if online else "the local cache (the hub is unreachable)"
            raise OSError(
                f"Could not load `model` {name!r} from {where} ({type(e).__name__}). "
                "Offline? Download it where the hub is reachable and pass the local folder, or use 'shapes'."
            ) from e
        model_id, local = name, None
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    fam = family_of(pipe)
    setattr(
        pipe,
        _BASE_ATTR,
        {
            "id": model_id,
            "revision": revision,
            "path": str(local) if local else None,
            "fingerprint": fingerprint(pipe),
            **fam.describe(pipe),
            # the dtype the fingerprint was taken at (absent for float32): an edit applies at this dtype
            **({"dtype": str(dtype).removeprefix("torch.")} if dtype not in (None, torch.float32) else {}),
        },
    )
    return pipe


def base_info(pipe) -> dict[str, Any]:
    """The base model a pipeline was loaded from: ``{"id", "revision", "fingerprint"}``."""
    info = getattr(pipe, _BASE_ATTR, None)
    if info is None:  # a pipeline built by hand: fingerprint it now
        info = {
            "id": getattr(pipe, "name_or_path", None) or "unknown",
            "revision": None,
            "fingerprint": fingerprint(pipe),
            **family_of(pipe).describe(pipe),
        }
        setattr(pipe, _BASE_ATTR, info)
    return info


@torch.no_grad()
def fingerprint(pipe) -> str:
    """A short hash of the denoiser and text-encoder weights (a strided sample of every tensor)."""
    h = hashlib.sha256()
    for prefix, module in family_of(pipe).fingerprint_components(pipe):
        for name, p in sorted(module.state_dict().items()):
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 256)].float().cpu()
            h.update(f"{prefix}.{name}{tuple(p.shape)}".encode())
            h.update(sample.numpy().round(6).tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], *, grad: bool = False) -> torch.Tensor:
    """The text conditioning the K/V projections read, padded to the tokenizer's max length: (B, 77, D).

    SD 1.x/2.x: the text encoder's last hidden state; SDXL: both encoders' penultimate states
    concatenated (2048-d); SD3: the joint-attention context (see :mod:`erasekit.families`)."""
    return family_of(pipe).encode_text(pipe, prompts, grad=grad)


def last_token_index(pipe, prompts: list[str]) -> list[int]:
    """Index of each prompt's last word token (0, the start token, for an empty prompt)."""
    tok = pipe.tokenizer(
        list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True
    )
    return [int(sum(m)) - 2 for m in tok["attention_mask"]]


def eps(unet, z_t: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor) -> torch.Tensor:
    """Noise prediction eps_theta(z_t, c, t), the seeds' notation."""
    return unet(z_t, t, encoder_hidden_states=cond).sample


def denoiser(pipe) -> torch.nn.Module:
    """The pipeline's denoising network: ``pipe.unet`` (SD 1.x/2.x, SDXL) or ``pipe.transformer`` (SD3)."""
    return family_of(pipe).denoiser(pipe)


def cross_attention_modules(unet) -> dict[str, torch.nn.Module]:
    """The UNet's cross-attention blocks (``attn2``), by module name."""
    return {n: m for n, m in unet.named_modules() if n.endswith("attn2") and hasattr(m, "to_k")}


def word_pieces(pipe, word: str) -> list[str]:
    """BPE pieces of ``word`` (used to warn when a concept is split into many tokens)."""
    return pipe.tokenizer.tokenize(word)
