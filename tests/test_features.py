"""The truncated decoder forward against the UNet's own forward."""

from __future__ import annotations

import pytest
import torch

from dragonctl.features import decoder_features
from dragonctl.models import load_bundle


def _full_forward_outputs(unet, z, t, ctx, blocks):
    """up_blocks outputs captured by hooks during diffusers' complete forward."""
    seen = {}
    handles = [
        unet.up_blocks[i].register_forward_hook(lambda _m, _i, out, i=i: seen.__setitem__(i, out))
        for i in blocks
    ]
    try:
        unet(z, t, encoder_hidden_states=ctx)
    finally:
        for h in handles:
            h.remove()
    return [seen[i] for i in blocks]


@pytest.mark.parametrize("model", ["tiny_sd", "shapes"])
@pytest.mark.parametrize(
    "hw", [(8, 8), (6, 10)]
)  # (6, 10): sizes the upsamplers cannot reach by doubling
def test_truncated_forward_gives_the_full_forwards_block_outputs(request, model, hw):
    bundle = load_bundle(
        str(request.getfixturevalue(model)) if model == "tiny_sd" else model, "cpu", "fp32"
    )
    unet = bundle.unet
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, unet.config.in_channels, *hw, generator=g)
    ctx = bundle.encode_prompt(["a photo", ""])
    t = torch.tensor(481)
    for blocks in [(1, 2), (2, 1), (1,)]:
        with torch.no_grad():
            ours = decoder_features(unet, z, t, ctx, blocks=blocks)
            theirs = _full_forward_outputs(unet, z, t, ctx, blocks)
        assert [f.shape for f in ours] == [f.shape for f in theirs]
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_truncated_forward_runs_no_later_block(tiny_sd):
    unet = load_bundle(str(tiny_sd), "cpu", "fp32").unet
    ran = []
    handles = [
        b.register_forward_hook(lambda *_a, i=i: ran.append(i))
        for i, b in enumerate(unet.up_blocks)
    ]
    handles.append(unet.conv_out.register_forward_hook(lambda *_a: ran.append("conv_out")))
    try:
        decoder_features(
            unet,
            torch.randn(1, 4, 8, 8),
            torch.tensor(1),
            torch.randn(1, 77, unet.config.cross_attention_dim),
        )
    finally:
        for h in handles:
            h.remove()
    assert ran == [0, 1, 2]


def test_unets_with_extra_embeddings_are_refused(tiny_sd):
    unet = load_bundle(str(tiny_sd), "cpu", "fp32").unet
    unet.register_to_config(center_input_sample=True)
    with pytest.raises(ValueError, match="center_input_sample"):
        decoder_features(
            unet,
            torch.randn(1, 4, 8, 8),
            torch.tensor(1),
            torch.randn(1, 77, unet.config.cross_attention_dim),
        )


@pytest.mark.slow  # torch.compile on the CPU: CI's second stage
def test_compiled_features_are_one_graph_per_shape_with_the_same_gradients(tiny_sd):
    """Under `--compile` the guided steps' forward and backward are captured whole: one graph per
    batch shape, none per timestep, and AOT autograd's backward gives eager's gradients."""
    from dragonctl.compilation import feature_forward

    unet = load_bundle(str(tiny_sd), "cpu", "fp32").unet
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 4, 8, 8, generator=g)
    ctx = torch.randn(3, 77, unet.config.cross_attention_dim, generator=g)
    graphs = []

    def counting(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    counted = feature_forward(unet, "default", counting)
    for t in (1, 481, 961):
        counted(z, torch.tensor(t), ctx)
    assert len(graphs) == 1  # no graph break, no recompile per timestep

    def grads(features):
        zz = z.clone().requires_grad_(True)
        f1, f2 = features(zz, torch.tensor(481), ctx)
        (g_z,) = torch.autograd.grad(f1.square().mean() + f2.abs().mean(), [zz])
        return g_z

    torch._dynamo.reset()
    eager, compiled = (
        grads(feature_forward(unet)),
        grads(feature_forward(unet, "default", "aot_eager")),
    )
    assert eager.abs().max() > 0
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()
