"""Alerts to the people who act: for each answered study, a notification to each configured receiver
with the decision, the PE probability, the candidates' sides and a link to the study.

Three kinds of receiver (docs/alerts.md has the segment and resource tables):

- ``hl7``: an HL7 v2.5.1 ORU^R01 over MLLP (the ``hl7`` package: message parsing, its MLLP client,
  given a timeout here); the receiver's ACK decides: AA (or CA) accepted, AE/AR (CE/CR) a failure
  with the ACK's text as the reason;
- ``fhir``: a FHIR R4 transaction Bundle (checked with ``fhir.resources.R4B``: R4B's Observation,
  DiagnosticReport and Bundle have the elements written here as R4 has them) of a DiagnosticReport and
  its PE Observation, each PUT with an id derived from the study and the bundle, so a re-send
  updates the same resources and the report and its observation are stored together or not at all;
- ``webhook``: a POST of a small JSON document with an ``Idempotency-Key`` header.

Each notification is one JSON file in ``SPOOL/pending/`` (written atomically, mode 0600) until its
receiver accepted it, retried with exponential back-off; then it is marked in ``SPOOL/sent/`` and
not queued again (the same study, bundle and decision have the same id). A new :class:`Alerts` on the
same folder sends what is pending. Ids: ``<receiver>-<key>``, the key a hash of the study UID, the
bundles' identity and the decision, also the HL7 message control id, the FHIR resources' ids and the
webhook's idempotency key, so a receiver that sees a notification twice can tell.

The decision (:func:`decide`): an operating point of the bundle (``pedetect calibrate``; the one the
configuration names, else the bundle's first) or a threshold given in the configuration, applied to
the model's PE probability (the highest slice's); when neither exists, the decision after the label
rules (the challenge's rule: a slice probability after the label rules' repair above 0.5), and the
alert says so. A study with no readable slice is "not assessed", never "negative".

Privacy: no patient name or ID unless a receiver has ``patient_fields: true``; the accession number
and the study UID identify the study. Logs name UIDs and notification ids only; a receiver's
reason for a failure is logged with any patient field it echoes replaced by ``***``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit

import hl7
import pydicom
import requests
import yaml
from hl7.client import CR, EB, SB, MLLPClient
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pedetect import __version__
from pedetect.io import atomic_path, read_json
from pedetect.metric.rules import THRESHOLD

LOG = logging.getLogger("pedetect.serve.alerts")

PENDING, SENT = "pending", "sent"
SENDING_APPLICATION = "PEDETECT"
HL7_VERSION = "2.5.1"
PSEUDONYM = "ANONYMOUS^^^^^^S"  # PID-5 when the patient's name is not sent
UNVERIFIED = "UNVERIFIED AI result (pedetect): not for diagnostic use"
CHALLENGE_RULE = "challenge rule 0.5"
POSITIVE, NEGATIVE, NOT_ASSESSED = "positive", "negative", "not assessed"
PATIENT_KEYS = ("PatientID", "PatientName", "IssuerOfPatientID")  # copied only for patient_fields receivers
STUDY_KEYS = ("AccessionNumber",)  # always used when the caller gives it

# Codes: (code, meaning, HL7 coding system, FHIR system).
SNOMED, DCM, UCUM = (
    "http://snomed.info/sct",
    "http://dicom.nema.org/resources/ontology/DCM",
    "http://unitsofmeasure.org",
)
LOCAL_SCHEME, LOCAL_SYSTEM = "99PEDETECT", "urn:pedetect:codes"  # the local codes (docs/alerts.md)
ID_SYSTEM = "urn:pedetect:alert"  # the system of the FHIR resources' identifiers (values: the alert key)
PULMONARY_EMBOLISM = ("59282003", "Pulmonary embolism", "SCT", SNOMED)
PRESENT = ("52101004", "Present", "SCT", SNOMED)
ABSENT = ("2667000", "Absent", "SCT", SNOMED)
PROBABILITY = ("122157", "Probability", "DCM", DCM)
NO_UNITS = ("1", "no units", "UCUM", UCUM)
SERVICE = ("CTPA-AI-TRIAGE", "CTPA AI triage for pulmonary embolism", LOCAL_SCHEME, LOCAL_SYSTEM)
OPERATING_POINT = ("OPERATING-POINT", "Operating point", LOCAL_SCHEME, LOCAL_SYSTEM)
THRESHOLD_CODE = ("THRESHOLD", "Decision threshold", LOCAL_SCHEME, LOCAL_SYSTEM)
DECISION_RULE = ("DECISION-RULE", "Decision rule", LOCAL_SCHEME, LOCAL_SYSTEM)
SIDES = ("SIDES", "Candidate sides", LOCAL_SCHEME, LOCAL_SYSTEM)
STUDY_LINK = ("STUDY-LINK", "Study in the viewer", LOCAL_SCHEME, LOCAL_SYSTEM)
ALGORITHM = ("ALGORITHM", "Algorithm", LOCAL_SCHEME, LOCAL_SYSTEM)
NOTE = ("NOTE", "Note", LOCAL_SCHEME, LOCAL_SYSTEM)
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


class AlertError(Exception):
    """A receiver did not accept a notification (the message says why)."""


# ------------------------------------------------------------------------------------------ config
class Receiver(BaseModel):
    """One receiver. ``hl7``: ``host`` and ``port`` (or ``url: mllp://host:port``); ``fhir``: ``url``,
    the FHIR base; ``webhook``: ``url``."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["hl7", "fhir", "webhook"]
    name: str | None = None  # in ids, file names and logs; default <kind><position from 1>
    url: str | None = None
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    positive_only: bool = False  # only positive decisions (and not "not assessed" ones)
    patient_fields: bool = False  # PatientID/PatientName copied from the study's header
    link_template: str | None = None  # e.g. https://viewer.example/viewer?StudyInstanceUIDs={study}
    timeout: float = Field(default=10.0, gt=0, le=300)  # seconds, connection and answer
    headers: dict[str, str] = Field(default_factory=dict)  # fhir/webhook: extra HTTP headers (Authorization)
    receiving_application: str = ""  # hl7: MSH-5
    receiving_facility: str = ""  # hl7: MSH-6

    @field_validator("name")
    @classmethod
    def _name(cls, value):
        if value is not None and not _NAME.match(value):
            raise ValueError(f"receiver name {value!r}: letters, digits, '-' and '_' only (at most 40)")
        return value

    @model_validator(mode="after")
    def _address(self):
        if self.kind == "hl7":
            if self.url:
                parts = urlsplit(self.url)
                if parts.scheme != "mllp" or not parts.hostname or not parts.port:
                    raise ValueError(f"hl7 receiver url {self.url!r}: expected mllp://host:port")
                self.host, self.port = parts.hostname, parts.port
            if not self.host or not self.port:
                raise ValueError("an hl7 receiver needs host and port (or url: mllp://host:port)")
        else:
            if not self.url or not re.match(r"^https?://[^/\s]+", self.url):
                raise ValueError(f"a {self.kind} receiver needs url: http(s)://host[:port]/path, got {self.url!r}")
        return self

    @property
    def endpoint(self) -> str:
        """A fhir or webhook receiver's URL (the validator above made sure it has one)."""
        assert self.url is not None
        return self.url

    @property
    def mllp_address(self) -> tuple[str, int]:
        """An hl7 receiver's host and port (the validator above made sure it has both)."""
        assert self.host is not None and self.port is not None
        return self.host, self.port

    def describe(self) -> str:
        """Name, kind and host: a URL's path and query are not logged (a webhook's may hold its secret)."""
        if self.kind == "hl7":
            return f"{self.name} (hl7 {self.host}:{self.port})"
        parts = urlsplit(self.endpoint)
        return f"{self.name} ({self.kind} {parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''})"

    def secrets(self) -> list[str]:
        """What a logged reason must not show of this receiver: its URL's path and query, its headers' values."""
        out = list(self.headers.values())
        if self.url and self.kind != "hl7":
            parts = urlsplit(self.url)
            out += [v for v in (parts.path + (f"?{parts.query}" if parts.query else ""), parts.path) if len(v) > 1]
        return out


class AlertConfig(BaseModel):
    """The alerts' configuration (YAML: docs/alerts.md)."""

    model_config = ConfigDict(extra="forbid")

    receivers: list[Receiver] = Field(default_factory=list)
    operating_point: str | None = None  # a point of the bundle by name (or the name of ``threshold``)
    threshold: float | None = Field(default=None, ge=0, le=1)  # a threshold of the PE probability
    link_template: str | None = None  # the receivers' default
    sending_facility: str = ""  # hl7: MSH-4
    retry_first: float = Field(default=2.0, gt=0)  # seconds before the first retry, doubled each time
    retry_max: float = Field(default=300.0, gt=0)

    @model_validator(mode="after")
    def _names(self):
        seen = set()
        for position, receiver in enumerate(self.receivers, 1):
            if receiver.name is None:
                receiver.name = f"{receiver.kind}{position}"
            if receiver.name in seen:
                raise ValueError(f"two receivers are named {receiver.name!r}")
            seen.add(receiver.name)
        return self

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> AlertConfig:
        """A YAML file: the configuration itself or a mapping with an ``alerts`` key holding it."""
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if isinstance(data, dict) and "alerts" in data and "receivers" not in data:
            data = data["alerts"]
        return cls.model_validate(data)


# ------------------------------------------------------------------------------------------ the decision
@dataclass(frozen=True)
class Decision:
    """What an alert says: the decision, the probability, and the rule that decided."""

    word: str  # POSITIVE, NEGATIVE or NOT_ASSESSED
    probability: float  # the model's PE probability (the highest slice's)
    point: str  # the operating point's name, or CHALLENGE_RULE
    threshold: float
    source: str  # "bundle", "config" or "label rules"
    rule: str  # one sentence: "decision: ..."

    @property
    def positive(self) -> bool:
        return self.word == POSITIVE


def decide(result, config: AlertConfig, bundle_points: Mapping[str, Any] | None = None) -> Decision:
    """The alert's decision for a :class:`~pedetect.infer.report.StudyResult`: the configured
    threshold, else the configured (or the bundle's first) operating point, else the decision after
    the label rules, stated as such. ``bundle_points``: the bundle's operating-points record, used
    when the result carries none."""
    probability = float(result.pe_probability)
    points = list(result.operating_points or (bundle_points or {}).get("points") or [])
    note = ""
    if config.threshold is not None:
        name = config.operating_point or "configured"
        threshold, source = float(config.threshold), "config"
        rule = f"decision: configured threshold {name}: positive when the PE probability (the highest slice's) is > {threshold:g}"
    else:
        chosen = None
        if config.operating_point is not None:
            chosen = next((p for p in points if p.get("name") == config.operating_point), None)
            if chosen is None:
                note = f"operating point {config.operating_point!r} not in the bundle; "
        elif points:
            chosen = points[0]
        if chosen is not None:
            name, threshold, source = str(chosen["name"]), float(chosen["threshold"]), "bundle"
            rule = (
                f"decision: operating point {name} of the bundle: positive when the PE probability "
                f"(the highest slice's) is > {threshold:g}"
            )
        else:
            name, threshold, source = CHALLENGE_RULE, float(THRESHOLD), "label rules"
            rule = (
                f"decision: {CHALLENGE_RULE} ({note or 'no operating point in the bundle or the configuration; '}"
                f"the decision after the label rules: positive when a slice's probability after the label "
                f"rules' repair is > {THRESHOLD:g})"
            )
    if getattr(result, "error", None):
        word = NOT_ASSESSED
    elif source == "label rules":
        word = POSITIVE if result.pe_positive else NEGATIVE
    else:
        word = POSITIVE if probability > threshold else NEGATIVE
    return Decision(word, probability, name, threshold, source, rule)


def alert_key(study: str, bundle: str, decision: str) -> str:
    """20 hex digits of the study, the bundles' identity and the decision: the notification's
    idempotent id (and the HL7 message control id, at most 20 characters in v2.5.1)."""
    return hashlib.sha256(f"{study}|{bundle}|{decision}".encode()).hexdigest()[:20]


def candidate_sides(candidates: Sequence[Mapping[str, Any]]) -> list[tuple[str, int]]:
    """(side, count) of the candidates, in the order of each side's strongest candidate."""
    counts: dict[str, int] = {}
    for candidate in candidates:
        side = str(candidate.get("side") or "unknown")
        counts[side] = counts.get(side, 0) + 1
    return list(counts.items())


def sides_text(sides: Sequence[tuple[str, int]]) -> str:
    return ", ".join(f"{side} ({count})" for side, count in sides) or "no candidate"


def study_link(template: str | None, study: str, accession: str = "") -> str | None:
    """The link to the study: ``{study}`` and ``{accession}`` of the template URL-quoted."""
    if not template:
        return None
    return template.format(study=quote(study, safe=""), accession=quote(accession, safe=""))


@dataclass(frozen=True)
class Notice:
    """Everything a notification says, before it is written for one kind of receiver."""

    key: str
    study: str
    accession: str
    decision: Decision
    sides: list[tuple[str, int]]
    candidates: list[dict]
    bundle: str
    version: str
    created: datetime.datetime
    error: str | None

    @property
    def algorithm(self) -> str:
        return f"pedetect {self.version}, bundle {self.bundle or 'unrecorded'}"


# ------------------------------------------------------------------------------------------ HL7 v2
def _hl7_escape(value: Any) -> str:
    """A value for one HL7 component: the delimiters escaped by the ``hl7`` package (\\F\\, \\S\\, …),
    other characters kept (the message is UTF-8: MSH-18), control characters as spaces."""
    text = "".join(c if c >= " " or c == "\r" else " " for c in str(value))
    out: list[str] = []
    ascii_run: list[str] = []
    for c in text:
        if c > "\x7e":
            out.append(hl7.util.escape(_HL7_CONTAINER, "".join(ascii_run)) if ascii_run else "")
            ascii_run = []
            out.append(c)
        else:
            ascii_run.append(c)
    out.append(hl7.util.escape(_HL7_CONTAINER, "".join(ascii_run)) if ascii_run else "")
    return "".join(out)


class _Container:
    """What ``hl7.util.escape`` needs of a message: its separators and escape character."""

    separators = ("\r", "|", "~", "^", "&")
    esc = "\\"


_HL7_CONTAINER = _Container()


def _component(*parts: Any) -> str:
    return "^".join(_hl7_escape(p) for p in parts).rstrip("^")


def _coded(code: tuple) -> str:
    return _component(code[0], code[1], code[2])


def _hl7_time(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).strftime("%Y%m%d%H%M%S+0000")


def _xpn(dicom_name: str) -> str:
    """A DICOM person name (family^given^middle^prefix^suffix, first group) as an HL7 XPN
    (family^given^middle^suffix^prefix)."""
    parts = (str(dicom_name).split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = parts
    return _component(family, given, middle, suffix, prefix)


def _segment(*fields: str) -> str:
    return "|".join(fields).rstrip("|")


def hl7_message(notice: Notice, receiver: Receiver, patient: Mapping[str, str], link: str | None, facility: str) -> str:
    """The ORU^R01 (segments separated by CR): MSH, PID, OBR, NTE, OBX rows (docs/alerts.md)."""
    moment = _hl7_time(notice.created)
    decision = notice.decision
    msh = _segment(
        "MSH",
        "^~\\&",
        SENDING_APPLICATION,
        _hl7_escape(facility),
        _hl7_escape(receiver.receiving_application),
        _hl7_escape(receiver.receiving_facility),
        moment,
        "",
        "ORU^R01^ORU_R01",
        notice.key,
        "P",
        HL7_VERSION,
        "",
        "",
        "AL",  # MSH-15: accept acknowledgment always
        "NE",  # MSH-16: no application acknowledgment (the original-mode ACK is the answer)
        "",
        "UNICODE UTF-8",
    )
    ids = []
    if receiver.patient_fields and patient.get("PatientID"):
        ids.append(_component(patient["PatientID"], "", "", patient.get("IssuerOfPatientID", ""), "MR"))
    if notice.accession:
        ids.append(_component(notice.accession, "", "", "", "ACSN"))
    ids.append(_component(notice.study, "", "", "DICOM", "RI"))
    # PID-5 is required in v2.5.1: without the patient's name, a pseudonym of name type S (table 0200:
    # coded pseudo-name to assure anonymity)
    name = _xpn(patient["PatientName"]) if receiver.patient_fields and patient.get("PatientName") else PSEUDONYM
    pid = _segment("PID", "1", "", "~".join(ids), "", name)
    obr_fields = ["OBR", "1", "", _component(notice.study, SENDING_APPLICATION), _coded(SERVICE), "", "", moment]
    obr_fields += [""] * 10 + [_hl7_escape(notice.accession), "", "", "", moment, "", "CT", "P"]
    obr = _segment(*obr_fields)  # OBR-18 the accession, OBR-22 the report's time, OBR-24 CT, OBR-25 preliminary
    nte = _segment("NTE", "1", "L", _hl7_escape(UNVERIFIED))
    rows: list[tuple[str, tuple, str, str, str]] = []  # (type, code, value, units, abnormal flag)
    if decision.word == NOT_ASSESSED:
        rows.append(("CWE", PULMONARY_EMBOLISM, "", "", ""))
    else:
        value = _coded(PRESENT if decision.positive else ABSENT)
        rows.append(("CWE", PULMONARY_EMBOLISM, value, "", "A" if decision.positive else "N"))
        rows.append(("NM", PROBABILITY, f"{decision.probability:.4f}", _coded(NO_UNITS), ""))
    rows.append(("ST", OPERATING_POINT, _hl7_escape(decision.point), "", ""))
    rows.append(("NM", THRESHOLD_CODE, f"{decision.threshold:.4g}", _coded(NO_UNITS), ""))
    rows.append(("ST", DECISION_RULE, _hl7_escape(decision.rule), "", ""))
    rows.append(("ST", SIDES, _hl7_escape(sides_text(notice.sides)), "", ""))
    if link:
        rows.append(("RP", STUDY_LINK, _component(link, SENDING_APPLICATION, "TEXT", "HTML"), "", ""))
    rows.append(("ST", ALGORITHM, _hl7_escape(notice.algorithm), "", ""))
    if notice.error:
        rows.append(("ST", NOTE, _hl7_escape(f"not assessed: {notice.error}"[:200]), "", ""))
    obx = []
    for number, (kind, code, value, units, flag) in enumerate(rows, 1):
        status = "X" if code is PULMONARY_EMBOLISM and decision.word == NOT_ASSESSED else "P"
        obx.append(
            _segment("OBX", str(number), kind, _coded(code), "", value, units, "", flag, "", "", status, "", "", moment)
        )
    return "\r".join([msh, pid, obr, nte, *obx])


class _MLLPClient(MLLPClient):
    """``hl7.client.MLLPClient`` with a timeout (the library's connects and waits without one) and an
    ACK read up to the MLLP end block (the library's ``send`` returns one ``recv``)."""

    def __init__(self, host: str, port: int, timeout: float, encoding: str = "utf-8"):
        self.socket = socket.create_connection((host, port), timeout=timeout)
        self.encoding = encoding

    def send(self, data: bytes) -> bytes:
        self.socket.sendall(data)
        answer = b""
        while EB not in answer:
            chunk = self.socket.recv(65536)
            if not chunk:
                break
            answer += chunk
            if len(answer) > 1 << 20:
                raise AlertError("the ACK is longer than 1 MiB")
        return answer.split(EB)[0].lstrip(SB).rstrip(CR)


def send_hl7(receiver: Receiver, message: str, control_id: str) -> str:
    """Send an ORU and read the ACK: the ACK code, or :class:`AlertError` with the receiver's reason."""
    with _MLLPClient(*receiver.mllp_address, receiver.timeout) as client:
        raw = client.send_message(message)
    if not raw:
        raise AlertError("the connection closed without an ACK")
    try:
        ack = hl7.parse(raw.decode("utf-8", "replace"))
        msa = ack.segment("MSA")
    except Exception as error:
        raise AlertError(f"the answer is not an HL7 ACK ({type(error).__name__})") from None
    code, acked, text = (_field(msa, 1), _field(msa, 2), _field(msa, 3))
    if code not in ("AA", "CA"):
        reasons = [text] if text else []
        try:
            for err in ack.segments("ERR"):
                reasons += [r for r in (_field(err, 8), _field(err, 3)) if r]
        except KeyError:
            pass
        raise AlertError(f"ACK {code or '(no code)'}: {'; '.join(reasons) or 'no reason given'}")
    if acked and acked != control_id:
        raise AlertError(f"ACK {code} for message {acked!r}, not {control_id!r}")
    return code


def _field(segment, index: int) -> str:
    try:
        return str(segment(index)).strip()
    except (IndexError, KeyError):
        return ""


# ------------------------------------------------------------------------------------------ FHIR
def _fhir_coding(code: tuple) -> dict:
    return {"system": code[3], "code": code[0], "display": code[1]}


def _fhir_concept(code: tuple) -> dict:
    return {"coding": [_fhir_coding(code)], "text": code[1]}


def _fhir_time(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).isoformat(timespec="seconds")


def fhir_ids(key: str) -> tuple[str, str]:
    """The DiagnosticReport's and the Observation's ids (FHIR ids: at most 64 of [A-Za-z0-9-.])."""
    return f"pedetect-{key}", f"pedetect-{key}-pe"


def _quantity(value: float) -> dict:
    return {"value": round(float(value), 4), "unit": "probability", "system": UCUM, "code": "1"}


def fhir_resources(notice: Notice, receiver: Receiver, patient: Mapping[str, str], link: str | None) -> list[dict]:
    """The PE Observation and the DiagnosticReport (R4), checked with ``fhir.resources.R4B``."""
    # fhir.resources (its R4B models take a while to import) for FHIR receivers only
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport
    from fhir.resources.R4B.observation import Observation

    report_id, observation_id = fhir_ids(notice.key)
    decision, moment = notice.decision, _fhir_time(notice.created)
    study_ref = {"type": "ImagingStudy", "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{notice.study}"}}
    subject: dict[str, Any] | None = None
    if receiver.patient_fields and (patient.get("PatientID") or patient.get("PatientName")):
        subject = {"type": "Patient"}
        if patient.get("PatientID"):
            mr = {"coding": [{"system": V2_0203, "code": "MR"}]}
            subject["identifier"] = {"type": mr, "value": str(patient["PatientID"])}
        if patient.get("PatientName"):
            subject["display"] = " ".join(p for p in str(patient["PatientName"]).split("=")[0].split("^") if p)
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "id": observation_id,
        "identifier": [{"system": ID_SYSTEM, "value": f"{notice.key}-pe"}],
        "status": "preliminary",
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "imaging"}]}
        ],
        "code": _fhir_concept(PULMONARY_EMBOLISM),
        "effectiveDateTime": moment,
        "issued": moment,
        "method": {"text": decision.rule},
        "device": {"display": notice.algorithm},
        "derivedFrom": [study_ref],
        "note": [{"text": UNVERIFIED}],
        "component": [],
    }
    if decision.word == NOT_ASSESSED:
        observation["dataAbsentReason"] = {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "error"}],
            "text": f"not assessed: {notice.error}"[:200],
        }
    else:
        observation["valueCodeableConcept"] = _fhir_concept(PRESENT if decision.positive else ABSENT)
        observation["interpretation"] = [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                        "code": "POS" if decision.positive else "NEG",
                    }
                ]
            }
        ]
        observation["component"].append(
            {"code": _fhir_concept(PROBABILITY), "valueQuantity": _quantity(decision.probability)}
        )
    observation["component"] += [
        {"code": _fhir_concept(THRESHOLD_CODE), "valueQuantity": _quantity(decision.threshold)},
        {"code": _fhir_concept(OPERATING_POINT), "valueString": decision.point},
        {"code": _fhir_concept(SIDES), "valueString": sides_text(notice.sides)},
    ]
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": report_id,
        "identifier": [{"system": ID_SYSTEM, "value": notice.key}],
        "status": "preliminary",
        "category": [
            {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD", "display": "Radiology"}
                ]
            }
        ],
        "code": _fhir_concept(SERVICE),
        "effectiveDateTime": moment,
        "issued": moment,
        "result": [{"reference": f"Observation/{observation_id}"}],
        "imagingStudy": [study_ref],
        "conclusion": _conclusion(notice),
    }
    if notice.accession:
        report["basedOn"] = [
            {
                "type": "ServiceRequest",
                "identifier": {"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}, "value": notice.accession},
            }
        ]
    if link:
        report["presentedForm"] = [{"contentType": "text/html", "url": link, "title": "The study in the viewer"}]
    if subject is not None:
        observation["subject"] = report["subject"] = subject
    Observation.model_validate(observation)
    DiagnosticReport.model_validate(report)
    return [observation, report]


def fhir_transaction(resources: Sequence[dict], base: str | None = None) -> dict:
    """A transaction Bundle that PUTs each resource at its id (``fullUrl`` from ``base`` when given)."""
    from fhir.resources.R4B.bundle import Bundle  # FHIR receivers only, as above

    entries = []
    for resource in resources:
        url = f"{resource['resourceType']}/{resource['id']}"
        entry: dict[str, Any] = {"resource": resource, "request": {"method": "PUT", "url": url}}
        if base:
            entry = {"fullUrl": f"{base.rstrip('/')}/{url}", **entry}
        entries.append(entry)
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    Bundle.model_validate(bundle)
    return bundle


def _conclusion(notice: Notice) -> str:
    decision = notice.decision
    if decision.word == NOT_ASSESSED:
        head = f"PE not assessed ({notice.error})"
    else:
        head = f"PE {decision.word}, probability {decision.probability:.3f}"
    return f"{head}; {decision.rule}; candidates: {sides_text(notice.sides)}. {UNVERIFIED}."


def send_fhir(receiver: Receiver, bundle: dict) -> str:
    bundle = fhir_transaction([entry["resource"] for entry in bundle["entry"]], receiver.endpoint)
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json", **receiver.headers}
    response = requests.post(
        receiver.endpoint.rstrip("/"), data=json.dumps(bundle).encode(), headers=headers, timeout=receiver.timeout
    )
    if not 200 <= response.status_code < 300:
        raise AlertError(f"HTTP {response.status_code}: {_http_reason(response)}")
    try:
        statuses = [str(e.get("response", {}).get("status", "")) for e in response.json().get("entry", [])]
    except ValueError:
        statuses = []
    refused = [s for s in statuses if not s.startswith("2")]
    if refused:
        raise AlertError(f"HTTP {response.status_code}, but entries answered {', '.join(refused)}")
    return f"HTTP {response.status_code}"


def _http_reason(response) -> str:
    """An OperationOutcome's diagnostics, or the start of the body."""
    try:
        body = response.json()
        issues = body.get("issue", []) if isinstance(body, dict) else []
        text = "; ".join(str(i.get("diagnostics") or i.get("details", {}).get("text") or i.get("code")) for i in issues)
        if text:
            return text[:300]
    except ValueError:
        pass
    return (response.text or response.reason or "").strip()[:300]


# ------------------------------------------------------------------------------------------ webhook
def webhook_document(notice: Notice, receiver: Receiver, patient: Mapping[str, str], link: str | None, id: str) -> dict:
    decision = notice.decision
    document: dict[str, Any] = {
        "type": "pedetect.alert",
        "id": id,
        "key": notice.key,
        "study": notice.study,
        "accession": notice.accession or None,
        "decision": decision.word,
        "pe_probability": None if decision.word == NOT_ASSESSED else round(decision.probability, 4),
        "operating_point": {
            "name": decision.point,
            "threshold": decision.threshold,
            "source": decision.source,
            "rule": decision.rule,
        },
        "sides": [side for side, _ in notice.sides],
        "candidates": [
            {k: c.get(k) for k in ("candidate", "side", "score", "sop", "slice_index")} for c in notice.candidates
        ],
        "link": link,
        "pedetect_version": notice.version,
        "bundle": notice.bundle,
        "created": _fhir_time(notice.created),
        "note": UNVERIFIED,
    }
    if notice.error:
        document["error"] = notice.error
    if receiver.patient_fields:
        document["patient"] = {k: str(patient[k]) for k in PATIENT_KEYS if patient.get(k)}
    return document


def send_webhook(receiver: Receiver, document: dict, id: str) -> str:
    headers = {
        "Content-Type": "application/json",
        "Idempotency-Key": id,
        "User-Agent": f"pedetect/{__version__}",
        **receiver.headers,
    }
    response = requests.post(
        receiver.endpoint, data=json.dumps(document).encode(), headers=headers, timeout=receiver.timeout
    )
    if not 200 <= response.status_code < 300:
        raise AlertError(f"HTTP {response.status_code}: {_http_reason(response)}")
    return f"HTTP {response.status_code}"


# ------------------------------------------------------------------------------------------ the queue
def _write_private(path: Path, record: dict) -> None:
    """JSON written atomically, readable by this user only (it may hold patient fields)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o600)


class Alerts:
    """Notifications queued on disk (``spool_dir``) and sent to the configured receivers.

    ``bundle``: the identity of the bundles that predicted (``identity.algorithm_of(bundles).identity``),
    in the ids; ``operating_points``: the bundle's operating-points record (``Predictor.ensemble.operating_points``),
    used to check the configured point's name now and when a result carries no points."""

    def __init__(
        self,
        config: AlertConfig,
        spool_dir: str | os.PathLike[str],
        bundle: str = "",
        *,
        operating_points: Mapping[str, Any] | None = None,
        version: str = __version__,
        announce: bool = True,
    ):
        self.config = config
        self.root = Path(spool_dir)
        (self.root / PENDING).mkdir(parents=True, exist_ok=True)
        (self.root / SENT).mkdir(parents=True, exist_ok=True)
        self.bundle, self.version = bundle, version
        self.operating_points = operating_points
        self.receivers = {r.name: r for r in config.receivers}
        self._due: dict[str, tuple[float, float]] = {}  # id -> (next try, current delay)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._unknown: set[str] = set()
        if config.operating_point and config.threshold is None and operating_points is not None:
            names = [p["name"] for p in operating_points.get("points", [])]
            if config.operating_point not in names:
                raise ValueError(
                    f"alerts: operating point {config.operating_point!r} is not in the bundle "
                    f"(its points: {', '.join(names) or 'none'})"
                )
        if config.receivers and announce:  # announce=False: a second queue of the same receivers (a worker's)
            LOG.info("alerts to %s; %s", ", ".join(r.describe() for r in config.receivers), self.rule())

    def rule(self) -> str:
        """The decision rule the alerts apply, in words (the bundle's points as far as known here)."""
        config, points = self.config, list((self.operating_points or {}).get("points") or [])
        if config.threshold is not None or (config.operating_point and self.operating_points is not None) or points:
            return decide(_NoResult(self.operating_points), config, self.operating_points).rule
        if config.operating_point:
            return f"decision: operating point {config.operating_point} of the bundle (each result's points)"
        return (
            "decision: the bundle's first operating point; without one, "
            f"{CHALLENGE_RULE} (the decision after the label rules), stated in each alert"
        )

    @property
    def wants_patient_fields(self) -> bool:
        return any(r.patient_fields for r in self.receivers.values())

    def study_fields(self, path: str | os.PathLike[str]) -> dict[str, str]:
        """What :meth:`notify` takes from a study's DICOM file: the accession number, and the patient's
        ID and name only when a receiver is configured with ``patient_fields``."""
        keys = list(STUDY_KEYS) + (list(PATIENT_KEYS) if self.wants_patient_fields else [])
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=keys)
            return {k: str(ds.get(k)) for k in keys if ds.get(k) not in (None, "")}
        except Exception as error:  # the alert goes without them (the study UID identifies the study)
            LOG.warning(
                "alerts: the study's fields not read (%s); the alert names the study by its UID", type(error).__name__
            )
            return {}

    # -- queueing
    def notify(self, result, patient: Mapping[str, Any] | None = None) -> list[str]:
        """Queue one notification per receiver that wants this result (``positive_only`` receivers:
        positive decisions only); the ids queued. One already delivered (same study, bundle and
        decision) is not queued again. ``patient``: DICOM keywords (AccessionNumber; PatientID,
        PatientName, IssuerOfPatientID, used only for receivers with ``patient_fields``)."""
        patient = {k: str(v) for k, v in (patient or {}).items() if v not in (None, "")}
        decision = decide(result, self.config, self.operating_points)
        key = alert_key(result.study_uid, self.bundle, decision.word)
        if self.config.operating_point and self.config.threshold is None and decision.source == "label rules":
            LOG.warning("study %s: %s", result.study_uid, decision.rule)
        notice = Notice(
            key=key,
            study=str(result.study_uid),
            accession=patient.get("AccessionNumber", ""),
            decision=decision,
            sides=candidate_sides(result.candidates),
            candidates=[dict(c) for c in result.candidates],
            bundle=self.bundle,
            version=self.version,
            created=datetime.datetime.now(datetime.timezone.utc),
            error=getattr(result, "error", None),
        )
        queued = []
        for receiver in self.receivers.values():
            if receiver.positive_only and not decision.positive:
                continue
            id = f"{receiver.name}-{key}"
            if (self.root / SENT / f"{id}.json").exists():
                LOG.info(
                    "alert %s of study %s (%s) already delivered to %s", id, notice.study, decision.word, receiver.name
                )
                continue
            link = study_link(receiver.link_template or self.config.link_template, notice.study, notice.accession)
            private = {k: patient[k] for k in PATIENT_KEYS if k in patient} if receiver.patient_fields else {}
            if receiver.kind == "hl7":
                payload: Any = hl7_message(notice, receiver, private, link, self.config.sending_facility)
            elif receiver.kind == "fhir":
                payload = fhir_transaction(fhir_resources(notice, receiver, private, link))
            else:
                payload = webhook_document(notice, receiver, private, link, id)
            record = {
                "id": id,
                "key": key,
                "receiver": receiver.name,
                "kind": receiver.kind,
                "study": notice.study,
                "decision": decision.word,
                "created": notice.created.isoformat(timespec="seconds"),
                "attempts": 0,
                "last_error": None,
                "redact": _private_strings(private),
                "payload": payload,
            }
            with self._lock:
                _write_private(self.root / PENDING / f"{id}.json", record)
                self._due.pop(id, None)
            queued.append(id)
            LOG.info("alert %s of study %s (%s) queued for %s", id, notice.study, decision.word, receiver.name)
        if queued:
            self._wake.set()
        return queued

    def pending(self) -> list[dict]:
        """The notifications waiting: id, receiver, kind, study, decision, created, attempts, last_error."""
        out = []
        for path in sorted((self.root / PENDING).glob("*.json")):
            try:
                record = read_json(path)
            except (OSError, ValueError):
                continue
            out.append(
                {
                    k: record.get(k)
                    for k in ("id", "receiver", "kind", "study", "decision", "created", "attempts", "last_error")
                }
            )
        return out

    # -- delivery
    def wake(self) -> None:
        self._wake.set()

    def send_pending(self, now: float | None = None) -> int:
        """One pass: send each notification whose retry time has come; the number delivered."""
        now = time.monotonic() if now is None else now
        delivered = 0
        for path in sorted((self.root / PENDING).glob("*.json")):
            id = path.stem
            due, delay = self._due.get(id, (0.0, self.config.retry_first))
            if due > now:
                continue
            try:
                with self._lock:
                    record = read_json(path)
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as error:
                self._due[id] = (now + self.config.retry_max, self.config.retry_max)
                LOG.error("alert %s: unreadable queue file (%s); left in %s", id, type(error).__name__, path.parent)
                continue
            receiver = self.receivers.get(record.get("receiver"))
            if receiver is None:
                if id not in self._unknown:
                    self._unknown.add(id)
                    LOG.warning(
                        "alert %s: receiver %r is not configured; kept in the queue", id, record.get("receiver")
                    )
                continue
            try:
                answer = self._send(receiver, record)
            except Exception as error:  # AlertError or the network's: kept, retried later
                reason = error if isinstance(error, AlertError) else f"{type(error).__name__}: {error}"
                reason = _redact(str(reason), [*(record.get("redact") or []), *receiver.secrets()])[:300]
                self._due[id] = (now + delay, min(delay * 2, self.config.retry_max))
                with self._lock:
                    if path.exists():
                        current = read_json(path)
                        if current.get("created") == record.get("created"):
                            current.update(attempts=int(current.get("attempts") or 0) + 1, last_error=reason)
                            _write_private(path, current)
                LOG.warning(
                    "alert %s of study %s to %s failed (%s); kept, retry in %.0f s",
                    id,
                    record.get("study"),
                    receiver.describe(),
                    reason,
                    delay,
                )
                continue
            with self._lock:
                _write_private(
                    self.root / SENT / f"{id}.json",
                    {
                        "id": id,
                        "study": record.get("study"),
                        "receiver": receiver.name,
                        "decision": record.get("decision"),
                        "delivered": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "answer": answer,
                    },
                )
                path.unlink(missing_ok=True)
                self._due.pop(id, None)
            delivered += 1
            LOG.info(
                "alert %s of study %s (%s) delivered to %s: %s",
                id,
                record.get("study"),
                record.get("decision"),
                receiver.describe(),
                answer,
            )
        return delivered

    def _send(self, receiver: Receiver, record: dict) -> str:
        payload = record["payload"]
        if receiver.kind != record.get("kind"):
            raise AlertError(
                f"the receiver is now of kind {receiver.kind}, the notification was made for {record.get('kind')}"
            )
        if receiver.kind == "hl7":
            return "ACK " + send_hl7(receiver, payload, record["key"])
        if receiver.kind == "fhir":
            return send_fhir(receiver, payload)
        return send_webhook(receiver, payload, record["id"])

    def run(self, stop: threading.Event, poll: float = 0.5) -> None:
        """Deliver until ``stop`` is set (at once when a notification is queued)."""
        while not stop.is_set():
            try:
                self.send_pending()
            except Exception as error:  # never let the delivery thread die
                LOG.error("alerts: delivery pass failed: %s: %s", type(error).__name__, str(error)[:200])
            self._wake.wait(poll)
            self._wake.clear()


@dataclass
class _NoResult:
    """A stand-in result for stating the rule when the alerts start."""

    points: Mapping[str, Any] | None
    study_uid: str = ""
    pe_probability: float = 0.0
    pe_positive: bool = False
    error: str | None = None

    @property
    def operating_points(self) -> list:
        return list((self.points or {}).get("points") or [])


def _private_strings(private: Mapping[str, str]) -> list[str]:
    """The patient fields and the parts of the name, longest first (what a logged reason must not show)."""
    values = set(private.values())
    name = private.get("PatientName", "")
    values |= {part for part in re.split(r"[\^= ]", name) if part}
    values |= {" ".join(p for p in name.split("=")[0].split("^") if p)}
    return sorted((v for v in values if len(v) >= 2), key=len, reverse=True)


def _redact(text: str, values: Sequence[str]) -> str:
    for value in values:
        text = text.replace(value, "***")
    return text
