"""Presets: named sets of defaults from the family's config, below the spec's own fields."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from dragonctl import api
from dragonctl.cli import app
from dragonctl.engine import Editor
from dragonctl.errors import SpecError
from dragonctl.inputs import load_inputs
from dragonctl.models import load_bundle
from dragonctl.spec import load_spec, mode_defaults


def _spec(spec_for, name: str, **fields):
    """A move spec; steps left to the defaults unless given."""
    path = spec_for("move", name=name, **fields)
    if "steps" not in fields:
        data = yaml.safe_load(path.read_text())
        del data["steps"]
        path.write_text(yaml.safe_dump(data))
    return path


def test_a_preset_sets_defaults_and_the_spec_s_own_fields_win(spec_for, tiny_sd):
    fast = mode_defaults("sd15", "move", "fast")
    plain = load_spec(_spec(spec_for, "p.yaml", model=str(tiny_sd))).spec
    preset = load_spec(_spec(spec_for, "f.yaml", model=str(tiny_sd), preset="fast"))
    assert preset.spec.steps == fast["steps"] != plain.steps
    assert preset.spec.preset == "fast"
    own = load_spec(_spec(spec_for, "o.yaml", model=str(tiny_sd), steps=40, preset="fast"))
    assert own.spec.steps == 40
    # the command line's preset is every spec's
    over = load_spec(_spec(spec_for, "c.yaml", model=str(tiny_sd)), preset="fast")
    assert over.spec.steps == fast["steps"]
    # kept when a hub model's family is merged again
    assert preset.for_family("sd15").spec.steps == fast["steps"]


def test_an_unknown_preset_names_the_field_and_the_known_ones(spec_for):
    with pytest.raises(SpecError) as e:
        load_spec(_spec(spec_for, "l.yaml", model="shapes", preset="ludicrous"))
    msg = str(e.value)
    assert "preset" in msg and "ludicrous" in msg and "fast" in msg


def test_the_fast_preset_halves_the_loop_s_unet_work(spec_for, tiny_sd):
    editor = Editor(load_bundle(str(tiny_sd)))
    rows = {}
    for name, over in (("full", {}), ("fast", {"preset": "fast"})):
        ls = load_spec(_spec(spec_for, f"{name}.yaml", model=str(tiny_sd), **over))
        rows[name] = editor.edit(ls.spec, load_inputs(ls)).stats.unet_row_passes
    assert rows["fast"] <= 0.52 * rows["full"]


def test_edit_preset_flag_reaches_the_sidecar(spec_for, tiny_sd, tmp_path):
    spec = _spec(spec_for, "move.yaml", model=str(tiny_sd))
    result = CliRunner().invoke(
        app, ["edit", str(spec), "--out", str(tmp_path), "--preset", "fast", "--no-cache"]
    )
    assert result.exit_code == 0, result.output
    sidecar = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert sidecar["spec"]["preset"] == "fast"
    assert sidecar["spec"]["steps"] == mode_defaults("sd15", "move", "fast")["steps"]
    bad = CliRunner().invoke(app, ["edit", str(spec), "--out", str(tmp_path), "--preset", "x"])
    assert bad.exit_code == 1 and "preset" in bad.output
    assert api.validate([spec])[0].ok


def test_a_preset_s_mode_section_applies_to_its_mode_only(monkeypatch):
    from dragonctl import spec as spec_module

    config = {
        "defaults": {"steps": 50, "guidance": {"energy_scale": 1.0, "cfg_scale": 5.0}},
        "modes": {"drag": {"guidance": {"energy_scale": 0.4}}},
        "presets": {
            "fast": {
                "defaults": {"steps": 25},
                "modes": {"drag": {"guidance": {"energy_scale": 0.8}}},
            }
        },
    }
    monkeypatch.setattr(spec_module, "family_defaults", lambda family: config)
    drag = spec_module.mode_defaults("x", "drag", "fast")
    move = spec_module.mode_defaults("x", "move", "fast")
    assert (drag["steps"], drag["guidance"]["energy_scale"]) == (25, 0.8)
    assert (move["steps"], move["guidance"]["energy_scale"]) == (25, 1.0)
    assert drag["guidance"]["cfg_scale"] == 5.0  # merged, not replaced
    assert spec_module.mode_defaults("x", "drag")["guidance"]["energy_scale"] == 0.4
