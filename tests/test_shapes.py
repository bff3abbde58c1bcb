"""The shapes world and the embedded model: ground truth, shipped weights, a real offline edit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dragonctl import api
from dragonctl.models import load_bundle
from dragonctl.shapes import model as shapes_model
from dragonctl.shapes.world import Scene, Shape, random_scene, render

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def test_world_is_reproducible_and_its_ground_truth_exact():
    a, b = random_scene(np.random.default_rng(5)), random_scene(np.random.default_rng(5))
    assert a == b and 1 <= len(a.shapes) <= 3
    sq = Scene(
        64, ((0.5, 0.5, 0.5),) * 4, (0, 0, 0, 0), (Shape("square", 20, 30, 10, (1.0, 0.0, 0.0)),)
    )
    r = render(sq)
    assert r.masks[0].sum() == 100 and r.centroids[0] == (20.0, 30.0)
    assert np.allclose(r.image[r.masks[0]], [1, 0, 0]) and np.allclose(r.image[~r.masks[0]], 0.5)
    moved = render(sq.with_shape(0, sq.shapes[0].moved(7, -3)))
    assert moved.centroids[0] == (27.0, 27.0)


def test_shipped_weights_fit_the_budget_and_load_through_the_bundle():
    weights = shapes_model.WEIGHTS_DIR / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size < 16 * 2**20
    b = load_bundle("shapes")
    assert sum(p.numel() for p in b.unet.parameters()) <= 5_000_000
    assert b.prediction_type == "v_prediction" and b.latent_factor == 4 and b.size_multiple == 16
    assert len(b.decoder_self_attention) == 4  # up_blocks 1 and 2, two transformer layers each
    assert torch.equal(b.encode_prompt(["a cat"]), b.encode_prompt([""]))  # prompts are ignored
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    assert torch.equal(b.decode_latent(b.encode_image(x)), x)  # the latent is lossless
    meta = json.loads((shapes_model.WEIGHTS_DIR / "training.json").read_text())
    assert meta["step"] > 0 and meta["history"]


def _color_centroid(img: np.ndarray, color) -> tuple[float, float, int]:
    m = np.linalg.norm(img.astype(float) / 255 - np.asarray(color), axis=-1) < 0.25
    ys, xs = np.nonzero(m)
    return float(xs.mean()), float(ys.mean()), int(m.sum())


def test_the_sample_move_is_made_by_the_model(tmp_path):
    """The README's first command, checked: the embedded model, guided, moves the red circle 44 px
    right and clears its old place; the same edit with the denoiser replaced by a zero predictor
    (the latent copy and the energies alone) leaves the old circle where it was."""
    from dragonctl.bench import quality

    opts = api.EditOptions(out_dir=tmp_path / "model", no_cache=True)
    reports = api.edit([SAMPLES / "move.yaml"], opts)
    assert reports[0].ok, reports[0].errors
    result = np.asarray(Image.open(reports[0].output).convert("RGB"))
    source = np.asarray(Image.open(SAMPLES / "images" / "scene.png").convert("RGB"))
    assert result.shape == source.shape
    # the 128-px sample is edited at its own size (max_resolution), not at the model's 64, guided
    sidecar = json.loads(reports[0].output.with_suffix(".json").read_text())
    assert sidecar["stats"]["working_size"] == [source.shape[1], source.shape[0]] == [128, 128]
    assert sidecar["stats"]["unet_backward"] > 0
    sx, sy, sn = _color_centroid(source, (0.85, 0.15, 0.2))
    red = np.asarray([0.85, 0.15, 0.2])
    old = np.linalg.norm(source / 255 - red, axis=-1) < 0.25
    new = np.roll(old, 44, axis=1)
    left = old & ~new

    def red_share(img: np.ndarray, where: np.ndarray) -> float:
        return float((np.linalg.norm(img / 255 - red, axis=-1) < 0.25)[where].mean())

    assert red_share(result, new) > 0.9 and red_share(result, left) < 0.4
    rx, ry, _ = _color_centroid(np.where(new[..., None], result, 0), (0.85, 0.15, 0.2))
    assert abs(rx - (sx + 44)) < 3 and abs(ry - sy) < 3, (rx, ry)
    session = api.Session(api.EditOptions(no_cache=True))
    quality.zero_predictor(session.editor("shapes"))
    ls, inp = api.load(SAMPLES / "move.yaml")
    control = api.edit_one(session, ls, inp, tmp_path / "zero.png", opts, None)
    assert control.ok, control.errors
    zero = np.asarray(Image.open(tmp_path / "zero.png").convert("RGB"))
    # without the model, most of the old circle stays (the energies alone erode its edge)
    assert red_share(zero, left) > 0.7 and red_share(zero, left) > 2 * red_share(result, left)


def test_training_resumes_from_the_package_weights_then_from_its_checkpoint(tmp_path):
    """Two optimiser steps at batch 2: a fresh machine starts from the shipped fp16 weights, a
    second run resumes from the full checkpoint, and the exported folder loads as a model with
    shapes defaults."""
    import signal

    from dragonctl.shapes import train
    from dragonctl.spec import defaults_for

    start = json.loads((shapes_model.WEIGHTS_DIR / "training.json").read_text())["step"]
    handler = signal.getsignal(signal.SIGTERM)
    common = [
        "--batch",
        "2",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--checkpoint-dir",
        str(tmp_path / "ck"),
        "--export-dir",
        str(tmp_path / "model"),
    ]
    assert train.main(["--steps", str(start + 2), *common]) == 0
    assert json.loads((tmp_path / "model" / "training.json").read_text())["step"] == start + 2
    assert (tmp_path / "ck" / "state.pt").exists()
    assert train.main(["--steps", str(start + 3), *common]) == 0
    assert json.loads((tmp_path / "model" / "training.json").read_text())["step"] == start + 3
    assert signal.getsignal(signal.SIGTERM) == handler  # restored
    b = load_bundle(str(tmp_path / "model"))
    assert b.prediction_type == "v_prediction"
    assert defaults_for(str(tmp_path / "model"), "move") == defaults_for("shapes", "move")


def test_learning_rate_warms_up_from_a_fresh_optimiser_and_cools_down():
    import argparse

    from dragonctl.shapes.train import learning_rate

    args = argparse.Namespace(lr=1e-3, warmup=100, steps=1000, cooldown=200)
    assert learning_rate(0, args) == pytest.approx(1e-5)
    assert learning_rate(500, args) == pytest.approx(1e-3)
    assert learning_rate(600, args, optimiser_start=600) == pytest.approx(
        1e-5
    )  # fresh optimiser: warm up again
    assert learning_rate(900, args) == pytest.approx(1e-3 * (1 - 0.9 * 0.5))
    assert learning_rate(1000, args) == learning_rate(2000, args) == pytest.approx(1e-4)


def test_a_timed_chunk_ends_where_its_measured_speed_reaches_and_cools_down_over_its_share():
    import argparse

    from dragonctl.shapes.train import learning_rate, plan_end

    args = argparse.Namespace(lr=1e-3, warmup=100, steps=1_000_000, cooldown=0, cooldown_share=0.5)
    plan_end(args, run_start=18_500, step=18_600, steps_per_s=20.0, seconds_left=100.0)
    assert args.steps == 18_600 + int(20 * 100 * 0.95)  # a 5 % margin for the save at the end
    assert args.cooldown == (args.steps - 18_500) // 2
    assert learning_rate(args.steps - args.cooldown, args, optimiser_start=18_500) == pytest.approx(
        1e-3
    )
    assert learning_rate(args.steps, args, optimiser_start=18_500) == pytest.approx(1e-4)
    args = argparse.Namespace(lr=1e-3, warmup=100, steps=19_000, cooldown=0, cooldown_share=0.5)
    plan_end(args, run_start=18_500, step=18_600, steps_per_s=20.0, seconds_left=100.0)
    assert args.steps == 19_000  # never past --steps


def test_the_vae_trainer_exports_an_sd_layout_autoencoder_and_resumes(tmp_path, monkeypatch):
    """Factor 8 and 4 latent channels at the world's 128 px; the export carries the measured
    scaling factor and reconstruction figures; a second run resumes from the checkpoint, a fresh
    machine from the export."""
    from diffusers import AutoencoderKL

    from dragonctl.shapes import train_vae

    monkeypatch.setattr(train_vae, "HELD_OUT_SCENES", 4)  # 56 scenes per save: most of the time
    monkeypatch.setattr(train_vae, "FLAT_SCENES", 4)

    export = tmp_path / "vae"
    common = [
        "--batch",
        "1",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--save-every",
        "2",
        "--export-dir",
        str(export),
    ]
    assert train_vae.main(["--steps", "2", "--checkpoint-dir", str(tmp_path / "ck"), *common]) == 0
    meta = json.loads((export / "training.json").read_text())
    assert meta["step"] == 2 and meta["psnr"] > 0 and meta["latent_std"] > 0
    assert meta["flat_psnr"] >= meta["flat_psnr_worst"] > 0 and meta["flat_share"] == 0.25
    vae = AutoencoderKL.from_pretrained(export)
    assert vae.config.scaling_factor == pytest.approx(1 / meta["latent_std"], rel=1e-3)
    z = vae.encode(torch.zeros(1, 3, train_vae.SIZE, train_vae.SIZE)).latent_dist.mean
    assert z.shape == (1, 4, train_vae.SIZE // 8, train_vae.SIZE // 8)
    assert train_vae.main(["--steps", "3", "--checkpoint-dir", str(tmp_path / "ck"), *common]) == 0
    assert json.loads((export / "training.json").read_text())["step"] == 3
    fresh = tmp_path / "fresh-machine"  # no checkpoint: starts from the exported weights
    assert train_vae.main(["--steps", "4", "--checkpoint-dir", str(fresh), *common]) == 0
    assert json.loads((export / "training.json").read_text())["step"] == 4


def test_training_batches_hold_the_asked_share_of_flat_backgrounds():
    """Flat backgrounds (the benchmark's and many users' scenes) are in the training world; the
    frame's corners are background (shapes keep clear of the edges)."""
    from dragonctl.shapes.world import batch

    def flat_count(flat_share: float) -> int:
        x = batch(np.random.default_rng(3), 64, 64, flat_share)
        corners = x[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]  # n×3×4
        return int((np.ptp(corners, axis=2).max(axis=1) < 1e-6).sum())

    assert flat_count(0.0) == 0 and flat_count(1.0) == 64
    assert 6 <= flat_count(0.25) <= 28
    # no share asked: the scenes the committed weights were trained on, draw for draw
    rng = np.random.default_rng(3)
    scenes = [render(random_scene(rng, 64, shape_size=(10.0, 24.0))).image for _ in range(4)]
    old_stream = np.stack(scenes).transpose(0, 3, 1, 2) * 2.0 - 1.0
    assert np.array_equal(old_stream, batch(np.random.default_rng(3), 4, 64))


def test_the_v2_unet_trains_on_the_vae_latents_and_resumes(tmp_path, monkeypatch, capsys):
    """`--model v2`: SD 1.5's block topology on the committed VAE's latents (16×16×4 at 128 px);
    the latent pool is encoded once and reused; a second run resumes from the checkpoint, a fresh
    machine from the export, never from the shipped v1 weights."""
    from dragonctl.shapes import latents, train

    monkeypatch.setattr(latents, "SHARD", 4)  # a tiny pool: encoding 1024 scenes takes a minute
    monkeypatch.setattr(latents, "HELD_OUT_SCENES", 4)
    export = tmp_path / "model"
    common = ["--model", "v2", "--batch", "2", "--threads", "1", "--device", "cpu"]
    common += ["--pool-shards", "2", "--save-every", "2", "--export-dir", str(export)]
    ck = ["--checkpoint-dir", str(tmp_path / "ck")]
    assert train.main(["--steps", "2", *common, *ck]) == 0
    assert capsys.readouterr().out.count("latent pool: shard") == 2
    meta = json.loads((export / "training.json").read_text())
    assert meta["step"] == 2 and meta["pool_scenes"] == 8 and meta["held_out_loss"] > 0
    config = json.loads((export / "unet" / "config.json").read_text())
    assert config["in_channels"] == 4 and config["sample_size"] == 16
    assert len(config["down_block_types"]) == 4 and config["layers_per_block"] == 2
    assert config["up_block_types"][0] == "UpBlock2D"
    assert train.main(["--steps", "3", *common, *ck]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "state.pt" in out and "latent pool" not in out
    assert json.loads((export / "training.json").read_text())["step"] == 3
    fresh = ["--checkpoint-dir", str(tmp_path / "ck2")]
    assert train.main(["--steps", "4", *common, *fresh]) == 0
    assert f"fp16 weights in {export} at step 3" in capsys.readouterr().out
    pool = latents.build_pool(
        latents.load_vae(shapes_model.V2_DIR / "vae", torch.device("cpu")),
        tmp_path / "again",
        0,
        2,
        torch.device("cpu"),
        0.25,  # the trainer's default share of flat backgrounds: the folder says so
    )
    stored = tmp_path / "ck" / f"latents-{latents.vae_tag(shapes_model.V2_DIR / 'vae')}-flat0.25"
    assert torch.equal(pool, torch.cat([torch.load(p) for p in sorted(stored.glob("shard-*"))]))


@pytest.mark.parametrize("part", ["decoder", "encoder"])
def test_a_one_sided_vae_chunk_leaves_the_other_side_bit_for_bit(tmp_path, monkeypatch, part):
    """`--decoder-only` changes the decoder and leaves the encoder, the scaling factor and so the
    UNet's latent pool (its folder tag) as they were; `--encoder-only` changes the encoder and
    leaves the decoder, and the latents change, so the pool's tag does too."""
    from safetensors.torch import load_file

    from dragonctl.shapes import latents, train_vae

    monkeypatch.setattr(train_vae, "HELD_OUT_SCENES", 4)
    monkeypatch.setattr(train_vae, "FLAT_SCENES", 4)
    export = tmp_path / "vae"
    shutil.copytree(shapes_model.V2_DIR / "vae", export)
    before = load_file(export / "diffusion_pytorch_model.safetensors")
    tag = latents.vae_tag(export)
    start = json.loads((export / "training.json").read_text())["step"]
    args = ["--steps", str(start + 1), "--batch", "1", "--threads", "1", "--device", "cpu"]
    args += [f"--{part}-only", "--export-dir", str(export)]
    assert train_vae.main([*args, "--checkpoint-dir", str(tmp_path / "ck")]) == 0
    after = load_file(export / "diffusion_pytorch_model.safetensors")
    sides = {"encoder": ("encoder.", "quant_conv."), "decoder": ("decoder.", "post_quant_conv.")}
    kept = [k for k in before if k.startswith(sides["encoder" if part == "decoder" else "decoder"])]
    assert kept and all(torch.equal(before[k], after[k]) for k in kept)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(f"{part}."))
    assert (latents.vae_tag(export) == tag) == (part == "decoder")
