"""SD 2.x and SDXL: told apart from SD 1.x by structure, loaded with their conditioning, edited
in every mode (tiny random components in diffusers' folder layout, offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import MODE_FIELDS, write_spec
from safetensors.torch import save_file

from dragonctl import api
from dragonctl.attention import MemoryBankAttnProcessor
from dragonctl.engine import Editor
from dragonctl.families import family_for_model
from dragonctl.features import decoder_features, feature_blocks
from dragonctl.inputs import load_inputs
from dragonctl.models import load_bundle
from dragonctl.spec import MODES, load_spec


def test_folders_and_checkpoints_are_told_apart_by_structure(
    tiny_sd, tiny_sd2, tiny_sdxl, tmp_path
):
    assert [family_for_model(str(f)) for f in (tiny_sd, tiny_sd2, tiny_sdxl)] == [
        "sd15",
        "sd2",
        "sdxl",
    ]
    assert family_for_model("shapes") == "shapes"
    # a folder renamed to look like another family is still what it is
    renamed = tmp_path / "stable-diffusion-xl-base-1.0"
    renamed.symlink_to(tiny_sd, target_is_directory=True)
    assert family_for_model(str(renamed)) == "sd15"
    # single checkpoints: the tensor names diffusers' own inference reads
    keys = {
        "sdxl": {"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (4,)},
        "sd2": {
            "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (
                320,
                1024,
            )
        },
        "sd15": {
            "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (
                320,
                768,
            )
        },
    }
    for family, tensors in keys.items():
        path = tmp_path / f"{family}-named-otherwise.safetensors"
        save_file({k: torch.zeros(shape) for k, shape in tensors.items()}, path)
        assert family_for_model(str(path)) == family


def test_spec_defaults_follow_the_family(tiny_sd2, tiny_sdxl, workdir):
    def spec(model) -> object:
        fields = dict(image="src.png", **MODE_FIELDS["move"], model=str(model))
        return load_spec(write_spec(workdir, "defaults.yaml", **fields)).spec

    sdxl, sd2 = spec(tiny_sdxl), spec(tiny_sd2)
    assert (sdxl.resolution, sd2.resolution) == (1024, 768)
    assert sdxl.guidance.energy_resolution == 768  # the strength derived from SD 1.5's


@pytest.mark.parametrize("fixture", ["tiny_sdxl", "tiny_sd2"])
def test_every_mode_edits_end_to_end(request, spec_for, workdir, fixture):
    folder = request.getfixturevalue(fixture)
    specs = [spec_for(m, name=f"{fixture}_{m}.yaml", model=str(folder), steps=4) for m in MODES]
    from typer.testing import CliRunner

    from dragonctl.cli import app

    r = CliRunner().invoke(app, ["edit", *map(str, specs), "--cache-dir", str(workdir / "cache")])
    assert r.exit_code == 0 and "5 done, 0 failed" in r.output, r.output
    reports = api.edit(specs, api.EditOptions(cache_dir=workdir / "cache", overwrite=True))
    assert all(r.ok for r in reports), [r.errors for r in reports]
    before = np.asarray(__import__("PIL.Image").Image.open(workdir / "src.png"))
    for r in reports:
        out = np.asarray(__import__("PIL.Image").Image.open(r.output).convert("RGB"))
        assert out.shape == before.shape and not np.array_equal(out, before), r.path


def test_sdxl_layers_follow_sd15s_rule(tiny_sd, tiny_sdxl, spec_for):
    """Memory bank: every decoder self-attention layer; features: the first two decoder blocks
    with cross-attention (SD 1.5: up_blocks 1 and 2; SDXL: 0 and 1)."""
    sd15, sdxl = load_bundle(str(tiny_sd)), load_bundle(str(tiny_sdxl))
    assert feature_blocks(sd15.unet) == (1, 2) and feature_blocks(sdxl.unet) == (0, 1)
    # tiny SDXL: 2 and 1 transformer layers per attention in up_blocks 0 and 1, 2 attentions each
    assert len(sdxl.decoder_self_attention) == 2 * 2 + 2 * 1
    assert {n.split(".")[1] for n in sdxl.decoder_self_attention} == {"0", "1"}
    installed = []

    def progress(phase: str, done: int, total: int) -> None:
        if phase == "editing" and not installed:
            procs = sdxl.unet.attn_processors
            installed.extend(n for n, p in procs.items() if isinstance(p, MemoryBankAttnProcessor))

    ls = load_spec(spec_for("drag", model=str(tiny_sdxl), steps=4))
    ran = []
    hooks = [
        b.register_forward_hook(lambda *_a, i=i: ran.append(i))
        for i, b in enumerate(sdxl.unet.up_blocks)
    ]
    Editor(sdxl).edit(ls.spec, load_inputs(ls), progress)
    for h in hooks:
        h.remove()
    assert sorted(installed) == sorted(sdxl.decoder_self_attention)
    assert ran.count(2) < ran.count(0)  # feature forwards stop after up_blocks 1


def test_sdxl_added_conditions_are_built_for_the_working_size(tiny_sdxl, spec_for):
    bundle = load_bundle(str(tiny_sdxl))
    seen = []
    bundle.unet.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(kwargs["added_cond_kwargs"]), with_kwargs=True
    )
    ls = load_spec(spec_for("move", model=str(tiny_sdxl), steps=3, resolution=128))
    editor = Editor(bundle)
    frame = editor.frame_for(load_inputs(ls).source, 128)
    editor.edit(ls.spec, load_inputs(ls))
    h, w = frame.work_h, frame.work_w
    assert seen and h != w  # the source is 56×40
    for added in seen:
        rows = added["time_ids"]
        assert rows.tolist() == [[h, w, 0, 0, h, w]] * len(rows)
        assert added["text_embeds"].shape == (len(rows), 32)  # the second encoder's projection


def test_sdxl_truncated_forward_gives_the_full_forwards_block_outputs(tiny_sdxl):
    bundle = load_bundle(str(tiny_sdxl), "cpu", "fp32")
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(481)
    ctx, added = bundle.condition(bundle.encode_prompt(["a photo", ""]), (8, 8))
    seen = {}
    hooks = [
        bundle.unet.up_blocks[i].register_forward_hook(
            lambda _m, _i, out, i=i: seen.__setitem__(i, out)
        )
        for i in (0, 1)
    ]
    with torch.no_grad():
        bundle.unet(z, t, encoder_hidden_states=ctx, added_cond_kwargs=added)
        ours = decoder_features(bundle.unet, z, t, ctx, added)
    for h in hooks:
        h.remove()
    for a, b in zip(ours, [seen[0], seen[1]]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sdxl_zero_noise_model_reconstructs_the_source_latent(tmp_path, spec_for):
    from dragonctl.bench.synthetic import save_sd_folder

    folder = save_sd_folder(tmp_path / "zero_xl", "tiny_sdxl", zero_unet=True)
    bundle = load_bundle(str(folder))
    ls = load_spec(
        spec_for("move", model=str(folder), offset=[0, 0], steps=5, guidance={"energy_scale": 0.0})
    )
    out = Editor(bundle).edit_latent(ls.spec, load_inputs(ls))
    assert torch.allclose(out.z0, out.trajectories[0][0], atol=1e-5)


def test_sdxl_in_fp16_decodes_in_fp32_and_edits(tiny_sdxl, spec_for):
    bundle = load_bundle(str(tiny_sdxl), dtype="fp16")
    assert bundle.decode_latent(torch.zeros(1, 4, 4, 4)).dtype == torch.float32
    ls = load_spec(spec_for("move", model=str(tiny_sdxl), steps=3))
    result = Editor(bundle).edit(ls.spec, load_inputs(ls))
    assert result.work_image.std() > 0 and np.isfinite(result.work_image).all()


def test_bench_speed_runs_at_tiny_sdxl_size():
    from dragonctl.bench import speed

    results = speed.run("tiny_sdxl", (64,), ("move",), steps=4, device="cpu", log=lambda m: None)
    row = results["runs"][0] if isinstance(results, dict) else results[0]
    assert row["unet_backward"] > 0 and row["plain_eager_s"] > 0


def test_a_hub_model_unknown_until_loaded_gets_its_familys_defaults(workdir, tiny_sdxl):
    """No network at spec time: an uncached hub id is read with SD 1.x's defaults, and merged again
    over its real family's once the model has loaded (the file's own fields kept)."""
    fields = dict(image="src.png", **MODE_FIELDS["move"], model="someone/an-sdxl-finetune", seed=7)
    ls = load_spec(write_spec(workdir, "hub.yaml", **fields))
    assert ls.family == "sd15" and ls.spec.resolution == 512
    again = ls.for_family("sdxl")
    assert (again.family, again.spec.resolution, again.spec.seed) == ("sdxl", 1024, 7)
    assert again.spec.offset == ls.spec.offset
