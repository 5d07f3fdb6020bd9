"""``pedetect serve`` as a real process on loopback: real pynetdicom associations in and out.

The destination is a C-STORE SCP run by the test (down first, then up: results wait on disk); the
node is killed during a prediction and restarted (the study is answered once). The bundle has random
weights (pedetect.testing); tests/hospital/test_orthanc.py runs the loop against a real PACS.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from helpers.serve import PEDETECT, StoreSCP, c_store, free_port, wait_for
from pedetect.hospital.codes import PE_TRACKING
from pedetect.hospital.serve import answered
from pedetect.hospital.sr_read import read_sr_values


@pytest.fixture
def destination(tmp_path):
    scp = StoreSCP(free_port(), tmp_path / "dest")
    yield scp
    scp.stop()


def non_ct_instance(folder: Path, study: str) -> Path:
    """A Secondary Capture instance in the study (a PACS routes such objects too)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID = SecondaryCaptureImageStorage, generate_uid(), study
    ds.SeriesInstanceUID, ds.Modality = generate_uid(), "OT"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    path = folder / "sc.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_serve_answers_a_study_and_delivers_when_the_destination_comes_back(study, serves, destination, tmp_path):
    uid, files, model = study
    spool = tmp_path / "spool"
    node = serves(model, spool, f"dimse:DEST@127.0.0.1:{destination.port}")  # the destination is down
    # A non-CT instance, the study, and one instance sent twice.
    statuses = c_store(node.port, [non_ct_instance(tmp_path, uid), *files, files[3]])
    assert statuses == [0] * (len(files) + 2)
    assert len(list((spool / "incoming").rglob("*.dcm"))) == len(files)  # the non-CT one not kept, the twice-sent once
    record = wait_for(lambda: answered(spool, uid), 120, "the study to be answered", node.process, node.log)
    # The SR, SC and KOS, and a SEG when the study has clot candidates.
    results = sorted(record["results"])
    assert record["slices"] == len(files) and record["lost"] == []
    assert set(results) - {"seg.dcm"} == {"ko.dcm", "sc.dcm", "sr.dcm"}
    kinds = ["KO", "OT", "SR"] + (["SEG"] if "seg.dcm" in results else [])
    wait_for(lambda: "delivery of study" in node.text(), 30, "a failed delivery", node.process, node.log)
    assert len(list((spool / "outbox").rglob("*.dcm"))) == len(results)  # kept on disk while the destination is down
    destination.start()
    got = wait_for(
        lambda: (lambda f: f if len(f) == len(results) else None)(destination.of_study(uid)),
        60,
        "the results at the destination",
        node.process,
        node.log,
    )
    assert sorted(got) == sorted(kinds)
    with destination.lock:
        arrived = [str(ds.Modality) for ds in destination.received if ds.StudyInstanceUID == uid]
    assert arrived[0] == "SR", arrived  # the finding first, then the pictures (names sort it last)
    wait_for(lambda: not list((spool / "outbox").rglob("*.dcm")), 10, "the outbox to empty", node.process, node.log)
    sr_path = destination.folder / f"{got['SR'][0].SOPInstanceUID}.dcm"
    values = read_sr_values(sr_path)
    assert set(values["key_sops"]) <= {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    assert 0.0 <= values["findings"][PE_TRACKING]["probability"] <= 1.0
    log = node.text()
    assert "not a CT image" in log and "received again" in log and f"delivered study {uid}" in log
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert str(source.PatientName) not in log and source.PatientID not in log  # UIDs only


def test_serve_killed_during_a_prediction_answers_the_study_once_after_a_restart(study, serves, destination, tmp_path):
    uid, files, model = study
    spool = tmp_path / "spool"
    destination.start()
    node = serves(model, spool, f"dimse:DEST@127.0.0.1:{destination.port}", settle=0.3)
    assert c_store(node.port, files) == [0] * len(files)
    wait_for(lambda: "predicting study" in node.text(), 60, "the prediction to start", node.process, node.log)
    node.kill()
    assert answered(spool, uid) is None
    again = serves(model, spool, f"dimse:DEST@127.0.0.1:{destination.port}", settle=0.3, port=node.port)
    record = wait_for(lambda: answered(spool, uid), 120, "the answer after the restart", again.process, again.log)
    assert "results" in record, (record, again.text())
    wait_for(
        lambda: len(destination.of_study(uid)) == len(record["results"]),
        120,
        "the results after the restart",
        again.process,
        again.log,
    )
    assert "resuming 1 received study" in again.text()
    time.sleep(1.0)
    received = destination.of_study(uid)
    # Answered once: one result per kind (the same UIDs, had the killed run already sent any).
    kinds = {"KO": 1, "OT": 1, "SR": 1} | ({"SEG": 1} if "seg.dcm" in record["results"] else {})
    assert {kind: len({ds.SOPInstanceUID for ds in items}) for kind, items in received.items()} == kinds


def test_a_second_node_on_the_same_spool_is_refused(study, serves, tmp_path):
    _, _, model = study
    spool = tmp_path / "spool"
    serves(model, spool, None)
    run = subprocess.run(
        [
            PEDETECT,
            "serve",
            "--model",
            str(model),
            "--spool",
            str(spool),
            "--port",
            str(free_port()),
            "--host",
            "127.0.0.1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and "in use by another pedetect run" in run.stderr


def test_bad_destination_is_refused_naming_the_forms(study):
    _, _, model = study
    run = subprocess.run(
        [PEDETECT, "serve", "--model", str(model), "--destination", "pacs.example:104"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and "dimse:AE@host:port" in run.stderr


def test_serve_tells_an_alert_receiver_of_each_answered_study(study, serves, tmp_path):
    """With --alerts, each answered study is POSTed once to a JSON webhook (a real HTTP server on
    loopback): its UID, the decision and probability, and no patient name."""
    from helpers.alerts import HTTPReceiver

    uid, files, model = study
    receiver = HTTPReceiver()
    try:
        alerts = tmp_path / "alerts.yaml"
        alerts.write_text(f"alerts:\n  receivers:\n    - {{kind: webhook, url: '{receiver.url}'}}\n")
        spool = tmp_path / "spool"
        node = serves(model, spool, None, settle=0.3, extra=("--alerts", str(alerts)))
        assert c_store(node.port, files) == [0] * len(files)
        record = wait_for(lambda: answered(spool, uid), 120, "the study to be answered", node.process, node.log)
        assert len(record["alerts"]) == 1
        assert isinstance(record["pe_positive"], bool) and record["operating_points"] == []  # none calibrated
        wait_for(lambda: receiver.posts, 30, "the alert", node.process, node.log)
        time.sleep(1.0)  # nothing more comes
        ((headers, document),) = receiver.posts
        text = json.dumps(document)
        assert uid in text and "probability" in text and headers.get("Idempotency-Key")
        source = pydicom.dcmread(files[0], stop_before_pixels=True)
        assert str(source.PatientName) not in text and str(source.PatientName) not in node.text()
    finally:
        receiver.close()


def test_the_outbox_sends_a_study_once_sealed_and_keeps_what_a_worker_puts_during_a_send(study, destination, tmp_path):
    """A worker (another process) puts a study's results one file at a time: nothing is sent before
    the seal, and a file put and sealed while the earlier ones are being sent stays and is sent next."""
    from dataclasses import dataclass

    from pedetect.hospital.deliver import SEAL, Destination, Outbox, parse_destination

    uid, files, _ = study
    destination.start()
    real = parse_destination(f"dimse:DEST@127.0.0.1:{destination.port}")
    outbox = Outbox(tmp_path / "outbox", None)

    @dataclass(frozen=True)
    class PutDuringSend(Destination):
        def send(self, paths: list[Path]) -> None:
            super().send(paths)
            if not (outbox.root / uid / files[2].name).exists():  # the worker again, once
                outbox.put(uid, files[2])
                outbox.seal(uid)

    outbox.destination = PutDuringSend(**{f: getattr(real, f) for f in ("kind", "ae_title", "host", "port")})
    outbox.put(uid, files[0])
    outbox.put(uid, files[1])
    outbox.deliver_due()
    assert destination.of_study(uid) == {} and outbox.waiting() == {}  # not sealed: not sent
    outbox.seal(uid)
    outbox.deliver_due()
    sent = {ds.SOPInstanceUID for items in destination.of_study(uid).values() for ds in items}
    assert len(sent) == 2
    # The file put during the send is there, sealed anew, and goes with the next pass.
    assert [p.name for p in outbox.waiting()[uid]] == [files[2].name] and (outbox.root / uid / SEAL).exists()
    outbox.deliver_due()
    sent = {ds.SOPInstanceUID for items in destination.of_study(uid).values() for ds in items}
    assert len(sent) == 3 and not (outbox.root / uid).exists()
