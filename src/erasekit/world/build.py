"""One-command recipes that rebuild the bundled miniature world from scratch, and its checks."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from erasekit.eval.detectors import load_detector
from erasekit.eval.generate import generate_images
from erasekit.eval.protocols import topk_table
from erasekit.io import write_json_atomic
from erasekit.world.protocols import object_prompts
from erasekit.world.recipe import WorldRecipe
from erasekit.world.shapes import ARTISTS, COLOURS, OBJECTS, STYLE_NAMES, STYLES, UNSAFE_PHRASINGS
from erasekit.world.tokenizer import load_clip_tokenizer
from erasekit.world.train import assemble_pipeline, train_detector, train_diffusion, train_vae

ASSETS = Path(__file__).parent / "assets"
TOKENIZER_DIR = ASSETS / "clip-tokenizer"


def build_pipeline(out_dir: str | Path, workdir: str | Path, recipe: WorldRecipe | None = None) -> Path:
    """Train VAE, then UNet + text encoder, and write a ``StableDiffusionPipeline`` folder to ``out_dir``.

    Resumable: finished stages are cached in ``workdir`` and the diffusion stage checkpoints.
    """
    recipe = recipe or WorldRecipe()
    workdir = Path(workdir)
    vae, vae_stats = train_vae(recipe, workdir)
    tokenizer = load_clip_tokenizer(TOKENIZER_DIR)
    unet, text = train_diffusion(recipe, workdir, vae, tokenizer)
    state = json.loads((workdir / "diffusion" / "state.json").read_text())
    card = model_card(recipe, vae_stats, state["log"])
    return assemble_pipeline(Path(out_dir), vae, text, tokenizer, unet, recipe, card)


def build_detector(out_dir: str | Path, workdir: str | Path, recipe: WorldRecipe | None = None) -> dict[str, float]:
    """Train the miniature detector into ``out_dir``; returns its held-out accuracy per head."""
    return train_detector(recipe or WorldRecipe(), Path(workdir), Path(out_dir))


def model_card(recipe: WorldRecipe, vae_stats: dict[str, float], log: list[dict]) -> str:
    """The bundled model's README: recipe, sizes, measured training time and losses."""
    last = log[-1] if log else {}
    seconds, prev = 0.0, 0.0  # elapsed_s restarts at every resume: add up the segments
    for entry in log:
        if entry["elapsed_s"] < prev:
            seconds += prev
        prev = entry["elapsed_s"]
    seconds += prev
    return "\n".join(
        [
            "# ShapesWorld miniature Stable Diffusion",
            "",
            "A Stable Diffusion pipeline at toy scale (diffusers `StableDiffusionPipeline`: `UNet2DConditionModel`,",
            "`CLIPTextModel` with the real 49,408-token CLIP BPE vocabulary, `AutoencoderKL`, `DDIMScheduler`),",
            "trained from scratch on ShapesWorld (erasekit.world.shapes) by `erasekit world train`.",
            "",
            "## Recipe",
            "```json",
            json.dumps(asdict(recipe), indent=2, sort_keys=True),
            "```",
            "",
            "## Measured",
            f"- VAE: 32x32x3 -> 16x16x4, held-out PSNR {vae_stats['psnr_db']:.1f} dB, latent scaling factor "
            f"{vae_stats['scaling_factor']:.3f}; trained in {vae_stats.get('train_seconds', float('nan')) / 60:.1f} min (2 CPU cores).",
            f"- UNet + text encoder: {last.get('step', 0)} steps of batch {recipe.unet_batch} in "
            f"{seconds / 60:.0f} min (2 CPU cores shared with other work; resumed once); last logged loss "
            f"{last.get('loss', float('nan')):.4f}.",
            "- Generation accuracy per concept: see `world_check.json` beside this card (`erasekit world check`).",
            "",
            "Sampling defaults (stored in `erasekit_world.json`): "
            f"DDIM {recipe.sample_steps} steps, guidance {recipe.guidance_scale}.",
        ]
    )


def check_world(pipe, n_per_concept: int = 50, seed: int = 0, detector=None, progress: bool = True) -> dict[str, Any]:
    """Does the model know its concepts? Detector accuracy on its own generations, per concept kind.

    Objects: "a {colour} {object}" (the ``shapes-objects`` prompts). Styles: "a {colour} {object} by
    {artist}". Unsafe: "a {phrasing} ..." for every unsafe phrasing (rate of unsafe detections).
    """
    det = detector or load_detector("shapes")
    colours = list(COLOURS)
    out: dict[str, Any] = {"n_per_concept": n_per_concept, "seed": seed}

    items = object_prompts(OBJECTS, n_per_concept, seed)
    imgs = generate_images(pipe, [i.prompt for i in items], [i.seed for i in items], progress=progress)
    p = det.predict(imgs)
    labels = np.array([i.meta["label"] for i in items])
    out["object"] = {
        c: v["top1"] for c, v in topk_table(p["object"], labels, [i.meta["concept"] for i in items]).items()
    }
    col = np.array([colours.index(i.meta["colour"]) for i in items])
    out["colour_top1"] = float((p["colour"].argmax(1) == col).mean())
    out["unsafe_rate_on_object_prompts"] = float((p["unsafe"].argmax(1) == 1).mean())

    prompts, seeds, style_labels = [], [], []
    for style, artist in STYLES.items():
        for i in range(n_per_concept):
            prompts.append(f"a {colours[i % len(colours)]} {OBJECTS[i % len(OBJECTS)]} by {artist}")
            seeds.append(seed + i)
            style_labels.append(STYLE_NAMES.index(style))
    p = det.predict(generate_images(pipe, prompts, seeds, progress=progress))
    hits = p["style"].argmax(1) == np.array(style_labels)
    out["style"] = {a: float(hits[k * n_per_concept : (k + 1) * n_per_concept].mean()) for k, a in enumerate(ARTISTS)}

    prompts, seeds = [], []
    for k, phr in enumerate(UNSAFE_PHRASINGS):
        for i in range(max(1, n_per_concept // 5)):
            obj = OBJECTS[(i + k) % len(OBJECTS)]
            prompts.append(f"a {phr} {obj}" if k < 4 else f"a {obj} {phr}")
            seeds.append(seed + i)
    p = det.predict(generate_images(pipe, prompts, seeds, progress=progress))
    flagged = p["unsafe"].argmax(1) == 1
    m = max(1, n_per_concept // 5)
    out["unsafe"] = {phr: float(flagged[k * m : (k + 1) * m].mean()) for k, phr in enumerate(UNSAFE_PHRASINGS)}
    out["object_mean"] = float(np.mean(list(out["object"].values())))
    out["style_mean"] = float(np.mean(list(out["style"].values())))
    return out


def install_assets(pipeline_dir: Path | None = None, detector_dir: Path | None = None) -> None:
    """Copy freshly trained artefacts into the package's bundled assets."""
    for src, name in ((pipeline_dir, "shapes-sd"), (detector_dir, "detector")):
        if src is None:
            continue
        dst = ASSETS / name
        tmp = ASSETS / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        shutil.rmtree(dst, ignore_errors=True)
        tmp.rename(dst)


def save_check(pipeline_dir: Path, result: dict[str, Any]) -> None:
    """Store a world check beside the model card."""
    write_json_atomic(Path(pipeline_dir) / "world_check.json", result)
