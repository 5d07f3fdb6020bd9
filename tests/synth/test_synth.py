"""Synthetic CTPA generator (`pedetect synth`): labels, phantom realism, DICOM validity, determinism, CLI."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from scipy.ndimage import binary_dilation, binary_erosion

from pedetect.io import TMP_MARK
from pedetect.labels import (
    EXAM_LABELS,
    IMAGE_LABEL,
    INFO_LABELS,
    LOCATION_LABELS,
    NEGATIVE_LABELS,
    RV_LV_LABELS,
    SOP,
    STUDY,
    TRAIN_COLUMNS,
    UID_COLUMNS,
    exam_id,
)
from pedetect.metric.rules import exam_violations
from pedetect.synth import plan_study, render_study, write_dataset
from pedetect.synth.anatomy import Tissue
from pedetect.synth.phantom import draw_labels
from pedetect.synth.render import render_plan

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SYNTAX_UIDS = {
    "explicit": "1.2.840.10008.1.2.1",
    "rle": "1.2.840.10008.1.2.5",
    "jpeg2000": "1.2.840.10008.1.2.4.90",
}


# ------------------------------------------------------------------------------------------ helpers


def read_series(folder: Path) -> list[pydicom.Dataset]:
    """All files of one series folder, sorted by position along the slice normal (z here)."""
    datasets = [pydicom.dcmread(p) for p in folder.glob("*.dcm")]
    return sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))


def hu_of(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float32) * np.float32(ds.RescaleSlope) + np.float32(ds.RescaleIntercept)


def exam_of(frame: pd.DataFrame) -> dict[str, float]:
    return {label: float(frame[label].iloc[0]) for label in EXAM_LABELS}


def file_digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def planned() -> list:
    """Planned (not rendered) studies over a range of slice counts and sizes, half of them positive."""
    plans = []
    for i in range(60):
        plans.append(plan_study(i, seed=21, size=64, slices=16, positive_fraction=0.5, indeterminate_fraction=0.1))
    for i in range(40):
        plans.append(plan_study(i, seed=22, size=96, slices=None, positive_fraction=0.5, indeterminate_fraction=0.1))
    return plans


@pytest.fixture(scope="module")
def clean_positives() -> list:
    """Rendered positive studies without motion or poor contrast, including a chronic embolus."""
    studies, chronic = [], False
    for i in range(40):
        plan = plan_study(i, seed=5, size=160, slices=40, kind="positive")
        if plan.exam["qa_motion"] or plan.exam["qa_contrast"]:
            continue
        has_chronic = any(e.kind == "chronic" for e in plan.emboli)
        if len(studies) < 3 or (has_chronic and not chronic):
            studies.append(render_plan(plan))
            chronic |= has_chronic
        if len(studies) >= 3 and chronic:
            break
    assert chronic and len(studies) >= 3
    return studies


# ------------------------------------------------------------------------------------------- labels


def test_every_planned_study_obeys_the_consistency_rules(planned):
    kinds, realised, drawn_positive = set(), [], 0
    for plan in planned:
        frame = plan.labels_frame()
        assert list(frame.columns) == list(TRAIN_COLUMNS)
        assert len(frame) == plan.n_slices
        image = frame[IMAGE_LABEL].to_numpy(dtype=float)
        exam = exam_of(frame)
        assert exam_violations(image, exam) == [], (plan.index, exam)
        positive = bool(image.max() > 0.5)
        assert positive == (plan.kind == "positive")
        kinds.add(plan.kind)
        if not positive:
            assert all(exam[label] == 0 for label in RV_LV_LABELS + LOCATION_LABELS)
            assert sum(exam[label] for label in NEGATIVE_LABELS) == 1
        else:
            assert 0 < image.mean() < 0.6  # PE slices are a minority even in positive exams
        # Exam columns repeat on every slice row.
        assert (frame[list(EXAM_LABELS + INFO_LABELS)].nunique() == 1).all()
        # The geometry realises exactly the labels that were drawn for the study when a reader sees
        # every embolus somewhere; at these coarse pixels (4-7 mm) and thick slices some drawn emboli
        # show nowhere, and the exam has the labels of the ones that show (none: negative).
        if all(e.visible.any() for e in plan.emboli):
            assert plan.exam == plan.intended
        else:
            realised.append(plan)
            assert plan.intended["negative_exam_for_pe"] == 0 and plan.intended["indeterminate"] == 0
            for label in LOCATION_LABELS:
                assert plan.exam[label] <= plan.intended[label]
        drawn_positive += plan.intended["negative_exam_for_pe"] == 0 and plan.intended["indeterminate"] == 0
    assert kinds == {"positive", "negative", "indeterminate"}
    assert 0 < len(realised) < drawn_positive  # some drawn positives lose emboli to visibility, not all


def test_positive_slice_iff_embolus_visible_and_exam_labels_follow_the_visible_emboli(planned):
    """A slice is positive where an embolus is visible (a subset of the slices its mask crosses); the
    exam labels come from the emboli visible somewhere; an embolus visible nowhere labels nothing."""
    hidden = 0
    for plan in planned:
        visible = np.zeros(plan.n_slices, dtype=bool)
        for e in plan.emboli:
            crossed = np.zeros(plan.n_slices, dtype=bool)
            for box, mask in e.chunks:
                crossed[box[0]] |= mask.any(axis=(1, 2))
            np.testing.assert_array_equal(crossed, e.slices)
            assert not (e.visible & ~e.slices).any()
            visible |= e.visible
            hidden += int((e.slices & ~e.visible).sum())
        np.testing.assert_array_equal(visible, plan.pe_slices)
        seen = [e for e in plan.emboli if e.visible.any()]
        if plan.kind != "positive":
            assert seen == []  # none, or only emboli no reader sees (drawn positive, realised negative)
            assert plan.emboli == [] or plan.intended["negative_exam_for_pe"] == 0
            continue
        locations = set().union(*(e.locations for e in seen))
        for label in LOCATION_LABELS:
            assert plan.exam[label] == int(label in locations)
        for e in plan.emboli:  # trunk -> central; main -> central + side; branches -> side
            if e.level == "trunk":
                assert e.locations == {"central_pe"}
            elif e.level == "main":
                assert "central_pe" in e.locations and len(e.locations) == 2
            else:
                assert e.locations <= {"rightsided_pe", "leftsided_pe"} and len(e.locations) == 1
        kinds = {e.kind for e in seen}
        assert plan.exam["chronic_pe"] == int(kinds == {"chronic"})
        assert plan.exam["acute_and_chronic_pe"] == int(kinds == {"acute", "chronic"})
        assert plan.exam["rv_lv_ratio_gte_1"] == int(plan.anatomy.w_rv / plan.anatomy.w_lv >= 1.0)
    assert hidden > 0  # slivers at the clots' ends and faint or small clots are drawn but not labelled


def _frequencies(n: int, **fractions) -> tuple[pd.DataFrame, pd.DataFrame]:
    frame = pd.DataFrame([draw_labels(i, seed=99, **fractions) for i in range(n)])
    positive = frame[(frame.negative_exam_for_pe == 0) & (frame.indeterminate == 0)]
    return frame, positive


def test_exam_label_frequencies_match_the_rsna_training_set():
    frame, positive = _frequencies(4000)
    assert frame.negative_exam_for_pe.mean() == pytest.approx(0.67, abs=0.025)
    assert frame.indeterminate.mean() == pytest.approx(0.02, abs=0.008)
    assert len(positive) / len(frame) == pytest.approx(0.31, abs=0.025)
    targets = {
        "rightsided_pe": 0.80,
        "leftsided_pe": 0.66,
        "central_pe": 0.18,
        "rv_lv_ratio_gte_1": 0.42,
        "chronic_pe": 0.13,
        "acute_and_chronic_pe": 0.06,
    }
    for label, target in targets.items():
        assert positive[label].mean() == pytest.approx(target, abs=0.04), label
    assert (positive.rv_lv_ratio_gte_1 + positive.rv_lv_ratio_lt_1 == 1).all()
    assert not (positive.chronic_pe & positive.acute_and_chronic_pe).any()
    indeterminate = frame[frame.indeterminate == 1]
    assert ((indeterminate.qa_contrast + indeterminate.qa_motion) > 0).mean() > 0.8


def test_settable_fractions_move_the_frequencies():
    frame, positive = _frequencies(2000, positive_fraction=0.6, indeterminate_fraction=0.1)
    assert len(positive) / len(frame) == pytest.approx(0.6, abs=0.035)
    assert frame.indeterminate.mean() == pytest.approx(0.1, abs=0.02)
    frame, positive = _frequencies(500, positive_fraction=0.0, indeterminate_fraction=0.0)
    assert len(positive) == 0 and frame.negative_exam_for_pe.all()
    with pytest.raises(ValueError):
        plan_study(0, positive_fraction=0.8, indeterminate_fraction=0.3)


# -------------------------------------------------------------------------------- phantom realism


def test_rendered_masks_match_the_labels(clean_positives):
    """The drawn emboli are the plan's; the labels are the slices where one is visible, each of them a
    slice the drawing shows clot on (the rest of the drawn slices hold slivers or faint clot)."""
    for study in clean_positives:
        plan = study.plan
        drawn = np.zeros(plan.n_slices, dtype=bool)
        for i, e in enumerate(plan.emboli, start=1):
            on = (study.emboli == i).any(axis=(1, 2))
            np.testing.assert_array_equal(on, e.slices)
            drawn |= on
        np.testing.assert_array_equal(study.pe_mask.any(axis=(1, 2)), drawn)
        assert plan.pe_slices.any() and not (plan.pe_slices & ~drawn).any()
        np.testing.assert_array_equal(study.labels[IMAGE_LABEL].to_numpy(), plan.pe_slices.astype(int))
        is_embolus = np.isin(study.tissue, [int(Tissue.EMBOLUS_ACUTE), int(Tissue.EMBOLUS_CHRONIC)])
        np.testing.assert_array_equal(is_embolus, study.pe_mask)
        assert study.hu.dtype == np.float32 and study.hu.shape == (plan.n_slices, 160, 160)
        assert np.all(np.diff(study.z) > 0)  # position order


def test_emboli_are_filling_defects_inside_contrast_filled_arteries(clean_positives):
    checked = {"acute": 0, "chronic": 0}
    all_voxels = []
    for study in clean_positives:
        for i, e in enumerate(study.plan.emboli, start=1):
            mask = study.emboli == i
            assert mask.sum() >= 1, e.vessel  # no embolus hides another
            all_voxels.append(study.hu[mask])
            if mask.sum() >= 10:
                assert 10.0 <= study.hu[mask].mean() <= 90.0, (e.vessel, study.hu[mask].mean())
            core = np.stack([binary_erosion(m) for m in mask])
            if core.sum() >= 6:
                assert 15.0 <= study.hu[core].mean() <= 75.0, (e.vessel, study.hu[core].mean())
            ring = np.stack([binary_dilation(m, iterations=2) for m in mask]) & ~mask
            lumen = ring & (study.tissue == int(Tissue.PA_BLOOD))
            assert lumen.sum() >= 4, e.vessel
            assert study.hu[lumen].mean() > 200.0, (e.vessel, study.hu[lumen].mean())
            checked[e.kind] += 1
    assert checked["acute"] >= 2 and checked["chronic"] >= 1
    assert 20.0 <= np.concatenate(all_voxels).mean() <= 70.0


def test_chronic_emboli_are_wall_adherent_and_acute_central_ones_surrounded(clean_positives):
    """Chronic: the defect touches the artery wall; acute in a large artery: contrast all around it."""
    not_lumen = [
        int(Tissue.PA_BLOOD),
        int(Tissue.EMBOLUS_ACUTE),
        int(Tissue.EMBOLUS_CHRONIC),
        int(Tissue.FLOW_OUTER),
        int(Tissue.FLOW_INNER),
    ]
    seen = {"chronic": 0, "acute": 0}
    for study in clean_positives:
        wall = ~np.isin(study.tissue, not_lumen)
        for i, e in enumerate(study.plan.emboli, start=1):
            grown = np.stack([binary_dilation(m) for m in study.emboli == i])
            touching = (grown & wall).sum() / grown.sum()
            if e.kind == "chronic":
                assert touching > 0.04, (e.vessel, touching)
                seen["chronic"] += 1
            elif e.level in ("trunk", "main"):
                assert touching < 0.02, (e.vessel, touching)
                seen["acute"] += 1
    assert seen["chronic"] >= 1 and seen["acute"] >= 1


def test_tissues_have_their_hounsfield_units(clean_positives):
    for study in clean_positives:
        hu, t = study.hu, study.tissue

        def mean(tissue: Tissue, hu=hu, t=t) -> float:
            return float(hu[t == int(tissue)].mean())

        assert -900.0 <= mean(Tissue.LUNG) <= -780.0
        assert -140.0 <= mean(Tissue.FAT) <= -60.0
        assert 20.0 <= mean(Tissue.MUSCLE) <= 80.0
        assert mean(Tissue.BONE) >= 450.0
        assert 230.0 <= mean(Tissue.PA_BLOOD) <= 470.0
        assert mean(Tissue.MYOCARDIUM) <= 110.0
        assert (t == int(Tissue.AIR)).any() and hu[0, 0, 0] <= -950.0  # air outside the body
        # Anatomy changes along z: heart low, lungs largest mid-chest, apices small at the top.
        S = study.plan.n_slices
        lung_area = (t == int(Tissue.LUNG)).sum(axis=(1, 2))
        heart = np.isin(t, [int(Tissue.MYOCARDIUM)]).sum(axis=(1, 2))
        assert heart[: S // 2].sum() > 5 * heart[S // 2 :].sum()
        assert lung_area[int(0.55 * S)] > 2 * lung_area[-2]


def test_indeterminate_and_mimic_studies_have_no_embolus():
    seen = set()
    for i in range(400):
        labels = draw_labels(i, seed=7, positive_fraction=0.0, indeterminate_fraction=0.3)
        if labels["flow_artifact"] and "flow" not in seen:
            seen.add("flow")
        elif labels["true_filling_defect_not_pe"] and "mimic" not in seen:
            seen.add("mimic")
        elif labels["indeterminate"] and "indeterminate" not in seen:
            seen.add("indeterminate")
        else:
            continue
        study = render_study(i, seed=7, size=96, slices=40, positive_fraction=0.0, indeterminate_fraction=0.3)
        assert not study.pe_mask.any() and study.labels[IMAGE_LABEL].sum() == 0
        if labels["flow_artifact"]:
            region = study.tissue == int(Tissue.FLOW_INNER)
            assert region.any() and 90.0 < study.hu[region].mean() < 260.0
        if labels["true_filling_defect_not_pe"]:
            region = study.tissue == int(Tissue.MIMIC)
            assert region.any() and study.hu[region].mean() < 120.0
        if len(seen) == 3:
            break
    assert seen == {"flow", "mimic", "indeterminate"}


# ------------------------------------------------------------------------------------------- DICOM


@pytest.fixture(scope="module", params=["explicit", "rle", "jpeg2000"])
def dataset(request, tmp_path_factory):
    n = 8 if request.param == "explicit" else 3
    out = tmp_path_factory.mktemp(f"synth_{request.param}")
    labels = write_dataset(
        out, n, slices=8, size=64, seed=11, transfer_syntax=request.param, progress=False, positive_fraction=0.5
    )
    return request.param, out, labels, n


def test_dicom_files_are_valid_and_round_trip_the_rendered_hu(dataset):
    syntax, out, labels, n = dataset
    csv = pd.read_csv(out / "train.csv")
    assert list(csv.columns) == list(TRAIN_COLUMNS) and len(csv) == n * 8
    pd.testing.assert_frame_equal(csv, labels.reset_index(drop=True), check_dtype=False)
    sops = set()
    for index, (study_uid, frame) in enumerate(labels.groupby(STUDY, sort=False)):
        assert exam_violations(frame[IMAGE_LABEL].to_numpy(dtype=float), exam_of(frame)) == []
        folders = list((out / "train" / study_uid).iterdir())
        assert len(folders) == 1
        series = read_series(folders[0])
        assert [ds.SOPInstanceUID for ds in series] == frame[SOP].tolist()  # rows are in position order
        study = render_study(index, seed=11, size=64, slices=8, positive_fraction=0.5)
        assert study.plan.study_uid == study_uid
        for k, ds in enumerate(series):
            assert ds.file_meta.TransferSyntaxUID == SYNTAX_UIDS[syntax]
            assert ds.SOPClassUID == CT_IMAGE_STORAGE == ds.file_meta.MediaStorageSOPClassUID
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.Modality == "CT" and ds.PhotometricInterpretation == "MONOCHROME2"
            assert ds.Rows == ds.Columns == 64 and ds.BitsAllocated == 16 and ds.SamplesPerPixel == 1
            assert ds.HighBit == ds.BitsStored - 1
            assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert ds.StudyInstanceUID == study_uid and ds.SeriesInstanceUID == frame.iloc[0]["SeriesInstanceUID"]
            assert re.fullmatch(r"SYNTHETIC\^PHANTOM-\d{4}", str(ds.PatientName))
            assert (
                re.fullmatch(r"SYNTH-\d{4}", ds.PatientID) and ds.PatientBirthDate == "" and ds.PatientSex == ""
            )  # type 2: present, empty
            assert ds.RescaleType == "HU" and "WindowCenter" in ds and "SliceThickness" in ds
            np.testing.assert_array_equal(hu_of(ds), study.hu[k])
            np.testing.assert_array_equal(ds.pixel_array, study.stored[k])
            assert float(ds.ImagePositionPatient[2]) == pytest.approx(study.z[k])
            sops.add(ds.SOPInstanceUID)
    assert len(sops) == n * 8
    assert labels["SeriesInstanceUID"].nunique() == labels[STUDY].nunique() == n


def test_scanner_variety_in_the_written_dataset(dataset):
    syntax, out, labels, n = dataset
    import gdcm  # python-gdcm is a dependency: GDCM must read our files too

    signed, orders, padded = set(), set(), False
    for study_uid in labels[STUDY].unique():
        series = read_series(next((out / "train" / study_uid).iterdir()))
        signed.add(int(series[0].PixelRepresentation))
        numbers = [int(ds.InstanceNumber) for ds in series]
        orders.add(
            "increasing"
            if numbers == sorted(numbers)
            else "decreasing"
            if numbers == sorted(numbers)[::-1]
            else "shuffled"
        )
        padded |= "PixelPaddingValue" in series[0]
    if syntax == "explicit":  # 8 studies here, 3 for the compressed syntaxes
        assert signed == {0, 1}
        assert orders == {"increasing", "decreasing", "shuffled"}  # InstanceNumber order often differs from position
        assert padded
    for path in sorted((out / "train").rglob("*.dcm"))[:: max(1, n * 8 // 6)]:
        reader = gdcm.ImageReader()
        reader.SetFileName(str(path))
        assert reader.Read(), path
        image = reader.GetImage()
        assert image.GetDimension(0) == 64 and image.GetDimension(1) == 64


def test_scanner_parameters_vary_between_studies():
    plans = [plan_study(i, seed=8, size=64, slices=4) for i in range(60)]
    sc = [p.scanner for p in plans]
    assert {s.signed for s in sc} == {True, False}
    assert {s.instance_order for s in sc} == {"increasing", "decreasing", "shuffled"}
    assert {s.slope for s in sc} >= {0.5, 1.0, 2.0}
    assert {s.intercept for s in sc} >= {-1024.0, -1000.0, 0.0}
    assert any(s.padding is not None for s in sc) and any(s.padding is None for s in sc)
    assert len({s.spacing for s in sc}) >= 5 and len({s.pixel_spacing for s in sc}) >= 30
    assert min(s.spacing for s in sc) <= 0.8 and max(s.spacing for s in sc) >= 2.5
    default = [plan_study(i, seed=8, size=64).n_slices for i in range(10)]
    assert len(set(default)) > 3 and min(default) >= 60 and max(default) <= 140


# ------------------------------------------------------------------------------------ determinism


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    kw = dict(slices=6, size=64, progress=False, positive_fraction=0.5)
    a = write_dataset(tmp_path / "a", 2, seed=1, **kw)
    b = write_dataset(tmp_path / "b", 2, seed=1, workers=2, **kw)  # and whatever the number of processes
    pd.testing.assert_frame_equal(a, b)
    assert (tmp_path / "a" / "train.csv").read_bytes() == (tmp_path / "b" / "train.csv").read_bytes()
    assert file_digests(tmp_path / "a" / "train") == file_digests(tmp_path / "b" / "train")
    # Study k does not depend on how many studies are written.
    one = write_dataset(tmp_path / "one", 1, seed=1, **kw)
    first = file_digests(tmp_path / "one" / "train")
    assert set(first.items()) <= set(file_digests(tmp_path / "a" / "train").items())
    pd.testing.assert_frame_equal(one, a[a[STUDY] == one[STUDY].iloc[0]].reset_index(drop=True))
    # Another seed: other UIDs and other pixels.
    c = write_dataset(tmp_path / "c", 2, seed=2, **kw)
    assert set(c[STUDY]).isdisjoint(a[STUDY])
    s1, s2 = render_study(0, seed=1, size=64, slices=6), render_study(0, seed=2, size=64, slices=6)
    assert not np.array_equal(s1.hu, s2.hu)
    # Train and test splits of the same seed are different studies.
    t = render_study(0, seed=1, split="test", size=64, slices=6)
    assert t.plan.study_uid != s1.plan.study_uid and not np.array_equal(t.hu, s1.hu)


def test_render_study_is_deterministic_and_forces_the_kind():
    # 128 px: at 64 px and 10 slices (28 mm slabs) this study's emboli are drawn but no reader sees them.
    a = render_study(3, seed=0, size=128, slices=10, kind="positive")
    b = render_study(3, seed=0, size=128, slices=10, kind="positive")
    assert a.hu.tobytes() == b.hu.tobytes() and a.emboli.tobytes() == b.emboli.tobytes()
    assert a.plan.kind == "positive" and a.pe_mask.any()
    assert render_study(3, seed=0, size=128, slices=10, kind="negative").plan.kind == "negative"
    unseen = render_study(3, seed=0, size=64, slices=10, kind="positive")
    assert unseen.plan.kind == "negative" and unseen.pe_mask.any() and unseen.labels[IMAGE_LABEL].sum() == 0


def test_min_embolus_pixels_keeps_every_labelled_slice_visible():
    """Conspicuous emboli (pedetect demo's data): every slice labelled positive shows at least the
    minimum of clot, labels and masks still agree, and without the option nothing changes."""
    kw = dict(seed=5, size=256, slices=40, kind="positive")
    small_default, positive_studies, labelled = 0, 0, 0
    for i in range(8):
        default = render_study(i, **kw)
        conspicuous = render_study(i, **kw, min_embolus_pixels=25)
        per_slice = default.pe_mask.reshape(len(default.pe_mask), -1).sum(1)
        small_default += int(((per_slice > 0) & (per_slice < 25)).sum())
        per_slice = conspicuous.pe_mask.reshape(len(conspicuous.pe_mask), -1).sum(1)
        labels = conspicuous.labels[IMAGE_LABEL].to_numpy()
        np.testing.assert_array_equal(labels, (per_slice > 0).astype(int))
        assert per_slice[per_slice > 0].min(initial=25) >= 25
        is_embolus = np.isin(conspicuous.tissue, [int(Tissue.EMBOLUS_ACUTE), int(Tissue.EMBOLUS_CHRONIC)])
        np.testing.assert_array_equal(is_embolus, conspicuous.pe_mask)
        assert exam_violations(labels.astype(float), exam_of(conspicuous.labels)) == []
        positive_studies += int(labels.any())
        labelled += int(labels.sum())
        assert conspicuous.plan.study_uid != default.plan.study_uid  # another dataset, other UIDs
        again = render_study(i, **kw)
        assert again.plan.study_uid == default.plan.study_uid and again.emboli.tobytes() == default.emboli.tobytes()
    assert small_default > 0  # the default draws clots too small to see at this size
    assert positive_studies >= 6 and labelled >= 20
    with pytest.raises(ValueError, match="min_embolus_pixels"):
        render_study(0, size=64, slices=5, min_embolus_pixels=-1)


# -------------------------------------------------------------------------------------------- CLI


def test_cli_train_and_test_splits(tmp_path, cli):
    result = cli(
        "synth",
        tmp_path,
        "--studies",
        2,
        "--slices",
        5,
        "--size",
        64,
        "--seed",
        3,
        "--no-progress",
        "--positive-fraction",
        0.5,
    )
    assert result.exit_code == 0, result.output
    train = pd.read_csv(tmp_path / "train.csv")
    assert list(train.columns) == list(TRAIN_COLUMNS) and len(train) == 10
    assert len(list((tmp_path / "train").rglob("*.dcm"))) == 10

    result = cli(
        "synth",
        tmp_path,
        "--studies",
        3,
        "--slices",
        4,
        "--size",
        64,
        "--split",
        "test",
        "--transfer-syntax",
        "rle",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    test = pd.read_csv(tmp_path / "test.csv")
    truth = pd.read_csv(tmp_path / "test_labels.csv")
    sub = pd.read_csv(tmp_path / "sample_submission.csv")
    assert list(test.columns) == list(UID_COLUMNS) and len(test) == 12
    assert list(truth.columns) == list(TRAIN_COLUMNS) and len(truth) == 12
    assert list(sub.columns) == ["id", "label"] and len(sub) == 3 * 9 + 12
    studies = test[STUDY].unique().tolist()
    assert sub["id"].iloc[:27].tolist() == [exam_id(s, label) for s in studies for label in EXAM_LABELS]
    assert sub["id"].iloc[27:].tolist() == test[SOP].tolist()
    assert (sub["label"] == 0.5).all()
    assert len(list((tmp_path / "test").rglob("*.dcm"))) == 12
    assert set(test[STUDY]).isdisjoint(train[STUDY])
    assert not [p for p in tmp_path.rglob("*") if TMP_MARK in p.name]  # atomic CSV writes leave no temporary files


def test_cli_preview_and_errors(tmp_path, cli):
    png = tmp_path / "preview.png"
    result = cli("synth", "--preview", png, "--size", 96, "--slices", 24, "--seed", 2)
    assert result.exit_code == 0, result.output
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert cli("synth").exit_code == 2
    bad = cli("synth", tmp_path / "x", "--positive-fraction", 0.9, "--indeterminate-fraction", 0.2)
    assert bad.exit_code == 2
    helped = cli("synth", "--help", env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert helped.exit_code == 0
    for option in (
        "--studies",
        "--slices",
        "--size",
        "--seed",
        "--split",
        "--transfer-syntax",
        "--preview",
        "--positive-fraction",
        "--indeterminate-fraction",
    ):
        assert option in helped.output


def test_rv_lv_ratio_spreads_over_both_sides_of_1_but_for_a_3_percent_band():
    """The ratio is drawn evenly over 0.6-1.5 (docs/design.md): exams close to the threshold on both
    sides, none within ±3 % of it (less than a pixel of difference), and the label is ratio >= 1."""
    plans = [plan_study(i, seed=123, slices=40, size=128, kind="positive") for i in range(150)]
    ratios = np.array([p.anatomy.rv_lv_ratio for p in plans])
    assert not ((ratios > 0.97) & (ratios < 1.03)).any()
    assert ((ratios >= 1.03) & (ratios < 1.1)).sum() >= 5 and ((ratios > 0.9) & (ratios <= 0.97)).sum() >= 5
    assert ratios.min() >= 0.6 and ratios.max() <= 1.5
    assert [p.exam["rv_lv_ratio_gte_1"] for p in plans] == [int(r >= 1.0) for r in ratios]
