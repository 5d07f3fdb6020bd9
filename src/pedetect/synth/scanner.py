"""The scanner of one synthetic series: slices, pixel size and field of view, stored values
(rescale, bits, padding), instance order, noise and blur, window, kernel and equipment; the grid of
its voxel centres in the phantom's frame."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pedetect.synth.anatomy import ANATOMY_HEIGHT, Anatomy
from pedetect.synth.raster import Grid


@dataclass
class Scanner:
    """Acquisition and storage parameters of one series."""

    n_slices: int
    size: int
    spacing: float  # mm between slice positions
    thickness: float
    pixel_spacing: float
    x0: float  # patient coordinates of the centre of pixel (0, 0)
    y0: float
    z0: float  # z of the lowest slice
    u_range: tuple[float, float]  # anatomical extent covered (fractions of ANATOMY_HEIGHT)
    intercept: float
    slope: float
    signed: bool
    bits_stored: int
    padding: int | None  # stored PixelPaddingValue outside a circular field of view
    instance_order: str  # "increasing", "decreasing" (z vs InstanceNumber) or "shuffled"
    noise_sd: float
    blur_mm: float
    window: tuple[list[float], list[float]]
    series_number: int
    kernel: str
    # General Equipment: drawn from their own random stream (:func:`sample_equipment`), so that adding
    # them changed no other draw of any study.
    manufacturer: str = "pedetect synthetic phantom"
    model: str = ""

    def z(self) -> np.ndarray:
        """Patient z (mm) of each slice in position order (ascending)."""
        return np.round(self.z0 + self.spacing * np.arange(self.n_slices), 4)

    def stored_range(self) -> tuple[int, int]:
        if self.signed:
            return -(1 << (self.bits_stored - 1)), (1 << (self.bits_stored - 1)) - 1
        return 0, (1 << self.bits_stored) - 1


_RESCALE = [  # (weight, intercept, slope, signed, bits_stored)
    (0.30, -1024.0, 1.0, True, 16),
    (0.25, -1024.0, 1.0, False, 12),
    (0.10, -1000.0, 1.0, False, 12),
    (0.15, 0.0, 1.0, True, 16),
    (0.10, -1024.0, 0.5, False, 16),
    (0.10, -1024.0, 2.0, False, 12),
]


_SPACINGS = (0.625, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)


_WINDOWS = (([40.0], [400.0]), ([100.0], [700.0]), ([40.0, -600.0], [400.0, 1500.0]), ([50.0], [350.0]))


# Manufacturer-like settings of the synthetic studies: four vendors of two models each. The names say
# "synthetic": a phantom under a real vendor's name would make a subgroup table look like a claim about
# that vendor's scanners (and the kernels are drawn independently of the vendor: B30f is Siemens-style,
# FC08 Canon-style, STANDARD GE-style, so a real name would pair one vendor with another's kernel).
EQUIPMENT: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Synthetic Vendor A", ("Model A1", "Model A2")),
    ("Synthetic Vendor B", ("Model B1", "Model B2")),
    ("Synthetic Vendor C", ("Model C1", "Model C2")),
    ("Synthetic Vendor D", ("Model D1", "Model D2")),
)


def sample_scanner(
    rng: np.random.Generator,
    an: Anatomy,
    size: int,
    slices: int | None,
    equipment: tuple[str, str] = ("pedetect synthetic phantom", ""),
) -> Scanner:
    n = int(rng.integers(60, 141))
    n = int(slices) if slices is not None else n
    spacing = float(rng.choice(_SPACINGS))
    thickness = spacing if rng.random() < 0.7 else float(min(5.0, spacing * 1.25))
    fov = 2.0 * (an.a + rng.uniform(12.0, 40.0))
    ps = float(np.round(fov / size, 6))
    off_x, off_y = rng.uniform(-10.0, 10.0), rng.uniform(-4.0, 16.0)
    half = (size - 1) / 2.0 * ps
    x0, y0 = float(np.round(-half + off_x, 4)), float(np.round(-half + off_y, 4))
    z0 = float(np.round(-rng.uniform(40.0, 360.0), 1))
    w = np.array([r[0] for r in _RESCALE])
    intercept, slope, signed, bits = _RESCALE[int(rng.choice(len(_RESCALE), p=w / w.sum()))][1:]
    padding = -2000 if signed and rng.random() < 0.5 else None
    order = ("decreasing", "increasing", "shuffled")[int(rng.choice(3, p=[0.45, 0.4, 0.15]))]
    lo = rng.uniform(-0.03, 0.05)
    hi = rng.uniform(0.96, 1.03)
    return Scanner(
        n_slices=n,
        size=int(size),
        spacing=spacing,
        thickness=thickness,
        pixel_spacing=ps,
        x0=x0,
        y0=y0,
        z0=z0,
        u_range=(lo, hi),
        intercept=intercept,
        slope=slope,
        signed=bool(signed),
        bits_stored=int(bits),
        padding=padding,
        instance_order=order,
        noise_sd=rng.uniform(8.0, 26.0),
        blur_mm=rng.uniform(0.3, 0.9),
        window=_WINDOWS[int(rng.integers(len(_WINDOWS)))],
        series_number=int(rng.integers(2, 9)),
        kernel=("STANDARD", "B30f", "FC08", "SOFT")[int(rng.integers(4))],
        manufacturer=equipment[0],
        model=equipment[1],
    )


def make_grid(sc: Scanner) -> Grid:
    n = sc.n_slices
    lo, hi = sc.u_range
    zs = (lo + (hi - lo) * (np.arange(n) + 0.5) / n) * ANATOMY_HEIGHT
    ys = sc.y0 + sc.pixel_spacing * np.arange(sc.size)
    xs = sc.x0 + sc.pixel_spacing * np.arange(sc.size)
    return Grid(zs=zs, ys=ys, xs=xs)
