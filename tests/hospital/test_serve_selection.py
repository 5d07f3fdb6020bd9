"""Series selection (pedetect.hospital.selection) and the bad studies a PACS sends: a scout, a second
CT series (thick, lung kernel), an MPR, a corrupt instance, a study with only a scout."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from helpers.results import validator_errors
from helpers.serve import StoreSCP, c_store, free_port, wait_for
from pedetect.hospital.selection import select_series
from pedetect.hospital.serve import answered
from pedetect.hospital.sr_read import read_sr_values


def variant(files: list[Path], folder: Path, *, count: int | None = None, **changes) -> list[Path]:
    """A copy of the series as another series of the same study, with ``changes`` to every header."""
    folder.mkdir(parents=True, exist_ok=True)
    series, out = generate_uid(), []
    for path in files[:count]:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        out.append(folder / f"{ds.SOPInstanceUID}.dcm")
        ds.save_as(out[-1], enforce_file_format=True)
    return out


def corrupt(path: Path, folder: Path) -> Path:
    """The instance with half its pixel data: its header reads, its pixels do not."""
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / path.name, enforce_file_format=True)
    return folder / path.name


@pytest.fixture(scope="module")
def variants(study, tmp_path_factory):
    uid, files, model = study
    root = tmp_path_factory.mktemp("variants")
    return {
        "scout": variant(files, root / "scout", count=1, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]),
        "lung": variant(files, root / "lung", ConvolutionKernel="B70f"),
        "thick": variant(files, root / "thick", SliceThickness="5", ConvolutionKernel="B30f"),
        "coronal": variant(files, root / "coronal", ImageOrientationPatient=["1", "0", "0", "0", "0", "-1"]),
        "short": variant(files, root / "short", count=4),
    }


def test_selection_takes_the_axial_soft_tissue_thinnest_series_and_says_why_not_the_others(study, variants):
    _, files, _ = study
    original_thickness = float(pydicom.dcmread(files[0], stop_before_pixels=True).SliceThickness)
    everything = files + [p for paths in variants.values() for p in paths]
    selection = select_series(everything, min_slices=8)
    assert selection.chosen is not None and sorted(selection.chosen.files) == sorted(files)
    reasons = {s.uid: s.reason for s in selection.rejected}
    uid_of = {
        name: pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID for name, paths in variants.items()
    }
    assert reasons[uid_of["scout"]] == "localizer (scout)"
    assert reasons[uid_of["coronal"]].startswith("not axial")
    assert reasons[uid_of["short"]] == "4 slices, fewer than 8"
    assert reasons[uid_of["lung"]].startswith("another series preferred") and "kernel B70f" in reasons[uid_of["lung"]]
    if original_thickness < 5:
        assert reasons[uid_of["thick"]].startswith("another series preferred")
    assert selection.notes()[0].startswith(f"series used: {selection.chosen.uid}")


def test_only_a_scout_is_no_usable_series(variants):
    selection = select_series(variants["scout"], min_slices=8)
    assert selection.chosen is None and selection.files == [] and selection.notes()[0] == "no usable CT series"


def test_serve_answers_a_pacs_study_from_its_ctpa_series_naming_the_rest_and_the_corrupt_instance(
    study, variants, serves, tmp_path
):
    uid, files, model = study
    dest = StoreSCP(free_port(), tmp_path / "dest")
    dest.start()
    try:
        spool = tmp_path / "spool"
        node = serves(model, spool, f"dimse:DEST@127.0.0.1:{dest.port}", settle=0.5)
        bad = corrupt(files[4], tmp_path / "corrupt")
        sent = [*files[:4], bad, *files[5:], *variants["scout"], *variants["lung"], *variants["coronal"]]
        assert c_store(node.port, sent) == [0] * len(sent)
        record = wait_for(lambda: answered(spool, uid), 120, "the answer", node.process, node.log)
        got = wait_for(
            lambda: (lambda f: f if len(f) == len(record["results"]) else None)(dest.of_study(uid)),
            60,
            "the results",
            node.process,
            node.log,
        )
        assert record["series"]["used"] == pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
        assert len(record["series"]["not_used"]) == 3 and record["slices"] == len(files) - 1
        bad_sop = pydicom.dcmread(bad, stop_before_pixels=True).SOPInstanceUID
        assert any(bad_sop in line for line in record["lost"])
        got["SR"][0].save_as(tmp_path / "sr.dcm", enforce_file_format=True)
        assert validator_errors(tmp_path / "sr.dcm") == []  # the comments keep the SR valid
        values = read_sr_values(tmp_path / "sr.dcm")
        comments = "\n".join(values["comments"])
        assert (
            f"instance {bad_sop} not used" in comments and "localizer (scout)" in comments and "not axial" in comments
        )
        assert set(values["key_sops"]) <= {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
        assert f"file not used: {bad_sop}.dcm" in node.text()
    finally:
        dest.stop()


def test_serve_reports_a_study_with_only_a_scout_as_such(study, variants, serves, tmp_path):
    uid, _, model = study
    spool = tmp_path / "spool"
    node = serves(model, spool, None, settle=0.3)
    assert c_store(node.port, variants["scout"]) == [0]
    record = wait_for(lambda: answered(spool, uid), 60, "the study to be answered", node.process, node.log)
    assert record["error"].startswith("no usable CT series") and "localizer (scout)" in record["error"]
    assert record["results"] == [] and "answered without a result" in node.text()
