"""The model bundle: sources, structure found by structure, clear errors."""

from __future__ import annotations

import pytest
import torch

from dragonctl.errors import ModelError
from dragonctl.models import load_bundle, pick_dtype


def test_folder_loads_with_structure_found(tiny_sd):
    b = load_bundle(str(tiny_sd))
    assert b.family == "sd15" and b.latent_factor == 2 and b.size_multiple == 8
    assert b.dtype == torch.float32 and b.device.type == "cpu"
    # every decoder self-attention of the tiny UNet (up_blocks 1 and 2 × 2 layers), none elsewhere
    assert len(b.decoder_self_attention) == 4
    assert all(
        n.startswith(("up_blocks.1.", "up_blocks.2.")) and ".attn1." in n
        for n in b.decoder_self_attention
    )
    z = b.encode_image(torch.zeros(1, 3, 16, 16))
    assert z.shape == (1, 4, 8, 8) and b.decode_latent(z).shape == (1, 3, 16, 16)
    assert b.encode_prompt(["a cat", ""]).shape[:2] == (2, 77)


def test_v_prediction_is_read_from_the_scheduler(tiny_sd_v):
    assert load_bundle(str(tiny_sd_v)).prediction_type == "v_prediction"


def test_unet_without_the_decoder_the_method_needs(tmp_path, tiny_sd):
    import shutil

    from diffusers import UNet2DConditionModel

    folder = tmp_path / "flat"
    shutil.copytree(tiny_sd, folder)
    UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 32),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).save_pretrained(folder / "unet")
    with pytest.raises(ModelError, match="at least two cross-attention blocks"):
        load_bundle(str(folder))


def test_unet_with_inputs_the_feature_forward_lacks_is_refused_at_load(tmp_path, tiny_sd):
    import json
    import shutil

    folder = tmp_path / "classy"
    shutil.copytree(tiny_sd, folder)
    cfg_path = folder / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["center_input_sample"] = True
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="center_input_sample are not supported"):
        load_bundle(str(folder))


@pytest.mark.parametrize(
    "name,data,message",
    [
        (
            "model.ckpt",
            b"not loaded",
            "--allow-pickle",
        ),  # pickle formats are refused before any read
        (
            "model.safetensors",
            b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}",
            "cannot load as a single-file SD checkpoint",
        ),
    ],
)
def test_bad_checkpoint_files_are_clear_errors(tmp_path, name, data, message):
    ckpt = tmp_path / name
    ckpt.write_bytes(data)
    with pytest.raises(ModelError, match=message):
        load_bundle(str(ckpt))


def test_missing_local_model(tmp_path):
    with pytest.raises(ModelError, match="no such file or folder"):
        load_bundle(str(tmp_path / "nowhere.safetensors"))


def test_offline_hub_model_error_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelError) as e:
        load_bundle("stable-diffusion-v1-5/stable-diffusion-v1-5")
    msg = str(e.value)
    assert "not available offline" in msg and "hf download" in msg and "--model shapes" in msg


def test_dtype_policy():
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("auto", torch.device("cuda")) == torch.float16
    with pytest.raises(ModelError):
        pick_dtype("int8", torch.device("cpu"))
    assert load_bundle("shapes", dtype="fp16", device="cpu").dtype == torch.float16  # slow, works


def test_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a diffusers Stable Diffusion folder"):
        load_bundle(str(tmp_path / "empty"))


def test_families_are_told_from_the_model_not_its_name(tmp_path, tiny_sd):
    from dragonctl.families import family_for_model
    from dragonctl.spec import defaults_for

    assert family_for_model("shapes") == "shapes" and family_for_model(str(tiny_sd)) == "sd15"
    exported = tmp_path / "my-model"  # a folder the trainer exported: it holds a null prompt
    exported.mkdir()
    (exported / "null_prompt.safetensors").write_bytes(b"")
    assert family_for_model(str(exported)) == "shapes"
    assert defaults_for(str(exported), "move")["resolution"] == 64
    assert defaults_for(str(tiny_sd), "move")["resolution"] == 512


def test_a_hub_models_revision_and_weights_are_part_of_its_identity(tmp_path):
    """Two snapshots of one hub id in a hub cache: the one `refs/main` names is loaded, and its
    commit and weights tell its trajectories apart from the other's."""
    import json
    import os
    import subprocess
    import sys

    from dragonctl.bench.synthetic import save_sd_folder

    repo = tmp_path / "hub" / "models--org--tiny"
    commits = ["a" * 40, "b" * 40]
    for seed, sha in enumerate(commits):
        save_sd_folder(repo / "snapshots" / sha, seed=seed)
    (repo / "refs").mkdir()
    code = (
        "import json; from dragonctl.models import load_bundle\n"
        "print(json.dumps(load_bundle('org/tiny', device='cpu', local_files_only=True).identity))"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    identities = []
    for sha in commits:
        (repo / "refs" / "main").write_text(sha)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        identities.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert [i["revision"] for i in identities] == commits
    assert identities[0]["weights_hash"] != identities[1]["weights_hash"]


def test_the_cache_key_holds_everything_a_trajectory_depends_on():
    from dragonctl.cache import TrajectoryKey

    base = dict(
        image_bytes=b"png",
        identity={"model": "m", "revision": "a"},
        scheduler_config={"beta_end": 0.012},
        work_hw=(64, 64),
        steps=50,
        prompt="a cup",
    )
    key = TrajectoryKey.of(**base)
    assert TrajectoryKey.of(**base).digest() == key.digest()
    changes = [
        dict(image_bytes=b"png2"),
        dict(identity={"model": "m", "revision": "b"}),
        dict(scheduler_config={"beta_end": 0.02}),
        dict(work_hw=(64, 72)),
        dict(steps=30),
        dict(prompt="a mug"),
    ]
    digests = {TrajectoryKey.of(**{**base, **c}).digest() for c in changes}
    digests.add(TrajectoryKey.of(**base, refine=2).digest())
    assert len(digests) == len(changes) + 1 and key.digest() not in digests
    # the docstring lists every field
    assert all(f"{name}:" in TrajectoryKey.__doc__ for name in TrajectoryKey.__dataclass_fields__)
