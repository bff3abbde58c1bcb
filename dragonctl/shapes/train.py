"""Train the shapes model: `python -m dragonctl.shapes.train --minutes 8`.

`--model v2` trains the next model's UNet (SD 1.5's topology, scaled down) on the latents of the
VAE that `python -m dragonctl.shapes.train_vae` trained first; its scenes are encoded once into a
latent pool (`dragonctl.shapes.latents`) under the checkpoint folder.

Reproducible from `--seed`: step k's batch and noise come from generators seeded with (seed, k), so
a run resumed from a checkpoint sees the same data as one that never stopped. Full training state
(fp32 weights, EMA, optimiser) goes to `--checkpoint-dir` (kept out of git); the fp16 EMA weights
that ship with the package are exported to `--export-dir` at every save. When no checkpoint exists
but exported weights do, training resumes from those (with a fresh optimiser) so work carries across
machines that only share the git repository.
"""

from __future__ import annotations

import os

os.environ.setdefault(
    "OMP_WAIT_POLICY", "PASSIVE"
)  # before torch: spinning OpenMP threads starve other jobs

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from multiprocessing import get_context  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from dragonctl.shapes import latents  # noqa: E402
from dragonctl.shapes import model as shapes_model  # noqa: E402
from dragonctl.shapes.world import batch as world_batch  # noqa: E402


def make_batch(args: tuple[int, int, int, float, float]) -> np.ndarray:
    seed, step, n, flat_share, textured_share = args
    rng = np.random.default_rng([seed, step])
    return world_batch(rng, n, flat_share=flat_share, textured_share=textured_share)


def build(device: torch.device, version: str = "v1"):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    config = shapes_model.unet_v2_config() if version == "v2" else shapes_model.unet_config()
    unet = UNet2DConditionModel(**config).to(device)
    null = shapes_model.NullPrompt().to(device)
    sched = DDPMScheduler(
        **{k: v for k, v in shapes_model.scheduler_config().items() if k != "set_alpha_to_one"}
    )
    return unet, null, sched


def export(unet, null, out: Path, meta: dict) -> None:
    """Write the fp16 EMA weights in diffusers' folder layout, each file atomically."""
    from diffusers import DDIMScheduler

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".export-tmp"
    if tmp.exists():
        for p in sorted(tmp.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
    half = copy.deepcopy(unet).to("cpu").half()  # not to(dtype): diffusers warns on that
    half.save_pretrained(tmp / "unet", safe_serialization=True)
    DDIMScheduler(**shapes_model.scheduler_config()).save_pretrained(tmp / "scheduler")
    save_file(
        {"embedding": null.embedding.detach().to("cpu", torch.float16).contiguous()},
        tmp / "null_prompt.safetensors",
    )
    (tmp / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            dest = out / p.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(p, dest)
    for p in sorted(tmp.rglob("*"), reverse=True):
        p.rmdir()
    tmp.rmdir()


def learning_rate(step: int, args: argparse.Namespace, optimiser_start: int = 0) -> float:
    """Warm-up (from the step a fresh optimiser started at), a constant plateau, then an optional
    linear cool-down to a tenth (it lowers the loss floor)."""
    scale = min(1.0, (step - optimiser_start + 1) / args.warmup)
    if args.cooldown and step > args.steps - args.cooldown:
        scale *= 1.0 - 0.9 * min(1.0, (step - (args.steps - args.cooldown)) / args.cooldown)
    return args.lr * scale


def plan_end(
    args: argparse.Namespace, run_start: int, step: int, steps_per_s: float, seconds_left: float
) -> None:
    """Fix a timed run's last step from its measured speed, and its cool-down as a share of it."""
    end = min(args.steps, step + max(1, int(steps_per_s * seconds_left * 0.95)))
    args.cooldown = max(1, int(args.cooldown_share * (end - run_start)))
    args.steps = end
    print(
        f"{steps_per_s:.1f} steps/s: ending at step {end}, "
        f"cooling down over the last {args.cooldown}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m dragonctl.shapes.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--steps", type=int, default=20000, help="total optimiser steps to reach")
    ap.add_argument(
        "--minutes", type=float, default=None, help="stop (and save) after this many minutes"
    )
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument(
        "--cooldown",
        type=int,
        default=0,
        help="decay the learning rate linearly to 10%% over the last N steps before --steps",
    )
    ap.add_argument(
        "--cooldown-share",
        type=float,
        default=0.0,
        help="with --minutes: end at the step the measured speed reaches in that time, "
        "cooling down "
        "over this share of the run's steps (a timed chunk, e.g. on a lent GPU)",
    )
    ap.add_argument(
        "--flat-share",
        type=float,
        default=0.25,
        help="share of training scenes on a flat background (users' and the benchmark's have them)",
    )
    ap.add_argument(
        "--textured-share",
        type=float,
        default=0.0,
        help="share of the non-flat scenes drawn from the textured world (patterned backgrounds, "
        "shaded and patterned shapes that may overlap, soft shadows)",
    )
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument(
        "--workers", type=int, default=0, help="data-generating processes (0: in-process)"
    )
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument(
        "--model",
        choices=("v1", "v2"),
        default="v1",
        help="v1: the shipped pixel-unshuffle model; v2: the SD-like UNet on the VAE's latents",
    )
    ap.add_argument(
        "--pool-shards",
        type=int,
        default=8,
        help=f"v2: scenes encoded once for training, in shards of {latents.SHARD}",
    )
    ap.add_argument(
        "--vae-dir", type=Path, default=shapes_model.V2_DIR / "vae", help="v2: the trained VAE"
    )
    ap.add_argument("--checkpoint-dir", type=Path, default=None, help="default checkpoints/shapes")
    ap.add_argument("--export-dir", type=Path, default=None, help="default: the model's folder")
    args = ap.parse_args(argv)
    v2 = args.model == "v2"
    if args.checkpoint_dir is None:
        args.checkpoint_dir = Path("checkpoints/shapes-v2" if v2 else "checkpoints/shapes")
    if args.export_dir is None:
        args.export_dir = shapes_model.V2_DIR if v2 else shapes_model.WEIGHTS_DIR
    return run_saving_on_signals(train, args)


def run_saving_on_signals(fn, args: argparse.Namespace) -> int:
    """Run a trainer with SIGINT and SIGTERM raising KeyboardInterrupt (it saves and stops:
    background jobs ignore SIGINT), then restore the old handlers."""
    previous = {
        s: signal.signal(s, signal.default_int_handler) for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        return fn(args)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def resume(
    args: argparse.Namespace,
    state_path: Path,
    device: torch.device,
    unet,
    null,
    ema_unet,
    ema_null,
    opt,
) -> tuple[int, int, list[dict]]:
    """Load the full training state, or else exported weights (a fresh machine), the package's if
    none are there yet. Returns (step, the step a fresh optimiser started at, loss history)."""
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)
        unet.load_state_dict(state["unet"])
        null.load_state_dict(state["null"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_null.load_state_dict(state["ema_null"])
        opt.load_state_dict(state["opt"])
        print(f"resumed from {state_path} at step {int(state['step'])}", flush=True)
        return int(state["step"]), 0, json.loads(state["history"])
    weights = Path("unet") / "diffusion_pytorch_model.safetensors"
    # the package's weights seed only the model they are: v2 starts from scratch
    candidates = (args.export_dir,) + ((shapes_model.WEIGHTS_DIR,) if args.model == "v1" else ())
    init_dir = next((d for d in candidates if (d / weights).exists()), None)
    if init_dir is None:
        return 0, 0, []
    w = load_file(init_dir / weights)
    unet.load_state_dict({k: v.float() for k, v in w.items()})
    null.embedding.data.copy_(load_file(init_dir / "null_prompt.safetensors")["embedding"].float())
    ema_unet.load_state_dict(unet.state_dict())
    ema_null.load_state_dict(null.state_dict())
    meta = json.loads((init_dir / "training.json").read_text())
    step = int(meta["step"])
    print(
        f"resumed from the fp16 weights in {init_dir} at step {step} (fresh optimiser)", flush=True
    )
    return step, step, meta.get("history", [])


def train_step(
    x0: torch.Tensor,
    step: int,
    seed: int,
    models: tuple,
    alphas: torch.Tensor,
    opt,
    params: list,
    autocast,
    to_latent=None,
) -> torch.Tensor:
    """One v-prediction step on a batch; its noise comes from (seed, step). `to_latent` maps the
    batch and its noise to the latent (v1: pixel-unshuffle; v2's batches are latents already)."""
    unet, null = models
    device = x0.device
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    noise = torch.randn(x0.shape, generator=g).to(device)
    t = torch.randint(0, len(alphas), (x0.shape[0],), generator=g).to(device)
    if to_latent is not None:
        x0, noise = to_latent(x0), to_latent(noise)
    with autocast:
        loss = v_loss(unet, null, x0, noise, t, alphas)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss


def v_loss(unet, null, z0, noise, t, alphas) -> torch.Tensor:
    """The v-prediction loss of latents z0 noised with `noise` at timesteps t."""
    a = alphas[t].view(-1, 1, 1, 1)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
    v = a.sqrt() * noise - (1 - a).sqrt() * z0
    pred = unet(zt, t, null(z0.shape[0])).sample
    return torch.nn.functional.mse_loss(pred.float(), v)


def unshuffle(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pixel_unshuffle(x, shapes_model.LATENT_FACTOR)


@torch.no_grad()
def held_out_loss(unet, null, z0: torch.Tensor, alphas: torch.Tensor) -> float:
    """The v-loss on held-out latents at fixed timesteps and noise: exports compare on it."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(z0.shape, generator=g).to(z0.device)
    t = torch.linspace(0, len(alphas) - 1, len(z0)).long().to(z0.device)
    return float(v_loss(unet, null, z0, noise, t, alphas))


def run_meta(args: argparse.Namespace, step: int, history: list[dict]) -> dict:
    """What an export's training.json records of the run (both trainers)."""
    return {
        "step": step,
        "seed": args.seed,
        "batch": args.batch,
        "lr": args.lr,
        "flat_share": args.flat_share,
        "textured_share": getattr(args, "textured_share", 0.0),
        "history": history,
    }


def save_checkpoint(
    args: argparse.Namespace, state_path: Path, step: int, history: list[dict], models: dict, opt
) -> None:
    """The full training state (atomically), then the fp16 EMA export."""
    args.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_path.with_name(".state.pt.tmp")
    state = {name: m.state_dict() for name, m in models.items()}
    state.update(opt=opt.state_dict(), step=step, history=json.dumps(history))
    torch.save(state, tmp)
    os.replace(tmp, state_path)
    meta = run_meta(args, step, history)
    if getattr(args, "held_out", None) is not None:
        meta["pool_scenes"] = len(args.pool)
        meta["held_out_loss"] = held_out_loss(
            models["ema_unet"], models["ema_null"], args.held_out, args.alphas
        )
        print(f"step {step}: held-out v-loss {meta['held_out_loss']:.4f}", flush=True)
    export(models["ema_unet"], models["ema_null"], args.export_dir, meta)


@torch.no_grad()
def update_ema(ema_unet, ema_null, params: list, decay: float) -> None:
    for e, p in zip(list(ema_unet.parameters()) + list(ema_null.parameters()), params):
        e.lerp_(p, 1 - decay)


def batch_stream(args: argparse.Namespace, step: int):
    """(worker pool or None, the batches from `step` on): step k's batch comes from (seed, k)."""
    if args.model == "v2":
        return None, (
            latents.pool_batch(args.pool, args.seed, s, args.batch) for s in range(step, args.steps)
        )
    pool = get_context("spawn").Pool(args.workers) if args.workers else None
    jobs = (
        (args.seed, s, args.batch, args.flat_share, args.textured_share)
        for s in range(step, args.steps)
    )
    return pool, (pool.imap(make_batch, jobs, chunksize=4) if pool else map(make_batch, jobs))


def _timed_chunk(
    args: argparse.Namespace, run_start: int, step: int, timed_from: float | None, t_start: float
) -> float | None:
    """A timed chunk measures its speed over steps 50–100 of the run, then fixes its end."""
    if args.minutes is not None and args.cooldown_share > 0 and step - run_start == 50:
        return time.time()
    if timed_from is not None and step - run_start == 100:
        seconds_left = args.minutes * 60 - (time.time() - t_start)
        plan_end(args, run_start, step, 50 / (time.time() - timed_from), seconds_left)
    return timed_from


def prepare_data(args: argparse.Namespace, device: torch.device, alphas: torch.Tensor) -> None:
    """v2: the VAE's latent pool (built once) and held-out latents; v1: pixel-unshuffle."""
    args.alphas, args.to_latent, args.held_out = alphas, unshuffle, None
    if args.model != "v2":
        return
    vae = latents.load_vae(args.vae_dir, device)
    flat = f"-flat{args.flat_share:g}" if args.flat_share else ""  # another world, another pool
    folder = args.checkpoint_dir / f"latents-{latents.vae_tag(args.vae_dir)}{flat}"
    args.pool = latents.build_pool(
        vae, folder, args.seed, args.pool_shards, device, args.flat_share
    )
    args.held_out = latents.held_out(vae, device).to(device)
    args.to_latent = None


def train(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # one batch shape throughout: pick the fastest kernels once
    torch.backends.cudnn.benchmark = device.type == "cuda"
    unet, null, sched = build(device, args.model)
    ema_unet, ema_null = (
        copy.deepcopy(unet).requires_grad_(False),
        copy.deepcopy(null).requires_grad_(False),
    )
    params = list(unet.parameters()) + list(null.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    state_path = args.checkpoint_dir / "state.pt"
    step, optimiser_start, history = resume(
        args, state_path, device, unet, null, ema_unet, ema_null, opt
    )

    n_params = sum(p.numel() for p in unet.parameters())
    print(
        f"shapes model: {n_params / 1e6:.2f} M parameters, device {device}, batch {args.batch}",
        flush=True,
    )
    alphas = sched.alphas_cumprod.to(device)
    prepare_data(args, device, alphas)
    t_start = time.time()
    pool, batches = batch_stream(args, step)
    # bf16 on a GPU; fp32 on the CPU
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    running = None
    run_start, timed_from = step, None
    waited, ready = 0.0, time.time()  # time spent waiting for batches: is the run data-bound?

    def save() -> None:
        models = {"unet": unet, "null": null, "ema_unet": ema_unet, "ema_null": ema_null}
        save_checkpoint(args, state_path, step, history, models, opt)

    try:
        for x_np in batches:
            waited += time.time() - ready
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, args, optimiser_start)
            x0 = (x_np if torch.is_tensor(x_np) else torch.from_numpy(x_np)).to(device)
            loss = train_step(
                x0, step, args.seed, (unet, null), alphas, opt, params, autocast, args.to_latent
            )
            update_ema(ema_unet, ema_null, params, min(args.ema, (1 + step) / (10 + step)))
            step += 1
            timed_from = _timed_chunk(args, run_start, step, timed_from, t_start)
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            if step % 25 == 0:
                el = time.time() - t_start
                print(
                    f"step {step}/{args.steps} loss {running:.4f} {el / 60:.1f} min, "
                    f"{100 * waited / el:.0f} % waiting for data",
                    flush=True,
                )
            if step % 100 == 0:
                history.append({"step": step, "loss": round(running, 5)})
            if step % args.save_every == 0:
                save()
            ready = time.time()
            if step >= args.steps or (
                args.minutes is not None and time.time() - t_start > args.minutes * 60
            ):
                break
    except KeyboardInterrupt:
        print("interrupted: saving", flush=True)
    finally:
        if pool:
            pool.terminate()
    if not math.isfinite(running or 0.0):
        print("loss is not finite: not saving", file=sys.stderr)
        return 1
    save()
    print(f"saved step {step} to {args.checkpoint_dir} and {args.export_dir}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
