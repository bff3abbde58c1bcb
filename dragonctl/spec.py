"""The YAML edit spec: pydantic models, loading, and merging of the defaults in `configs/`.

A spec file is read with `yaml.safe_load`, merged over its model family's defaults (first
`defaults`, then `modes.<mode>`, then the file itself) and validated as a whole, so every error
names the spec file and the field path the user wrote. Paths inside a spec are relative to the
spec file. This module only checks the structure; `inputs.py` decodes the files it names.
"""

from __future__ import annotations

import copy
import difflib
import reprlib
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dragonctl.errors import Problem, SpecError
from dragonctl.families import SD15_MODEL, family_for_model
from dragonctl.files import read_regular

Mode = Literal["move", "resize", "drag", "appearance", "paste"]
MODES: tuple[str, ...] = get_args(Mode)  # the one list of modes

# coordinates and offsets in pixels: far beyond any image, short of float overflow
Finite = Annotated[float, Field(allow_inf_nan=False, ge=-1e6, le=1e6)]
PathStr = Annotated[str, Field(min_length=1)]
NonNeg = Annotated[float, Field(allow_inf_nan=False, ge=0)]
Fraction = Annotated[float, Field(allow_inf_nan=False, ge=0, le=1)]
Point = Annotated[list[Finite], Field(min_length=2, max_length=2)]
Pair = Annotated[list[Point], Field(min_length=2, max_length=2)]


class _Model(BaseModel):
    # strict: "50" is not a number and 1 is not a string; unknown fields are errors.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class MaskSpec(_Model):
    """A mask: a PNG (white = selected) or an inline shape, in the pixels of the image it belongs
    to."""

    path: PathStr | None = None
    box: Annotated[list[Finite], Field(min_length=4, max_length=4)] | None = None
    polygon: Annotated[list[Point], Field(min_length=3)] | None = None
    circle: Annotated[list[Finite], Field(min_length=3, max_length=3)] | None = None
    dilate: Annotated[int, Field(ge=0, le=256)] = 0

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _exactly_one(self) -> MaskSpec:
        given = [k for k in ("path", "box", "polygon", "circle") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of: a PNG path, box, polygon, circle")
        if self.box is not None and not (self.box[0] < self.box[2] and self.box[1] < self.box[3]):
            raise ValueError("box must be [x0, y0, x1, y1] with x0 < x1 and y0 < y1")
        if self.circle is not None and not self.circle[2] > 0:
            raise ValueError("circle radius must be > 0")
        if self.polygon is not None and _area(self.polygon) < 0.5:
            raise ValueError("polygon encloses no area (its vertices are collinear)")
        return self


def _area(points: list[list[float]]) -> float:
    """The polygon's area (shoelace formula)."""
    twice = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]))
    return abs(twice) / 2


class Reference(_Model):
    image: PathStr
    mask: MaskSpec
    prompt: str = ""


class ImagePrompt(_Model):
    """DiffEditor's image prompt: an IP-Adapter whose image tokens every cross-attention layer
    adds, at `scale`, to the generation rows of the steps in [from, until) of the schedule."""

    adapter: PathStr | None  # None: off
    encoder: PathStr | None
    scale: Annotated[float, Field(allow_inf_nan=False, ge=0, le=10)]
    start: Fraction = Field(alias="from")
    until: Fraction

    @model_validator(mode="after")
    def _window_in_order(self) -> ImagePrompt:
        if self.start > self.until:
            raise ValueError(f"from ({self.start}) is after until ({self.until})")
        return self

    @property
    def active(self) -> bool:
        return self.adapter is not None and self.scale > 0


class Guidance(_Model):
    method: Literal["dragondiffusion", "diffeditor"]
    cfg_scale: Annotated[float, Field(allow_inf_nan=False, ge=0, le=50)]
    energy_scale: Annotated[float, Field(allow_inf_nan=False, ge=0, le=1000)]
    energy_resolution: Annotated[int, Field(ge=16, le=4096)]
    gradient_scale: NonNeg
    w_edit: NonNeg
    w_content: NonNeg
    w_contrast: NonNeg
    w_inpaint: NonNeg
    w_fill: NonNeg = 0.0
    w_structure: NonNeg
    guide_until: Fraction
    dense_until: Fraction
    inject_from: Fraction
    inject_until: Fraction
    sde_from: Fraction
    sde_until: Fraction
    sde_strength: Annotated[float, Field(allow_inf_nan=False, ge=0, le=1)]
    sde_strength_outside: Annotated[float, Field(allow_inf_nan=False, ge=0, le=1)]
    time_travel_from: Fraction
    time_travel_until: Fraction
    time_travel_repeats: Annotated[int, Field(ge=0, le=10)]
    regional_attention: bool
    appearance_init: Literal["source", "reference_statistics"]
    image_prompt: ImagePrompt | None = None

    @model_validator(mode="after")
    def _windows_in_order(self) -> Guidance:
        for start, end in (
            ("inject_from", "inject_until"),
            ("sde_from", "sde_until"),
            ("time_travel_from", "time_travel_until"),
        ):
            if getattr(self, start) > getattr(self, end):
                raise ValueError(
                    f"{start} ({getattr(self, start)}) is after {end} ({getattr(self, end)})"
                )
        return self


# Which optional fields each mode needs (required) and accepts.
MODE_FIELDS: dict[str, tuple[set[str], set[str]]] = {
    "move": ({"mask", "offset"}, {"scale", "fill_region"}),
    "resize": ({"mask", "scale"}, {"offset", "fill_region"}),
    "drag": ({"points"}, {"mask"}),
    "appearance": ({"mask", "reference"}, set()),
    "paste": ({"reference", "at"}, {"scale"}),
}
MODE_SPECIFIC = {"mask", "offset", "scale", "points", "reference", "at", "fill_region"}


class Spec(_Model):
    """A fully resolved edit spec (defaults merged). Paths are still as written, relative to the
    file."""

    version: Literal[1]
    image: PathStr
    mode: Mode
    prompt: str = ""
    mask: MaskSpec | None = None
    offset: Point | None = None
    scale: Annotated[float, Field(allow_inf_nan=False, ge=0.01, le=16)] | None = None
    points: Annotated[list[Pair], Field(min_length=1)] | None = None
    reference: Reference | None = None
    at: Point | None = None
    fill_region: MaskSpec | None = None
    model: Annotated[str, Field(min_length=1)]
    seed: Annotated[int, Field(ge=0, lt=2**63)]
    steps: Annotated[int, Field(ge=2, le=1000)]
    inversion_refine: Annotated[int, Field(ge=0, le=10)]
    resolution: Annotated[int, Field(ge=16, le=4096)]
    # a larger source is edited at its own size up to this (None: always at resolution)
    max_resolution: Annotated[int, Field(ge=16, le=4096)] | None = None
    guidance: Guidance
    composite: bool
    composite_margin: Annotated[float, Field(allow_inf_nan=False, ge=0, le=64)]
    composite_color_match: bool
    output: PathStr | None = None
    # a named set of defaults from the model family's config (`presets:`), e.g. fast
    preset: str | None = None

    @field_validator("version", mode="before")
    @classmethod
    def _version_is_a_number(cls, value: Any) -> Any:
        if isinstance(value, bool):  # YAML's true is not 1
            raise ValueError(f"version must be 1, not {value}")
        return value

    @model_validator(mode="after")
    def _mode_fields(self) -> Spec:
        required, optional = MODE_FIELDS[self.mode]
        missing = sorted(f for f in required if getattr(self, f) is None)
        extra = sorted(
            f for f in MODE_SPECIFIC - required - optional if getattr(self, f) is not None
        )
        if missing:
            raise ValueError(f"mode {self.mode} needs: {', '.join(missing)}")
        if extra:
            raise ValueError(f"not used by mode {self.mode}: {', '.join(extra)}")
        return self

    @property
    def effective_scale(self) -> float:
        return 1.0 if self.scale is None else self.scale


class LoadedSpec(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    path: Path
    spec: Spec
    raw: dict  # the file's own values (and command-line overrides), before defaults
    family: str = "sd15"  # whose defaults were merged under it

    def for_family(self, family: str) -> LoadedSpec:
        """The same file merged over another family's defaults (a hub model whose family was
        unknown until it was downloaded)."""
        mode, preset = self.spec.mode, self.spec.preset
        if preset is not None and preset not in presets(family):
            raise SpecError.one(self.path, "preset", _unknown_preset(preset, family))
        try:
            merged = deep_merge(mode_defaults(family, mode, preset), self.raw)
            spec = Spec.model_validate(merged)
        except ValidationError as e:
            raise SpecError(_problems(self.path, e)) from None
        return LoadedSpec(path=self.path, spec=spec, raw=self.raw, family=family)

    def resolve(self, relative: str) -> Path:
        try:
            p = Path(relative).expanduser()
        except RuntimeError:  # ~user of an unknown user: reported as a missing file
            p = Path(relative)
        return p if p.is_absolute() else (self.path.parent / p)


# ---------------------------------------------------------------------------------------------
# defaults


def configs_dir() -> Path:
    """`configs/` at the repository root (source checkout) or inside the installed package
    (wheel)."""
    packaged = Path(__file__).parent / "configs"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "configs"


@cache
def family_defaults(family: str) -> dict:
    """A family's config; one that names `inherits: <family>` is merged over that one's."""
    data = yaml.safe_load((configs_dir() / f"{family}.yaml").read_text())
    parent = data.pop("inherits", None)
    return deep_merge(family_defaults(parent), data) if parent else data


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def mode_defaults(family: str, mode: str, preset: str | None = None) -> dict:
    """The family's defaults, its mode's over them, then the preset's: its `defaults`, then
    its `modes.<mode>` (KeyError: no such preset)."""
    cfg = family_defaults(family)
    out = deep_merge(cfg["defaults"], cfg.get("modes", {}).get(mode, {}))
    if preset is not None:
        named = cfg.get("presets", {})[preset]
        out = deep_merge(out, named.get("defaults", {}))
        out = deep_merge(out, named.get("modes", {}).get(mode, {}))
    return out


def presets(family: str) -> list[str]:
    return sorted(family_defaults(family).get("presets", {}))


def defaults_for(model: str, mode: str) -> dict:
    return mode_defaults(family_for_model(model), mode)


# ---------------------------------------------------------------------------------------------
# loading


def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after[_exactly_one()]", "function-before[_from_string()]"):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


# Values echoed into messages stay short whatever they are (an alias bomb's repr never ends).
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 60, 60


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (inside Optional, unions, lists, Annotated), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _fields_at(loc: tuple) -> list[str]:
    """The field names a spec allows at `loc` (the mapping an unknown field was found in)."""
    model: type[BaseModel] = Spec
    for part in (p for p in loc if not isinstance(p, int)):
        f = model.model_fields.get(part)
        inner = _model_in(f.annotation) if f is not None else None
        if inner is None:
            return []
        model = inner
    return list(model.model_fields)


def _reason(err: dict, loc: tuple) -> str:
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if err["type"] == "extra_forbidden":
        name = loc[-1] if loc and isinstance(loc[-1], str) else ""
        close = difflib.get_close_matches(name, _fields_at(loc[:-1]), n=1, cutoff=0.7)
        return f"unknown field (did you mean `{close[0]}`?)" if close else "unknown field"
    if err["type"] == "missing":
        return "required field is missing"
    if err["type"] == "literal_error" and "input" in err:
        return f"{msg} (got {_SHORT.repr(err['input'])})"
    return msg


def _problems(file: Path, exc: ValidationError) -> list[Problem]:
    seen: list[Problem] = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        # Unions of "path string | inline shape" report both branches; keep the more useful one.
        loc = tuple(p for p in loc if p not in ("str", "MaskSpec"))
        p = Problem(str(file), _field_path(loc), _reason(err, loc))
        if p not in seen:
            seen.append(p)
    if len(seen) > MAX_PROBLEMS:  # a report stays readable (and small) whatever the file
        more = len(seen) - MAX_PROBLEMS
        seen = [*seen[:MAX_PROBLEMS], Problem(str(file), "", f"and {more} more problems")]
    return seen


MAX_PROBLEMS = 20


MAX_SPEC_BYTES = 1 << 20  # a spec file is a page of YAML
SPEC_SUFFIXES = (".yaml", ".yml")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a field given twice (the last would silently win)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _value in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key != "<<" and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"field {_SHORT.repr(key)} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_spec(
    path: str | Path,
    model: str | None = None,
    seed: int | None = None,
    composite: bool | None = None,
    preset: str | None = None,
) -> LoadedSpec:
    """Read, merge and validate one spec file. `model`, `seed`, `composite` and `preset` are
    command-line overrides (None: the spec's own)."""
    path = Path(path)
    if path.suffix not in SPEC_SUFFIXES:
        raise SpecError.one(path, "", "spec files end in .yaml or .yml")
    try:
        text = read_regular(path, MAX_SPEC_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise SpecError.one(path, "", "no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SpecError.one(path, "", f"cannot read: {getattr(e, 'strerror', None) or e}") from None
    try:
        given = {"model": model, "seed": seed, "composite": composite, "preset": preset}
        return _parse(path, text, {k: v for k, v in given.items() if v is not None})
    except RecursionError:
        raise SpecError.one(path, "", "nested too deeply") from None


def _unknown_preset(preset: Any, family: str) -> str:
    known = ", ".join(presets(family)) or "none"
    return f"no preset {_SHORT.repr(preset)} for {family} models (known: {known})"


MAX_DEPTH = 32  # a spec's deepest honest value is a list of point pairs (4 levels)


def _too_deep(text: str) -> str | None:
    """The top-level field whose value nests deeper than MAX_DEPTH ("" when no field is known), or
    None. YAML's tokens are read without recursion, so any depth is measured safely."""
    depth, key, expect_key = 0, "", False
    opening = (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken)
    opening += (yaml.FlowMappingStartToken, yaml.FlowSequenceStartToken)
    closing = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)
    try:
        for token in yaml.scan(text, Loader=yaml.SafeLoader):
            if isinstance(token, opening):
                depth += 1
                if depth > MAX_DEPTH:
                    return key
            elif isinstance(token, closing):
                depth -= 1
            elif isinstance(token, yaml.KeyToken):
                expect_key = depth == 1
            elif expect_key and isinstance(token, yaml.ScalarToken):
                key, expect_key = token.value, False
    except yaml.YAMLError:
        return None  # the parser says what is wrong, and where
    return None


def _parse(path: Path, text: str, overrides: dict[str, Any]) -> LoadedSpec:
    deep = _too_deep(text)
    if deep is not None:
        raise SpecError.one(path, deep, f"nested more than {MAX_DEPTH} levels deep")
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError.one(
            path, "", f"not valid YAML{where}: {getattr(e, 'problem', None) or e}"
        ) from None
    if not isinstance(raw, dict):
        raise SpecError.one(
            path, "", "a spec is a YAML mapping (field: value), got " + type(raw).__name__
        )
    bad_keys = [k for k in raw if not isinstance(k, str)]
    if bad_keys:
        raise SpecError.one(path, str(bad_keys[0]), "field names must be strings")
    raw = {**raw, **overrides}
    mode = raw.get("mode")
    model_name = raw.get("model") if isinstance(raw.get("model"), str) else SD15_MODEL
    family = family_for_model(model_name)
    preset = raw.get("preset")
    if preset is not None and preset not in presets(family):
        raise SpecError.one(path, "preset", _unknown_preset(preset, family))
    merged = deep_merge(mode_defaults(family, mode if mode in MODES else "move", preset), raw)
    if not isinstance(raw.get("guidance", {}), dict):
        raise SpecError.one(path, "guidance", "must be a mapping of guidance settings")
    if family.startswith("shapes") and raw.get("guidance", {}).get("image_prompt"):
        raise SpecError.one(
            path,
            "guidance.image_prompt",
            "the shapes model has no image encoder or cross-attention to prompt; "
            "image prompts need a Stable Diffusion model",
        )
    try:
        spec = Spec.model_validate(merged)
    except ValidationError as e:
        raise SpecError(_problems(path, e)) from None
    return LoadedSpec(path=path, spec=spec, raw=raw, family=family)
