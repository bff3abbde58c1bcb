"""What `reference_run.py` runs of the authors' code, stage by stage (imported after its stand-ins
are installed, with the reference's folder on sys.path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def _pipe(model: str, steps: int):
    """The reference's pipeline as `DragonPipeline.__init__` assembles it, on the CPU in fp32,
    without its hub-only image encoder and adapter (the image prompt is a stage of its own)."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from safetensors.torch import load_file
    from src.models.dragondiff import DragonPipeline
    from src.models.Sampler import Sampler
    from src.unet.unet_2d_condition import DragonUNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    # its own from_pretrained needs diffusers 0.18's internals: the same config and weights, loaded
    # the plain way
    config = DragonUNet2DConditionModel.load_config(model, subfolder="unet")
    unet = DragonUNet2DConditionModel.from_config(config)
    weights = Path(model) / "unet" / "diffusion_pytorch_model.safetensors"
    missing, unexpected = unet.load_state_dict(load_file(weights), strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"the reference's UNet does not take these weights: {missing[:3]} {unexpected[:3]}"
        )
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    pipe = Sampler(
        vae=AutoencoderKL.from_pretrained(model, subfolder="vae"),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_pretrained(model, subfolder="scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    editor = DragonPipeline.__new__(DragonPipeline)
    editor.pipe, editor.NUM_DDIM_STEPS, editor.precision = pipe, steps, torch.float32
    return editor


def _image(path: str) -> torch.Tensor:
    """As `run_move` reads its image: PILToTensor / 255, centred, in [-1, 1]."""
    arr = np.asarray(Image.open(path).convert("RGB"))
    return (torch.from_numpy(arr.transpose(2, 0, 1).copy()) / 255.0 - 0.5)[None] * 2


@torch.no_grad()
def invert(job: dict) -> dict[str, torch.Tensor]:
    """The text embedding, the image's latent, one UNet call and DDIM inversion's trajectory."""
    editor = _pipe(job["model"], job["steps"])
    pipe = editor.pipe
    ids = pipe.tokenizer(
        [job["prompt"]],
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    context = pipe.text_encoder(ids)[0]
    latent = editor.image2latent(_image(job["image"]))
    pipe.scheduler.set_timesteps(job["steps"])
    t = pipe.scheduler.timesteps[-1]
    unet_out = pipe.unet(latent.unsqueeze(2), t, encoder_hidden_states=context, iter_cur=0)
    trajectory = editor.ddim_inv(latent=latent, prompt=job["prompt"])
    return {
        "context": context,
        "latent": latent,
        "unet_first_inversion_call": unet_out["sample"].squeeze(2),
        "trajectory": torch.cat([z.squeeze(2) for z in trajectory]),
    }


STAGES = {"invert": invert}


def _reference_model(job: dict):
    """`DragonModels` as the demo builds it, less its fp16, dlib and hub parts: its pipeline on the
    CPU in fp32, the estimator (the UNet that returns decoder features), and its attention
    processors (the memory bank; the image prompt at scale 0 with random adapter weights)."""
    from types import SimpleNamespace

    from src.demo.model import DragonModels
    from src.unet.estimator import MyUNet2DConditionModel

    editor = _pipe(job["model"], job["steps"])
    editor.pipe.estimator = MyUNet2DConditionModel.from_pretrained(job["model"], subfolder="unet")
    # Two-image modes concatenate both images' tokens but split off only `num_tokens` of them as
    # image tokens, so the source's would reach the text K/V (a bug of the reference's, fixed in
    # dragonctl): counting both images' tokens keeps every image token out of the text K/V.
    editor.num_tokens = 4 * job.get("images", 1)
    editor.image_encoder = SimpleNamespace(config=SimpleNamespace(hidden_size=32))
    editor.image_proj_model = editor.init_proj(torch.float32)
    unet = editor.pipe.unet

    def random_adapter(*_args, **_kwargs):  # what `load_adapter` reads: its own modules' state
        procs = torch.nn.ModuleList(unet.attn_processors.values())
        proj = editor.image_proj_model.state_dict()
        return {"image_proj": proj, "ip_adapter": procs.state_dict()}

    load, torch.load = torch.load, random_adapter
    try:
        editor.load_adapter("random", 0.0)
    finally:
        torch.load = load
    tokens = unet.config.cross_attention_dim
    editor.get_image_embeds = lambda _img: (torch.zeros(1, 4, tokens), torch.zeros(1, 4, tokens))
    model = DragonModels.__new__(DragonModels)
    model.editor, model.ip_scale, model.precision = editor, 0.0, torch.float32
    model.up_ft_index, model.up_scale, model.device = [1, 2], 2, "cuda"
    return model


def _edited(job: dict, run) -> dict[str, torch.Tensor]:
    """Runs `run(model, image, mask)` (a `run_*` of the demo's model) and returns the latent its
    sampler started from and the edited latent (before decoding)."""
    model = _reference_model(job)
    pipe, seen = model.editor.pipe, {}
    edit = pipe.edit

    def keep_edit(*args, **kwargs):
        kwargs["alg"] = job.get("alg", "D+")  # the demo leaves it at DiffEditor's ("D+")
        seen["latent_in"] = kwargs["latent"].clone()
        seen["edited"] = edit(*args, **kwargs)
        return seen["edited"]

    pipe.edit = keep_edit
    for name in ("guidance_move", "guidance_drag", "guidance_appearance", "guidance_paste"):
        energy = getattr(pipe, name)

        def keep_first(*args, _energy=energy, **kwargs):  # the first guided step's gradient
            out = _energy(*args, **kwargs)
            seen.setdefault("first_guidance", out.detach().clone())
            return out

        setattr(pipe, name, keep_first)
    image = np.asarray(Image.open(job["image"]).convert("RGB"))
    mask = np.asarray(Image.open(job["mask"]).convert("RGB"))
    run(model, image, mask)
    return seen


def move(job: dict) -> dict[str, torch.Tensor]:
    """`run_move` as the demo calls it (the first point pair gives the offset)."""
    (hx, hy), (tx, ty) = job["points"]
    return _edited(
        job,
        lambda model, image, mask: model.run_move(
            image,
            mask,
            None,
            job["prompt"],
            job.get("resize_scale", 1.0),
            job["w_edit"],
            job["w_content"],
            job["w_contrast"],
            job["w_inpaint"],
            job["seed"],
            [[hx, hy], [tx, ty]],
            job["guidance_scale"],
            job["energy_scale"],
            job["max_resolution"],
            job["sde_strength"],
            0.0,
        ),
    )


def drag(job: dict) -> dict[str, torch.Tensor]:
    """`run_drag` as the demo calls it (mask: the editable region)."""
    points = [list(p) for pair in job["points"] for p in pair]
    return _edited(
        job,
        lambda model, image, mask: model.run_drag(
            image,
            mask,
            job["prompt"],
            job["w_edit"],
            job["w_content"],
            job["w_inpaint"],
            job["seed"],
            points,
            job["guidance_scale"],
            job["energy_scale"],
            job["max_resolution"],
            job["sde_strength"],
            0.0,
        ),
    )


def appearance(job: dict) -> dict[str, torch.Tensor]:
    """`run_appearance` as the demo calls it (mask: the object to restyle; the reference image
    and its object's mask)."""
    ref_image = np.asarray(Image.open(job["reference"]).convert("RGB"))
    ref_mask = np.asarray(Image.open(job["reference_mask"]).convert("RGB"))
    return _edited(
        {**job, "images": 2},
        lambda model, image, mask: model.run_appearance(
            image,
            mask,
            ref_image,
            ref_mask,
            job["prompt"],
            job["prompt"],
            job["w_edit"],
            job["w_content"],
            job["seed"],
            job["guidance_scale"],
            job["energy_scale"],
            job["max_resolution"],
            job["sde_strength"],
            0.0,
        ),
    )


STAGES.update(move=move, drag=drag, appearance=appearance)
