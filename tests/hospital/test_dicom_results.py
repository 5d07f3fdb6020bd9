"""``pedetect predict --dicom-out``: per study a Comprehensive SR (TID 1500), a secondary capture, a
key object selection and, when the study has clot candidates, a segmentation; valid by dcmtk's
dsrdump and dicom3tools' dciodvfy, read back to the values of the report, and read by OHIF 3.13.2's
own SR reader (@cornerstonejs/adapters with dcmjs, in node) into one tool state per candidate at the
candidate's coordinates (docs/dicom_results.md).

Two kinds of study: the bundle with random weights (pedetect.testing) through ``pedetect predict``,
which checks the encoding of whatever the model said; and a synthetic positive study whose candidates
are put by hand on its real emboli (the phantom's own masks: outline, point, side, slices), which
checks the content tree against known candidates without training a model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from helpers.results import (
    ALGORITHM,
    PHANTOM_SEED,
    PHANTOM_SIZE,
    adapter_inputs,
    phantom_study,
    run_adapter,
    slice_geometry,
    validator_errors,
    validator_report,
    write_picture,
)
from helpers.train import tiny_config
from pedetect.hospital.codes import FINDING_SITES, LABEL_CONCEPTS, PE_TRACKING, label_key
from pedetect.hospital.identity import NOT_DIAGNOSTIC, TYPE2_PATIENT_STUDY, Algorithm, algorithm_of
from pedetect.hospital.results import key_slices, write_study_results
from pedetect.hospital.seg import candidate_mask
from pedetect.hospital.sr import CS3D_TRACKING, candidate_scoord, labels_summary
from pedetect.hospital.sr_read import read_sr_values
from pedetect.infer.report import StudyResult
from pedetect.labels import EXAM_LABEL_TITLES, EXAM_LABELS
from pedetect.models.bundle import read_bundle
from pedetect.synth import write_dataset
from pedetect.testing import write_random_bundle

N_STUDIES, SLICES, SIZE = 2, 12, 64


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
        candidates = report_result(root / "report", study).candidates
        expected = ["ko.dcm", "sc.dcm", "sr.dcm"] + (["seg.dcm"] if candidates else [])
        assert sorted(p.name for p in folder.iterdir()) == sorted(expected)
        for path in folder.iterdir():
            assert validator_report(path) == ([], []), path


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
            assert findings[label]["code"] == LABEL_CONCEPTS[label][0][:2]
            assert findings[label]["probability"] == pytest.approx(result.model_exam_probabilities[label])
            assert findings[label]["present"] == (result.exam_probabilities[label] > 0.5)
        # Key slices: the three most suspicious and every slice written above 0.5, in position order.
        key = key_slices(result)
        assert values["key_sops"] == [result.sop_uids[i] for i in key]
        above = {result.sop_uids[i] for i, p in enumerate(result.slice_probabilities) if p > 0.5}
        assert above <= set(values["key_sops"]) and len(values["key_sops"]) >= min(3, len(result.sop_uids))
        assert values["algorithm"]["name"] == "pedetect"
        assert values["algorithm"]["parameters"] == list(algorithm_of([read_bundle(model)]).bundles)
        # The model's clot candidates, one measurement group each, in the report's order.
        assert [g["candidate"] for g in values["candidates"]] == [c["candidate"] for c in result.candidates]
        assert [g["probability"] for g in values["candidates"]] == pytest.approx(
            [c["score"] for c in result.candidates]
        )


def test_ohifs_sr_reader_reads_every_candidate_the_model_gave(predicted, tmp_path):
    """The random bundle's candidates (its activation maps' peaks) through OHIF's SR reader in node."""
    root, labels, _ = predicted
    for study in studies(labels):
        result = report_result(root / "report", study)
        sr = root / "dicom" / study / "sr.dcm"
        files = sorted((root / "data" / "test" / study).rglob("*.dcm"))
        sources = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
        images, expected = adapter_inputs(result, sources, read_sr_values(sr))
        work = tmp_path / study
        work.mkdir()
        report = run_adapter(sr, images, expected, work)
        assert len(report["found"]) == len(result.candidates)


def test_results_copy_the_patient_and_study_and_say_they_are_not_for_diagnosis(predicted):
    root, labels, _ = predicted
    study = studies(labels)[0]
    source = pydicom.dcmread(next((root / "data" / "test" / study).rglob("*.dcm")), stop_before_pixels=True)
    series = set()
    names = sorted(p.name for p in (root / "dicom" / study).iterdir())
    for name in names:
        ds = pydicom.dcmread(root / "dicom" / study / name)
        for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "StudyDate", "AccessionNumber", "StudyID"):
            assert ds.get(keyword) == source.get(keyword), (name, keyword)
        assert "PatientBirthDate" in ds and not ds.PatientBirthDate  # type 2, absent from the source: written empty
        assert NOT_DIAGNOSTIC in ds.SeriesDescription
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        series.add(ds.SeriesInstanceUID)
    assert len(series) == len(names)
    sr = pydicom.dcmread(root / "dicom" / study / "sr.dcm")
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
    assert "CodingSchemeIdentificationSequence" not in sr  # standard codes only: nothing private to declare
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
    assert len(written.files) == 3 + (written.seg is not None)
    for path in written.files:
        assert b"QXCANARY" not in path.read_bytes(), path
        assert pydicom.dcmread(path, stop_before_pixels=True).PatientComments == "kept: patient module"
        assert validator_errors(path) == [], path


# ------------------------------------------------------------------ a phantom study with known candidates


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom_results")
    result, sources = phantom_study(root)
    assert len(result.candidates) >= 3, "seed 3's study has emboli"
    written = write_study_results(
        result, sources, write_picture(root / "picture.png"), ALGORITHM, root / "dicom", notes=["series used: test"]
    )
    return root, result, sources, written


@pytest.fixture(scope="module")
def phantom_negative(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom_negative")
    result, sources = phantom_study(root, seed=PHANTOM_SEED + 1, positive=False)
    written = write_study_results(result, sources, write_picture(root / "picture.png"), ALGORITHM, root / "dicom")
    return root, result, sources, written


def test_a_positive_study_gets_an_sr_and_a_segmentation_without_a_validator_error_or_warning(phantom):
    _, result, _, written = phantom
    assert [p.name for p in written.files] == ["sr.dcm", "sc.dcm", "ko.dcm", "seg.dcm"]
    assert written.candidates == len(result.candidates)
    for path in written.files:
        assert validator_report(path) == ([], []), path
    import highdicom as hd

    assert type(hd.sr.srread(written.sr).content).__name__ == "MeasurementReport"  # highdicom parses it as TID 1500


def test_each_candidate_is_a_measurement_group_with_its_place_on_its_key_slice(phantom):
    _, result, sources, written = phantom
    values = read_sr_values(written.sr)
    groups = values["candidates"]
    assert [g["candidate"] for g in groups] == [c["candidate"] for c in result.candidates]
    for group, c in zip(groups, result.candidates):
        key = slice_geometry(sources, c["sop"])
        graphic_type, data = candidate_scoord(c, key["rows"], key["columns"])
        assert graphic_type == "POLYLINE" and len(c["outline"]) >= 3
        # The outline, closed, each vertex (row, col) as (col + 0.5, row + 0.5): DICOM puts the top left
        # pixel's centre at 0.5, 0.5.
        outline = [[col + 0.5, row + 0.5] for row, col in c["outline"]]
        assert np.allclose(data, outline + outline[:1])
        for region in (group["region"], group["probability_region"]):  # the group's and the NUM's: the same
            assert region["graphic_type"] == "POLYLINE" and region["sop"] == c["sop"]
            assert np.allclose(region["graphic_data"], outline + outline[:1], atol=1e-4)
        assert group["finding"] == ("59282003", "SCT", "Pulmonary embolism")
        assert group["finding_site"] == FINDING_SITES[c["side"]]
        assert group["probability"] == pytest.approx(c["score"])
        # The outline's area (mm², the polygon through the vertices), OHIF's freehand tool shows it.
        outline_px = np.array(c["outline"])
        shoelace = 0.5 * abs(
            np.dot(outline_px[:, 1], np.roll(outline_px[:, 0], -1))
            - np.dot(outline_px[:, 0], np.roll(outline_px[:, 1], -1))
        )
        assert group["area"] == pytest.approx(shoelace * key["pixel_spacing"][0] * key["pixel_spacing"][1], abs=1e-3)
        assert group["tracking_id"] == f"{CS3D_TRACKING}:PlanarFreehandROI:PE candidate {c['candidate']}"
        assert (group["slice_first"], group["slice_last"], group["slice_index"]) == (
            c["slice_first"],
            c["slice_last"],
            c["slice_index"],
        )
        assert group["algorithm"] == {
            "name": "pedetect",
            "version": ALGORITHM.version,
            "parameters": list(ALGORITHM.bundles),
        }
    assert len({g["tracking_uid"] for g in groups}) == len(groups)
    # The Image Library lists every slice referenced: the key slices and the candidates', in position order.
    referenced = set(values["key_sops"]) | {c["sop"] for c in result.candidates}
    assert values["library"] == [name for name in result.sop_uids if name in referenced]


def test_a_candidate_without_an_outline_is_a_point(phantom, tmp_path):
    _, result, sources, _ = phantom
    record = dict(result.candidates[0], outline=[[1.0, 2.0], [3.0, 4.0]], candidate=1)
    single = dataclasses.replace(result, candidates=[record])
    written = write_study_results(single, sources, None, ALGORITHM, tmp_path)
    (group,) = read_sr_values(written.sr)["candidates"]
    assert group["region"]["graphic_type"] == "POINT"
    assert np.allclose(group["region"]["graphic_data"], [[record["col"] + 0.5, record["row"] + 0.5]], atol=1e-4)
    assert group["tracking_id"] == f"{CS3D_TRACKING}:Probe:PE candidate 1"
    assert validator_report(written.sr) == ([], [])
    mask = pydicom.dcmread(written.seg).pixel_array
    assert mask.sum() == 9 and mask[int(round(record["row"])), int(round(record["col"]))]  # the point, 3 × 3


def test_the_exam_outputs_are_qualitative_evaluations_with_all_nine_labels(phantom):
    _, result, _, written = phantom
    values = read_sr_values(written.sr)
    assert list(values["findings"]) == [PE_TRACKING, *EXAM_LABELS]
    assert values["findings"][PE_TRACKING] == {
        "code": ("59282003", "SCT"),
        "probability": pytest.approx(result.pe_probability),
        "present": True,
    }
    for label in EXAM_LABELS:
        assert values["findings"][label] == {
            "code": LABEL_CONCEPTS[label][0][:2],
            "probability": pytest.approx(result.model_exam_probabilities[label]),
            "present": result.exam_probabilities[label] > 0.5,
        }
    assert values["key_sops"] == [result.sop_uids[i] for i in key_slices(result)]
    assert values["comments"] == ["series used: test"]
    sr = pydicom.dcmread(written.sr)
    # The labels in words, for viewers that list items by concept name alone (OHIF's text view).
    (evaluations,) = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    (summary,) = [
        i.TextValue for i in evaluations.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121111"
    ]
    assert summary == labels_summary(result)
    for label in EXAM_LABELS:
        decision = "present" if result.exam_probabilities[label] > 0.5 else "absent"
        model = result.model_exam_probabilities[label]
        assert f"{EXAM_LABEL_TITLES[label]}: {decision} (model {model:.2f})" in summary
    # No exam label is a measurement group: every group has its geometry.
    (measurements,) = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    for group in measurements.ContentSequence:
        assert any(item.ValueType == "SCOORD" for item in group.ContentSequence)
    # Every code of the labels is a standard one (PS3.16's SNOMED CT and DCM concepts, as pydicom lists them).
    from pydicom.sr._concepts_dict import concepts

    for concept, modifiers in LABEL_CONCEPTS.values():
        for value, scheme, meaning in (concept, *(code for pair in modifiers for code in pair)):
            known = {m for entries in concepts[scheme].values() for code, (m, _) in entries.items() if code == value}
            assert known, (value, scheme, meaning)
    assert len({label_key(*concept) for concept in LABEL_CONCEPTS.values()}) == len(EXAM_LABELS)


def test_contributing_equipment_names_the_algorithm_as_air_asks(phantom):
    _, _, _, written = phantom
    for path in written.files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        item = ds.ContributingEquipmentSequence[-1]
        purpose = item.PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
            "Newcode1",
            "99IHE",
            "Processing Algorithm",
        )
        assert item.Manufacturer == "pedetect" and item.ManufacturerModelName == "pedetect"
        assert list(item.SoftwareVersions) == [ALGORITHM.version, ALGORITHM.identity]
        assert ds.DeviceUID == ALGORITHM.device_uid
    other = Algorithm(bundles=("another-bundle demo folds=0 sha256:fedcba9876543210",))
    assert other.device_uid != ALGORITHM.device_uid  # a new bundle is a new device


def test_the_segmentation_has_a_segment_per_candidate_on_its_key_slice(phantom):
    _, result, _, written = phantom
    seg = pydicom.dcmread(written.seg)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY" and NOT_DIAGNOSTIC in seg.SeriesDescription
    sr_groups = {g["candidate"]: g for g in read_sr_values(written.sr)["candidates"]}
    assert len(seg.SegmentSequence) == len(result.candidates)
    for segment, c in zip(seg.SegmentSequence, result.candidates):
        assert segment.SegmentLabel == f"PE candidate {c['candidate']}"
        assert segment.TrackingUID == sr_groups[c["candidate"]]["tracking_uid"]  # the SR's group, the same UID
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "55584005"  # Embolus
        site = segment.AnatomicRegionSequence[0]
        assert (site.CodeValue, site.CodingSchemeDesignator, site.CodeMeaning) == FINDING_SITES[c["side"]]
    frames = seg.pixel_array.reshape(-1, PHANTOM_SIZE, PHANTOM_SIZE)
    seen = set()
    for item, frame in zip(seg.PerFrameFunctionalGroupsSequence, frames):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        source = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        c = result.candidates[number - 1]
        assert source == c["sop"]  # the key slice, nothing else
        assert np.array_equal(frame.astype(bool), candidate_mask(c, PHANTOM_SIZE, PHANTOM_SIZE))
        assert frame[int(round(c["row"])), int(round(c["col"]))]  # the point is inside
        rows, cols = np.nonzero(frame)
        outline = np.array(c["outline"])
        assert rows.min() >= outline[:, 0].min() - 1 and rows.max() <= outline[:, 0].max() + 1
        assert cols.min() >= outline[:, 1].min() - 1 and cols.max() <= outline[:, 1].max() + 1
        seen.add(number)
    assert seen == set(range(1, len(result.candidates) + 1))


def test_ohifs_sr_reader_turns_every_group_into_tool_state_at_the_candidates_coordinates(phantom, tmp_path):
    """@cornerstonejs/adapters 5.6.8 and dcmjs 0.52.0 (OHIF 3.13.2's) in node: every measurement group
    is rehydratable and becomes a PlanarFreehandROI whose contour is the candidate's outline, in
    patient coordinates (cornerstone's image coordinates put the first pixel's centre at 0.5, as DICOM)."""
    _, result, sources, written = phantom
    values = read_sr_values(written.sr)
    images, expected = adapter_inputs(result, sources, values)
    report = run_adapter(written.sr, images, expected, tmp_path)
    assert report["groups"] == len(result.candidates) == len(report["found"])
    assert {r["adapter"] for r in report["rehydratable"]} == {"PlanarFreehandROI"}
    for found, c in zip(sorted(report["found"], key=lambda f: f["label"]), result.candidates):
        assert found["label"].startswith(f"PE candidate {c['candidate']}: ")  # the group's comment
        assert found["finding"] == "Pulmonary embolism" and found["findingSites"] == [FINDING_SITES[c["side"]][2]]


def test_ohifs_sr_reader_reads_a_point_as_a_probe(phantom, tmp_path):
    _, result, sources, _ = phantom
    record = dict(result.candidates[1], outline=[], candidate=1)
    single = dataclasses.replace(result, candidates=[record])
    written = write_study_results(single, sources, None, ALGORITHM, tmp_path / "dicom")
    images, expected = adapter_inputs(single, sources, read_sr_values(written.sr))
    report = run_adapter(written.sr, images, expected, tmp_path)
    assert [f["toolName"] for f in report["found"]] == ["Probe"]


def test_a_study_without_candidates_gets_an_sr_without_measurement_groups_and_no_segmentation(phantom_negative):
    _, result, _, written = phantom_negative
    assert result.candidates == [] and not result.pe_positive
    assert written.seg is None and "no clot candidate: no segmentation" in written.notes
    assert [p.name for p in written.files] == ["sr.dcm", "sc.dcm", "ko.dcm"]
    for path in written.files:
        assert validator_report(path) == ([], []), path
    sr = pydicom.dcmread(written.sr)
    concepts = [
        item.ConceptNameCodeSequence[0].CodeValue for item in sr.ContentSequence if item.ValueType == "CONTAINER"
    ]
    assert concepts == ["111028", "C0034375"]  # Image Library, Qualitative Evaluations: no Imaging Measurements
    title = sr.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == (
        "24627-2",
        "LN",
    )  # "CT Chest Report": OHIF shows it as text
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    values = read_sr_values(written.sr)
    assert values["candidates"] == [] and list(values["findings"]) == [PE_TRACKING, *EXAM_LABELS]
    assert values["findings"][PE_TRACKING]["present"] is False
    assert values["findings"]["negative_exam_for_pe"]["present"] is True


def test_the_secondary_capture_has_no_laterality(phantom):
    _, _, _, written = phantom
    assert "Laterality" not in pydicom.dcmread(written.sc, stop_before_pixels=True)
