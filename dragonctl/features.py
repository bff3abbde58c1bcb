"""Decoder features for the energies: outputs of up_blocks 1 and 2, from a forward that stops there.

The truncated forward calls the UNet's own modules in the order of diffusers'
`UNet2DConditionModel.forward` (time embedding, conv_in, down blocks, mid block, up blocks) and
returns after the last block asked for, so the rest of the decoder never runs and never enters the
autograd graph. It is plain module calls with no hooks and no exceptions, so `torch.compile` can
capture it whole, forward and backward (CUDA graphs for the guided steps under `--compile`). It
covers the UNets the method runs on (SD 1.x/2.x, SDXL with its `text_time` added conditions, and
the shapes model); class embeddings and other added embeddings are refused.

Which blocks: the first two decoder blocks with cross-attention. On SD 1.5 those are up_blocks 1
and 2 (the paper's "2nd and 3rd decoder layers", at half and at full latent resolution, 1280 and
640 channels); on SDXL, whose decoder has three blocks and attention only in the first two,
up_blocks 0 and 1 (the same resolutions, 1280 and 640 channels).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# (z, t, context) → the feature stages' outputs
FeatureForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], list[torch.Tensor]]


def feature_blocks(unet: torch.nn.Module) -> tuple[int, ...]:
    """The up_blocks whose outputs are the guidance features: the first two with cross-attention."""
    attn = [i for i, b in enumerate(unet.up_blocks) if getattr(b, "has_cross_attention", False)]
    return tuple(attn[:2])


def unsupported_embeddings(unet: torch.nn.Module) -> list[str]:
    """UNet inputs the truncated forward does not reproduce (SD 1.x/2.x, SDXL's `text_time` and
    shapes are reproduced)."""
    cfg = unet.config
    added = cfg.get("addition_embed_type")
    present = {
        "class embeddings": getattr(unet, "class_embedding", None) is not None,
        f"added embeddings ({added})": added not in (None, "text_time"),
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
    added_cond_kwargs: dict | None = None,
    blocks: tuple[int, ...] | None = None,
) -> list[torch.Tensor]:
    """Outputs of the given up_blocks (default: `feature_blocks`; after their upsamplers), each
    B×C×h×w in the UNet's dtype. `added_cond_kwargs`: SDXL's (`text_embeds`, `time_ids`)."""
    check_truncatable(unet)
    blocks = blocks or feature_blocks(unet)
    last = max(blocks)
    # sizes the upsamplers cannot reach by doubling are passed on explicitly, as diffusers does
    odd_size = any(s % 2**unet.num_upsamplers for s in z.shape[-2:])
    emb = unet.time_embedding(unet.get_time_embed(sample=z, timestep=t), None)
    if added_cond_kwargs is not None:  # SDXL: pooled text and size conditions join the time's
        emb = emb + unet.get_aug_embed(
            emb=emb, encoder_hidden_states=context, added_cond_kwargs=added_cond_kwargs
        )
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
