"""DICOM results of an Enhanced (multi-frame) CT study: the predictions name a frame's
slice ``<SOPInstanceUID>#<n>``; the SR, the KOS, the SEG and the SC must instead reference the
multi-frame instance by its own SOPInstanceUID and the frame by ReferencedFrameNumber.

The study is made by ``pedetect synth --enhanced`` (seed 4 of the test split: a study whose frames are
stored out of position order, so a frame number is not a slice's place in the series);
the bundle has random weights (pedetect.testing): what is checked is how the key slices are
referenced, not which ones the model chose.
"""

from __future__ import annotations

import re
from pathlib import Path

import pydicom
import pytest

from helpers.results import adapter_inputs, run_adapter, validator_report
from helpers.serve import Serve, c_store, wait_for
from helpers.train import tiny_config
from pedetect.dicom.frames import split_frame_key
from pedetect.hospital.results import key_slices, result_from_report
from pedetect.hospital.serve import answered
from pedetect.hospital.sr_read import read_sr_values
from pedetect.synth import write_dataset
from pedetect.testing import write_random_bundle

SLICES, SIZE, SEED = 12, 64, 4
UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


@pytest.fixture(scope="module")
def enhanced(tmp_path_factory):
    from typer.testing import CliRunner

    from pedetect.cli import app

    root = tmp_path_factory.mktemp("enhanced_results")
    write_dataset(
        root / "data",
        1,
        slices=SLICES,
        size=SIZE,
        seed=SEED,
        split="test",
        progress=False,
        enhanced=True,
        positive_fraction=0.9,
        indeterminate_fraction=0.1,
    )
    (source,) = sorted((root / "data" / "test").rglob("*.dcm"))
    header = pydicom.dcmread(source, stop_before_pixels=True)
    assert int(header.NumberOfFrames) == SLICES
    z = [
        float(item.PlanePositionSequence[0].ImagePositionPatient[2]) for item in header.PerFrameFunctionalGroupsSequence
    ]
    assert z != sorted(z) and z != sorted(z, reverse=True)  # frames out of position order
    model = write_random_bundle(tiny_config(), root / "model", folds=2)
    args = [
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
    ]
    run = CliRunner().invoke(app, [str(a) for a in args])
    assert run.exit_code == 0, run.output
    study = str(header.StudyInstanceUID)
    result = result_from_report(root / "report" / f"{study}.json")
    return root / "dicom" / study, header, result, model, source


def uid_values(ds) -> list[str]:
    """Every UID (VR UI) value anywhere in a dataset, sequences included."""
    found = []
    for element in ds.iterall():
        if element.VR == "UI" and element.value:
            found += [str(v) for v in (element.value if element.VM > 1 else [element.value])]
    return found


def image_references(items) -> list[tuple[str, str, list[int]]]:
    """(SOP class, SOP instance, frames) of every IMAGE content item, depth first."""
    found = []
    for item in items:
        if item.ValueType == "IMAGE":
            ref = item.ReferencedSOPSequence[0]
            frames = ref.get("ReferencedFrameNumber")
            frames = (
                []
                if frames is None
                else [int(f) for f in (frames if ref["ReferencedFrameNumber"].VM > 1 else [frames])]
            )
            found.append((str(ref.ReferencedSOPClassUID), str(ref.ReferencedSOPInstanceUID), frames))
        found += image_references(item.get("ContentSequence", []))
    return found


def key_image_references(sr) -> list[tuple[str, str, list[int]]]:
    """The IMAGE items the PE evaluation (Qualitative Evaluations) is inferred from: the key slices."""
    (evaluations,) = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    # The study-level PE evaluation: the Pulmonary embolism item without concept modifiers (the side
    # labels are Pulmonary embolism items qualified by a finding site).
    (pe,) = [
        i
        for i in evaluations.ContentSequence
        if i.ValueType == "CODE"
        and i.ConceptNameCodeSequence[0].CodeValue == "59282003"
        and not any(c.RelationshipType == "HAS CONCEPT MOD" and c.ValueType == "CODE" for c in i.ContentSequence)
    ]
    return image_references([i for i in pe.ContentSequence if i.ValueType == "IMAGE"])


def key_frames(result) -> list[int]:
    """The frame numbers of the study's key slices, in position order."""
    numbers = []
    for i in key_slices(result):
        numbers.append(split_frame_key(result.sop_uids[i])[1])
    return numbers


def test_the_sr_references_each_key_slice_as_its_instance_and_frame(enhanced):
    folder, header, result, _, _ = enhanced
    sr = pydicom.dcmread(folder / "sr.dcm")
    expected = key_frames(result)
    assert len(expected) >= 3 and all(1 <= f <= SLICES for f in expected)
    refs = key_image_references(sr)
    assert refs == [(header.SOPClassUID, header.SOPInstanceUID, [f]) for f in expected]
    # Every other reference (the Image Library, the candidates' regions) is the instance and one frame too.
    for _, sop, frames in image_references(sr.ContentSequence):
        assert sop == header.SOPInstanceUID and len(frames) == 1 and 1 <= frames[0] <= SLICES
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == header.SeriesInstanceUID
    assert [item.ReferencedSOPInstanceUID for item in evidence.ReferencedSOPSequence] == [header.SOPInstanceUID]  # once
    # Read back, the references give the slices' names in the predictions.
    assert read_sr_values(folder / "sr.dcm")["key_sops"] == [result.sop_uids[i] for i in key_slices(result)]


def test_the_frames_referenced_are_the_key_slices_at_their_positions(enhanced):
    """Frame n of the file is the slice the prediction named ``sop#n``: the same z (the frames are
    stored out of position order, so a mix-up of frame number and position would show)."""
    folder, header, result, _, _ = enhanced
    z_of_frame = {
        n + 1: float(item.PlanePositionSequence[0].ImagePositionPatient[2])
        for n, item in enumerate(header.PerFrameFunctionalGroupsSequence)
    }
    sr = pydicom.dcmread(folder / "sr.dcm")
    frames = [f for _, _, (f,) in key_image_references(sr)]
    assert [z_of_frame[f] for f in frames] == pytest.approx([result.z[i] for i in key_slices(result)])
    assert [p > 0.5 for p in result.slice_probabilities].count(True) <= len(frames)


def test_the_kos_references_the_instance_once_with_its_key_frames(enhanced):
    folder, header, result, _, _ = enhanced
    ko = pydicom.dcmread(folder / "ko.dcm")
    assert image_references(ko.ContentSequence) == [(header.SOPClassUID, header.SOPInstanceUID, key_frames(result))]


def test_every_uid_of_the_results_is_a_valid_uid_and_the_results_validate(enhanced):
    folder, header, _, _, _ = enhanced
    for name in sorted(p.name for p in folder.iterdir()):
        ds = pydicom.dcmread(folder / name)
        values = uid_values(ds)
        assert header.SOPInstanceUID in values or name == "sc.dcm"  # the SC has no image references
        bad = [v for v in values if not (UID.match(v) and len(v) <= 64)]
        assert bad == [], (name, bad)
        assert validator_report(folder / name) == ([], []), name


def test_the_candidates_reference_their_frames_in_the_sr_the_segmentation_and_for_ohif(enhanced, tmp_path):
    """Each candidate's region is on its key frame (the instance and ReferencedFrameNumber); the SEG's
    frames derive from those frames of the instance; OHIF's SR reader finds each on its frame."""
    folder, header, result, _, source = enhanced
    assert result.candidates, "the random bundle's maps give candidates"
    values = read_sr_values(folder / "sr.dcm")
    assert [g["region"]["sop"] for g in values["candidates"]] == [c["sop"] for c in result.candidates]
    seg = pydicom.dcmread(folder / "seg.dcm")
    derived = set()
    for item in seg.PerFrameFunctionalGroupsSequence:
        ref = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == header.SOPInstanceUID
        derived.add(int(ref.ReferencedFrameNumber))
    assert derived == {split_frame_key(c["sop"])[1] for c in result.candidates}
    images, expected = adapter_inputs(result, {header.SOPInstanceUID: source}, values)
    report = run_adapter(folder / "sr.dcm", images, expected, tmp_path)
    assert len(report["found"]) == len(result.candidates)


def test_serve_answers_an_enhanced_study_with_frame_references(enhanced, tmp_path):
    """The node counts an Enhanced CT file's frames as slices (series selection) and answers it."""
    _, header, _, model, source = enhanced
    spool = tmp_path / "spool"
    node = Serve(Path(model), spool, None, settle=0.3)
    try:
        assert c_store(node.port, [source]) == [0]
        record = wait_for(
            lambda: answered(spool, header.StudyInstanceUID), 120, "the study to be answered", node.process, node.log
        )
    finally:
        node.stop()
    assert record["slices"] == SLICES and record["lost"] == [], record
    assert record["series"]["used"] == header.SeriesInstanceUID
    assert sorted(record["results"]) == ["ko.dcm", "sc.dcm", "seg.dcm", "sr.dcm"]
    (sr_path,) = list((spool / "outbox").rglob("sr.dcm"))
    sr = pydicom.dcmread(sr_path)
    refs = image_references(sr.ContentSequence)
    assert refs and all(
        sop == header.SOPInstanceUID and len(frames) == 1 and 1 <= frames[0] <= SLICES for _, sop, frames in refs
    )
