"""Errors that name the file, the field and the reason: what users and scripts see instead of
tracebacks. The CLI picks exit codes by type, never by message text."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    file: str
    field: (
        str  # dotted path into the spec, e.g. "reference.mask" or "points[1][0]"; "" for the file
    )
    reason: str

    def __str__(self) -> str:
        parts = [self.file, self.field, self.reason] if self.field else [self.file, self.reason]
        return ": ".join(printable(p) for p in parts)


def printable(text: str, limit: int = 300) -> str:
    """One line for a terminal: control characters escaped (a value can carry escape sequences
    or a newline that forges another line), at most `limit` characters."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: limit + 1])
    return out if len(out) <= limit else out[: limit - 1] + "…"


class DragonError(Exception):
    """A failure the user can act on; its message is one line (or one line per problem)."""


class SpecError(DragonError):
    """A spec, or a file it names, is invalid."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))

    @classmethod
    def one(cls, file: str | Path, field: str, reason: str) -> SpecError:
        return cls([Problem(str(file), field, reason)])


class UsageError(DragonError):
    """The command as a whole cannot run as asked (e.g. two specs write one file): exit 2."""


class ModelError(DragonError):
    """A model cannot be loaded or lacks what the method needs."""


class EditDiverged(DragonError):
    """The edit's latent became non-finite (too strong a guidance)."""


class EditInterrupted(DragonError):
    """The user asked to stop (Ctrl-C); raised between sampler steps, so nothing is half-written."""
