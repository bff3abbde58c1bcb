"""Speed and memory of full edits: per phase wall time, UNet passes, peak memory, and the ratio against a
plain eager loop that makes the same UNet calls (the floor our own bookkeeping adds to).

Components are SD 1.5-sized with random weights built in code (timing does not depend on weight
values, so nothing is downloaded), or a real model given with `--model`. `--size tiny` runs the same
flow on tiny components so CI can check that the benchmark works on a CPU.
"""

from __future__ import annotations

import itertools
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml
from PIL import Image

from dragonctl.bench.quality import MODES


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _peak_reset(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def _peak_mb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    from dragonctl.dragbench import peak_memory_mb

    return peak_memory_mb()


class _count_syncs:
    """Counts CUDA synchronisations (torch's sync debug mode) during an edit; None on other devices."""

    def __init__(self, dev: torch.device) -> None:
        self.dev = dev
        self.count: int | None = None

    def __enter__(self) -> _count_syncs:
        if self.dev.type == "cuda":
            import warnings

            self._w = warnings.catch_warnings(record=True)
            self._log = self._w.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        if self.dev.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            self._w.__exit__(*exc)
            self.count = sum("synchroniz" in str(w.message) for w in self._log)


def build_bundle(size: str, model: str | None, device: str, dtype: str):
    from dragonctl.models import load_bundle, pick_device, pick_dtype, sd_bundle
    from dragonctl.synthetic import build_components

    if model:
        return load_bundle(model, device, dtype)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    with dev:  # random initialisation of ~1 B parameters takes seconds on a GPU, tens of seconds on CPU cores
        c = build_components(size)
    return sd_bundle(f"random-{size}", c["unet"].to(dt), c["vae"].to(dt), c["tokenizer"], c["text_encoder"].to(dt),
                     dict(c["scheduler"].config), dev, dt, f"random-{size}")


def write_specs(folder: Path, resolution: int, steps: int) -> dict[str, Path]:
    """One spec per mode on a synthetic square source of the given side."""
    from dragonctl.shapes.world import Scene, Shape, render

    r = resolution
    sc = Scene(r, ((0.8, 0.7, 0.5),) * 4, (0.02, 1.0, 1.0, 0.0),
               (Shape("circle", 0.3 * r, 0.35 * r, 0.25 * r, (0.9, 0.1, 0.1)),))
    Image.fromarray(render(sc).to_uint8()).save(folder / "src.png")
    ref = Scene(r, ((0.3, 0.4, 0.6),) * 4, (0, 0, 0, 0), (Shape("square", 0.5 * r, 0.5 * r, 0.3 * r, (0.1, 0.8, 0.2)),))
    Image.fromarray(render(ref).to_uint8()).save(folder / "ref.png")
    box = [int(0.15 * r), int(0.2 * r), int(0.45 * r), int(0.5 * r)]
    ref_box = [int(0.33 * r), int(0.33 * r), int(0.67 * r), int(0.67 * r)]
    per_mode = {
        "move": {"mask": {"box": box}, "offset": [int(0.3 * r), 0]},
        "resize": {"mask": {"box": box}, "scale": 1.3},
        "drag": {"mask": {"box": [0, 0, r // 2, r // 2 + r // 8]}, "points": [[[0.42 * r, 0.35 * r], [0.5 * r, 0.35 * r]]]},
        "appearance": {"mask": {"box": box}, "reference": {"image": "ref.png", "mask": {"box": ref_box}}},
        "paste": {"reference": {"image": "ref.png", "mask": {"box": ref_box}}, "at": [0.75 * r, 0.7 * r]},
    }
    out = {}
    for mode, fields in per_mode.items():
        path = folder / f"{mode}.yaml"
        path.write_text(yaml.safe_dump({"version": 1, "image": "src.png", "mode": mode, "prompt": "a photo",
                                        "resolution": r, "steps": steps, **fields}))
        out[mode] = path
    return out


def plain_eager(bundle, batch_rows: list[int], guided: int, n_bank: int, latent_hw: tuple[int, int], steps: int,
                inversion: bool) -> float:
    """The same UNet calls (batch sizes, truncated guidance forwards, backwards) with no method logic."""
    from dragonctl.features import decoder_features

    b = bundle
    h, w = latent_hw
    c = b.unet.config.in_channels
    ctx = b.encode_prompt(["a photo"])
    dev = b.device
    _sync(dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        if inversion:
            z = torch.randn(1, c, h, w, device=dev, dtype=b.dtype)
            for _ in range(steps):
                b.unet(z, 500, encoder_hidden_states=ctx)
        for rows in batch_rows:
            z = torch.randn(rows, c, h, w, device=dev, dtype=b.dtype)
            b.unet(z, 500, encoder_hidden_states=ctx.expand(rows, -1, -1))
    for _ in range(guided):
        with torch.no_grad():
            decoder_features(b.unet, torch.randn(n_bank, c, h, w, device=dev, dtype=b.dtype), 500, ctx.expand(n_bank, -1, -1))
        z = torch.randn(2, c, h, w, device=dev, dtype=torch.float32, requires_grad=True)
        with torch.enable_grad():
            feats = decoder_features(b.unet, z.to(b.dtype), 500, ctx.expand(2, -1, -1))
            torch.autograd.grad(sum(f.float().mean() for f in feats), [z])
    _sync(dev)
    return time.perf_counter() - t0


def run(size: str = "sd15", resolutions: tuple[int, ...] = (512, 768), modes: tuple[str, ...] = MODES,
        steps: int = 50, model: str | None = None, device: str = "auto", dtype: str = "auto",
        methods: tuple[str, ...] = ("dragondiffusion",), log=print, kv_banks: tuple[str, ...] = ("recompute",),
        compiles: tuple[str, ...] = ("off",), on_row=None) -> dict:
    """Time full edits per resolution × mode × method × K/V bank × compile setting.

    One `Editor` per (K/V bank, compile) setting serves every edit, as a batch would: a compiled
    forward keeps its graphs across edits. Each fresh edit starts with an empty trajectory memo (it
    pays its inversion); the re-edit reuses it. Every row starts with one untimed warm-up edit, reported
    as `warmup_s`: with compilation it compiles the graphs the row's shapes need; eagerly it pays CUDA's
    lazy start-up (cuBLAS/cuDNN handles, kernel selection), which made the first eager row of a GPU run
    four times slower than the rest.
    """
    from dragonctl import api
    from dragonctl.engine import Editor
    from dragonctl.models import resolve_compile
    from dragonctl.schedules import StepPlan

    t0 = time.perf_counter()
    bundle = build_bundle(size, model, device, dtype)
    load_s = time.perf_counter() - t0
    dev = bundle.device
    results: dict = {"device": str(dev), "dtype": str(bundle.dtype).replace("torch.", ""), "model": bundle.name,
                     "size": size, "steps": steps, "load_s": round(load_s, 3), "torch": torch.__version__,
                     "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None, "runs": []}
    editors: dict[tuple[str, str], Editor] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for res in resolutions:
            folder = Path(tmp) / str(res)
            folder.mkdir()
            specs = write_specs(folder, res, steps)
            for method, kv_bank, compile_mode, mode in itertools.product(methods, kv_banks, compiles, modes):
                ls, inp = api.load(specs[mode])
                spec = ls.spec.model_copy(update={"guidance": ls.spec.guidance.model_copy(update={"method": method})})
                if (kv_bank, compile_mode) not in editors:
                    editors[(kv_bank, compile_mode)] = Editor(bundle, kv_bank=kv_bank, compile=resolve_compile(compile_mode, dev))
                editor = editors[(kv_bank, compile_mode)]  # no disk cache
                editor.forget_trajectories()
                _sync(dev)
                tw = time.perf_counter()
                editor.edit(spec, inp)
                _sync(dev)
                warmup = time.perf_counter() - tw
                editor.forget_trajectories()  # a fresh source: this edit pays its inversion
                _peak_reset(dev)
                _sync(dev)
                t1 = time.perf_counter()
                with _count_syncs(dev) as syncs:
                    result = editor.edit(spec, inp)
                _sync(dev)
                wall = time.perf_counter() - t1
                peak = _peak_mb(dev)
                _sync(dev)
                t2 = time.perf_counter()
                editor.edit(spec, inp)  # a re-edit of the source just inverted
                _sync(dev)
                re_edit = time.perf_counter() - t2
                st = result.stats
                plan = StepPlan.build(spec.guidance, steps)
                frame = result.frame
                latent_hw = (frame.work_h // bundle.latent_factor, frame.work_w // bundle.latent_factor)
                n_bank = 2 if mode in ("appearance", "paste") else 1
                gen = 2 if spec.guidance.cfg_scale != 1 else 1
                rows = [(n_bank if i in plan.injected and kv_bank == "recompute" else 0) + gen for i in range(steps)]
                rows += [n_bank] * (len(plan.injected) if kv_bank == "stored" else 0)
                n_inv = result.inversion_unet_calls
                # the better of two runs: the baseline is a floor, and GPU clocks vary between runs
                plain = min(plain_eager(bundle, rows, st.unet_backward, n_bank, latent_hw, n_inv, True) for _ in range(2))
                row = {"resolution": res, "work_hw": [frame.work_h, frame.work_w], "mode": mode, "method": method,
                       "kv_bank": kv_bank, "compile": compile_mode, "warmup_s": round(warmup, 3),
                       "stored_kv_mb": round(st.stored_kv_bytes / 2**20, 1),
                       "inversion_s": round(result.timings["inversion_s"], 3),
                       "editing_s": round(result.timings["editing_s"], 3),
                       "decode_s": round(result.timings["decode_s"], 3), "total_s": round(wall, 3),
                       "re_edit_cached_s": round(re_edit, 3),
                       "unet_forward": st.unet_forward + n_inv, "unet_backward": st.unet_backward,
                       "inversion_unet_calls": n_inv, "cuda_syncs_per_edit": syncs.count,
                       "peak_memory_mb": round(peak, 1), "plain_eager_s": round(plain, 3),
                       "ratio_vs_plain": round(wall / plain, 3) if plain > 0 else None}
                results["runs"].append(row)
                if on_row is not None:
                    on_row(results)
                log(f"{res}px {mode:10s} {method:15s} {kv_bank:9s} compile {compile_mode:15s} "
                    f"total {wall:7.2f} s (inv {row['inversion_s']:.2f}, "
                    f"edit {row['editing_s']:.2f}, decode {row['decode_s']:.2f}), re-edit {re_edit:.2f} s, "
                    f"UNet fwd {row['unet_forward']} bwd {row['unet_backward']}, peak {peak:.0f} MiB, "
                    f"plain {plain:.2f} s, warm-up {warmup:.1f} s")
    return results


def table(results: dict) -> str:
    cols = ["resolution", "mode", "method", "kv_bank", "compile", "total_s", "inversion_s", "editing_s", "decode_s",
            "re_edit_cached_s",
            "unet_forward", "unet_backward", "peak_memory_mb", "stored_kv_mb", "plain_eager_s", "ratio_vs_plain",
            "warmup_s"]
    head = (f"device {results['device']} ({results['gpu'] or 'CPU'}), {results['dtype']}, {results['model']}, "
            f"{results['steps']} steps, torch {results['torch']}")
    lines = [head, "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in results["runs"]]
    return "\n".join(lines)


def save(results: dict, path: Path) -> None:
    from dragonctl.files import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(results, indent=2) + "\n").encode())

