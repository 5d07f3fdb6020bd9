"""What every DICOM result of a study shares (the SR, SC, KOS and SEG; docs/dicom_results.md): its
series and instance (numbers, descriptions, UIDs derived from the study, the bundle and the
instances), the algorithm that made it (IHE AIR: observer, contributing equipment, Device UID), what
it copies from its source (the patient and study modules only, type 2 attributes written empty when
the source lacks them), and the references to the source's slices (:class:`KeyRef`,
:class:`CandidateRef`).

A key slice of an Enhanced (multi-frame) CT file is named ``<SOPInstanceUID>#<frame>`` in the
predictions (:func:`pedetect.dicom.frames.frame_key`); that name is no UID, so every reference is the
instance's own SOPInstanceUID with ReferencedFrameNumber (:class:`KeyRef`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from highdicom.sr import CodedConcept, DeviceObserverIdentifyingAttributes, ObserverContext
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from pedetect import __version__
from pedetect.dicom.frames import frame_geometry, frame_key
from pedetect.hospital.codes import AIR_PURPOSE, FINDING_SITES
from pedetect.io import file_sha256

SERIES_NUMBERS = {"sr": 9901, "sc": 9902, "ko": 9903, "seg": 9904}


NOT_DIAGNOSTIC = "NOT FOR DIAGNOSTIC USE"


SERIES_DESCRIPTIONS = {
    "sr": f"pedetect PE result ({NOT_DIAGNOSTIC})",
    "sc": f"pedetect PE picture ({NOT_DIAGNOSTIC})",
    "ko": f"pedetect PE key slices ({NOT_DIAGNOSTIC})",
    "seg": f"pedetect PE candidates ({NOT_DIAGNOSTIC})",
}


FILE_NAMES = {"sr": "sr.dcm", "sc": "sc.dcm", "ko": "ko.dcm", "seg": "seg.dcm"}


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
        return result_uid("pedetect-device", self.identity)


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


def result_uid(*parts: str) -> str:
    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


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


PATIENT_STUDY = tuple(_PATIENT_STUDY.split())
KEPT_FROM_SOURCE = PATIENT_STUDY + (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "Rows",
    "Columns",  # an image: the KOS references it as IMAGE, not COMPOSITE
)


def observer_context(algorithm: Algorithm):
    """The algorithm as the observer of an SR or KOS (a device: its UID, name, model and serial)."""
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
