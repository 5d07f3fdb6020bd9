"""``pedetect serve`` as a process on loopback and the DICOM network around it: free ports, waiting
with a deadline, C-ECHO and C-STORE as a modality, a C-STORE SCP standing in for the destination
PACS. The fixtures built on these (``serves``, ``study``) are in tests/hospital/conftest.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom

SLICES, SIZE = 10, 64  # the serve tests' study (``study`` in tests/hospital/conftest.py)
PEDETECT = str(Path(sys.executable).with_name("pedetect"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what: str, process: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            break
        time.sleep(0.1)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def echo_ok(port: int, ae_title: str = "PEDETECT") -> bool:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 2
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return getattr(status, "Status", None) == 0x0000


def c_store(port: int, paths: list[Path], ae_title: str = "PEDETECT") -> list[int]:
    """Send files in one association; their statuses."""
    from pynetdicom import AE

    datasets = [pydicom.dcmread(p) for p in paths]
    ae = AE(ae_title="TESTSCU")
    for uid in dict.fromkeys((str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets):
        ae.add_requested_context(uid[0], [uid[1]])
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    assert assoc.is_established
    try:
        return [assoc.send_c_store(ds).Status for ds in datasets]
    finally:
        assoc.release()


class Serve:
    """``pedetect serve`` in a subprocess (stopped, or killed, by its pid)."""

    def __init__(
        self,
        model: Path | None,
        spool: Path,
        destination: str | None,
        *,
        settle: float = 0.5,
        port: int | None = None,
        extra: tuple[str, ...] = (),
    ):
        self.port = port or free_port()
        self.http_port = free_port()
        self.log = spool.parent / f"{spool.name}-serve.log"
        args = [
            PEDETECT,
            "serve",
            *(["--model", str(model)] if model is not None else []),
            "--ae-title",
            "PEDETECT",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--spool",
            str(spool),
            "--settle",
            str(settle),
            "--device",
            "cpu",
            "--retry-max",
            "1",
            "--min-slices",
            "8",
            "--http-port",
            str(self.http_port),
        ]
        args += ["--destination", destination] if destination else []
        args += list(extra)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.handle = open(self.log, "a")
        self.process = subprocess.Popen(args, stdout=self.handle, stderr=subprocess.STDOUT, env=env)
        wait_for(lambda: echo_ok(self.port), 90, "pedetect serve to answer C-ECHO", self.process, self.log)

    def text(self) -> str:
        return self.log.read_text()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.handle.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


class StoreSCP:
    """A destination PACS stand-in: a real pynetdicom C-STORE SCP keeping what it receives."""

    def __init__(self, port: int, folder: Path):
        self.port, self.folder, self.server = port, folder, None
        self.received: list[pydicom.Dataset] = []
        self.lock = threading.Lock()

    def start(self) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
        from pynetdicom.presentation import AllStoragePresentationContexts

        ae = AE(ae_title="DEST")
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)

        def on_store(event):
            ds = event.dataset
            ds.file_meta = event.file_meta
            with self.lock:
                self.received.append(ds)
            ds.save_as(self.folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
            return 0x0000

        self.folder.mkdir(parents=True, exist_ok=True)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def of_study(self, study: str) -> dict[str, list]:
        with self.lock:
            found: dict[str, list] = {}
            for ds in self.received:
                if ds.StudyInstanceUID == study:
                    found.setdefault(str(ds.Modality), []).append(ds)
            return found
