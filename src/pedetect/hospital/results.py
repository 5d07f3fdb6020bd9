"""A study's prediction as DICOM objects: a Comprehensive SR (TID 1500), a Secondary Capture of the
report picture, a Key Object Selection of the key slices and a Segmentation of the clot candidates
(docs/dicom_results.md).

Every object is a new series of the source study. Only the patient and study modules are copied
from the source (highdicom copies them from the first evidence instance); type 2 attributes the
source lacks are written empty, so a real study missing them still gets a result. Nothing of the
patient is ever logged: the functions here name studies by UID.

The objects' UIDs are derived from the study, the bundle and the predicted instances, so a result
written twice for the same study and model (a restart, a re-delivery) is the same instance, not a
second answer.

A key slice of an Enhanced (multi-frame) CT file is named ``<SOPInstanceUID>#<frame>`` in the
predictions (:func:`pedetect.dicom.frames.frame_key`); that name is no UID, so every reference here
is the instance's own SOPInstanceUID with ReferencedFrameNumber (:class:`KeyRef`).

The SR's content tree (docs/dicom_results.md): an Image Library (TID 1600) of every referenced slice;
one Measurement Group (TID 1410, Planar ROI) per clot candidate of the study, with its outline (or
point) on its key slice as the Image Region and again under the probability NUM, which is where
OHIF's SR reader (@cornerstonejs/adapters) looks for it; and the exam-level outputs (PE and the
challenge's nine labels: the model's probability and the decision after the label rules) as CODE
items of the Qualitative Evaluations container, the PE decision inferred from the key slices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from highdicom.sc import SCImage
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    CodedConcept,
    ComprehensiveSR,
    ContainerContentItem,
    CoordinatesForMeasurement,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    ImageContentItem,
    ImageRegion,
    LanguageOfContentItemAndDescendants,
    Measurement,
    NumContentItem,
    ObservationContext,
    ObserverContext,
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
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from pedetect import __version__
from pedetect.dicom.frames import frame_geometry, frame_key, split_frame_key
from pedetect.dicom.source import Source, read_bytes
from pedetect.hospital.codes import (
    ABSENT,
    AIR_PURPOSE,
    AREA,
    COMMENT,
    COMPUTED_TOMOGRAPHY,
    FINDING_SITES,
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
from pedetect.infer.report import StudyResult, safe_name
from pedetect.io import atomic_path, file_sha256
from pedetect.labels import EXAM_LABEL_TITLES, EXAM_LABELS
from pedetect.metric.rules import THRESHOLD
from pedetect.view.page import suspicious_slices

N_KEY_TOP = 3  # the most suspicious slices always referenced (as the report picture shows them)
SERIES_NUMBERS = {"sr": 9901, "sc": 9902, "ko": 9903, "seg": 9904}
NOT_DIAGNOSTIC = "NOT FOR DIAGNOSTIC USE"
SERIES_DESCRIPTIONS = {
    "sr": f"pedetect PE result ({NOT_DIAGNOSTIC})",
    "sc": f"pedetect PE picture ({NOT_DIAGNOSTIC})",
    "ko": f"pedetect PE key slices ({NOT_DIAGNOSTIC})",
    "seg": f"pedetect PE candidates ({NOT_DIAGNOSTIC})",
}
FILE_NAMES = {"sr": "sr.dcm", "sc": "sc.dcm", "ko": "ko.dcm", "seg": "seg.dcm"}
# cornerstone's tracking-identifier convention (@cornerstonejs/adapters, CORNERSTONE_3D_TAG): OHIF picks the
# tool that can show and edit a measurement group by this prefix; without it a freehand outline is drawn
# read-only and cannot be tracked. The text after the tool name is pedetect's own.
CS3D_TRACKING = "Cornerstone3DTools@^0.1.0"
CS3D_TOOLS = {"POLYLINE": "PlanarFreehandROI", "POINT": "Probe"}
# Type 2 attributes of the Patient and General Study modules: written empty when the source lacks them.
TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


class ResultError(Exception):
    """The DICOM results of a study could not be made (the message names the study and why)."""


@dataclass(frozen=True)
class Algorithm:
    """What made the result: pedetect's version and the identity of each bundle."""

    name: str = "pedetect"
    version: str = __version__
    bundles: tuple[str, ...] = ()  # "<folder name> <config> folds=<k,…> sha256:<bundle.json>"

    @property
    def identity(self) -> str:
        return hashlib.sha256("|".join(self.bundles).encode()).hexdigest()[:16]

    @property
    def device_uid(self) -> str:
        """The algorithm's Device UID (AIR): a new one with every other bundle (or pedetect version)."""
        return _uid("pedetect-device", self.identity)


def coded(value: str, scheme: str, meaning: str) -> CodedConcept:
    """A code of :mod:`pedetect.hospital.codes` as highdicom's concept: ``coded(*PRESENT)``."""
    return CodedConcept(value, scheme, meaning)


def algorithm_of(bundles: Sequence[Any]) -> Algorithm:
    """The algorithm identity of an ensemble's bundles (``pedetect.models.bundle.Bundle``)."""
    ids = []
    for bundle in bundles:
        manifest = Path(bundle.path) / "bundle.json"
        digest = file_sha256(manifest)[:16] if manifest.exists() else "unrecorded"
        ids.append(
            f"{Path(bundle.path).name} {bundle.config.name} folds={','.join(map(str, bundle.folds))} sha256:{digest}"
        )
    return Algorithm(bundles=tuple(ids))


@dataclass(frozen=True)
class KeyRef:
    """One key slice as DICOM references it: its instance's header and, for a frame of a multi-frame
    instance, the frame number (from 1; None for a single-frame instance)."""

    dataset: Any  # the instance's header (pydicom Dataset): SOPClassUID, SOPInstanceUID, …
    frame: int | None = None

    @property
    def name(self) -> str:
        """The slice's name in the predictions (``sop`` or ``sop#frame``)."""
        sop = str(self.dataset.SOPInstanceUID)
        return sop if self.frame is None else frame_key(sop, self.frame)


@dataclass(frozen=True)
class CandidateRef:
    """One clot candidate (a ``StudyResult.candidates`` record) with its key slice as DICOM references
    it and its tracking identity (the same in the SR's measurement group and the SEG's segment)."""

    record: dict
    ref: KeyRef
    tracking_uid: str
    pixel_spacing: tuple[float, float] | None = None  # the key slice's (between rows, between columns), mm

    @property
    def number(self) -> int:
        return int(self.record["candidate"])

    @property
    def tracking_id(self) -> str:
        return f"PE candidate {self.number}"

    @property
    def site(self) -> tuple[str, str, str]:
        return FINDING_SITES.get(str(self.record.get("side")), FINDING_SITES["central"])


@dataclass
class StudyDicom:
    """The files written for one study (None: not made, with the reason in ``notes``)."""

    study_uid: str
    sr: Path | None = None
    sc: Path | None = None
    ko: Path | None = None
    seg: Path | None = None
    key_sops: list[str] = field(default_factory=list)
    candidates: int = 0  # the candidates in the SR (and the SEG)
    notes: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        return [p for p in (self.sr, self.sc, self.ko, self.seg) if p is not None]


def key_slices(result: StudyResult) -> list[int]:
    """Indices (position order) of the key slices: the most suspicious (the model's highest slice
    of each run above the threshold, and at least the top three) and every slice whose written
    value is above the threshold."""
    model = np.asarray(result.model_slice_probabilities, dtype=float)
    top = list(np.argsort(-model, kind="stable")[:N_KEY_TOP]) if len(model) else []
    chosen = {int(i) for i in top} | set(suspicious_slices(model, THRESHOLD))
    chosen |= {i for i, p in enumerate(result.slice_probabilities) if p > THRESHOLD}
    return sorted(chosen)


def _uid(*parts: str) -> str:
    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def _header(source: Source):
    """A source instance's header (no pixels); ResultError naming the file when unreadable."""
    try:
        return pydicom.dcmread(io.BytesIO(read_bytes(source)), stop_before_pixels=True, force=True)
    except Exception as error:
        raise ResultError(f"{source}: cannot read the header ({type(error).__name__}: {error})") from None


# What a result may take from its source: the Patient, General Study, Patient Study and Clinical Trial
# Subject/Study modules (PS3.3 C.7.1.1, C.7.2.1, C.7.2.2, C.7.1.3, C.7.2.3), the references, the character set.
# Nothing else reaches highdicom: given the source's Manufacturer it would copy the General Equipment
# module (InstitutionName, StationName, …) into ContributingEquipmentSequence.
_PATIENT_STUDY = """
PatientName PatientID IssuerOfPatientID IssuerOfPatientIDQualifiersSequence TypeOfPatientID PatientBirthDate
PatientBirthTime PatientBirthDateInAlternativeCalendar PatientDeathDateInAlternativeCalendar PatientAlternativeCalendar
PatientSex ReferencedPatientPhotoSequence QualityControlSubject ReferencedPatientSequence OtherPatientIDsSequence
OtherPatientNames EthnicGroup EthnicGroupCodeSequence PatientComments PatientSpeciesDescription PatientSpeciesCodeSequence
PatientBreedDescription PatientBreedCodeSequence BreedRegistrationSequence StrainDescription StrainNomenclature
StrainCodeSequence StrainAdditionalInformation StrainStockSequence GeneticModificationsSequence ResponsiblePerson
ResponsiblePersonRole ResponsibleOrganization PatientIdentityRemoved DeidentificationMethod
DeidentificationMethodCodeSequence SourcePatientGroupIdentificationSequence GroupOfPatientsIdentificationSequence
StudyInstanceUID StudyDate StudyTime ReferringPhysicianName ReferringPhysicianIdentificationSequence
ConsultingPhysicianName ConsultingPhysicianIdentificationSequence StudyID AccessionNumber
IssuerOfAccessionNumberSequence StudyDescription PhysiciansOfRecord PhysiciansOfRecordIdentificationSequence
NameOfPhysiciansReadingStudy PhysiciansReadingStudyIdentificationSequence RequestingServiceCodeSequence
ReferencedStudySequence ProcedureCodeSequence ReasonForPerformedProcedureCodeSequence
AdmittingDiagnosesDescription AdmittingDiagnosesCodeSequence PatientAge PatientSize PatientWeight
PatientBodyMassIndex MeasuredAPDimension MeasuredLateralDimension PatientSizeCodeSequence MedicalAlerts Allergies
SmokingStatus PregnancyStatus LastMenstrualDate PatientState Occupation AdditionalPatientHistory AdmissionID
IssuerOfAdmissionIDSequence ServiceEpisodeID IssuerOfServiceEpisodeIDSequence ServiceEpisodeDescription
PatientSexNeutered ReasonForVisit ReasonForVisitCodeSequence
ClinicalTrialSponsorName ClinicalTrialProtocolID ClinicalTrialProtocolName ClinicalTrialSiteID ClinicalTrialSiteName
ClinicalTrialSubjectID ClinicalTrialSubjectReadingID ClinicalTrialProtocolEthicsCommitteeName
ClinicalTrialProtocolEthicsCommitteeApprovalNumber ClinicalTrialTimePointID ClinicalTrialTimePointDescription
ConsentForClinicalTrialUseSequence
"""
KEPT_FROM_SOURCE = tuple(_PATIENT_STUDY.split()) + (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "Rows",
    "Columns",  # an image: the KOS references it as IMAGE, not COMPOSITE
)


def with_type2(ds):
    """A new dataset with only the source's patient and study modules and its references
    (:data:`KEPT_FROM_SOURCE`), the type 2 patient/study attributes it lacks present and empty."""
    kept = Dataset()
    for keyword in KEPT_FROM_SOURCE:
        if keyword in ds:
            kept.add(ds.data_element(keyword))
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword not in kept or kept[keyword].value is None:
            setattr(kept, keyword, "")
    return kept


def _observer(algorithm: Algorithm):
    return ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=algorithm.device_uid,
            name=algorithm.name,
            manufacturer_name="pedetect",
            model_name=f"{algorithm.name} {algorithm.version}"[:64],
            serial_number=algorithm.identity,
        ),
    )


def _algorithm_id(algorithm: Algorithm):
    return AlgorithmIdentification(
        name=algorithm.name, version=algorithm.version, parameters=list(algorithm.bundles) or None
    )


def contributing_equipment(algorithm: Algorithm):
    """The Contributing Equipment item of the algorithm, as IHE AIR asks: purpose of reference,
    manufacturer, model name, software versions (pedetect's version and the bundles' identity) and
    serial number (the bundles' identity); the Device UID that changes with the bundles is the
    object's own (:func:`add_contributing_equipment`)."""
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = AIR_PURPOSE
    item = Dataset()
    item.Manufacturer = "pedetect"
    item.ManufacturerModelName = algorithm.name
    item.SoftwareVersions = [algorithm.version, algorithm.identity]
    item.DeviceSerialNumber = algorithm.identity
    item.ContributionDescription = ("PE detection: " + "; ".join(algorithm.bundles))[:1024]
    item.PurposeOfReferenceCodeSequence = [purpose]
    return item


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


def pixel_spacing_of(header, frame: int | None) -> tuple[float, float] | None:
    """PixelSpacing of a slice: the instance's, or for a frame its functional groups'."""
    try:
        if frame is None:
            spacing = header.get("PixelSpacing")
        else:
            spacing = frame_geometry(header, int(header.get("NumberOfFrames") or 1))[frame - 1]["pixel_spacing"]
        return (float(spacing[0]), float(spacing[1])) if spacing is not None and len(spacing) == 2 else None
    except Exception:  # a header without usable geometry: no area
        return None


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
        num.ContentSequence = [*num.get("ContentSequence", []), inferred]
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
    items = [
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
    group.ContentSequence = items
    library.ContentSequence = [group]
    return library


def _evaluation(concept, decision: bool, model_probability: float, relationship="CONTAINS"):
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
    item.ContentSequence = children
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
    items = [pe]
    for label in EXAM_LABELS:
        concept, modifiers = LABEL_CONCEPTS[label]
        item = _evaluation(
            coded(*concept), result.exam_probabilities[label] > THRESHOLD, result.model_exam_probabilities.get(label)
        )
        item.ContentSequence = [
            *(
                CodeContentItem(
                    name=coded(*name), value=coded(*value), relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD
                )
                for name, value in modifiers
            ),
            *item.ContentSequence,
        ]
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
    container.ContentSequence = items
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
    content = []
    content.extend(LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE))
    content.extend(ObservationContext(observer_device_context=_observer(algorithm)))
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
        measurements.ContentSequence = [_candidate_group(c, algorithm)[0] for c in candidates]
        content.append(measurements)
    content.append(_evaluations(result, key_refs, algorithm, comments))
    root.ContentSequence = content
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


def result_identity(kind: str, *, series_uid: str, sop_uid: str) -> dict[str, Any]:
    """What every result's highdicom constructor is given alike: its series (numbered by ``kind``: sr,
    sc, ko or seg), its SOP Instance UID, instance number 1 and pedetect as manufacturer."""
    return dict(
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBERS[kind],
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="pedetect",
    )


def finish_result(dataset, kind: str, algorithm: Algorithm) -> None:
    """What every result gets once highdicom made it: its series description and the algorithm's
    Contributing Equipment (:func:`add_contributing_equipment`)."""
    dataset.SeriesDescription = SERIES_DESCRIPTIONS[kind]
    add_contributing_equipment(dataset, algorithm)


def add_contributing_equipment(dataset, algorithm: Algorithm) -> None:
    """The algorithm's Contributing Equipment item, and its Device UID as the object's own (General
    Equipment): AIR asks for it in the item, where dicom3tools (2022) does not know it (a warning)."""
    dataset.DeviceUID = algorithm.device_uid
    dataset.ContributingEquipmentSequence = [
        *dataset.get("ContributingEquipmentSequence", []),
        contributing_equipment(algorithm),
    ]


def build_sc(reference, picture: np.ndarray, algorithm: Algorithm, *, series_uid: str, sop_uid: str):
    """The Secondary Capture (highdicom SCImage) of the report picture, RGB."""
    sc = SCImage.from_ref_dataset(
        ref_dataset=reference,
        pixel_array=np.ascontiguousarray(picture, dtype=np.uint8),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        **result_identity("sc", series_uid=series_uid, sop_uid=sop_uid),
        patient_orientation=("L", "P"),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    finish_result(sc, "sc", algorithm)
    # Laterality (type 2C) is for a paired body part: a chest has none, so it is absent (not empty), and the
    # body part says so (without it dciodvfy cannot tell that the condition is false).
    if "Laterality" in sc:
        del sc.Laterality
    sc.BodyPartExamined = "CHEST"
    sc.BurnedInAnnotation = "NO"  # the picture holds probabilities and slice numbers, nothing of the patient
    return sc


def build_ko(key_refs: Sequence[KeyRef], algorithm: Algorithm, *, series_uid: str, sop_uid: str):
    """The Key Object Selection ("Of Interest", DCM 113000) of the key slices: one IMAGE item per
    instance, in the order of its first key slice; a multi-frame instance's item lists its key frames
    in ReferencedFrameNumber (PS3.3 C.10.2.1: required when the reference is not to every frame)."""
    instances: dict[str, tuple[Any, list[int]]] = {}
    for ref in key_refs:
        _, frames = instances.setdefault(str(ref.dataset.SOPInstanceUID), (ref.dataset, []))
        if ref.frame is not None:
            frames.append(ref.frame)
    content = KeyObjectSelection(
        document_title=codes.DCM.OfInterest,
        referenced_objects=[ds for ds, _ in instances.values()],
        observer_device_context=_observer(algorithm),
        description=f"pedetect: most suspicious slices and slices above {THRESHOLD} ({NOT_DIAGNOSTIC})",
    )
    # highdicom's KeyObjectSelection references whole instances; the frames are added to its IMAGE items.
    for item in content[0].ContentSequence:
        if item.ValueType == "IMAGE":
            reference = item.ReferencedSOPSequence[0]
            frames = instances[str(reference.ReferencedSOPInstanceUID)][1]
            if frames:
                reference.ReferencedFrameNumber = frames if len(frames) > 1 else frames[0]
    ko = KeyObjectSelectionDocument(
        evidence=[ds for ds, _ in instances.values()],
        content=content,
        **result_identity("ko", series_uid=series_uid, sop_uid=sop_uid),
    )
    finish_result(ko, "ko", algorithm)
    return ko


def read_picture(path: Path) -> np.ndarray:
    """A PNG as (H, W, 3) uint8 RGB (even sizes are not needed: SC frames may be odd)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ResultError(f"{path}: cannot read the report picture")
    return image[..., ::-1].copy()


def write_study_results(
    result: StudyResult,
    sources: dict[str, Source],
    picture: np.ndarray | Path | None,
    algorithm: Algorithm,
    out_dir: Path,
    notes: Sequence[str] = (),
) -> StudyDicom:
    """Write ``out_dir/<study>/{sr,sc,ko,seg}.dcm`` for one predicted study.

    ``sources``: slice name or SOPInstanceUID -> the file it came from (a frame ``sop#n`` is looked up
    under its name, then its instance's UID; the key slices' and the candidates' headers are read for
    the references, once per instance; the first readable one gives the patient and study modules).
    ``picture``: the report picture, an RGB array (``Predictor.picture``) or its PNG (no SC without it). No candidate: no SEG. Raises :class:`ResultError`
    when no source header is readable (nothing to copy the patient from); parts that cannot be made
    are skipped with a note. ``notes`` (and every file the prediction could not use, from
    ``result.skipped_files``) become the SR's comments.
    """
    written = StudyDicom(result.study_uid)
    folder = Path(out_dir) / safe_name(result.study_uid)
    headers: dict[str, Any] = {}  # SOPInstanceUID -> the full header (None: unreadable), read once
    key_refs = [
        ref
        for ref in _refs([result.sop_uids[i] for i in key_slices(result)], sources, headers, written.notes)
        if ref is not None
    ]
    written.key_sops = [ref.name for ref in key_refs]
    seed = (result.study_uid, algorithm.identity, hashlib.sha256("|".join(result.sop_uids).encode()).hexdigest())
    found = _refs([str(c.get("sop", "")) for c in result.candidates], sources, headers, written.notes)
    candidates = []
    for record, ref in zip(result.candidates, found):
        if ref is None:
            written.notes.append(f"candidate {record.get('candidate')}: key slice {record.get('sop')} not referenced")
            continue
        tracking_uid = _uid(*seed, "candidate", str(record.get("candidate")))
        candidates.append(CandidateRef(record, ref, tracking_uid, pixel_spacing_of(ref.dataset, ref.frame)))
    reference = key_refs[0].dataset if key_refs else (candidates[0].ref.dataset if candidates else None)
    for source in sources.values() if reference is None else ():
        try:
            reference = _header(source)
            break
        except ResultError as error:
            written.notes.append(str(error))
    if reference is None:
        raise ResultError(f"study {result.study_uid}: no readable source instance to copy the patient and study from")
    reference = with_type2(reference)
    kept: dict[str, Any] = {}  # one reduced header per instance (the frames of one file share theirs)

    def reduced(ref: KeyRef) -> KeyRef:
        sop = str(ref.dataset.SOPInstanceUID)
        if sop not in kept:
            kept[sop] = with_type2(ref.dataset)
        return KeyRef(kept[sop], ref.frame)

    full_candidates = candidates
    key_refs = [reduced(ref) for ref in key_refs]
    candidates = [CandidateRef(c.record, reduced(c.ref), c.tracking_uid, c.pixel_spacing) for c in candidates]
    library = _library(result, key_refs + [c.ref for c in candidates])
    frames_of_reference = [str(headers[str(r.dataset.SOPInstanceUID)].get("FrameOfReferenceUID", "")) for r in library]
    evidence = list(kept.values()) or [reference]
    written.candidates = len(candidates)

    def uids(kind: str) -> dict[str, str]:
        return {"series_uid": _uid(*seed, kind, "series"), "sop_uid": _uid(*seed, kind, "instance")}

    comments = list(notes) + skipped_notes(result)
    sr = build_sr(
        result,
        evidence,
        key_refs,
        algorithm,
        comments=comments,
        candidates=candidates,
        library=library,
        frames_of_reference=[f for f in frames_of_reference if f],
        **uids("sr"),
    )
    written.sr = _save(sr, folder / FILE_NAMES["sr"], reference)
    if isinstance(picture, (str, Path)):  # the report's PNG
        picture = read_picture(Path(picture)) if Path(picture).exists() else None
    if picture is not None:
        written.sc = _save(
            build_sc(reference, picture, algorithm, **uids("sc")),
            folder / FILE_NAMES["sc"],
            reference,
        )
    else:
        written.notes.append("no report picture (no decoded slice): no secondary capture")
    if key_refs:
        written.ko = _save(build_ko(key_refs, algorithm, **uids("ko")), folder / FILE_NAMES["ko"], reference)
    else:
        written.notes.append("no key slice: no key object selection")
    if full_candidates:
        from pedetect.hospital.seg import SegError, build_seg  # here: seg imports this module's helpers

        try:
            seg = build_seg(full_candidates, algorithm, notes=written.notes, **uids("seg"))
            written.seg = _save(seg, folder / FILE_NAMES["seg"], reference)
        except SegError as error:
            written.notes.append(f"no segmentation: {error}")
    else:
        written.notes.append("no clot candidate: no segmentation")
    return written


def _library(result: StudyResult, refs: Sequence[KeyRef]) -> list[KeyRef]:
    """Every referenced slice once, in position order (slices the predictions do not name: last)."""
    order = {name: i for i, name in enumerate(result.sop_uids)}
    unique = {ref.name: ref for ref in refs}
    return sorted(unique.values(), key=lambda ref: (order.get(ref.name, len(order)), ref.name))


def _refs(names: Sequence[str], sources: dict[str, Source], headers: dict[str, Any], notes: list[str]):
    """Each slice name (``sop`` or ``sop#frame``) as a :class:`KeyRef` to its full header, or None when
    its source is unknown or unreadable or its frame number is not in the file (the file changed since
    the prediction: a note). ``headers`` caches each instance's header (None: unreadable)."""
    refs: list[KeyRef | None] = []
    for name in names:
        sop, frame = split_frame_key(name)
        source = sources.get(name, sources.get(sop))
        if source is None:
            refs.append(None)
            continue
        if sop not in headers:
            try:
                headers[sop] = _header(source)
            except ResultError as error:
                headers[sop] = None
                notes.append(str(error))
        ds = headers[sop]
        if ds is None:
            refs.append(None)
            continue
        frames = int(ds.get("NumberOfFrames") or 1)
        if frame is not None and not (1 <= frame <= frames and str(ds.get("SOPInstanceUID", "")) == sop):
            notes.append(
                f"{source}: key slice {name} not referenced (the file holds {frames} frame(s) of instance "
                f"{ds.get('SOPInstanceUID', '(none)')})"
            )
            refs.append(None)
            continue
        refs.append(KeyRef(ds, frame))
    return refs


def skipped_notes(result: StudyResult) -> list[str]:
    """One line per file the prediction could not use: its SOPInstanceUID (else its file name) and why."""
    return [
        f"instance {item.get('SOPInstanceUID') or Path(str(item.get('path', ''))).name} not used: {item.get('reason')}"
        for item in result.skipped_files
    ]


def result_from_report(path: Path) -> StudyResult:
    """A study's :class:`StudyResult` from its report JSON (``REPORT/<study>.json``)."""
    record = json.loads(Path(path).read_text())
    names = {f.name for f in dataclasses.fields(StudyResult)}
    return StudyResult(**{k: v for k, v in record.items() if k in names})


def _copy_patient_study(target, reference) -> None:
    """The patient and study attributes of ``reference`` that ``target`` lacks (highdicom's SC and KOS
    take only the main ones), so that every result carries the same modules as the SR."""
    for keyword in _PATIENT_STUDY.split():
        if keyword in reference and keyword not in target:
            target.add(reference.data_element(keyword))


def _save(dataset, path: Path, reference=None) -> Path:
    if reference is not None:
        _copy_patient_study(dataset, reference)
    with atomic_path(path) as tmp:
        dataset.save_as(tmp, enforce_file_format=True)
    return path


def describe(written: StudyDicom) -> str:
    """One line for a log: the study UID and what was written (no patient field)."""
    kinds = ", ".join(p.name for p in written.files) or "nothing"
    notes = f" ({'; '.join(written.notes)})" if written.notes else ""
    return (
        f"DICOM results of study {written.study_uid}: {kinds}, {len(written.key_sops)} key slice(s), "
        f"{written.candidates} clot candidate(s){notes}"
    )


def write_results(
    results: Sequence[StudyResult],
    sources: dict[str, dict[str, Source]],
    report_dir: Path,
    bundles: Sequence[Any],
    out_dir: Path,
) -> list[tuple[str, StudyDicom | None, str | None]]:
    """``pedetect predict --dicom-out``: the DICOM results of every predicted study, from the report's
    pictures (``report_dir/<study>.png``). Returns per study (UID, what was written, the error)."""
    algorithm = algorithm_of(bundles)
    done: list[tuple[str, StudyDicom | None, str | None]] = []
    for result in results:
        picture = Path(report_dir) / f"{safe_name(result.study_uid)}.png"
        try:
            written = write_study_results(result, sources.get(result.study_uid, {}), picture, algorithm, Path(out_dir))
            done.append((result.study_uid, written, None))
        except Exception as error:  # one study's results lost, the others still written
            done.append((result.study_uid, None, f"DICOM results not written: {type(error).__name__}: {error}"))
    return done
