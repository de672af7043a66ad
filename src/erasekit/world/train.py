"""Train the miniature world from scratch: data, detector, VAE, then UNet + text encoder.

Every stage is deterministic given the recipe's seed, writes atomically, and the long stages
checkpoint (safetensors + JSON) so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import tqdm

from erasekit.io import save_safetensors_atomic, write_json_atomic, write_text_atomic
from erasekit.world import recipe as R
from erasekit.world.detector import DetectorConfig, ShapesDetector
from erasekit.world.shapes import make_example

HELDOUT_SEED_OFFSET = 1_000_003
LABEL_KEYS = ("object", "colour", "background", "style", "unsafe")  # column order of the cached labels


# ------------------------------------------------------------------------------------ data
def _chunk(args: tuple[int, int, int]) -> tuple[np.ndarray, list[str], np.ndarray]:
    seed, start, stop = args
    imgs, caps, labels = [], [], []
    for i in range(start, stop):
        img, scene = make_example(seed, i)
        imgs.append(img)
        caps.append(scene.caption)
        labels.append([scene.labels[k] for k in LABEL_KEYS])
    return np.stack(imgs), caps, np.array(labels, dtype=np.int64)


def load_or_make_data(workdir: Path, seed: int, n: int, workers: int = 2) -> dict[str, np.ndarray]:
    """Images (uint8 NHWC), captions and labels of ShapesWorld(seed)[:n], cached in ``workdir``."""
    path = workdir / f"shapes-seed{seed}-n{n}.npz"
    if path.exists():
        d = np.load(path, allow_pickle=False)
        return {k: d[k] for k in d.files}
    step = 2000
    jobs = [(seed, s, min(s + step, n)) for s in range(0, n, step)]
    imgs, caps, labels = [], [], []
    with ProcessPoolExecutor(workers) as pool:
        for a, c, lab in tqdm(pool.map(_chunk, jobs), total=len(jobs), desc=f"ShapesWorld seed {seed}"):
            imgs.append(a)
            caps += c
            labels.append(lab)
    data = {"images": np.concatenate(imgs), "captions": np.array(caps), "labels": np.concatenate(labels)}
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **data)
    tmp.replace(path)
    return data


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    k = torch.arange(-2, 3, dtype=x.dtype)
    w = torch.exp(-(k**2) / (2 * sigma**2))
    w = w / w.sum()
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), w.view(1, 1, 1, 5).repeat(3, 1, 1, 1), groups=3)
    return F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), w.view(1, 1, 5, 1).repeat(3, 1, 1, 1), groups=3)


# ------------------------------------------------------------------------------------ detector
def train_detector(recipe: R.WorldRecipe, workdir: Path, out_dir: Path) -> dict[str, float]:
    """Train :class:`ShapesDetector` on ShapesWorld; returns held-out accuracy per head."""
    torch.manual_seed(recipe.seed)
    data = load_or_make_data(workdir, recipe.seed, recipe.n_train)
    held = load_or_make_data(workdir, recipe.seed + HELDOUT_SEED_OFFSET, recipe.n_heldout)
    model = ShapesDetector(DetectorConfig())
    heads = list(model.config.heads)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.detector_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.detector_lr, total_steps=recipe.detector_steps)
    rng = np.random.default_rng(recipe.seed)
    model.train()
    bar = tqdm(range(recipe.detector_steps), desc="detector")
    for _ in bar:
        idx = rng.integers(len(data["images"]), size=recipe.detector_batch)
        x = to_tensor(data["images"][idx])
        y = torch.from_numpy(data["labels"][idx])
        # Augment towards what a generator produces: blur, noise, small shifts.
        if rng.random() < 0.5:
            x = _blur(x, float(rng.uniform(0.3, 1.0)))
        x = x + torch.randn_like(x) * float(rng.uniform(0, 0.08))
        x = torch.roll(x, shifts=(int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), dims=(2, 3))
        logits = model(x)
        loss = sum(F.cross_entropy(logits[h], y[:, LABEL_KEYS.index(h)]) for h in heads)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    acc = evaluate_detector(model, held["images"], held["labels"])
    model.save(out_dir)
    write_json_atomic(out_dir / "heldout_accuracy.json", acc)
    return acc


@torch.no_grad()
def evaluate_detector(model: ShapesDetector, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1 accuracy of every head on images labelled in :data:`LABEL_KEYS` column order."""
    heads = list(model.config.heads)
    correct = dict.fromkeys(heads, 0)
    for s in range(0, len(images), 500):
        logits = model(to_tensor(images[s : s + 500]))
        for h in heads:
            correct[h] += int((logits[h].argmax(1).numpy() == labels[s : s + 500, LABEL_KEYS.index(h)]).sum())
    return {h: correct[h] / len(images) for h in heads}


# ------------------------------------------------------------------------------------ VAE
def train_vae(recipe: R.WorldRecipe, workdir: Path) -> tuple[object, dict[str, float]]:
    """Train the ``AutoencoderKL``; returns it and held-out PSNR; saves it under ``workdir/vae``."""
    from diffusers import AutoencoderKL

    out = workdir / "vae"
    if (out / "config.json").exists():
        vae = AutoencoderKL.from_pretrained(out)
        return vae, json.loads((out / "stats.json").read_text())
    torch.manual_seed(recipe.seed)
    data = load_or_make_data(workdir, recipe.seed, recipe.n_train)
    held = load_or_make_data(workdir, recipe.seed + HELDOUT_SEED_OFFSET, recipe.n_heldout)
    vae = AutoencoderKL(**R.vae_config(recipe))
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.vae_lr, total_steps=recipe.vae_steps, pct_start=0.05)
    rng = np.random.default_rng(recipe.seed + 1)
    t0 = time.time()
    bar = tqdm(range(recipe.vae_steps), desc="vae")
    for _ in bar:
        x = to_tensor(data["images"][rng.integers(len(data["images"]), size=recipe.vae_batch)])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + recipe.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        x = to_tensor(held["images"][:1000])
        z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z).sample.clamp(-1, 1)
        mse = F.mse_loss((rec + 1) / 2, (x + 1) / 2).item()
        std = float(z.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    stats = {
        "psnr_db": 10 * math.log10(1 / mse),
        "latent_std": std,
        "scaling_factor": 1.0 / std,
        "train_seconds": time.time() - t0,
    }
    vae.save_pretrained(out)
    write_json_atomic(out / "stats.json", stats)
    return vae, stats


# ------------------------------------------------------------------------------------ UNet + text encoder
def _encode_latents(vae, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    with torch.no_grad():
        for s in tqdm(range(0, len(images), 500), desc="encode latents"):
            d = vae.encode(to_tensor(images[s : s + 500])).latent_dist
            means.append(d.mean)
            stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def _flatten_state(prefix: str, sd: dict) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        key = f"{prefix}.{k}"
        if isinstance(v, dict):
            out.update(_flatten_state(key, v))
        elif isinstance(v, torch.Tensor):
            out[key] = v
        else:
            out[key] = torch.tensor(v)
    return out


def _unflatten(prefix: str, flat: dict[str, torch.Tensor]) -> dict:
    tree: dict = {}
    for k, v in flat.items():
        if not k.startswith(prefix + "."):
            continue
        parts = k[len(prefix) + 1 :].split(".")
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return tree


def optimizer_state_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Flatten an Adam-family optimizer's per-parameter state to named tensors (for safetensors)."""
    return _flatten_state("opt", {str(i): s for i, s in opt.state_dict()["state"].items()})


def load_optimizer_state_tensors(opt: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`optimizer_state_tensors`."""
    sd = opt.state_dict()
    sd["state"] = {int(i): s for i, s in _unflatten("opt", flat).items()}
    opt.load_state_dict(sd)


def train_diffusion(recipe: R.WorldRecipe, workdir: Path, vae, tokenizer, steps: int | None = None) -> tuple:
    """Train UNet and text encoder jointly (eps-prediction, min-SNR weighting, CFG dropout, EMA).

    Checkpoints every 250 steps to ``workdir/diffusion``; calling it again resumes.
    Returns the EMA UNet and text encoder.
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    steps = steps or recipe.unet_steps
    ck = workdir / "diffusion"
    data = load_or_make_data(workdir, recipe.seed, recipe.n_train)
    lat_path = workdir / "latents.safetensors"
    if lat_path.exists():
        lat = load_file(lat_path)
    else:
        m, s = _encode_latents(vae, data["images"])
        lat = {"mean": m, "std": s}
        save_safetensors_atomic(lat, lat_path)
    scale = float(vae.config.scaling_factor)
    ids_path = workdir / "caption_ids.safetensors"
    if ids_path.exists():
        ids = load_file(ids_path)["ids"]
    else:
        ids = tokenizer(
            list(data["captions"]), padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        save_safetensors_atomic({"ids": ids}, ids_path)
    empty_ids = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids

    torch.manual_seed(recipe.seed)
    unet = UNet2DConditionModel(**R.unet_config(recipe))
    text = CLIPTextModel(CLIPTextConfig(**R.text_config(recipe)))
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=0.0)
    ema = [p.detach().clone() for p in params]
    noise_sched = DDPMScheduler(**{k: v for k, v in R.scheduler_config().items() if k != "set_alpha_to_one"})
    alphas = noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas)

    start = 0
    log: list[dict] = []
    if (ck / "state.json").exists():
        st = json.loads((ck / "state.json").read_text())
        w = load_file(ck / "weights.safetensors")
        unet.load_state_dict(_unflatten_tensors("unet", w))
        text.load_state_dict(_unflatten_tensors("text", w))
        for i, e in enumerate(ema):
            e.copy_(w[f"ema.{i}"])
        load_optimizer_state_tensors(opt, load_file(ck / "optimizer.safetensors"))
        start, log = st["step"], st["log"]

    def lr_at(step: int) -> float:
        if step < recipe.unet_warmup:
            return recipe.unet_lr * (step + 1) / recipe.unet_warmup
        t = (step - recipe.unet_warmup) / max(1, steps - recipe.unet_warmup)
        return recipe.unet_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))

    unet.train()
    text.train()
    bar = tqdm(range(start, steps), desc="unet+text", initial=start, total=steps)
    t0 = time.time()
    for step in bar:
        rng = np.random.default_rng([recipe.seed, 7, step])  # per-step streams make resume exact
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        idx = torch.from_numpy(rng.integers(len(ids), size=recipe.unet_batch))
        z0 = (lat["mean"][idx] + lat["std"][idx] * torch.randn(lat["mean"][idx].shape, generator=gen)) * scale
        tok = ids[idx].clone()
        drop = torch.from_numpy(rng.random(recipe.unet_batch) < recipe.cfg_dropout)
        tok[drop] = empty_ids
        t = torch.randint(0, 1000, (recipe.unet_batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        zt = noise_sched.add_noise(z0, noise, t)
        cond = text(tok).last_hidden_state
        pred = unet(zt, t, cond).sample
        weight = torch.clamp(snr[t], max=recipe.min_snr_gamma) / snr[t]  # min-SNR-gamma for eps
        loss = (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(recipe.ema_decay, (1 + step) / (10 + step))
            for e, p in zip(ema, params, strict=True):
                e.lerp_(p.detach(), 1 - d)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % 50 == 0:
            log.append({"step": step + 1, "loss": float(loss), "elapsed_s": time.time() - t0})
        if (step + 1) % 250 == 0 or step + 1 == steps:
            w = {**_flatten_state("unet", unet.state_dict()), **_flatten_state("text", text.state_dict())}
            w.update({f"ema.{i}": e for i, e in enumerate(ema)})
            ck.mkdir(parents=True, exist_ok=True)
            save_safetensors_atomic(w, ck / "weights.safetensors")
            save_safetensors_atomic(optimizer_state_tensors(opt), ck / "optimizer.safetensors")
            write_json_atomic(ck / "state.json", {"step": step + 1, "log": log, "recipe": asdict(recipe)})
    with torch.no_grad():
        for e, p in zip(ema, params, strict=True):
            p.copy_(e)
    return unet.eval(), text.eval()


def _unflatten_tensors(prefix: str, flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in flat.items() if k.startswith(prefix + ".")}


def assemble_pipeline(out_dir: Path, vae, text, tokenizer, unet, recipe: R.WorldRecipe, card: str) -> Path:
    """Write a ``StableDiffusionPipeline`` folder (safetensors) plus a model card."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**R.scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    pipe.save_pretrained(tmp, safe_serialization=True)
    # transformers 5 writes only tokenizer.json; ship the BPE files so transformers 4 loads it too.
    tokenizer.save_pretrained(tmp / "tokenizer")
    write_json_atomic(
        tmp / "erasekit_world.json",
        {"recipe": asdict(recipe), "sample_steps": recipe.sample_steps, "guidance_scale": recipe.guidance_scale},
    )
    write_text_atomic(tmp / "README.md", card)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir
