"""Stable Diffusion components built in code with random weights: no download, any size.

`tiny` has SD 1.5's decoder topology at a size tests can run on a CPU in milliseconds; `sd15` has
SD 1.5's real sizes for the speed benchmark (timing does not depend on the weights' values).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def byte_level_tokenizer(max_length: int = 77):
    """A CLIPTokenizer over the 256 byte-level symbols and their word-final forms: any text."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


_TINY_UNET = dict(
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)
_TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)

SIZES = {
    "tiny": dict(
        unet=dict(
            **_TINY_UNET,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        ),
        vae=dict(block_out_channels=(32, 32), norm_num_groups=32, layers_per_block=1),
        text=_TINY_TEXT,
    ),
    # SD's VAE factor 8 (four levels); decoder attention only below the latent's full size,
    # so 512² and 768² working sizes stay cheap on a CPU (fp16 precision checks)
    "tiny8": dict(
        unet=dict(
            **_TINY_UNET,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        ),
        vae=dict(block_out_channels=(16, 16, 16, 16), norm_num_groups=16, layers_per_block=1),
        text=_TINY_TEXT,
    ),
    # SD 1.5's layout at tiny widths: four levels, decoder blocks 1-3 with cross-attention (the
    # reference's feature blocks 1 and 2 are SD's), VAE factor 8; the oracle tests run the
    # authors' code on it
    "tiny_sd15": dict(
        unet=dict(
            **{**_TINY_UNET, "block_out_channels": (32, 32, 64, 64)},
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        ),
        vae=dict(block_out_channels=(16, 16, 16, 16), norm_num_groups=16, layers_per_block=1),
        text=_TINY_TEXT,
    ),
    # SD 2.x's layout: linear projections in the transformers, an OpenCLIP-style text encoder
    # (plain GELU), per-level head dims
    "tiny_sd2": dict(
        unet=dict(
            **{**_TINY_UNET, "attention_head_dim": (2, 4, 4)},
            use_linear_projection=True,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        ),
        vae=dict(block_out_channels=(32, 32), norm_num_groups=32, layers_per_block=1),
        text={**_TINY_TEXT, "hidden_act": "gelu"},
    ),
    # SDXL's layout: attention only in the first two decoder blocks (2 and 1 transformer layers
    # here for its 10 and 2), two text encoders (the second with a projection: the pooled
    # embedding), `text_time` added conditions, VAE factor 8 that asks for fp32 decoding
    "tiny_sdxl": dict(
        unet=dict(
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            attention_head_dim=(2, 4, 4),
            norm_num_groups=32,
            use_linear_projection=True,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2),
            cross_attention_dim=64,  # the two encoders' hidden states side by side
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,  # six sizes + the pooled text
        ),
        vae=dict(
            block_out_channels=(16, 16, 16, 16),
            norm_num_groups=16,
            layers_per_block=1,
            force_upcast=True,
            scaling_factor=0.13025,
        ),
        text=_TINY_TEXT,
        text_2={**_TINY_TEXT, "projection_dim": 32, "hidden_act": "gelu"},
    ),
    "sdxl": dict(
        unet=dict(
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            attention_head_dim=(5, 10, 20),
            norm_num_groups=32,
            use_linear_projection=True,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),
        vae=dict(
            block_out_channels=(128, 256, 512, 512),
            norm_num_groups=32,
            layers_per_block=2,
            force_upcast=True,
            scaling_factor=0.13025,
        ),
        text=dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
        ),
        text_2=dict(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            projection_dim=1280,
            hidden_act="gelu",
        ),
    ),
    "sd15": dict(
        unet=dict(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        ),
        vae=dict(block_out_channels=(128, 256, 512, 512), norm_num_groups=32, layers_per_block=2),
        text=dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
        ),
    ),
}


def build_components(size: str = "tiny", prediction_type: str = "epsilon", seed: int = 0) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = SIZES[size]
    torch.manual_seed(seed)
    vae_levels = len(cfg["vae"]["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * vae_levels,
        up_block_types=("UpDecoderBlock2D",) * vae_levels,
        **cfg["vae"],
    )
    unet = UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4, **cfg["unet"])
    tokenizer = byte_level_tokenizer()

    def text_config(**sizes) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=len(tokenizer) - 2,
            eos_token_id=len(tokenizer) - 1,
            pad_token_id=len(tokenizer) - 1,
            **sizes,
        )

    text_encoder = CLIPTextModel(text_config(**cfg["text"]))
    extra = {}
    if "text_2" in cfg:  # SDXL's second encoder: its projection gives the pooled embedding
        extra = dict(
            tokenizer_2=byte_level_tokenizer(),
            text_encoder_2=CLIPTextModelWithProjection(text_config(**cfg["text_2"])),
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return dict(
        unet=unet,
        vae=vae,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        scheduler=scheduler,
        **extra,
    )


PIPELINES = {"tiny_sdxl": "StableDiffusionXLPipeline", "sdxl": "StableDiffusionXLPipeline"}


def save_sd_folder(
    path: Path,
    size: str = "tiny",
    prediction_type: str = "epsilon",
    seed: int = 0,
    zero_unet: bool = False,
) -> Path:
    """Write a diffusers Stable Diffusion folder (unet, vae, text_encoder, tokenizer, scheduler).

    `zero_unet` zeroes the UNet's last convolution, so it predicts exactly zero: inversion followed
    by sampling is then an exact round trip for epsilon prediction.
    """
    comps = build_components(size, prediction_type, seed)
    if zero_unet:
        with torch.no_grad():
            comps["unet"].conv_out.weight.zero_()
            comps["unet"].conv_out.bias.zero_()
    for name, comp in comps.items():
        comp.save_pretrained(path / name)
    index = {"_class_name": PIPELINES.get(size, "StableDiffusionPipeline")}
    (path / "model_index.json").write_text(json.dumps(index))
    return path


def save_ip_adapter(
    path: Path, unet_folder: Path, plus: bool = True, queries: int = 16, seed: int = 0
) -> Path:
    """Write a random IP-Adapter for the UNet in `unet_folder` in the published layout: one
    weights file (`image_proj.*`: the Plus Resampler or the plain projection; `ip_adapter.N.*`:
    to_k_ip/to_v_ip of the N-th attention processor, cross-attention only) and `image_encoder/`
    (a tiny CLIPVisionModelWithProjection). Returns the weights file."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    unet = UNet2DConditionModel.from_pretrained(unet_folder)
    cross = unet.config.cross_attention_dim
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=24,
    )
    torch.manual_seed(seed)
    CLIPVisionModelWithProjection(vision).save_pretrained(path / "image_encoder")
    tensors: dict[str, torch.Tensor] = {}
    if plus:  # IP-Adapter Plus's Resampler, 4 layers of 64-dim heads (diffusers infers them)
        dim, ff = 64, 256
        tensors["latents"] = rand(1, queries, dim)
        tensors["proj_in.weight"], tensors["proj_in.bias"] = rand(dim, 32), torch.zeros(dim)
        tensors["proj_out.weight"], tensors["proj_out.bias"] = rand(cross, dim), torch.zeros(cross)
        tensors["norm_out.weight"], tensors["norm_out.bias"] = torch.ones(cross), torch.zeros(cross)
        for i in range(4):
            for norm in ("0.norm1", "0.norm2", "1.0"):
                tensors[f"layers.{i}.{norm}.weight"] = torch.ones(dim)
                tensors[f"layers.{i}.{norm}.bias"] = torch.zeros(dim)
            tensors[f"layers.{i}.0.to_q.weight"] = rand(dim, dim)
            tensors[f"layers.{i}.0.to_kv.weight"] = rand(2 * dim, dim)
            tensors[f"layers.{i}.0.to_out.weight"] = rand(dim, dim)
            tensors[f"layers.{i}.1.1.weight"] = rand(ff, dim)
            tensors[f"layers.{i}.1.3.weight"] = rand(dim, ff)
    else:  # the plain IP-Adapter: 4 tokens from the image embedding
        tensors["proj.weight"], tensors["proj.bias"] = rand(4 * cross, 24), torch.zeros(4 * cross)
        tensors["norm.weight"], tensors["norm.bias"] = torch.ones(cross), torch.zeros(cross)
    weights = {f"image_proj.{k}": v for k, v in tensors.items()}
    for n, name in enumerate(unet.attn_processors):
        if ".attn2." in name:
            attn = unet.get_submodule(name.removesuffix(".processor"))
            hidden = attn.to_k.out_features
            weights[f"ip_adapter.{n}.to_k_ip.weight"] = rand(hidden, cross)
            weights[f"ip_adapter.{n}.to_v_ip.weight"] = rand(hidden, cross)
    path.mkdir(parents=True, exist_ok=True)
    out = path / ("ip-adapter-plus.safetensors" if plus else "ip-adapter.safetensors")
    save_file({k: v.contiguous() for k, v in weights.items()}, out)
    return out
