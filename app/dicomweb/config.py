"""STOW-RS's one frozen config, built once at start-up from the settings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StowConfig:
    """How studies pushed over STOW-RS become jobs.

    `quiet_s`: a study becomes one job once no instance of it has arrived for this long;
    instances of one study sent in several requests (as PACS routers do) join it until then.
    """

    quiet_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.quiet_s <= 3600:
            raise ValueError(f"quiet_s must be within [0, 3600]. Received: {self.quiet_s}")

    @property
    def flush_every_s(self) -> float:
        """How often the pending studies are looked at: a fraction of the quiet period."""
        return min(max(self.quiet_s / 4, 0.05), 1.0)
