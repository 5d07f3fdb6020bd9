"""The Comprehensive SR (TID 1500 Measurement Report) of one study (docs/dicom_results.md).

Its content tree: an Image Library (TID 1600) of every referenced slice; one Measurement Group (TID
1410, Planar ROI) per clot candidate of the study, with its outline (or point) on its key slice as the
Image Region and again under the probability NUM, which is where OHIF's SR reader
(@cornerstonejs/adapters) looks for it; and the exam-level outputs (PE and the challenge's nine
labels: the model's probability and the decision after the label rules) as CODE items of the
Qualitative Evaluations container, the PE decision inferred from the key slices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    ComprehensiveSR,
    ContainerContentItem,
    ContentItem,
    CoordinatesForMeasurement,
    FindingSite,
    ImageContentItem,
    ImageRegion,
    LanguageOfContentItemAndDescendants,
    Measurement,
    NumContentItem,
    ObservationContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    RelationshipTypeValues,
    SourceImageForMeasurement,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
    UIDRefContentItem,
)
from highdicom.sr.templates import DEFAULT_LANGUAGE
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes

from pedetect.hospital.codes import (
    ABSENT,
    AREA,
    COMMENT,
    COMPUTED_TOMOGRAPHY,
    LABEL_CONCEPTS,
    NO_MEASUREMENTS_TITLE,
    NO_UNITS,
    PRESENT,
    PROBABILITY,
    PULMONARY_EMBOLISM,
    QUALITATIVE_EVALUATIONS,
    SQUARE_MM,
    SUMMARY,
)
from pedetect.hospital.identity import (
    Algorithm,
    CandidateRef,
    KeyRef,
    coded,
    finish_result,
    observer_context,
    result_identity,
)
from pedetect.infer.report import StudyResult
from pedetect.labels import EXAM_LABEL_TITLES, EXAM_LABELS
from pedetect.metric.rules import THRESHOLD

# cornerstone's tracking-identifier convention (@cornerstonejs/adapters, CORNERSTONE_3D_TAG): OHIF picks the
# tool that can show and edit a measurement group by this prefix; without it a freehand outline is drawn
# read-only and cannot be tracked. The text after the tool name is pedetect's own.
CS3D_TRACKING = "Cornerstone3DTools@^0.1.0"


CS3D_TOOLS = {"POLYLINE": "PlanarFreehandROI", "POINT": "Probe"}


def _algorithm_id(algorithm: Algorithm):
    return AlgorithmIdentification(
        name=algorithm.name, version=algorithm.version, parameters=list(algorithm.bundles) or None
    )


def candidate_scoord(record: dict, rows: int, columns: int) -> tuple[str, np.ndarray]:
    """The candidate's Image Region as SCOORD GraphicType and GraphicData ((column, row) pairs): its
    outline, closed (the first point again at the end), when it has at least three points, else its
    point. The candidate's coordinates are 0-based indices of pixel centres (row, col); DICOM's image
    coordinates put the top left corner of the top left pixel at 0,0 and its centre at 0.5,0.5 (PS3.3
    C.18.6.1.2), so each coordinate is the index + 0.5, kept within the image."""
    outline = [(float(r), float(c)) for r, c in record.get("outline") or []]
    if len(outline) >= 3:
        points, graphic_type = outline + [outline[0]], "POLYLINE"
    else:
        points, graphic_type = [(float(record["row"]), float(record["col"]))], "POINT"
    data = np.array([[c + 0.5, r + 0.5] for r, c in points], dtype=np.float64)
    data[:, 0] = data[:, 0].clip(0.0, float(columns))
    data[:, 1] = data[:, 1].clip(0.0, float(rows))
    return graphic_type, data


def outline_area(record: dict, pixel_spacing: tuple[float, float] | None) -> float | None:
    """The area (mm²) inside the candidate's outline (the polygon through its vertices), or None without
    an outline or a pixel spacing."""
    outline = np.asarray(record.get("outline") or [], dtype=float)
    if len(outline) < 3 or not pixel_spacing:
        return None
    rows, cols = outline[:, 0], outline[:, 1]
    pixels = 0.5 * abs(float(np.dot(cols, np.roll(rows, -1)) - np.dot(rows, np.roll(cols, -1))))
    return pixels * float(pixel_spacing[0]) * float(pixel_spacing[1])


def candidate_comment(candidate: CandidateRef) -> str:
    """What a reader sees as the candidate's label (OHIF shows this comment on the annotation)."""
    record = candidate.record
    return (
        f"{candidate.tracking_id}: {candidate.site[2].lower()}, p {float(record['score']):.2f}, "
        f"slices {int(record['slice_first'])}-{int(record['slice_last'])} of the series "
        f"(key slice {int(record['slice_index'])})"
    )


def _candidate_group(candidate: CandidateRef, algorithm: Algorithm):
    """TID 1410 Planar ROI Measurements of one candidate: tracking identifier and UID, Finding (PE),
    algorithm, Finding Site (the artery), the Image Region on the key slice, the outline's area and the
    probability (NUM), each INFERRED FROM the same region, and a Comment with the slice range.

    The area comes first: OHIF's freehand tool takes the group's first NUM as its area (and shows it
    before it has computed its own), and the first NUM's SCOORD as its contour."""
    ref = candidate.ref
    frames = None if ref.frame is None else [ref.frame]
    graphic_type, data = candidate_scoord(candidate.record, int(ref.dataset.Rows), int(ref.dataset.Columns))

    def source():
        return SourceImageForRegion(
            ref.dataset.SOPClassUID, ref.dataset.SOPInstanceUID, referenced_frame_numbers=frames
        )

    tool = CS3D_TOOLS[graphic_type]
    measurements = []
    area = outline_area(candidate.record, candidate.pixel_spacing) if graphic_type == "POLYLINE" else None
    if area is not None:
        measurements.append(Measurement(name=coded(*AREA), value=round(area, 3), unit=coded(*SQUARE_MM)))
    measurements.append(
        Measurement(name=coded(*PROBABILITY), value=float(candidate.record["score"]), unit=coded(*NO_UNITS))
    )
    group = PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            identifier=f"{CS3D_TRACKING}:{tool}:{candidate.tracking_id}", uid=candidate.tracking_uid
        ),
        referenced_region=ImageRegion(graphic_type=graphic_type, graphic_data=data, source_image=source()),
        finding_type=coded(*PULMONARY_EMBOLISM),
        algorithm_id=_algorithm_id(algorithm),
        finding_sites=[FindingSite(anatomic_location=coded(*candidate.site))],
        measurements=measurements,
    )
    item = group[0]
    for num in (child for child in item.ContentSequence if child.ValueType == "NUM"):
        inferred = CoordinatesForMeasurement(graphic_type=graphic_type, graphic_data=data, source_image=source())
        num.ContentSequence = DicomSequence([*num.get("ContentSequence", []), inferred])
    item.ContentSequence.append(
        TextContentItem(
            name=coded(*COMMENT),
            value=candidate_comment(candidate),
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
    )
    return group


def _image_library(refs: Sequence[KeyRef], frames_of_reference: Sequence[str]):
    """TID 1600 Image Library: one group (modality CT and, when the slices share one, the frame of
    reference) listing every slice the report references (TID 1601 entries, a frame with its number)."""
    library = ContainerContentItem(
        name=codes.DCM.ImageLibrary, relationship_type=RelationshipTypeValues.CONTAINS, is_content_continuous=False
    )
    group = ContainerContentItem(
        name=codes.DCM.ImageLibraryGroup, relationship_type=RelationshipTypeValues.CONTAINS, is_content_continuous=False
    )
    items: list[ContentItem] = [
        CodeContentItem(
            name=codes.DCM.Modality,
            value=coded("CT", "DCM", "Computed Tomography"),
            relationship_type=RelationshipTypeValues.HAS_ACQ_CONTEXT,
        )
    ]
    if len(set(frames_of_reference)) == 1:
        items.append(
            UIDRefContentItem(
                name=codes.DCM.FrameOfReferenceUID,
                value=frames_of_reference[0],
                relationship_type=RelationshipTypeValues.HAS_ACQ_CONTEXT,
            )
        )
    for ref in refs:
        items.append(
            ImageContentItem(
                name=coded("260753009", "SCT", "Source"),
                referenced_sop_class_uid=ref.dataset.SOPClassUID,
                referenced_sop_instance_uid=ref.dataset.SOPInstanceUID,
                referenced_frame_numbers=ref.frame,
                relationship_type=RelationshipTypeValues.CONTAINS,
            )
        )
    group.ContentSequence = DicomSequence(items)
    library.ContentSequence = DicomSequence([group])
    return library


def _evaluation(concept, decision: bool, model_probability: float | None, relationship="CONTAINS"):
    """A CODE item (the decision after the label rules: Present or Absent) INFERRED FROM the model's
    probability (NUM; left out when the model gave none)."""
    item = CodeContentItem(
        name=concept, value=coded(*(PRESENT if decision else ABSENT)), relationship_type=relationship
    )
    children = []
    if model_probability is not None and math.isfinite(float(model_probability)):
        children.append(
            NumContentItem(
                name=coded(*PROBABILITY),
                value=float(model_probability),
                unit=coded(*NO_UNITS),
                relationship_type=RelationshipTypeValues.INFERRED_FROM,
            )
        )
    item.ContentSequence = DicomSequence(children)
    return item


def labels_summary(result: StudyResult) -> str:
    """The nine exam labels in words: each decision after the label rules, with the model's probability."""
    parts = []
    for label in EXAM_LABELS:
        decision = "present" if result.exam_probabilities[label] > THRESHOLD else "absent"
        model = result.model_exam_probabilities.get(label)
        known = model is not None and math.isfinite(float(model))
        parts.append(f"{EXAM_LABEL_TITLES[label]}: {decision}" + (f" (model {model:.2f})" if known else ""))
    return "Exam labels after the label rules: " + "; ".join(parts)


def _evaluations(result: StudyResult, key_refs: Sequence[KeyRef], algorithm: Algorithm, comments: Sequence[str]):
    """TID 1500's Qualitative Evaluations: PE (the model's highest slice probability; present when a
    written slice value is above the threshold), INFERRED FROM the key slices and made by the algorithm
    (TID 4019); each of the nine exam labels (private codes, model probability, written decision); the
    comments (what was not used and why)."""
    container = ContainerContentItem(
        name=coded(*QUALITATIVE_EVALUATIONS),
        relationship_type=RelationshipTypeValues.CONTAINS,
        is_content_continuous=False,  # separate items (a reader, OHIF's text view, shows each with its name)
    )
    pe = _evaluation(coded(*PULMONARY_EMBOLISM), result.pe_positive, result.pe_probability)
    pe.ContentSequence.extend(_algorithm_id(algorithm))
    pe.ContentSequence.extend(
        SourceImageForMeasurement(
            ref.dataset.SOPClassUID,
            ref.dataset.SOPInstanceUID,
            referenced_frame_numbers=None if ref.frame is None else [ref.frame],
        )
        for ref in key_refs
    )
    items: list[ContentItem] = [pe]
    for label in EXAM_LABELS:
        concept, modifiers = LABEL_CONCEPTS[label]
        item = _evaluation(
            coded(*concept), result.exam_probabilities[label] > THRESHOLD, result.model_exam_probabilities.get(label)
        )
        item.ContentSequence = DicomSequence(
            [
                *(
                    CodeContentItem(
                        name=coded(*name), value=coded(*value), relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD
                    )
                    for name, value in modifiers
                ),
                *item.ContentSequence,
            ]
        )
        items.append(item)
    # Viewers that show an SR as text (OHIF) list each item by its concept name alone, without its
    # modifiers: the summary names every label as the challenge does.
    items.append(
        TextContentItem(
            name=coded(*SUMMARY), value=labels_summary(result), relationship_type=RelationshipTypeValues.CONTAINS
        )
    )
    items += [
        TextContentItem(name=coded(*COMMENT), value=text[:1024], relationship_type=RelationshipTypeValues.CONTAINS)
        for text in comments
    ]
    container.ContentSequence = DicomSequence(items)
    return container


def build_sr(
    result: StudyResult,
    evidence: list,
    key_refs: Sequence[KeyRef],
    algorithm: Algorithm,
    *,
    series_uid: str,
    sop_uid: str,
    comments: Sequence[str] = (),
    candidates: Sequence[CandidateRef] = (),
    library: Sequence[KeyRef] = (),
    frames_of_reference: Sequence[str] = (),
):
    """The Comprehensive SR (TID 1500 Measurement Report) of one study (docs/dicom_results.md):
    ``key_refs``: the key slices (the PE evaluation is INFERRED FROM them; a frame: its instance and
    ReferencedFrameNumber); ``candidates``: one TID 1410 measurement group each (none: no Imaging
    Measurements container); ``library``: every referenced slice, for the Image Library; ``comments``:
    TEXT items (DCM 121106 "Comment") in the Qualitative Evaluations (what was not used and why)."""
    # A report without measurement groups is titled as the CT chest report it is (CID 7000, not CID 7021):
    # OHIF 3.13.2 opens an "Imaging Measurement Report" in its measurement viewport, which reads the first
    # measurement unguarded (a TypeError, its error page), and shows any other SR as text.
    title = codes.DCM.ImagingMeasurementReport if candidates else coded(*NO_MEASUREMENTS_TITLE)
    root = ContainerContentItem(name=title, template_id="1500", is_content_continuous=False)
    content: list[Dataset] = []  # highdicom's templates are sequences of pydicom Datasets
    content.extend(LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE))
    content.extend(ObservationContext(observer_device_context=observer_context(algorithm)))
    content.append(
        CodeContentItem(
            name=codes.DCM.ProcedureReported,
            value=coded(*COMPUTED_TOMOGRAPHY),
            relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD,
        )
    )
    content.append(_image_library(library or key_refs, frames_of_reference))
    if candidates:
        measurements = ContainerContentItem(
            name=codes.DCM.ImagingMeasurements,
            relationship_type=RelationshipTypeValues.CONTAINS,
            is_content_continuous=False,
        )
        measurements.ContentSequence = DicomSequence([_candidate_group(c, algorithm)[0] for c in candidates])
        content.append(measurements)
    content.append(_evaluations(result, key_refs, algorithm, comments))
    root.ContentSequence = DicomSequence(content)
    sr = ComprehensiveSR(
        evidence=evidence,
        content=root,
        **result_identity("sr", series_uid=series_uid, sop_uid=sop_uid),
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    finish_result(sr, "sr", algorithm)
    return sr
