"""The phantom's own clot truth beside the labels: clots.csv / test_clots.csv (one row per embolus and
slice) and a DICOM Segmentation of each positive study's emboli (``pedetect synth``, docs/design.md,
"Synthetic data")."""

from __future__ import annotations

import hashlib
from pathlib import Path

import highdicom as hd
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.sr.codedict import codes

from pedetect.labels import IMAGE_LABEL, SERIES, SOP, STUDY
from pedetect.synth import plan_study, render_study, write_dataset
from pedetect.synth.dataset import (
    CLOT_COLUMNS,
    EMBOLUS,
    SLICE_INDEX,
    VISIBLE,
    clot_rows,
    clot_seg_folder,
    clots_path,
    embolus_volume,
)
from pedetect.synth.dicom import enhanced_frame_numbers, enhanced_sop_uid
from pedetect.synth.emboli import EMBOLUS_TISSUES

SLICES, SIZE = 32, 128
TRAIN = {"slices": SLICES, "size": SIZE, "seed": 7, "positive_fraction": 1.0, "indeterminate_fraction": 0.0}
TEST = {"slices": 24, "size": SIZE, "seed": 8, "split": "test", "positive_fraction": 0.5, "indeterminate_fraction": 0.0}
N_TRAIN, N_TEST = 5, 4
SIDES, LEVELS, KINDS = (
    {"central", "right", "left"},
    {"main", "lobar", "segmental", "subsegmental"},
    {"acute", "chronic"},
)


def digests(root: Path, *, skip_clot_truth: bool = False) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
        and not (skip_clot_truth and ("clots" in p.name or p.relative_to(root).parts[0].endswith("_seg")))
    }


def write_both(out: Path, **options) -> None:
    """The train and the test split into the same folder, as the demo does."""
    write_dataset(out, N_TRAIN, progress=False, **TRAIN, **options)
    write_dataset(out, N_TEST, progress=False, transfer_syntax="rle", **TEST, **options)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clots") / "data"
    write_both(out, clot_seg=True)
    return out


@pytest.fixture(scope="module")
def rendered() -> dict[str, list]:
    """The same studies drawn in memory: split → studies in index order."""
    drop = ("seed", "split")
    return {
        "train": [render_study(k, seed=7, **{a: b for a, b in TRAIN.items() if a not in drop}) for k in range(N_TRAIN)],
        "test": [
            render_study(k, seed=8, split="test", **{a: b for a, b in TEST.items() if a not in drop})
            for k in range(N_TEST)
        ],
    }


def labels_of(out: Path, split: str) -> pd.DataFrame:
    return pd.read_csv(out / ("train.csv" if split == "train" else "test_labels.csv"))


# ------------------------------------------------------------------------------------------ clots.csv


@pytest.mark.parametrize("split", ["train", "test"])
def test_clots_csv_is_the_rendered_embolus_volume_slice_by_slice(data, rendered, split):
    clots = pd.read_csv(clots_path(data, split))
    assert clots_path(data, split).name == {"train": "clots.csv", "test": "test_clots.csv"}[split]
    assert (
        list(clots.columns)
        == list(CLOT_COLUMNS)
        == [
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "embolus",
            "SOPInstanceUID",
            "slice_index",
            "row_min",
            "row_max",
            "col_min",
            "col_max",
            "pixels",
            "side",
            "level",
            "kind",
            "artery",
            "visible",
        ]
    )
    labels = labels_of(data, split)
    seen = 0
    for study in rendered[split]:
        plan = study.plan
        np.testing.assert_array_equal(embolus_volume(plan), study.emboli)  # the plan's chunks are the drawing
        rows = clots[clots[STUDY] == plan.study_uid]
        assert (rows[SERIES] == plan.series_uid).all()
        study_labels = labels[labels[STUDY] == plan.study_uid].reset_index(drop=True)
        expected = []
        for i in range(1, int(study.emboli.max()) + 1):
            for k in np.flatnonzero((study.emboli == i).any(axis=(1, 2))):
                on = study.emboli[k] == i
                rr, cc = np.flatnonzero(on.any(axis=1)), np.flatnonzero(on.any(axis=0))
                expected.append((i, study_labels[SOP][k], k, rr[0], rr[-1], cc[0], cc[-1], int(on.sum())))
        got = rows[[EMBOLUS, SOP, SLICE_INDEX, "row_min", "row_max", "col_min", "col_max", "pixels"]]
        assert [tuple(r) for r in got.itertuples(index=False)] == expected  # same rows, same order
        assert set(rows[EMBOLUS]) == set(range(1, len(plan.emboli) + 1))
        visible = [int(plan.emboli[e - 1].visible[k]) for e, k in zip(rows[EMBOLUS], rows[SLICE_INDEX])]
        assert rows[VISIBLE].tolist() == visible
        seen += len(rows)
    assert seen == len(clots) > 0


def test_rows_and_columns_are_the_dicom_images_own(data, rendered):
    """slice_index and SOPInstanceUID name the same image; row/col index the stored pixel array."""
    clots = pd.read_csv(clots_path(data, "train"))
    for study in rendered["train"][:2]:
        plan = study.plan
        rows = clots[clots[STUDY] == plan.study_uid]
        for row in rows.drop_duplicates(SLICE_INDEX).itertuples(index=False):
            ds = pydicom.dcmread(data / "train" / plan.study_uid / plan.series_uid / f"{row.SOPInstanceUID}.dcm")
            np.testing.assert_array_equal(ds.pixel_array, study.stored[row.slice_index])
            on = study.emboli[row.slice_index] == row.embolus
            box = on[row.row_min : row.row_max + 1, row.col_min : row.col_max + 1]
            assert box.sum() == row.pixels  # the box holds the whole embolus on that slice
            assert np.isin(study.tissue[row.slice_index][on], [int(t) for t in EMBOLUS_TISSUES]).all()


@pytest.mark.parametrize("split", ["train", "test"])
def test_visible_clot_slices_are_exactly_the_positive_slices_of_the_labels(data, split):
    """The rows with visible = 1 name exactly the slices labelled positive; the other rows are drawn
    clot no reader sees there (slivers at a clot's ends, small or faint clots)."""
    clots = pd.read_csv(clots_path(data, split))
    labels = labels_of(data, split)
    assert set(clots[STUDY]) <= set(labels[STUDY])
    assert set(clots[VISIBLE]) <= {0, 1}
    negatives = 0
    for study, study_labels in labels.groupby(STUDY, sort=False):
        positive = set(study_labels.loc[study_labels[IMAGE_LABEL] == 1, SOP])
        rows = clots[clots[STUDY] == study]
        assert set(rows.loc[rows[VISIBLE] == 1, SOP]) == positive
        slice_index = {sop: k for k, sop in enumerate(study_labels[SOP])}
        assert all(slice_index[s] == k for s, k in zip(rows[SOP], rows[SLICE_INDEX]))
        negatives += not positive
    if split == "test":
        assert negatives > 0  # studies without a visible embolus have no visible row
    if split == "train":
        assert (clots[VISIBLE] == 0).any()  # and the truth keeps the rows no reader sees


def test_side_level_and_kind_are_what_the_exam_labels_say():
    """Vessel.locations(): the trunk is central; a main artery central and its side; any other artery
    its side. So central_pe is a main-level row, right/left a row of that side; the kinds make the
    chronicity labels."""
    seen_sides, seen_levels = set(), set()
    for k in range(24):
        plan = plan_study(k, seed=31, slices=24, size=128, positive_fraction=1.0, indeterminate_fraction=0.0)
        rows = clot_rows(plan)
        if not plan.emboli:
            assert rows.empty and not plan.pe_slices.any()
            continue
        if not plan.pe_slices.any():  # emboli drawn that no reader sees: a negative exam
            assert (rows[VISIBLE] == 0).all() and plan.exam["negative_exam_for_pe"] == 1
            continue
        vessels = {v.name: v for v in plan.vessels}
        assert set(rows["side"]) <= SIDES and set(rows["level"]) <= LEVELS and set(rows["kind"]) <= KINDS
        for row in rows.drop_duplicates(EMBOLUS).itertuples(index=False):
            vessel = vessels[row.artery]
            assert vessel.side == row.side or (vessel.level == "trunk" and row.side == "central")
            assert row.level == ("main" if vessel.level in ("trunk", "main") else vessel.level)
            assert (row.side == "central") == (row.artery == "pa_trunk")
            assert row.kind == plan.emboli[row.embolus - 1].kind
        exam, shown = plan.exam, rows[rows[VISIBLE] == 1]  # the labels are those of the visible emboli
        assert exam["central_pe"] == int((shown["level"] == "main").any())
        assert exam["rightsided_pe"] == int((shown["side"] == "right").any())
        assert exam["leftsided_pe"] == int((shown["side"] == "left").any())
        kinds = set(shown["kind"])
        assert exam["chronic_pe"] == int(kinds == {"chronic"})
        assert exam["acute_and_chronic_pe"] == int(kinds == {"acute", "chronic"})
        seen_sides |= set(rows["side"])
        seen_levels |= set(rows["level"])
    assert seen_sides == SIDES and {"main", "lobar", "segmental"} <= seen_levels


def test_min_embolus_pixels_holds_on_every_row_and_no_emboli_gives_a_header(tmp_path):
    options = {"slices": 24, "size": 256, "positive_fraction": 1.0, "indeterminate_fraction": 0.0}
    write_dataset(tmp_path / "a", 3, seed=3, min_embolus_pixels=25, progress=False, **options)  # the demo's setting
    clots = pd.read_csv(clots_path(tmp_path / "a", "train"))
    assert len(clots) > 0 and (clots["pixels"] >= 25).all()
    drawn = pd.concat([clot_rows(plan_study(k, seed=3, **options)) for k in range(3)])  # without the minimum
    assert (drawn["pixels"] < 25).any()
    write_dataset(tmp_path / "b", 2, slices=8, size=48, seed=3, positive_fraction=0.0, clot_seg=True, progress=False)
    assert clots_path(tmp_path / "b", "train").read_text() == ",".join(CLOT_COLUMNS) + "\n"
    assert not list(clot_seg_folder(tmp_path / "b", "train").glob("*"))  # no embolus, no SEG


# ---------------------------------------------------------------------------------------------- SEG


@pytest.mark.parametrize("split", ["train", "test"])
def test_seg_reads_back_one_segment_per_embolus_with_the_rendered_masks(data, rendered, split):
    folder = clot_seg_folder(data, split)
    assert folder == data / f"{split}_seg"
    positive = [s for s in rendered[split] if s.plan.emboli]
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{s.plan.study_uid}.dcm" for s in positive)
    for study in positive:
        plan = study.plan
        path = folder / f"{plan.study_uid}.dcm"
        seg = hd.seg.segread(path)
        ct = {
            str(ds.SOPInstanceUID): ds
            for ds in (
                pydicom.dcmread(p, stop_before_pixels=True) for p in (data / split / plan.study_uid).rglob("*.dcm")
            )
        }
        assert seg.SegmentationType == "BINARY" and seg.Modality == "SEG"
        assert seg.StudyInstanceUID == plan.study_uid and seg.FrameOfReferenceUID == plan.frame_uid
        assert {ds.FrameOfReferenceUID for ds in ct.values()} == {plan.frame_uid}
        assert seg.SeriesInstanceUID != plan.series_uid and seg.SOPInstanceUID not in ct
        # Every CT slice of the series is referenced; each frame derives from one of them.
        (series,) = seg.ReferencedSeriesSequence
        assert series.SeriesInstanceUID == plan.series_uid
        assert {item.ReferencedSOPInstanceUID for item in series.ReferencedInstanceSequence} == set(ct)
        assert seg.get_source_image_uids() and {u[2] for u in seg.get_source_image_uids()} == set(ct)
        # One segment per embolus, coded as an embolus, named after the phantom.
        assert seg.number_of_segments == len(plan.emboli)
        for i, e in enumerate(plan.emboli, start=1):
            d = seg.get_segment_description(i)
            assert d.segment_label == f"embolus {i}"
            assert d.segmented_property_category == codes.SCT.MorphologicallyAbnormalStructure
            assert d.segmented_property_type == codes.SCT.Embolus
            assert d.algorithm_identification[0].AlgorithmName == "pedetect synthetic phantom"
            assert e.vessel in d.SegmentDescription and e.kind in d.SegmentDescription
        # The frames' pixels are the rendered masks, frame by frame (by the frame's own source reference).
        got = np.zeros_like(study.emboli)
        sop_index = {sop: k for k, sop in enumerate(plan.sop_uids)}
        pixels = seg.pixel_array.reshape(-1, SIZE, SIZE)  # BINARY: 0/1 per frame
        for frame, group in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
            source = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            number = group.SegmentIdentificationSequence[0].ReferencedSegmentNumber
            assert not got[sop_index[source]][frame > 0].any()  # emboli do not overlap
            got[sop_index[source]][frame > 0] = number
        np.testing.assert_array_equal(got, study.emboli)
        # highdicom's own reading agrees.
        volume = seg.get_pixels_by_source_instance(
            plan.sop_uids, combine_segments=True, assert_missing_frames_are_empty=True
        )
        np.testing.assert_array_equal(volume, study.emboli)


def test_seg_of_an_enhanced_study_references_its_frames(tmp_path):
    options = {"slices": 24, "size": 96, "seed": 12, "positive_fraction": 1.0, "indeterminate_fraction": 0.0}
    write_dataset(tmp_path, 2, enhanced=True, clot_seg=True, progress=False, **options)
    clots, labels = pd.read_csv(clots_path(tmp_path, "train")), pd.read_csv(tmp_path / "train.csv")
    drop = ("seed",)
    for k in range(2):
        study = render_study(k, seed=12, **{a: b for a, b in options.items() if a not in drop})
        plan = study.plan
        if not plan.emboli:
            continue
        sop, numbers = enhanced_sop_uid(plan), enhanced_frame_numbers(plan)
        rows = clots[clots[STUDY] == plan.study_uid]
        study_labels = labels[labels[STUDY] == plan.study_uid].reset_index(drop=True)
        assert rows[SOP].tolist() == [f"{sop}#{numbers[s]}" for s in rows[SLICE_INDEX]]
        assert rows[SOP].tolist() == [study_labels[SOP][s] for s in rows[SLICE_INDEX]]
        seg = hd.seg.segread(clot_seg_folder(tmp_path, "train") / f"{plan.study_uid}.dcm")
        got = np.zeros_like(study.emboli)
        position = {int(n): s for s, n in enumerate(numbers)}
        pixels = seg.pixel_array.reshape(-1, 96, 96)
        for frame, group in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
            source = group.DerivationImageSequence[0].SourceImageSequence[0]
            assert source.ReferencedSOPInstanceUID == sop
            got[position[int(source.ReferencedFrameNumber)]][frame > 0] = group.SegmentIdentificationSequence[
                0
            ].ReferencedSegmentNumber
        np.testing.assert_array_equal(got, study.emboli)


# ------------------------------------------------------------------- determinism, workers, the option


def test_same_bytes_twice_in_processes_and_the_labels_untouched_by_the_option(data, tmp_path):
    again = digests(data)
    assert any(name.startswith("train_seg/") for name in again) and any(name.startswith("test_seg/") for name in again)
    write_both(tmp_path / "workers", clot_seg=True, workers=2)
    assert digests(tmp_path / "workers") == again  # a second write, in two processes: the same bytes
    write_both(tmp_path / "off")  # clot_seg off by default
    off = digests(tmp_path / "off")
    assert not any("_seg/" in name for name in off)
    assert off == {name: h for name, h in again.items() if not name.split("/")[0].endswith("_seg")}
    assert digests(tmp_path / "off", skip_clot_truth=True) == digests(data, skip_clot_truth=True)


def test_cli_counts_the_emboli_and_turns_the_seg_off(tmp_path, cli):
    common = ["--studies", 3, "--slices", 16, "--size", 64, "--seed", 4, "--no-progress"]
    result = cli("synth", tmp_path / "on", *common, "--positive-fraction", 1, "--indeterminate-fraction", 0)
    assert result.exit_code == 0, result.output
    clots = pd.read_csv(tmp_path / "on" / "clots.csv")
    n = len(clots.drop_duplicates([STUDY, EMBOLUS]))
    assert n > 0 and f"{n} emboli in {tmp_path / 'on' / 'clots.csv'}" in result.output
    assert len(list((tmp_path / "on" / "train_seg").glob("*.dcm"))) == clots[STUDY].nunique()
    result = cli("synth", tmp_path / "off", *common, "--split", "test", "--no-clot-seg")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "off" / "test_clots.csv").is_file() and not (tmp_path / "off" / "test_seg").exists()
    helped = cli("synth", "--help", env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    for text in ("--clot-seg", "--no-clot-seg", "clots.csv", "test_clots.csv", "_seg"):
        assert text in helped.output
