"""One edit from decoded inputs to the result image: resize, encode, invert (cached), sample, decode.

`Editor` holds a loaded model bundle and the cache; it is what the API calls per spec.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from dragonctl.attention import BankControl
from dragonctl.cache import TrajectoryCache, trajectory_key
from dragonctl.errors import EditInterrupted
from dragonctl.features import feature_forward
from dragonctl.geometry import Frame, working_size
from dragonctl.inputs import EditInputs
from dragonctl.inversion import invert
from dragonctl.models import ModelBundle, unet_forward
from dragonctl.modes import Grids, build_plan
from dragonctl.sampler import Branches, SamplerStats, guided_edit
from dragonctl.schedules import Schedule, StepPlan, to_eps
from dragonctl.spec import Spec

Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass
class EditResult:
    image: np.ndarray  # at the source's exact size, uint8 RGB
    work_image: np.ndarray  # at the working size
    frame: Frame
    timings: dict[str, float] = field(default_factory=dict)
    stats: SamplerStats | None = None
    inversions: int = 0  # inversion passes run (0 when every trajectory came from the cache)
    inversion_unet_calls: int = 0
    warnings: list[str] = field(default_factory=list)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    x = ((x[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 0).cpu().numpy()


def bank_prompts(spec: Spec) -> list[str]:
    """The prompts of the bank images: the source's, then the second image's (the reference's own prompt,
    or the source's for a copy of the source such as resize's scaled copy)."""
    return [spec.prompt, spec.reference.prompt if spec.reference is not None else spec.prompt]


class Editor:
    def __init__(self, bundle: ModelBundle, cache: TrajectoryCache | None = None, memo_size: int = 8,
                 kv_bank: str = "recompute", compile: str = "off", compile_backend: str | Callable = "inductor") -> None:
        if compile != "off" and kv_bank == "stored":
            # stored K/V are looked up per step inside the forward: a compiled forward would recompile every step
            raise ValueError("compile works with kv_bank 'recompute' only")
        self.bundle = bundle
        self.kv_bank = kv_bank
        # The step loop's full UNet calls (inversion, CFG and bank rows) and the guided steps' truncated
        # forward with its backward, compiled on request.
        self.forward = unet_forward(bundle.unet, bundle.dtype, compile, compile_backend)
        self.features = feature_forward(bundle.unet, compile, compile_backend)
        self.bank_control = BankControl(bundle.unet, bundle.decoder_self_attention)
        self.cache = cache or TrajectoryCache(enabled=False)
        self.inversions = 0
        self.inversion_unet_calls = 0
        # Recent trajectories stay in memory, so a batch inverts each source once even without a disk cache.
        self._memo: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._memo_size = memo_size

    def frame_for(self, source: np.ndarray, resolution: int) -> Frame:
        h, w = source.shape[:2]
        return Frame(h, w, *working_size(h, w, resolution, self.bundle.size_multiple))

    @torch.no_grad()
    def trajectory(self, image_work: np.ndarray, image_bytes: bytes, prompt: str, schedule: Schedule,
                   progress: Progress | None = None, refine: int = 0) -> torch.Tensor:
        """The inverted latents of an image at working size: from the cache, or by DDIM inversion."""
        b = self.bundle
        key = trajectory_key(image_bytes, b.identity, image_work.shape[:2], schedule.steps, prompt, refine)
        memo_key = json.dumps(key, sort_keys=True)
        if memo_key in self._memo:
            self._memo.move_to_end(memo_key)
            return self._memo[memo_key]
        cached = self.cache.get(key)
        if cached is not None:
            return self._remember(memo_key, cached.to(b.device))
        z0 = b.encode_image(to_tensor(image_work)).float()
        ctx = b.encode_prompt([prompt])
        done = 0

        t_dev = torch.tensor(schedule.timesteps, device=b.device)

        def eps_fn(z: torch.Tensor, t: int) -> torch.Tensor:
            self.inversion_unet_calls += 1
            k = schedule.timesteps.index(t)
            out = self.forward(z, t_dev[k], ctx)
            return to_eps(out, z, schedule.alpha[k], b.prediction_type)

        def tick() -> None:
            nonlocal done
            done += 1
            if progress:
                progress("inversion", done, schedule.steps)

        latents = invert(eps_fn, z0, schedule, tick, refine)
        self.inversions += 1
        self.cache.put(key, latents)
        return self._remember(memo_key, latents)

    def memory_bank(self, spec: Spec, inp: EditInputs, source_work: np.ndarray, reference_work: np.ndarray | None,
                    schedule: Schedule, progress: Progress | None = None) -> list[torch.Tensor]:
        """The trajectories the edit reads: the source's, and the placed reference's for two-image modes."""
        bank = [self.trajectory(source_work, inp.source_bytes, spec.prompt, schedule, progress, spec.inversion_refine)]
        if reference_work is not None:
            ref_bytes = reference_work.tobytes() + str(reference_work.shape).encode()
            bank.append(self.trajectory(reference_work, ref_bytes, bank_prompts(spec)[1], schedule, progress,
                                        spec.inversion_refine))
        return bank

    def forget_trajectories(self) -> None:
        """Drop the in-memory trajectories (the disk cache stays): the next edit of a source inverts it again."""
        self._memo.clear()

    def _remember(self, key: str, latents: torch.Tensor) -> torch.Tensor:
        self._memo[key] = latents
        while len(self._memo) > self._memo_size:
            self._memo.popitem(last=False)
        return latents

    def edit(self, spec: Spec, inp: EditInputs, progress: Progress | None = None,
             should_stop: Callable[[], bool] | None = None) -> EditResult:
        b = self.bundle
        t0 = time.perf_counter()
        inv_before, calls_before = self.inversions, self.inversion_unet_calls
        frame = self.frame_for(inp.source, spec.resolution)
        grids = Grids((frame.work_h, frame.work_w), b.latent_factor)
        plan = build_plan(spec, inp, frame, b.latent_factor, b.device)
        schedule = Schedule.from_config(b.scheduler_config, spec.steps)
        source_work = frame.image_to_work(inp.source)

        bank = self.memory_bank(spec, inp, source_work, plan.reference_work, schedule, progress)
        prompts = bank_prompts(spec)[: len(bank)]
        with torch.no_grad():
            cond = [b.encode_prompt([p]) for p in prompts]
            uncond = b.encode_prompt([""])
        t1 = time.perf_counter()

        done = 0

        def tick() -> None:
            nonlocal done
            done += 1
            if progress:
                progress("editing", done, schedule.steps)
            if should_stop and should_stop():
                raise EditInterrupted(f"interrupted at step {done} of {schedule.steps}")

        generator = torch.Generator().manual_seed(spec.seed)
        steps = StepPlan.build(spec.guidance, spec.steps)
        with self.bank_control as state:
            z0, stats = guided_edit(
                self.features, self.forward, b.dtype, b.prediction_type, schedule, plan, steps, spec.guidance,
                Branches(bank=bank, cond=cond, uncond=uncond),
                state, grids, generator, tick, self.kv_bank)
        t2 = time.perf_counter()
        with torch.no_grad():
            work = to_uint8(b.decode_latent(z0))
        image = frame.image_to_source(work)
        t3 = time.perf_counter()
        return EditResult(
            image=image, work_image=work, frame=frame,
            timings={"inversion_s": t1 - t0, "editing_s": t2 - t1, "decode_s": t3 - t2, "total_s": t3 - t0},
            stats=stats, inversions=self.inversions - inv_before,
            inversion_unet_calls=self.inversion_unet_calls - calls_before, warnings=list(inp.warnings))
