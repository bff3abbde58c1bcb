"""DragBench protocol metrics on hand-made features and random weights (the real weights are not
bundled)."""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import save_file

from dragonctl.bench import dragbench_metrics as metrics
from dragonctl.models import load_bundle


def test_match_distance_finds_shifted_content():
    g = torch.Generator().manual_seed(0)
    src = torch.randn(16, 12, 20, generator=g)
    edited = torch.roll(src, shifts=(2, 5), dims=(1, 2))  # content moved 5 cells right, 2 down
    # features at the image's own resolution here: one cell per pixel
    handles = [(3.0, 4.0), (10.0, 6.0)]
    assert metrics.match_distance(src, edited, handles, [(8.0, 6.0), (15.0, 8.0)], (12, 20)) == 0.0
    assert metrics.match_distance(src, edited, handles, handles, (12, 20)) == np.hypot(5, 2)


def test_lpips_is_zero_on_identical_images_and_symmetric():
    torch.manual_seed(0)
    lp = metrics.LPIPS().eval()
    for h in lp.heads:
        torch.nn.init.uniform_(h.weight, 0, 1)  # LPIPS heads are non-negative
    a, b = torch.rand(2, 1, 3, 64, 64) * 2 - 1
    assert float(lp(a, a)[0]) == 0.0
    d_ab, d_ba = float(lp(a, b)[0]), float(lp(b, a)[0])
    assert d_ab > 0 and abs(d_ab - d_ba) < 1e-6


def test_lpips_weights_round_trip_through_a_file(tmp_path):
    lp = metrics.LPIPS()
    save_file(
        {k: v.contiguous() for k, v in lp.state_dict().items()}, tmp_path / "lpips.safetensors"
    )
    loaded = metrics.LPIPS.from_file(tmp_path / "lpips.safetensors")
    img = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    assert metrics.image_fidelity(loaded, img, img) == 1.0


def test_dift_features_on_a_tiny_model(tiny_sd):
    b = load_bundle(str(tiny_sd))
    img = np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    f = metrics.dift_features(b, img, "a photo", ensemble=2)
    # up_blocks[1] output of the tiny UNet: 64 channels at half the latent size (latent 16×24)
    assert f.shape == (64, 16, 24) and torch.isfinite(f).all()
    again = metrics.dift_features(b, img, "a photo", ensemble=2)
    assert torch.equal(f, again)  # seeded noise ensemble


def test_published_lpips_weights_convert_to_the_projects_file(tmp_path):
    """Files laid out as torchvision's AlexNet and the lpips package's heads, built in code."""
    from typer.testing import CliRunner

    from dragonctl.bench.dragbench_metrics import ALEXNET_CONVS, LPIPS
    from dragonctl.cli import app

    ref = LPIPS()
    alexnet = {
        f"features.{i}.{p}": getattr(ref.net.convs[k], p).detach().clone()
        for k, i in enumerate(ALEXNET_CONVS)
        for p in ("weight", "bias")
    }
    alexnet["classifier.1.weight"] = torch.zeros(4, 4)  # what the converter leaves out
    heads = {
        f"lin{k}.model.1.weight": h.weight.detach().abs().clone() for k, h in enumerate(ref.heads)
    }
    torch.save(alexnet, tmp_path / "alexnet-owt.pth")
    torch.save(heads, tmp_path / "alex.pth")
    out = tmp_path / "lpips.safetensors"
    r = CliRunner().invoke(
        app,
        [
            "bench",
            "convert-lpips",
            str(tmp_path / "alexnet-owt.pth"),
            str(tmp_path / "alex.pth"),
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    loaded = LPIPS.from_file(out)
    assert torch.equal(loaded.net.convs[2].weight, ref.net.convs[2].weight)
    assert torch.equal(loaded.heads[4].weight, ref.heads[4].weight.abs())
    r = CliRunner().invoke(
        app,
        [
            "bench",
            "convert-lpips",
            str(tmp_path / "alex.pth"),
            str(tmp_path / "alex.pth"),
            str(out),
        ],
    )  # heads given as AlexNet
    assert r.exit_code == 1 and "no features.0.weight" in r.output
