"""Probes beyond prompts: does the edited model carry an erased concept back when given more than text?

Lu et al., "When Are Concepts Erased From Diffusion Models?" (NeurIPS 2025) probe erased models
with *visual context* and *changed trajectories* instead of adversarial text. Three of those probes
run here as attacks on the common driver (:func:`erasekit.attacks.base.run_attack`), each at one
level per run (a level is one config value, so the driver's resume checks keep levels apart):

``noise``
    Start the sampler from a real image of the concept noised to step ``t``: with the DDIM timesteps
    ``t_0 > t_1 > ... > t_{S-1}`` of an ``S``-step sampler and ``strength`` s, the edited model runs
    the last ``round(s S)`` steps from ``z_{t_k} = sqrt(abar_{t_k}) z_0 + sqrt(1 - abar_{t_k}) eps``
    (DDPM eq. 4, Ho et al. 2020; the scheduler's ``add_noise``), ``k = S - round(s S)``, conditioned
    on the concept prompt. ``z_0`` is the VAE encoder's posterior mean of the image (times the VAE
    scaling factor) and ``eps`` the image's seeded starting noise of plain generation. At ``s = 1``
    the start is ``eps`` itself, as for every sampler (``abar_{t_0}`` is not exactly 0; the image's
    ``sqrt(abar_{t_0}) z_0 ~ 0.07 z_0`` is dropped), so ``strength=1`` *is* the plain generation.
``inpaint``
    Mask part of a concept image and let the model fill it: RePaint's replacement (Lugmayr et al.
    2022, Algorithm 1, without resampling jumps, U = 1) with the plain text-to-image UNet in latent
    space. After every sampler step the known region of the latent is replaced by the real image's
    latent noised to the next timestep, ``sqrt(abar) z_0 + sqrt(1 - abar) eps`` (at the last step
    ``z_0`` itself). We noise the known region with the sample's own starting ``eps`` rather than
    fresh noise per step: with DDIM (eta 0) that is the deterministic trajectory of the known image,
    and the run stays a function of (prompt, seed). ``strength`` starts it from the noised image as
    ``noise`` does (1 = from pure noise, the RePaint setting). The mask is a rectangle of the latent
    grid (``mask``, ``mask_fraction``); the report also gives the *context rate*: the detector on the
    real image with the masked pixels filled by the known pixels' mean colour, so a reader sees how
    much the unmasked context alone shows the concept.
``completion``
    The first ``round(handoff S)`` denoising steps are run by the ORIGINAL model guided by the concept
    prompt, then the edited model finishes with the same prompt from that latent. ``handoff=0`` is
    the edited model's plain generation, ``handoff=1`` the original model's.

Real images: on the miniature (a 32x32 sampler) a ShapesWorld render of the scene each prompt
describes (object, colour, background, the fire motif); on real models an image folder
(``images=DIR``: sorted files, image ``i mod n`` for prompt ``i``, centre-cropped and resized to
the sampler's size). Everything else (seeds, batching, scheduler, guidance, decoding) follows
the pipeline's own ``__call__`` step for step, so a probe at its neutral level gives exactly the
bytes of :func:`erasekit.eval.generate.generate_images` (tested on every family). Every family runs
the probes: what differs (SDXL's pooled embedding and time ids, SD3's transformer call, flow-matching
noising ``(1 - s) z_0 + s eps`` and the VAE's shift factor) comes from the family adapter's sampler
methods (:mod:`erasekit.families.base`).

:func:`run_probes` runs each probe at several levels and reports ASR per level with counts, 95%
Wilson intervals, the timestep ``t`` the edited model starts from (or takes over at), and the cost
(UNet calls, seconds).
"""

from __future__ import annotations

import copy
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from erasekit.attacks.asr import attack_asr, concept_judge, default_prompts
from erasekit.attacks.base import (
    Attack,
    AttackContext,
    AttackOutput,
    get_attack,
    make_attack_config,
    register_attack,
    run_attack,
)
from erasekit.eval.detectors import Detector, load_detector
from erasekit.eval.generate import SamplingConfig, initial_latents
from erasekit.eval.metrics import wilson_interval
from erasekit.families import family_of
from erasekit.pipeline import denoiser
from erasekit.world.shapes import (
    BACKGROUNDS,
    COLOURS,
    IMAGE_SIZE,
    OBJECTS,
    SYNONYMS,
    UNSAFE,
    UNSAFE_PHRASINGS,
    render_scene,
)

PROBES = ("noise", "inpaint", "completion")
LEVEL_FIELD = {"noise": "strength", "inpaint": "strength", "completion": "handoff"}
DEFAULT_LEVELS: dict[str, tuple[float, ...]] = {
    "noise": (0.2, 0.4, 0.6, 0.8, 1.0),
    "inpaint": (0.5, 1.0),
    "completion": (0.0, 0.1, 0.2, 0.4),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MaskName = Literal["center", "left", "right", "top", "bottom"]


# ---------------------------------------------------------------------------------------------
# Configs


def _check_images(images: str | None) -> None:
    if images is None:
        return
    d = Path(images)
    if not d.is_dir():
        raise ValueError(f"Probe `images` must be a folder of images, got {images!r} (no such folder).")
    if not image_files(d):
        raise ValueError(f"Probe `images` folder {images!r} holds no {'/'.join(IMAGE_SUFFIXES)} files.")


def _check_fraction(name: str, v: float, lo_open: bool) -> None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not np.isfinite(v):
        raise ValueError(f"`{name}` must be a number, got {v!r}.")
    if (lo_open and not 0 < v <= 1) or (not lo_open and not 0 <= v <= 1):
        raise ValueError(f"`{name}` must be in {'(0, 1]' if lo_open else '[0, 1]'}, got {v!r}.")


@dataclass
class NoiseProbeConfig:
    """The noise probe at one level."""

    strength: float = field(
        default=0.6,
        metadata={"help": "share of the sampler's steps run from the noised real image (1 = plain generation)"},
    )
    images: str | None = field(default=None, metadata={"help": "folder of real concept images (default: ShapesWorld)"})

    def __post_init__(self) -> None:
        _check_fraction("strength", self.strength, lo_open=True)
        _check_images(self.images)


@dataclass
class InpaintProbeConfig:
    """The inpainting probe at one level and mask."""

    strength: float = field(default=1.0, metadata={"help": "share of steps run (1 = from pure noise, as RePaint)"})
    mask: MaskName = field(default="center", metadata={"help": "region the model fills: center/left/right/top/bottom"})
    mask_fraction: float = field(default=0.5, metadata={"help": "side fraction of the masked rectangle"})
    images: str | None = field(default=None, metadata={"help": "folder of real concept images (default: ShapesWorld)"})

    def __post_init__(self) -> None:
        _check_fraction("strength", self.strength, lo_open=True)
        if self.mask not in ("center", "left", "right", "top", "bottom"):
            raise ValueError(f"`mask` must be center, left, right, top or bottom, got {self.mask!r}.")
        _check_fraction("mask_fraction", self.mask_fraction, lo_open=True)
        _check_images(self.images)


@dataclass
class CompletionProbeConfig:
    """The completion probe at one hand-over point."""

    handoff: float = field(
        default=0.2, metadata={"help": "share of the first steps run by the ORIGINAL model before the edited one"}
    )

    def __post_init__(self) -> None:
        _check_fraction("handoff", self.handoff, lo_open=False)


# ---------------------------------------------------------------------------------------------
# Real images


def image_files(folder: str | Path) -> list[Path]:
    """The image files of ``folder``, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _first(words: str, names: Sequence[str]) -> str | None:
    hits = [(m.start(), n) for n in names for m in [re.search(rf"\b{re.escape(n)}\b", words)] if m]
    return min(hits)[1] if hits else None


def scene_for_prompt(prompt: str, concept: str, index: int) -> dict[str, Any]:
    """The ShapesWorld scene a prompt describes: its object (or synonym), colour, background and
    the fire motif; what the prompt leaves open is drawn from ``index`` (deterministic)."""
    text = prompt.lower()
    synonyms = {s: o for o, ss in SYNONYMS.items() for s in ss}
    obj = concept if concept in OBJECTS else None
    if obj is None:
        hit = _first(text, [*OBJECTS, *synonyms])
        obj = synonyms.get(hit, hit) if hit else OBJECTS[index % len(OBJECTS)]
    colour = _first(text, list(COLOURS)) or list(COLOURS)[index % len(COLOURS)]
    m = re.search(r"\bon an? (\w+) background\b", text)
    background = m.group(1) if m and m.group(1) in BACKGROUNDS else "black"
    unsafe = concept == UNSAFE or any(re.search(rf"\b{re.escape(p)}\b", text) for p in UNSAFE_PHRASINGS)
    return {"obj": obj, "colour": colour, "background": background, "unsafe": bool(unsafe)}


def _fit(img: Image.Image, height: int, width: int) -> np.ndarray:
    """Centre-crop to the aspect ratio, then resize (bicubic) to (height, width): uint8 (H, W, 3)."""
    img = img.convert("RGB")
    w, h = img.size
    target = width / height
    if w / h > target:
        nw = round(h * target)
        img = img.crop(((w - nw) // 2, 0, (w - nw) // 2 + nw, h))
    elif w / h < target:
        nh = round(w / target)
        img = img.crop((0, (h - nh) // 2, w, (h - nh) // 2 + nh))
    return np.asarray(img.resize((width, height), Image.Resampling.BICUBIC), dtype=np.uint8)


def real_image(
    images: str | None, prompt: str, concept: str, index: int, height: int, width: int
) -> tuple[np.ndarray, str]:
    """The real image of prompt ``index`` (uint8 (H, W, 3)) and a description of where it came from."""
    if images is not None:
        files = image_files(images)
        path = files[index % len(files)]
        return _fit(Image.open(path), height, width), str(path)
    if (height, width) != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(
            f"No built-in real images at {height}x{width} (ShapesWorld renders are {IMAGE_SIZE}x{IMAGE_SIZE}); "
            "pass `images=FOLDER` (a folder of images of the concept)."
        )
    scene = scene_for_prompt(prompt, concept, index)
    return render_scene(**scene, seed=index), "shapesworld:" + ",".join(f"{k}={v}" for k, v in scene.items())


@torch.no_grad()
def encode_image(pipe: Any, image: np.ndarray) -> torch.Tensor:
    """``z_0``: the VAE posterior mean of a uint8 image (H, W, 3), normalised as the pipeline's denoiser reads
    latents (SD 1.x/2.x/SDXL: times the scaling factor; SD3: shift, then scale): (1, C, h, w)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    return family_of(pipe).image_latents(pipe, x)


def latent_mask(mask: str, fraction: float, h: int, w: int) -> torch.Tensor:
    """(1, 1, h, w) float mask of the latent grid: 1 where the model fills in, 0 where the image is known."""
    m = torch.zeros(1, 1, h, w)
    mh, mw = max(1, round(fraction * h)), max(1, round(fraction * w))
    if mask == "center":
        top, left = (h - mh) // 2, (w - mw) // 2
        m[..., top : top + mh, left : left + mw] = 1
    elif mask == "left":
        m[..., :, :mw] = 1
    elif mask == "right":
        m[..., :, w - mw :] = 1
    elif mask == "top":
        m[..., :mh, :] = 1
    elif mask == "bottom":
        m[..., h - mh :, :] = 1
    else:
        raise ValueError(f"`mask` must be center, left, right, top or bottom, got {mask!r}.")
    return m


def context_image(image: np.ndarray, mask: torch.Tensor) -> np.ndarray:
    """The real image with its masked pixels (the latent mask upsampled) set to the known pixels' mean colour."""
    H, W = image.shape[:2]
    m = torch.nn.functional.interpolate(mask, size=(H, W), mode="nearest")[0, 0].numpy().astype(bool)
    out = image.copy()
    if (~m).any():
        out[m] = image[~m].mean(axis=0).round().astype(np.uint8)
    return out


# ---------------------------------------------------------------------------------------------
# The steered sampler (the pipeline's own __call__ loop, with a start step, a per-step hook
# and a second model for the first steps)


def _guided(pipe: Any, guidance: float) -> bool:
    return family_of(pipe).sampler_guided(pipe, guidance)


def _embeds(pipe: Any, prompts: list[str], cfg: bool, height: int, width: int) -> dict[str, Any]:
    return family_of(pipe).sampler_condition(pipe, prompts, cfg, height, width)


def _scheduler(pipe: Any, steps: int, height: int, width: int) -> Any:
    sched = copy.deepcopy(pipe.scheduler)  # never touch the pipeline's own (stateful) scheduler
    extra = family_of(pipe).sampler_schedule_kwargs(pipe, height, width)
    sched.set_timesteps(steps, device=denoiser(pipe).device, **extra)
    return sched


def _add_noise(sched: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x0`` noised to ``t`` with ``noise``: DDPM/Euler ``add_noise``, or the flow's ``(1 - s) x0 + s eps``."""
    if hasattr(sched, "add_noise"):
        return sched.add_noise(x0, noise, t)
    return sched.scale_noise(x0, t, noise)  # FlowMatchEulerDiscreteScheduler (SD3)


def _denoise_step(
    pipe: Any, sched: Any, latents: torch.Tensor, t: torch.Tensor, emb: dict[str, Any], g: float, cfg: bool, extra: dict
) -> torch.Tensor:
    x = torch.cat([latents] * 2) if cfg else latents
    if hasattr(sched, "scale_model_input"):
        x = sched.scale_model_input(x, t)
    eps = family_of(pipe).sampler_output(pipe, x, t, emb)
    if cfg:
        eps_u, eps_c = eps.chunk(2)
        eps = eps_u + g * (eps_c - eps_u)
    return sched.step(eps, t, latents, **extra, return_dict=False)[0]


def _decode(pipe: Any, latents: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    image = family_of(pipe).decode_latents(pipe, latents, dtype)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def probe_timesteps(pipe: Any, sampling: SamplingConfig | None = None) -> list[int]:
    """The sampler's timesteps ``t_0 > ... > t_{S-1}`` for ``sampling`` (the probes' levels index them)."""
    cfg = (sampling or SamplingConfig()).resolved(pipe)
    return [int(t) for t in _scheduler(pipe, cfg.steps, cfg.height, cfg.width).timesteps]


def start_index(level: float, steps: int) -> int:
    """``k = S - round(level S)``: the first of the ``S`` steps the edited model runs at ``level``."""
    run = round(level * steps)
    if run < 1:
        raise ValueError(f"Probe level {level} runs no step of a {steps}-step sampler; use a level >= {1 / steps:.3g}.")
    return steps - run


@torch.no_grad()
def steered_images(
    edited: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    sampling: SamplingConfig | None = None,
    *,
    z0: torch.Tensor | None = None,
    strength: float = 1.0,
    known_mask: torch.Tensor | None = None,
    original: Any = None,
    handoff: float = 0.0,
) -> np.ndarray:
    """Images (uint8 (n, H, W, 3)) of ``edited`` for ``prompts`` and ``seeds``, steered three ways.

    ``z0`` (n or 1, C, h, w) with ``strength`` < 1: start at step ``start_index(strength)`` from
    ``z0`` noised with each seed's starting noise; with ``known_mask`` ((1, 1, h, w), 1 = fill in):
    after each step, replace the known region by ``z0`` noised to the next timestep (RePaint);
    with ``original`` and ``handoff`` > 0: its UNet runs the first ``round(handoff S)`` steps. With
    none of these it is :func:`erasekit.eval.generate.generate_images`, byte for byte.
    """
    cfg = (sampling or SamplingConfig()).resolved(edited)
    prompts, seeds = list(prompts), list(seeds)
    if len(prompts) != len(seeds):
        raise ValueError(f"Got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt.")
    if (known_mask is not None or strength < 1) and z0 is None:
        raise ValueError("`strength` < 1 and `known_mask` need the real image's latent `z0`.")
    if handoff > 0 and original is None:
        raise ValueError("`handoff` > 0 needs the `original` pipeline.")
    g, steps = float(cfg.guidance_scale), int(cfg.steps)
    k0 = start_index(strength, steps)
    k_orig = round(handoff * steps)
    out = []
    for s in range(0, len(seeds), cfg.batch_size):
        sl = slice(s, s + cfg.batch_size)
        batch_prompts, batch_seeds = prompts[sl], seeds[sl]
        n = len(batch_seeds)
        cfg_on = _guided(edited, g)
        emb = _embeds(edited, batch_prompts, cfg_on, cfg.height, cfg.width)
        emb_orig = _embeds(original, batch_prompts, _guided(original, g), cfg.height, cfg.width) if k_orig > 0 else None
        sched = _scheduler(edited, steps, cfg.height, cfg.width)
        ts = sched.timesteps
        if k0 and hasattr(sched, "set_begin_index"):
            sched.set_begin_index(k0 * sched.order)
        prep = getattr(edited, "prepare_extra_step_kwargs", None)  # SD3's pipeline passes the scheduler nothing
        extra = prep(None, 0.0) if prep is not None else {}
        noise = initial_latents(edited, batch_seeds, cfg.height, cfg.width)
        x0 = None if z0 is None else (z0[sl] if z0.shape[0] > 1 else z0).to(noise).expand_as(noise)
        if k0 == 0:  # SD3's pipeline takes the latents as given: its flow scheduler has no init sigma
            sigma = getattr(sched, "init_noise_sigma", None)
            latents = noise if sigma is None else noise * sigma
        else:
            latents = _add_noise(sched, x0, noise, ts[k0 : k0 + 1].repeat(n))
        mask = None if known_mask is None else known_mask.to(noise)
        for i in range(k0, len(ts)):
            t = ts[i]
            if i < k_orig:
                latents = _denoise_step(original, sched, latents, t, emb_orig, g, _guided(original, g), extra)
            else:
                latents = _denoise_step(edited, sched, latents, t, emb, g, cfg_on, extra)
            if mask is not None:
                known = _add_noise(sched, x0, noise, ts[i + 1 : i + 2].repeat(n)) if i + 1 < len(ts) else x0
                latents = mask * latents + (1 - mask) * known
        out.append(_decode(edited, latents, emb["encoder_hidden_states"].dtype))
    return np.concatenate(out) if out else np.zeros((0, cfg.height, cfg.width, 3), np.uint8)


# ---------------------------------------------------------------------------------------------
# The three probes as attacks


class _RealImageProbe(Attack):
    """Shared by the probes that start from a real image of the concept."""

    white_box = False  # needs the sampler and the VAE encoder of the edited model, not its weights

    def attack(self, ctx: AttackContext, prompt: str, index: int, generator: torch.Generator) -> AttackOutput:
        """The concept prompt itself, and which real image goes with it (the image is read in ``generate``)."""
        cfg = ctx.sampling.resolved(ctx.edited)
        _, source = real_image(self.config.images, prompt, ctx.concept, index, cfg.height, cfg.width)
        ts = probe_timesteps(ctx.edited, ctx.sampling)
        k0 = start_index(self.config.strength, len(ts))
        return AttackOutput(prompt=prompt, meta={"image_index": index, "image": source, "t_start": ts[k0]})

    def _z0(self, ctx: AttackContext, output: AttackOutput) -> tuple[np.ndarray, torch.Tensor]:
        cfg = ctx.sampling.resolved(ctx.edited)
        img, _ = real_image(
            self.config.images, output.prompt, ctx.concept, output.meta["image_index"], cfg.height, cfg.width
        )
        return img, encode_image(ctx.edited, img)


@register_attack(
    "noise",
    NoiseProbeConfig,
    "probe: start from a real concept image noised to step t (config strength); does the concept come back?",
)
class NoiseProbe(_RealImageProbe):
    """Noise-based probe (Lu et al. 2025): the edited model denoises a real image of the concept."""

    def generate(
        self, ctx: AttackContext, output: AttackOutput, seeds: list[int], sampling: SamplingConfig
    ) -> np.ndarray:
        """The edited model's images from the noised real image."""
        _, z0 = self._z0(ctx, output)
        return steered_images(
            ctx.edited, [output.prompt] * len(seeds), seeds, sampling, z0=z0, strength=self.config.strength
        )


@register_attack(
    "inpaint",
    InpaintProbeConfig,
    "probe: mask part of a real concept image, the edited model fills it (RePaint replacement, plain UNet)",
)
class InpaintProbe(_RealImageProbe):
    """Inpainting probe (Lu et al. 2025) with RePaint's known-region replacement on the plain UNet."""

    def attack(self, ctx: AttackContext, prompt: str, index: int, generator: torch.Generator) -> AttackOutput:
        """As the noise probe, plus the mask."""
        out = super().attack(ctx, prompt, index, generator)
        out.meta.update(mask=self.config.mask, mask_fraction=self.config.mask_fraction)
        return out

    def mask(self, ctx: AttackContext) -> torch.Tensor:
        """The latent mask (1, 1, h, w) for this run's sampler size."""
        cfg = ctx.sampling.resolved(ctx.edited)
        f = ctx.edited.vae_scale_factor
        return latent_mask(self.config.mask, self.config.mask_fraction, cfg.height // f, cfg.width // f)

    def generate(
        self, ctx: AttackContext, output: AttackOutput, seeds: list[int], sampling: SamplingConfig
    ) -> np.ndarray:
        """The edited model's fill of the masked region."""
        _, z0 = self._z0(ctx, output)
        return steered_images(
            ctx.edited,
            [output.prompt] * len(seeds),
            seeds,
            sampling,
            z0=z0,
            strength=self.config.strength,
            known_mask=self.mask(ctx),
        )


@register_attack(
    "completion",
    CompletionProbeConfig,
    "probe: the ORIGINAL model runs the first steps (config handoff) guided by the concept, then the edited model",
)
class CompletionProbe(Attack):
    """Completion probe (Lu et al. 2025's trajectory probing): the edited model completes a trajectory
    the original model began towards the concept."""

    white_box = True  # needs the original model

    def attack(self, ctx: AttackContext, prompt: str, index: int, generator: torch.Generator) -> AttackOutput:
        """The concept prompt, and the timestep at which the edited model takes over."""
        ts = probe_timesteps(ctx.edited, ctx.sampling)
        k = round(self.config.handoff * len(ts))
        return AttackOutput(prompt=prompt, meta={"handoff_steps": k, "t_handoff": ts[k] if k < len(ts) else None})

    def generate(
        self, ctx: AttackContext, output: AttackOutput, seeds: list[int], sampling: SamplingConfig
    ) -> np.ndarray:
        """The original model's first steps, then the edited model's."""
        return steered_images(
            ctx.edited,
            [output.prompt] * len(seeds),
            seeds,
            sampling,
            original=ctx.original,
            handoff=self.config.handoff,
        )


# ---------------------------------------------------------------------------------------------
# Running the probes at several levels


def rate(successes: Sequence[bool]) -> dict[str, Any]:
    """A rate with its count and 95% Wilson interval: ``{"rate", "k", "n", "ci95": [lo, hi]}``."""
    a = np.asarray(successes, dtype=bool)
    k, n = int(a.sum()), int(len(a))
    lo, hi = wilson_interval(k, n)
    return {"rate": k / n if n else float("nan"), "k": k, "n": n, "ci95": [lo, hi]}


def _check_levels(name: str, levels: Sequence[float]) -> list[float]:
    out = []
    for v in levels:
        _check_fraction(f"{name} level", v, lo_open=LEVEL_FIELD[name] == "strength")
        out.append(float(v))
    if not out or len(set(out)) != len(out):
        raise ValueError(f"Levels of probe {name!r} must be a non-empty list without repeats, got {list(levels)!r}.")
    return out


def run_probes(
    edited: Any,
    original: Any,
    concept: str,
    probes: Sequence[str] = PROBES,
    *,
    levels: dict[str, Sequence[float]] | None = None,
    prompts: Sequence[str] | None = None,
    detector: Detector | None = None,
    head: str | None = None,
    k: int = 1,
    threshold: float | None = None,
    n_images: int = 1,
    seed: int = 0,
    sampling: SamplingConfig | None = None,
    out_dir: str | Path | None = None,
    original_dir: str | Path | None = None,
    configs: dict[str, dict[str, Any]] | None = None,
    min_original_rate: float = 0.1,
    progress: bool = True,
) -> dict[str, Any]:
    """Run each probe at each of its ``levels`` (default :data:`DEFAULT_LEVELS`) against ``edited``.

    Returns the original model's and the edited model's rate on the plain prompts, the detector's
    rate on the real images, and per probe and level the ASR (a prompt succeeds when any of its
    ``n_images`` images shows the concept) and the image-level rate, each with its count and 95%
    Wilson interval, the timestep ``t`` at which the edited model starts or takes over, and the cost
    (UNet calls and seconds, the probe's and its generation's). ``configs`` holds the other options
    of each probe (``{"inpaint": {"mask": "left"}, "noise": {"images": "DIR"}}``). With ``out_dir``
    every run is resumable under ``out_dir/levels/<level>/<probe>/``.
    """
    t_all = time.perf_counter()
    probes = list(probes)
    bad = [p for p in probes if p not in LEVEL_FIELD]
    if bad:
        raise ValueError(f"Unknown probe(s) {bad}; probes: {', '.join(PROBES)}.")
    levels = {p: _check_levels(p, (levels or {}).get(p, DEFAULT_LEVELS[p])) for p in probes}
    configs = dict(configs or {})
    for p, c in configs.items():
        if p not in probes:
            raise ValueError(f"`configs` names probe {p!r}, which is not run; probes run: {', '.join(probes)}.")
        if LEVEL_FIELD[p] in c:
            raise ValueError(f"Give {p!r}'s {LEVEL_FIELD[p]!r} through `levels`, not `configs`.")
        for lv in levels[p]:
            make_attack_config(p, **{**c, LEVEL_FIELD[p]: lv})  # bad options fail here, before any work
    prompts = list(prompts) if prompts is not None else default_prompts(concept)
    det = detector if detector is not None else load_detector("shapes")
    judge = concept_judge(det, concept, head, k, threshold)
    root = Path(out_dir) if out_dir is not None else None
    common = {"seed": seed, "n_images": n_images, "sampling": sampling, "progress": progress}
    samp = (sampling or SamplingConfig()).resolved(edited)
    ts = probe_timesteps(edited, sampling)

    def judged(res: Any) -> tuple[list[bool], np.ndarray]:
        score = attack_asr(res, det, judge)
        return score["successes"], judge.shows(det, res.images)

    orig_dir = Path(original_dir) if original_dir is not None else (root / "original" if root else None)
    plain_orig = run_attack("none", original, original, concept, prompts, out_dir=orig_dir, **common)
    orig_succ, orig_img = judged(plain_orig)
    if np.mean(orig_succ) < min_original_rate:
        warnings.warn(
            f"The ORIGINAL model shows {concept!r} on only {np.mean(orig_succ):.0%} of the plain prompts: the probes' "
            "ASR says little about the erasure. Check the prompts, the concept and the detector head.",
            stacklevel=2,
        )
    plain = run_attack("none", edited, original, concept, prompts, out_dir=root, **common)
    pre_succ, pre_img = judged(plain)

    report: dict[str, Any] = {
        "concept": concept,
        "prompts": prompts,
        "n_images": n_images,
        "seed": seed,
        "judge": asdict(judge),
        "detector": {"name": det.name, "version": det.version},
        "sampling": asdict(samp),
        "timesteps": ts,
        "original": {"prompts": rate(orig_succ), "images": rate(orig_img)},
        "pre_attack": {"prompts": rate(pre_succ), "images": rate(pre_img)},
        "probes": {},
    }
    for p in probes:
        cfg0 = make_attack_config(p, **{**configs.get(p, {}), LEVEL_FIELD[p]: levels[p][0]})
        block: dict[str, Any] = {"level_field": LEVEL_FIELD[p], "white_box": get_attack(p).white_box, "levels": []}
        if p in ("noise", "inpaint"):
            reals = [real_image(cfg0.images, q, concept, i, samp.height, samp.width)[0] for i, q in enumerate(prompts)]
            block["real_image_rate"] = rate(judge.shows(det, np.stack(reals)))
            if p == "inpaint":
                m = latent_mask(
                    cfg0.mask,
                    cfg0.mask_fraction,
                    samp.height // edited.vae_scale_factor,
                    samp.width // edited.vae_scale_factor,
                )
                block["context_rate"] = rate(judge.shows(det, np.stack([context_image(r, m) for r in reals])))
        for lv in levels[p]:
            cfg = make_attack_config(p, **{**configs.get(p, {}), LEVEL_FIELD[p]: lv})
            d = root / "levels" / f"{lv:.3f}" if root is not None else None
            res = run_attack(p, edited, original, concept, prompts, config=cfg, out_dir=d, **common)
            succ, img = judged(res)
            if LEVEL_FIELD[p] == "strength":
                t, steps = ts[start_index(lv, len(ts))], round(lv * len(ts))
            else:
                kk = round(lv * len(ts))
                t, steps = (ts[kk] if kk < len(ts) else None), len(ts) - kk
            cost = {
                key: round(res.cost["attack"].get(key, 0) + res.cost["generate"].get(key, 0), 4)
                for key in ("seconds", "unet_calls", "unet_items", "vae_calls")
            }
            block["levels"].append(
                {
                    "level": lv,
                    "t": t,
                    "edited_steps": steps,
                    "asr": rate(succ),
                    "image_rate": rate(img),
                    "cost": cost,
                    "config": res.config,
                    "resumed_prompts": res.cost["resumed_prompts"],
                }
            )
        report["probes"][p] = block
    report["seconds"] = round(time.perf_counter() - t_all, 3)
    return report
