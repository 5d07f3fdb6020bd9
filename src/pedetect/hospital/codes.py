"""The coded concepts of pedetect's DICOM results, written by :mod:`pedetect.hospital.results` and read
back by :mod:`pedetect.hospital.sr_read`: every code and where it comes from is in docs/dicom_results.md.
Each is a (value, scheme, meaning) tuple; :func:`pedetect.hospital.identity.coded` makes it highdicom's."""

from __future__ import annotations

PRESENT = ("52101004", "SCT", "Present")
ABSENT = ("2667000", "SCT", "Absent")
PROBABILITY = ("122157", "DCM", "Probability")
NO_UNITS = ("1", "UCUM", "no units")
PULMONARY_EMBOLISM = ("59282003", "SCT", "Pulmonary embolism")
QUALITATIVE_EVALUATIONS = ("C0034375", "UMLS", "Qualitative Evaluations")
COMMENT = ("121106", "DCM", "Comment")
SUMMARY = ("121111", "DCM", "Summary")
COMPUTED_TOMOGRAPHY = ("77477000", "SCT", "Computed tomography")
AREA = ("42798000", "SCT", "Area")
NO_MEASUREMENTS_TITLE = ("24627-2", "LN", "CT Chest Report")  # CID 7000; the title of an SR without candidates
SQUARE_MM = ("mm2", "UCUM", "square millimeter")


# The nine exam labels in standard codes only (SNOMED CT and DCM concepts of PS3.16; docs/dicom_results.md):
# each is a CODE item named by its concept, qualified by HAS CONCEPT MOD items (name, value), whose value is
# the decision after the label rules (Present / Absent). The (concept, modifiers) pair names the label.
_FINDING = ("121071", "DCM", "Finding")
_FINDING_SITE = ("363698007", "SCT", "Finding Site")
_PULMONARY_ARTERY = ("81040000", "SCT", "Pulmonary artery")
_RIGHT_VENTRICLE = ("53085002", "SCT", "Right ventricle")
LabelConcept = tuple[tuple[str, str, str], tuple[tuple[tuple[str, str, str], tuple[str, str, str]], ...]]
LABEL_CONCEPTS: dict[str, LabelConcept] = {  # exam label -> (concept name, ((modifier name, modifier value), ...))
    "negative_exam_for_pe": (("260385009", "SCT", "Negative"), ((_FINDING, PULMONARY_EMBOLISM),)),
    "indeterminate": (("280416009", "SCT", "Indeterminate result"), ((_FINDING, PULMONARY_EMBOLISM),)),
    "chronic_pe": (("90734009", "SCT", "Chronic"), ((_FINDING, PULMONARY_EMBOLISM),)),
    "acute_and_chronic_pe": (
        ("90734009", "SCT", "Chronic"),
        ((_FINDING, PULMONARY_EMBOLISM), (("385315009", "SCT", "Acute onset"), PRESENT)),
    ),
    "central_pe": (
        PULMONARY_EMBOLISM,
        (
            (_FINDING_SITE, _PULMONARY_ARTERY),
            (("106233006", "SCT", "Topographical modifier"), ("26216008", "SCT", "Central")),
        ),
    ),
    "leftsided_pe": (
        PULMONARY_EMBOLISM,
        ((_FINDING_SITE, _PULMONARY_ARTERY), (("272741003", "SCT", "Laterality"), ("7771000", "SCT", "Left"))),
    ),
    "rightsided_pe": (
        PULMONARY_EMBOLISM,
        ((_FINDING_SITE, _PULMONARY_ARTERY), (("272741003", "SCT", "Laterality"), ("24028007", "SCT", "Right"))),
    ),
    # The challenge's RV/LV diameter ratio >= 1 is CT's definition of an enlarged right ventricle.
    "rv_lv_ratio_gte_1": (("260376009", "SCT", "Enlarged"), ((_FINDING_SITE, _RIGHT_VENTRICLE),)),
    "rv_lv_ratio_lt_1": (("125112009", "SCT", "Within normal limits"), ((_FINDING_SITE, _RIGHT_VENTRICLE),)),
}


def label_key(concept: tuple[str, ...], modifiers) -> tuple:
    """What names a label in an SR: the (value, scheme) of its concept and of each modifier's name and value."""
    return (tuple(concept[:2]), tuple(sorted((tuple(name[:2]), tuple(value[:2])) for name, value in modifiers)))


PE_TRACKING = "pulmonary_embolism"  # the key of the study-level PE finding in read_sr_values' findings

# Where each candidate is (localise's side, from the patient's own lungs) as the SNOMED CT finding site.
# "central" is between the lungs' medial edges: the pulmonary trunk and the start of both main arteries.
FINDING_SITES: dict[str, tuple[str, str, str]] = {
    "central": ("45341000", "SCT", "Pulmonary trunk"),
    "right": ("78480002", "SCT", "Right pulmonary artery"),
    "left": ("50408007", "SCT", "Left pulmonary artery"),
}
# IHE AI Results (AIR) Rev 1.1, 6.5.3.1: the Contributing Equipment item of the algorithm.
AIR_PURPOSE = ("Newcode1", "99IHE", "Processing Algorithm")
