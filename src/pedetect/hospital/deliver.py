"""Delivering DICOM results to a PACS: C-STORE (``dimse:AE@host:port``) or STOW-RS (``dicomweb:URL``),
from an outbox on disk (``OUTBOX/<study>/<file>.dcm``) that keeps every result until the destination
accepted it, retried with exponential back-off (and at once when a new result is queued)."""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from pedetect.io import atomic_path, write_bytes_atomic

LOG = logging.getLogger("pedetect.serve")
_DIMSE = re.compile(r"^dimse:(?P<ae>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})$")


class DeliveryError(Exception):
    """The destination did not accept a result (the message says which and why)."""


@dataclass(frozen=True)
class Destination:
    kind: str  # "dimse" or "dicomweb"
    url: str = ""
    ae_title: str = ""
    host: str = ""
    port: int = 0
    calling_ae: str = "PEDETECT"

    def describe(self) -> str:
        return (
            f"C-STORE to {self.ae_title}@{self.host}:{self.port}" if self.kind == "dimse" else f"STOW-RS to {self.url}"
        )

    def send(self, paths: list[Path]) -> None:
        """Send the files, SRs first (an SR carries the finding a worklist or viewer acts on: it arrives
        before the larger pictures and segmentations); :class:`DeliveryError` unless the destination
        accepted every one."""
        datasets = sorted((pydicom.dcmread(path) for path in paths), key=lambda ds: ds.get("Modality") != "SR")
        if self.kind == "dimse":
            self._c_store(datasets)
        else:
            self._stow(datasets)

    def _c_store(self, datasets: list[Any]) -> None:
        from pynetdicom import AE  # for dimse: destinations only (dicomweb: ones need none of it)

        ae = AE(ae_title=self.calling_ae)
        for syntax in dict.fromkeys(str(ds.SOPClassUID) for ds in datasets):
            ae.add_requested_context(
                syntax, [str(ds.file_meta.TransferSyntaxUID) for ds in datasets if str(ds.SOPClassUID) == syntax][:1]
            )
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        assoc = ae.associate(self.host, self.port, ae_title=self.ae_title)
        if not assoc.is_established:
            raise DeliveryError(f"{self.describe()}: association not established")
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                code = getattr(status, "Status", None)
                if code not in (0x0000, 0xB000, 0xB007, 0xB006):
                    raise DeliveryError(
                        f"{self.describe()}: {ds.SOPInstanceUID} refused (status {code if code is None else hex(code)})"
                    )
        finally:
            assoc.release()

    def _stow(self, datasets: list[Any]) -> None:
        from dicomweb_client.api import DICOMwebClient  # for dicomweb: destinations only

        try:
            DICOMwebClient(url=self.url).store_instances(datasets=datasets)
        except Exception as error:
            raise DeliveryError(f"{self.describe()}: {type(error).__name__}: {str(error)[:200]}") from None


def parse_destination(text: str, calling_ae: str = "PEDETECT") -> Destination:
    """``dimse:AE@host:port`` or ``dicomweb:URL``; ValueError naming the accepted forms otherwise."""
    match = _DIMSE.match(text)
    if match:
        return Destination(
            "dimse", ae_title=match["ae"], host=match["host"], port=int(match["port"]), calling_ae=calling_ae
        )
    if text.startswith("dicomweb:") and re.match(r"^https?://", text[len("dicomweb:") :]):
        return Destination("dicomweb", url=text[len("dicomweb:") :].rstrip("/"))
    raise ValueError(f"--destination {text!r}: expected dimse:AE@host:port or dicomweb:http(s)://host:port/path")


SEAL = ".sealed"  # in a study's outbox folder: its results are complete (Outbox.seal)


class Outbox:
    """Results waiting for the destination, one folder per study, sent once sealed."""

    def __init__(self, root: Path, destination: Destination | None, *, first: float = 1.0, most: float = 60.0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.destination = destination
        self.first, self.most = first, most
        self._due: dict[str, tuple[float, float]] = {}  # study -> (next try, current delay)
        self._wake = threading.Event()

    def put(self, study: str, path: Path) -> Path:
        """Queue a result file (copied, atomically, into the outbox)."""
        target = self.root / study / path.name
        with atomic_path(target) as tmp:
            shutil.copyfile(path, tmp)
        self._due.pop(study, None)
        return target

    def seal(self, study: str) -> None:
        """Mark a study's results complete (after every :meth:`put`): only sealed studies are sent, so
        a worker in another process still putting files never has half of them sent and the rest
        taken away with the folder. The seal holds a token of its own: a study sealed again while its
        earlier results are being sent keeps its new seal."""
        write_bytes_atomic(self.root / study / SEAL, uuid.uuid4().hex.encode())

    def wake(self) -> None:
        self._wake.set()

    def waiting(self) -> dict[str, list[Path]]:
        """The sealed studies' result files."""
        return {
            d.name: sorted(d.glob("*.dcm"))
            for d in sorted(self.root.iterdir())
            if d.is_dir() and (d / SEAL).exists() and any(d.glob("*.dcm"))
        }

    def deliver_due(self, now: float | None = None) -> None:
        """One pass: send every study whose retry time has come."""
        if self.destination is None:
            return
        now = time.monotonic() if now is None else now
        for study, paths in self.waiting().items():
            due, delay = self._due.get(study, (0.0, self.first))
            if due > now:
                continue
            try:
                token = (self.root / study / SEAL).read_bytes()
            except OSError:  # taken meanwhile (another pass): nothing to do
                continue
            try:
                self.destination.send(paths)
            except Exception as error:  # DeliveryError or the network's: kept, retried later
                self._due[study] = (now + delay, min(delay * 2, self.most))
                LOG.warning(
                    "delivery of study %s failed (%s); %d file(s) kept, retry in %.0f s",
                    study,
                    str(error)[:300],
                    len(paths),
                    delay,
                )
                continue
            for path in paths:
                path.unlink(missing_ok=True)
            seal = self.root / study / SEAL
            if seal.exists() and seal.read_bytes() == token:  # not sealed again meanwhile
                seal.unlink(missing_ok=True)
            try:
                (self.root / study).rmdir()  # only when nothing new came meanwhile
            except OSError:
                pass
            self._due.pop(study, None)
            LOG.info(
                "delivered study %s: %s (%s)", study, ", ".join(p.name for p in paths), self.destination.describe()
            )

    def run(self, stop: threading.Event, poll: float = 0.2) -> None:
        while not stop.is_set():
            self.deliver_due()
            self._wake.wait(poll)
            self._wake.clear()
