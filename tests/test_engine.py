"""The engine on tiny SD models built in code: DDIM arithmetic, memory bank, modes, cache,
counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import save_png, write_spec

from dragonctl import api, geometry
from dragonctl.attention import BankAttention, BankState, MemoryBankAttnProcessor
from dragonctl.cache import TrajectoryCache
from dragonctl.engine import Editor, step_windows
from dragonctl.inputs import load_inputs
from dragonctl.inversion import invert
from dragonctl.models import load_bundle
from dragonctl.modes import build_plan
from dragonctl.modes.appearance import transfer_statistics
from dragonctl.schedules import Schedule, StepPlan, ddim_step, to_eps
from dragonctl.spec import MODES, load_spec

SD_SCHED = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    steps_offset=1,
    num_train_timesteps=1000,
    clip_sample=False,
)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_inversion_then_sampling_is_exact_for_a_constant_noise_model(prediction_type):
    sched = Schedule.from_config({**SD_SCHED, "prediction_type": prediction_type}, 12)
    z0 = torch.randn(1, 4, 6, 5, dtype=torch.float64)
    noise = torch.randn_like(z0) if prediction_type == "v_prediction" else torch.zeros_like(z0)
    alpha_of = dict(zip(sched.timesteps, sched.alpha))

    def model(
        z, t
    ):  # the raw output whose ε is `noise` (zero for epsilon: the zeroed conv_out case)
        a = alpha_of[t]
        return noise if prediction_type == "epsilon" else (noise - (1 - a) ** 0.5 * z) / a**0.5

    def eps_fn(z, t):
        return to_eps(model(z, t), z, alpha_of[t], prediction_type)

    traj = invert(eps_fn, z0, sched)
    assert traj.shape[0] == 13 and not torch.allclose(traj[-1], z0)
    z = traj[-1]
    for i, t in enumerate(sched.timesteps):
        z = ddim_step(z, eps_fn(z, t), sched.alpha[i], sched.alpha_prev[i])
        assert torch.allclose(z, traj[12 - i - 1], atol=1e-9)
    assert torch.allclose(z, z0, atol=1e-9)


def test_step_plan_reproduces_the_reference_schedules(spec_for):
    # the shapes model's windows, guided (its copies are reconstructed at energy 0)
    g = load_spec(spec_for("move", model="shapes", guidance={"energy_scale": 0.6})).spec.guidance

    def plan(guidance, steps=50):
        return StepPlan.build(step_windows(guidance), steps)

    d = plan(g)
    assert d.guided == frozenset(range(30)) and not d.sde and not d.time_travel
    assert d.injected == frozenset(range(5, 50))
    dp = plan(g.model_copy(update={"method": "diffeditor"}))
    assert dp.guided == frozenset(range(10)) | frozenset(range(10, 30, 2))
    assert dp.sde == frozenset(range(11, 20)) and dp.time_travel == frozenset({22, 24, 26, 28})
    assert [dp.passes(i) for i in (21, 22)] == [1, 3]
    app = load_spec(spec_for("appearance", model="org/sd15-like")).spec.guidance  # SD's family
    assert plan(app).injected == frozenset(range(36))
    assert not plan(g.model_copy(update={"energy_scale": 0.0})).guided


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sd_v"])
def test_no_energy_and_no_injection_equals_plain_ddim_with_cfg(request, spec_for, fixture):
    """Against diffusers' own DDIMScheduler loop from the same z_T: an independent
    implementation."""
    from diffusers import DDIMScheduler

    folder = request.getfixturevalue(fixture)
    bundle = load_bundle(str(folder))
    spec = load_spec(
        spec_for(
            "move",
            model=str(folder),
            offset=[0, 0],
            steps=6,
            prompt="a red box",
            guidance={"energy_scale": 0.0, "inject_from": 1.0, "cfg_scale": 3.0},
        )
    ).spec
    inp = load_inputs(load_spec(spec_for("move", model=str(folder), offset=[0, 0])))
    out = Editor(bundle).edit_latent(spec, inp)
    z, stats, traj = out.z0, out.stats, out.trajectories[0]
    assert stats.unet_backward == 0 and stats.unet_forward == 6
    sched = DDIMScheduler.from_config(bundle.scheduler_config)
    sched.set_timesteps(6)
    ref = traj[-1].clone()
    with torch.no_grad():
        ctx = torch.cat([bundle.encode_prompt([""]), bundle.encode_prompt(["a red box"])])
        for t in sched.timesteps:
            out = bundle.unet(torch.cat([ref, ref]), t, encoder_hidden_states=ctx).sample
            u, c = out.chunk(2)
            ref = sched.step(u + 3.0 * (c - u), t, ref, eta=0.0).prev_sample
    assert torch.allclose(z, ref, atol=1e-4, rtol=1e-4), (z - ref).abs().max()


def test_zero_noise_model_reconstructs_the_source_latent(tmp_path, spec_for):
    from dragonctl.bench.synthetic import save_sd_folder

    folder = save_sd_folder(tmp_path / "zero", zero_unet=True)
    bundle = load_bundle(str(folder))
    spec = load_spec(
        spec_for("move", model=str(folder), offset=[0, 0], steps=5, guidance={"energy_scale": 0.0})
    ).spec
    inp = load_inputs(load_spec(spec_for("move", model=str(folder), offset=[0, 0])))
    out = Editor(bundle).edit_latent(spec, inp)
    assert torch.allclose(out.z0, out.trajectories[0][0], atol=1e-5)


def _attn_layer(tiny_sd):
    bundle = load_bundle(str(tiny_sd))
    name = bundle.decoder_self_attention[0]
    module = bundle.unet.get_submodule(name.rsplit(".processor", 1)[0])
    return module


def test_injection_processors_reproduce_default_attention_on_their_own_kv(tiny_sd):
    from diffusers.models.attention_processor import AttnProcessor2_0

    attn = _attn_layer(tiny_sd)
    x = torch.randn(1, 24, attn.to_q.in_features)
    default = AttnProcessor2_0()(attn, x)
    every = np.ones((4, 6), dtype=bool)
    for mode in ("replace", "concat", "composite"):
        state = BankState()
        state.configure(
            BankAttention(mode, base_keep=every, ref_keep=every), (4, 6), torch.device("cpu")
        )
        n_bank = 2 if mode == "composite" else 1
        rows = torch.cat([x] * (n_bank + 1))
        with state.reading(0, n_bank):
            out = MemoryBankAttnProcessor(state)(attn, rows)
        assert state.mode == "off"  # switched on for one forward only
        assert torch.allclose(out[-1], default[0], atol=1e-5), mode
        assert torch.allclose(out[0], default[0], atol=1e-5)  # bank rows attend as usual


def test_replace_reads_the_bank_rows_kv(tiny_sd):
    from diffusers.models.attention_processor import AttnProcessor2_0

    attn = _attn_layer(tiny_sd)
    bank, gen = torch.randn(2, 1, 24, attn.to_q.in_features)
    state = BankState()
    state.configure(BankAttention("replace"), (4, 6), torch.device("cpu"))
    with state.reading(0, 1):
        out = MemoryBankAttnProcessor(state)(attn, torch.cat([bank, gen]))
    q = attn.to_q(gen)
    k, v = attn.to_k(bank), attn.to_v(bank)
    h = attn.heads
    split = lambda t: t.view(1, -1, h, t.shape[-1] // h).transpose(1, 2)  # noqa: E731
    expected = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    expected = attn.to_out[0](expected.transpose(1, 2).reshape(1, 24, -1))
    assert torch.allclose(out[1], expected[0], atol=1e-5)
    assert not torch.allclose(out[1], AttnProcessor2_0()(attn, gen)[0], atol=1e-3)


def test_regional_composite_confines_object_queries_to_the_reference_object(tiny_sd):
    attn = _attn_layer(tiny_sd)
    base, ref, gen = torch.randn(3, 1, 24, attn.to_q.in_features)
    obj = np.zeros((4, 6), dtype=bool)
    obj[1:3, 2:4] = True  # the generation's object: 4 of 24 tokens
    ref_obj = np.zeros((4, 6), dtype=bool)
    ref_obj[0:2, 0:3] = True  # the reference object: 6 tokens elsewhere
    h = attn.heads
    split = lambda t: t.view(1, -1, h, t.shape[-1] // h).transpose(1, 2)  # noqa: E731

    def attend(q_rows, kv_rows):
        q, k, v = attn.to_q(q_rows), attn.to_k(kv_rows), attn.to_v(kv_rows)
        o = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
        return attn.to_out[0](o.transpose(1, 2).reshape(1, q_rows.shape[1], -1))[0]

    def composite(query_region):
        state = BankState()
        reading = BankAttention(
            "composite", base_keep=~obj, ref_keep=ref_obj, query_region=query_region
        )
        state.configure(reading, (4, 6), torch.device("cpu"))
        with state.reading(0, 2):
            return MemoryBankAttnProcessor(state)(attn, torch.cat([base, ref, gen]))[2]

    out_shared, out = composite(None), composite(obj)
    inside, outside = torch.from_numpy(obj.flatten()), torch.from_numpy(~obj.flatten())
    ref_obj = torch.from_numpy(ref_obj)
    ref_tokens = ref[:, ref_obj.flatten()]
    base_tokens = base[:, outside]
    for region, kv in ((inside, ref_tokens), (outside, base_tokens)):
        assert torch.allclose(out[region], attend(gen, kv)[region], atol=1e-5)
    shared_kv = torch.cat([base_tokens, ref_tokens], dim=1)
    assert torch.allclose(out_shared, attend(gen, shared_kv), atol=1e-5)
    assert not torch.allclose(out[inside], out_shared[inside], atol=1e-3)


@pytest.mark.slow  # torch.compile on the CPU: CI's second stage
@pytest.mark.parametrize(
    "mode,guidance", [("move", {}), ("appearance", {"regional_attention": True})]
)
def test_compiled_forward_edits_the_same_and_compiles_per_shape_not_per_step(
    tiny_sd, spec_for, mode, guidance
):
    """`--compile` must capture each batch shape once: timesteps are tensors and the bank's token
    indices are fixed before the loop, so neither the step nor a second edit triggers a
    recompile."""
    graphs = []

    def counting_backend(gm, _example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    bundle = load_bundle(str(tiny_sd))
    editor = Editor(bundle, compile="default", compile_backend=counting_backend)
    counts = []
    for steps in (6, 12):  # a second edit, at another step count (6 has every batch shape)
        ls = load_spec(spec_for(mode, model=str(tiny_sd), steps=steps, guidance=guidance))
        inp = load_inputs(ls)
        compiled = editor.edit(ls.spec, inp)
        eager = Editor(bundle).edit(ls.spec, inp)
        assert np.array_equal(compiled.work_image, eager.work_image)
        counts.append(len(graphs))
    # full forwards: inversion (batch 1), plain CFG rows (2), CFG + bank rows (3 or 4); the guided
    # steps' truncated forwards (the bank rows without grad, two rows with): nothing more, however
    # many steps
    assert 2 <= counts[0] == counts[1] <= 6, counts
    torch._dynamo.reset()


@pytest.mark.slow  # torch.compile on the CPU: CI's second stage
def test_cuda_graph_compile_mode_edits_the_same(tiny_sd, spec_for):
    """`cudagraphs` (dynamo + AOT autograd, CUDA graphs of eager kernels) captures the full and the
    guided forwards with their backward; on a CPU the graphs run without CUDA graphs, same
    result."""
    torch._dynamo.reset()
    bundle = load_bundle(str(tiny_sd))
    ls = load_spec(spec_for("move", model=str(tiny_sd), steps=4))
    inp = load_inputs(ls)
    compiled = Editor(bundle, compile="cudagraphs").edit(ls.spec, inp)
    eager = Editor(bundle).edit(ls.spec, inp)
    assert np.abs(compiled.work_image.astype(int) - eager.work_image.astype(int)).max() <= 1
    torch._dynamo.reset()


def test_count_of_unet_calls_follows_the_diffeditor_schedule(tiny_sd, spec_for):
    bundle = load_bundle(str(tiny_sd))
    ls = load_spec(
        spec_for("move", model=str(tiny_sd), steps=20, guidance={"method": "diffeditor"})
    )
    stats = Editor(bundle).edit(ls.spec, load_inputs(ls)).stats
    # guided: 0..3 and 4, 6, 8, 10; time travel at step 10 (8 < i < 12, even): 3 passes, 2 re-
    # noises;
    # each guided pass: the bank's truncated forward (no grad) and the edited latent's (with grad),
    # then two backwards (the edit energy's, the content energy's)
    assert stats.guided_steps == 8 + 2
    assert stats.unet_backward == 2 * 10
    assert stats.unet_forward == 20 + 2 + 2 + 2 * 10


@pytest.mark.parametrize(
    "mode,guidance,bank_images",
    [("move", {}, 1), ("paste", {}, 2), ("resize", {}, 1)],
)
def test_the_loop_records_the_batch_rows_of_every_unet_call(
    tiny_sd, spec_for, mode, guidance, bank_images
):
    """What the speed bench's plain loop replays: bank rows on injected steps (two for modes
    that read a second image), CFG pairs, feature forwards."""
    bundle = load_bundle(str(tiny_sd))
    ls = load_spec(spec_for(mode, model=str(tiny_sd), steps=6, guidance=guidance))
    result = Editor(bundle).edit(ls.spec, load_inputs(ls))
    steps = StepPlan.build(step_windows(ls.spec.guidance), 6)
    assert result.bank_images == bank_images
    assert result.stats.forward_rows == [
        bank_images + 2 if i in steps.injected else 2 for i in range(6)
    ]
    assert result.stats.feature_rows == [bank_images, 1] * len(steps.guided)
    assert result.stats.backward_rows == [1, 1] * len(steps.guided)  # edit, then content energy
    # row-passes: every forward's rows, and the two backwards of each guided step's one row
    forward = sum(result.stats.forward_rows)
    assert result.stats.unet_row_passes == forward + (bank_images + 1 + 2) * len(steps.guided)


def test_initial_latent_copies_do_not_touch_the_bank(tiny_sd, spec_for):
    for mode, guidance in [
        ("move", {}),
        ("drag", {}),
        ("paste", {}),
        ("resize", {}),
        ("appearance", {"appearance_init": "reference_statistics"}),
    ]:
        ls = load_spec(spec_for(mode, model=str(tiny_sd), guidance=guidance))
        inp = load_inputs(ls)
        bundle = load_bundle(str(tiny_sd))
        frame = Editor(bundle).frame_for(inp.source, ls.spec.resolution)
        plan = build_plan(ls.spec, inp, frame, bundle.latent_factor)
        z = torch.randn(1, 4, frame.work_h // 2, frame.work_w // 2)
        z_ref = torch.randn_like(z)
        before = z.clone()
        out = plan.init_latent(z, z_ref)
        assert torch.equal(z, before), mode
        assert not torch.equal(out, z), mode


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sd_v"])
def test_every_mode_runs_end_to_end(request, spec_for, workdir, mode, fixture):
    folder = request.getfixturevalue(fixture)
    spec = spec_for(mode, model=str(folder), prompt="a box")
    reports = api.edit([spec], api.EditOptions(cache_dir=workdir / "cache"))
    assert reports[0].ok, reports[0].errors
    from PIL import Image

    out = reports[0].output
    with Image.open(out) as img:
        assert img.size == (56, 40)  # the source's exact size, though the model worked at 24×40
        assert "dragonctl" in img.text and img.text["parameters"].startswith("a box\nSteps: 4")


def test_diffeditor_method_runs_every_mode(tiny_sd, spec_for, workdir):
    specs = [
        spec_for(
            m, name=f"de_{m}.yaml", model=str(tiny_sd), steps=10, guidance={"method": "diffeditor"}
        )
        for m in MODES
    ]
    reports = api.edit(specs, api.EditOptions(no_cache=True))
    assert all(r.ok for r in reports), [r.errors for r in reports]


def test_cache_hit_runs_no_inversion(tiny_sd, spec_for, workdir):
    bundle = load_bundle(str(tiny_sd))
    calls = []
    bundle.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    ls = load_spec(spec_for("move", model=str(tiny_sd)))
    inp = load_inputs(ls)
    cache = TrajectoryCache(workdir / "cache")
    first = Editor(bundle, cache).edit(ls.spec, inp)
    n_first = len(calls)
    second = Editor(bundle, TrajectoryCache(workdir / "cache")).edit(ls.spec, inp)
    assert first.inversions == 1 and second.inversions == 0
    assert (
        n_first - (len(calls) - n_first) == ls.spec.steps
    )  # exactly the inversion's UNet calls were saved
    assert np.array_equal(first.image, second.image)


def test_processors_are_restored_after_an_edit(tiny_sd, spec_for):
    bundle = load_bundle(str(tiny_sd))
    before = {k: type(v) for k, v in bundle.unet.attn_processors.items()}
    ls = load_spec(spec_for("drag", model=str(tiny_sd)))
    Editor(bundle).edit(ls.spec, load_inputs(ls))
    assert {k: type(v) for k, v in bundle.unet.attn_processors.items()} == before


def test_same_spec_same_seed_gives_identical_bytes(tiny_sd, spec_for, workdir):
    spec = spec_for(
        "move", model=str(tiny_sd), guidance={"method": "diffeditor"}, steps=12, output="a.png"
    )
    api.edit([spec], api.EditOptions(no_cache=True, metadata=False))
    first = (workdir / "a.png").read_bytes()
    api.edit([spec], api.EditOptions(no_cache=True, metadata=False))
    assert (workdir / "a.png").read_bytes() == first
    api.edit([spec], api.EditOptions(no_cache=True, metadata=False, seed=5))
    assert (workdir / "a.png").read_bytes() != first  # the seed drives the SDE noise


def test_large_and_wide_sources_come_back_at_their_size(tiny_sd, workdir):
    img = np.random.default_rng(0).integers(0, 255, (37, 90, 3), dtype=np.uint8)
    save_png(workdir / "wide.png", img)
    spec = write_spec(
        workdir,
        "wide.yaml",
        image="wide.png",
        mode="drag",
        points=[[[89, 36], [60, 5]]],
        model=str(tiny_sd),
        steps=3,
        resolution=32,
    )
    rep = api.edit([spec], api.EditOptions(no_cache=True))[0]
    assert rep.ok, rep.errors
    from PIL import Image

    assert Image.open(rep.output).size == (90, 37)


def test_fixed_point_refinement_makes_inversion_retrace_the_trajectory():
    """For a smooth, non-constant ε model, plain inversion drifts and refinement retraces it."""
    sched = Schedule.from_config({**SD_SCHED, "prediction_type": "epsilon"}, 10)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 4, generator=g, dtype=torch.float64) * 0.3

    def eps_fn(z, t):  # a smooth nonlinear "network": mixes channels, depends on t
        return torch.tanh(torch.einsum("oc,bchw->bohw", w, z)) * (0.5 + t / 2000)

    z0 = torch.randn(1, 4, 6, 6, generator=g, dtype=torch.float64)
    errors = {}
    for refine in (0, 2, 6):
        z = invert(eps_fn, z0, sched, refine=refine)[-1]
        for i, t in enumerate(sched.timesteps):
            z = ddim_step(z, eps_fn(z, t), sched.alpha[i], sched.alpha_prev[i])
        errors[refine] = float((z - z0).abs().max())
    assert errors[2] < errors[0] / 5 and errors[6] < errors[2] / 50, errors


def test_injecting_a_refined_trajectory_reads_the_generation_s_own_noise_level(
    tiny_sd_v, spec_for, monkeypatch
):
    """A generation retracing a refined inversion, reading its own K/V from the bank, is the
    plain reconstruction: the bank rows at step i are L[n-i], where the inversion last called the
    UNet, not plain DDIM's L[n-1-i] (one step less noisy; that dissolved recoloured objects).
    (The tiny v-prediction model retraces its inversion; the tiny ε one is too rough to.)"""
    from dragonctl import sampler

    bundle = load_bundle(str(tiny_sd_v))

    def edit(inject_from: float) -> torch.Tensor:
        g = {"energy_scale": 0.0, "inject_from": inject_from, "inject_until": 1.0}
        ls = load_spec(
            spec_for("move", model=str(tiny_sd_v), offset=[0, 0], inversion_refine=10, guidance=g)
        )
        return Editor(bundle).edit_latent(ls.spec, load_inputs(ls)).z0

    plain = edit(1.0)
    gap = float((edit(0.0) - plain).abs().max())
    init = sampler.MemoryBank.__init__

    def plain_ddim_alignment(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.injected_offset = 1

    monkeypatch.setattr(sampler.MemoryBank, "__init__", plain_ddim_alignment)
    misaligned = float((edit(0.0) - plain).abs().max())
    assert gap < 0.2 * misaligned, (gap, misaligned)


def test_refinement_is_part_of_the_cache_key(tiny_sd, spec_for, workdir):
    bundle = load_bundle(str(tiny_sd))
    cache = TrajectoryCache(workdir / "cache")
    for refine, expected in ((0, 1), (0, 0), (1, 1)):
        ls = load_spec(spec_for("move", model=str(tiny_sd), inversion_refine=refine))
        assert Editor(bundle, cache).edit(ls.spec, load_inputs(ls)).inversions == expected


@pytest.mark.parametrize("mode", ["move", "drag", "paste"])
def test_stored_and_recomputed_memory_banks_give_the_same_edit(tiny_sd, spec_for, mode):
    bundle = load_bundle(str(tiny_sd))
    ls = load_spec(spec_for(mode, model=str(tiny_sd), steps=6))
    inp = load_inputs(ls)
    a = Editor(bundle).edit(ls.spec, inp)
    b = Editor(bundle, stored_kv=True).edit(ls.spec, inp)
    injected = len(StepPlan.build(step_windows(ls.spec.guidance), 6).injected)
    assert b.stats.unet_forward == a.stats.unet_forward + injected  # the recording pass
    assert b.stats.stored_kv_bytes > 0 and a.stats.stored_kv_bytes == 0
    assert np.abs(a.work_image.astype(int) - b.work_image.astype(int)).max() <= 1


SYNCING_OPS = {
    "_local_scalar_dense",
    "nonzero",
    "is_nonzero",
    "equal",
    "masked_select",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "item",
}


@pytest.mark.parametrize("mode", ["move", "drag", "appearance"])
def test_the_step_loops_make_no_host_round_trips(tiny_sd, spec_for, mode):
    """On a GPU these ops wait for the device (a value read to the host, or a data-dependent shape):
    none may run inside the inversion and edit loops. Checked on the CPU with a dispatch mode."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        active = False
        seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if self.active:
                name = func.overloadpacket.__name__
                bool_index = name in ("index", "index_put", "index_put_") and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])
                )
                if name in SYNCING_OPS or bool_index:
                    self.seen.append(f"{name} in {self.phase}")
            return func(*args, **(kwargs or {}))

    rec = Recorder()

    def progress(phase: str, done: int, total: int) -> None:
        # from the end of each loop's first step to its last: every later step runs inside
        rec.phase, rec.active = phase, done < total

    bundle = load_bundle(str(tiny_sd))
    ls = load_spec(
        spec_for(
            mode,
            model=str(tiny_sd),
            steps=12,
            guidance={"method": "diffeditor", "time_travel_repeats": 2},
        )
    )
    with rec:
        result = Editor(bundle).edit(ls.spec, load_inputs(ls), progress=progress)
    assert result.stats.guided_steps > 0 and result.inversions >= 1
    assert rec.seen == []


def _plan(tiny_sd, spec_path):
    ls = load_spec(spec_path)
    inp = load_inputs(ls)
    bundle = load_bundle(str(tiny_sd))
    frame = Editor(bundle).frame_for(inp.source, ls.spec.resolution)
    return build_plan(ls.spec, inp, frame, bundle.latent_factor), frame, inp


def test_plans_use_the_masks_as_drawn(tiny_sd, spec_for):
    """Nothing segments the user's mask: a loose box moves, pastes and recolours the whole box
    (the reference's way), and the paste's region starts from the placed reference's noise."""
    loose = {"box": [2, 10, 24, 34]}
    move, frame, inp = _plan(
        tiny_sd, spec_for("move", name="m.yaml", model=str(tiny_sd), mask=loose, resolution=56)
    )
    f = frame.work_h // move.latent_hw[0]
    target_w = frame.mask_to_work(inp.target_mask)  # the whole box, offset
    edit = move.edit_mask.numpy().repeat(f, 0).repeat(f, 1)
    assert edit[target_w].mean() > 0.9 and move.attention.mode == "replace"
    assert inp.target_mask.sum() == 22 * 24  # the box as drawn, not the red square inside it
    paste, _, _ = _plan(tiny_sd, spec_for("paste", model=str(tiny_sd), resolution=56))
    z, z_ref = torch.zeros(1, 4, *paste.latent_hw), torch.ones(1, 4, *paste.latent_hw)
    started = paste.init_latent(z, z_ref)[0, 0] == 1
    assert torch.equal(started, paste.edit_mask) and not paste.attention.ref_keep.all()
    assert paste.second_image is not None
    appearance, _, _ = _plan(tiny_sd, spec_for("appearance", model=str(tiny_sd), resolution=56))
    assert appearance.attention.mode == "composite" and appearance.second_image is not None


def test_transfer_statistics_moves_the_region_to_the_reference_statistics():
    g = torch.Generator().manual_seed(0)
    z, z_ref = torch.randn(1, 4, 8, 8, generator=g), 3 + 2 * torch.randn(1, 4, 8, 8, generator=g)
    region = torch.zeros(8, 8, dtype=torch.bool)
    region[2:6, 1:5] = True
    ref_region = torch.zeros(8, 8, dtype=torch.bool)
    ref_region[4:8, 4:8] = True
    out = transfer_statistics(z, region, z_ref, ref_region)
    assert torch.equal(out[..., ~region], z[..., ~region])
    a, b = out[..., region], z_ref[..., ref_region]
    assert torch.allclose(a.mean(-1), b.mean(-1), atol=1e-5) and torch.allclose(
        a.std(-1), b.std(-1), atol=1e-4
    )
    # each cell keeps its place in the region's layout: a per-channel increasing affine map of the
    # source's
    for c in range(4):
        assert torch.equal(torch.argsort(a[0, c]), torch.argsort(z[..., region][0, c]))


def test_appearance_can_start_from_the_reference_statistics(tiny_sd, spec_for):
    plain = _plan(tiny_sd, spec_for("appearance", model=str(tiny_sd)))[0]
    moved, frame, _ = _plan(
        tiny_sd,
        spec_for(
            "appearance",
            name="a2.yaml",
            model=str(tiny_sd),
            guidance={"appearance_init": "reference_statistics"},
        ),
    )
    z = torch.randn(1, 4, frame.work_h // 2, frame.work_w // 2)
    z_ref = torch.randn_like(z) + 5
    assert torch.equal(plain.init_latent(z, z_ref), z)
    out = moved.init_latent(z, z_ref)
    changed = (out != z).any(dim=1)[0]
    assert changed.any() and not (changed & ~moved.edit_mask).any()


def test_appearance_reads_the_reference_object_without_its_border(tiny_sd, spec_for):
    plan = _plan(tiny_sd, spec_for("appearance", model=str(tiny_sd), resolution=64))[0]
    keep = plan.attention.ref_keep
    green = (
        np.abs(plan.second_image.astype(int) - np.array([30, 200, 60])).sum(-1) < 120
    )  # the placed object
    lf = load_bundle(str(tiny_sd)).latent_factor
    assert keep.any() and keep.sum() < green.sum()
    assert not (
        geometry.dilate(keep, lf) & ~green
    ).any()  # a latent cell inside the object's outline
    line = np.zeros((8, 8), dtype=bool)
    line[3] = True
    assert np.array_equal(geometry.interior(line, 2), line)  # nothing would be left: kept whole
