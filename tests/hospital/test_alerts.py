"""Alerts (pedetect.hospital.alerts) sent to real receivers on 127.0.0.1, each started and stopped by
its test: an MLLP receiver from the ``hl7`` package (its asyncio server, in a thread) that ACKs and
keeps what it got; a FHIR endpoint (http.server in a thread) that checks what arrives with
``fhir.resources`` (R4B) and stores it by resource id (no FHIR server installs from PyPI to start in a
test's process); a webhook receiver. The back-off is skipped by passing ``now`` to ``send_pending``."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time

import hl7
import hl7.mllp
import pytest
from pydantic import ValidationError

from helpers.alerts import HTTPReceiver
from pedetect.hospital.alerts import (
    CHALLENGE_RULE,
    NEGATIVE,
    NOT_ASSESSED,
    POSITIVE,
    AlertConfig,
    Alerts,
    alert_key,
    decide,
    fhir_ids,
)
from pedetect.infer.report import StudyResult

STUDY = "1.2.826.0.1.3680043.8.498.111"
BUNDLE = "0123456789abcdef"
PATIENT = {"PatientID": "PID-SECRET-77", "PatientName": "Doe^Jane", "AccessionNumber": "ACC-42"}
LINK = "https://viewer.example/viewer?StudyInstanceUIDs={study}&mode=pe"
POINTS = [{"name": "sensitivity_0.95", "threshold": 0.41, "decision": True}, {"name": "youden", "threshold": 0.7}]
FAR = 1e9  # a `now` past every back-off


def result(
    model=(0.2, 0.62, 0.35), written=None, points=POINTS, error=None, study=STUDY, sides=("right", "left", "right")
):
    written = list(model) if written is None else list(written)
    return StudyResult(
        study_uid=study,
        exam_probabilities={},
        sop_uids=[f"1.2.3.{i}" for i in range(len(model))],
        z=[float(i) for i in range(len(model))],
        slice_probabilities=written,
        model_exam_probabilities={},
        model_slice_probabilities=list(model),
        candidates=[
            {"candidate": k + 1, "side": side, "score": 0.9 - 0.1 * k, "sop": "1.2.3.1", "slice_index": 1}
            for k, side in enumerate(sides)
        ],
        operating_points=[dict(p) for p in points],
        error=error,
    )


def config(*receivers, **extra) -> AlertConfig:
    return AlertConfig.model_validate(
        {"receivers": list(receivers), "retry_first": 0.5, "retry_max": 2.0, "link_template": LINK, **extra}
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def logged(caplog) -> str:
    return "\n".join(record.getMessage() for record in caplog.records)


# ------------------------------------------------------------------------------------------ receivers
class MLLPReceiver:
    """The ``hl7`` package's asyncio MLLP server in a thread: ACKs (``ack``, with ``text`` in MSA-3)
    and keeps each message's text."""

    def __init__(self, ack: str = "AA", text: str = ""):
        self.ack, self.text, self.messages = ack, text, []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="mllp-receiver", daemon=True)
        self.thread.start()
        start = hl7.mllp.start_hl7_server(self._handle, host="127.0.0.1", port=0)
        self.server = asyncio.run_coroutine_threadsafe(start, self.loop).result(5)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader, writer):
        try:
            while not writer.is_closing():
                message = await reader.readmessage()
                self.messages.append(str(message))
                ack = message.create_ack(self.ack)
                if self.text:
                    ack.segment("MSA").assign_field(self.text, 3)
                writer.writemessage(ack)
                await writer.drain()
        except asyncio.IncompleteReadError:  # the sender closed
            pass
        finally:
            writer.close()

    def close(self):
        self.server.close()
        asyncio.run_coroutine_threadsafe(self.server.wait_closed(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def mllp():
    receivers = []

    def start(**kwargs) -> MLLPReceiver:
        receivers.append(MLLPReceiver(**kwargs))
        return receivers[-1]

    yield start
    for receiver in receivers:
        receiver.close()


@pytest.fixture
def http():
    receivers = []

    def start(**kwargs) -> HTTPReceiver:
        receivers.append(HTTPReceiver(**kwargs))
        return receivers[-1]

    yield start
    for receiver in receivers:
        receiver.close()


# ------------------------------------------------------------------------------------------ HL7 v2
def test_hl7_oru_over_mllp_without_patient_fields(mllp, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="pedetect")
    receiver = mllp()
    alerts = Alerts(config({"kind": "hl7", "host": "127.0.0.1", "port": receiver.port}), tmp_path, BUNDLE)
    ids = alerts.notify(result(), PATIENT)
    key = alert_key(STUDY, BUNDLE, POSITIVE)
    assert ids == [f"hl71-{key}"] and [p["id"] for p in alerts.pending()] == ids
    assert alerts.send_pending() == 1 and alerts.pending() == [] and alerts.send_pending(FAR) == 0
    assert len(receiver.messages) == 1
    text = receiver.messages[0]
    message = hl7.parse(text)
    msh = message.segment("MSH")
    assert str(msh(3)) == "PEDETECT" and str(msh(9)) == "ORU^R01^ORU_R01"
    assert str(msh(10)) == key and len(key) <= 20 and str(msh(11)) == "P" and str(msh(12)) == "2.5.1"
    assert message["PID.F3.R1.C1"] == "ACC-42" and message["PID.F3.R1.C5"] == "ACSN"
    assert message["PID.F3.R2.C1"] == STUDY
    assert message["PID.F5.R1.C1"] == "ANONYMOUS" and message["PID.F5.R1.C7"] == "S"  # a pseudonym, no name
    obr = message.segment("OBR")
    assert message["OBR.F3.R1.C1"] == STUDY and message["OBR.F4.R1.C1"] == "CTPA-AI-TRIAGE"
    assert len(str(obr(7))) >= 14 and str(obr(18)) == "ACC-42"
    rows = {str(obx(3)(1)(1)): obx for obx in message.segments("OBX")}
    pe = rows["59282003"]
    assert str(pe(2)) == "CWE" and str(pe(5)(1)(1)) == "52101004" and str(pe(5)(1)(2)) == "Present"
    assert str(pe(8)) == "A" and str(pe(11)) == "P"
    assert str(rows["122157"](2)) == "NM" and float(str(rows["122157"](5))) == pytest.approx(0.62)
    assert str(rows["OPERATING-POINT"](5)) == "sensitivity_0.95"
    assert float(str(rows["THRESHOLD"](5))) == pytest.approx(0.41)
    assert str(rows["SIDES"](5)) == "right (2), left (1)"
    link = rows["STUDY-LINK"]
    assert str(link(2)) == "RP"
    assert message.unescape(str(link(5)(1)(1))) == f"https://viewer.example/viewer?StudyInstanceUIDs={STUDY}&mode=pe"
    assert "0.41" in str(rows["DECISION-RULE"](5)) and BUNDLE in str(rows["ALGORITHM"](5))
    for private in ("Doe", "Jane", "PID-SECRET-77"):
        assert private not in text and private not in logged(caplog)
        assert all(private not in p.read_text() for p in tmp_path.rglob("*.json"))
    assert STUDY in logged(caplog) and (tmp_path / "sent" / f"{ids[0]}.json").exists()
    assert alerts.notify(result(), PATIENT) == []  # delivered already: not queued again


def test_hl7_patient_fields_when_configured_and_never_logged(mllp, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="pedetect")
    receiver = mllp(ack="AE", text="unknown patient Doe^Jane PID-SECRET-77")
    alerts = Alerts(
        config({"kind": "hl7", "url": f"mllp://127.0.0.1:{receiver.port}", "patient_fields": True}), tmp_path, BUNDLE
    )
    (id,) = alerts.notify(result(), PATIENT)
    assert alerts.send_pending() == 0  # AE: kept
    (waiting,) = alerts.pending()
    assert waiting["attempts"] == 1 and waiting["last_error"].startswith("ACK AE: unknown patient ***")
    message = hl7.parse(receiver.messages[0])
    assert message["PID.F5.R1.C1"] == "Doe" and message["PID.F5.R1.C2"] == "Jane"
    assert message["PID.F3.R1.C1"] == "PID-SECRET-77" and message["PID.F3.R1.C5"] == "MR"
    assert "ACK AE" in logged(caplog)
    for private in ("Doe", "Jane", "PID-SECRET-77"):
        assert private not in logged(caplog)
    assert (tmp_path / "pending" / f"{id}.json").stat().st_mode & 0o077 == 0  # holds the name: this user's only


@pytest.mark.parametrize("code", ["AE", "AR"])
def test_hl7_error_ack_keeps_it_queued_then_delivers_once(mllp, tmp_path, caplog, code):
    caplog.set_level(logging.INFO, logger="pedetect")
    receiver = mllp(ack=code, text="no such order")
    alerts = Alerts(config({"kind": "hl7", "host": "127.0.0.1", "port": receiver.port}), tmp_path, BUNDLE)
    (id,) = alerts.notify(result(), PATIENT)
    now = time.monotonic()
    assert alerts.send_pending(now) == 0
    assert f"ACK {code}: no such order" in logged(caplog) and id in logged(caplog)
    assert alerts.send_pending(now + 0.1) == 0 and len(receiver.messages) == 1  # back-off: not yet
    receiver.ack, receiver.text = "AA", ""
    assert alerts.send_pending(now + 1) == 1 and alerts.pending() == []
    assert alerts.send_pending(FAR) == 0 and len(receiver.messages) == 2
    assert len({str(hl7.parse(m).segment("MSH")(10)) for m in receiver.messages}) == 1  # the same control id


# ------------------------------------------------------------------------------------------ FHIR
def test_fhir_transaction_checked_and_idempotent(http, tmp_path):
    server = http(fhir=True)
    receivers = [{"kind": "fhir", "url": server.url}]
    alerts = Alerts(config(*receivers), tmp_path / "a", BUNDLE)
    (id,) = alerts.notify(result(), PATIENT)
    assert alerts.send_pending() == 1
    report_id, observation_id = fhir_ids(alert_key(STUDY, BUNDLE, POSITIVE))
    assert set(server.stored) == {f"DiagnosticReport/{report_id}", f"Observation/{observation_id}"}
    observation = server.stored[f"Observation/{observation_id}"]
    assert observation["code"]["coding"][0] == {
        "system": "http://snomed.info/sct",
        "code": "59282003",
        "display": "Pulmonary embolism",
    }
    assert observation["valueCodeableConcept"]["coding"][0]["code"] == "52101004"
    assert observation["status"] == "preliminary" and "subject" not in observation
    components = {c["code"]["coding"][0]["code"]: c for c in observation["component"]}
    assert components["122157"]["valueQuantity"]["value"] == pytest.approx(0.62)
    assert components["OPERATING-POINT"]["valueString"] == "sensitivity_0.95"
    assert components["SIDES"]["valueString"] == "right (2), left (1)"
    report = server.stored[f"DiagnosticReport/{report_id}"]
    assert report["result"] == [{"reference": f"Observation/{observation_id}"}]
    assert report["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{STUDY}"
    assert report["basedOn"][0]["identifier"]["value"] == "ACC-42"
    assert report["presentedForm"][0]["url"].startswith("https://viewer.example/viewer?StudyInstanceUIDs=")
    assert "Doe" not in json.dumps(server.posts) and "PID-SECRET" not in json.dumps(server.posts)
    # another node (another spool) with the same bundle: the same resources, updated in place
    again = Alerts(config(*receivers), tmp_path / "b", BUNDLE)
    assert again.notify(result(), PATIENT) == [id] and again.send_pending() == 1
    assert len(server.posts) == 2 and len(server.stored) == 2


def test_fhir_http_500_keeps_it_queued_with_the_reason(http, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pedetect")
    server = http(fhir=True)
    server.status = 500
    alerts = Alerts(config({"kind": "fhir", "url": server.url, "patient_fields": True}), tmp_path, BUNDLE)
    alerts.notify(result(), PATIENT)
    assert alerts.send_pending() == 0 and server.stored == {}
    assert "HTTP 500: database is locked" in logged(caplog)
    assert alerts.pending()[0]["last_error"] == "HTTP 500: database is locked"
    server.status = 200
    assert alerts.send_pending(FAR) == 1 and alerts.pending() == []
    observation = next(r for k, r in server.stored.items() if k.startswith("Observation/"))
    assert observation["subject"]["identifier"]["value"] == "PID-SECRET-77"  # configured
    assert observation["subject"]["display"] == "Doe Jane"
    assert "Doe" not in logged(caplog)


# ------------------------------------------------------------------------------------------ webhook
def test_webhook_document_and_idempotency_key(http, tmp_path):
    server = http()
    alerts = Alerts(
        config({"kind": "webhook", "url": server.url, "headers": {"Authorization": "Bearer t"}}), tmp_path, BUNDLE
    )
    (id,) = alerts.notify(result(), PATIENT)
    assert alerts.send_pending() == 1
    ((headers, document),) = server.posts
    assert headers["Idempotency-Key"] == id and headers["Authorization"] == "Bearer t"
    assert document["study"] == STUDY and document["decision"] == POSITIVE
    assert document["pe_probability"] == pytest.approx(0.62) and document["accession"] == "ACC-42"
    assert (
        document["operating_point"]["name"] == "sensitivity_0.95" and document["operating_point"]["source"] == "bundle"
    )
    assert document["sides"] == ["right", "left"] and len(document["candidates"]) == 3
    assert document["link"] == f"https://viewer.example/viewer?StudyInstanceUIDs={STUDY}&mode=pe"
    assert document["bundle"] == BUNDLE and document["pedetect_version"] and "patient" not in document


def test_receiver_down_then_up_is_delivered_once(http, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pedetect")
    port = free_port()
    url = f"http://127.0.0.1:{port}/hooks/T0-SECRET?token=S3CRET"  # a webhook's secret in its URL: never logged
    alerts = Alerts(config({"kind": "webhook", "url": url, "timeout": 2}), tmp_path, BUNDLE)
    alerts.notify(result(), PATIENT)
    now = time.monotonic()
    assert alerts.send_pending(now) == 0 and "ConnectionError" in logged(caplog)
    assert "SECRET" not in logged(caplog) and "S3CRET" not in logged(caplog)
    server = http(port=port)  # the receiver comes up
    assert alerts.send_pending(now + 0.1) == 0  # not due yet
    assert alerts.send_pending(now + 1) == 1 and alerts.send_pending(FAR) == 0 and len(server.posts) == 1


def test_restart_sends_what_is_pending_once(http, tmp_path):
    port = free_port()
    receivers = [{"kind": "webhook", "url": f"http://127.0.0.1:{port}/hook", "timeout": 2}]
    first = Alerts(config(*receivers), tmp_path, BUNDLE)
    (id,) = first.notify(result(), PATIENT)
    assert first.send_pending() == 0  # down: the node is then killed
    del first
    server = http(port=port)
    second = Alerts(config(*receivers), tmp_path, BUNDLE)  # restarted on the same spool
    assert [p["id"] for p in second.pending()] == [id]
    stop = threading.Event()
    thread = threading.Thread(target=second.run, args=(stop,), kwargs={"poll": 0.05}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.posts and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # a few more passes: nothing sent twice
    stop.set()
    thread.join(5)
    assert not thread.is_alive() and len(server.posts) == 1 and second.pending() == []
    assert second.notify(result(), PATIENT) == []  # the same study, bundle and decision: delivered already


# ------------------------------------------------------------------------------------------ ids and rules
def test_idempotent_ids(tmp_path):
    receivers = [{"kind": "webhook", "url": "http://127.0.0.1:9/hook"}, {"kind": "fhir", "url": "http://127.0.0.1:9/f"}]
    one = Alerts(config(*receivers), tmp_path / "one", BUNDLE).notify(result(), PATIENT)
    two = Alerts(config(*receivers), tmp_path / "two", BUNDLE).notify(result(), PATIENT)
    assert one == two and len(set(one)) == 2
    other_bundle = Alerts(config(*receivers), tmp_path / "three", "fedcba9876543210").notify(result(), PATIENT)
    other_decision = Alerts(config(*receivers), tmp_path / "four", BUNDLE).notify(result(model=(0.1, 0.2)), PATIENT)
    assert not set(one) & set(other_bundle) and not set(one) & set(other_decision)
    assert (
        alert_key(STUDY, BUNDLE, POSITIVE) == alert_key(STUDY, BUNDLE, POSITIVE) != alert_key(STUDY, BUNDLE, NEGATIVE)
    )


def test_threshold_rules():
    found = decide(result(), config())
    assert (found.word, found.point, found.source) == (POSITIVE, "sensitivity_0.95", "bundle")
    youden = decide(result(), config(operating_point="youden"))
    assert (youden.word, youden.threshold) == (NEGATIVE, 0.7) and "youden" in youden.rule
    given = decide(result(), config(threshold=0.65, operating_point="triage"))
    assert (given.word, given.point, given.source) == (NEGATIVE, "triage", "config")
    # no operating point anywhere: the decision after the label rules, stated (the model says 0.62,
    # the repaired values are below 0.5: negative), never a silent 0.5 on the model's value
    rule = decide(result(written=(0.2, 0.45, 0.3), points=[]), config())
    assert (rule.word, rule.point, rule.source) == (NEGATIVE, CHALLENGE_RULE, "label rules")
    assert rule.rule.startswith("decision: challenge rule 0.5") and "label rules" in rule.rule
    missing = decide(result(), config(operating_point="nope"))
    assert missing.point == CHALLENGE_RULE and "'nope' not in the bundle" in missing.rule
    assert decide(result(error="no readable slice"), config()).word == NOT_ASSESSED


def test_operating_point_checked_against_the_bundle(tmp_path):
    record = {"version": 1, "studies": 10, "positives": 5, "points": POINTS}
    with pytest.raises(ValueError, match="'nope' is not in the bundle.*sensitivity_0.95, youden"):
        Alerts(config(operating_point="nope"), tmp_path, BUNDLE, operating_points=record)
    alerts = Alerts(config(operating_point="youden"), tmp_path, BUNDLE, operating_points=record)
    assert "youden" in alerts.rule()


def test_positive_only_and_not_assessed(http, tmp_path):
    server, fhir = http(), http(fhir=True)
    alerts = Alerts(
        config(
            {"kind": "webhook", "url": server.url, "positive_only": True, "name": "pager"},
            {"kind": "fhir", "url": fhir.url, "name": "ehr"},
        ),
        tmp_path,
        BUNDLE,
    )
    negative = alerts.notify(result(model=(0.1, 0.3), study="1.2.3.9"))
    assert [i.split("-")[0] for i in negative] == ["ehr"]
    failed = alerts.notify(result(model=(), error="no readable slice", study="1.2.3.10", sides=()))
    assert [i.split("-")[0] for i in failed] == ["ehr"]
    positive = alerts.notify(result(study="1.2.3.11"))
    assert sorted(i.split("-")[0] for i in positive) == ["ehr", "pager"]
    assert alerts.send_pending() == 4 and len(server.posts) == 1 and len(fhir.posts) == 3
    unread = next(r for r in fhir.stored.values() if r.get("dataAbsentReason"))
    assert unread["dataAbsentReason"]["coding"][0]["code"] == "error" and "valueCodeableConcept" not in unread


def test_config_yaml(tmp_path):
    path = tmp_path / "alerts.yaml"
    path.write_text(
        """
alerts:
  operating_point: sensitivity_0.95
  link_template: "https://viewer.example/viewer?StudyInstanceUIDs={study}"
  receivers:
    - {kind: hl7, url: "mllp://ris.example:2575", receiving_application: RIS, positive_only: true}
    - {kind: fhir, url: "https://fhir.example/r4", headers: {Authorization: "Bearer x"}}
    - {kind: webhook, name: teams, url: "https://hooks.example/pe", timeout: 5}
"""
    )
    loaded = AlertConfig.from_yaml(path)
    assert [r.name for r in loaded.receivers] == ["hl71", "fhir2", "teams"]
    assert (loaded.receivers[0].host, loaded.receivers[0].port) == ("ris.example", 2575)
    for bad in (
        {"receivers": [{"kind": "hl7", "host": "x"}]},  # no port
        {"receivers": [{"kind": "webhook", "url": "ftp://x"}]},
        {
            "receivers": [
                {"kind": "fhir", "url": "http://a", "name": "x"},
                {"kind": "webhook", "url": "http://b", "name": "x"},
            ]
        },
        {"receivers": [], "threshold": 1.5},
        {"receivers": [{"kind": "sms", "url": "http://a"}]},
    ):
        with pytest.raises(ValidationError):
            AlertConfig.model_validate(bad)


def test_study_fields_read_patient_fields_only_when_configured(tmp_path):
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID = "1.2.840.10008.5.1.4.1.1.2", generate_uid(), STUDY
    ds.PatientName, ds.PatientID, ds.AccessionNumber = "Doe^Jane", "PID-SECRET-77", "ACC-42"
    path = tmp_path / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    hook = {"kind": "webhook", "url": "http://127.0.0.1:9/hook"}
    assert Alerts(config(hook), tmp_path / "a").study_fields(path) == {"AccessionNumber": "ACC-42"}
    fields = Alerts(config({**hook, "patient_fields": True}), tmp_path / "b").study_fields(path)
    assert fields == {"AccessionNumber": "ACC-42", "PatientID": "PID-SECRET-77", "PatientName": "Doe^Jane"}
    assert Alerts(config(hook), tmp_path / "c").study_fields(tmp_path / "missing.dcm") == {}
