"""One edit from decoded inputs to the result image: resize, encode, invert, sample, decode,
composite into the source; or several edits of one source in one batched loop.

`Editor` holds a loaded model bundle and the cache; it is what the API calls per spec (or per
group of specs with equal `Editor.batch_key`). This is where a spec's settings become the sampler's
plain values (`loop_settings`, `step_windows`).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from dragonctl.attention import BankControl, ImagePromptControl
from dragonctl.cache import TrajectoryCache, TrajectoryKey
from dragonctl.compilation import CUDA_GRAPH_MODES, feature_forward, unet_forward
from dragonctl.composite import composite, region_pixels
from dragonctl.errors import EditDiverged, EditInterrupted
from dragonctl.geometry import Frame, grid_ratio, working_size
from dragonctl.image_prompt import load_image_prompt
from dragonctl.inputs import EditInputs
from dragonctl.inversion import invert
from dragonctl.models import ModelBundle
from dragonctl.modes import EditPlan, build_plan
from dragonctl.progress import Progress
from dragonctl.sampler import (
    DIVERGED,
    ENERGY_UNIT,
    GuidanceSettings,
    ImagePromptRows,
    LoopEdit,
    MemoryBank,
    Prompts,
    SamplerStats,
    UNetCalls,
    guided_edits,
)
from dragonctl.schedules import Schedule, StepPlan, StepWindows, to_eps
from dragonctl.spec import Guidance, Spec, family_defaults


@dataclass
class EditResult:
    image: np.ndarray  # at the source's exact size, uint8 RGB
    work_image: np.ndarray  # at the working size
    frame: Frame
    composited: bool = False  # the edit blended into the source (else the whole image resized)
    edited_fraction: float = 1.0  # share of the source's pixels with any weight from the edit
    timings: dict[str, float] = field(default_factory=dict)
    stats: SamplerStats | None = None
    bank_images: int = 1  # images in the memory bank (2 for modes that read a second image)
    inversions: int = 0  # inversion passes run (0 when every trajectory came from the cache)
    inversion_unet_calls: int = 0
    warnings: list[str] = field(default_factory=list)


@dataclass
class EditSetup:
    """What `Editor.prepare` builds for one spec: the loop's inputs."""

    frame: Frame
    plan: EditPlan
    trajectories: list[torch.Tensor]
    prompts: Prompts
    settings: GuidanceSettings
    steps: StepPlan
    calls: UNetCalls
    image_prompt: tuple[ImagePromptControl, torch.Tensor, float] | None = None  # control, tokens
    contexts: list[torch.Tensor] = field(default_factory=list)  # each bank image's prompt
    inversions: int = 0  # inversion passes its trajectories took (0: all cached)
    inversion_unet_calls: int = 0


@dataclass
class EditedLatent:
    """An edit before decoding: what tests and the benchmarks inspect."""

    z0: torch.Tensor
    frame: Frame
    trajectories: list[torch.Tensor]  # the memory bank: the source's, then the second image's
    stats: SamplerStats
    changed: np.ndarray  # latent h×w bool: the cells the mode may change (edit and SDE regions)
    inversion_s: float
    editing_s: float
    inversions: int
    inversion_unet_calls: int


def loop_settings(g: Guidance, feature_hw: tuple[int, int], latent_factor: int) -> GuidanceSettings:
    """The loop's settings. The energies are means over cells, so their per-cell gradient falls
    with the grid's size: the gain grows with it, relative to the grid of a square
    `energy_resolution`² image, where `energy_scale` was tuned (terms over a fixed number of
    cells, such as drag's patches, undo this themselves)."""
    per_cell = grid_ratio(feature_hw, latent_factor, g.energy_resolution)
    return GuidanceSettings(
        cfg_scale=g.cfg_scale,
        energy_gain=g.gradient_scale * ENERGY_UNIT * g.energy_scale * per_cell,
        sde_strength=g.sde_strength,
        sde_strength_outside=g.sde_strength_outside,
    )


def step_windows(g: Guidance) -> StepWindows:
    ip = g.image_prompt if g.image_prompt is not None and g.image_prompt.active else None
    return StepWindows(
        method=g.method,
        guided=g.energy_scale > 0,
        guide_until=g.guide_until,
        dense_until=g.dense_until,
        inject_from=g.inject_from,
        inject_until=g.inject_until,
        sde_from=g.sde_from,
        sde_until=g.sde_until,
        time_travel_from=g.time_travel_from,
        time_travel_until=g.time_travel_until,
        time_travel_repeats=g.time_travel_repeats,
        image_prompt_from=ip.start if ip else 0.0,
        image_prompt_until=ip.until if ip else 0.0,
    )


def to_tensor(img: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(img).copy()).permute(2, 0, 1)[None].float()
    return x / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    x = ((x[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 0).cpu().numpy()


def bank_prompts(spec: Spec) -> list[str]:
    """The prompts of the bank images: the source's, then the second image's (the reference's
    own prompt, or the source's for a copy of the source such as resize's scaled copy)."""
    return [spec.prompt, spec.reference.prompt if spec.reference is not None else spec.prompt]


class Editor:
    """A loaded model and what it keeps between edits: compiled calls, attention processors,
    inverted trajectories (in memory, and in the disk cache)."""

    def __init__(
        self,
        bundle: ModelBundle,
        cache: TrajectoryCache | None = None,
        memo_size: int = 8,
        stored_kv: bool = False,
        compile: str = "off",
        compile_backend: str | Callable = "inductor",
        local_files_only: bool = False,
        allow_pickle: bool = False,
    ) -> None:
        if compile != "off" and stored_kv:
            # stored K/V are looked up per step inside the forward: it would recompile every step
            raise ValueError("compile works with recomputed K/V only")
        self.bundle = bundle
        self.stored_kv = stored_kv
        # a CUDA graph's backward is replayed once per forward: one copy of z per energy
        self.two_copies = compile in CUDA_GRAPH_MODES and bundle.device.type == "cuda"
        cond = bundle.condition
        self.forward = unet_forward(bundle.unet, bundle.dtype, compile, compile_backend, cond)
        self.features = feature_forward(bundle.unet, compile, compile_backend, cond)
        self.bank_control = BankControl(bundle.unet, bundle.decoder_self_attention)
        # image-prompt adapters, loaded once each (how they load: the bundle's own options)
        self._image_prompts: dict[tuple[str, str | None], ImagePromptControl] = {}
        self._adapter_options = dict(local_files_only=local_files_only, allow_pickle=allow_pickle)
        self.cache = cache or TrajectoryCache(enabled=False)
        self.inversions = 0
        self.inversion_unet_calls = 0
        # Recent trajectories stay in memory: a batch inverts each source once without a disk cache.
        self._memo: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._memo_size = memo_size

    def frame_for(
        self, source: np.ndarray, resolution: int, max_resolution: int | None = None
    ) -> Frame:
        h, w = source.shape[:2]
        size = working_size(h, w, resolution, self.bundle.size_multiple, max_resolution)
        return Frame(h, w, *size)

    @torch.no_grad()
    def trajectory(
        self,
        image_work: np.ndarray,
        image_bytes: bytes,
        prompt: str,
        schedule: Schedule,
        progress: Progress | None = None,
        refine: int = 0,
        should_stop: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """The inverted latents of an image at working size: cached, or by DDIM inversion
        (`should_stop` is polled after every inversion step; nothing is cached when it stops)."""
        b = self.bundle
        key = TrajectoryKey.of(
            image_bytes,
            b.identity,
            b.scheduler_config,
            image_work.shape[:2],
            schedule.steps,
            prompt,
            refine,
        )
        memo_key = key.digest()
        if memo_key in self._memo:
            self._memo.move_to_end(memo_key)
            return self._memo[memo_key]
        cached = self.cache.get(key)
        if cached is not None:
            return self._remember(memo_key, cached.to(b.device))
        z0 = b.encode_image(to_tensor(image_work)).float()
        ctx = b.encode_prompt([prompt])
        t_dev = torch.tensor(schedule.timesteps, device=b.device)
        step_of = {t: k for k, t in enumerate(schedule.timesteps)}
        done = 0

        def eps_fn(z: torch.Tensor, t: int) -> torch.Tensor:
            self.inversion_unet_calls += 1
            k = step_of[t]
            return to_eps(self.forward(z, t_dev[k], ctx), z, schedule.alpha[k], b.prediction_type)

        def tick() -> None:
            nonlocal done
            done += 1
            if progress:
                progress("inversion", done, schedule.steps)
            if should_stop and should_stop():
                raise EditInterrupted(f"interrupted at inversion step {done} of {schedule.steps}")

        latents = invert(eps_fn, z0, schedule, tick, refine)
        self.inversions += 1
        self.cache.put(key, latents)
        return self._remember(memo_key, latents)

    def memory_bank(
        self,
        spec: Spec,
        inp: EditInputs,
        frame: Frame,
        plan: EditPlan,
        schedule: Schedule,
        progress: Progress | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[torch.Tensor]:
        """The trajectories the edit reads: the source's, and the second image's when it has
        one."""
        refine = spec.inversion_refine
        source_work = frame.image_to_work(inp.source)
        bank = [
            self.trajectory(
                source_work, inp.source_bytes, spec.prompt, schedule, progress, refine, should_stop
            )
        ]
        if plan.second_image is not None:
            prompt = bank_prompts(spec)[1]
            second = plan.second_image
            bank.append(
                self.trajectory(
                    second, _image_key(second), prompt, schedule, progress, refine, should_stop
                )
            )
        return bank

    def forget_trajectories(self) -> None:
        """Drop the in-memory trajectories (the disk cache stays): the next edit inverts again."""
        self._memo.clear()

    def image_prompt_control(self, adapter: str, encoder: str | None) -> ImagePromptControl:
        """The processors of an IP-Adapter for this model (loaded on first use)."""
        key = (adapter, encoder)
        if key not in self._image_prompts:
            loaded = load_image_prompt(self.bundle.unet, adapter, encoder, **self._adapter_options)
            self._image_prompts[key] = ImagePromptControl(self.bundle.unet, loaded)
        return self._image_prompts[key]

    def _remember(self, key: str, latents: torch.Tensor) -> torch.Tensor:
        self._memo[key] = latents
        while len(self._memo) > self._memo_size:
            self._memo.popitem(last=False)
        return latents

    def batch_key(self, spec: Spec, inp: EditInputs) -> tuple | None:
        """Edits with equal keys can share one loop (`edit_batch`): the same source, prompt,
        working size, schedule and step plan. None: this edit runs alone (an image prompt is
        one edit's)."""
        steps = StepPlan.build(step_windows(spec.guidance), spec.steps)
        if steps.image_prompt and inp.image_prompt is not None:
            return None
        frame = self.frame_for(inp.source, spec.resolution, spec.max_resolution)
        return (
            hashlib.sha256(inp.source_bytes).hexdigest(),
            spec.prompt,
            (frame.work_h, frame.work_w),
            spec.steps,
            spec.inversion_refine,
            spec.guidance.cfg_scale,
            steps,
        )

    def default_max_batch(self) -> int:
        """How many edits of one source share a loop when not told: 1 on the CPU (batching
        saves row-passes there, not seconds per edit, but holds K edits' memory), else as many
        as the free accelerator memory holds by the family's `batching` estimate (configs/)."""
        b = self.bundle
        if b.device.type != "cuda":
            return 1
        batching = family_defaults(b.family).get("batching", {})
        free, _total = torch.cuda.mem_get_info(b.device)
        per_edit = float(batching.get("memory_per_edit_gib", 2.0)) * 2**30
        return max(1, min(int(batching.get("max_edits", 8)), int(0.8 * free // per_edit)))

    def edit(
        self,
        spec: Spec,
        inp: EditInputs,
        progress: Progress | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> EditResult:
        """Edit one spec's decoded inputs (nothing is written)."""
        out = self.edit_batch([(spec, inp)], progress, should_stop)[0]
        if isinstance(out, Exception):
            raise out
        return out

    def edit_batch(
        self,
        items: list[tuple[Spec, EditInputs]],
        progress: Progress | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[EditResult | EditDiverged]:
        """Edit several specs of one source (equal `batch_key`s) in one loop; nothing is
        written. An edit that diverged comes back as its `EditDiverged`, the others as results;
        an interruption raises `EditInterrupted` for all."""
        t0 = time.perf_counter()
        latents = self.edit_latents(items, progress, should_stop)
        t_loop = time.perf_counter() - t0
        results: list[EditResult | EditDiverged] = []
        for (spec, inp), latent in zip(items, latents):
            if isinstance(latent, EditDiverged):
                results.append(latent)
                continue
            t2 = time.perf_counter()
            with torch.no_grad():
                work = to_uint8(self.bundle.decode_latent(latent.z0))
            t3 = time.perf_counter()
            image, fraction = self._place(spec, inp, latent, work)
            timings = {
                "inversion_s": latent.inversion_s,
                "editing_s": latent.editing_s,
                "decode_s": t3 - t2,
                "composite_s": time.perf_counter() - t3,
            }
            # the loop's time is shared: each edit's total counts its part of it
            timings["total_s"] = t_loop / len(items) + timings["decode_s"] + timings["composite_s"]
            results.append(
                EditResult(
                    image=image,
                    work_image=work,
                    frame=latent.frame,
                    composited=spec.composite,
                    edited_fraction=fraction,
                    timings=timings,
                    stats=latent.stats,
                    bank_images=len(latent.trajectories),
                    inversions=latent.inversions,
                    inversion_unet_calls=latent.inversion_unet_calls,
                    warnings=list(inp.warnings),
                )
            )
        return results

    def _place(
        self, spec: Spec, inp: EditInputs, latent: EditedLatent, work: np.ndarray
    ) -> tuple[np.ndarray, float]:
        """The result at the source's size: composited into the source, or the whole image."""
        if not spec.composite:
            return latent.frame.image_to_source(work), 1.0
        f = self.bundle.latent_factor
        put = composite(
            inp.source,
            work,
            latent.frame,
            region_pixels(latent.changed, f),
            spec.composite_margin * f,
            spec.composite_color_match,
        )
        return put.image, put.edited_fraction

    def prepare(
        self,
        spec: Spec,
        inp: EditInputs,
        progress: Progress | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> EditSetup:
        """Everything the loop takes for this spec: plan, schedule, trajectories (inverted or
        cached), prompts, settings, steps, and fresh counted UNet calls."""
        b = self.bundle
        inv_before, calls_before = self.inversions, self.inversion_unet_calls
        frame = self.frame_for(inp.source, spec.resolution, spec.max_resolution)
        plan = build_plan(spec, inp, frame, b.latent_factor, b.device)
        schedule = Schedule.from_config(b.scheduler_config, spec.steps)
        trajectories = self.memory_bank(spec, inp, frame, plan, schedule, progress, should_stop)
        settings = loop_settings(spec.guidance, plan.feature_hw, b.latent_factor)
        with torch.no_grad():
            cond = [b.encode_prompt([p]) for p in bank_prompts(spec)[: len(trajectories)]]
            prompts = Prompts.build(cond, b.unconditional(), settings.cfg)
        calls = UNetCalls(
            self.forward, self.features, b.dtype, b.prediction_type, schedule, b.device
        )
        steps = StepPlan.build(step_windows(spec.guidance), spec.steps)
        image_prompt = None
        if steps.image_prompt and inp.image_prompt is not None:
            control = self.image_prompt_control(*inp.image_prompt)
            # the reference's prompt image: the source, or the object's reference
            shown = inp.reference if spec.mode in ("appearance", "paste") else inp.source
            assert shown is not None and spec.guidance.image_prompt is not None
            tokens = control.adapter.tokens(shown, settings.cfg)
            image_prompt = (control, tokens, spec.guidance.image_prompt.scale)
        return EditSetup(
            frame,
            plan,
            trajectories,
            prompts,
            settings,
            steps,
            calls,
            image_prompt,
            cond,
            self.inversions - inv_before,
            self.inversion_unet_calls - calls_before,
        )

    def edit_latent(
        self,
        spec: Spec,
        inp: EditInputs,
        progress: Progress | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> EditedLatent:
        """The edit up to its latent: plan, inversion (cached), the guided loop."""
        out = self.edit_latents([(spec, inp)], progress, should_stop)[0]
        if isinstance(out, EditDiverged):
            raise out
        return out

    def edit_latents(
        self,
        items: list[tuple[Spec, EditInputs]],
        progress: Progress | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[EditedLatent | EditDiverged]:
        """Edits of one source up to their latents, in one guided loop: each plan, the shared
        inversion (cached), the bank rows shared (each distinct bank image once)."""
        t0 = time.perf_counter()
        setups = [self.prepare(spec, inp, progress, should_stop) for spec, inp in items]
        t1 = time.perf_counter()
        first = setups[0]
        n = first.calls.schedule.steps
        if any(s.steps != first.steps for s in setups):
            raise ValueError("a batched loop's edits share one step plan (see Editor.batch_key)")
        trajectories, contexts, images = _shared_bank(setups)
        b = self.bundle
        with torch.no_grad():
            prompts = Prompts.build(contexts, b.unconditional(), first.settings.cfg, len(items))

        def step_done(i: int) -> None:
            if progress:
                progress("editing", i + 1, n)
            if should_stop and should_stop():
                raise EditInterrupted(f"interrupted at step {i + 1} of {n}")

        edits = [
            LoopEdit(s.plan, s.settings, torch.Generator().manual_seed(spec.seed), own)
            for s, (spec, _inp), own in zip(setups, items, images)
        ]
        ip_setup = first.image_prompt if len(items) == 1 else None
        ip_control = ip_setup[0] if ip_setup else nullcontext()
        # the image prompt's cross-attention processors outside the bank's: each restores its own
        with ip_control as ip_state, self.bank_control as state:
            refined = items[0][0].inversion_refine > 0
            bank = MemoryBank(trajectories, state, self.stored_kv, refined)
            rows = ImagePromptRows(ip_state, ip_setup[1], ip_setup[2]) if ip_setup else None
            z0s, stats = guided_edits(
                first.calls, bank, prompts, edits, first.steps, step_done, rows, self.two_copies
            )
        editing_s = (time.perf_counter() - t1) / len(items)
        out: list[EditedLatent | EditDiverged] = []
        for s, z0, st, own in zip(setups, z0s, stats, images):
            if not torch.isfinite(z0).all():
                out.append(EditDiverged(DIVERGED))
                continue
            out.append(
                EditedLatent(
                    z0,
                    s.frame,
                    [trajectories[m] for m in own],
                    st,
                    (s.plan.edit_mask | s.plan.sde_mask).cpu().numpy(),
                    (t1 - t0) / len(items),
                    editing_s,
                    s.inversions,
                    s.inversion_unet_calls,
                )
            )
        return out


def _image_key(work: np.ndarray) -> bytes:
    """A working-size second image's trajectory-cache key (the source's is its file's bytes)."""
    return work.tobytes() + str(work.shape).encode()


def _shared_bank(
    setups: list[EditSetup],
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[int, ...]]]:
    """The distinct bank images of a loop's edits (in the order edits name them) with their prompts,
    and each edit's indices into them. One trajectory is one tensor (`Editor.trajectory` keeps
    them), so identity finds the shared ones."""
    trajectories: list[torch.Tensor] = []
    contexts: list[torch.Tensor] = []
    images = []
    for s in setups:
        own = []
        for traj, ctx in zip(s.trajectories, s.contexts):
            at = next((m for m, t in enumerate(trajectories) if t is traj), None)
            if at is None:
                at = len(trajectories)
                trajectories.append(traj)
                contexts.append(ctx)
            own.append(at)
        images.append(tuple(own))
    if len({own[0] for own in images}) > 1:
        raise ValueError("a batched loop's edits share one source (see Editor.batch_key)")
    return trajectories, contexts, images
