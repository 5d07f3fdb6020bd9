"""Where the clot is: candidates from the slice CNN's activation maps, learnt from slice labels alone.

The stage-1 CNN ends in global max pooling, so its slice logit is the head on each channel's
strongest response: the head applied to one position of the last feature map at a time
(:meth:`~pedetect.models.slice_classifier.SliceClassifier.embed_with_map`) is highest where the CNN
found what made it fire. ``predict`` averages those maps (as probabilities) over the folds that read
the same pixels, and this module turns one series' maps into candidates (docs/localisation.md):

1. scores: each cell's map probability times its slice's PE probability (the model's, after the
   sequence head): every position of a slice has a map value, a negative slice's well above 0, so
   the slice says whether there is a clot and the map where;
2. peaks: cells that are the maximum of their 3 × 3 × 3 neighbourhood (slice, row, column of the
   map) with a score of at least ``min_score``, strongest first, a peak within ``suppress_slices``
   slices and ``suppress_cells`` cells of a stronger one dropped, at most ``max_candidates`` per
   series; a candidate's score is its peak's;
3. each peak's region: the cells connected to it (across neighbouring slices too) that rise at least
   ``region_fraction`` of the way from their slice's median map value to the peak's: its slice range;
4. on the key slice (the peak's), the map resampled to the pixels the CNN saw: the point is the
   centroid of the region's pixels weighted by how far they rise above the region's floor, the
   outline the region's contour — or, where the Hounsfield units show one near it, the filling
   defect's centroid and contour; both are given in the DICOM image's own pixel grid;
5. the other filling defects near each peak's point on its key slice (a neighbouring artery's clot,
   which a stronger peak close by would otherwise hide) as candidates of their own, scored
   ``neighbour_score`` × the peak's;
6. the side from the patient's own anatomy on the key slice: the lungs (air inside the body, from
   the lung window) split into right and left by their position along the patient's x axis; a
   point between their medial edges is central (mediastinum: pulmonary trunk and main arteries),
   else it takes the side of the lung it lies towards. Coordinates in the patient frame (mm) come
   from ImagePositionPatient, ImageOrientationPatient and PixelSpacing, so a flipped or rotated
   series gets its sides right.

Exam outputs and slice probabilities do not depend on any of this.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np
from scipy import ndimage

from pedetect.data.heart_box import estimate_hu
from pedetect.data.lung_box import LungBoxSettings, body_mask, lung_mask

# Columns of ``predict --clots``: one row per candidate.
CANDIDATE_COLUMNS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "candidate",
    "score",
    "side",
    "SOPInstanceUID",
    "slice_index",
    "row",
    "col",
    "slice_first",
    "slice_last",
    "x_mm",
    "y_mm",
    "z_mm",
    "outline",
)
SIDES = ("central", "right", "left")


@dataclass(frozen=True)
class LocaliseSettings:
    min_score: float = 0.05  # a peak's score (map × slice probability) must reach this to be a candidate
    max_candidates: int = 10  # per series, strongest first
    region_fraction: float = 0.5  # a region: cells this far from their slice's median up to the peak's value
    suppress_slices: int = 1  # a weaker peak this close (slices and cells) to a stronger one is the same finding
    suppress_cells: int = 2
    band_mm: float = 20.0  # the lungs' medial edges are read within this distance (rows) of the point
    # The point and outline from the filling defect itself (docs/localisation.md): a clot is a defect of
    # soft-tissue density inside opacified blood, searched for this far (cells of the map) from the map's
    # point. 0: the map's point and region alone.
    defect_search: float = 1.5
    defect_search_max: float = (
        32.0  # pixels of the decoded slice: the search's radius at most (a coarse map's cells are large)
    )
    contrast_hu: float = 180.0  # opacified blood is above (CTPA: about 250-450 HU), a clot below (20-70 HU)
    defect_hu: tuple[float, float] = (-100.0, 150.0)  # what a defect inside the lumen may measure
    lumen_closing: int = 3  # pixels: the lumen is the contrast closed by a disk this wide (wall-adherent clots)
    # Other filling defects near a peak's point (docs/localisation.md, "Neighbouring defects"): those of at
    # least neighbour_min_pixels pixels within neighbour_reach cells of the point, and at least
    # neighbour_apart pixels from every candidate's point on that slice, are candidates scored
    # neighbour_score × the peak's, the nearest neighbour_max per peak. neighbour_reach 0: none.
    neighbour_reach: float = 2.5
    neighbour_max: int = 2
    neighbour_score: float = 0.9
    neighbour_min_pixels: int = 6
    neighbour_apart: float = 6.0


@dataclass(frozen=True)
class ActivationMaps:
    """One series' activation maps as probabilities, ``(N, h, w)`` over the region of each slice that
    the CNNs saw: ``region`` ``(row0, col0, row1, col1)`` in pixels of the series' decoded slices."""

    probabilities: np.ndarray
    region: tuple[int, int, int, int]


@dataclass(frozen=True)
class SliceGeometry:
    """What places a pixel of one slice in the patient: the DICOM image's size and its plane."""

    rows: int
    cols: int
    position: tuple[float, float, float] | None  # ImagePositionPatient
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (row direction, column direction)
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns), mm

    @classmethod
    def of(cls, header: Any) -> SliceGeometry:
        return cls(int(header.rows), int(header.cols), header.position, header.orientation, header.pixel_spacing)

    def patient(self, row: float, col: float) -> np.ndarray | None:
        """The patient coordinates (mm, LPS) of pixel (row, col), or None without the geometry."""
        if self.position is None or self.orientation is None or len(self.orientation) != 6:
            return None
        spacing = self.pixel_spacing or (1.0, 1.0)
        along_row, along_col = np.asarray(self.orientation[:3], float), np.asarray(self.orientation[3:], float)
        return np.asarray(self.position, float) + along_row * col * spacing[1] + along_col * row * spacing[0]

    def patient_x(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Patient x (mm; larger is the patient's left) of pixels; the column index without the geometry."""
        if self.position is None or self.orientation is None or len(self.orientation) != 6:
            return cols.astype(float)
        spacing = self.pixel_spacing or (1.0, 1.0)
        return self.position[0] + self.orientation[0] * cols * spacing[1] + self.orientation[3] * rows * spacing[0]

    def row_spacing(self) -> float:
        return float(self.pixel_spacing[0]) if self.pixel_spacing else 1.0


@dataclass
class Candidate:
    """One candidate embolus of a series. ``row``/``col`` and ``outline`` are in the DICOM image's own
    pixel grid of the key slice ``sop``; ``picture_*`` the same in fractions of the decoded slice
    (what the report's viewer draws on); slice numbers are positions in the series from 0."""

    series: str
    score: float
    side: str
    sop: str
    slice_index: int
    row: float
    col: float
    slice_first: int
    slice_last: int
    patient_mm: tuple[float, float, float] | None
    outline: list[tuple[float, float]]
    picture_index: int  # the key slice among the decoded slices of the study's report
    picture_point: tuple[float, float]  # (row, col) fractions of the decoded slice
    picture_outline: list[tuple[float, float]] = field(default_factory=list)
    candidate: int = 0  # 1-based within the study, strongest first (set by :func:`number_candidates`)

    def record(self) -> dict:
        """The report's JSON record (lists for tuples, as JSON reads back)."""
        return json.loads(json.dumps(asdict(self)))


def picture_to_image(
    rows: np.ndarray, cols: np.ndarray, picture_shape: tuple[int, int], image_shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates of a decoded slice (``picture_shape``) in the DICOM image (``image_shape``):
    the reader resizes with the aspect kept and centres on a square canvas
    (:func:`pedetect.dicom.pixels.resize_keep_aspect`); same shape: unchanged."""
    height, width = picture_shape
    image_rows, image_cols = image_shape
    if (height, width) == (image_rows, image_cols):
        return rows, cols
    scale = height / max(image_rows, image_cols)
    new_rows, new_cols = max(1, round(image_rows * scale)), max(1, round(image_cols * scale))
    top, left = (height - new_rows) // 2, (width - new_cols) // 2
    out_rows = (rows - top + 0.5) * (image_rows / new_rows) - 0.5
    out_cols = (cols - left + 0.5) * (image_cols / new_cols) - 0.5
    return out_rows, out_cols


def _peaks(scores: np.ndarray, settings: LocaliseSettings) -> list[tuple[int, int, int]]:
    """(slice, row, column) cells of the strongest local maxima of ``scores``, non-maxima suppressed."""
    local = scores == ndimage.maximum_filter(scores, size=3, mode="nearest")
    local &= scores >= settings.min_score
    found = np.argwhere(local)
    order = np.argsort(-scores[tuple(found.T)], kind="stable")
    kept: list[tuple[int, int, int]] = []
    for k, i, j in found[order].tolist():
        close = any(
            abs(k - a) <= settings.suppress_slices
            and abs(i - b) <= settings.suppress_cells
            and abs(j - c) <= settings.suppress_cells
            for a, b, c in kept
        )
        if not close:
            kept.append((k, i, j))
            if len(kept) == settings.max_candidates:
                break
    return kept


def _side(geometry: SliceGeometry, hu: np.ndarray, row: float, col: float, band_mm: float) -> str:
    """central, right or left for a point (pixels of the decoded slice ``hu``) from the slice's own lungs."""
    lungs = lung_mask(hu, LungBoxSettings(min_region=0.0))
    pieces, n = ndimage.label(lungs)
    height, width = hu.shape
    rows_all, cols_all = np.mgrid[0:height, 0:width]
    point_x = float(geometry.patient_x(np.array([row]), np.array([col]))[0])
    if n == 0:
        return "central"
    sizes = np.bincount(pieces.ravel(), minlength=n + 1)[1:]
    big = [p + 1 for p in np.argsort(-sizes)[:2] if sizes[p] >= 0.1 * sizes.max()]
    xs = geometry.patient_x(rows_all, cols_all)
    if len(big) < 2:  # one lung or none visible: the body's middle divides right from left
        body = body_mask(hu)
        middle = float(xs[body].mean()) if body.any() else float(xs.mean())
        return "right" if point_x < middle else "left"
    # Rows near the point (the medial edges curve around the heart and the great vessels).
    band = max(1.0, band_mm / geometry.row_spacing() * (height / max(geometry.rows, 1)))
    near = np.abs(rows_all - row) <= band
    means = [float(xs[pieces == p].mean()) for p in big]
    right, left = (big[0], big[1]) if means[0] < means[1] else (big[1], big[0])
    right_mask, left_mask = pieces == right, pieces == left
    right_edge = xs[right_mask & near].max() if (right_mask & near).any() else xs[right_mask].max()
    left_edge = xs[left_mask & near].min() if (left_mask & near).any() else xs[left_mask].min()
    if right_edge < point_x < left_edge:
        return "central"
    return "right" if point_x <= right_edge else "left"


def find_candidates(
    maps: ActivationMaps,
    slice_probabilities: np.ndarray,
    pictures: np.ndarray,
    geometries: Sequence[SliceGeometry],
    sops: Sequence[str],
    positions: Sequence[float],
    *,
    series: str,
    windows: Sequence[Sequence[float]],
    picture_offset: int = 0,
    settings: LocaliseSettings = LocaliseSettings(),
) -> list[Candidate]:
    """The candidates of one series. ``slice_probabilities``: the model's PE probability of each decoded
    slice (a candidate's score is its map probability times its key slice's); ``pictures``: its decoded
    slices ``(N, H, W, C)`` uint8 in position order, channel c windowed by ``windows[c]`` (level, width):
    their Hounsfield units place the defect and the lungs; ``geometries``, ``sops``: each decoded
    slice's; ``positions``: each decoded slice's place in the series (slices lost before it counted);
    ``picture_offset``: where the series' first slice sits among the study's report pictures."""
    probabilities = np.asarray(maps.probabilities, dtype=np.float32)
    if probabilities.ndim != 3 or len(probabilities) != len(pictures) or not len(pictures):
        return []
    slice_probabilities = np.asarray(slice_probabilities, dtype=np.float32)
    # Every position of a slice has a map value, and a negative slice's are far from 0: the slice's
    # probability says whether there is anything, the map where it is.
    scores = probabilities * slice_probabilities[:, None, None]
    # Each slice's level: the median of its map (the region and the point rise above it).
    floors = np.median(probabilities.reshape(len(probabilities), -1), axis=1)
    height, width = pictures.shape[1:3]
    r0, c0, r1, c1 = maps.region
    region_h, region_w = r1 - r0, c1 - c0
    n_slices, map_h, map_w = probabilities.shape
    cell = max(region_h / map_h, region_w / map_w)  # pixels of the decoded slice per map cell
    slice_hu: dict[int, np.ndarray] = {}

    def hu_of(k: int) -> np.ndarray:
        if k not in slice_hu:
            slice_hu[k] = estimate_hu(pictures[k : k + 1], windows)[0]
        return slice_hu[k]

    def candidate(k: int, score: float, row_pic: float, col_pic: float, outline_pic, first: int, last: int):
        """A candidate on key slice k at (row_pic, col_pic) of the decoded slice, in every frame."""
        geometry = geometries[k]
        rows, cols = picture_to_image(
            np.array([row_pic] + [p[0] for p in outline_pic]),
            np.array([col_pic] + [p[1] for p in outline_pic]),
            (height, width),
            (geometry.rows, geometry.cols),
        )
        point_mm = geometry.patient(float(rows[0]), float(cols[0]))
        return Candidate(
            series=series,
            score=round(float(score), 6),
            side=_side(geometry, hu_of(k), row_pic, col_pic, settings.band_mm),
            sop=sops[k],
            slice_index=int(positions[k]),
            row=round(float(rows[0]), 2),
            col=round(float(cols[0]), 2),
            slice_first=first,
            slice_last=last,
            patient_mm=None
            if point_mm is None
            else (round(float(point_mm[0]), 2), round(float(point_mm[1]), 2), round(float(point_mm[2]), 2)),
            outline=[(round(float(r), 2), round(float(c), 2)) for r, c in zip(rows[1:], cols[1:])],
            picture_index=picture_offset + k,
            picture_point=(round(row_pic / height, 5), round(col_pic / width, 5)),
            picture_outline=[(round(y / height, 5), round(x / width, 5)) for y, x in outline_pic],
        )

    candidates = []
    for k, i, j in _peaks(scores, settings):
        peak = float(probabilities[k, i, j])
        levels = floors + settings.region_fraction * np.maximum(peak - floors, 0.0)  # per slice
        pieces, _ = ndimage.label(probabilities >= levels[:, None, None], structure=np.ones((3, 3, 3), dtype=bool))
        region = pieces == pieces[k, i, j]
        floor = float(levels[k])
        in_slices = np.flatnonzero(region.any(axis=(1, 2)))
        # The key slice's map at the pixels the CNN saw (cell centres at their pixels' centres).
        fine = cv2.resize(probabilities[k], (region_w, region_h), interpolation=cv2.INTER_LINEAR)
        footprint = cv2.resize(region[k].astype(np.uint8), (region_w, region_h), interpolation=cv2.INTER_NEAREST)
        inside = (fine >= floor) & (footprint > 0)
        cy, cx = (i + 0.5) * region_h / map_h - 0.5, (j + 0.5) * region_w / map_w - 0.5
        labels, _ = ndimage.label(inside)
        own = labels[int(np.clip(round(cy), 0, region_h - 1)), int(np.clip(round(cx), 0, region_w - 1))]
        blob = labels == own if own else inside
        if blob.any():
            weights = (fine - floor).clip(min=0) * blob
            total = float(weights.sum())
            ys, xs = np.mgrid[0:region_h, 0:region_w]
            if total > 0:
                cy, cx = float((weights * ys).sum() / total), float((weights * xs).sum() / total)
        row_pic, col_pic = cy + r0, cx + c0
        outline_pic = _outline(blob) if blob.any() else []
        outline_pic = [(y + r0, x + c0) for y, x in outline_pic]
        if settings.defect_search > 0:
            radius = min(settings.defect_search * cell, settings.defect_search_max)
            defect = _filling_defect(hu_of(k), row_pic, col_pic, radius, settings)
            if defect is not None:
                (row_pic, col_pic), outline_pic = defect
        first, last = int(positions[in_slices[0]]), int(positions[in_slices[-1]])
        candidates.append((k, candidate(k, scores[k, i, j], row_pic, col_pic, outline_pic, first, last)))
    found = [c for _, c in candidates]
    if settings.neighbour_reach > 0:
        found += _neighbour_candidates(candidates, height, width, cell, hu_of, candidate, settings)
    return found


def _neighbour_candidates(peaks, height: int, width: int, cell: float, hu_of, candidate, settings: LocaliseSettings):
    """The filling defects near each peak's point on its key slice (``peaks``: (slice, candidate),
    strongest first) that no candidate's point is close to: a candidate each (step 5 of the module's
    list), scored ``neighbour_score`` × its peak's, with its peak's slice range."""
    taken: dict[int, list[tuple[float, float]]] = {}
    for k, c in peaks:
        taken.setdefault(k, []).append((c.picture_point[0] * height, c.picture_point[1] * width))
    reach = min(settings.neighbour_reach * cell, settings.defect_search_max)
    defects_of: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}  # per key slice, once
    found = []
    for k, c in peaks:
        row, col = c.picture_point[0] * height, c.picture_point[1] * width
        if k not in defects_of:
            pieces, n = ndimage.label(_defect_masks(hu_of(k), settings)[0])
            index = np.arange(1, n + 1)
            sizes = np.bincount(pieces.ravel(), minlength=n + 1)[1:]
            centres = np.asarray(ndimage.center_of_mass(np.ones_like(pieces), pieces, index)).reshape(-1, 2)
            defects_of[k] = (pieces, index, sizes, centres)
        pieces, index, sizes, centres = defects_of[k]
        if len(index) == 0:
            continue
        distances = np.hypot(centres[:, 0] - row, centres[:, 1] - col)
        added = 0
        for piece in index[np.argsort(distances, kind="stable")]:
            (y, x), distance = centres[piece - 1], distances[piece - 1]
            if distance > reach or added == settings.neighbour_max:
                break
            if sizes[piece - 1] < settings.neighbour_min_pixels:
                continue
            if any(np.hypot(y - a, x - b) < settings.neighbour_apart for a, b in taken[k]):
                continue
            taken[k].append((y, x))
            added += 1
            outline = _outline(pieces == piece)
            score = c.score * settings.neighbour_score
            found.append(candidate(k, score, float(y), float(x), outline, c.slice_first, c.slice_last))
    return found


def _disk(radius: int) -> np.ndarray:
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius


def _filling_defect(
    hu: np.ndarray, row: float, col: float, radius: float, settings: LocaliseSettings
) -> tuple[tuple[float, float], list[tuple[float, float]]] | None:
    """The filling defect nearest (``row``, ``col``) within ``radius`` pixels, on one slice's Hounsfield
    units: pixels of soft-tissue density (``defect_hu``) inside the lumen — the opacified blood (above
    ``contrast_hu``) closed by a disk of ``lumen_closing`` pixels, its holes filled — or, where no such
    defect is near (a small artery whose thin rim of contrast the blur breaks), within
    ``lumen_closing`` pixels of opacified blood. Returns its centroid and outline (pixels of ``hu``), or
    None when there is none (the map's point stands)."""
    height, width = hu.shape
    pad = settings.lumen_closing + 2
    top, left = max(int(np.floor(row - radius)) - pad, 0), max(int(np.floor(col - radius)) - pad, 0)
    bottom, right = min(int(np.ceil(row + radius)) + pad + 1, height), min(int(np.ceil(col + radius)) + pad + 1, width)
    window = hu[top:bottom, left:right]
    if window.size == 0:
        return None
    ys, xs = np.mgrid[top:bottom, left:right]
    for defect in _defect_masks(window, settings):
        member = _nearest_piece(defect, ys, xs, row, col, radius)
        if member is not None:
            outline = [(y + top, x + left) for y, x in _outline(member)]
            return (float(ys[member].mean()), float(xs[member].mean())), outline
    return None


def _defect_masks(hu: np.ndarray, settings: LocaliseSettings) -> tuple[np.ndarray, np.ndarray]:
    """Soft-tissue pixels (``defect_hu``) of ``hu`` inside the lumen (the opacified blood, above
    ``contrast_hu``, closed by a disk of ``lumen_closing`` pixels, its holes filled), and those within
    ``lumen_closing`` pixels of opacified blood."""
    disk = _disk(settings.lumen_closing)
    contrast = hu > settings.contrast_hu
    low, high = settings.defect_hu
    dense = ~contrast & (hu >= low) & (hu <= high)
    lumen = ndimage.binary_closing(contrast, structure=disk, border_value=0) | ndimage.binary_fill_holes(contrast)
    return dense & lumen, dense & ndimage.binary_dilation(contrast, structure=disk)


def _nearest_piece(mask: np.ndarray, ys: np.ndarray, xs: np.ndarray, row: float, col: float, radius: float):
    """The connected piece of ``mask`` (of at least 2 pixels) nearest (``row``, ``col``) and within
    ``radius`` of it, as a mask; None when there is none. One pass over the window whatever the
    number of pieces (a noisy window holds thousands)."""
    pieces, n = ndimage.label(mask)
    if n == 0:
        return None
    distance = np.hypot(ys - row, xs - col)
    index = np.arange(1, n + 1)
    nearest = np.asarray(ndimage.minimum(distance, pieces, index))
    sizes = np.bincount(pieces.ravel(), minlength=n + 1)[1:]
    eligible = (sizes >= 2) & (nearest <= radius)  # a single pixel is noise
    if not eligible.any():
        return None
    best = int(index[eligible][np.argmin(nearest[eligible])])
    return pieces == best


def _outline(mask: np.ndarray, max_points: int = 48) -> list[tuple[float, float]]:
    """The outer contour of the largest piece of ``mask`` as (row, col) pixel centres, simplified to
    at most ``max_points`` vertices."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return []
    contour = max(contours, key=cv2.contourArea)
    epsilon = 0.5
    while len(contour) > max_points:
        contour = cv2.approxPolyDP(contour, epsilon, True)
        epsilon *= 2
    return [(float(p[0][1]), float(p[0][0])) for p in contour]


def number_candidates(candidates: list[Candidate]) -> list[Candidate]:
    """A study's candidates strongest first, numbered from 1."""
    ordered = sorted(candidates, key=lambda c: (-c.score, c.series, c.slice_index, c.row, c.col))
    for n, candidate in enumerate(ordered, start=1):
        candidate.candidate = n
    return ordered


def candidate_rows(study: str, records: Sequence[dict]) -> list[dict]:
    """The ``predict --clots`` rows (:data:`CANDIDATE_COLUMNS`) of one study's candidates, given as
    their report records (:meth:`Candidate.record`)."""
    rows = []
    for c in records:
        x, y, z = c["patient_mm"] if c.get("patient_mm") is not None else (float("nan"),) * 3
        rows.append(
            {
                "StudyInstanceUID": study,
                "SeriesInstanceUID": c["series"],
                "candidate": c["candidate"],
                "score": c["score"],
                "side": c["side"],
                "SOPInstanceUID": c["sop"],
                "slice_index": c["slice_index"],
                "row": c["row"],
                "col": c["col"],
                "slice_first": c["slice_first"],
                "slice_last": c["slice_last"],
                "x_mm": x,
                "y_mm": y,
                "z_mm": z,
                "outline": json.dumps([list(p) for p in c["outline"]], separators=(",", ":")),
            }
        )
    return rows
