"""The label schema's submission ids."""

from __future__ import annotations

import pytest

from pedetect.labels import EXAM_LABELS, exam_id, split_exam_id

STUDY_UID = "1.2.826.0.1.3680043.8.498.12345"


@pytest.mark.parametrize("label", EXAM_LABELS)
def test_every_exam_id_splits_back_into_its_study_and_label(label):
    # acute_and_chronic_pe ends with chronic_pe: the longer label must win.
    assert split_exam_id(exam_id(STUDY_UID, label)) == (STUDY_UID, label)


def test_a_slice_id_is_not_an_exam_id():
    assert split_exam_id("1.2.826.0.1.3680043.8.498.777") is None
