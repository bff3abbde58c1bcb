"""The one progress callback type: the engine reports, the CLI draws, notebooks do as they like."""

from __future__ import annotations

from collections.abc import Callable

# (phase, done, total): phase is "inversion" or "editing"; done counts steps from 1 to total
Progress = Callable[[str, int, int], None]
