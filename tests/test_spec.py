"""The spec: every field accepted where valid, every error path named by file, field and reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import save_png, write_spec

from dragonctl import api
from dragonctl.errors import SpecError
from dragonctl.inputs import load_inputs
from dragonctl.spec import MODES, defaults_for, load_spec


def problems(path: Path, model: str | None = None) -> list[str]:
    rep = api.validate([path], model=model)[0]
    assert not rep.ok, "expected the spec to be rejected"
    return rep.errors


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_validates_and_merges_defaults(spec_for, mode):
    path = spec_for(mode, model="shapes", guidance={"w_edit": 7.5})
    ls = load_spec(path)
    assert ls.spec.mode == mode
    # configs/shapes.yaml: the family's defaults, then the mode's, then the spec's own values
    g = ls.spec.guidance
    family = load_spec(spec_for(mode, name="plain.yaml", model="shapes")).spec.guidance
    assert g.energy_scale == family.energy_scale > 0  # every mode is guided
    assert (g.w_edit, g.cfg_scale, g.guide_until) == (7.5, 1.0, 0.6)
    assert ls.spec.steps == 4 and ls.spec.seed == 42 and ls.spec.prompt == ""
    assert ls.spec.resolution == 32 and ls.spec.inversion_refine == 2  # spec's; family's
    assert api.validate([path])[0].ok


def test_sd_defaults_follow_the_reference():
    d = defaults_for("stable-diffusion-v1-5/stable-diffusion-v1-5", "move")
    g = d["guidance"]
    assert (
        d["steps"],
        d["resolution"],
        g["cfg_scale"],
        g["energy_scale"],
        g["gradient_scale"],
    ) == (50, 512, 4.0, 0.5, 0.08)
    assert (g["w_edit"], g["w_content"], g["w_contrast"], g["w_inpaint"]) == (4.0, 6.0, 0.2, 0.8)
    assert defaults_for("x/y", "appearance")["guidance"]["cfg_scale"] == 5.0
    assert defaults_for("x/y", "drag")["guidance"]["energy_scale"] == 2.0


def test_a_trained_shapes_folder_gets_the_shapes_defaults(tmp_path):
    folder = tmp_path / "my_shapes"
    folder.mkdir()
    assert defaults_for(str(folder), "move")["resolution"] == 512  # any folder: SD's defaults
    (folder / "null_prompt.safetensors").write_bytes(b"")
    assert defaults_for(str(folder), "move") == defaults_for("shapes", "move")


def test_spec_values_override_defaults_and_cli_overrides_spec(spec_for):
    path = spec_for("move", seed=7, guidance={"energy_scale": 0.25, "method": "diffeditor"})
    ls = load_spec(path)
    assert (
        ls.spec.seed == 7
        and ls.spec.guidance.energy_scale == 0.25
        and ls.spec.guidance.method == "diffeditor"
    )
    assert ls.spec.guidance.w_edit == 4.0  # untouched keys keep their defaults
    assert load_spec(path, seed=3, model="shapes").spec.seed == 3
    assert load_spec(path, model="shapes").spec.model == "shapes"


def test_inline_masks_and_dilation(workdir):
    for i, mask in enumerate(
        [
            {"box": [8, 10, 24, 26]},
            {"polygon": [[8, 10], [24, 10], [16, 26]]},
            {"circle": [16, 18, 6]},
            {"path": "mask.png", "dilate": 2},
        ]
    ):
        path = write_spec(
            workdir, f"m{i}.yaml", image="src.png", mode="move", mask=mask, offset=[10, 0]
        )
        inp = load_inputs(load_spec(path))
        assert inp.mask is not None and inp.mask.any() and inp.mask.shape == (40, 56)
    box = load_inputs(
        load_spec(
            write_spec(
                workdir,
                "b.yaml",
                image="src.png",
                mode="move",
                mask={"box": [8, 10, 24, 26]},
                offset=[1, 0],
            )
        )
    ).mask
    assert box.sum() == 16 * 16 and box[10, 8] and not box[26, 24]  # half-open
    dil = load_inputs(
        load_spec(
            write_spec(
                workdir,
                "d.yaml",
                image="src.png",
                mode="move",
                mask={"box": [8, 10, 24, 26], "dilate": 2},
                offset=[1, 0],
            )
        )
    ).mask
    assert dil.sum() == 20 * 20


def test_resize_target_is_about_the_object_centre(spec_for):
    inp = load_inputs(load_spec(spec_for("resize", scale=1.5)))
    ys, xs = np.nonzero(inp.target_mask)
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (
        4,
        28,
        6,
        30,
    )  # 16 px box → 24 px, same centre


def test_move_with_scale_and_offset(spec_for):
    inp = load_inputs(load_spec(spec_for("move", offset=[20, 2], scale=0.5)))
    ys, xs = np.nonzero(inp.target_mask)
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (32, 40, 16, 24)


def test_zero_length_pair_is_a_warning(spec_for):
    rep = api.validate([spec_for("drag")])[0]
    assert rep.ok and any("zero length" in w for w in rep.warnings)


def test_a_fill_region_is_no_warning(spec_for):
    fill = {"box": [30, 2, 50, 12]}
    rep = api.validate([spec_for("resize", name="r2.yaml", fill_region=fill)])[0]
    assert rep.ok and not rep.warnings
    rep = api.validate([spec_for("move", name="m2.yaml", fill_region=fill)])[0]
    assert rep.ok and not rep.warnings


def test_an_unknown_appearance_init_names_its_field(spec_for):
    with pytest.raises(SpecError, match="guidance.appearance_init"):
        load_spec(spec_for("resize", guidance={"appearance_init": "magic"}))
    # the image-space copies are gone: their switches are unknown fields
    with pytest.raises(SpecError, match="guidance.move_method"):
        load_spec(spec_for("move", name="m.yaml", guidance={"move_method": "copy"}))


def test_paste_target_and_any_reference_size(spec_for):
    inp = load_inputs(load_spec(spec_for("paste")))
    ys, xs = np.nonzero(inp.target_mask)
    assert inp.reference.shape == (48, 48, 3)
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (
        32,
        47,
        12,
        27,
    )  # 20 px × 0.75 = 15 px, centred at (40, 20)


BAD = [
    # (fields to change, expected field, a fragment of the reason)
    (dict(mode="rotate"), "mode", "'move'"),
    (dict(version=2), "version", "1"),
    (dict(colour="red"), "colour", "unknown field"),
    (dict(image=5), "image", "string"),
    (dict(image=None), "image", "required field is missing"),
    (dict(image="missing.png"), "image", "file not found"),
    (dict(image="notes.txt"), "image", "not an image"),
    (dict(image="trunc.png"), "image", "cannot decode"),
    (dict(mask="small_mask.png"), "mask", "mask is 20×20 but its image is 56×40"),
    (dict(mask="empty_mask.png"), "mask", "mask is empty"),
    (dict(mask="full_mask.png"), "mask", "whole image"),
    (dict(mask={"box": [8, 10, 60, 26]}), "mask.box", "outside the 56×40 frame"),
    (dict(mask={"box": [20, 10, 8, 26]}), "mask", "x0 < x1"),
    (dict(mask={"circle": [10, 10, 0]}), "mask", "radius must be > 0"),
    (dict(mask={"circle": [5, 5, 9]}), "mask.circle", "outside"),
    (dict(mask={"polygon": [[0, 0], [5, 5]]}), "mask.polygon", "at least 3"),
    (dict(mask={"polygon": [[0, 0], [5, 5], [99, 1]]}), "mask.polygon", "outside"),
    (dict(mask={"box": [1, 1, 5, 5], "circle": [3, 3, 1]}), "mask", "exactly one"),
    (dict(mask={"path": "mask.png", "dilate": -1}), "mask.dilate", "greater than or equal"),
    (dict(offset=[200, 0]), "offset", "fully outside the frame"),
    (dict(offset=[float("nan"), 0]), "offset[0]", "finite"),
    (dict(offset=[1, 2, 3]), "offset", "at most 2"),
    (dict(offset="10,0"), "offset", "list"),
    (dict(scale=-1), "scale", "greater than or equal to 0.01"),
    (dict(scale=float("inf")), "scale", "finite"),
    (dict(seed=-5), "seed", "greater than or equal to 0"),
    (dict(steps="fifty"), "steps", "integer"),
    (dict(steps=1), "steps", "greater than or equal to 2"),
    (dict(guidance={"energy_scale": -1}), "guidance.energy_scale", "greater than or equal to 0"),
    (dict(guidance={"w_edit": float("nan")}), "guidance.w_edit", "finite"),
    (dict(guidance={"method": "magic"}), "guidance.method", "dragondiffusion"),
    (dict(guidance={"cfg": 4}), "guidance.cfg", "unknown field"),
    (dict(guidance=3), "guidance", "mapping"),
    (dict(offset=None), "", "mode move needs: offset"),
    (dict(points=[[[1, 1], [2, 2]]]), "", "not used by mode move: points"),
]


@pytest.fixture
def broken_files(workdir):
    (workdir / "notes.txt").write_text("not an image")
    data = (workdir / "src.png").read_bytes()
    (workdir / "trunc.png").write_bytes(data[: len(data) // 2])
    save_png(workdir / "small_mask.png", np.zeros((20, 20), dtype=np.uint8) + 255)
    save_png(workdir / "empty_mask.png", np.zeros((40, 56), dtype=np.uint8))
    save_png(workdir / "full_mask.png", np.zeros((40, 56), dtype=np.uint8) + 255)
    return workdir


def rewrite(path: Path, change: dict) -> Path:
    """Apply `change` to a spec file (None removes the field)."""
    import yaml

    data = yaml.safe_load(path.read_text())
    for k, v in change.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "change,field,reason", BAD, ids=[f"{b[1] or 'spec'}-{i}" for i, b in enumerate(BAD)]
)
def test_broken_specs_name_file_field_and_reason(broken_files, spec_for, change, field, reason):
    path = rewrite(spec_for("move", name="bad.yaml"), change)
    errs = problems(path)
    prefix = f"{path}: {field}: " if field else f"{path}: "
    assert any(e.startswith(prefix) and reason in e for e in errs), errs
    assert all("Traceback" not in e and "\n" not in e for e in errs)


@pytest.mark.parametrize(
    "mode,change,field,reason",
    [
        ("drag", dict(points=[[[100, 5], [10, 5]]]), "points[0][0]", "outside the 56×40 image"),
        ("drag", dict(points=[]), "points", "at least 1"),
        ("drag", dict(points=[[[1, 2]]]), "points[0]", "at least 2"),
        ("paste", dict(at=[-1, 5]), "at", "outside"),
        ("paste", dict(reference={"image": "ref.png"}), "reference.mask", "required"),
        (
            "paste",
            dict(reference={"image": "nope.png", "mask": {"box": [0, 0, 4, 4]}}),
            "reference.image",
            "not found",
        ),
        (
            "paste",
            dict(reference={"image": "ref.png", "mask": {"box": [0, 0, 99, 4]}}),
            "reference.mask.box",
            "48×48",
        ),
        ("appearance", dict(reference=None), "", "mode appearance needs: reference"),
        ("resize", dict(scale=None), "", "needs: scale"),
    ],
)
def test_mode_specific_errors(workdir, spec_for, mode, change, field, reason):
    path = rewrite(spec_for(mode, name="bad.yaml"), change)
    errs = problems(path)
    prefix = f"{path}: {field}: " if field else f"{path}: "
    assert any(e.startswith(prefix) and reason in e for e in errs), errs


def test_file_level_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("mode: [unclosed\n")
    (tmp_path / "b.yaml").write_text("- just\n- a list\n")
    (tmp_path / "c.json").write_text("version: 1\n")
    assert "not valid YAML at line" in problems(tmp_path / "a.yaml")[0]
    assert "a spec is a YAML mapping" in problems(tmp_path / "b.yaml")[0]
    assert "end in .yaml or .yml" in problems(tmp_path / "c.json")[0]
    assert "no such file" in problems(tmp_path / "none.yaml")[0]


def test_yaml_is_loaded_safely(tmp_path):
    (tmp_path / "evil.yaml").write_text(
        "version: 1\nimage: !!python/object/apply:os.system ['echo hacked']\nmode: move\n"
    )
    errs = problems(tmp_path / "evil.yaml")
    assert "not valid YAML" in errs[0]


def test_spec_that_references_itself(workdir):
    path = write_spec(
        workdir,
        "self.yaml",
        image="self.yaml",
        mode="move",
        mask={"box": [0, 0, 4, 4]},
        offset=[1, 0],
    )
    assert any("image: not an image" in e for e in problems(path))


def test_validation_never_loads_a_model(spec_for, monkeypatch):
    import dragonctl.models as models

    def boom(*a, **k):
        raise AssertionError("validate loaded a model")

    monkeypatch.setattr(models, "load_bundle", boom)
    assert api.validate([spec_for("paste")])[0].ok


def test_paths_are_relative_to_the_spec_file(workdir, tmp_path_factory):
    sub = workdir / "specs" / "deep"
    sub.mkdir(parents=True)
    path = write_spec(
        sub, "s.yaml", image="../../src.png", mode="move", mask="../../mask.png", offset=[4, 0]
    )
    assert api.validate([path])[0].ok


def test_decompression_bomb_is_refused(workdir, monkeypatch):
    import dragonctl.inputs as inputs

    monkeypatch.setattr(inputs, "MAX_PIXELS", 100)
    path = write_spec(
        workdir, "big.yaml", image="src.png", mode="move", mask="mask.png", offset=[4, 0]
    )
    with pytest.raises(SpecError) as e:
        load_inputs(load_spec(path))
    assert "over the 100-pixel limit" in str(e.value)


def test_samples_are_valid():
    samples = Path(__file__).resolve().parents[1] / "samples"
    reports = api.validate(sorted(samples.glob("*.yaml")))
    assert {load_spec(r.path).spec.mode for r in reports} == set(MODES)
    assert all(r.ok for r in reports), [r.errors for r in reports]
    assert all(load_spec(r.path).spec.model == "shapes" for r in reports)
