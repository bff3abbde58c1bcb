"""The edit blended into the source: untouched pixels stay the source's, bit for bit."""

from __future__ import annotations

import json

import numpy as np
from conftest import save_png
from PIL import Image
from typer.testing import CliRunner

from dragonctl import api
from dragonctl.cli import app
from dragonctl.composite import composite, match_colors, region_pixels
from dragonctl.geometry import Frame, dilate


def noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_far_from_the_region_the_output_is_the_source_and_inside_it_the_edit():
    frame = Frame(300, 420, 64, 96)  # source 4.4–4.7× the working size, not square
    source, work = noise(300, 420, 0), noise(64, 96, 1)
    region = np.zeros((64, 96), dtype=bool)
    region[20:36, 40:60] = True
    put = composite(source, work, frame, region, margin_work=4.0)

    region_src = (
        np.asarray(
            Image.fromarray(region.astype(np.uint8) * 255).resize((420, 300), Image.BILINEAR)
        )
        >= 128
    )
    far = ~dilate(region_src, put.margin_px + 1)
    assert far.mean() > 0.7
    assert np.array_equal(put.image[far], source[far])
    # inside the region: the edit resized from the working size, as without compositing
    # (the crop is resampled alone: float rounding moves a rare pixel by a level)
    inside = ~dilate(~region_src, 1)
    diff = put.image[inside].astype(int) - frame.image_to_source(work)[inside]
    assert np.abs(diff).max() <= 1
    # between, a blend: every pixel lies between the source and the edit
    lo = np.minimum(source, frame.image_to_source(work)).astype(int) - 1
    hi = np.maximum(source, frame.image_to_source(work)).astype(int) + 1
    assert ((put.image >= lo) & (put.image <= hi)).all()
    assert 0 < put.edited_fraction < 0.3


def test_the_feather_rises_monotonically_from_source_to_edit():
    frame = Frame(64, 64, 64, 64)
    source = np.zeros((64, 64, 3), dtype=np.uint8)
    work = np.full((64, 64, 3), 200, dtype=np.uint8)
    region = np.zeros((64, 64), dtype=bool)
    region[:, :20] = True
    row = composite(source, work, frame, region, margin_work=8.0).image[32, :, 0].astype(int)
    assert (row[:20] == 200).all() and (row[29:] == 0).all()
    assert (np.diff(row[19:29]) <= 0).all() and 0 < row[24] < 200


def _gradient_scene(h: int = 96, w: int = 96) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack([60 + x, 90 + 0.5 * y, 140 - 0.4 * x], axis=-1)


def test_match_colors_removes_a_drift_and_keeps_what_the_edit_drew():
    """A generation whose colours drifted (+30 green, a slope in red) and which drew a square:
    corrected, its background inside the region is the source's again and the square keeps its
    contrast; without drift nothing changes."""
    source = _gradient_scene()
    region = np.zeros((96, 96), dtype=bool)
    region[24:72, 20:76] = True
    y, x = np.mgrid[0:96, 0:96].astype(np.float32)
    drift = np.stack([0.1 * x, np.full_like(x, 30.0), np.zeros_like(x)], axis=-1)
    drawn = source.copy()
    drawn[40:56, 36:52] = (200, 40, 40)
    out = match_colors(drawn + drift, source, region, ring=6)
    background = region.copy()
    background[36:60, 32:56] = False  # the square and a few pixels round it
    assert np.abs(drawn + drift - source)[background].mean() > 10
    assert np.abs(out - source)[background].mean() < 2.0
    contrast = lambda img: img[48, 44] - img[48, 30]  # noqa: E731  (square minus background)
    assert np.abs(contrast(out) - contrast(drawn)).max() < 2.0
    assert np.abs(match_colors(drawn, source, region, ring=6) - drawn).max() < 1e-3


def test_color_matched_composite_shows_no_box_where_the_generation_drifted():
    frame = Frame(96, 96, 96, 96)
    source = np.clip(_gradient_scene(), 0, 255).astype(np.uint8)
    work = np.clip(source.astype(int) + (0, 30, 0), 0, 255).astype(np.uint8)
    region = np.zeros((96, 96), dtype=bool)
    region[24:72, 20:76] = True
    plain = composite(source, work, frame, region, 4.0).image.astype(int)
    matched = composite(source, work, frame, region, 4.0, color_match=True).image.astype(int)
    assert (np.abs(plain - source)[region][:, 1] == 30).all()
    assert np.abs(matched - source).max() <= 2


def test_an_empty_region_changes_nothing():
    source = noise(50, 70, 2)
    put = composite(source, noise(32, 48, 3), Frame(50, 70, 32, 48), np.zeros((32, 48), bool), 4)
    assert np.array_equal(put.image, source) and put.edited_fraction == 0.0


def test_region_pixels_cover_the_latent_cells():
    cells = np.zeros((3, 4), dtype=bool)
    cells[1, 2] = True
    px = region_pixels(cells, 8)
    assert px.shape == (24, 32) and px.sum() == 64 and px[8:16, 16:24].all()


def test_an_edit_keeps_the_source_away_from_the_edit_unless_told_not_to(tmp_path):
    """The shapes model at 128² on a 480×360 photo: far from the moved object the output is the
    source's own pixels; `--no-composite` (or the spec field) gives the resized generation, and
    the sidecar records which."""
    h, w = 360, 480
    ys, xs = np.mgrid[0:h, 0:w]
    photo = np.stack([80 + 120 * xs / w, 100 + 80 * ys / h, 140 + 40 * np.sin(xs / 9)], -1)
    photo = photo.astype(np.uint8)
    photo[60:150, 60:150] = (220, 40, 40)
    save_png(tmp_path / "photo.png", photo)
    spec = tmp_path / "move.yaml"
    spec.write_text(
        "version: 1\nimage: photo.png\nmode: move\nmodel: shapes\nsteps: 8\n"
        "mask: {box: [50, 50, 160, 160]}\noffset: [90, 40]\n"
    )
    runner = CliRunner()
    for flag, folder in (([], "on"), (["--no-composite"], "off")):
        args = ["edit", str(spec), "--no-cache", "--out", str(tmp_path / folder), *flag]
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
    on = np.asarray(Image.open(tmp_path / "on" / "move.png"))
    off = np.asarray(Image.open(tmp_path / "off" / "move.png"))
    far = np.zeros((h, w), dtype=bool)
    # working size 72×56, latent cells of 4 px (26.7 px here): the target's cells end at x 267
    # and y 214, the margin of 2 cells adds 53 px
    far[:, 330:] = True
    far[280:, :] = True
    assert np.array_equal(on[far], photo[far])
    assert np.abs(off[far].astype(int) - photo[far]).mean() > 1.0  # resized from 64 px: soft
    assert not np.array_equal(on[80:130, 160:230], photo[80:130, 160:230])  # the object moved
    meta_on = json.loads((tmp_path / "on" / "move.json").read_text())
    meta_off = json.loads((tmp_path / "off" / "move.json").read_text())
    assert meta_on["spec"]["composite"] is True and meta_off["spec"]["composite"] is False
    assert (
        0 < meta_on["stats"]["edited_fraction"] < 0.6 and meta_off["stats"]["edited_fraction"] == 1
    )
    # the editing loop's work, the same whichever way the result is put together (#20's unit)
    assert meta_on["stats"]["unet_row_passes"] == meta_off["stats"]["unet_row_passes"] > 0

    # the spec field does what the flag does, and a result made the other way is not up to date
    spec.write_text(spec.read_text() + "composite: false\n")
    opts = api.EditOptions(no_cache=True, out_dir=tmp_path / "on", skip_existing=True)
    rep = api.edit([spec], opts)[0]
    assert rep.ok and not rep.skipped
    assert np.array_equal(np.asarray(Image.open(tmp_path / "on" / "move.png")), off)


def test_a_spec_asks_for_color_matching_and_the_source_stays_away_from_the_edit(tmp_path):
    h, w = 96, 128
    ys, xs = np.mgrid[0:h, 0:w]
    photo = np.stack([80 + 120 * xs / w, 100 + 80 * ys / h, 140 + 0 * xs], -1).astype(np.uint8)
    photo[30:54, 30:54] = (220, 40, 40)
    save_png(tmp_path / "photo.png", photo)
    body = "version: 1\nimage: photo.png\nmode: move\nmodel: shapes\nsteps: 6\n"
    body += "mask: {box: [26, 26, 58, 58]}\noffset: [30, 10]\n"
    (tmp_path / "plain.yaml").write_text(body + "composite_color_match: false\n")
    (tmp_path / "matched.yaml").write_text(body + "composite_color_match: true\n")
    opts = api.EditOptions(no_cache=True, out_dir=tmp_path / "out")
    assert all(r.ok for r in api.edit([tmp_path / "plain.yaml", tmp_path / "matched.yaml"], opts))
    plain = np.asarray(Image.open(tmp_path / "out" / "plain.png")).astype(int)
    matched = np.asarray(Image.open(tmp_path / "out" / "matched.png")).astype(int)
    far = np.zeros((h, w), dtype=bool)
    far[:, 110:] = True
    far[85:, :] = True
    assert np.array_equal(matched[far], photo[far]) and np.array_equal(plain[far], photo[far])
    assert np.abs(matched - plain)[30:70, 30:90].max() > 0
    meta = json.loads((tmp_path / "out" / "matched.json").read_text())
    assert meta["spec"]["composite_color_match"] is True
