"""DiffEditor's image prompt: an IP-Adapter's image tokens, read by every cross-attention layer.

Loading goes through diffusers' `load_ip_adapter` (a weights file, the folder holding it, or a
hub repository's file, with its CLIP image encoder). The adapter's image projection and its
per-layer K/V projections are then kept here and the UNet is put back as it was, so a model
edits the same whether or not an adapter was ever loaded into it.

During an edit `attention.ImagePromptControl` installs a processor on every cross-attention
layer that reads these K/V projections (see there).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dragonctl.errors import ModelError
from dragonctl.models import has_accelerate

FIELD = "guidance.image_prompt"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
PICKLE_SUFFIXES = (".bin",)
PROMPT_SIDE = 256  # the reference squashes the prompt image to 256² before CLIP's processor


@dataclass
class ImagePromptAdapter:
    """An IP-Adapter loaded for one model: image → tokens, and each layer's K/V projections."""

    location: str
    image_encoder: torch.nn.Module  # transformers' CLIPVisionModelWithProjection
    feature_extractor: object  # transformers' CLIPImageProcessor
    projection: torch.nn.Module  # diffusers' ImageProjection or IPAdapterPlusImageProjection
    hidden_states: bool  # the projection reads the encoder's penultimate hidden states (Plus)
    key_value: dict[str, tuple[torch.nn.Module, torch.nn.Module]]  # attn2 processor → to_k/v_ip

    @torch.no_grad()
    def tokens(self, image: np.ndarray, cfg: bool) -> torch.Tensor:
        """The image's tokens (1×T×C), preceded with CFG by the unconditional row's: a zero image
        through the same encoder for Plus adapters, zero embeddings for plain ones (as diffusers'
        pipelines and the reference do)."""
        from PIL import Image

        enc = self.image_encoder
        square = Image.fromarray(image).resize((PROMPT_SIDE, PROMPT_SIDE), Image.BICUBIC)
        pixels = self.feature_extractor(square, return_tensors="pt").pixel_values
        pixels = pixels.to(enc.device, enc.dtype)
        if self.hidden_states:
            embeds = enc(pixels, output_hidden_states=True).hidden_states[-2]
            uncond = enc(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
        else:
            embeds = enc(pixels).image_embeds
            uncond = torch.zeros_like(embeds)
        rows = torch.cat([uncond, embeds]) if cfg else embeds
        return self.projection(rows)


def load_image_prompt(
    unet: torch.nn.Module,
    adapter: str,
    encoder: str | None = None,
    local_files_only: bool = False,
    allow_pickle: bool = False,
) -> ImagePromptAdapter:
    """Load an IP-Adapter for `unet` through diffusers, leaving the UNet as it was.

    Args:
        unet: the model bundle's UNet (its dtype and device are the adapter's).
        adapter: a weights file, a folder holding exactly one, or a hub location
            `owner/name/path/in/repo/file.safetensors`.
        encoder: the CLIP image encoder's folder or hub location (`owner/name[/subfolder]`);
            None: the `image_encoder` folder beside the adapter's weights (diffusers' default).
        local_files_only: never reach the hub.
        allow_pickle: accept `.bin` weights (pickles run code when loaded).
    """
    with _quiet_loaders():  # importing the loader touches CLIPImageProcessor: a warning
        from diffusers import DiffusionPipeline
        from diffusers.loaders import IPAdapterMixin

    repo, subfolder, weight_name = _weights_location(adapter, allow_pickle)
    image_encoder = None
    if encoder is not None:
        with _quiet_loaders():
            image_encoder = _load_encoder(encoder, unet, local_files_only)

    class _AdapterHost(DiffusionPipeline, IPAdapterMixin):
        """The smallest pipeline `load_ip_adapter` works on: the UNet and the image encoder."""

        def __init__(self, unet, image_encoder=None, feature_extractor=None) -> None:
            super().__init__()
            self.register_modules(
                unet=unet, image_encoder=image_encoder, feature_extractor=feature_extractor
            )

    host = _AdapterHost(unet, image_encoder)
    saved_processors = dict(unet.attn_processors)
    saved_proj, saved_type = unet.encoder_hid_proj, unet.config.encoder_hid_dim_type
    try:
        with _quiet_loaders():
            host.load_ip_adapter(
                repo,
                subfolder=subfolder,
                weight_name=weight_name,
                local_files_only=local_files_only or None,
                low_cpu_mem_usage=has_accelerate(),
            )
        key_value = {
            name: (proc.to_k_ip[0], proc.to_v_ip[0])
            for name, proc in unet.attn_processors.items()
            if hasattr(proc, "to_k_ip")
        }
        projection = unet.encoder_hid_proj.image_projection_layers[0]
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{FIELD}.adapter: cannot load {adapter}: {first}") from None
    finally:  # the UNet as it was: projection and config, then processors (Plus's have some)
        unet.encoder_hid_proj = saved_proj
        unet.config.encoder_hid_dim_type = saved_type
        unet.set_attn_processor(saved_processors)
    if host.image_encoder is None:
        raise ModelError(f"{FIELD}.encoder: no image encoder found for {adapter}; name one")
    return _frozen_adapter(adapter, host, projection, key_value)


def _frozen_adapter(adapter: str, host, projection, key_value) -> ImagePromptAdapter:
    from diffusers.models.embeddings import ImageProjection

    modules = [host.image_encoder, projection, *(m for kv in key_value.values() for m in kv)]
    for m in modules:
        m.eval().requires_grad_(False)
    return ImagePromptAdapter(
        location=adapter,
        image_encoder=host.image_encoder,
        feature_extractor=host.feature_extractor,
        projection=projection,
        hidden_states=not isinstance(projection, ImageProjection),
        key_value=key_value,
    )


@contextmanager
def _quiet_loaders() -> Iterator[None]:
    """diffusers' and transformers' loading chatter off (dtype casts, optional backends): the
    CLI's output stays one line per spec."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])
        if bars:
            transformers_logging.enable_progress_bar()


def _weights_location(adapter: str, allow_pickle: bool) -> tuple[str, str, str]:
    """(repository or folder, subfolder, weights file name) for `load_ip_adapter`."""
    path = Path(adapter)
    if path.is_dir():
        found = sorted(
            p.name for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES
        )
        if not found:
            raise ModelError(
                f"{FIELD}.adapter: no IP-Adapter weights (.safetensors or .bin) in folder {path}"
            )
        if len(found) > 1:
            raise ModelError(
                f"{FIELD}.adapter: folder {path} holds several weights files "
                f"({', '.join(found)}); name the file"
            )
        folder, name = str(path), found[0]
    elif path.is_file():
        folder, name = str(path.parent), path.name
    else:  # a hub location: owner/name/path/in/repo/file
        parts = adapter.split("/")
        folder, name = "/".join(parts[:2]), parts[-1]
        sub = "/".join(parts[2:-1])
        _check_suffix(name, allow_pickle)
        return folder, sub, name
    _check_suffix(name, allow_pickle)
    return folder, "", name


def _check_suffix(name: str, allow_pickle: bool) -> None:
    suffix = Path(name).suffix
    if suffix not in WEIGHT_SUFFIXES:
        raise ModelError(
            f"{FIELD}.adapter: {name} is not IP-Adapter weights (.safetensors or .bin)"
        )
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelError(
            f"{FIELD}.adapter: {name} is a pickle, which can run code when loaded; convert it to "
            ".safetensors or pass --allow-pickle if you trust it"
        )


def _load_encoder(encoder: str, unet: torch.nn.Module, local_files_only: bool) -> torch.nn.Module:
    from transformers import CLIPVisionModelWithProjection

    path = Path(encoder)
    if path.exists():
        source, sub = str(path), ""
    else:
        parts = encoder.split("/")
        source, sub = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        model = CLIPVisionModelWithProjection.from_pretrained(
            source, subfolder=sub, dtype=unet.dtype, local_files_only=local_files_only
        )
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{FIELD}.encoder: cannot load {encoder}: {first}") from None
    return model.to(unet.device)
