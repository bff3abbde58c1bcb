"""Decoder features for the energies: outputs of up_blocks 1 and 2, from a forward that stops there.

The truncated forward calls the UNet's own modules in the order of diffusers'
`UNet2DConditionModel.forward` (time embedding, conv_in, down blocks, mid block, up blocks) and
returns after the last block asked for, so the rest of the decoder never runs and never enters the
autograd graph. It is plain module calls with no hooks and no exceptions, so `torch.compile` can
capture it whole, forward and backward (CUDA graphs for the guided steps under `--compile`). It
covers the UNets the method runs on (SD 1.x/2.x and the shapes model): no class or added embeddings.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# (z, t, context) → the feature stages' outputs
FeatureForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], list[torch.Tensor]]

FEATURE_BLOCKS = (1, 2)  # up_blocks whose outputs are the guidance features ("decoder layers 2, 3")


def unsupported_embeddings(unet: torch.nn.Module) -> list[str]:
    """UNet inputs the truncated forward does not reproduce (SD 1.x/2.x and shapes have none)."""
    cfg = unet.config
    present = {
        "class embeddings": getattr(unet, "class_embedding", None) is not None,
        "added embeddings": cfg.get("addition_embed_type") is not None,
        "center_input_sample": bool(cfg.get("center_input_sample")),
    }
    return [what for what, yes in present.items() if yes]


def check_truncatable(unet: torch.nn.Module) -> None:
    """Refuse UNets whose forward has inputs the truncated forward does not reproduce."""
    if extras := unsupported_embeddings(unet):
        raise ValueError(f"decoder features: UNets with {', '.join(extras)} are not supported")


def decoder_features(
    unet: torch.nn.Module,
    z: torch.Tensor,
    t: torch.Tensor | int,
    context: torch.Tensor,
    blocks: tuple[int, ...] = FEATURE_BLOCKS,
) -> list[torch.Tensor]:
    """Outputs of the given up_blocks (default 1 and 2; after their upsamplers), each B×C×h×w in the
    UNet's dtype."""
    check_truncatable(unet)
    last = max(blocks)
    # sizes the upsamplers cannot reach by doubling are passed on explicitly, as diffusers does
    odd_size = any(s % 2**unet.num_upsamplers for s in z.shape[-2:])
    emb = unet.time_embedding(unet.get_time_embed(sample=z, timestep=t), None)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    context = unet.process_encoder_hidden_states(
        encoder_hidden_states=context, added_cond_kwargs=None
    )

    h = unet.conv_in(z)
    skips: tuple[torch.Tensor, ...] = (h,)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=context)
        else:
            h, res = block(hidden_states=h, temb=emb)
        skips += res
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            h = unet.mid_block(h, emb, encoder_hidden_states=context)
        else:
            h = unet.mid_block(h, emb)

    out: dict[int, torch.Tensor] = {}
    n_up = len(unet.up_blocks)
    for i, block in enumerate(unet.up_blocks[: last + 1]):
        n = len(block.resnets)
        res, skips = skips[-n:], skips[:-n]
        size = skips[-1].shape[2:] if odd_size and i < n_up - 1 else None
        if getattr(block, "has_cross_attention", False):
            h = block(
                hidden_states=h,
                temb=emb,
                res_hidden_states_tuple=res,
                encoder_hidden_states=context,
                upsample_size=size,
            )
        else:
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, upsample_size=size)
        out[i] = h
    return [out[i] for i in blocks]


def to_grid(features: list[torch.Tensor], grid_hw: tuple[int, int]) -> list[torch.Tensor]:
    """Nearest-resize every feature map to the common grid, in fp32 (the energies run in fp32)."""
    return [F.interpolate(f.float(), size=grid_hw, mode="nearest") for f in features]
