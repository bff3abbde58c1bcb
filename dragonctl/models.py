"""The model bundle: everything the method needs from a diffusion model, loaded once.

Sources: `shapes` (the embedded model), a hub id, a local diffusers folder, or a single
`.safetensors` checkpoint. Stable Diffusion folders load component by component (UNet, VAE, CLIP,
scheduler); the shapes folder has a UNet, a scheduler and a null prompt, with a lossless latent.
The method's needs are found by structure, never by SD 1.5's sizes: decoder self-attention layers
(the memory bank) and up_blocks 1 and 2 (the feature stages).
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dragonctl.errors import ModelError
from dragonctl.families import (
    SD15_MODEL,
    SHAPES_MODEL,
    family_for_model,
    family_of_configs,
    has_own_vae,
    is_shapes_folder,
)
from dragonctl.features import feature_blocks, unsupported_embeddings

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


@dataclass
class ModelBundle:
    name: str
    family: str
    unet: torch.nn.Module
    scheduler_config: dict
    device: torch.device
    dtype: torch.dtype
    latent_factor: int  # pixels per latent cell (the pipeline's vae_scale_factor)
    encode_image: Callable[[torch.Tensor], torch.Tensor]  # B×3×H×W in [-1, 1] → latent
    decode_latent: Callable[[torch.Tensor], torch.Tensor]  # latent → B×3×H×W in [-1, 1]
    encode_prompt: Callable[[list[str]], torch.Tensor]  # prompts → B×T×C context
    weights_hash: str
    # a context → the UNet's (encoder_hidden_states, added_cond_kwargs) at a latent size; SDXL's
    # contexts carry their pooled embedding as one more token (None: the context as it is)
    condition: Callable | None = None
    zero_unconditional: bool = False  # CFG's unconditional row is zeros (SDXL's pipelines' way)
    decoder_self_attention: list[str] = field(default_factory=list)  # processor names
    revision: str = ""  # the hub snapshot's commit, for hub models
    weights_file: Path | None = None  # the checkpoint or UNet weights file, for A1111's hash

    @functools.cached_property
    def model_hash(self) -> str:
        """AUTOMATIC1111's short model hash: SHA-256 of the weights file, 10 hex digits ("" when
        there is no local file)."""
        if self.weights_file is None or not self.weights_file.is_file():
            return ""
        h = hashlib.sha256()
        with self.weights_file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
        return h.hexdigest()[:10]

    def unconditional(self) -> torch.Tensor:
        """The context of CFG's unconditional row."""
        ctx = self.encode_prompt([""])
        return torch.zeros_like(ctx) if self.zero_unconditional else ctx

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def size_multiple(self) -> int:
        """Working sides must be multiples of this: one latent cell per level of downsampling."""
        levels = len(self.unet.config.block_out_channels) - 1
        return self.latent_factor * 2**levels

    @property
    def identity(self) -> dict:
        """What tells this model's results apart: in the cache key and every output's metadata."""
        return {
            "model": self.name,
            "family": self.family,
            "weights_hash": self.weights_hash,
            "revision": self.revision,
            "prediction_type": self.prediction_type,
        }


# ---------------------------------------------------------------------------------------------


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ModelError(
            f"--device: unknown device {device!r} (use auto, cpu, cuda, cuda:N or mps)"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"--device {device}: CUDA is not available on this machine")
    return dev


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ModelError(f"--dtype: unknown dtype {dtype!r} (use auto, fp32, fp16 or bf16)")
    return table[dtype]


def sampled_hash(paths: list[Path]) -> str:
    """A fast identity for weight files: size and the first and last MiB of each (no full hash)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with p.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return h.hexdigest()[:16]


def find_decoder_self_attention(unet: torch.nn.Module) -> list[str]:
    """Names of the self-attention processors in the decoder (up_blocks), found by structure."""
    names = []
    for name in unet.attn_processors:
        if name.startswith("up_blocks.") and ".attn1." in name:
            names.append(name)
    return names


def check_structure(unet: torch.nn.Module, name: str) -> list[str]:
    ups = getattr(unet, "up_blocks", None)
    if ups is None or len(feature_blocks(unet)) < 2:
        raise ModelError(
            f"model {name}: the method needs a UNet decoder with at least two cross-attention "
            "blocks (the guidance features come from the first two)"
        )
    if extras := unsupported_embeddings(unet):
        raise ModelError(
            f"model {name}: UNets with {', '.join(extras)} are not supported "
            "(the guidance features "
            "come from a truncated forward that has no such inputs)"
        )
    attn = find_decoder_self_attention(unet)
    if not attn:
        raise ModelError(
            f"model {name}: the UNet decoder has no self-attention layers, "
            "so there is no memory bank"
        )
    return attn


def load_bundle(
    model: str = SD15_MODEL,
    device: str = "auto",
    dtype: str = "auto",
    local_files_only: bool = False,
    allow_pickle: bool = False,
) -> ModelBundle:
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    if model == SHAPES_MODEL:
        from dragonctl.shapes.model import WEIGHTS_DIR

        return _load_shapes(WEIGHTS_DIR, SHAPES_MODEL, dev, dt)
    path = Path(model).expanduser()
    if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelError(
            f"model {model}: pickle checkpoints ({path.suffix}) can run code when loaded; "
            "convert it to .safetensors or pass --allow-pickle if you trust it"
        )
    if path.exists():
        if is_shapes_folder(path):
            return _load_shapes(path, str(path), dev, dt)
        if path.is_file():
            return _load_single_file(path, dev, dt, local_files_only)
        return _load_sd(str(path), dev, dt, local_files_only=True, files=path)
    if model.startswith((".", "/", "~")) or path.suffix:
        raise ModelError(f"model {model}: no such file or folder")
    return _load_sd(model, dev, dt, local_files_only=local_files_only, files=None)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _hub_error(model: str, err: Exception) -> ModelError:
    why = (
        "offline (HF_HUB_OFFLINE or --local-files-only)"
        if _offline()
        else "no local copy and the hub could not be reached"
    )
    how = (
        f"fetch it once while online (`hf download {model}`), "
        f"or give a local diffusers folder or .safetensors file with --model"
    )
    return ModelError(
        f"model {model} is not available offline: {why} ({type(err).__name__}); {how}; "
        f"`--model shapes` runs offline with the embedded model"
    )


def has_accelerate() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def _load_sd(
    source: str, dev: torch.device, dt: torch.dtype, local_files_only: bool, files: Path | None
) -> ModelBundle:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    def load(local: bool) -> dict:
        kw = dict(local_files_only=local)
        # low_cpu_mem_usage needs `accelerate`; asking for it without prints a warning every run
        lean = dict(low_cpu_mem_usage=has_accelerate())
        unet = UNet2DConditionModel.from_pretrained(
            source, subfolder="unet", dtype=dt, **kw, **lean
        )
        parts = dict(
            unet=unet,
            vae=AutoencoderKL.from_pretrained(source, subfolder="vae", dtype=dt, **kw, **lean),
            tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw),
            text_encoder=CLIPTextModel.from_pretrained(
                source, subfolder="text_encoder", dtype=dt, **kw
            ),
            scheduler=DDIMScheduler.from_pretrained(source, subfolder="scheduler", **kw),
        )
        if unet.config.get("addition_embed_type") == "text_time":  # SDXL's second encoder
            parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(
                source, subfolder="tokenizer_2", **kw
            )
            parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
                source, subfolder="text_encoder_2", dtype=dt, **kw
            )
        return parts

    try:
        try:  # a copy in the local hub cache first: no network round trips when it is there
            parts = load(True)
        except (OSError, ValueError):
            if local_files_only or _offline() or files is not None:
                raise
            parts = load(False)
    except (OSError, ValueError) as e:
        if files is None:
            raise _hub_error(source, e) from None
        raise ModelError(
            f"model {source}: not a diffusers Stable Diffusion folder ({str(e).splitlines()[0]})"
        ) from None
    weights_hash, revision, weights_file = sd_weights_identity(source, files)
    scheduler = parts.pop("scheduler")
    bundle = sd_bundle(
        source,
        sched_config=scheduler.config,
        dev=dev,
        dt=dt,
        weights_hash=weights_hash,
        weights_file=weights_file,
        **parts,
    )
    bundle.revision = revision  # a new revision must not reuse the old one's trajectories
    return bundle


def sd_weights_identity(source: str, folder: Path | None) -> tuple[str, str, Path | None]:
    """(weights hash, hub revision or "", the UNet weights file) of an SD folder or of a hub
    id's cached copy."""
    snapshot = folder or _hub_snapshot(source)
    weight_files = sorted(snapshot.glob("unet/*.safetensors")) if snapshot else []
    weights_hash = sampled_hash(weight_files) if weight_files else f"hub:{source}"
    revision = snapshot.name if folder is None and snapshot is not None else ""
    return weights_hash, revision, (weight_files[0] if weight_files else None)


def weights_fingerprint(model: str) -> str:
    """The weights hash a bundle of `model` will have, without loading it (resume checks)."""
    if model == SHAPES_MODEL:
        from dragonctl.shapes.model import WEIGHTS_DIR

        return sampled_hash(shapes_weight_files(WEIGHTS_DIR))
    path = Path(model).expanduser()
    if path.is_file():
        return sampled_hash([path])
    if is_shapes_folder(path):
        return sampled_hash(shapes_weight_files(path))
    return sd_weights_identity(model, path if path.is_dir() else None)[0]


def _hub_snapshot(repo_id: str) -> Path | None:
    """The hub cache's snapshot folder (named by its commit) that a hub id loads from."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "unet/config.json")
    return Path(found).parent.parent if isinstance(found, str) else None


def _load_single_file(
    path: Path, dev: torch.device, dt: torch.dtype, local_files_only: bool
) -> ModelBundle:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from dragonctl.families import family_for_model

    sdxl = family_for_model(str(path)) == "sdxl"
    pipeline_class = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    extra = {} if sdxl else dict(safety_checker=None)
    try:
        pipe = pipeline_class.from_single_file(
            str(path), dtype=dt, local_files_only=local_files_only or _offline(), **extra
        )
    except Exception as e:  # diffusers raises many types here; all mean "cannot use this file"
        raise ModelError(
            f"model {path}: cannot load as a single-file SD checkpoint: {str(e).splitlines()[0]}"
        ) from None
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    second = {}
    if sdxl:
        second = dict(tokenizer_2=pipe.tokenizer_2, text_encoder_2=pipe.text_encoder_2)
    return sd_bundle(
        str(path),
        pipe.unet,
        pipe.vae,
        pipe.tokenizer,
        pipe.text_encoder,
        dict(sched.config),
        dev,
        dt,
        sampled_hash([path]),
        weights_file=path,
        **second,
    )


def sd_bundle(
    name: str,
    unet,
    vae,
    tokenizer,
    text_encoder,
    sched_config: dict,
    dev: torch.device,
    dt: torch.dtype,
    weights_hash: str,
    weights_file: Path | None = None,
    tokenizer_2=None,
    text_encoder_2=None,
) -> ModelBundle:
    """A bundle from loaded SD 1.x, 2.x or SDXL components (also used with components built in
    code); SDXL is the one with a second text encoder."""
    attn = check_structure(unet, name)
    unet, vae = (m.to(dev).eval().requires_grad_(False) for m in (unet, vae))
    pairs = [(tokenizer, text_encoder)] + (
        [(tokenizer_2, text_encoder_2)] if text_encoder_2 is not None else []
    )
    encode_prompt = _prompt_encoder(pairs, dev)
    latent_factor, encode_image, decode_latent = vae_codec(vae, dev, dt)
    sdxl = text_encoder_2 is not None
    cfg = unet.config
    pooled_dim = (cfg.get("projection_class_embeddings_input_dim") or 0) - 6 * (
        cfg.get("addition_time_embed_dim") or 0
    )
    text_config = text_encoder.config.to_dict()
    family = family_of_configs(
        {"unet/config.json": dict(cfg), "text_encoder/config.json": text_config}
    )
    return ModelBundle(
        name=name,
        family=family,
        unet=unet,
        scheduler_config=dict(sched_config),
        device=dev,
        dtype=dt,
        latent_factor=latent_factor,
        encode_image=encode_image,
        decode_latent=decode_latent,
        encode_prompt=encode_prompt,
        weights_hash=weights_hash,
        decoder_self_attention=attn,
        weights_file=weights_file,
        condition=(
            (lambda ctx, hw: sdxl_condition(ctx, hw, latent_factor, pooled_dim)) if sdxl else None
        ),
        zero_unconditional=sdxl,
    )


def _prompt_encoder(pairs: list, dev: torch.device) -> Callable[[list[str]], torch.Tensor]:
    """Prompts → context with the (tokenizer, text encoder) pairs: SD's one, or SDXL's two."""
    encoders = [enc.to(dev).eval().requires_grad_(False) for _tok, enc in pairs]

    def ids(tok, prompts: list[str]) -> torch.Tensor:
        return tok(
            prompts,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(dev)

    def encode_prompt(prompts: list[str]) -> torch.Tensor:
        if len(pairs) == 1:
            return encoders[0](ids(pairs[0][0], prompts))[0]
        return sdxl_context(encoders, [ids(tok, prompts) for tok, _enc in pairs])

    return encode_prompt


# ---------------------------------------------------------------------------------------------
# SDXL's conditioning: both encoders' penultimate hidden states side by side, and added conditions
# (the second encoder's pooled embedding; original size, crop corner and target size), which
# travel with the context as one extra token so every batch of contexts stays one tensor


def sdxl_context(encoders: list, token_ids: list[torch.Tensor]) -> torch.Tensor:
    """B×(T+1)×C: [penultimate hidden states of both encoders ; the pooled embedding, padded]."""
    hidden, pooled = [], None
    for enc, tokens in zip(encoders, token_ids):
        out = enc(tokens, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder's projection (CLIPTextModelWithProjection.text_embeds)
    ctx = torch.cat(hidden, dim=-1)
    assert pooled is not None and pooled.shape[-1] <= ctx.shape[-1]
    extra = torch.zeros_like(ctx[:, :1])
    extra[:, 0, : pooled.shape[-1]] = pooled
    return torch.cat([ctx, extra], dim=1)


def sdxl_condition(
    context: torch.Tensor, latent_hw: tuple[int, int], latent_factor: int, pooled_dim: int
) -> tuple[torch.Tensor, dict]:
    """The UNet's inputs from a packed SDXL context at a latent size: the hidden states, and
    `text_embeds` with `time_ids` = (original size, crop top-left, target size) = (H, W, 0, 0,
    H, W) of the working image, as diffusers' pipelines build them for an uncropped image."""
    h, w = (int(v) * latent_factor for v in latent_hw)
    sizes = torch.tensor([h, w, 0, 0, h, w], device=context.device, dtype=context.dtype)
    added = {"text_embeds": context[:, -1, :pooled_dim], "time_ids": sizes.expand(len(context), 6)}
    return context[:, :-1], added


def shapes_weight_files(folder: Path) -> list[Path]:
    """The weights a shapes folder's results depend on: its UNet's, and its VAE's if it has one."""
    files = [folder / "unet" / "diffusion_pytorch_model.safetensors"]
    vae = folder / "vae" / "diffusion_pytorch_model.safetensors"
    return files + ([vae] if vae.is_file() else [])


def vae_codec(vae, dev: torch.device, dt: torch.dtype) -> tuple[int, Callable, Callable]:
    """(pixels per latent cell, encode, decode) of an `AutoencoderKL`, in the scaled latent."""
    # SDXL's VAE overflows in fp16 (its config says so): it runs in fp32, as diffusers upcasts it
    vae_dt = torch.float32 if vae.config.get("force_upcast") and dt == torch.float16 else dt
    # moved and cast only where needed: diffusers warns on every `to(dtype=...)`, even a no-op one
    vae = vae.to(dev) if vae.dtype == vae_dt else vae.to(dev, dtype=vae_dt)
    vae = vae.eval().requires_grad_(False)
    scaling = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0

    def encode_image(x: torch.Tensor) -> torch.Tensor:
        # The latent distribution's mean, as the reference does: deterministic, no sampling noise.
        return (vae.encode(x.to(dev, vae_dt)).latent_dist.mean - shift) * scaling

    def decode_latent(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z.to(dev, vae_dt) / scaling + shift).sample

    return 2 ** (len(vae.config.block_out_channels) - 1), encode_image, decode_latent


def _load_shapes(folder: Path, name: str, dev: torch.device, dt: torch.dtype) -> ModelBundle:
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file

    from dragonctl.shapes.model import LATENT_FACTOR, PixelShuffleCodec

    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    if not weights.exists():
        raise ModelError(
            f"model {name}: no weights at {weights}; "
            "train them with `python -m dragonctl.shapes.train`"
        )
    unet = UNet2DConditionModel.from_pretrained(
        folder / "unet", dtype=dt, local_files_only=True, low_cpu_mem_usage=has_accelerate()
    )
    sched = DDIMScheduler.from_pretrained(folder / "scheduler", local_files_only=True)
    null = load_file(folder / "null_prompt.safetensors")["embedding"].to(dev, dt)
    attn = check_structure(unet, name)
    unet = unet.to(dev).eval().requires_grad_(False)
    if has_own_vae(folder):
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(
            folder / "vae", local_files_only=True, low_cpu_mem_usage=has_accelerate()
        )
        latent_factor, encode_image, decode_latent = vae_codec(vae, dev, dt)
    else:  # the lossless pixel-unshuffle latent
        codec, latent_factor = PixelShuffleCodec(LATENT_FACTOR), LATENT_FACTOR

        def encode_image(x: torch.Tensor) -> torch.Tensor:
            return codec.encode(x.to(dev, dt))

        def decode_latent(z: torch.Tensor) -> torch.Tensor:
            return codec.decode(z.to(dev, dt))

    def encode_prompt(prompts: list[str]) -> torch.Tensor:
        return null.expand(len(prompts), -1, -1)

    return ModelBundle(
        name=name,
        family=family_for_model(str(folder)),
        unet=unet,
        scheduler_config=dict(sched.config),
        device=dev,
        dtype=dt,
        latent_factor=latent_factor,
        encode_image=encode_image,
        decode_latent=decode_latent,
        encode_prompt=encode_prompt,
        weights_hash=sampled_hash(shapes_weight_files(folder)),
        decoder_self_attention=attn,
        weights_file=weights,
    )
