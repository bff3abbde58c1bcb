"""Train the shapes world's autoencoder: `python -m dragonctl.shapes.train_vae --minutes 60`.

The next shapes model is built like Stable Diffusion: a VAE with SD's factor 8 and 4 latent
channels (diffusers' `AutoencoderKL`), then a UNet on its latents. This trains the VAE, first, on
the world at 128 px. Loss: L1 on pixels and on their horizontal and vertical differences (edges are
what a small decoder blurs), and SD's tiny KL weight. No perceptual or adversarial term: the world
is flat colours and smooth gradients.

Resumable like the UNet's trainer: step k's batch comes from (seed, k); the full state goes to
`--checkpoint-dir` (not in git) and the fp16 weights, with the latents' scaling factor measured on
held-out scenes and the loss history, to `--export-dir` at every save. A fresh machine resumes
from the exported weights.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning threads starve others

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dragonctl.shapes.world import batch as world_batch  # noqa: E402

SIZE = 128  # the world's side: sources edit at their own size
EXPORT_DIR = Path(__file__).resolve().parents[2] / "training" / "shapes-v2" / "vae"
HELD_OUT_SEED = 10_000  # scenes for the scaling factor and the validation loss, never trained on
HELD_OUT_SCENES = 32  # world scenes (gradients, as the first chunks trained on)
FLAT_SCENES = 24  # scenes on flat backgrounds


def vae_config() -> dict:
    """SD's layout (4 levels: factor 8, 4 latent channels), scaled down."""
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 96, 96),
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=SIZE,
    )


def build(device: torch.device):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**vae_config()).to(device)


def trained_parameters(vae, part: str) -> list:
    """The parameters a chunk trains; the others are frozen.

    decoder (post_quant_conv, decoder): keeps the latent space, so a UNet trained on it stays valid
    while the decoder gets sharper (SD's ft-MSE decoder). encoder (encoder, quant_conv): moves the
    latents towards those the decoder draws the scene from (a new latent pool: the UNet trains on
    from its weights); the decoder and what it has learnt stay.
    """
    encoder = list(vae.encoder.parameters()) + list(vae.quant_conv.parameters())
    decoder = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    frozen = {"all": [], "decoder": encoder, "encoder": decoder}[part]
    for p in frozen:
        p.requires_grad_(False)
    return {"all": encoder + decoder, "decoder": decoder, "encoder": encoder}[part]


def loss_terms(vae, x: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, dict]:
    """Reconstruction (pixels and their differences, L1) plus KL; x in [-1, 1]."""
    posterior = vae.encode(x).latent_dist
    rec = vae.decode(posterior.sample()).sample
    pixel = F.l1_loss(rec, x)
    edges = sum(F.l1_loss(rec.diff(dim=d), x.diff(dim=d)) for d in (-1, -2))
    kl = posterior.kl().mean() / x[0].numel()
    total = pixel + edges + kl_weight * kl
    parts = {"pixel": pixel.item(), "edges": edges.item(), "kl": kl.item()}
    return total, parts


@torch.no_grad()
def evaluate(vae, device: torch.device) -> dict:
    """On held-out scenes: reconstruction PSNR from the latent mean, and the latents' spread;
    flat_psnr(_worst): the median (lowest) per-scene PSNR on scenes with flat backgrounds (a VAE
    that never saw one shifted them by up to 30 levels)."""
    scenes = world_batch(np.random.default_rng(HELD_OUT_SEED), HELD_OUT_SCENES, SIZE)
    mse, z = _reconstruction_error(vae, scenes, device)
    flat = world_batch(np.random.default_rng(HELD_OUT_SEED + 1), FLAT_SCENES, SIZE, 1.0)
    flat_psnr = -10 * _reconstruction_error(vae, flat, device)[0].clamp_min(1e-12).log10()
    return {
        "psnr": 10 * math.log10(1 / max(float(mse.mean()), 1e-12)),
        "flat_psnr": float(flat_psnr.median()),
        "flat_psnr_worst": float(flat_psnr.min()),
        "latent_std": float(z.std()),
    }


def _reconstruction_error(
    vae, scenes: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each scene's mean squared error (in [0, 1] units) decoded from its latent mean, and the
    latents."""
    x = torch.from_numpy(scenes).to(device)
    z = vae.encode(x).latent_dist.mean
    rec = vae.decode(z).sample.clamp(-1, 1)
    return ((rec - x) / 2).pow(2).mean((1, 2, 3)), z


def export(vae, out: Path, meta: dict) -> None:
    """fp16 weights in diffusers' layout with the measured scaling factor, each file atomically."""
    import copy

    half = copy.deepcopy(vae).to("cpu").half()
    half.register_to_config(scaling_factor=1.0 / meta["latent_std"])
    tmp = out.with_name(f".{out.name}.tmp")
    half.save_pretrained(tmp, safe_serialization=True)
    (tmp / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    for p in sorted(tmp.iterdir()):
        os.replace(p, out / p.name)
    tmp.rmdir()


def resume(args: argparse.Namespace, vae, opt, device: torch.device) -> tuple[int, list[dict]]:
    state_path = args.checkpoint_dir / "state.pt"
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)
        vae.load_state_dict(state["vae"])
        part = state.get("part", "decoder" if state.get("decoder_only") else "all")
        if part == args.part:
            opt.load_state_dict(state["opt"])
        else:  # its moments are for other parameters
            print(f"fresh optimiser: the last chunk trained {part}, this {args.part}", flush=True)
        print(f"resumed from {state_path} at step {state['step']}", flush=True)
        return int(state["step"]), json.loads(state["history"])
    weights = args.export_dir / "diffusion_pytorch_model.safetensors"
    if not weights.exists():
        return 0, []
    from safetensors.torch import load_file

    vae.load_state_dict({k: v.float() for k, v in load_file(weights).items()})
    meta = json.loads((args.export_dir / "training.json").read_text())
    print(f"resumed from the fp16 weights in {args.export_dir} at step {meta['step']}", flush=True)
    return int(meta["step"]), meta.get("history", [])


def save(args: argparse.Namespace, vae, opt, step: int, history: list[dict], device) -> None:
    args.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    state_path = args.checkpoint_dir / "state.pt"
    tmp = state_path.with_name(".state.pt.tmp")
    state = {
        "vae": vae.state_dict(),
        "opt": opt.state_dict(),
        "part": args.part,
        "step": step,
        "history": json.dumps(history),
    }
    torch.save(state, tmp)
    os.replace(tmp, state_path)
    vae.eval()
    held_out = evaluate(vae, device)
    if args.part == "decoder":  # the encoder did not change: neither does the latents' scale
        config = json.loads((args.export_dir / "config.json").read_text())
        held_out["latent_std"] = 1.0 / config["scaling_factor"]
    vae.train()
    from dragonctl.shapes.train import run_meta

    export(vae, args.export_dir, {**run_meta(args, step, history), **held_out})
    print(
        f"step {step}: held-out PSNR {held_out['psnr']:.2f} dB (flat backgrounds "
        f"{held_out['flat_psnr']:.2f}, worst {held_out['flat_psnr_worst']:.2f}), latent std "
        f"{held_out['latent_std']:.3f}; saved",
        flush=True,
    )


def train(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    vae = build(device).train()
    trained = trained_parameters(vae, args.part)
    opt = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.0)
    step, history = resume(args, vae, opt, device)
    n_params = sum(p.numel() for p in vae.parameters()) / 1e6
    print(f"shapes VAE: {n_params:.2f} M parameters, {SIZE} px, batch {args.batch}", flush=True)
    t_start, running = time.time(), None
    try:
        while step < args.steps:
            x = torch.from_numpy(
                world_batch(
                    np.random.default_rng([args.seed, step]), args.batch, SIZE, args.flat_share
                )
            ).to(device)
            for group in opt.param_groups:
                group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
            loss, parts = loss_terms(vae, x, args.kl_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            opt.step()
            step += 1
            value = loss.item()
            running = value if running is None else 0.98 * running + 0.02 * value
            if step % 25 == 0:
                print(
                    f"step {step} loss {running:.4f} (pixel {parts['pixel']:.4f}, edges "
                    f"{parts['edges']:.4f}, kl {parts['kl']:.2f}) "
                    f"{(time.time() - t_start) / 60:.1f} min",
                    flush=True,
                )
            if step % 100 == 0:
                history.append({"step": step, "loss": round(running, 5)})
            if step % args.save_every == 0:
                save(args, vae, opt, step, history, device)
            if args.minutes is not None and time.time() - t_start > args.minutes * 60:
                break
    except KeyboardInterrupt:
        print("interrupted: saving", flush=True)
    if running is not None and not math.isfinite(running):
        print("loss is not finite: not saving", flush=True)
        return 1
    if step % args.save_every:  # not saved at this step yet
        save(args, vae, opt, step, history, device)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m dragonctl.shapes.train_vae",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--steps", type=int, default=1_000_000, help="total optimiser steps to reach")
    ap.add_argument("--minutes", type=float, default=None, help="stop (and save) after this long")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--kl-weight", type=float, default=1e-6)
    ap.add_argument(
        "--flat-share",
        type=float,
        default=0.25,
        help="share of training scenes on a flat background (users' and the benchmark's have them)",
    )
    only = ap.add_mutually_exclusive_group()
    only.add_argument(
        "--decoder-only",
        dest="part",
        action="store_const",
        const="decoder",
        help="train the decoder alone: the latents (and a UNet trained on them) stay valid",
    )
    only.add_argument(
        "--encoder-only",
        dest="part",
        action="store_const",
        const="encoder",
        help="train the encoder alone, towards the latents the decoder draws the scenes from "
        "(a new latent pool; the UNet trains on from its weights)",
    )
    ap.set_defaults(part="all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--checkpoint-dir", type=Path, default=Path("checkpoints/shapes-vae"))
    ap.add_argument("--export-dir", type=Path, default=EXPORT_DIR)
    args = ap.parse_args(argv)
    from dragonctl.shapes.train import run_saving_on_signals

    return run_saving_on_signals(train, args)


if __name__ == "__main__":
    raise SystemExit(main())
