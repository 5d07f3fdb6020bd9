"""Settings of ``pedetect prepare`` (YAML via ``--config``; command-line options override)."""

from __future__ import annotations

from typing import Literal, TypedDict

from pydantic import Field, field_validator

from pedetect.config import StrictModel


class WindowSpec(StrictModel):
    name: str = Field(..., description="Channel name (for humans; the order is what counts).")
    level: float = Field(..., description="Window level (centre), HU.")
    width: float = Field(..., gt=0, description="Window width, HU.")


class WindowDict(TypedDict):
    """The fields of :class:`WindowSpec` as a plain mapping."""

    name: str
    level: float
    width: float


DEFAULT_WINDOW_SPECS: tuple[WindowDict, ...] = (
    {"name": "lung", "level": -600.0, "width": 1500.0},
    {"name": "pe", "level": 100.0, "width": 700.0},
    {"name": "mediastinal", "level": 40.0, "width": 400.0},
)


class PrepareConfig(StrictModel):
    """What the slice store holds. Changing any of it needs a new store."""

    image_size: int | None = Field(
        default=None,
        ge=16,
        le=4096,
        description="Square side in pixels; other sizes are resized with aspect kept. None: keep each series' size.",
    )
    windows: list[WindowSpec] = Field(
        default_factory=lambda: [WindowSpec(**w) for w in DEFAULT_WINDOW_SPECS],
        description="Exactly three windows, channels R, G, B (default: lung L-600/W1500, PE L100/W700, mediastinal L40/W400).",
    )
    jpeg_quality: int = Field(
        default=90,
        ge=50,
        le=100,
        description="JPEG quality of the stored frames (chosen by measurement, docs/benchmarks.md).",
    )
    jpeg_sampling: Literal["444", "422", "420"] = Field(
        default="444", description="Chroma sampling; 4:4:4 keeps every window at full resolution (docs/benchmarks.md)."
    )

    @field_validator("windows")
    @classmethod
    def _three(cls, value: list[WindowSpec]) -> list[WindowSpec]:
        if len(value) != 3:
            raise ValueError(f"exactly 3 windows are needed (R, G, B channels), got {len(value)}")
        return value

    def window_tuples(self) -> tuple[tuple[float, float], ...]:
        return tuple((w.level, w.width) for w in self.windows)
