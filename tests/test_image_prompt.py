"""DiffEditor's image prompt: an IP-Adapter (tiny, random, in the published layout) loaded through
diffusers, its processors beside the memory bank's, its window, and its errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_spec
from typer.testing import CliRunner

from dragonctl.attention import (
    ImagePromptAttnProcessor,
    ImagePromptState,
    MemoryBankAttnProcessor,
)
from dragonctl.bench.synthetic import save_ip_adapter
from dragonctl.cli import app
from dragonctl.engine import Editor
from dragonctl.errors import ModelError, SpecError
from dragonctl.image_prompt import ImagePromptAdapter, load_image_prompt
from dragonctl.inputs import load_inputs
from dragonctl.models import load_bundle
from dragonctl.spec import load_spec


@pytest.fixture(scope="module")
def adapters(tiny_sd, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ip")
    return {
        "plus": save_ip_adapter(root / "plus", tiny_sd / "unet", plus=True),
        "plain": save_ip_adapter(root / "plain", tiny_sd / "unet", plus=False),
    }


def _edit(spec_path: Path, bundle=None) -> tuple[np.ndarray, object]:
    ls = load_spec(spec_path)
    editor = Editor(bundle or load_bundle(ls.spec.model))
    result = editor.edit(ls.spec, load_inputs(ls))
    return result.work_image.astype(int), result.stats


@pytest.mark.parametrize("kind", ["plus", "plain"])
def test_adapter_loads_through_diffusers_and_leaves_the_unet_as_it_was(tiny_sd, adapters, kind):
    bundle = load_bundle(str(tiny_sd))
    unet = bundle.unet
    z, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor(500), torch.randn(1, 77, 32)
    before = unet(z, t, ctx).sample
    kinds = {n: type(p) for n, p in unet.attn_processors.items()}
    weights = adapters[kind]
    for location in (weights, weights.parent):  # the file, or the folder holding it
        loaded = load_image_prompt(unet, str(location))
        assert len(loaded.key_value) == sum(".attn2." in n for n in kinds) == 7
        tokens = loaded.tokens(np.full((40, 56, 3), 200, np.uint8), cfg=True)
        assert tokens.shape == (2, 16 if kind == "plus" else 4, 32)
        assert not torch.equal(tokens[0], tokens[1])  # the unconditional row: a zero image
    assert unet.encoder_hid_proj is None and unet.config.encoder_hid_dim_type is None
    assert {n: type(p) for n, p in unet.attn_processors.items()} == kinds
    assert torch.equal(unet(z, t, ctx).sample, before)


def test_processor_adds_the_image_tokens_to_generation_rows_only():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=16, heads=4, dim_head=8)
    to_k, to_v = torch.nn.Linear(16, 32, bias=False), torch.nn.Linear(16, 32, bias=False)
    state = ImagePromptState()
    x, text, image = torch.randn(3, 10, 32), torch.randn(3, 7, 16), torch.randn(2, 5, 16)
    plain = AttnProcessor2_0()(attn, x, text)
    proc = ImagePromptAttnProcessor(state, to_k, to_v)
    assert torch.allclose(proc(attn, x, text), plain, atol=1e-6)  # not prompting
    with state.prompting(image, 0.5, n_skip=1):
        prompted = proc(attn, x, text)
    with state.prompting(image, 0.0, n_skip=1):
        assert torch.allclose(proc(attn, x, text), plain, atol=1e-6)
    assert torch.allclose(prompted[:1], plain[:1], atol=1e-6)  # the bank row
    assert (prompted[1:] - plain[1:]).abs().min() > 0


def test_image_prompt_changes_the_edit_when_on_not_at_scale_zero(tiny_sd, spec_for, adapters):
    bundle = load_bundle(str(tiny_sd))
    folder = str(adapters["plus"].parent)
    window = {"from": 0.0, "until": 1.0}
    off, _ = _edit(spec_for("move", model=str(tiny_sd)), bundle)
    zero, zero_stats = _edit(
        spec_for(
            "move",
            model=str(tiny_sd),
            guidance={"image_prompt": {"adapter": folder, "scale": 0.0, **window}},
        ),
        bundle,
    )
    on, stats = _edit(
        spec_for(
            "move",
            model=str(tiny_sd),
            guidance={"image_prompt": {"adapter": folder, "scale": 1.0, **window}},
        ),
        bundle,
    )
    assert np.array_equal(zero, off) and zero_stats.image_prompt_steps == 0
    assert stats.image_prompt_steps == 4 and np.abs(on - off).mean() > 1


def test_both_processor_kinds_are_installed_during_the_edit(tiny_sd, spec_for, adapters):
    """Cross-attention reads the image prompt and decoder self-attention the memory bank, in
    the same forward; afterwards the UNet has its own processors again."""
    bundle = load_bundle(str(tiny_sd))
    kinds = {n: type(p) for n, p in bundle.unet.attn_processors.items()}
    seen: list[dict] = []

    def progress(phase: str, done: int, total: int) -> None:
        if phase == "editing":
            seen.append({n: type(p) for n, p in bundle.unet.attn_processors.items()})

    image_prompt = {"adapter": str(adapters["plus"]), "scale": 1.0, "from": 0.0, "until": 1.0}
    ls = load_spec(spec_for("drag", model=str(tiny_sd), guidance={"image_prompt": image_prompt}))
    Editor(bundle).edit(ls.spec, load_inputs(ls), progress)
    during = seen[0]
    cross = {n for n in during if ".attn2." in n}
    decoder_self = set(bundle.decoder_self_attention)
    assert cross and all(during[n] is ImagePromptAttnProcessor for n in cross)
    assert decoder_self and all(during[n] is MemoryBankAttnProcessor for n in decoder_self)
    assert {n: type(p) for n, p in bundle.unet.attn_processors.items()} == kinds


@pytest.mark.parametrize("mode,shown", [("move", "source"), ("paste", "reference")])
def test_the_prompt_image_is_the_source_or_the_reference(
    tiny_sd, spec_for, adapters, monkeypatch, mode, shown
):
    images = []
    original = ImagePromptAdapter.tokens

    def spy(self, image, cfg):
        images.append(image)
        return original(self, image, cfg)

    monkeypatch.setattr(ImagePromptAdapter, "tokens", spy)
    ls = load_spec(
        spec_for(
            mode, model=str(tiny_sd), guidance={"image_prompt": {"adapter": str(adapters["plus"])}}
        )
    )
    inp = load_inputs(ls)
    Editor(load_bundle(str(tiny_sd))).edit(ls.spec, inp)
    assert len(images) == 1 and images[0] is getattr(inp, shown)


def test_diffeditor_with_the_image_prompt_runs_the_reference_schedule(tiny_sd, spec_for, adapters):
    """D+ over 50 steps: guidance at 0..9 and the even steps 10..28 (20 steps), time travel at
    22, 24, 26, 28 (3 passes each: 8 more guided passes, 8 re-noises), SDE at 11..19, the image
    prompt at 10..19 (the reference's defaults: scale 0.1, from 0.2 until 0.4)."""
    ls = load_spec(
        spec_for(
            "move",
            model=str(tiny_sd),
            steps=50,
            guidance={"method": "diffeditor", "image_prompt": {"adapter": str(adapters["plus"])}},
        )
    )
    ip = ls.spec.guidance.image_prompt
    assert (ip.scale, ip.start, ip.until, ip.encoder) == (0.1, 0.2, 0.4, None)
    stats = Editor(load_bundle(str(tiny_sd))).edit(ls.spec, load_inputs(ls)).stats
    # two backwards per guided pass: the edit energy's, the content energy's
    assert stats.guided_steps == 20 + 4 * 2 and stats.unet_backward == 2 * 28
    assert stats.sde_steps == 9
    assert stats.image_prompt_steps == 10
    full_forwards = 50 + 4 * 2  # CFG pairs, time travel's repeats included
    assert stats.unet_forward == full_forwards + 8 + 2 * 28
    assert len([r for r in stats.forward_rows if r == 1]) == 8  # the re-noises: no CFG, no bank


def test_spec_errors_name_the_field(tiny_sd, spec_for, workdir, adapters):
    with pytest.raises(SpecError, match="guidance.image_prompt: the shapes model"):
        load_spec(spec_for("move", model="shapes", guidance={"image_prompt": {"adapter": "x"}}))
    with pytest.raises(SpecError, match="guidance.image_prompt.from"):
        load_spec(spec_for("move", guidance={"image_prompt": {"adapter": "x", "from": 2}}))
    with pytest.raises(SpecError, match="guidance.image_prompt: .*from .* is after until"):
        load_spec(spec_for("move", guidance={"image_prompt": {"from": 0.5, "until": 0.3}}))
    for adapter, why in [
        ("./missing", "guidance.image_prompt.adapter: no such file or folder"),
        ("h94/IP-Adapter", "name the weights file inside the repository"),
    ]:
        ls = load_spec(spec_for("move", guidance={"image_prompt": {"adapter": adapter}}))
        with pytest.raises(SpecError, match=why):
            load_inputs(ls)
    # a local path is relative to the spec file, and made absolute
    shutil.copytree(adapters["plus"].parent, workdir / "adapters" / "plus")
    ls = load_spec(spec_for("move", guidance={"image_prompt": {"adapter": "adapters/plus"}}))
    assert load_inputs(ls).image_prompt == (str((workdir / "adapters" / "plus").resolve()), None)


def test_adapters_that_cannot_load_fail_the_spec_with_one_line(
    tiny_sd, spec_for, workdir, adapters
):
    empty = workdir / "empty_adapter"
    empty.mkdir()
    unet = load_bundle(str(tiny_sd)).unet
    with pytest.raises(ModelError, match="guidance.image_prompt.adapter: no IP-Adapter weights"):
        load_image_prompt(unet, str(empty))
    pickle = workdir / "ip.bin"
    pickle.write_bytes(b"not read")
    with pytest.raises(ModelError, match="is a pickle"):
        load_image_prompt(unet, str(pickle))
    no_encoder = workdir / "no_encoder"
    no_encoder.mkdir()
    (no_encoder / adapters["plus"].name).write_bytes(adapters["plus"].read_bytes())
    with pytest.raises(ModelError, match="guidance.image_prompt.adapter: cannot load"):
        load_image_prompt(unet, str(no_encoder))
    # with the encoder named, the same folder loads
    loaded = load_image_prompt(
        unet, str(no_encoder), str(adapters["plus"].parent / "image_encoder")
    )
    assert len(loaded.key_value) == 7

    spec = write_spec(
        workdir,
        "bad_adapter.yaml",
        image="src.png",
        mode="move",
        mask="mask.png",
        offset=[16, 4],
        model=str(tiny_sd),
        steps=4,
        resolution=32,
        guidance={"image_prompt": {"adapter": "empty_adapter"}},
    )
    r = CliRunner().invoke(app, ["edit", str(spec), "--no-cache"])
    assert r.exit_code == 1
    assert f"{spec}: guidance.image_prompt.adapter: no IP-Adapter weights" in r.output
    assert "Traceback" not in r.output
    assert not (workdir / "bad_adapter.png").exists()


def test_fp16_edit_with_the_image_prompt(tiny_sd, spec_for, adapters):
    """The adapter takes the model's dtype: an fp16 edit on the CPU runs and stays finite."""
    bundle = load_bundle(str(tiny_sd), dtype="fp16")
    image_prompt = {"adapter": str(adapters["plus"]), "scale": 1.0, "from": 0.0, "until": 1.0}
    out, stats = _edit(
        spec_for("move", model=str(tiny_sd), guidance={"image_prompt": image_prompt}), bundle
    )
    assert stats.image_prompt_steps == 4 and out.std() > 0
