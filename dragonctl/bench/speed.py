"""Speed and memory of full edits: per phase wall time, UNet passes, peak memory, and the ratio
against a plain eager loop that makes the same UNet calls (the floor our own bookkeeping adds to).

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

from dragonctl.bench.memory import peak_memory_mb, reset_peak
from dragonctl.spec import MODES


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class _count_syncs:
    """Counts CUDA synchronisations (torch's sync debug mode) during an edit; None elsewhere."""

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
    from dragonctl.bench.synthetic import build_components
    from dragonctl.models import load_bundle, pick_device, pick_dtype, sd_bundle

    if model:
        return load_bundle(model, device, dtype)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    # random initialisation of ~1 B parameters: seconds on a GPU, tens of seconds on CPU cores
    with dev:
        c = build_components(size)
    second = {}
    if "text_encoder_2" in c:  # SDXL
        second = dict(tokenizer_2=c["tokenizer_2"], text_encoder_2=c["text_encoder_2"].to(dt))
    return sd_bundle(
        f"random-{size}",
        c["unet"].to(dt),
        c["vae"].to(dt),
        c["tokenizer"],
        c["text_encoder"].to(dt),
        dict(c["scheduler"].config),
        dev,
        dt,
        f"random-{size}",
        **second,
    )


def write_specs(
    folder: Path, resolution: int, steps: int, preset: str | None = None, model: str | None = None
) -> dict[str, Path]:
    """One spec per mode on a synthetic square source of the given side (`preset`: each spec's,
    whose steps then win over `steps`; `model`: a real model, whose family's defaults apply)."""
    from dragonctl.shapes.world import Scene, Shape, render

    r = resolution
    sc = Scene(
        r,
        ((0.8, 0.7, 0.5),) * 4,
        (0.02, 1.0, 1.0, 0.0),
        (Shape("circle", 0.3 * r, 0.35 * r, 0.25 * r, (0.9, 0.1, 0.1)),),
    )
    Image.fromarray(render(sc).to_uint8()).save(folder / "src.png")
    ref = Scene(
        r,
        ((0.3, 0.4, 0.6),) * 4,
        (0, 0, 0, 0),
        (Shape("square", 0.5 * r, 0.5 * r, 0.3 * r, (0.1, 0.8, 0.2)),),
    )
    Image.fromarray(render(ref).to_uint8()).save(folder / "ref.png")
    box = [int(0.15 * r), int(0.2 * r), int(0.45 * r), int(0.5 * r)]
    ref_box = [int(0.33 * r), int(0.33 * r), int(0.67 * r), int(0.67 * r)]
    per_mode = {
        "move": {"mask": {"box": box}, "offset": [int(0.3 * r), 0]},
        "resize": {"mask": {"box": box}, "scale": 1.3},
        "drag": {
            "mask": {"box": [0, 0, r // 2 + r // 8, r // 2 + r // 8]},
            "points": [[[0.42 * r, 0.35 * r], [0.5 * r, 0.35 * r]]],
        },
        "appearance": {
            "mask": {"box": box},
            "reference": {"image": "ref.png", "mask": {"box": ref_box}},
        },
        "paste": {
            "reference": {"image": "ref.png", "mask": {"box": ref_box}},
            "at": [0.75 * r, 0.7 * r],
        },
    }
    out = {}
    for mode, fields in per_mode.items():
        path = folder / f"{mode}.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "version": 1,
                    "image": "src.png",
                    "mode": mode,
                    "prompt": "a photo",
                    "resolution": r,
                    **({"preset": preset} if preset else {"steps": steps}),
                    **({"model": model} if model else {}),
                    **fields,
                }
            )
        )
        out[mode] = path
    return out


def plain_eager(
    bundle,
    forward_rows: list[int],
    feature_rows: list[int],
    latent_hw: tuple[int, int],
    inversion_calls: int,
    backward_rows: list[int],
) -> float:
    """The same UNet calls as an edit (its inversion, then each full forward's and truncated
    forward's batch rows, as the sampler recorded them) with no method logic. Truncated
    forwards alternate: the bank's without grad, then the edited latent's with its backwards."""
    from dragonctl.compilation import feature_forward, unet_forward

    b = bundle
    full = unet_forward(b.unet, b.dtype, condition=b.condition)
    features = feature_forward(b.unet, condition=b.condition)
    h, w = latent_hw
    c = b.unet.config.in_channels
    ctx = b.encode_prompt(["a photo"])
    dev = b.device
    _sync(dev)
    t0 = time.perf_counter()
    t = torch.tensor(500, device=dev)
    with torch.no_grad():
        z = torch.randn(1, c, h, w, device=dev, dtype=b.dtype)
        for _ in range(inversion_calls):
            full(z, t, ctx)
        for rows in forward_rows:
            z = torch.randn(rows, c, h, w, device=dev, dtype=b.dtype)
            full(z, t, ctx.expand(rows, -1, -1))
    pairs = list(zip(feature_rows[::2], feature_rows[1::2]))
    backwards = len(backward_rows) // max(1, len(pairs))  # per guided pass: 1, or 2 (one row)
    for bank_rows, rows in pairs:
        with torch.no_grad():
            z = torch.randn(bank_rows, c, h, w, device=dev, dtype=b.dtype)
            features(z, t, ctx.expand(bank_rows, -1, -1))
        z = torch.randn(rows, c, h, w, device=dev, dtype=torch.float32, requires_grad=True)
        with torch.enable_grad():
            feats = features(z.to(b.dtype), t, ctx.expand(rows, -1, -1))
            for n in range(backwards):
                term = sum(f.float()[:, n::backwards].mean() for f in feats)
                torch.autograd.grad(term, [z], retain_graph=n + 1 < backwards)
    _sync(dev)
    return time.perf_counter() - t0


def run(
    size: str = "sd15",
    resolutions: tuple[int, ...] = (512, 768),
    modes: tuple[str, ...] = MODES,
    steps: int = 50,
    model: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    methods: tuple[str, ...] = ("dragondiffusion",),
    log=print,
    kv_banks: tuple[str, ...] = ("recompute",),
    compiles: tuple[str, ...] = ("off",),
    on_row=None,
    preset: str | None = None,
) -> dict:
    """Time full edits per resolution × mode × method × K/V bank × compile setting.

    One `Editor` per (K/V bank, compile) setting serves every edit, as a batch would: a compiled
    forward keeps its graphs across edits. Each fresh edit starts with an empty trajectory memo (it
    pays its inversion); the re-edit reuses it. Every row starts with one untimed warm-up edit,
    reported as `warmup_s`: with compilation it compiles the graphs the row's shapes need; eagerly
    it pays CUDA's lazy start-up (cuBLAS/cuDNN handles, kernel selection).
    """
    from dragonctl import api
    from dragonctl.compilation import resolve_compile
    from dragonctl.engine import Editor

    t0 = time.perf_counter()
    bundle = build_bundle(size, model, device, dtype)
    load_s = time.perf_counter() - t0
    dev = bundle.device
    results: dict = {
        "device": str(dev),
        "dtype": str(bundle.dtype).replace("torch.", ""),
        "model": bundle.name,
        "size": size,
        "steps": steps,
        "preset": preset,
        "load_s": round(load_s, 3),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "runs": [],
    }
    editors: dict[tuple[str, str], Editor] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for res in resolutions:
            folder = Path(tmp) / str(res)
            folder.mkdir()
            specs = write_specs(folder, res, steps, preset, model)
            for method, kv_bank, compile_mode, mode in itertools.product(
                methods, kv_banks, compiles, modes
            ):
                ls, inp = api.load(specs[mode])
                spec = ls.spec.model_copy(
                    update={"guidance": ls.spec.guidance.model_copy(update={"method": method})}
                )
                key = (kv_bank, compile_mode)
                if key not in editors:  # one per setting, kept across rows; no disk cache
                    compiled = resolve_compile(compile_mode, dev)
                    editors[key] = Editor(bundle, stored_kv=kv_bank == "stored", compile=compiled)
                editor = editors[key]
                row = measure_row(bundle, editor, spec, inp)
                row = {
                    "resolution": res,
                    "mode": mode,
                    "method": method,
                    "kv_bank": kv_bank,
                    "compile": compile_mode,
                    **row,
                }
                results["runs"].append(row)
                if on_row is not None:
                    on_row(results)
                log(_describe(row))
    return results


def _describe(row: dict) -> str:
    return (
        f"{row['resolution']}px {row['mode']:10s} {row['method']:15s} {row['kv_bank']:9s} "
        f"compile {row['compile']:15s} total {row['total_s']:7.2f} s "
        f"(inv {row['inversion_s']:.2f}, edit {row['editing_s']:.2f}, "
        f"decode {row['decode_s']:.2f}), re-edit {row['re_edit_cached_s']:.2f} s, "
        f"UNet fwd {row['unet_forward']} bwd {row['unet_backward']}, "
        f"peak {row['peak_memory_mb']:.0f} MiB, plain {row['plain_eager_s']:.2f} s, "
        f"warm-up {row['warmup_s']:.1f} s"
    )


def measure_row(bundle, editor, spec, inp) -> dict:
    """One row: an untimed warm-up edit, a timed fresh edit (it pays its inversion), a timed
    re-edit of the same source, and the plain eager loop making the same UNet calls."""
    dev = bundle.device
    editor.forget_trajectories()
    _sync(dev)
    tw = time.perf_counter()
    editor.edit(spec, inp)
    _sync(dev)
    warmup = time.perf_counter() - tw
    editor.forget_trajectories()  # a fresh source: this edit pays its inversion
    reset_peak(dev)
    _sync(dev)
    t1 = time.perf_counter()
    with _count_syncs(dev) as syncs:
        result = editor.edit(spec, inp)
    _sync(dev)
    wall = time.perf_counter() - t1
    peak = peak_memory_mb()
    _sync(dev)
    t2 = time.perf_counter()
    editor.edit(spec, inp)  # a re-edit of the source just inverted
    _sync(dev)
    re_edit = time.perf_counter() - t2
    st, frame, n_inv = result.stats, result.frame, result.inversion_unet_calls
    latent_hw = (frame.work_h // bundle.latent_factor, frame.work_w // bundle.latent_factor)
    # the better of two runs: the baseline is a floor, and GPU clocks vary between runs
    plain = min(
        plain_eager(bundle, st.forward_rows, st.feature_rows, latent_hw, n_inv, st.backward_rows)
        for _ in range(2)
    )
    t = result.timings
    return {
        "work_hw": [frame.work_h, frame.work_w],
        "warmup_s": round(warmup, 3),
        "stored_kv_mb": round(st.stored_kv_bytes / 2**20, 1),
        "inversion_s": round(t["inversion_s"], 3),
        "editing_s": round(t["editing_s"], 3),
        "decode_s": round(t["decode_s"], 3),
        "total_s": round(wall, 3),
        "re_edit_cached_s": round(re_edit, 3),
        "unet_forward": st.unet_forward + n_inv,
        "unet_backward": st.unet_backward,
        "bank_images": result.bank_images,
        "inversion_unet_calls": n_inv,
        "cuda_syncs_per_edit": syncs.count,
        "peak_memory_mb": round(peak, 1),
        "plain_eager_s": round(plain, 3),
        "ratio_vs_plain": round(wall / plain, 3) if plain > 0 else None,
    }


def run_batches(
    size: str = "tiny",
    resolutions: tuple[int, ...] = (512,),
    modes: tuple[str, ...] = MODES,
    steps: int = 50,
    model: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batches: tuple[int, ...] = (1, 4, 8),
    method: str = "dragondiffusion",
    log=print,
    on_row=None,
    preset: str | None = None,
) -> dict:
    """K edits of one source in one loop, for each K: seconds and UNet row-passes per edit.

    The K edits are the mode's spec with K seeds (distinct edits with one batch shape); the
    source's inversion is cached first (untimed, with a warm-up loop), so the figures are the
    loops' own. Row-passes per edit are each edit's share (`SamplerStats.unet_row_passes`)."""
    from dragonctl import api
    from dragonctl.engine import Editor

    bundle = build_bundle(size, model, device, dtype)
    dev = bundle.device
    editor = Editor(bundle)
    results: dict = {
        "device": str(dev),
        "dtype": str(bundle.dtype).replace("torch.", ""),
        "model": bundle.name,
        "size": size if model is None else model,
        "steps": steps,
        "preset": preset,
        "method": method,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "batches": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for res in resolutions:
            folder = Path(tmp) / str(res)
            folder.mkdir()
            specs = write_specs(folder, res, steps, preset, model)
            for mode in modes:
                ls, inp = api.load(specs[mode])
                g = ls.spec.guidance.model_copy(update={"method": method})
                base = ls.spec.model_copy(update={"guidance": g})
                editor.edit(base, inp)  # warm-up, and the source's inversion cached
                one: dict | None = None
                for k in batches:
                    row = {"resolution": res, "mode": mode, **_batch_row(editor, base, inp, k)}
                    one = one or row
                    row["row_passes_vs_k1"] = round(
                        row["row_passes_per_edit"] / one["row_passes_per_edit"], 3
                    )
                    row["seconds_vs_k1"] = round(
                        row["seconds_per_edit"] / one["seconds_per_edit"], 3
                    )
                    results["batches"].append(row)
                    if on_row is not None:
                        on_row(results)
                    log(
                        f"{res}px {mode:10s} K={k}: {row['seconds_per_edit']:.2f} s/edit "
                        f"({row['seconds_vs_k1']:.2f}× K=1), {row['row_passes_per_edit']:.0f} "
                        f"row-passes/edit ({row['row_passes_vs_k1']:.2f}× K=1), "
                        f"peak {row['peak_memory_mb']:.0f} MiB"
                    )
    return results


def _batch_row(editor, base, inp, k: int) -> dict:
    """One loop of K seeds of `base` (its source's inversion already cached)."""
    dev = editor.bundle.device
    items = [(base.model_copy(update={"seed": base.seed + j}), inp) for j in range(k)]
    reset_peak(dev)
    _sync(dev)
    t0 = time.perf_counter()
    out = editor.edit_batch(items)
    _sync(dev)
    wall = time.perf_counter() - t0
    return {
        "edits": k,
        "seconds_per_edit": round(wall / k, 3),
        "row_passes_per_edit": round(sum(r.stats.unet_row_passes for r in out) / k, 1),
        "peak_memory_mb": round(peak_memory_mb(), 1),
    }


def _steps(results: dict) -> str:
    return f"preset {results['preset']}" if results.get("preset") else f"{results['steps']} steps"


def batch_table(results: dict) -> str:
    cols = [
        "resolution",
        "mode",
        "edits",
        "seconds_per_edit",
        "seconds_vs_k1",
        "row_passes_per_edit",
        "row_passes_vs_k1",
        "peak_memory_mb",
    ]
    extra = f"{results['method']}, {results['threads']} threads, "
    return _markdown(results, extra, cols, results["batches"])


def table(results: dict) -> str:
    cols = [
        "resolution",
        "mode",
        "method",
        "kv_bank",
        "compile",
        "total_s",
        "inversion_s",
        "editing_s",
        "decode_s",
        "re_edit_cached_s",
        "unet_forward",
        "unet_backward",
        "peak_memory_mb",
        "stored_kv_mb",
        "plain_eager_s",
        "ratio_vs_plain",
        "warmup_s",
    ]
    return _markdown(results, "", cols, results["runs"])


def _markdown(results: dict, extra: str, cols: list[str], rows: list[dict]) -> str:
    """A results file's head line, then its rows as a Markdown table."""
    head = (
        f"device {results['device']} ({results['gpu'] or 'CPU'}), {results['dtype']}, "
        f"{results['model']}, {_steps(results)}, {extra}torch {results['torch']}"
    )
    lines = [head, "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def save(results: dict, path: Path) -> None:
    from dragonctl.files import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(results, indent=2) + "\n").encode())
