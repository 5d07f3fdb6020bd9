"""``pedetect serve``: a DICOM node that answers CT studies with DICOM results.

A pynetdicom C-STORE SCP (C-ECHO answered) writes each received instance to the spool as it arrives
(``SPOOL/incoming/<study>/<sop>.dcm``, atomically: a received instance is never only in memory).
A study is complete when no instance of it arrived for ``settle`` seconds (the files' times, so a
restart sees the same); one study at a time is predicted by the node's one
:class:`~pedetect.infer.predictor.Predictor` (every bundle loaded once, when the node starts): its
CTPA series chosen on the headers of one scan of its files (:mod:`pedetect.hospital.selection`), its
DICOM results made from the prediction itself (:class:`~pedetect.hospital.answer.DicomAnswer`: no
scratch copies, no report read back) and put in ``SPOOL/outbox/<study>/``, and the study is marked
answered (``SPOOL/done/<study>.json``, written last). A delivery thread sends the outbox to the destination (:mod:`pedetect.hospital.deliver`),
retrying with back-off; a result leaves the outbox only once the destination accepted it.

Killed at any point and restarted on the same spool, the node predicts the studies received but not
answered and sends what the outbox still holds; results have UIDs derived from the study, the
bundle and the instances, so a study answered twice is stored once. Instances that are not CT
images are acknowledged and not kept (logged by SOP class). Logs name UIDs, never patient fields.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from pedetect.dicom.guard import DEFAULT_DECODE_TIMEOUT_S
from pedetect.dicom.header import CT_SOP_CLASSES, sop_class_name
from pedetect.hospital.selection import MIN_SLICES
from pedetect.infer.report import safe_name
from pedetect.io import read_json, write_bytes_atomic, write_json_atomic

LOG = logging.getLogger("pedetect.serve")
INCOMING, OUTBOX, DONE, WORK = "incoming", "outbox", "done", "work"


@dataclass
class ServeConfig:
    model_dirs: Sequence[Path]
    spool: Path
    ae_title: str = "PEDETECT"
    host: str = "0.0.0.0"
    port: int = 11112
    settle: float = 10.0
    destination: Optional[str] = None
    device: str = "auto"
    min_slices: int = MIN_SLICES  # a usable series has at least this many slices (pedetect.hospital.selection)
    retry_first: float = 1.0  # seconds before the first retry of a delivery, doubled each time
    retry_max: float = 60.0
    poll: float = 0.2
    decode_timeout: float = (
        DEFAULT_DECODE_TIMEOUT_S  # seconds a slice may take to decode (0: no limit); past it the slice is lost
    )
    alerts: Optional[Path] = None  # YAML of alert receivers (pedetect.hospital.alerts; docs/alerts.md)


@dataclass
class Spool:
    """The spool's folders and the state each study is in."""

    root: Path
    received: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        for name in (INCOMING, OUTBOX, DONE, WORK):
            (self.root / name).mkdir(parents=True, exist_ok=True)

    def study_dir(self, study: str) -> Path:
        return self.root / INCOMING / _safe(study)

    def done_path(self, study: str) -> Path:
        return self.root / DONE / f"{_safe(study)}.json"

    def store(self, study: str, sop: str, data: bytes) -> bool:
        """Write an instance; returns False when the same instance was already there (sent twice)."""
        path = self.study_dir(study) / f"{_safe(sop)}.dcm"
        again = path.exists()
        write_bytes_atomic(path, data, fsync=True)  # on disk before the sender is told it was stored
        if not again and self.done_path(study).exists():  # a new instance of an answered study: answer it again
            self.done_path(study).unlink()
        return not again

    def pending(self, settle: float, now: Optional[float] = None) -> list[str]:
        """Studies received, not answered, and quiet for ``settle`` seconds; oldest first."""
        now = time.time() if now is None else now
        ready = []
        for folder in (self.root / INCOMING).iterdir():
            if not folder.is_dir() or (self.root / DONE / f"{folder.name}.json").exists():
                continue
            times = [p.stat().st_mtime for p in folder.glob("*.dcm")]
            if times and now - max(times) >= settle:
                ready.append((max(times), folder.name))
        return [name for _, name in sorted(ready)]

    def last_received(self, study: str) -> float:
        return max((p.stat().st_mtime for p in self.study_dir(study).glob("*.dcm")), default=0.0)


def _safe(uid: str) -> str:
    return safe_name(str(uid))


class Server:
    """The node: the SCP (started by :meth:`start`), the prediction loop and the delivery thread."""

    def __init__(self, config: ServeConfig):
        from pedetect.hospital.deliver import Outbox, parse_destination

        self.config = config
        self.spool = Spool(config.spool)
        self.destination = parse_destination(config.destination) if config.destination else None
        self.outbox = Outbox(
            self.spool.root / OUTBOX, self.destination, first=config.retry_first, most=config.retry_max
        )
        self.stop_event = threading.Event()
        self.ae = None
        self.server = None
        self.predictor = None  # infer.predictor.Predictor, loaded once (load)
        self.decode = None
        self._resources = None
        self.alerts = None  # hospital.alerts.Alerts, made with the predictor (the bundle's operating points)
        if config.alerts is not None:
            from pedetect.hospital.alerts import AlertConfig

            self.alert_config = AlertConfig.from_yaml(config.alerts)
        else:
            self.alert_config = None

    # -- the SCP
    def start(self) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
        from pynetdicom.sop_class import Verification
        from pynetdicom.presentation import AllStoragePresentationContexts

        ae = AE(ae_title=self.config.ae_title)
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.maximum_pdu_size = 0
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda event: 0x0000)]
        self.ae = ae
        self.server = ae.start_server((self.config.host, self.config.port), block=False, evt_handlers=handlers)
        LOG.info(
            "listening as %s on %s:%d; spool %s; destination %s",
            self.config.ae_title,
            self.config.host,
            self.config.port,
            self.spool.root,
            self.destination.describe() if self.destination else "none (results stay in the outbox)",
        )

    def _on_store(self, event) -> int:
        try:
            ds = event.dataset
            sop_class = str(ds.get("SOPClassUID", event.request.AffectedSOPClassUID))
            sop = str(ds.get("SOPInstanceUID", event.request.AffectedSOPInstanceUID))
            study = str(ds.get("StudyInstanceUID", ""))
            if sop_class not in CT_SOP_CLASSES:
                LOG.info(
                    "instance %s of study %s not kept: %s is not a CT image",
                    sop,
                    study or "(none)",
                    sop_class_name(sop_class),
                )
                return 0x0000
            if not study:
                LOG.warning("instance %s not kept: no StudyInstanceUID", sop)
                return 0xC000  # cannot understand
            new = self.spool.store(study, sop, event.encoded_dataset())  # the bytes as sent, with their file meta
            LOG.debug("received %s of study %s%s", sop, study, "" if new else " (again: replaced)")
            if not new:
                LOG.info("instance %s of study %s received again: kept once", sop, study)
            return 0x0000
        except Exception as error:  # the sender is told; nothing half-written stays (atomic writes)
            LOG.error("C-STORE failed: %s: %s", type(error).__name__, error)
            return 0xA700  # out of resources

    # -- prediction
    def load(self) -> None:
        """The predictor (every bundle, once) and the slice decoder with its limit, for the node's life."""
        from contextlib import ExitStack

        from pedetect.infer.predictor import Predictor
        from pedetect.infer.reader import slice_decoder

        if self.predictor is not None:
            return
        started = time.time()
        self.predictor = Predictor(list(self.config.model_dirs), device=self.config.device)
        self._resources = ExitStack()
        self.decode = self._resources.enter_context(slice_decoder(self.config.decode_timeout))
        LOG.info("models loaded in %.1f s: %s", time.time() - started, self.predictor.description)
        if self.alert_config is not None:
            from pedetect.hospital.alerts import Alerts
            from pedetect.hospital.results import algorithm_of

            self.alerts = Alerts(
                self.alert_config,
                self.spool.root / "alerts",
                algorithm_of(self.predictor.bundles).identity,
                operating_points=self.predictor.ensemble.operating_points,
            )

    def _predict(self, study_dir: Path, results: Path) -> tuple[dict, Optional[object]]:
        """Choose the series, predict it, write the DICOM results; the study's record and its prediction
        (None when no series was usable)."""
        from pedetect.hospital.answer import DicomAnswer
        from pedetect.hospital.selection import select_series
        from pedetect.infer.reader import StudyPlan

        self.load()
        selection = select_series(sorted(study_dir.glob("*.dcm")), self.config.min_slices)
        for line in selection.notes():
            LOG.info("study %s: %s", study_dir.name, line)
        record: dict = {"series": selection.record()}
        if selection.chosen is None:
            record["error"] = "no usable CT series: " + "; ".join(selection.notes()[1:])
            return record, None
        headers = selection.headers
        study = headers[0].study or study_dir.name
        started = time.time()
        prediction = self.predictor.predict_headers(study, headers, selection.failures, self.decode)
        lost = [f"{Path(str(f.path)).name}: {f.reason}" for f in prediction.lost + prediction.unplaced]
        for line in lost:
            LOG.warning("study %s: file not used: %s", study_dir.name, line)
        record.update(
            {
                "slices": prediction.n_slices_read,
                "lost": lost,
                "errors": [prediction.error] if prediction.error else [],
                "seconds": round(time.time() - started, 3),
                # The decision at the bundle's operating points (pedetect calibrate) beside the label rules'.
                "pe_positive": prediction.result.pe_positive,
                "operating_points": prediction.result.operating_points,
            }
        )
        plan = StudyPlan(study, {selection.chosen.uid: headers}, list(selection.failures))
        answer = DicomAnswer(results, notes={study: selection.notes()}, echo=lambda line: LOG.info("%s", line))
        answer.write(self.predictor, prediction, plan)
        return record, prediction

    def answer(self, study: str) -> None:
        """Predict one received study, queue its results, mark it answered."""
        study_dir = self.spool.root / INCOMING / study
        work = self.spool.root / WORK / study
        shutil.rmtree(work, ignore_errors=True)
        started, last = time.time(), self.spool.last_received(study)
        LOG.info(
            "predicting study %s (%d instances, %.1f s after the last one)",
            study,
            len(list(study_dir.glob("*.dcm"))),
            started - last,
        )
        record, prediction = self._predict(study_dir, work / "dicom")
        if self.spool.last_received(study) > started:  # instances came in meanwhile: predict again when quiet
            LOG.info("study %s received more instances during prediction: predicted again when quiet", study)
            return
        queued = []
        for folder in (work / "dicom").glob("*"):
            for path in sorted(folder.glob("*.dcm")):
                self.outbox.put(folder.name, path)
                queued.append(path.name)
        record.update({"study": study, "results": queued, "answered_at": time.time(), "last_received": last})
        if self.alerts is not None and prediction is not None:
            # Queued before the study is marked answered: a crash in between predicts it again, and the
            # alert's id (study, bundle, decision) replaces the pending one instead of adding a second.
            try:
                first = next(iter(sorted(study_dir.glob("*.dcm"))), None)
                record["alerts"] = self.alerts.notify(
                    prediction.result, self.alerts.study_fields(first) if first else {}
                )
            except Exception as error:  # the answer still goes out; the failure is logged
                LOG.error("study %s: alerts not queued: %s: %s", study, type(error).__name__, str(error)[:200])
        write_json_atomic(self.spool.done_path(study), record)
        shutil.rmtree(work, ignore_errors=True)
        if record.get("error"):
            LOG.warning("study %s answered without a result: %s", study, record["error"])
        else:
            LOG.info(
                "study %s answered in %.1f s: %s queued; lost %d file(s)",
                study,
                time.time() - started,
                ", ".join(queued) or "no result",
                len(record.get("lost", [])),
            )
        self.outbox.wake()

    def run(self) -> None:
        """Serve until :meth:`stop`: the SCP, the delivery thread, and studies predicted in this thread."""
        if self.server is None:
            self.start()
        self.load()  # reception goes on meanwhile (the SCP answers in its own threads)
        delivery = threading.Thread(
            target=self.outbox.run, args=(self.stop_event,), name="pedetect-deliver", daemon=True
        )
        delivery.start()
        alerting = None
        if self.alerts is not None:
            alerting = threading.Thread(
                target=self.alerts.run, args=(self.stop_event,), name="pedetect-alerts", daemon=True
            )
            alerting.start()
        resumed = [
            p.name
            for p in (self.spool.root / INCOMING).iterdir()
            if p.is_dir() and not self.spool.done_path(p.name).exists()
        ]
        if resumed:
            LOG.info("resuming %d received study(ies) not yet answered: %s", len(resumed), ", ".join(resumed))
        try:
            while not self.stop_event.is_set():
                for study in self.spool.pending(self.config.settle):
                    if self.stop_event.is_set():
                        break
                    try:
                        self.answer(study)
                    except Exception as error:  # the study stays unanswered; the node goes on
                        LOG.exception("study %s could not be answered: %s: %s", study, type(error).__name__, error)
                        write_json_atomic(
                            self.spool.done_path(study), {"study": study, "error": f"{type(error).__name__}: {error}"}
                        )
                self.stop_event.wait(self.config.poll)
        finally:
            self.shutdown()
            delivery.join(timeout=10)
            if alerting is not None:
                alerting.join(timeout=10)

    def stop(self) -> None:
        self.stop_event.set()

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        if self._resources is not None:
            self._resources.close()
            self._resources = None


def answered(spool: Path, study: str) -> Optional[dict]:
    """The record of an answered study (None: not answered)."""
    path = Path(spool) / DONE / f"{_safe(study)}.json"
    return read_json(path) if path.exists() else None


def configure_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("pedetect")
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its debug logs would dump datasets
