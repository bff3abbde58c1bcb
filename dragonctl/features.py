"""Decoder features for the energies: outputs of up_blocks 1 and 2, from a forward that stops there.

Forward hooks capture the two blocks' outputs and the second hook stops the forward by raising, so
the rest of the decoder never runs (and never enters the autograd graph). No UNet code is copied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dragonctl.models import FEATURE_BLOCKS

FEATURE_UPSCALE = 2  # the common feature grid is twice the latent grid (H/4 × W/4 for SD), as in the reference


class _Stop(Exception):
    pass


def decoder_features(unet: torch.nn.Module, z: torch.Tensor, t: torch.Tensor | int,
                     context: torch.Tensor, blocks: tuple[int, ...] = FEATURE_BLOCKS) -> list[torch.Tensor]:
    """Outputs of the given up_blocks (default 1 and 2; after their upsamplers), each B×C×h×w in the UNet's dtype."""
    captured: dict[int, torch.Tensor] = {}
    last = max(blocks)

    def hook(index: int):
        def fn(_module, _inputs, output):
            captured[index] = output
            if index == last:
                raise _Stop

        return fn

    handles = [unet.up_blocks[i].register_forward_hook(hook(i)) for i in blocks]
    try:
        unet(z, t, encoder_hidden_states=context)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return [captured[i] for i in blocks]


def to_grid(features: list[torch.Tensor], grid_hw: tuple[int, int]) -> list[torch.Tensor]:
    """Nearest-resize every feature map to the common grid, in fp32 (the energies run in fp32)."""
    return [F.interpolate(f.float(), size=grid_hw, mode="nearest") for f in features]
