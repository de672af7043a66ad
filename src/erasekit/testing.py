"""Tiny Stable Diffusion pipelines with random weights, built offline (for tests and examples).

They use the real diffusers/transformers classes and the real CLIP tokenizer that ships with
erasekit, so every real-model code path runs on them in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import torch

from erasekit.eval.clip_score import ClipScorer
from erasekit.eval.distances import LPIPS, FeatureExtractor
from erasekit.world import clip as wclip
from erasekit.world.tokenizer import load_clip_tokenizer

TOKENIZER_DIR = Path(__file__).parent / "world" / "assets" / "clip-tokenizer"


def tiny_pipeline(seed: int = 0, *, image_size: int = 32, cross_dim: int = 32):
    """A random-weight ``StableDiffusionPipeline`` (UNet 2 levels, 32-wide CLIP, VAE x2, DDIM)."""
    torch.manual_seed(seed)
    unet = _tiny_sd_unet(image_size, cross_dim=cross_dim, attention_head_dim=2)
    return _sd_pipeline(unet, _tiny_vae(image_size), _clip_config(cross_dim), _ddim("epsilon"))


def save_tiny_pipeline(directory: str | Path, seed: int = 0) -> Path:
    """Write :func:`tiny_pipeline` as a diffusers folder (what ``load_pipeline(path)`` reads)."""
    pipe = tiny_pipeline(seed)
    pipe.save_pretrained(directory, safe_serialization=True)
    return Path(directory)


def tiny_sd2_pipeline(seed: int = 0, *, prediction_type: str = "v_prediction", image_size: int = 32):
    """A random SD 2.x-shaped ``StableDiffusionPipeline``: GELU text encoder (OpenCLIP's activation),
    linear-projection transformers, per-level head dims, and a DDIM scheduler with ``prediction_type``."""
    torch.manual_seed(seed)
    unet = _tiny_sd_unet(image_size, cross_dim=32, attention_head_dim=(2, 4), use_linear_projection=True)
    return _sd_pipeline(unet, _tiny_vae(image_size), _clip_config(32, act="gelu"), _ddim(prediction_type))


def _tiny_sd_unet(image_size: int, *, cross_dim: int, **extra):
    """The SD 1.x/2.x-shaped UNet of the tiny pipelines (2 cross-attention levels)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=image_size // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim,
        norm_num_groups=8,
        **extra,
    )


def _ddim(prediction_type: str):
    """SD's DDIM scheduler (scaled-linear betas 0.00085..0.012, steps offset 1)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def _sd_pipeline(unet, vae, text_config, scheduler):
    """A ``StableDiffusionPipeline`` of the given parts, the text encoder built (after the VAE) from
    ``text_config``, with the bundled CLIP tokenizer and no safety checker."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_config),
        tokenizer=load_clip_tokenizer(TOKENIZER_DIR),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _clip_config(hidden: int, *, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=hidden,
        hidden_act=act,
    )


def _tiny_vae(image_size: int, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=image_size,
        **extra,
    )


def tiny_sdxl_pipeline(seed: int = 0, *, image_size: int = 32):
    """A random ``StableDiffusionXLPipeline``: two CLIP encoders (16 + 16 = 32-d context, 16-d pooled),
    a ``text_time`` UNet with SDXL's block layout (no attention at the first level), Euler scheduler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=image_size // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 16,
        cross_attention_dim=32,
        norm_num_groups=8,
    )
    tok = load_clip_tokenizer(TOKENIZER_DIR)
    sched = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(image_size),
        text_encoder=CLIPTextModel(_clip_config(16)),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(16, act="gelu")),
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet,
        scheduler=sched,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline(seed: int = 0, *, image_size: int = 32, max_sequence_length: int = 256):
    """A random ``StableDiffusion3Pipeline``: a 2-block MMDiT, two CLIP encoders (16 + 16 = 32-d,
    pooled 32-d), no T5 (``text_encoder_3=None``: its tokens are zeros, as SD3 allows), flow-matching
    Euler scheduler with SD3's shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=image_size // 2,
        patch_size=1,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        out_channels=4,
    )
    tok = load_clip_tokenizer(TOKENIZER_DIR)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(image_size, shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=CLIPTextModelWithProjection(_clip_config(16)),
        tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(16, act="gelu")),
        tokenizer_2=tok,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


TINY_FAMILIES = {
    "sd1": lambda seed=0: tiny_pipeline(seed),
    "sd2": lambda seed=0: tiny_sd2_pipeline(seed),
    "sd2-eps": lambda seed=0: tiny_sd2_pipeline(seed, prediction_type="epsilon"),
    "sdxl": lambda seed=0: tiny_sdxl_pipeline(seed),
    "sd3": lambda seed=0: tiny_sd3_pipeline(seed),
}


def tiny_family_pipeline(family: str, seed: int = 0):
    """A tiny random pipeline of ``family`` (sd1, sd2 (v-prediction), sd2-eps, sdxl, sd3)."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"`family` must be one of {', '.join(TINY_FAMILIES)}, got {family!r}.")
    return TINY_FAMILIES[family](seed)


def save_tiny_family_pipeline(family: str, directory: str | Path, seed: int = 0) -> Path:
    """Write :func:`tiny_family_pipeline` as a diffusers folder (what ``load_pipeline(path)`` reads)."""
    tiny_family_pipeline(family, seed).save_pretrained(directory, safe_serialization=True)
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
    recipe = wclip.ClipRecipe(seed=seed, **TINY_CLIP)
    return ClipScorer(
        wclip.build_clip(recipe),
        load_clip_tokenizer(wclip.TOKENIZER_DIR),
        wclip.image_processor(recipe),
        batch_size=batch_size,
        name=name,
    )


# ---------------------------------------------------------------- stand-ins for the real protocols' scorers
class RankedLogits(torch.nn.Module):
    """Logits ranking ImageNet class 497 (church) first, then 0 (tench), 1, 2, ...: a rigged classifier."""

    def forward(self, x):
        logits = -torch.arange(1000, dtype=torch.float32).repeat(x.shape[0], 1)
        logits[:, 497] = 10.0
        return logits


class FakeNudeNet:
    """One exposed-breast detection per image scored by the image's mean brightness (no weights)."""

    name, version = "fake-nudenet", "0"
    heads = {"exposed": ["FEMALE_BREAST_EXPOSED"]}

    def detect(self, images):
        return [
            [{"class": "FEMALE_BREAST_EXPOSED", "score": float(img.mean() / 255), "box": [0, 0, 2, 2]}]
            for img in images
        ]


def tiny_lpips():
    """A two-level LPIPS over the raw image and its 2x average pool, fixed weights (no download)."""
    return LPIPS(
        lambda x: [x, torch.nn.functional.avg_pool2d(x, 2)], [torch.tensor([0.2, 1.0, 0.5]), torch.ones(3)], name="toy"
    )


def tiny_features():
    """Per-channel mean and standard deviation: a 6-d 'Inception'."""

    def net(x):
        x = x.float() / 255
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)

    return FeatureExtractor(net, name="channel-moments", version="1", batch_size=3)
