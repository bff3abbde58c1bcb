"""Starter specs: `dragonctl init MODE IMAGE` writes one, commented, for each mode."""

from __future__ import annotations

from textwrap import dedent

from dragonctl.errors import UsageError
from dragonctl.spec import MODES, mode_defaults

STARTERS = {
    "move": """\
        mask: {box: [X0, Y0, X1, Y1]}   # the object, in source pixels (or a PNG: mask: object.png)
        offset: [40, 0]                # move it 40 px right (dx, dy)
        # scale: 1.0                   # optional: resize while moving
        """,
    "resize": """\
        mask: {box: [X0, Y0, X1, Y1]}   # the object
        scale: 1.3                      # about the object's centre
        """,
    "drag": """\
        mask: {box: [X0, Y0, X1, Y1]}   # the editable region (omit: the whole image)
        points:                        # handle → target pairs, source pixels
          - [[HX, HY], [TX, TY]]
        """,
    "appearance": """\
        mask: {box: [X0, Y0, X1, Y1]}   # the object to restyle
        reference:
          image: REFERENCE              # another image, or this one
          mask: {box: [X0, Y0, X1, Y1]}   # the object to take the look from
          prompt: ""
        """,
    "paste": """\
        reference:
          image: REFERENCE              # another image, or this one
          mask: {box: [X0, Y0, X1, Y1]}   # the object to paste
          prompt: ""
        at: [X, Y]                      # where its centre lands in the source
        # scale: 1.0
        """,
}
HEAD = """\
    # dragonctl edit spec (MODE). Check it with `dragonctl validate` and `dragonctl preview`.
    version: 1
    image: IMAGE              # relative to this file
    mode: MODE
    prompt: ""                    # describe the image (SD models); the shapes model ignores it
    """
TAIL = """\
    model: shapes                 # the embedded model, offline; for SD 1.5 delete this line
                                  # (or name a hub id, a folder or a .safetensors file)
    # seed: 42
    # steps: 50
    # output: result.png
    # guidance: GUIDANCE
    """


def init_spec(
    mode: str,
    image: str,
    width: int | None = None,
    height: int | None = None,
    reference: str | None = None,
) -> str:
    """A commented starter spec for MODE on IMAGE (placeholders sized to the image when known);
    appearance and paste take their reference object from `reference` (default: IMAGE itself,
    so the starter validates as written)."""
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    body = dedent(STARTERS[mode]).replace("REFERENCE", reference or image)
    if width and height:
        body = (
            body.replace("X0", str(width // 4))
            .replace("Y0", str(height // 4))
            .replace("X1", str(width // 2))
            .replace("Y1", str(height // 2))
            .replace("HX", str(width * 5 // 16))  # both points inside the drag's region
            .replace("HY", str(height * 3 // 8))
            .replace("TX", str(width * 7 // 16))
            .replace("TY", str(height * 3 // 8))
            .replace("[X, Y]", f"[{width // 2}, {height // 2}]")
        )
    head = dedent(HEAD).replace("MODE", mode).replace("IMAGE", image)
    return head + body + dedent(TAIL).replace("GUIDANCE", _guidance_comment(mode))


def _guidance_comment(mode: str) -> str:
    """The shapes model's main guidance settings for MODE, as its config sets them."""
    g = mode_defaults("shapes", mode)["guidance"]
    keys = ("method", "energy_scale", "cfg_scale")
    shown = ", ".join(f"{k}: {g[k]}" for k in keys if k in g)
    return "{" + shown + "}   # the shapes model's; SD's are in configs/sd15.yaml"
