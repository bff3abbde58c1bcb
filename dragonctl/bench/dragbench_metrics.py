"""DragBench's protocol metrics: Mean Distance (DIFT correspondence) and Image Fidelity (1 - LPIPS).

- Mean Distance: DIFT features (a diffusion UNet's up_blocks[1] output on the noised image at
  t = 261, averaged over an ensemble of noise draws) of the source and of the edited image; each
  handle's source feature is matched (cosine nearest neighbour) in the edited image, and the
  distance from the match to the target point is averaged over all pairs. DragDiffusion's protocol
  uses SD 2.1 for DIFT.
- Image Fidelity: 1 - LPIPS(source, edited) with LPIPS over AlexNet features at 224 px.

Both need weights that are not bundled (SD 2.1; AlexNet + LPIPS heads): pass them in, and the
metrics are reported only then. The networks here are plain torch (no torchvision), so they are
tested on random weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DIFT_T = 261
DIFT_BLOCK = 1
DIFT_ENSEMBLE = 8


@torch.no_grad()
def dift_features(
    bundle,
    image: np.ndarray,
    prompt: str = "",
    t: int = DIFT_T,
    ensemble: int = DIFT_ENSEMBLE,
    seed: int = 0,
) -> torch.Tensor:
    """C×h×w DIFT features of an RGB uint8 image (already at the model's working size)."""
    from diffusers import DDPMScheduler

    from dragonctl.engine import to_tensor
    from dragonctl.features import decoder_features

    sched = DDPMScheduler.from_config(bundle.scheduler_config)
    z0 = bundle.encode_image(to_tensor(image)).float()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((ensemble, *z0.shape[1:]), generator=g).to(z0.device)
    zt = sched.add_noise(z0.expand(ensemble, -1, -1, -1), noise, torch.tensor([t] * ensemble))
    ctx = bundle.encode_prompt([prompt] * ensemble)
    feats = decoder_features(bundle.unet, zt.to(bundle.dtype), t, ctx, blocks=(DIFT_BLOCK,))[0]
    return feats.float().mean(dim=0)


def match_distance(
    src: torch.Tensor,
    edited: torch.Tensor,
    handles: list[tuple[float, float]],
    targets: list[tuple[float, float]],
    image_hw: tuple[int, int],
) -> float:
    """Mean distance (image pixels) between each target and the best match of its handle's source
    feature."""
    c, h, w = src.shape
    H, W = image_hw
    up = lambda f: F.interpolate(f[None], size=(H, W), mode="bilinear", align_corners=False)[0]  # noqa: E731
    src_up, edit_up = up(src), F.normalize(up(edited), dim=0)
    dists = []
    for (hx, hy), (tx, ty) in zip(handles, targets):
        x, y = min(max(int(round(hx)), 0), W - 1), min(max(int(round(hy)), 0), H - 1)
        q = F.normalize(src_up[:, y, x], dim=0)
        sim = torch.einsum("c,chw->hw", q, edit_up)
        iy, ix = divmod(int(sim.flatten().argmax()), W)
        dists.append(float(np.hypot(ix - tx, iy - ty)))
    return float(np.mean(dists)) if dists else float("nan")


class AlexNetFeatures(nn.Module):
    """AlexNet's convolutional trunk (the layers LPIPS reads: relu1..relu5), without torchvision."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(3, 64, 11, stride=4, padding=2),
                nn.Conv2d(64, 192, 5, padding=2),
                nn.Conv2d(192, 384, 3, padding=1),
                nn.Conv2d(384, 256, 3, padding=1),
                nn.Conv2d(256, 256, 3, padding=1),
            ]
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for k, conv in enumerate(self.convs):
            if k in (1, 2):
                x = F.max_pool2d(x, 3, 2)
            x = F.relu(conv(x))
            outs.append(x)
        return outs


class LPIPS(nn.Module):
    """Learned perceptual distance: unit-normalised AlexNet activations, weighted by 1×1 heads,
    averaged."""

    CHANNELS = (64, 192, 384, 256, 256)
    SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def __init__(self) -> None:
        super().__init__()
        self.net = AlexNetFeatures()
        self.heads = nn.ModuleList([nn.Conv2d(c, 1, 1, bias=False) for c in self.CHANNELS])

    @classmethod
    def from_file(cls, path: Path) -> LPIPS:
        """Weights as one safetensors file with this module's state-dict names (see README)."""
        from safetensors.torch import load_file

        model = cls()
        model.load_state_dict(load_file(str(path)))
        return model.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a, b: N×3×H×W in [-1, 1] → N distances."""
        a, b = ((x - self.SHIFT) / self.SCALE for x in (a, b))
        total = a.new_zeros(a.shape[0])
        for fa, fb, head in zip(self.net(a), self.net(b), self.heads):
            na = fa / (fa.norm(dim=1, keepdim=True) + 1e-10)
            nb = fb / (fb.norm(dim=1, keepdim=True) + 1e-10)
            total = total + head((na - nb) ** 2).mean(dim=(1, 2, 3))
        return total


def image_fidelity(lpips: LPIPS, source: np.ndarray, edited: np.ndarray, size: int = 224) -> float:
    def prep(img: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 127.5 - 1
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)

    return 1.0 - float(lpips(prep(source), prep(edited))[0])


ALEXNET_CONVS = (0, 3, 6, 8, 10)  # torchvision AlexNet's `features` indices of the five convs


def convert_lpips(alexnet: Path, lpips: Path, out: Path) -> None:
    """One safetensors file for `LPIPS.from_file` from the published weights: torchvision's
    AlexNet (`alexnet-owt-*.pth`, keys `features.{0,3,6,8,10}.{weight,bias}`) and the `lpips`
    package's linear heads (`alex.pth`, keys `lin{0..4}.model.1.weight`). Both are read with
    `weights_only` (tensors only: no code runs)."""
    from safetensors.torch import save_file

    from dragonctl.files import atomic_write

    net = torch.load(alexnet, map_location="cpu", weights_only=True)
    heads = torch.load(lpips, map_location="cpu", weights_only=True)
    state = {}
    for k, index in enumerate(ALEXNET_CONVS):
        for part in ("weight", "bias"):
            state[f"net.convs.{k}.{part}"] = _tensor(net, f"features.{index}.{part}", alexnet)
        state[f"heads.{k}.weight"] = _tensor(heads, f"lin{k}.model.1.weight", lpips)
    LPIPS().load_state_dict(state)  # the shapes fit, or this says which does not
    tmp = out.with_name(f".{out.name}.convert")
    save_file({k: v.float().contiguous() for k, v in state.items()}, str(tmp))
    atomic_write(out, tmp.read_bytes())
    tmp.unlink()


def _tensor(state: dict, key: str, source: Path) -> torch.Tensor:
    if key not in state:
        raise KeyError(f"{source}: no {key} (is it the right file?)")
    return state[key]
