"""fp16 against fp32, and one working size against another, for the guidance (`dragonctl bench
precision`).

Per resolution and mode it reports, with the same weights in both dtypes: one guided step's
gradient (what is added to ε) in fp16 beside fp32 (cosine, norm ratio, median |value|), and its
per-cell size; optionally, with `edits=True`, the size of a whole edit's effect (mean |z_0 of the
edit − z_0 of the same edit at energy 0|) in both dtypes. Components are random weights built in
code (`--size tiny8` has SD's VAE factor 8 and runs on a CPU; `sd15` is SD 1.5's size, for a GPU)
or a real model (`--model`).
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from dragonctl.spec import Spec


def bundles(size: str, model: str | None, device: str) -> dict[str, object]:
    """The same weights in fp32 and fp16."""
    from dragonctl.models import load_bundle, pick_device, sd_bundle

    if model:
        return {dt: load_bundle(model, device, dt) for dt in ("fp32", "fp16")}
    from dragonctl.bench.synthetic import build_components

    dev = pick_device(device)
    with dev:  # random initialisation on the device: seconds for SD 1.5's size on a GPU
        c = build_components(size)
    out = {}
    for name, dt in (("fp32", torch.float32), ("fp16", torch.float16)):
        unet, vae, text = (copy.deepcopy(c[k]).to(dt) for k in ("unet", "vae", "text_encoder"))
        out[name] = sd_bundle(
            f"random-{size}",
            unet,
            vae,
            c["tokenizer"],
            text,
            dict(c["scheduler"].config),
            dev,
            dt,
            f"random-{size}",
        )
    return out


def guidance_gradient(editor, spec: Spec, inp, step: int) -> torch.Tensor:
    """The energy gradient added to ε at edit step `step`, at the inverted latent of that step
    (with the mode's initial copy applied), fp32."""
    from dragonctl.sampler import EnergyGuidance, LoopEdit, MemoryBank

    s = editor.prepare(spec, inp)
    n = s.calls.schedule.steps
    with editor.bank_control as state:
        bank = MemoryBank(s.trajectories, state, refined=spec.inversion_refine > 0)
        images = tuple(range(bank.size))
        bank.prepare(s.calls, s.prompts, [(s.plan.attention, images)], s.plan.latent_hw, [])
        second = s.trajectories[1][n - step] if len(s.trajectories) > 1 else None
        z = s.plan.init_latent(s.trajectories[0][n - step], second).float()
        edit = LoopEdit(s.plan, s.settings, torch.Generator(), images)
        return EnergyGuidance(s.calls, bank, s.prompts, [edit]).gradient(z, step)


def edit_effect(editor, spec: Spec, inp) -> float:
    """Mean |z_0 of the edit − z_0 of the same edit at energy 0|: how much the guidance did."""
    off = spec.model_copy(update={"guidance": spec.guidance.model_copy(update={"energy_scale": 0})})
    return float((editor.edit_latent(spec, inp).z0 - editor.edit_latent(off, inp).z0).abs().mean())


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    """fp16 (b) against fp32 (a)."""
    a, b = a.flatten().double(), b.flatten().double()
    return {
        "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
        "norm_ratio": float(b.norm() / a.norm()),
        "median_abs_fp32": float(a.abs().median()),
        "median_abs_fp16": float(b.abs().median()),
    }


def run(
    size: str = "tiny8",
    resolutions: tuple[int, ...] = (512, 768),
    modes: tuple[str, ...] = ("move",),
    model: str | None = None,
    device: str = "auto",
    steps: int = 4,
    edits: bool = False,
    log=print,
) -> list[dict]:
    from dragonctl import api
    from dragonctl.bench.speed import write_specs
    from dragonctl.engine import Editor

    editors = {dt: Editor(b) for dt, b in bundles(size, model, device).items()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for res in resolutions:
            folder = Path(tmp) / str(res)
            folder.mkdir()
            specs = write_specs(folder, res, steps)
            for mode in modes:
                ls, inp = api.load(specs[mode])
                grads = {dt: guidance_gradient(ed, ls.spec, inp, 0) for dt, ed in editors.items()}
                row = {
                    "resolution": res,
                    "mode": mode,
                    **compare(grads["fp32"], grads["fp16"]),
                    "per_cell_fp32": float(grads["fp32"].abs().mean()),
                }
                if edits:
                    for dt, ed in editors.items():
                        row[f"edit_effect_{dt}"] = edit_effect(ed, ls.spec, inp)
                rows.append(row)
                log(
                    " ".join(
                        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in row.items()
                    )
                )
    return rows
