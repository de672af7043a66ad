"""Prompt set x seeds -> images: batched, deterministic per (prompt, seed), resumable.

Each image's initial latent is drawn from ``torch.Generator().manual_seed(seed)`` alone, and the
sampler is deterministic (DDIM, eta 0), so an image depends only on its prompt and seed, not on
which batch or process produced it. A generation folder (a :class:`erasekit.rundir.ResumableDir`
whose identity, in ``generation.json``, is the weights' fingerprint, the sampler settings and any
conditioning) holds ``images/*.png`` and ``index.jsonl`` (one record per image: prompt, seed, path
and any metadata of the item); re-running skips the images already written, and a folder made with
other settings is refused, naming what differs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from erasekit.io import read_jsonl
from erasekit.pipeline import denoiser, fingerprint
from erasekit.rundir import ResumableDir, RunDirMismatch
from erasekit.runs import locked

INDEX = "index.jsonl"
GENERATION_JSON = "generation.json"


@dataclass(frozen=True)
class PromptItem:
    """One image to make: a prompt, a seed, and metadata carried into the index (e.g. its class)."""

    prompt: str
    seed: int
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def key(self) -> str:
        """Stable file stem for (prompt, seed)."""
        h = hashlib.sha1(f"{self.prompt}\x00{self.seed}".encode()).hexdigest()[:10]
        return f"s{self.seed}-{h}"


@dataclass
class SamplingConfig:
    """Sampler settings; ``None`` takes the pipeline's defaults (the miniature stores its own)."""

    steps: int | None = None
    guidance_scale: float | None = None
    batch_size: int = 25
    height: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        if self.steps is not None and (
            isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1
        ):
            raise ValueError(
                f"Sampler `steps` must be an integer >= 1 (or unset for the model's default), got {self.steps!r}."
            )
        if self.guidance_scale is not None and not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0):
            raise ValueError(
                f"`guidance` (classifier-free guidance scale) must be a finite number >= 0, got {self.guidance_scale!r}."
            )
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"`batch_size` must be an integer >= 1, got {self.batch_size!r}.")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 8 or v % 8):
                raise ValueError(f"`{name}` must be a positive multiple of 8 (or unset), got {v!r}.")

    def resolved(self, pipe) -> SamplingConfig:
        """A copy with every ``None`` filled from the pipeline's defaults."""
        d = sampling_defaults(pipe)
        return SamplingConfig(
            steps=self.steps or d["steps"],
            guidance_scale=self.guidance_scale if self.guidance_scale is not None else d["guidance_scale"],
            batch_size=self.batch_size,
            height=self.height or d["height"],
            width=self.width or d["width"],
        )


def sampling_defaults(pipe) -> dict[str, Any]:
    """The pipeline's sampling defaults: the miniature's ``erasekit_world.json``, else SD's 50 steps, 7.5."""
    size = denoiser(pipe).config.sample_size * pipe.vae_scale_factor
    out = {"steps": 50, "guidance_scale": 7.5, "height": size, "width": size}
    root = getattr(pipe, "_erasekit_base", {}).get("path")
    if root and (Path(root) / "erasekit_world.json").exists():
        cfg = json.loads((Path(root) / "erasekit_world.json").read_text())
        out.update(steps=cfg["sample_steps"], guidance_scale=cfg["guidance_scale"])
    return out


def initial_latents(pipe, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
    """(B, C, h, w) starting noise, each row from its own seed."""
    shape = (1, denoiser(pipe).config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    lat = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.cat(lat).to(device=denoiser(pipe).device, dtype=denoiser(pipe).dtype)


@torch.no_grad()
def generate_images(
    pipe,
    prompts: Sequence[str] | None,
    seeds: Sequence[int],
    config: SamplingConfig | None = None,
    *,
    prompt_embeds: torch.Tensor | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Images (uint8, (N, H, W, 3)) for ``prompts`` (or precomputed ``prompt_embeds``) and ``seeds``."""
    cfg = (config or SamplingConfig()).resolved(pipe)
    n = len(seeds)
    if prompts is not None and len(prompts) != n:
        raise ValueError(f"Got {len(prompts)} prompts but {n} seeds; give one seed per prompt.")
    if (prompts is None) == (prompt_embeds is None):
        raise ValueError("Pass exactly one of `prompts` and `prompt_embeds`.")
    out = []
    for s in tqdm(range(0, n, cfg.batch_size), desc="generate", disable=not progress, unit="batch"):
        sl = slice(s, s + cfg.batch_size)
        kwargs: dict[str, Any] = {}
        if prompts is not None:
            kwargs["prompt"] = list(prompts[sl])
        else:
            kwargs["prompt_embeds"] = prompt_embeds[sl].to(denoiser(pipe).device, denoiser(pipe).dtype)
            kwargs["negative_prompt_embeds"] = None
        res = pipe(
            **kwargs,
            latents=initial_latents(pipe, seeds[sl], cfg.height, cfg.width),
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance_scale,
            height=cfg.height,
            width=cfg.width,
            output_type="np",
        )
        out.append((np.clip(res.images, 0, 1) * 255 + 0.5).astype(np.uint8))
    return np.concatenate(out) if out else np.zeros((0, cfg.height, cfg.width, 3), np.uint8)


MAX_SEEDS = 10_000_000  # seeds one --seeds range may name


def parse_seeds(seeds: str) -> list[int]:
    """``'0:10'`` -> 0..9; ``'1,5,7'`` -> [1, 5, 7]; ``'3'`` -> [3]. Empty ranges, negative and
    repeated seeds are errors that say so."""
    try:
        if ":" in seeds:
            a, b = (int(x) for x in seeds.split(":"))
            if b <= a:
                raise ValueError(
                    f"`--seeds {seeds}` is an empty range: the end must be greater than the start, e.g. 0:10."
                )
            if b - a > MAX_SEEDS:  # checked before the list is built: 0:10**11 must not exhaust memory
                raise ValueError(f"`--seeds {seeds}` names {b - a} seeds; at most {MAX_SEEDS} per run.")
            out = list(range(a, b))
        else:
            out = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError as e:
        if "empty range" in str(e) or "at most" in str(e):
            raise
        raise ValueError(f"`--seeds` {seeds!r} must look like '0:10' or '1,5,7'.") from None
    if not out:
        raise ValueError(f"`--seeds` {seeds!r} names no seed; use e.g. '0:10' or '1,5,7'.")
    if min(out) < 0:
        raise ValueError(f"`--seeds` {seeds!r}: seeds must be >= 0.")
    if max(out) >= 2**63:
        raise ValueError(f"`--seeds` {seeds!r}: seeds must be < 2**63 (torch generators take 64-bit seeds).")
    if len(set(out)) != len(out):
        raise ValueError(f"`--seeds` {seeds!r} repeats a seed; each image would be made twice.")
    return out


def check_items(items: Iterable[PromptItem]) -> list[PromptItem]:
    """``items`` as a list, each checked (a :class:`PromptItem` with a text prompt and a seed in
    [0, 2**63)) before a generation folder is written: a bad one is refused naming it, and nothing is written."""
    out = list(items)
    for it in out:
        if not isinstance(it, PromptItem):
            raise TypeError(f"Generation items must be PromptItem(prompt, seed), got {type(it).__name__}: {it!r}.")
        if not isinstance(it.prompt, str):
            raise TypeError(f"The prompt of {it!r} must be a string, got {type(it.prompt).__name__}.")
        if isinstance(it.seed, bool) or not isinstance(it.seed, int) or not 0 <= it.seed < 2**63:
            raise ValueError(f"The seed of {it!r} must be an integer in [0, 2**63), got {it.seed!r}.")
    return out


def read_index(run_dir: str | Path, name: str = INDEX) -> list[dict[str, Any]]:
    """Records of ``index.jsonl`` (or the index file ``name``) whose image file exists (a crash
    mid-batch leaves none dangling; a last line cut short by a crash is ignored, and the next
    append cuts it off, see :func:`erasekit.io.append_jsonl`)."""
    return [r for r in read_jsonl(Path(run_dir) / name) if (Path(run_dir) / r["path"]).exists()]


def generate(
    pipe,
    items: Iterable[PromptItem],
    out_dir: str | Path,
    config: SamplingConfig | None = None,
    *,
    progress: bool = True,
    index_name: str = INDEX,
    prompt_embeds_fn: Callable[[list[str]], torch.Tensor] | None = None,
    conditioning: dict[str, Any] | None = None,
    recorded_batch_size: int | None = None,
) -> list[dict[str, Any]]:
    """Generate every item into ``out_dir/images`` and index it; skips items already written.

    Returns the index records in the order of ``items``. ``index_name`` picks the index file (each
    process of a multi-process run writes its own, see :mod:`erasekit.eval.distributed`).
    ``prompt_embeds_fn`` (optional) turns a batch's prompts into the ``prompt_embeds`` (B, 77, D) to
    sample from instead of the text encoder's (e.g. :meth:`erasekit.methods.hide.RecoveryKey.prompt_embeds`
    with a recovery key); it needs ``conditioning``, a JSON-ready description of it recorded in
    ``generation.json``, so that a directory is never resumed with another conditioning.
    ``recorded_batch_size`` is the batch size ``generation.json`` records (default: the config's; the
    distributed path records its chunk size while it samples a shorter last chunk). The index file
    is locked while this call writes it: a second writer gets a clear error, never a mixed index.
    Every argument is checked before ``generation.json`` is written.
    """
    out = Path(out_dir)
    cfg = (config or SamplingConfig()).resolved(pipe)
    if prompt_embeds_fn is not None and conditioning is None:
        raise ValueError("`prompt_embeds_fn` needs `conditioning`: a description recorded in generation.json.")
    items = check_items(items)  # every check before generation_folder writes generation.json
    bs = cfg.batch_size if recorded_batch_size is None else recorded_batch_size
    folder = generation_folder(out, pipe, replace(cfg, batch_size=bs), conditioning)
    with folder.lock(f"{index_name}.lock"):
        return generate_locked(folder, pipe, items, cfg, progress=progress, index_name=index_name,
                               prompt_embeds_fn=prompt_embeds_fn)  # fmt: skip


def generate_locked(
    folder: ResumableDir,
    pipe,
    items: Sequence[PromptItem],
    cfg: SamplingConfig,
    *,
    progress: bool = True,
    index_name: str = INDEX,
    prompt_embeds_fn: Callable[[list[str]], torch.Tensor] | None = None,
) -> list[dict[str, Any]]:
    """The body of :func:`generate` for a caller that already holds ``folder``'s lock on ``index_name``
    (made by :func:`generation_folder`; ``cfg`` resolved): the items not in the index yet, in batches
    of ``cfg.batch_size``, each written image first, then its records."""
    out = folder.path
    done = {(r["prompt"], r["seed"]): r for r in read_index(out, index_name)}
    todo = [it for it in items if (it.prompt, it.seed) not in done]
    if todo:
        note_threads(folder)
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="generate", unit="img", disable=not progress)
    for s in range(0, len(todo), cfg.batch_size):
        batch = todo[s : s + cfg.batch_size]
        prompts, seeds = [b.prompt for b in batch], [b.seed for b in batch]
        if prompt_embeds_fn is None:
            imgs = generate_images(pipe, prompts, seeds, cfg)
        else:
            imgs = generate_images(pipe, None, seeds, cfg, prompt_embeds=prompt_embeds_fn(prompts))
        recs = write_batch(folder, batch, imgs, index_name)
        done.update({(r["prompt"], r["seed"]): r for r in recs})
        bar.update(len(batch))
    bar.close()
    return [done[(it.prompt, it.seed)] for it in items]


def generation_folder(
    out: str | Path, pipe, cfg: SamplingConfig, conditioning: dict[str, Any] | None = None
) -> ResumableDir:
    """The generation folder ``out`` for these weights, sampler settings and conditioning; a folder made
    otherwise is refused (resuming is only sound with the same ones), naming what differs."""
    # The batch size is part of it: batched convolutions round differently, so images made at another
    # batch size can differ by a grey level, and a resumed directory would mix the two.
    identity: dict[str, Any] = {"weights": fingerprint(pipe), "sampling": asdict(cfg)}
    if conditioning is not None:  # e.g. a recovery key; absent otherwise, so older directories still resume
        identity["conditioning"] = conditioning
    try:
        folder = ResumableDir(out, identity, meta=GENERATION_JSON, what="generation folder", extra=threads_meta())
    except RunDirMismatch as e:
        if not holds_images(out):  # a run that failed before its first image: nothing of it to mix with
            with contextlib.ExitStack() as live:  # ... unless it is still running: its writer is refused here
                for lock in sorted(Path(out).glob("index*.lock")):
                    live.enter_context(locked(out, lock.name))
                if not holds_images(out):
                    folder = ResumableDir(
                        out, identity, meta=GENERATION_JSON, what="generation folder", force=True, extra=threads_meta()
                    )
                    (folder.path / "images").mkdir(parents=True, exist_ok=True)
                    return folder
        if all(d.startswith("sampling.batch_size:") for d in e.differences):
            old_bs = (ResumableDir.read_meta(out, GENERATION_JSON) or {})["identity"]["sampling"]["batch_size"]
            raise ValueError(
                f"{str(out)!r} was generated with batch size {old_bs}; images depend on the batch size by up to "
                f"one grey level, so resume with --batch-size {old_bs} (got {cfg.batch_size}) or choose another "
                "directory."
            ) from None
        raise RunDirMismatch(
            e.path,
            e.differences,
            "generation folder",
            detail=f"holds images from other weights or sampler settings ({'; '.join(e.differences)})",
        ) from None
    (folder.path / "images").mkdir(parents=True, exist_ok=True)
    return folder


class ThreadCountWarning(RuntimeWarning):
    """A generation folder is resumed with another torch thread count than its images were made with."""


def threads_meta() -> dict[str, Any]:
    """The ``torch_threads`` field a new generation folder's ``generation.json`` starts with (no extra write)."""
    return {"torch_threads": [torch.get_num_threads()]}


def note_threads(folder: ResumableDir) -> None:
    """Record this process's torch thread count in the folder's ``generation.json`` (``torch_threads``: every
    count that wrote images there) and warn when images already there were made with another one.

    CPU convolutions split their sums by thread, so an image can differ by a grey level between thread
    counts (found by the fault-injection tests): a resume at another count is allowed (a machine with
    other cores must be able to finish a run) but not silent, and the folder says which counts made it.
    """
    threads = torch.get_num_threads()
    seen = list(folder.meta.get("torch_threads") or [])
    if threads in seen:
        return
    if seen and holds_images(folder.path):
        warnings.warn(
            f"{str(folder.path)!r} holds images made with torch thread count(s) {seen}; this process uses {threads}. "
            "CPU results can differ by a grey level between thread counts, so the resumed images may not be "
            f"byte-identical to an uninterrupted run: set OMP_NUM_THREADS={seen[0]} (or torch.set_num_threads) "
            "to resume exactly.",
            ThreadCountWarning,
            stacklevel=3,
        )
    folder.update_meta(torch_threads=[*seen, threads])


def holds_images(out: str | Path) -> bool:
    """Whether the generation folder ``out`` holds any image or index record (of any process)."""
    out = Path(out)
    images = out / "images"
    if images.is_dir() and any(images.iterdir()):
        return True
    return any(read_jsonl(p) for p in out.glob("index*.jsonl"))


def write_batch(folder: ResumableDir, items: Sequence[PromptItem], images: np.ndarray, index_name: str = INDEX):
    """Write a batch's images (PNG, atomically) and then its records to the index ``index_name``: a record
    is written only once its image is whole, so an interrupted batch is simply redone."""
    recs = [
        {"prompt": it.prompt, "seed": it.seed, "path": folder.write_png(f"images/{it.key}.png", img), **it.meta}
        for it, img in zip(items, images, strict=True)
    ]
    folder.append(index_name, recs)
    return recs


def load_images(run_dir: str | Path, records: Sequence[dict[str, Any]]) -> np.ndarray:
    """Read the images of ``records`` as uint8 (N, H, W, 3)."""
    return np.stack([np.asarray(Image.open(Path(run_dir) / r["path"]).convert("RGB")) for r in records])
