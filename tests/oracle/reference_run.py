"""Run the authors' DragonDiffusion code (`../shared/reference/DragonDiffusion`, read-only) on the
CPU with small local weights, and save what it computed, for `tests/test_oracle.py` to compare.

    python tests/oracle/reference_run.py REFERENCE_DIR JOB.json OUT.safetensors

Its files are used as they are: this script adapts them from outside, at import time. Stand-ins:
`basicsr` (img2tensor, tensor2img), `xformers.ops` (scaled_dot_product_attention),
`pytorch_lightning.seed_everything`, `dlib` and `scipy` (face drags stay out of scope) and
torchvision's `PILToTensor`; aliases for the diffusers modules that moved since 0.18
(`cross_attention`, `unet_2d_condition`, `modeling_utils._get_model_file`); 'cuda' read as the
CPU. It runs in a process of its own because the stand-ins patch torch for the whole process.

JOB.json: {"model": SD folder, "stage": "invert", "image": PNG, "prompt": str, "steps": int}
"""

from __future__ import annotations

import json
import random
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def _img2tensor(imgs, bgr2rgb=True, float32=True):
    def one(img):
        if img.shape[2] == 3 and bgr2rgb:
            img = img[:, :, ::-1]
        t = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        return t.float() if float32 else t

    return [one(i) for i in imgs] if isinstance(imgs, list) else one(imgs)


def _tensor2img(tensor, rgb2bgr=True, out_type=np.uint8, min_max=(0, 1)):
    t = tensor.squeeze(0).float().detach().cpu().clamp_(*min_max)
    t = (t - min_max[0]) / (min_max[1] - min_max[0])
    img = t.numpy().transpose(1, 2, 0)
    if rgb2bgr:
        img = img[:, :, ::-1]
    return (img * 255.0).round().astype(out_type) if out_type == np.uint8 else img


def _memory_efficient_attention(q, k, v, attn_bias=None, op=None, scale=None):
    if q.ndim == 4:  # xformers' B×M×H×K
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=attn_bias,
            scale=scale,
        )
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=scale)


def _seed_everything(seed: int) -> int:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed


class _PILToTensor:
    def __call__(self, pic):
        arr = np.asarray(pic)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _cpu(args, kwargs):
    """'cuda' anywhere in a .to() call becomes the CPU."""

    def fix(x):
        if isinstance(x, str) and x.startswith("cuda"):
            return "cpu"
        if isinstance(x, torch.device) and x.type == "cuda":
            return torch.device("cpu")
        return x

    return [fix(a) for a in args], {k: fix(v) for k, v in kwargs.items()}


def install_stand_ins() -> None:
    import diffusers  # noqa: F401  (xformers' stand-in must come after diffusers' own checks)
    import diffusers.models.attention_processor as ap
    import diffusers.models.modeling_utils as mu
    import diffusers.models.unets.unet_2d_condition as u2d
    from diffusers.utils import hub_utils

    utils = _module("basicsr.utils", img2tensor=_img2tensor, tensor2img=_tensor2img)
    _module("basicsr", utils=utils)
    ops = _module("xformers.ops", memory_efficient_attention=_memory_efficient_attention)
    _module("xformers", ops=ops)
    _module("pytorch_lightning", seed_everything=_seed_everything)
    _module("dlib", shape_predictor=lambda *a, **k: None, get_frontal_face_detector=lambda: None)
    if "scipy" not in sys.modules:  # the face alignment's only: face drags stay out of scope
        try:
            import scipy  # noqa: F401
        except ImportError:
            _module("scipy", ndimage=_module("scipy.ndimage"))
    transforms = _module("torchvision.transforms", PILToTensor=_PILToTensor)
    _module("torchvision", transforms=transforms)
    sys.modules["diffusers.models.cross_attention"] = _module(
        "diffusers.models.cross_attention", CrossAttention=ap.Attention, **vars(ap)
    )
    sys.modules["diffusers.models.unet_2d_condition"] = u2d
    if not hasattr(mu, "_get_model_file"):
        mu._get_model_file = hub_utils._get_model_file

    tensor_to, module_to = torch.Tensor.to, torch.nn.Module.to

    def tensor_to_cpu(self, *args, **kwargs):
        args, kwargs = _cpu(args, kwargs)
        return tensor_to(self, *args, **kwargs)

    def module_to_cpu(self, *args, **kwargs):
        args, kwargs = _cpu(args, kwargs)
        return module_to(self, *args, **kwargs)

    torch.Tensor.to = tensor_to_cpu
    torch.nn.Module.to = module_to_cpu
    torch.Tensor.cuda = lambda self, *a, **k: self


def main() -> None:
    ref_dir, job_file, out_file = sys.argv[1:4]
    sys.path.insert(0, str(Path(ref_dir).resolve()))
    torch.set_num_threads(1)
    install_stand_ins()
    job = json.loads(Path(job_file).read_text())
    from oracle_stages import STAGES  # this folder's, imported after the stand-ins
    from safetensors.torch import save_file

    tensors = STAGES[job["stage"]](job)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, out_file)


if __name__ == "__main__":
    main()
