"""A study's prediction as DICOM objects: a Comprehensive SR (TID 1500), a Secondary Capture of the
report picture and a Key Object Selection of the key slices (docs/dicom_results.md).

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
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from pedetect import __version__
from pedetect.dicom.frames import frame_key, split_frame_key
from pedetect.dicom.source import Source, read_bytes
from pedetect.infer.report import StudyResult, safe_name
from pedetect.io import atomic_path, file_sha256
from pedetect.labels import EXAM_LABELS
from pedetect.metric.rules import THRESHOLD
from pedetect.view.page import suspicious_slices

PRIVATE_SCHEME = "99PEDETECT"  # the private coding scheme of the challenge's labels (docs/dicom_results.md)
PRIVATE_SCHEME_NAME = "pedetect challenge labels (RSNA-STR PE 2020)"
LABEL_CODES: dict[str, tuple[str, str]] = {  # exam label -> (code value, code meaning)
    "negative_exam_for_pe": ("NEG-EXAM", "Negative exam for pulmonary embolism"),
    "indeterminate": ("INDETERMINATE", "Indeterminate exam for pulmonary embolism"),
    "chronic_pe": ("CHRONIC-PE", "Chronic pulmonary embolism"),
    "acute_and_chronic_pe": ("ACUTE-CHRONIC-PE", "Acute and chronic pulmonary embolism"),
    "central_pe": ("CENTRAL-PE", "Central pulmonary embolism"),
    "leftsided_pe": ("LEFT-PE", "Left-sided pulmonary embolism"),
    "rightsided_pe": ("RIGHT-PE", "Right-sided pulmonary embolism"),
    "rv_lv_ratio_gte_1": ("RVLV-GTE-1", "RV/LV diameter ratio >= 1"),
    "rv_lv_ratio_lt_1": ("RVLV-LT-1", "RV/LV diameter ratio < 1"),
}
PE_TRACKING = "pulmonary_embolism"  # the tracking identifier of the study-level PE finding
N_KEY_TOP = 3  # the most suspicious slices always referenced (as the report picture shows them)
SERIES_NUMBERS = {"sr": 9901, "sc": 9902, "ko": 9903}
NOT_DIAGNOSTIC = "NOT FOR DIAGNOSTIC USE"
SERIES_DESCRIPTIONS = {
    "sr": f"pedetect PE result ({NOT_DIAGNOSTIC})",
    "sc": f"pedetect PE picture ({NOT_DIAGNOSTIC})",
    "ko": f"pedetect PE key slices ({NOT_DIAGNOSTIC})",
}
FILE_NAMES = {"sr": "sr.dcm", "sc": "sc.dcm", "ko": "ko.dcm"}
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
    frame: Optional[int] = None

    @property
    def name(self) -> str:
        """The slice's name in the predictions (``sop`` or ``sop#frame``)."""
        sop = str(self.dataset.SOPInstanceUID)
        return sop if self.frame is None else frame_key(sop, self.frame)


@dataclass
class StudyDicom:
    """The files written for one study (None: not made, with the reason in ``notes``)."""

    study_uid: str
    sr: Optional[Path] = None
    sc: Optional[Path] = None
    ko: Optional[Path] = None
    key_sops: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        return [p for p in (self.sr, self.sc, self.ko) if p is not None]


def key_slices(result: StudyResult) -> list[int]:
    """Indices (position order) of the key slices: the most suspicious (the model's highest slice
    of each run above the threshold, and at least the top three) and every slice whose written
    value is above the threshold."""
    model = np.asarray(result.model_slice_probabilities, dtype=float)
    top = list(np.argsort(-model, kind="stable")[:N_KEY_TOP]) if len(model) else []
    chosen = set(int(i) for i in top) | set(suspicious_slices(model, THRESHOLD))
    chosen |= {i for i, p in enumerate(result.slice_probabilities) if p > THRESHOLD}
    return sorted(chosen)


def _uid(*parts: str) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def _header(source: Source):
    """A source instance's header (no pixels); ResultError naming the file when unreadable."""
    import io

    import pydicom

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


def _with_type2(ds):
    """A new dataset with only the source's patient and study modules and its references
    (:data:`KEPT_FROM_SOURCE`), the type 2 patient/study attributes it lacks present and empty."""
    from pydicom.dataset import Dataset

    kept = Dataset()
    for keyword in KEPT_FROM_SOURCE:
        if keyword in ds:
            kept.add(ds.data_element(keyword))
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword not in kept or kept[keyword].value is None:
            setattr(kept, keyword, "")
    return kept


def _codes():
    from highdicom.sr import CodedConcept

    present = CodedConcept("52101004", "SCT", "Present")
    absent = CodedConcept("2667000", "SCT", "Absent")
    probability = CodedConcept("122157", "DCM", "Probability")
    unit = CodedConcept("1", "UCUM", "no units")
    pe = CodedConcept("59282003", "SCT", "Pulmonary embolism")
    labels = {label: CodedConcept(code, PRIVATE_SCHEME, meaning) for label, (code, meaning) in LABEL_CODES.items()}
    return present, absent, probability, unit, pe, labels


def _observer(algorithm: Algorithm):
    from highdicom.sr import DeviceObserverIdentifyingAttributes, ObserverContext
    from pydicom.sr.codedict import codes

    return ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=_uid("pedetect-device", algorithm.identity),
            name=algorithm.name,
            manufacturer_name="pedetect",
            model_name=f"{algorithm.name} {algorithm.version}"[:64],
            serial_number=algorithm.identity,
        ),
    )


def build_sr(
    result: StudyResult,
    evidence: list,
    key_refs: Sequence[KeyRef],
    algorithm: Algorithm,
    *,
    series_uid: str,
    sop_uid: str,
    comments: Sequence[str] = (),
):
    """The Comprehensive SR (TID 1500 Measurement Report) of one study; ``key_refs``: the PE finding's
    source images, one IMAGE item per key slice (a frame: its instance and ReferencedFrameNumber);
    ``comments``: TEXT items (DCM 121106 "Comment") in the report's Qualitative Evaluations container
    (what was not used and why)."""
    from highdicom.sr import (
        AlgorithmIdentification,
        CodedConcept,
        ComprehensiveSR,
        MeasurementReport,
        Measurement,
        MeasurementsAndQualitativeEvaluations,
        ObservationContext,
        QualitativeEvaluation,
        SourceImageForMeasurementGroup,
        TrackingIdentifier,
    )
    from pydicom.sr.codedict import codes

    present, absent, probability, unit, pe, label_codes = _codes()
    algorithm_id = AlgorithmIdentification(
        name=algorithm.name, version=algorithm.version, parameters=list(algorithm.bundles) or None
    )

    def group(tracking: str, finding, model_probability: float, decision: bool, sources=None):
        return MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(identifier=tracking, uid=_uid("tracking", sop_uid, tracking)),
            finding_type=finding,
            algorithm_id=algorithm_id,
            measurements=[Measurement(name=probability, value=float(model_probability), unit=unit)],
            qualitative_evaluations=[QualitativeEvaluation(name=finding, value=present if decision else absent)],
            source_images=sources,
        )

    sources = [
        SourceImageForMeasurementGroup(
            ref.dataset.SOPClassUID,
            ref.dataset.SOPInstanceUID,
            referenced_frame_numbers=None if ref.frame is None else [ref.frame],
        )
        for ref in key_refs
    ] or None
    groups = [group(PE_TRACKING, pe, result.pe_probability, result.pe_positive, sources)]
    for label in EXAM_LABELS:
        model = result.model_exam_probabilities.get(label, float("nan"))
        groups.append(group(label, label_codes[label], model, result.exam_probabilities[label] > THRESHOLD))
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=_observer(algorithm)),
        procedure_reported=CodedConcept("77477000", "SCT", "Computed tomography"),
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    content = report[0]
    if comments:
        content.ContentSequence.append(_comments(comments))
    sr = ComprehensiveSR(
        evidence=evidence,
        content=content,
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBERS["sr"],
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="pedetect",
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    sr.SeriesDescription = SERIES_DESCRIPTIONS["sr"]
    sr.CodingSchemeIdentificationSequence = [_private_scheme()]
    return sr


def _comments(comments: Sequence[str]):
    from highdicom.sr import CodedConcept, ContainerContentItem, RelationshipTypeValues, TextContentItem

    container = ContainerContentItem(
        name=CodedConcept("C0034375", "UMLS", "Qualitative Evaluations"),
        relationship_type=RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = [
        TextContentItem(
            name=CodedConcept("121106", "DCM", "Comment"),
            value=text[:1024],
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
        for text in comments
    ]
    return container


def sr_comments(sr) -> list[str]:
    """The comments of a pedetect SR (pydicom dataset): what was not used and why."""
    found = []
    for item in sr.ContentSequence:
        if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeValue == "C0034375":
            found += [str(child.TextValue) for child in item.ContentSequence if child.ValueType == "TEXT"]
    return found


def _private_scheme():
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = PRIVATE_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = "pedetect (docs/dicom_results.md)"
    return item


def build_sc(reference, picture: np.ndarray, *, series_uid: str, sop_uid: str):
    """The Secondary Capture (highdicom SCImage) of the report picture, RGB."""
    from highdicom.sc import SCImage

    sc = SCImage.from_ref_dataset(
        ref_dataset=reference,
        pixel_array=np.ascontiguousarray(picture, dtype=np.uint8),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBERS["sc"],
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="pedetect",
        patient_orientation=("L", "P"),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    sc.SeriesDescription = SERIES_DESCRIPTIONS["sc"]
    sc.Laterality = ""  # type 2C; a chest has none (dciodvfy asks for it present)
    sc.BurnedInAnnotation = "NO"  # the picture holds probabilities and slice numbers, nothing of the patient
    return sc


def build_ko(key_refs: Sequence[KeyRef], algorithm: Algorithm, *, series_uid: str, sop_uid: str):
    """The Key Object Selection ("Of Interest", DCM 113000) of the key slices: one IMAGE item per
    instance, in the order of its first key slice; a multi-frame instance's item lists its key frames
    in ReferencedFrameNumber (PS3.3 C.10.2.1: required when the reference is not to every frame)."""
    from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
    from pydicom.sr.codedict import codes

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
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBERS["ko"],
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="pedetect",
    )
    ko.SeriesDescription = SERIES_DESCRIPTIONS["ko"]
    return ko


def read_picture(path: Path) -> np.ndarray:
    """A PNG as (H, W, 3) uint8 RGB (even sizes are not needed: SC frames may be odd)."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ResultError(f"{path}: cannot read the report picture")
    return image[..., ::-1].copy()


def write_study_results(
    result: StudyResult,
    sources: dict[str, Source],
    picture: Optional[Path],
    algorithm: Algorithm,
    out_dir: Path,
    notes: Sequence[str] = (),
) -> StudyDicom:
    """Write ``out_dir/<study>/{sr,sc,ko}.dcm`` for one predicted study.

    ``sources``: slice name or SOPInstanceUID -> the file it came from (a frame ``sop#n`` is looked up
    under its name, then its instance's UID; the key slices' headers are read for the references,
    once per instance; the first readable one gives the patient and study modules). ``picture``: the report
    PNG (no SC without it). Raises :class:`ResultError` when no source header is readable (nothing
    to copy the patient from); parts that cannot be made are skipped with a note. ``notes`` (and
    every file the prediction could not use, from ``result.skipped_files``) become the SR's comments.
    """
    written = StudyDicom(result.study_uid)
    folder = Path(out_dir) / safe_name(result.study_uid)
    key_refs = _key_refs(result, sources, written.notes)
    written.key_sops = [ref.name for ref in key_refs]
    reference = key_refs[0].dataset if key_refs else None
    for source in sources.values() if reference is None else ():
        try:
            reference = _header(source)
            break
        except ResultError as error:
            written.notes.append(str(error))
    if reference is None:
        raise ResultError(f"study {result.study_uid}: no readable source instance to copy the patient and study from")
    reference = _with_type2(reference)
    kept: dict[str, Any] = {}  # one reduced header per instance (the frames of one file share theirs)
    for ref in key_refs:
        sop = str(ref.dataset.SOPInstanceUID)
        if sop not in kept:
            kept[sop] = _with_type2(ref.dataset)
    key_refs = [KeyRef(kept[str(ref.dataset.SOPInstanceUID)], ref.frame) for ref in key_refs]
    evidence = list(kept.values()) or [reference]
    seed = (result.study_uid, algorithm.identity, hashlib.sha256("|".join(result.sop_uids).encode()).hexdigest())

    def uids(kind: str) -> dict[str, str]:
        return {"series_uid": _uid(*seed, kind, "series"), "sop_uid": _uid(*seed, kind, "instance")}

    comments = list(notes) + skipped_notes(result)
    sr = build_sr(result, evidence, key_refs, algorithm, comments=comments, **uids("sr"))
    written.sr = _save(sr, folder / FILE_NAMES["sr"], reference)
    if picture is not None and Path(picture).exists():
        written.sc = _save(
            build_sc(reference, read_picture(Path(picture)), **uids("sc")), folder / FILE_NAMES["sc"], reference
        )
    else:
        written.notes.append("no report picture (no decoded slice): no secondary capture")
    if key_refs:
        written.ko = _save(build_ko(key_refs, algorithm, **uids("ko")), folder / FILE_NAMES["ko"], reference)
    else:
        written.notes.append("no key slice: no key object selection")
    return written


def _key_refs(result: StudyResult, sources: dict[str, Source], notes: list[str]) -> list[KeyRef]:
    """The key slices (:func:`key_slices`, position order) whose source header is readable; each
    instance's header read once. A frame number its file does not hold (the file changed since the
    prediction) or an unreadable header is a note, and that slice is not referenced."""
    headers: dict[str, Any] = {}
    refs = []
    for i in key_slices(result):
        name = result.sop_uids[i]
        sop, frame = split_frame_key(name)
        source = sources.get(name, sources.get(sop))
        if source is None:
            continue
        if sop not in headers:
            try:
                headers[sop] = _header(source)
            except ResultError as error:
                headers[sop] = None
                notes.append(str(error))
        ds = headers[sop]
        if ds is None:
            continue
        frames = int(ds.get("NumberOfFrames") or 1)
        if frame is not None and not (1 <= frame <= frames and str(ds.get("SOPInstanceUID", "")) == sop):
            notes.append(
                f"{source}: key slice {name} not referenced (the file holds {frames} frame(s) of instance "
                f"{ds.get('SOPInstanceUID', '(none)')})"
            )
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
    import dataclasses

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


def read_sr_values(path: str | Path) -> dict[str, Any]:
    """The values of a pedetect SR read back with highdicom: per tracking identifier the finding's
    code, the model probability and the decision (True: present); and the referenced key slices, by
    their names in the predictions (``sop#frame`` for a frame of a multi-frame instance)."""
    import highdicom as hd

    sr = hd.sr.srread(str(path))
    groups = sr.content.get_image_measurement_groups()
    values: dict[str, Any] = {"findings": {}, "key_sops": [], "algorithm": None, "comments": sr_comments(sr)}
    for group in groups:
        tracking = group.tracking_identifier
        (measurement,) = group.get_measurements()
        (evaluation,) = group.get_qualitative_evaluations()
        finding = group.finding_type
        values["findings"][tracking] = {
            "code": (finding.value, finding.scheme_designator),
            "probability": float(measurement.value),
            "present": evaluation.value.value == "52101004",
        }
        if tracking == PE_TRACKING:
            values["key_sops"] = [_slice_name(ref) for ref in group.source_images]
        if values["algorithm"] is None:
            texts = [
                (item.ConceptNameCodeSequence[0].CodeValue, item.TextValue)
                for item in group[0].ContentSequence
                if item.ValueType == "TEXT"
            ]
            values["algorithm"] = {
                "name": next((t for code, t in texts if code == "111001"), None),
                "version": next((t for code, t in texts if code == "111003"), None),
                "parameters": [t for code, t in texts if code == "111002"],
            }
    return values


def _slice_name(reference) -> str:
    """The slice name of an SR image reference (highdicom content item): ``sop`` or ``sop#frame``."""
    from pydicom.multival import MultiValue

    item = reference.ReferencedSOPSequence[0]
    frames = item.get("ReferencedFrameNumber")
    if frames is None or frames == "":
        return str(item.ReferencedSOPInstanceUID)
    return frame_key(str(item.ReferencedSOPInstanceUID), int(frames[0] if isinstance(frames, MultiValue) else frames))


def describe(written: StudyDicom) -> str:
    """One line for a log: the study UID and what was written (no patient field)."""
    kinds = ", ".join(p.name for p in written.files) or "nothing"
    notes = f" ({'; '.join(written.notes)})" if written.notes else ""
    return f"DICOM results of study {written.study_uid}: {kinds}, {len(written.key_sops)} key slice(s){notes}"


def write_results(
    results: Sequence[StudyResult],
    sources: dict[str, dict[str, Source]],
    report_dir: Path,
    bundles: Sequence[Any],
    out_dir: Path,
) -> list[tuple[str, Optional[StudyDicom], Optional[str]]]:
    """``pedetect predict --dicom-out``: the DICOM results of every predicted study, from the report's
    pictures (``report_dir/<study>.png``). Returns per study (UID, what was written, the error)."""
    algorithm = algorithm_of(bundles)
    done: list[tuple[str, Optional[StudyDicom], Optional[str]]] = []
    for result in results:
        picture = Path(report_dir) / f"{safe_name(result.study_uid)}.png"
        try:
            written = write_study_results(result, sources.get(result.study_uid, {}), picture, algorithm, Path(out_dir))
            done.append((result.study_uid, written, None))
        except Exception as error:  # one study's results lost, the others still written
            done.append((result.study_uid, None, f"DICOM results not written: {type(error).__name__}: {error}"))
    return done
