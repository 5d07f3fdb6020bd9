"""A time limit on decoding each slice: the decoders run in a child process that is killed and
replaced when one slice takes longer than the limit (docs/reliability.md, "A decoder that hangs").
Uncompressed 16-bit slices need no decoder (:func:`pedetect.dicom.read.read_native`: the words at the
offset the scan found, through a lookup table) and are read in the caller's process: sent through
the child they cost a pipe's copy each, 0.6-1.3 s of a 250-slice 512 × 512 study's 2-3 s prediction
(docs/serve.md, "Measured").

A decoder stuck inside C code (OpenJPEG, CharLS, libjpeg, GDCM, the Rust RLE decoder) cannot be
interrupted from Python: no signal handler runs until it returns, and a thread cannot be stopped.
A process can be killed. :class:`DecodeGuard` keeps one child (``python -m pedetect.dicom.guard``)
per process that decodes (prepare's worker processes, Dask workers, or prepare itself), sends it
one slice at a time, and waits for the answer at most ``limit_s`` seconds: past that the child is
killed (SIGKILL), the slice becomes a failure (``decoding took longer than N s …``) and the next
slice starts a fresh child. A child that dies while decoding (a decoder that aborts the process)
is a failure of that slice too, and is replaced. The other frames of a multi-frame file whose frame
ran out of time fail at once instead of costing the limit each.

The child is our own code and sends back only raw bytes (the windowed slice, or the failure's
reason as UTF-8), never a pickle: nothing it decodes can make the parent run anything.
"""

from __future__ import annotations

import importlib
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
from typing import Any

import numpy as np

import pedetect
from pedetect.dicom.header import DicomError, SliceHeader, describe_error, is_input_failure
from pedetect.dicom.read import read_native, read_slice
from pedetect.dicom.source import SourceError

# Seconds one slice may take to decode. A 512 × 512 JPEG 2000 slice decodes in about 0.05 s and a
# 4096 × 4096 one (the largest a slice may declare) in a few seconds on a loaded core.
DEFAULT_DECODE_TIMEOUT_S = 60.0
# Seconds a fresh child may take to import the decoders (not counted against any slice).
START_TIMEOUT_S = 300.0

_READY = b"R"
_IMAGE = b"I"
_FAILURE = b"F"


class DecoderUnavailable(RuntimeError):
    """The decoding process could not be started (not a fault of any input)."""


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes | None:
    """``n`` bytes from ``fd``; None at end of file; raises TimeoutError past ``deadline`` (monotonic)."""
    parts, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


class DecodeGuard:
    """Decode slices in a child process with a per-slice time limit (see the module's docstring)."""

    def __init__(self, limit_s: float = DEFAULT_DECODE_TIMEOUT_S):
        if not limit_s > 0:
            raise ValueError(f"the decode time limit must be positive, got {limit_s}")
        self.limit_s = float(limit_s)
        self._child: subprocess.Popen | None = None
        self._timed_out: set[str] = set()
        self.restarts = 0

    # -------------------------------------------------------------------------------- the child
    def _start(self) -> subprocess.Popen:
        root = os.path.dirname(os.path.dirname(os.path.abspath(pedetect.__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        try:
            child = subprocess.Popen(
                [sys.executable, "-m", "pedetect.dicom.guard"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=env,
                close_fds=True,
            )
        except OSError as error:
            raise DecoderUnavailable(f"the decoding process could not be started ({describe_error(error)})") from None
        try:
            ready = _read_exact(child.stdout.fileno(), 1, time.monotonic() + START_TIMEOUT_S)  # type: ignore[union-attr]
        except TimeoutError:
            ready = None
        if ready != _READY:
            self._kill(child)
            raise DecoderUnavailable(f"the decoding process did not start within {START_TIMEOUT_S:g} s")
        return child

    @staticmethod
    def _kill(child: subprocess.Popen) -> None:
        try:
            child.kill()
        except ProcessLookupError:
            pass
        child.wait()
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass

    def close(self) -> None:
        """End the child (it also ends by itself when this process's end of its pipe closes)."""
        if self._child is not None:
            self._kill(self._child)
            self._child = None

    def __enter__(self) -> DecodeGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------------------- reading
    def read(
        self, header: SliceHeader, windows: Any = None, image_size: int | None = None, *, bgr: bool = False
    ) -> np.ndarray:
        """:func:`pedetect.dicom.read.read_slice` in the child, within the time limit; a failure raises
        :class:`~pedetect.dicom.header.DicomError` with the reason its failure row records."""
        if "native" in header.extra:  # no decoder: read here (see the module's docstring)
            try:
                image = read_native(header, windows, image_size, bgr=bgr)
            except BaseException as error:
                if not is_input_failure(error):
                    raise
                raise DicomError(_failure_reason(error)) from None
            if image is not None:
                return image
        if header.label in self._timed_out:
            raise DicomError(
                f"not decoded: another frame of this file took longer than {self.limit_s:g} s to decode (the per-file time limit)"
            )
        if self._child is None:
            self._child = self._start()
        child = self._child
        request = pickle.dumps((header, windows, image_size, bgr), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            child.stdin.write(struct.pack("<Q", len(request)) + request)  # type: ignore[union-attr]
            child.stdin.flush()  # type: ignore[union-attr]
        except (BrokenPipeError, OSError):
            return self._crashed(child)
        fd = child.stdout.fileno()  # type: ignore[union-attr]
        deadline = time.monotonic() + self.limit_s
        try:
            head = _read_exact(fd, 1 + 16, deadline)
            if head is None:
                return self._crashed(child)
            kind = head[:1]
            if kind == _IMAGE:
                h, w, c, n = struct.unpack("<IIII", head[1:])
                body = _read_exact(fd, n, deadline)
                if body is None or len(body) != h * w * c:
                    return self._crashed(child)
                return np.frombuffer(body, dtype=np.uint8).reshape(h, w, c)
            if kind == _FAILURE:
                (n,) = struct.unpack("<I", head[1:5])
                body = _read_exact(fd, n, deadline)
                if body is None:
                    return self._crashed(child)
                raise DicomError(body.decode("utf-8", "replace"))
            return self._crashed(child)
        except TimeoutError:
            self._kill(child)
            self._child = None
            self.restarts += 1
            if "frame" in header.extra:
                self._timed_out.add(header.label)
            raise DicomError(
                f"decoding took longer than {self.limit_s:g} s (the per-file time limit, --decode-timeout): stopped"
            ) from None

    def _crashed(self, child: subprocess.Popen) -> np.ndarray:
        self._kill(child)
        self._child = None
        self.restarts += 1
        code = child.returncode
        how = (
            f"signal {-code} ({signal.Signals(-code).name})"
            if code is not None and code < 0 and -code in signal.valid_signals()
            else f"exit status {code}"
        )
        raise DicomError(f"pixel data unreadable (the decoder ended its process: {how})")


# ---------------------------------------------------------------------------------- the child's side
def _failure_reason(error: BaseException) -> str:
    return error.reason if isinstance(error, SourceError) else f"pixel data unreadable ({describe_error(error)})"


def serve() -> None:
    """The child: read requests on stdin, answer on stdout, until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the parent, which then closes our stdin
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing a library prints may mix with the answers
    _warm_up()
    sink.write(_READY)
    sink.flush()
    while True:
        head = source.read(8)
        if len(head) < 8:
            return
        (n,) = struct.unpack("<Q", head)
        header, windows, image_size, bgr = pickle.loads(source.read(n))
        try:
            image = np.ascontiguousarray(read_slice(header, windows, image_size, bgr=bgr), dtype=np.uint8)
        except BaseException as error:  # every input failure goes back as a reason
            if not is_input_failure(error):
                raise
            reason = _failure_reason(error).encode("utf-8", "replace")
            sink.write(_FAILURE + struct.pack("<IIII", len(reason), 0, 0, 0) + reason)
        else:
            h, w, c = image.shape
            sink.write(_IMAGE + struct.pack("<IIII", h, w, c, image.nbytes) + image.tobytes())
        sink.flush()


def _warm_up() -> None:
    """Import the decoders and the windowing now, so a slice's time limit is not spent importing them."""
    for name in ("cv2", "pydicom.pixels", "pydicom.encaps", "openjpeg", "rle", "libjpeg", "jpeg_ls", "gdcm"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


if __name__ == "__main__":
    serve()
