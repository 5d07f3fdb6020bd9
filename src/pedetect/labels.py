"""The RSNA-STR PE label schema, in one place.

Everything that names a label, weighs a label or builds a submission id takes it from here.
Weights are the challenge's published values (the RSNA-STR PE Detection challenge's evaluation page).
"""

from __future__ import annotations

STUDY = "StudyInstanceUID"
SERIES = "SeriesInstanceUID"
SOP = "SOPInstanceUID"
UID_COLUMNS: tuple[str, ...] = (STUDY, SERIES, SOP)

# The one image-level label: is an embolus visible on this slice.
IMAGE_LABEL = "pe_present_on_image"
# Weight of one slice of exam j is IMAGE_WEIGHT * q_j, q_j = fraction of positive slices in exam j.
IMAGE_WEIGHT = 0.07361963

# The nine scored exam-level labels with their weights, in the order of the sample submission.
EXAM_WEIGHTS: dict[str, float] = {
    "negative_exam_for_pe": 0.0736196319,
    "rv_lv_ratio_gte_1": 0.2346625767,
    "rv_lv_ratio_lt_1": 0.0782208589,
    "leftsided_pe": 0.06257668712,
    "chronic_pe": 0.1042944785,
    "rightsided_pe": 0.06257668712,
    "acute_and_chronic_pe": 0.1042944785,
    "central_pe": 0.1877300613,
    "indeterminate": 0.09202453988,
}
EXAM_LABELS: tuple[str, ...] = tuple(EXAM_WEIGHTS)
# How a reader names each exam label (the challenge's definitions, in a radiologist's words).
EXAM_LABEL_TITLES: dict[str, str] = {
    "negative_exam_for_pe": "negative exam for PE",
    "rv_lv_ratio_gte_1": "RV/LV ratio >= 1",
    "rv_lv_ratio_lt_1": "RV/LV ratio < 1",
    "leftsided_pe": "left-sided PE",
    "chronic_pe": "chronic PE",
    "rightsided_pe": "right-sided PE",
    "acute_and_chronic_pe": "acute and chronic PE",
    "central_pe": "central PE",
    "indeterminate": "indeterminate exam",
}

# Present in train.csv but not scored: image-quality and mimic flags.
INFO_LABELS: tuple[str, ...] = ("qa_motion", "qa_contrast", "flow_artifact", "true_filling_defect_not_pe")

# Column order of the RSNA train.csv.
TRAIN_COLUMNS: tuple[str, ...] = (
    STUDY,
    SERIES,
    SOP,
    IMAGE_LABEL,
    "negative_exam_for_pe",
    "qa_motion",
    "qa_contrast",
    "flow_artifact",
    "rv_lv_ratio_gte_1",
    "rv_lv_ratio_lt_1",
    "leftsided_pe",
    "chronic_pe",
    "true_filling_defect_not_pe",
    "rightsided_pe",
    "acute_and_chronic_pe",
    "central_pe",
    "indeterminate",
)
LABEL_COLUMNS: tuple[str, ...] = TRAIN_COLUMNS[3:]

SUBMISSION_COLUMNS: tuple[str, str] = ("id", "label")

# Labels grouped by the rules they take part in (pedetect.metric.rules states the rules).
RV_LV_LABELS: tuple[str, str] = ("rv_lv_ratio_gte_1", "rv_lv_ratio_lt_1")
LOCATION_LABELS: tuple[str, str, str] = ("central_pe", "rightsided_pe", "leftsided_pe")
# The labels that name the patient's side: a left-right mirrored image swaps them.
SIDE_LABELS: tuple[str, str] = ("leftsided_pe", "rightsided_pe")
CHRONICITY_LABELS: tuple[str, str] = ("chronic_pe", "acute_and_chronic_pe")
NEGATIVE_LABELS: tuple[str, str] = ("negative_exam_for_pe", "indeterminate")


def exam_id(study_uid: str, label: str) -> str:
    """Submission id of one exam-level prediction: ``<StudyInstanceUID>_<label>``."""
    return f"{study_uid}_{label}"


def split_exam_id(row_id: str) -> tuple[str, str] | None:
    """Inverse of :func:`exam_id`; ``None`` when the id is not an exam id (so a slice id)."""
    for label in _LABELS_LONGEST_FIRST:  # "…_acute_and_chronic_pe" also ends with "_chronic_pe"
        suffix = "_" + label
        if row_id.endswith(suffix):
            return row_id[: -len(suffix)], label
    return None


_LABELS_LONGEST_FIRST: tuple[str, ...] = tuple(sorted(EXAM_LABELS, key=len, reverse=True))
