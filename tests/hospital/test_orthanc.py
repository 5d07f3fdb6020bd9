"""The hospital loop against a real PACS: Orthanc (Debian packages orthanc, orthanc-dicomweb) on
loopback ports with a temporary configuration and storage, stopped by its pid.

A synthetic study is stored in Orthanc; Orthanc sends it (C-STORE, its REST "store to modality")
to ``pedetect serve``; the SR, SC and KOS then appear in Orthanc's DICOMweb for that study (STOW-RS
or C-STORE back) with the values ``pedetect predict --dicom-out`` gives for the same study.
"""

from __future__ import annotations

import time

import pydicom
import pytest

from helpers.orthanc import Orthanc
from helpers.serve import c_store, free_port, wait_for
from pedetect.hospital.answer import DicomAnswer
from pedetect.hospital.serve import answered
from pedetect.hospital.sr_read import read_sr_values
from pedetect.infer.predict import predict


@pytest.fixture
def orthancs(tmp_path):
    made: list[Orthanc] = []

    def make(pedetect_port: int, **options) -> Orthanc:
        made.append(Orthanc(tmp_path / f"orthanc{len(made)}", pedetect_port, **options))
        return made[-1]

    yield make
    for server in made:
        server.stop()


def results_in(pacs: Orthanc, study: str, kinds=("SR", "OT", "KO")):
    series = pacs.series_of(study)
    return series if all(kind in series for kind in kinds) else None


def result_kinds(record: dict) -> dict[str, int]:
    """One instance of each result an answered study's record lists: SR, SC (OT) and KOS, and a SEG
    when the study has clot candidates."""
    return {"SR": 1, "OT": 1, "KO": 1} | ({"SEG": 1} if "seg.dcm" in record["results"] else {})


def test_orthanc_routes_a_study_to_serve_and_gets_sr_sc_and_key_images_back(study, serves, orthancs, tmp_path):
    uid, files, model = study
    port = free_port()
    pacs = orthancs(port, route=True)
    pacs.start()
    spool = tmp_path / "spool"
    node = serves(model, spool, f"dicomweb:{pacs.url}/dicom-web", settle=1.0, port=port)
    for path in files:  # the study stored in the PACS, which routes it (Lua, OnStableSeries) to pedetect
        pacs.post("/instances", path.read_bytes(), "application/dicom")
    record = wait_for(lambda: answered(spool, uid), 120, "the study to be answered", node.process, node.log)
    kinds = result_kinds(record)
    series = wait_for(
        lambda: results_in(pacs, uid, kinds), 120, "the SR, SC and KOS in Orthanc", node.process, node.log
    )
    stored_at = time.time()
    latency = stored_at - record["last_received"]
    print(
        f"\nlast instance received → SR, SC and KOS in Orthanc's DICOMweb: {latency:.2f} s (settle 1.0 s, "
        f"prediction {record['seconds']:.2f} s, {len(files)} slices)"
    )

    # The same values as pedetect predict --dicom-out on the same study.
    predict(
        files[0].parent,
        [model],
        tmp_path / "sub.csv",
        on_prediction=DicomAnswer(tmp_path / "dicom", echo=lambda m: None),
        device="cpu",
        progress=False,
        echo=lambda m: None,
    )
    expected = read_sr_values(tmp_path / "dicom" / uid / "sr.dcm")
    (sr,) = pacs.retrieve(uid, series["SR"][0])
    sr.save_as(tmp_path / "from_orthanc_sr.dcm", enforce_file_format=True)
    got = read_sr_values(tmp_path / "from_orthanc_sr.dcm")
    assert got["key_sops"] == expected["key_sops"] and got["algorithm"] == expected["algorithm"]
    for tracking, finding in expected["findings"].items():
        assert got["findings"][tracking]["present"] == finding["present"]
        assert got["findings"][tracking]["probability"] == pytest.approx(finding["probability"], abs=1e-5)
    (ko,) = pacs.retrieve(uid, series["KO"][0])
    referenced = [
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in ko.ContentSequence
        if item.ValueType == "IMAGE"
    ]
    assert referenced == expected["key_sops"]
    (sc,) = pacs.retrieve(uid, series["OT"][0])
    assert sc.SamplesPerPixel == 3 and sc.pixel_array.std() > 0
    assert sc.PatientID == sr.PatientID == pydicom.dcmread(files[0], stop_before_pixels=True).PatientID
    # One answer: three new series, one instance each.
    assert {kind: len(uids) for kind, uids in series.items()} == {"CT": 1} | kinds


def test_results_wait_for_a_pacs_that_is_down_and_arrive_by_c_store_when_it_returns(study, serves, orthancs, tmp_path):
    uid, files, model = study
    port = free_port()
    pacs = orthancs(port)  # configured, not started: the destination is down
    spool = tmp_path / "spool"
    node = serves(model, spool, f"dimse:ORTHANC@127.0.0.1:{pacs.dicom}", settle=0.3, port=port)
    assert c_store(node.port, files) == [0] * len(files)
    record = wait_for(lambda: answered(spool, uid), 120, "the study to be answered", node.process, node.log)
    kinds = result_kinds(record)
    wait_for(lambda: "delivery of study" in node.text(), 30, "a failed delivery", node.process, node.log)
    assert len(list((spool / "outbox").rglob("*.dcm"))) == len(record["results"])
    pacs.start()
    series = wait_for(
        lambda: results_in(pacs, uid, kinds), 60, "the results in Orthanc after it returned", node.process, node.log
    )
    assert {kind: len(uids) for kind, uids in series.items()} == kinds
    wait_for(lambda: not list((spool / "outbox").rglob("*.dcm")), 10, "the outbox to empty", node.process, node.log)


def test_predict_dicomweb_retrieves_from_orthanc_chooses_the_series_and_stores_the_results_back(
    study, orthancs, tmp_path, cli
):
    uid, files, model = study
    pacs = orthancs(free_port())
    pacs.start()
    scout = tmp_path / "scout.dcm"
    ds = pydicom.dcmread(files[0])
    ds.SeriesInstanceUID, ds.ImageType = pydicom.uid.generate_uid(), ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(scout, enforce_file_format=True)
    for path in [*files, scout]:
        pacs.post("/instances", path.read_bytes(), "application/dicom")
    date = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyDate)
    result = cli(
        "predict",
        "--dicomweb",
        f"{pacs.url}/dicom-web",
        "--qido",
        f"StudyDate={date}-{date}",
        "--model",
        model,
        "--out",
        tmp_path / "sub.csv",
        "--dicom-out",
        tmp_path / "dicom",
        "--destination",
        f"dicomweb:{pacs.url}/dicom-web",
        "--min-slices",
        8,
        "--device",
        "cpu",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    assert "localizer (scout)" in result.output and "results stored" in result.output
    written_files = sorted(p.name for p in (tmp_path / "dicom" / uid).glob("*.dcm"))
    kinds = result_kinds({"results": written_files})
    series = wait_for(lambda: results_in(pacs, uid, kinds), 10, "the results in Orthanc")
    assert {kind: len(uids) for kind, uids in series.items()} == {"CT": 2} | kinds
    (sr,) = pacs.retrieve(uid, series["SR"][0])
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    got, written = read_sr_values(tmp_path / "sr.dcm"), read_sr_values(tmp_path / "dicom" / uid / "sr.dcm")
    assert got == written and any("localizer (scout)" in line for line in got["comments"])
    # The same values as predict on the files themselves.
    predict(
        files[0].parent,
        [model],
        tmp_path / "direct.csv",
        on_prediction=DicomAnswer(tmp_path / "direct", echo=lambda m: None),
        device="cpu",
        progress=False,
        echo=lambda m: None,
    )
    direct = read_sr_values(tmp_path / "direct" / uid / "sr.dcm")
    assert got["key_sops"] == direct["key_sops"]
    assert {k: v["present"] for k, v in got["findings"].items()} == {
        k: v["present"] for k, v in direct["findings"].items()
    }
