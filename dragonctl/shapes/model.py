"""The small "shapes" diffusion model: architecture, lossless latent codec and null prompt.

The UNet is a plain diffusers `UNet2DConditionModel` with Stable Diffusion's decoder order (a plain
first up block, cross-attention up blocks after it), so the engine treats it exactly like SD:
decoder self-attention in up_blocks 1 and 2 forms the memory bank, and their outputs are the feature
stages. The latent is a lossless pixel-unshuffle (3×64×64 → 48×16×16), so there is no VAE to train.
Prompts do not exist in this world: a learned constant "null prompt" keeps the cross-attention path
exercised, and every prompt maps to it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

WEIGHTS_DIR = Path(__file__).parent / "weights"
LATENT_FACTOR = 4  # pixel-unshuffle factor: the model's vae_scale_factor
NULL_TOKENS = 4
CONTEXT_DIM = 64


def unet_config() -> dict:
    return dict(
        sample_size=16,
        in_channels=3 * LATENT_FACTOR**2,
        out_channels=3 * LATENT_FACTOR**2,
        block_out_channels=(48, 96, 144),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CONTEXT_DIM,
        attention_head_dim=(
            2,
            4,
            6,
        ),  # diffusers' legacy name: these are head counts (24 channels per head)
        norm_num_groups=16,
    )


def scheduler_config() -> dict:
    # SD's noise schedule; v-prediction: epsilon prediction on this latent failed to learn the
    # high-noise end
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
    )


class PixelShuffleCodec(nn.Module):
    """Lossless latent: encode = pixel-unshuffle, decode = pixel-shuffle (images in [-1, 1])."""

    def __init__(self, factor: int = LATENT_FACTOR) -> None:
        super().__init__()
        self.factor = factor
        self.scaling_factor = 1.0

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.pixel_unshuffle(x, self.factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return nn.functional.pixel_shuffle(z, self.factor)


class NullPrompt(nn.Module):
    """A learned constant context; every prompt (and the empty one) maps to it."""

    def __init__(self, tokens: int = NULL_TOKENS, dim: int = CONTEXT_DIM) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)

    def forward(self, batch: int = 1) -> torch.Tensor:
        return self.embedding.expand(batch, -1, -1)


# The next model, built like SD (#15): the VAE of `train_vae` (factor 8, 4 latent channels) and a
# UNet with SD 1.5's block topology, scaled down. Trained under training/, not shipped yet.
V2_DIR = Path(__file__).resolve().parents[2] / "training" / "shapes-v2"
V2_SIZE = 128  # the world's side: sources edit at their own size
V2_LATENT_FACTOR = 8


def unet_v2_config() -> dict:
    """SD 1.5's layout (three cross-attention levels, a plain fourth, two layers per block, 32
    channels per head) at a width that keeps VAE + UNet under 16 MiB in fp16 (5.5 M parameters)."""
    channels = (32, 64, 96, 96)
    return dict(
        sample_size=V2_SIZE // V2_LATENT_FACTOR,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=CONTEXT_DIM,
        attention_head_dim=tuple(c // 32 for c in channels),  # head counts (diffusers' old name)
        norm_num_groups=8,
    )
