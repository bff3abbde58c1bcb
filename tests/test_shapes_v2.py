"""The SD-like shapes model (#15) loads through the same bundle code as the embedded one: a
shapes folder with its own VAE is family `shapes-v2` (128 px, factor 8, 4 latent channels) and
edits end to end. Its UNet here is random (built in code); the VAE is the committed one."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import MODE_FIELDS, write_spec
from PIL import Image
from safetensors.torch import save_file

from dragonctl import api
from dragonctl.families import family_for_model
from dragonctl.models import load_bundle, sampled_hash, weights_fingerprint
from dragonctl.shapes import model as shapes_model
from dragonctl.shapes.world import batch as world_batch
from dragonctl.spec import defaults_for


@pytest.fixture(scope="module")
def v2_folder(tmp_path_factory):
    from diffusers import DDIMScheduler, UNet2DConditionModel

    folder = tmp_path_factory.mktemp("shapes-v2")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**shapes_model.unet_v2_config())
    unet.to(torch.float16).save_pretrained(folder / "unet", safe_serialization=True)
    DDIMScheduler(**shapes_model.scheduler_config()).save_pretrained(folder / "scheduler")
    null = shapes_model.NullPrompt().embedding.detach().half().contiguous()
    save_file({"embedding": null}, folder / "null_prompt.safetensors")
    shutil.copytree(shapes_model.V2_DIR / "vae", folder / "vae")
    return folder


def test_a_shapes_folder_with_a_vae_is_the_sd_like_family(v2_folder):
    assert family_for_model(str(v2_folder)) == "shapes-v2"
    assert family_for_model(str(shapes_model.WEIGHTS_DIR)) == "shapes"
    assert defaults_for(str(v2_folder), "move")["resolution"] == 128
    assert defaults_for("shapes", "move")["resolution"] == 64
    # configs/shapes-v2.yaml inherits shapes.yaml: only its own size and its composite's colour
    # matching (its VAE shifts flat colours) differ
    for mode in ("move", "drag", "appearance"):
        v1, v2 = defaults_for("shapes", mode), defaults_for(str(v2_folder), mode)
        assert v2["guidance"]["energy_resolution"] == 128 and v2["composite_color_match"]
        v2["guidance"]["energy_resolution"] = v1["guidance"]["energy_resolution"]
        v2["composite_color_match"] = v1["composite_color_match"]
        assert {**v2, "resolution": 64} == v1, mode
    # results depend on the VAE too: a retrained VAE is a different model
    unet_only = sampled_hash([v2_folder / "unet" / "diffusion_pytorch_model.safetensors"])
    assert weights_fingerprint(str(v2_folder)) != unet_only
    assert load_bundle(str(v2_folder)).weights_hash == weights_fingerprint(str(v2_folder))


def test_the_bundle_codes_with_the_vae(v2_folder):
    """Factor 8 and 4 channels; a world scene survives the round trip (the VAE's held-out
    reconstruction is about 31 dB), in fp16 too with the VAE kept in fp32."""
    x = torch.from_numpy(world_batch(np.random.default_rng(5), 2, shapes_model.V2_SIZE))
    for dtype in ("fp32", "fp16"):
        b = load_bundle(str(v2_folder), device="cpu", dtype=dtype)
        assert b.family == "shapes-v2" and b.latent_factor == 8
        with torch.no_grad():
            z = b.encode_image(x)
            assert z.shape == (2, 4, 16, 16) and 0.5 < float(z.std()) < 2.0  # scaled latent
            rec = b.decode_latent(z).float().clamp(-1, 1)
        psnr = 10 * np.log10(4 / float((rec - x).pow(2).mean()))
        assert psnr > 26, (dtype, psnr)


def test_every_mode_runs_on_it_end_to_end(v2_folder, workdir):
    specs = [
        write_spec(
            workdir,
            f"v2_{m}.yaml",
            image="src.png",
            **MODE_FIELDS[m],
            model=str(v2_folder),
            steps=4,
            output=f"out/v2_{m}.png",
        )
        for m in ("move", "drag", "appearance")
    ]
    reports = api.edit(specs, api.EditOptions(cache_dir=workdir / "cache"))
    assert all(r.ok for r in reports), [r.errors for r in reports]
    source = np.asarray(Image.open(workdir / "src.png").convert("RGB"))
    for r in reports:
        out = np.asarray(Image.open(r.output).convert("RGB"))
        assert out.shape == source.shape
        sidecar = json.loads(r.output.with_suffix(".json").read_text())
        assert sidecar["spec"]["resolution"] == 128  # the family's defaults


def test_bench_quality_draws_its_cases_at_the_models_size(v2_folder, tmp_path):
    from typer.testing import CliRunner

    from dragonctl.cli import app

    args = ["bench", "quality", str(tmp_path / "q"), "--model", str(v2_folder), "--cases", "1"]
    r = CliRunner().invoke(app, [*args, "--mode", "move", "--steps", "4"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "q" / "quality.json").read_text())["size"] == 128
    assert Image.open(tmp_path / "q" / "move" / "move-00.png").size == (128, 128)


def test_the_committed_weights_fit_the_package_budget():
    """VAE + UNet + null prompt in fp16 under 16 MiB, and the UNet is the trainer's layout."""
    files = list(shapes_model.V2_DIR.rglob("*.safetensors"))
    assert {f.parent.name for f in files} >= {"unet", "vae"}
    assert sum(f.stat().st_size for f in files) <= 16 * 2**20
    config = json.loads((shapes_model.V2_DIR / "unet" / "config.json").read_text())
    for key, value in shapes_model.unet_v2_config().items():
        assert config[key] == (list(value) if isinstance(value, tuple) else value), key
    assert json.loads((shapes_model.V2_DIR / "training.json").read_text())["held_out_loss"] > 0
