"""Tiny Stable Diffusion pipelines with random weights, built offline (for tests and examples).

They use the real diffusers/transformers classes and the real CLIP tokenizer that ships with
erasekit, so every real-model code path runs on them in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import torch

TOKENIZER_DIR = Path(__file__).parent / "world" / "assets" / "clip-tokenizer"


def tiny_pipeline(seed: int = 0, *, image_size: int = 32, cross_dim: int = 32):
    """A random-weight ``StableDiffusionPipeline`` (UNet 2 levels, 32-wide CLIP, VAE x2, DDIM)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from erasekit.world.tokenizer import load_clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=image_size // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim,
        attention_head_dim=2,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=image_size,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=cross_dim,
            intermediate_size=2 * cross_dim,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    sched = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=load_clip_tokenizer(TOKENIZER_DIR),
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(directory: str | Path, seed: int = 0) -> Path:
    """Write :func:`tiny_pipeline` as a diffusers folder (what ``load_pipeline(path)`` reads)."""
    pipe = tiny_pipeline(seed)
    pipe.save_pretrained(directory, safe_serialization=True)
    return Path(directory)


# A random miniature CLIP small enough for tests and smoke benchmarks (erasekit.world.clip.ClipRecipe fields).
TINY_CLIP = dict(
    vision_hidden=16,
    vision_layers=1,
    vision_heads=2,
    text_hidden=8,
    text_layers=1,
    text_heads=2,
    projection_dim=8,
)


def tiny_clip_scorer(seed: int = 0, batch_size: int = 64, name: str | None = None):
    """A :class:`~erasekit.eval.clip_score.ClipScorer` over a random tiny CLIP (real transformers classes)."""
    from erasekit.eval.clip_score import ClipScorer
    from erasekit.world import clip as wclip
    from erasekit.world.tokenizer import load_clip_tokenizer

    recipe = wclip.ClipRecipe(seed=seed, **TINY_CLIP)
    return ClipScorer(
        wclip.build_clip(recipe),
        load_clip_tokenizer(wclip.TOKENIZER_DIR),
        wclip.image_processor(recipe),
        batch_size=batch_size,
        name=name,
    )
