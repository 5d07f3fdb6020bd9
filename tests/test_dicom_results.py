"""``pedetect predict --dicom-out``: per study a Comprehensive SR (TID 1500), a secondary capture and a
key object selection, valid by dcmtk's dsrdump and dicom3tools' dciodvfy, read back by highdicom to
the values of the report (docs/dicom_results.md).

The bundle has random weights (pedetect.testing): what is checked is the encoding of whatever the
model said, not what it learnt.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from pedetect.hospital.results import (
    LABEL_CODES,
    NOT_DIAGNOSTIC,
    PE_TRACKING,
    PRIVATE_SCHEME,
    TYPE2_PATIENT_STUDY,
    algorithm_of,
    key_slices,
    read_sr_values,
    write_study_results,
)
from pedetect.infer.report import StudyResult
from pedetect.labels import EXAM_LABELS
from pedetect.models.bundle import read_bundle
from pedetect.synth import write_dataset
from pedetect.testing import write_random_bundle
from train_fixtures import tiny_config

N_STUDIES, SLICES, SIZE = 2, 12, 64
VALIDATORS = ("dciodvfy", "dsrdump")


def validator_errors(path: Path) -> list[str]:
    """Errors dciodvfy reports on any object, and dsrdump on SR and KOS documents (warnings allowed)."""
    missing = [tool for tool in VALIDATORS if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed (Debian packages dicom3tools, dcmtk; .ci/run installs them)")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    errors = [f"dciodvfy: {line}" for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
    if pydicom.dcmread(path, stop_before_pixels=True).Modality in ("SR", "KO"):
        run = subprocess.run(["dsrdump", "-Ee", str(path)], capture_output=True, text=True, timeout=60)
        errors += [
            f"dsrdump: {line}" for line in (run.stdout + run.stderr).splitlines() if line.startswith(("E:", "F:"))
        ]
        errors += [f"dsrdump exit {run.returncode}"] if run.returncode else []
    return errors


def report_result(report: Path, study: str) -> StudyResult:
    record = json.loads((report / f"{study}.json").read_text())
    names = {f.name for f in dataclasses.fields(StudyResult)}
    return StudyResult(**{k: v for k, v in record.items() if k in names})


@pytest.fixture(scope="module")
def predicted(tmp_path_factory, cli_module):
    root = tmp_path_factory.mktemp("dicom_results")
    labels = write_dataset(root / "data", N_STUDIES, slices=SLICES, size=SIZE, seed=5, split="test", progress=False)
    model = write_random_bundle(tiny_config(), root / "model", folds=2)
    result = cli_module(
        "predict",
        root / "data" / "test",
        "--model",
        model,
        "--out",
        root / "sub.csv",
        "--report",
        root / "report",
        "--dicom-out",
        root / "dicom",
        "--device",
        "cpu",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    return root, labels, model


@pytest.fixture(scope="module")
def cli_module():
    from typer.testing import CliRunner

    from pedetect.cli import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def studies(labels):
    return list(dict.fromkeys(labels["StudyInstanceUID"]))


def test_every_study_gets_an_sr_a_secondary_capture_and_key_images_that_validate(predicted):
    root, labels, _ = predicted
    for study in studies(labels):
        folder = root / "dicom" / study
        assert sorted(p.name for p in folder.iterdir()) == ["ko.dcm", "sc.dcm", "sr.dcm"]
        for path in folder.iterdir():
            assert validator_errors(path) == [], path


def test_the_sr_reads_back_to_the_reports_values(predicted):
    root, labels, model = predicted
    for study in studies(labels):
        result = report_result(root / "report", study)
        values = read_sr_values(root / "dicom" / study / "sr.dcm")
        findings = values["findings"]
        assert list(findings) == [PE_TRACKING, *EXAM_LABELS]
        assert findings[PE_TRACKING]["code"] == ("59282003", "SCT")
        assert findings[PE_TRACKING]["probability"] == pytest.approx(result.pe_probability)
        assert findings[PE_TRACKING]["present"] == result.pe_positive
        for label in EXAM_LABELS:
            assert findings[label]["code"] == (LABEL_CODES[label][0], PRIVATE_SCHEME)
            assert findings[label]["probability"] == pytest.approx(result.model_exam_probabilities[label])
            assert findings[label]["present"] == (result.exam_probabilities[label] > 0.5)
        # Key slices: the three most suspicious and every slice written above 0.5, in position order.
        key = key_slices(result)
        assert values["key_sops"] == [result.sop_uids[i] for i in key]
        above = {result.sop_uids[i] for i, p in enumerate(result.slice_probabilities) if p > 0.5}
        assert above <= set(values["key_sops"]) and len(values["key_sops"]) >= min(3, len(result.sop_uids))
        assert values["algorithm"]["name"] == "pedetect"
        assert values["algorithm"]["parameters"] == list(algorithm_of([read_bundle(model)]).bundles)


def test_results_copy_the_patient_and_study_and_say_they_are_not_for_diagnosis(predicted):
    root, labels, _ = predicted
    study = studies(labels)[0]
    source = pydicom.dcmread(next((root / "data" / "test" / study).rglob("*.dcm")), stop_before_pixels=True)
    series = set()
    for name in ("sr.dcm", "sc.dcm", "ko.dcm"):
        ds = pydicom.dcmread(root / "dicom" / study / name)
        for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "StudyDate", "AccessionNumber", "StudyID"):
            assert ds.get(keyword) == source.get(keyword), (name, keyword)
        assert "PatientBirthDate" in ds and not ds.PatientBirthDate  # type 2, absent from the source: written empty
        assert NOT_DIAGNOSTIC in ds.SeriesDescription
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        series.add(ds.SeriesInstanceUID)
    assert len(series) == 3
    sr = pydicom.dcmread(root / "dicom" / study / "sr.dcm")
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == PRIVATE_SCHEME
    ko = pydicom.dcmread(root / "dicom" / study / "ko.dcm")
    images = [
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in ko.ContentSequence
        if item.ValueType == "IMAGE"
    ]
    assert images == read_sr_values(root / "dicom" / study / "sr.dcm")["key_sops"]  # the key slices, as images
    sc = pydicom.dcmread(root / "dicom" / study / "sc.dcm")
    assert sc.SamplesPerPixel == 3 and sc.pixel_array.shape[2] == 3 and sc.pixel_array.std() > 0


def test_a_source_missing_type2_attributes_still_gets_a_valid_result_with_the_same_uids(predicted, tmp_path):
    root, labels, model = predicted
    study = studies(labels)[1]
    sources = {}
    for path in (root / "data" / "test" / study).rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        for keyword in TYPE2_PATIENT_STUDY:
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(tmp_path / path.name)
        sources[ds.SOPInstanceUID] = str(tmp_path / path.name)
    result = report_result(root / "report", study)
    written = write_study_results(
        result, sources, root / "report" / f"{study}.png", algorithm_of([read_bundle(model)]), tmp_path / "out"
    )
    for path in written.files:
        assert validator_errors(path) == [], path
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert all(keyword in ds and not ds[keyword].value for keyword in TYPE2_PATIENT_STUDY)
        # The same study, model and slices give the same instance: a re-sent result replaces, never doubles.
        assert (
            ds.SOPInstanceUID
            == pydicom.dcmread(root / "dicom" / study / path.name, stop_before_pixels=True).SOPInstanceUID
        )


def test_dicom_out_without_report_writes_no_report(predicted, tmp_path, cli_module):
    root, labels, model = predicted
    result = cli_module(
        "predict",
        root / "data" / "test",
        "--model",
        model,
        "--out",
        tmp_path / "sub.csv",
        "--dicom-out",
        tmp_path / "dicom",
        "--device",
        "cpu",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dicom", "sub.csv"]
    assert {p.name for p in (tmp_path / "dicom").iterdir()} == set(studies(labels))


def test_nothing_but_the_patient_and_study_modules_comes_from_the_source(predicted, tmp_path):
    """The source's equipment, series and acquisition attributes (InstitutionName, StationName, …) are
    not copied: highdicom would put the equipment into ContributingEquipmentSequence."""
    root, labels, model = predicted
    study = studies(labels)[0]
    canaries = {
        "InstitutionName": "QXCANARY INSTITUTE",
        "InstitutionAddress": "QXCANARY STREET",
        "StationName": "QXCANARYST",
        "InstitutionalDepartmentName": "QXCANARY DEPT",
        "DeviceSerialNumber": "QXCANARY42",
        "OperatorsName": "QXCANARY^OP",
        "PerformingPhysicianName": "QXCANARY^DR",
        "Manufacturer": "QXCANARY SCANNERS",
        "PatientComments": "kept: patient module",
    }
    sources = {}
    for path in (root / "data" / "test" / study).rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        for keyword, value in canaries.items():
            setattr(ds, keyword, value)
        ds.save_as(tmp_path / path.name)
        sources[ds.SOPInstanceUID] = str(tmp_path / path.name)
    result = report_result(root / "report", study)
    written = write_study_results(
        result, sources, root / "report" / f"{study}.png", algorithm_of([read_bundle(model)]), tmp_path / "out"
    )
    assert len(written.files) == 3
    for path in written.files:
        assert b"QXCANARY" not in path.read_bytes(), path
        assert pydicom.dcmread(path, stop_before_pixels=True).PatientComments == "kept: patient module"
        assert validator_errors(path) == [], path
