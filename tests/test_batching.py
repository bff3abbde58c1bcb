"""Several edits of one source in one sampler loop: the same results as each alone, fewer rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import scene_image
from PIL import Image

from dragonctl import api
from dragonctl.engine import Editor
from dragonctl.inputs import load_inputs
from dragonctl.models import load_bundle
from dragonctl.spec import load_spec

BOX = {"box": [16, 16, 32, 32]}  # on ref.png, a second source
SAMPLES = api.Path(__file__).parent.parent / "samples"

# every bank reading in one loop: replace (move, resize), concat (drag), composite over a reference
# (paste: its windows set to the others')
MIXED = {
    "move": {},
    "drag": {},
    "resize": {},
    "paste": {"guidance": {"inject_from": 0.1, "inject_until": 1.0}},
}


def _mixed_specs(spec_for, model: str, **common) -> list:
    out = []
    for mode, over in MIXED.items():
        guidance = {"method": "diffeditor", **over.get("guidance", {})}  # SDE and time travel too
        path = spec_for(mode, model=model, steps=12, guidance=guidance, **common)
        out.append(load_spec(path))
    return out


@pytest.fixture(scope="module")
def tiny_editor(tiny_sd) -> Editor:
    return Editor(load_bundle(str(tiny_sd)))


def test_four_modes_in_one_loop_equal_each_alone(tiny_sd, tiny_editor, spec_for):
    """CFG model, fp32, K = 4: every pixel within one 8-bit level of the edit run alone."""
    loaded = _mixed_specs(spec_for, str(tiny_sd))
    items = [(ls.spec, load_inputs(ls)) for ls in loaded]
    keys = {tiny_editor.batch_key(spec, inp) for spec, inp in items}
    assert len(keys) == 1  # one batch shape
    alone = [tiny_editor.edit(spec, inp) for spec, inp in items]
    together = tiny_editor.edit_batch(items)
    for (spec, _inp), a, t in zip(items, alone, together):
        assert not isinstance(t, Exception)
        diff = np.abs(a.image.astype(int) - t.image.astype(int))
        assert diff.max() <= 1, (spec.mode, diff.max())
        assert a.stats.guided_steps == t.stats.guided_steps > 0
        assert t.stats.sde_steps > 0 and t.stats.edits == 4
    # the work: the shared bank rows are divided among the edits that read them
    shares = [t.stats.unet_row_passes for t in together]
    loop = together[0].stats
    rows = sum(loop.forward_rows) + sum(loop.feature_rows) + sum(loop.backward_rows)
    assert sum(shares) == pytest.approx(rows)
    # the source is shared by all four
    for a, t in zip(alone, together):
        assert t.stats.unet_row_passes < a.stats.unet_row_passes
    # the bank holds each distinct image once: the source, the paste's reference
    assert together[2].bank_images == 1 and together[3].bank_images == 2
    assert max(loop.forward_rows) == 2 + 4 * 2  # bank rows, then [uncond, cond] per edit


def test_edits_that_differ_in_schedule_or_source_get_different_keys(tiny_editor, spec_for, tiny_sd):
    move = load_spec(spec_for("move", model=str(tiny_sd)))
    other_steps = load_spec(spec_for("move", name="m2.yaml", model=str(tiny_sd), steps=6))
    other_source = load_spec(
        spec_for("move", name="m3.yaml", model=str(tiny_sd), image="ref.png", mask=BOX)
    )
    paste = load_spec(spec_for("paste", model=str(tiny_sd)))  # its own injection window
    keys = [tiny_editor.batch_key(ls.spec, load_inputs(ls)) for ls in (move, other_steps)]
    keys += [tiny_editor.batch_key(ls.spec, load_inputs(ls)) for ls in (other_source, paste)]
    assert len(set(keys)) == 4


def test_shapes_model_batch_without_cfg_equals_each_alone():
    """No CFG rows: the sample move, resize and drag (one source) in one loop."""
    editor = Editor(load_bundle("shapes"))
    items = []
    for name in ("move", "resize", "drag"):
        ls = load_spec(SAMPLES / f"{name}.yaml")
        spec = ls.spec.model_copy(update={"steps": 12})
        items.append((spec, load_inputs(ls)))
    assert len({editor.batch_key(s, i) for s, i in items}) == 1
    alone = [editor.edit(s, i) for s, i in items]
    together = editor.edit_batch(items)
    for a, t in zip(alone, together):
        assert np.abs(a.image.astype(int) - t.image.astype(int)).max() <= 1
    # one bank row (the shared source), then a row per edit: each edit's share is less than its
    # own loop's work
    assert max(together[0].stats.forward_rows) == 1 + 3
    for a, t in zip(alone, together):
        assert t.stats.unet_row_passes < a.stats.unet_row_passes


def test_cli_batches_specs_of_one_source_and_records_the_share(tiny_sd, spec_for, tmp_path):
    paths = [
        spec_for("move", name=f"m{k}.yaml", model=str(tiny_sd), offset=[4 * k, 2]) for k in range(3)
    ]
    paths.append(spec_for("move", name="other.yaml", model=str(tiny_sd), image="ref.png", mask=BOX))
    one = api.edit(paths, api.EditOptions(out_dir=tmp_path / "one", no_cache=True, max_batch=1))
    many = api.edit(paths, api.EditOptions(out_dir=tmp_path / "many", no_cache=True, max_batch=3))
    assert all(r.ok for r in one + many), [r.errors for r in one + many]
    for a, b in zip(one, many):
        pa, pb = (np.asarray(Image.open(r.output).convert("RGB")).astype(int) for r in (a, b))
        assert np.abs(pa - pb).max() <= 1
    sidecars = [json.loads(r.output.with_suffix(".json").read_text()) for r in many]
    assert [s["stats"].get("edits_in_loop", 1) for s in sidecars] == [3, 3, 3, 1]
    alone = json.loads(one[0].output.with_suffix(".json").read_text())["stats"]
    assert sidecars[0]["stats"]["unet_row_passes"] < alone["unet_row_passes"]
    assert many[0].inversions + many[1].inversions + many[2].inversions == 1  # one source
    # resumed: a loop whose members are all up to date runs nothing
    again = api.edit(
        paths,
        api.EditOptions(out_dir=tmp_path / "many", no_cache=True, max_batch=3, skip_existing=True),
    )
    assert all(r.ok and r.skipped for r in again)


def test_an_interrupted_batch_writes_nothing(tiny_sd, spec_for, tmp_path):
    paths = [spec_for("move", name=f"m{k}.yaml", model=str(tiny_sd)) for k in range(2)]
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 2

    reports = api.edit(
        paths, api.EditOptions(out_dir=tmp_path, no_cache=True, max_batch=2), stop=stop
    )
    assert [r.interrupted for r in reports] == [True, True]
    assert not any(r.output.exists() for r in reports)
    assert all("nothing written" in r.errors[0] for r in reports)


def test_a_stop_during_inversion_acts_after_one_inversion_step(tiny_sd, spec_for, workdir):
    """The stop flag is polled after every inversion step, not only after the sampler's: the
    edit stops one step into the inversion, and no partial trajectory reaches the cache."""
    from dragonctl.cache import TrajectoryCache
    from dragonctl.errors import EditInterrupted

    ls = load_spec(spec_for("move", model=str(tiny_sd), steps=6))
    cache = TrajectoryCache(workdir / "stop-cache")
    editor = Editor(load_bundle(str(tiny_sd)), cache)
    with pytest.raises(EditInterrupted, match="inversion step 1 of 6"):
        editor.edit(ls.spec, load_inputs(ls), should_stop=lambda: True)
    assert editor.inversion_unet_calls == 1 + ls.spec.inversion_refine
    assert not any((workdir / "stop-cache").rglob("*.safetensors"))


def test_one_diverged_edit_leaves_the_others(tiny_sd, tiny_editor, spec_for, monkeypatch):
    """A non-finite latent fails its own edit only."""
    from dragonctl import engine
    from dragonctl.errors import EditDiverged

    loaded = _mixed_specs(spec_for, str(tiny_sd))[:2]
    items = [(ls.spec, load_inputs(ls)) for ls in loaded]
    real = engine.guided_edits

    def poisoned(*args, **kwargs):
        z, stats = real(*args, **kwargs)
        return [z[0] * torch.nan, *z[1:]], stats

    monkeypatch.setattr(engine, "guided_edits", poisoned)
    out = tiny_editor.edit_batch(items)
    assert isinstance(out[0], EditDiverged) and not isinstance(out[1], Exception)


def test_cpu_default_is_one_edit_per_loop(tiny_editor):
    assert tiny_editor.default_max_batch() == 1


def test_notebook_edit_many_runs_one_loop_per_batch_shape(tiny_sd):
    import dragonctl

    editor = dragonctl.Editor(str(tiny_sd), device="cpu", no_cache=True)
    source = scene_image()
    box = {"box": [8, 10, 24, 26]}
    specs = [
        {"mode": "move", "mask": box, "offset": [6 * k, 2], "steps": 4, "resolution": 32}
        for k in range(3)
    ]
    specs.append({**specs[0], "steps": 5})  # another batch shape: its own loop
    many = editor.edit_many(source, specs, max_batch=3)
    alone = [editor.edit(source, s) for s in specs]
    for m, a in zip(many, alone):
        assert np.abs(np.asarray(m.image, int) - np.asarray(a.image, int)).max() <= 1
    assert [m.metadata["spec"]["steps"] for m in many] == [4, 4, 4, 5]
