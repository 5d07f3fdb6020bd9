"""``pedetect serve``: a DICOM node that answers CT studies with DICOM results.

A pynetdicom C-STORE SCP (C-ECHO answered) writes each received instance to the spool as it arrives
(``SPOOL/incoming/<study>/<sop>.dcm``, atomically: a received instance is never only in memory);
reception never waits on a prediction (the SCP answers in its own threads). A study is complete when
no instance of it arrived for ``settle`` seconds (the files' times, so a restart sees the same).
Prediction :class:`Worker` s (``workers`` processes of their own, so that no prediction holds the
SCP's interpreter lock, sharing nothing but the spool) take complete studies oldest first, each claimed by a lock the kernel
releases when its holder ends however it ends (``SPOOL/work/<study>.claim``). A worker loads its
:class:`~pedetect.infer.predictor.Predictor` once (every bundle) and warms it up on a small synthetic
study; while idle it scans the headers of the studies still arriving and wakes when the first will be
complete. It chooses the CTPA series on those headers (:mod:`pedetect.hospital.selection`), predicts,
queues the alerts, makes the DICOM results from the prediction itself
(:class:`~pedetect.hospital.answer.DicomAnswer`), puts them in ``SPOOL/outbox/<study>/`` and marks the
study answered (``SPOOL/done/<study>.json``, written last). The node's delivery thread sends the outbox to the destination
(:mod:`pedetect.hospital.deliver`) and its alert thread the alerts, both retrying with back-off; a
result leaves the outbox only once the destination accepted it. :mod:`pedetect.hospital.monitor`
serves ``/healthz`` and ``/metrics`` (loopback by default).

Killed at any point and restarted on the same spool, the node predicts the studies received but not
answered and sends what the outbox still holds; results have UIDs derived from the study, the
bundle and the instances, so a study answered twice is stored once. Instances that are not CT
images are acknowledged and not kept (logged by SOP class). Logs name UIDs, never patient fields.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import multiprocessing
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from pedetect.config import StrictModel
from pedetect.dicom.guard import DEFAULT_DECODE_TIMEOUT_S
from pedetect.dicom.header import CT_SOP_CLASSES, sop_class_name
from pedetect.dicom.read import ScanMemo
from pedetect.hospital.alerts import AlertConfig, Alerts
from pedetect.hospital.deliver import Outbox, parse_destination
from pedetect.hospital.monitor import Monitor
from pedetect.hospital.selection import MIN_SLICES, select_series
from pedetect.infer.reader import StudyPlan, slice_decoder
from pedetect.infer.report import safe_name
from pedetect.io import read_json, write_bytes_atomic, write_json_atomic

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from pedetect.infer.predictor import Predictor, StudyPrediction

LOG = logging.getLogger("pedetect.serve")
INCOMING, OUTBOX, DONE, WORK, WORKERS = "incoming", "outbox", "done", "work", "workers"


@dataclass
class ServeConfig:
    model_dirs: Sequence[Path]
    spool: Path
    ae_title: str = "PEDETECT"
    host: str = "0.0.0.0"
    port: int = 11112
    settle: float = 10.0
    destination: str | None = None
    device: str = "auto"
    runtime: str = "auto"  # auto, torch, onnx or onnx-int8 (infer.predictor.Predictor)
    threads: int | None = None  # CPU threads of each worker's models (None: every core)
    min_slices: int = MIN_SLICES  # a usable series has at least this many slices (pedetect.hospital.selection)
    retry_first: float = 1.0  # seconds before the first retry of a delivery, doubled each time
    retry_max: float = 60.0
    poll: float = 0.2  # the longest an idle worker sleeps (it wakes sooner when a study will be complete)
    decode_timeout: float = (
        DEFAULT_DECODE_TIMEOUT_S  # seconds a slice may take to decode (0: no limit); past it the slice is lost
    )
    alerts: Path | None = None  # YAML of alert receivers (pedetect.hospital.alerts; docs/alerts.md)
    workers: int = 1  # prediction worker processes
    http_host: str = "127.0.0.1"  # /healthz and /metrics (pedetect.hospital.monitor)
    http_port: int = 9110  # 0: no HTTP endpoint


class ServeSettings(StrictModel):
    """``pedetect serve --config FILE`` (YAML; flags given on the command line override it): every key
    is optional but ``models``, and the defaults are the flags' (``pedetect serve --help``)."""

    models: list[Path] = Field(min_length=1)
    spool: Path = Path("pedetect-spool")
    ae_title: str = Field(default="PEDETECT", min_length=1, max_length=16)
    host: str = "0.0.0.0"
    port: int = Field(default=11112, ge=1, le=65535)
    settle: float = Field(default=10.0, ge=0)
    destination: str | None = None
    device: str = "auto"
    runtime: Literal["auto", "torch", "onnx", "onnx-int8"] = "auto"
    threads: int | None = Field(default=None, ge=1)
    min_slices: int = Field(default=MIN_SLICES, ge=1)
    decode_timeout: float = Field(default=DEFAULT_DECODE_TIMEOUT_S, ge=0)
    retry_max: float = Field(default=60.0, gt=0)
    alerts: Path | None = None
    workers: int = Field(default=1, ge=1, le=64)
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=9110, ge=0, le=65535)

    def serve_config(self) -> ServeConfig:
        values = self.model_dump()
        values["model_dirs"] = values.pop("models")
        return ServeConfig(**values)


@dataclass
class Spool:
    """The spool's folders and the state each study is in."""

    root: Path
    received: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        for name in (INCOMING, OUTBOX, DONE, WORK, WORKERS):
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

    def pending(self, settle: float, now: float | None = None) -> list[str]:
        """Studies received, not answered, and quiet for ``settle`` seconds; oldest first."""
        return self.states(settle, now)[0]

    def states(self, settle: float, now: float | None = None) -> tuple[list[str], dict[str, float]]:
        """The studies received and not answered: those quiet for ``settle`` seconds (oldest first), and
        those still arriving with the seconds until they will be (if nothing more comes)."""
        now = time.time() if now is None else now
        ready, arriving = [], {}
        for folder in (self.root / INCOMING).iterdir():
            if not folder.is_dir() or (self.root / DONE / f"{folder.name}.json").exists():
                continue
            last = max((p.stat().st_mtime for p in folder.glob("*.dcm")), default=None)
            if last is None:
                continue
            if now - last >= settle:
                ready.append((last, folder.name))
            else:
                arriving[folder.name] = settle - (now - last)
        return [name for _, name in sorted(ready)], arriving

    def last_received(self, study: str) -> float:
        return max((p.stat().st_mtime for p in self.study_dir(study).glob("*.dcm")), default=0.0)

    def unanswered(self) -> list[str]:
        """Studies received and not answered (complete or not)."""
        return [
            p.name
            for p in (self.root / INCOMING).iterdir()
            if p.is_dir() and not (self.root / DONE / f"{p.name}.json").exists()
        ]

    def claim_path(self, study: str) -> Path:
        return self.root / WORK / f"{study}.claim"

    @contextmanager
    def claim(self, study: str) -> Iterator[bool]:
        """Hold ``work/<study>.claim`` for the block (True), or False when another worker holds it: an
        ``fcntl.flock`` the kernel releases when its process ends, however it ends."""
        fd = os.open(self.claim_path(study), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _safe(uid: str) -> str:
    return safe_name(str(uid))


class Worker:
    """Predicts the spool's complete studies, oldest first, each under its claim: the predictor (every
    bundle) and the slice decoder loaded once, for the worker's life."""

    def __init__(
        self,
        config: ServeConfig,
        name: str = "worker-1",
        stop_event: threading.Event | None = None,
    ):
        self.config, self.name = config, name
        self.spool = Spool(config.spool)
        self.outbox = Outbox(self.spool.root / OUTBOX, None)  # put only: the node delivers
        self.stop_event = stop_event or threading.Event()
        self.predictor: Predictor | None = None  # loaded once (load)
        self.decode: Any = None  # the slice decoder (infer.reader.slice_decoder)
        self._resources: ExitStack | None = None
        self.alerts: Alerts | None = None  # queueing only, made with the predictor's operating points
        self.headers = ScanMemo()  # the headers of the studies arriving, scanned while they arrive
        self.status_path = self.spool.root / WORKERS / f"{name}.json"

    def status(self, state: str, study: str | None = None) -> None:
        """What the worker does now, for the node's /healthz (``SPOOL/workers/<name>.json``)."""
        write_json_atomic(
            self.status_path,
            {"name": self.name, "pid": os.getpid(), "state": state, "study": study, "since": time.time()},
        )

    def load(self) -> None:
        """The predictor (every bundle, once) and the slice decoder with its limit, for the worker's life."""
        from pedetect.infer.predictor import Predictor  # torch: in the worker processes only, never the node's

        if self.predictor is not None:
            return
        self.status("loading")
        started = time.time()
        self.predictor = Predictor(
            list(self.config.model_dirs),
            device=self.config.device,
            runtime=self.config.runtime,
            threads=self.config.threads,
        )
        self._resources = ExitStack()
        self.decode = self._resources.enter_context(slice_decoder(self.config.decode_timeout))
        # the worker's name is the prefix of its process's log lines (configure_logging)
        LOG.info("models loaded in %.1f s: %s", time.time() - started, self.predictor.description)
        if self.config.alerts is not None:
            from pedetect.hospital.identity import algorithm_of  # highdicom: where results are made

            self.alerts = Alerts(
                AlertConfig.from_yaml(self.config.alerts),
                self.spool.root / "alerts",
                algorithm_of(self.predictor.bundles).identity,
                operating_points=self.predictor.ensemble.operating_points,
                announce=False,
            )
        self.warm_up()
        self.status("idle")

    def warm_up(self) -> None:
        """Predict a small synthetic study (24 slices of 512², written in the worker's own folder of
        ``SPOOL/work``) and make its DICOM results, then throw both away: what a process does once on its
        first study (kernels chosen, fonts cached, modules imported: 1.6 s of the first study's 5.5 s with
        the demo bundle on 2 cores) is not paid by a patient's. A failure is logged, not fatal."""
        from pedetect.synth.dataset import write_dataset  # the phantom: the workers', not the node's

        assert self.predictor is not None
        folder = self.spool.root / WORK / f"warm-up-{self.name}"
        shutil.rmtree(folder, ignore_errors=True)
        started = time.time()
        try:
            write_dataset(
                folder / "study",
                1,
                slices=24,
                size=512,
                split="test",
                positive_fraction=1.0,
                indeterminate_fraction=0.0,
                progress=False,
            )
            files = sorted((folder / "study").rglob("*.dcm"))
            record, prediction, plan, notes = self._predict(files, "warm-up", min_slices=1)
            if prediction is None or plan is None:
                raise ValueError(record["error"])
            self._write_results(prediction, plan, notes, folder / "dicom")
            LOG.info("warmed up in %.1f s", time.time() - started)
        except Exception as error:
            LOG.warning("warm-up failed (%s: %s); the first study pays for it", type(error).__name__, error)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        if self._resources is not None:
            self._resources.close()
            self._resources = None

    def _predict(
        self, files: list[Path], name: str, min_slices: int
    ) -> tuple[dict, StudyPrediction | None, StudyPlan | None, list[str]]:
        """Choose the series among one study's ``files`` (``name`` in the log) and predict it: the
        study's record, its prediction, the plan of what was read (None, None when no series was
        usable) and the selection's notes."""
        self.load()
        assert self.predictor is not None
        selection = select_series(files, min_slices, scan=self.headers.scan)
        for line in selection.notes():
            LOG.info("study %s: %s", name, line)
        record: dict = {"series": selection.record()}
        if selection.chosen is None:
            record["error"] = "no usable CT series: " + "; ".join(selection.notes()[1:])
            return record, None, None, selection.notes()
        headers = selection.headers
        study = headers[0].study or name
        started = time.time()
        prediction = self.predictor.predict_headers(study, headers, selection.failures, self.decode)
        lost = [f"{Path(str(f.path)).name}: {f.reason}" for f in prediction.lost + prediction.unplaced]
        for line in lost:
            LOG.warning("study %s: file not used: %s", name, line)
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
        return record, prediction, plan, selection.notes()

    def _write_results(self, prediction: StudyPrediction, plan: StudyPlan, notes: list[str], folder: Path) -> None:
        """The study's DICOM results in ``folder/<study>/``."""
        from pedetect.hospital.answer import DicomAnswer  # highdicom: the workers', not the node's

        assert self.predictor is not None
        answer = DicomAnswer(folder, notes={plan.study: notes}, echo=lambda line: LOG.info("%s", line))
        answer.write(self.predictor, prediction, plan)

    def answer(self, study: str) -> None:
        """Predict one received study, queue its alerts, then its DICOM results, and mark it answered."""
        study_dir = self.spool.root / INCOMING / study
        work = self.spool.root / WORK / study
        shutil.rmtree(work, ignore_errors=True)
        started, last = time.time(), self.spool.last_received(study)
        self.status("predicting", study)
        files = sorted(study_dir.glob("*.dcm"))
        LOG.info("predicting study %s (%d instances, %.1f s after the last one)", study, len(files), started - last)
        record, prediction, plan, notes = self._predict(files, study, self.config.min_slices)
        if self.spool.last_received(study) > started:  # instances came in meanwhile: predict again when quiet
            LOG.info("study %s received more instances during prediction: predicted again when quiet", study)
            return
        if self.alerts is not None and prediction is not None:
            # The alert goes before the DICOM results are made (the people who act first). Queued before
            # the study is marked answered: a crash in between predicts it again, and the alert's id
            # (study, bundle, decision) replaces the pending one instead of adding a second.
            try:
                record["alerts"] = self.alerts.notify(
                    prediction.result, self.alerts.study_fields(files[0]) if files else {}
                )
            except Exception as error:  # the answer still goes out; the failure is logged
                LOG.error("study %s: alerts not queued: %s: %s", study, type(error).__name__, str(error)[:200])
        if prediction is not None and plan is not None:
            self._write_results(prediction, plan, notes, work / "dicom")
        queued = []
        for folder in (work / "dicom").glob("*"):
            for path in sorted(folder.glob("*.dcm")):
                self.outbox.put(folder.name, path)
                queued.append(path.name)
            self.outbox.seal(folder.name)
        record.update(
            {"study": study, "results": queued, "answered_at": time.time(), "last_received": last, "worker": self.name}
        )
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

    def take(self, study: str) -> bool:
        """Answer one complete study if no other worker holds it; True when this worker answered it."""
        if self.spool.done_path(study).exists():  # answered since this worker listed it
            return False
        claim = self.spool.claim_path(study)
        with self.spool.claim(study) as claimed:
            if not claimed:  # another worker has it
                return False
            if self.spool.done_path(study).exists():  # another worker just answered it
                claim.unlink(missing_ok=True)
                return False
            try:
                self.answer(study)
                # The claim's file goes with the answer (one empty file per study would pile up); a worker
                # that opened it meanwhile gets the lock after this one and finds the study answered.
                claim.unlink(missing_ok=True)
            except Exception as error:  # the study is answered with its reason; the worker goes on
                LOG.exception("study %s could not be answered: %s: %s", study, type(error).__name__, error)
                write_json_atomic(
                    self.spool.done_path(study),
                    {"study": study, "error": f"{type(error).__name__}: {error}", "worker": self.name},
                )
            finally:
                self.status("idle")
        return True

    def run(self, alive: Callable[[], bool] = lambda: True) -> None:
        """Answer complete studies until the stop event is set (or ``alive`` says the node is gone)."""
        self.load()
        try:
            while not self.stop_event.is_set() and alive():
                ready, arriving = self.spool.states(self.config.settle)
                self.headers.retain(self.spool.root / INCOMING / study for study in [*ready, *arriving])
                answered_one = False
                for study in ready:
                    if self.stop_event.is_set():
                        break
                    answered_one = self.take(study) or answered_one
                if answered_one:
                    continue  # more may have settled meanwhile
                # Idle: the headers of the studies still arriving are scanned now, not when they are
                # complete, and the worker wakes when the first of them will be.
                for study in arriving:
                    self.headers.scan(sorted((self.spool.root / INCOMING / study).glob("*.dcm")))
                wake = min(arriving.values(), default=self.config.poll)
                self.stop_event.wait(min(max(wake, 0.01), self.config.poll))
        finally:
            self.close()
            self.status("stopped")


def worker_process(config: ServeConfig, name: str, parent: int) -> None:
    """A worker process's life. SIGTERM (the node stopping): it finishes the study in hand and ends. The
    node gone however (SIGKILL included): the kernel kills it too (Linux's parent-death signal; the
    parent's pid is checked between studies besides), so no worker outlives its node and a restarted
    node finds each study answered or not, never half."""
    configure_logging(prefix=name)
    worker = Worker(config, name)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop_event.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the node, which stops its workers
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    worker.run(alive=lambda: os.getppid() == parent)


class Server:
    """The node: the SCP (started by :meth:`start`), the delivery and alert threads, the monitor, and
    the prediction workers (:meth:`run`)."""

    def __init__(self, config: ServeConfig):
        if config.workers < 1:
            raise ValueError(f"workers must be at least 1 (got {config.workers})")
        self.config = config
        self.spool = Spool(config.spool)
        self.destination = parse_destination(config.destination) if config.destination else None
        self.outbox = Outbox(
            self.spool.root / OUTBOX, self.destination, first=config.retry_first, most=config.retry_max
        )
        self.stop_event = threading.Event()
        self.ae: Any = None  # pynetdicom's AE
        self.server: Any = None  # its association server
        self.alerts = self._alerts() if config.alerts is not None else None  # delivery of what workers queue
        self.processes: dict[str, BaseProcess] = {}
        self.monitor = Monitor(self)
        for stale in (self.spool.root / WORKERS).glob("*.json"):  # what a previous node's workers said
            stale.unlink(missing_ok=True)

    def _alerts(self):
        # The bundles' metadata for the node's alert sender (torch and pandas come with them: only with alerts).
        from pedetect.hospital.identity import algorithm_of
        from pedetect.metric.calibrate import first_operating_points
        from pedetect.models.bundle import read_bundle

        bundles = [read_bundle(path) for path in self.config.model_dirs]
        return Alerts(
            AlertConfig.from_yaml(self.config.alerts),
            self.spool.root / "alerts",
            algorithm_of(bundles).identity,
            operating_points=first_operating_points([b.path for b in bundles]),
        )

    # -- the SCP
    def start(self) -> None:
        # The SCP's library: the node's, not its workers'.
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
        from pynetdicom.presentation import AllStoragePresentationContexts
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        ae = AE(ae_title=self.config.ae_title)
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        ae.maximum_pdu_size = 0
        handlers: list[Any] = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda event: 0x0000)]
        self.ae = ae
        self.server = ae.start_server((self.config.host, self.config.port), block=False, evt_handlers=handlers)
        LOG.info(
            "listening as %s on %s:%d; spool %s; destination %s; %d prediction worker(s)",
            self.config.ae_title,
            self.config.host,
            self.config.port,
            self.spool.root,
            self.destination.describe() if self.destination else "none (results stay in the outbox)",
            self.config.workers,
        )
        if self.config.http_port:
            self.monitor.start(self.config.http_host, self.config.http_port)

    def _on_store(self, event) -> int:
        started = time.perf_counter()
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
                self.monitor.received("not kept", started)
                return 0x0000
            if not study:
                LOG.warning("instance %s not kept: no StudyInstanceUID", sop)
                self.monitor.received("refused", started)
                return 0xC000  # cannot understand
            new = self.spool.store(study, sop, event.encoded_dataset())  # the bytes as sent, with their file meta
            LOG.debug("received %s of study %s%s", sop, study, "" if new else " (again: replaced)")
            if not new:
                LOG.info("instance %s of study %s received again: kept once", sop, study)
            self.monitor.received("kept", started)
            return 0x0000
        except Exception as error:  # the sender is told; nothing half-written stays (atomic writes)
            LOG.error("C-STORE failed: %s: %s", type(error).__name__, error)
            self.monitor.received("failed", started)
            return 0xA700  # out of resources

    # -- the workers
    def _start_process(self, name: str) -> None:
        # spawn, not fork: a forked child would inherit the SCP's threads and sockets
        process = multiprocessing.get_context("spawn").Process(
            target=worker_process, args=(self.config, name, os.getpid()), name=f"pedetect-{name}", daemon=False
        )
        process.start()
        self.processes[name] = process
        LOG.info("%s started (pid %d)", name, process.pid)

    @property
    def worker_names(self) -> list[str]:
        return [f"worker-{n}" for n in range(1, self.config.workers + 1)]

    def _supervise(self) -> None:
        """Start the worker processes and restart any that ends while the node runs."""
        for name in self.worker_names:
            self._start_process(name)
        while not self.stop_event.wait(1.0):
            for name, process in list(self.processes.items()):
                if not process.is_alive():
                    LOG.error("%s ended (exit code %s): started again", name, process.exitcode)
                    self._start_process(name)

    def _stop_processes(self) -> None:
        for process in self.processes.values():
            if process.is_alive():
                process.terminate()  # SIGTERM: the worker finishes nothing more and exits
        deadline = time.monotonic() + 30
        for process in self.processes.values():
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(5)

    def run(self) -> None:
        """Serve until :meth:`stop`: the SCP, the delivery, alert and monitor threads, and the workers."""
        if self.server is None:
            self.start()
        # The delivery and alert threads poll the spool often: the workers that fill it are other processes.
        threads = [
            threading.Thread(target=self.outbox.run, args=(self.stop_event, 0.05), name="pedetect-deliver", daemon=True)
        ]
        if self.alerts is not None:
            threads.append(
                threading.Thread(
                    target=self.alerts.run, args=(self.stop_event, 0.1), name="pedetect-alerts", daemon=True
                )
            )
        threads.append(
            threading.Thread(target=self.monitor.watch, args=(self.stop_event,), name="pedetect-monitor", daemon=True)
        )
        for thread in threads:
            thread.start()
        resumed = self.spool.unanswered()
        if resumed:
            LOG.info("resuming %d received study(ies) not yet answered: %s", len(resumed), ", ".join(resumed))
        try:
            self._supervise()
        finally:
            self.stop_event.set()
            self._stop_processes()
            self.shutdown()
            for thread in threads:
                thread.join(timeout=10)

    def stop(self) -> None:
        self.stop_event.set()

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        self.monitor.stop()


def answered(spool: Path, study: str) -> dict | None:
    """The record of an answered study (None: not answered)."""
    path = Path(spool) / DONE / f"{_safe(study)}.json"
    return read_json(path) if path.exists() else None


def configure_logging(level: int = logging.INFO, prefix: str = "") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {prefix + ': ' if prefix else ''}%(message)s"))
    root = logging.getLogger("pedetect")
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its debug logs would dump datasets
