"""The miniature CLIP: transformers' ``CLIPModel`` at toy scale, trained contrastively on ShapesWorld.

It plays the role ``openai/clip-vit-large-patch14`` plays in the AP paper's sensitivity analysis
(section 3.2): :class:`erasekit.eval.clip_score.ClipScorer` loads it with the same code that loads
a real CLIP checkpoint, so CLIP alignment scores of arbitrary captions exist in both worlds.

* Vision: a ViT on 32x32 images (patch 4 -> 64 patches), 64 wide.
* Text: CLIP's text transformer with the real 49,408-token BPE vocabulary (the tokenizer that ships
  in ``world/assets/clip-tokenizer``). The token-embedding table (49,408 x width) dominates the
  size, so the text transformer is 32 wide (about 1.6 M parameters, 7 MB in float32).
* Training: the symmetric InfoNCE loss of Radford et al. (2021, eq. in Fig. 3), with one change:
  ShapesWorld captions repeat ("a red circle" appears many times per batch), so every pair with an
  identical caption counts as a positive (soft targets spread evenly over them) instead of a false
  negative. Augmentations (blur, noise, small shifts) move the training images towards what the
  miniature diffusion model generates.

Training is deterministic given the recipe, checkpoints (safetensors + JSON) every
``checkpoint_every`` steps into ``workdir/clip`` and resumes exactly where it stopped.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import tqdm

from erasekit.eval.clip_score import ClipScorer
from erasekit.io import save_safetensors_atomic, write_json_atomic, write_text_atomic
from erasekit.world.shapes import ARTISTS, COLOURS, OBJECTS, make_example
from erasekit.world.tokenizer import load_clip_tokenizer
from erasekit.world.train import (
    HELDOUT_SEED_OFFSET,
    load_optimizer_state_tensors,
    load_or_make_data,
    optimizer_state_tensors,
)

TOKENIZER_DIR = Path(__file__).parent / "assets" / "clip-tokenizer"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Columns of the label array written by erasekit.world.train.load_or_make_data.
LABEL_COLUMNS = ("object", "colour", "background", "style", "unsafe")
# Zero-shot prompts per head; {x} is the class name (an object, a colour, an artist).
ZERO_SHOT_PROMPTS: dict[str, str] = {"object": "a {x}", "colour": "a {x}", "style": "a picture by {x}"}


@dataclass
class ClipRecipe:
    """Every setting of the miniature CLIP; saved beside its weights in ``erasekit_clip.json``."""

    seed: int = field(default=0, metadata={"help": "ShapesWorld data seed and model initialisation seed."})
    n_train: int = field(default=100_000, metadata={"help": "Training images ShapesWorld(seed)[:n_train]."})
    n_heldout: int = field(default=5_000, metadata={"help": "Held-out images for the zero-shot evaluation."})
    image_size: int = field(default=32, metadata={"help": "Input resolution (ShapesWorld renders 32x32)."})
    patch_size: int = field(default=4, metadata={"help": "ViT patch size."})
    vision_hidden: int = field(default=64, metadata={"help": "ViT width."})
    vision_layers: int = field(default=4, metadata={"help": "ViT depth."})
    vision_heads: int = field(default=4, metadata={"help": "ViT attention heads."})
    text_hidden: int = field(default=32, metadata={"help": "Text transformer width (x 49,408 token embeddings)."})
    text_layers: int = field(default=3, metadata={"help": "Text transformer depth."})
    text_heads: int = field(default=2, metadata={"help": "Text attention heads."})
    projection_dim: int = field(default=64, metadata={"help": "Joint embedding size."})
    steps: int = field(default=3000, metadata={"help": "Optimizer steps."})
    batch: int = field(default=256, metadata={"help": "Image-caption pairs per step."})
    lr: float = field(
        default=1e-3, metadata={"help": "Peak AdamW learning rate (linear warm-up, cosine decay to 10%)."}
    )
    warmup: int = field(default=200, metadata={"help": "Warm-up steps."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    augment: bool = field(default=True, metadata={"help": "Blur, noise and shift images like generated ones."})
    checkpoint_every: int = field(default=250, metadata={"help": "Steps between resumable checkpoints."})

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("augment", "seed", "weight_decay"):
                continue
            if v <= 0:
                raise ValueError(f"`{f.name}` must be > 0, got {v}.")
        if self.weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {self.weight_decay}.")
        if self.image_size % self.patch_size:
            raise ValueError(f"`image_size` ({self.image_size}) must be divisible by `patch_size` ({self.patch_size}).")
        for w, h, name in (
            (self.vision_hidden, self.vision_heads, "vision"),
            (self.text_hidden, self.text_heads, "text"),
        ):
            if w % h:
                raise ValueError(f"`{name}_hidden` ({w}) must be divisible by `{name}_heads` ({h}).")
        if self.batch < 2:
            raise ValueError(f"`batch` must be >= 2 for a contrastive loss, got {self.batch}.")
        if self.batch > self.n_train:
            raise ValueError(f"`batch` ({self.batch}) must not exceed `n_train` ({self.n_train}).")


# ------------------------------------------------------------------------------------ model
def clip_config(recipe: ClipRecipe):
    """``CLIPConfig``: a ViT for ``image_size`` images and CLIP's text transformer on the real vocabulary."""
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=recipe.text_hidden,
        intermediate_size=4 * recipe.text_hidden,
        num_hidden_layers=recipe.text_layers,
        num_attention_heads=recipe.text_heads,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=recipe.projection_dim,
    )
    vision = CLIPVisionConfig(
        image_size=recipe.image_size,
        patch_size=recipe.patch_size,
        hidden_size=recipe.vision_hidden,
        intermediate_size=4 * recipe.vision_hidden,
        num_hidden_layers=recipe.vision_layers,
        num_attention_heads=recipe.vision_heads,
        projection_dim=recipe.projection_dim,
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=recipe.projection_dim)


def build_clip(recipe: ClipRecipe | None = None):
    """A randomly initialised miniature ``CLIPModel`` (seeded by ``recipe.seed``)."""
    from transformers import CLIPModel

    recipe = recipe or ClipRecipe()
    torch.manual_seed(recipe.seed)
    return CLIPModel(clip_config(recipe))


def image_processor(recipe: ClipRecipe | None = None):
    """CLIP's image processor at ``image_size`` (resize and crop are no-ops on ShapesWorld images)."""
    recipe = recipe or ClipRecipe()
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers 4
        from transformers import CLIPImageProcessor as Processor
    s = recipe.image_size
    return Processor(
        size={"shortest_edge": s},
        crop_size={"height": s, "width": s},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )


def preprocess(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised float (N, 3, H, W): the image processor's rescale + normalise,
    in torch (used in training; equal to the processor's output at the native size)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _augment(x: torch.Tensor, rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
    """Blur (half the batches), sensor noise and a small shift: generated images are softer than renders."""
    if rng.random() < 0.5:
        sigma = float(rng.uniform(0.3, 1.0))
        k = torch.arange(-2, 3, dtype=x.dtype)
        w = torch.exp(-(k**2) / (2 * sigma**2))
        w = (w / w.sum()).view(1, 1, 1, 5).repeat(3, 1, 1, 1)
        x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), w, groups=3)
        x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), w.transpose(2, 3), groups=3)
    x = x + torch.randn(x.shape, generator=gen) * float(rng.uniform(0.0, 0.15))
    return torch.roll(x, shifts=(int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), dims=(2, 3))


def contrastive_loss(logits_per_image: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP, Radford et al. 2021) with multi-positive soft targets.

    ``logits_per_image``: (B, B) scaled cosine similarities, rows = images, columns = texts.
    ``same``: (B, B) bool, True where captions i and j are identical (the diagonal is always True).
    With no repeated captions this is exactly CLIP's loss, the mean of the two cross-entropies.
    """
    target = same.float() / same.float().sum(1, keepdim=True)  # (B, B), rows sum to 1; symmetric support
    loss_i = -(target * F.log_softmax(logits_per_image, dim=1)).sum(1).mean()
    loss_t = -(target * F.log_softmax(logits_per_image.t(), dim=1)).sum(1).mean()
    return (loss_i + loss_t) / 2


# ------------------------------------------------------------------------------------ training
def _caption_tokens(workdir: Path, recipe: ClipRecipe, captions: np.ndarray, tokenizer) -> dict[str, torch.Tensor]:
    path = workdir / f"clip-caption-ids-seed{recipe.seed}-n{recipe.n_train}.safetensors"
    if path.exists():
        return load_file(path)
    tok = tokenizer(list(map(str, captions)), padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    _, inverse = np.unique(captions, return_inverse=True)
    out = {
        "input_ids": tok.input_ids,
        "attention_mask": tok.attention_mask,
        "caption_id": torch.from_numpy(inverse.astype(np.int64).reshape(-1)),
    }
    save_safetensors_atomic(out, path)
    return out


def _lr_at(recipe: ClipRecipe, step: int, steps: int) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    t = (step - recipe.warmup) / max(1, steps - recipe.warmup)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def train_clip(
    out_dir: str | Path,
    steps: int | None = None,
    *,
    workdir: str | Path,
    recipe: ClipRecipe | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the miniature CLIP contrastively on ShapesWorld and save it to ``out_dir``.

    ``workdir`` holds the cached data (shared with :mod:`erasekit.world.train`: pass the world's
    work folder to reuse its ``shapes-seed*-n*.npz``) and the checkpoint ``workdir/clip``; calling
    again with the same arguments resumes from the last checkpoint, bit for bit. ``steps``
    overrides ``recipe.steps``. ``out_dir`` receives a ``CLIPModel.save_pretrained`` folder
    (safetensors), the tokenizer, ``preprocessor_config.json``, ``erasekit_clip.json`` (recipe,
    zero-shot accuracy on held-out ShapesWorld images, loss log) and a model card.

    Returns the contents of ``erasekit_clip.json``.
    """
    recipe = recipe or ClipRecipe()
    if steps is not None:
        if steps < 1:
            raise ValueError(f"`steps` must be >= 1, got {steps}.")
        recipe = ClipRecipe(**{**asdict(recipe), "steps": steps})
    steps = recipe.steps
    out_dir, workdir = Path(out_dir), Path(workdir)
    ck = workdir / "clip"
    tokenizer = load_clip_tokenizer(TOKENIZER_DIR)

    # 1. Data: images and tokenised captions, cached in workdir.
    data = load_or_make_data(workdir, recipe.seed, recipe.n_train)
    images = data["images"]
    tokens = _caption_tokens(workdir, recipe, data["captions"], tokenizer)

    # 2. Model and optimizer (no weight decay on biases, norms, embeddings and the temperature).
    model = build_clip(recipe)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
    )

    # 3. Resume.
    start, log = 0, []
    if (ck / "state.json").exists():
        st = json.loads((ck / "state.json").read_text())
        saved = ClipRecipe(**st["recipe"])
        if {**asdict(saved), "steps": 0, "checkpoint_every": 0} != {
            **asdict(recipe),
            "steps": 0,
            "checkpoint_every": 0,
        }:
            raise ValueError(
                f"The checkpoint in {ck} was made with a different recipe; remove that folder or use the same settings. "
                f"Saved: {asdict(saved)}."
            )
        model.load_state_dict(load_file(ck / "model.safetensors"))
        load_optimizer_state_tensors(opt, load_file(ck / "optimizer.safetensors"))
        start, log = int(st["step"]), st["log"]

    # 4. Train.
    model.train()
    t0 = time.time()
    bar = tqdm(range(start, steps), desc="clip", initial=start, total=steps, disable=not progress)
    for step in bar:
        rng = np.random.default_rng([recipe.seed, 11, step])  # one stream per step: resume is exact
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        idx = np.sort(rng.choice(len(images), size=recipe.batch, replace=False))
        x = preprocess(images[idx])  # (B, 3, H, W)
        if recipe.augment:
            x = _augment(x, rng, gen)
        mask = tokens["attention_mask"][idx]
        length = int(mask.sum(1).max())
        ids, mask = tokens["input_ids"][idx, :length], mask[:, :length]  # (B, L)
        cap = tokens["caption_id"][idx]
        same = cap[:, None] == cap[None, :]  # (B, B)
        out = model(input_ids=ids, attention_mask=mask, pixel_values=x)
        loss = contrastive_loss(out.logits_per_image, same)
        for g in opt.param_groups:
            g["lr"] = _lr_at(recipe, step, steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, math.log(100.0))  # CLIP's cap on the temperature
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log.append(
                {
                    "step": step + 1,
                    "loss": loss.item(),
                    "logit_scale": model.logit_scale.exp().item(),
                    "elapsed_s": time.time() - t0,
                }
            )
        if (step + 1) % recipe.checkpoint_every == 0 or step + 1 == steps:
            ck.mkdir(parents=True, exist_ok=True)
            save_safetensors_atomic(
                {k: v.contiguous() for k, v in model.state_dict().items()}, ck / "model.safetensors"
            )
            save_safetensors_atomic(optimizer_state_tensors(opt), ck / "optimizer.safetensors")
            write_json_atomic(ck / "state.json", {"step": step + 1, "log": log, "recipe": asdict(recipe)})
    bar.close()
    model.eval()

    # 5. Evaluate zero-shot on held-out images (a seed training never sees) and save.
    held = load_or_make_data(workdir, recipe.seed + HELDOUT_SEED_OFFSET, recipe.n_heldout)
    scorer = ClipScorer(model, tokenizer, image_processor(recipe), name="shapes-clip")
    acc = zero_shot_accuracy(scorer, held["images"], held["labels"])
    meta = {
        "recipe": asdict(recipe),
        "zero_shot": acc,
        "heldout": {"seed": recipe.seed + HELDOUT_SEED_OFFSET, "n": int(len(held["images"]))},
        "log": log,
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }
    save_clip(out_dir, model, tokenizer, image_processor(recipe), meta)
    return meta


def save_clip(out_dir: str | Path, model, tokenizer, processor, meta: dict[str, Any]) -> Path:
    """Write a self-contained CLIP folder atomically (written beside ``out_dir``, then renamed onto it)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)  # safetensors
    tokenizer.save_pretrained(tmp)
    for f in ("vocab.json", "merges.txt", "special_tokens_map.json"):  # the BPE files, for transformers 4
        shutil.copyfile(TOKENIZER_DIR / f, tmp / f)
    processor.save_pretrained(tmp)
    write_json_atomic(tmp / "erasekit_clip.json", meta)
    write_text_atomic(tmp / "README.md", _card(meta))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def _card(meta: dict[str, Any]) -> str:
    acc = meta.get("zero_shot", {})
    rows = "\n".join(f"| {h} | {v['accuracy']:.3f} | {v['chance']:.3f} | {v['n']} |" for h, v in acc.items())
    return (
        "# ShapesWorld miniature CLIP\n\n"
        "transformers `CLIPModel` (ViT on 32x32 images, CLIP text transformer with the real 49,408-token\n"
        "vocabulary) trained contrastively on ShapesWorld by `erasekit.world.clip.train_clip`.\n"
        "It scores the miniature's images the way `openai/clip-vit-large-patch14` scores Stable Diffusion's\n"
        "in the AP paper's sensitivity analysis.\n\n"
        f"Parameters: {meta.get('parameters', 0):,}\n\n"
        "Zero-shot top-1 accuracy on held-out real ShapesWorld images:\n\n"
        "| head | accuracy | chance | images |\n| --- | --- | --- | --- |\n"
        f"{rows}\n\nRecipe: `{json.dumps(meta.get('recipe', {}), sort_keys=True)}`\n"
    )


# ------------------------------------------------------------------------------------ evaluation
def heldout_examples(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` held-out ShapesWorld images and their labels (columns :data:`LABEL_COLUMNS`).

    Drawn from world seed ``seed + HELDOUT_SEED_OFFSET``, which neither the diffusion model nor the CLIP trains on.
    """
    if n < 1:
        raise ValueError(f"`n` must be >= 1, got {n}.")
    imgs, labels = [], []
    for i in range(n):
        img, scene = make_example(seed + HELDOUT_SEED_OFFSET, i)
        imgs.append(img)
        labels.append([scene.labels[k] for k in LABEL_COLUMNS])
    return np.stack(imgs), np.array(labels, dtype=np.int64)


def zero_shot_accuracy(
    scorer,
    images: np.ndarray,
    labels: np.ndarray,
    prompts: dict[str, str] | None = None,
) -> dict[str, dict[str, float]]:
    """Zero-shot top-1 accuracy per head: each image is assigned the class whose prompt scores highest.

    Heads: ``object`` (10 classes), ``colour`` (6) and ``style`` (the 5 artists; images drawn without
    an artist are left out). ``prompts`` maps a head to a template with ``{x}`` (default
    :data:`ZERO_SHOT_PROMPTS`). ``labels`` has the columns of :data:`LABEL_COLUMNS`.
    Returns ``{head: {"accuracy", "chance", "n", "prompt"}}``.
    """
    prompts = {**ZERO_SHOT_PROMPTS, **(prompts or {})}
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[1] != len(LABEL_COLUMNS) or len(labels) != len(images):
        raise ValueError(f"`labels` must be (N, {len(LABEL_COLUMNS)}) with N = len(images); got {labels.shape}.")
    classes = {"object": list(OBJECTS), "colour": list(COLOURS), "style": list(ARTISTS)}
    img_emb = scorer.embed_images(images)  # (N, D), unit norm
    out: dict[str, dict[str, float]] = {}
    for head, names in classes.items():
        y = labels[:, LABEL_COLUMNS.index(head)]
        keep = np.ones(len(y), dtype=bool)
        if head == "style":  # STYLE_NAMES = ("plain", *STYLES): label 0 has no artist
            keep = y > 0
            y = y - 1  # ARTISTS is STYLES' values in order, so artist k is style label k + 1
        txt = scorer.embed_texts([prompts[head].format(x=n) for n in names])  # (K, D)
        pred = (img_emb[torch.from_numpy(keep)] @ txt.T).argmax(1).numpy()
        n = int(keep.sum())
        acc = float((pred == y[keep]).mean()) if n else float("nan")
        out[head] = {"accuracy": acc, "chance": 1.0 / len(names), "n": n, "prompt": prompts[head]}
    return out


def evaluate_clip(
    clip: str | Path = "shapes", n: int = 1000, seed: int = 0, prompts: dict[str, str] | None = None
) -> dict:
    """Zero-shot accuracy of a saved CLIP (``"shapes"`` or a folder) on ``n`` held-out ShapesWorld images."""
    scorer = ClipScorer.from_pretrained(clip)
    images, labels = heldout_examples(n, seed)
    return zero_shot_accuracy(scorer, images, labels, prompts)


__all__ = [
    "ClipRecipe",
    "ZERO_SHOT_PROMPTS",
    "build_clip",
    "clip_config",
    "contrastive_loss",
    "evaluate_clip",
    "heldout_examples",
    "image_processor",
    "preprocess",
    "save_clip",
    "train_clip",
    "zero_shot_accuracy",
]
