"""The clot candidates of a study as a DICOM Segmentation (highdicom, BINARY): one segment per
candidate, its outline filled on its key slice (docs/dicom_results.md, "The segmentation").

A segment's tracking identifier and UID are its SR measurement group's, so a viewer can tie the two
together. The source images given to highdicom hold the patient and study modules (as every result)
and the geometry a segmentation needs (frame of reference, plane position and orientation, pixel
spacing and matrix), nothing of the source's equipment or acquisition.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from pedetect.dicom.header import PIXEL_DESCRIPTION
from pedetect.hospital.identity import NOT_DIAGNOSTIC, coded, finish_result, result_identity, with_type2

GEOMETRY = (
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "Rows",
    "Columns",
    "NumberOfFrames",
    *PIXEL_DESCRIPTION,
)
# The functional groups of an Enhanced CT frame that place it (PS3.3 C.7.6.16.2): all a segmentation needs.
GEOMETRY_GROUPS = ("PixelMeasuresSequence", "PlaneOrientationSequence", "PlanePositionSequence")
CONTENT_LABEL = "PE_CANDIDATES"
POINT_RADIUS = 1  # a candidate without an outline: its point and the pixels around it (a 3 × 3 square)


class SegError(Exception):
    """No segmentation could be made (the message says why)."""


def geometry_header(ds) -> Any:
    """A source header reduced to the patient and study modules, the references and the geometry."""
    kept = with_type2(ds)
    for keyword in GEOMETRY:
        if keyword in ds:
            kept.add(ds.data_element(keyword))
    for sequence in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        if sequence in ds:
            items = []
            for item in ds[sequence].value:
                reduced = Dataset()
                for keyword in GEOMETRY_GROUPS:
                    if keyword in item:
                        reduced.add(item.data_element(keyword))
                items.append(reduced)
            setattr(kept, sequence, items)
    return kept


def candidate_mask(record: dict, rows: int, columns: int) -> np.ndarray:
    """The candidate on its key slice as a (rows, columns) mask: the outline filled (its vertices,
    0-based pixel-centre coordinates, rounded to pixels; the boundary pixels included), or without
    an outline of three points the point and its neighbours."""
    mask = np.zeros((rows, columns), dtype=np.uint8)
    outline = [(float(r), float(c)) for r, c in record.get("outline") or []]
    if len(outline) >= 3:
        points = np.array([[round(c), round(r)] for r, c in outline], dtype=np.int32)
        cv2.fillPoly(mask, [points], 1)
    row, col = int(round(float(record["row"]))), int(round(float(record["col"])))
    if not mask.any():
        mask[
            max(0, row - POINT_RADIUS) : min(rows, row + POINT_RADIUS + 1),
            max(0, col - POINT_RADIUS) : min(columns, col + POINT_RADIUS + 1),
        ] = 1
    return mask.astype(bool)


def build_seg(candidates: Sequence[Any], algorithm: Any, *, notes: list[str], series_uid: str, sop_uid: str):
    """The Segmentation of ``candidates`` (:class:`pedetect.hospital.results.CandidateRef` with the key
    slice's full header): the candidates of the strongest one's series (a segmentation has one source
    series; the others are a note), segment k = the k-th of them. Raises :class:`SegError`."""
    if not candidates:
        raise SegError("no clot candidate")
    series = str(candidates[0].ref.dataset.SeriesInstanceUID)
    chosen = [c for c in candidates if str(c.ref.dataset.SeriesInstanceUID) == series]
    for c in candidates:
        if c not in chosen:
            notes.append(f"candidate {c.number} not in the segmentation: another series than candidate 1's")
    instances: dict[str, Any] = {}  # SOPInstanceUID -> full header, in the order of the candidates' slices
    for c in sorted(chosen, key=lambda c: int(c.record.get("slice_index", 0))):
        instances.setdefault(str(c.ref.dataset.SOPInstanceUID), c.ref.dataset)
    first = next(iter(instances.values()))
    rows, columns = int(first.Rows), int(first.Columns)
    if any((int(ds.Rows), int(ds.Columns)) != (rows, columns) for ds in instances.values()):
        raise SegError("the candidates' key slices differ in size")
    multiframe = any(c.ref.frame is not None for c in chosen)
    if multiframe:
        if len(instances) > 1:
            raise SegError("candidates in several multi-frame instances")
        frames = int(first.get("NumberOfFrames") or 1)
        pixels = np.zeros((frames, rows, columns, len(chosen)), dtype=bool)
        index: dict[str, int | None] = {str(first.SOPInstanceUID): None}
    else:
        pixels = np.zeros((len(instances), rows, columns, len(chosen)), dtype=bool)
        index = {sop: i for i, sop in enumerate(instances)}
    descriptions = []
    family = codes.cid7162.ArtificialIntelligence
    parameters = {f"bundle {k + 1}": text for k, text in enumerate(algorithm.bundles)} or None
    for k, c in enumerate(chosen):
        plane = (c.ref.frame - 1) if multiframe else index[str(c.ref.dataset.SOPInstanceUID)]
        pixels[plane, :, :, k] = candidate_mask(c.record, rows, columns)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=k + 1,
                segment_label=c.tracking_id,
                segmented_property_category=codes.cid7150.MorphologicallyAbnormalStructure,
                segmented_property_type=codes.cid7151.Embolus,
                algorithm_type="AUTOMATIC",
                algorithm_identification=hd.AlgorithmIdentificationSequence(
                    name=algorithm.name, family=family, version=algorithm.version, parameters=parameters
                ),
                tracking_uid=c.tracking_uid,
                tracking_id=c.tracking_id,
                anatomic_regions=[coded(*c.site)],
            )
        )
    seg = hd.seg.Segmentation(
        source_images=[geometry_header(ds) for ds in instances.values()],
        pixel_array=pixels,
        segmentation_type="BINARY",
        segment_descriptions=descriptions,
        **result_identity("seg", series_uid=series_uid, sop_uid=sop_uid),
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        device_serial_number=algorithm.identity,
        content_label=CONTENT_LABEL,
        content_description=f"pedetect PE candidates ({NOT_DIAGNOSTIC})"[:64],
    )
    finish_result(seg, "seg", algorithm)
    return seg
