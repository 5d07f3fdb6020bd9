"""``pedetect serve`` under load, on loopback: latency, a burst, a burst with a SIGKILL, and reception
while predicting.

Everything runs on this machine: synthetic CTPA studies (one positive study of ``--slices`` slices of
``--size``² written by ``pedetect synth``, cloned with new UIDs), a bundle of the demo recipe with
random weights (or ``--model``), the node as a process (``pedetect serve``), dcmtk's ``storescu`` as
the modality, the destination PACS (``--pacs scp``: a pynetdicom C-STORE SCP in this process, which
stamps each arrival; ``--pacs orthanc``: a real Orthanc on loopback ports, tests/helpers/orthanc.py,
asked by QIDO-RS every 50 ms whether the SR is there) and a JSON webhook receiver in this process as the
alert receiver. Phases:

1. **load once**: in this process, the series chosen and predicted as a worker does it, with a
   predictor made for each study (what serve did before it loaded its models once) and with one
   predictor made once; seconds per study and the ratio.
2. **latency**: ``--studies`` studies sent one after another (each by one ``storescu``); per study the
   seconds from its last instance received (the node's own record) to its SR at the destination and
   to its alert at the receiver; p50 / p95, and the same less ``--settle`` (the JSON lists each study's).
3. **reception while predicting**: a study sent, and while the node predicts it (its /healthz says so)
   a second one sent by pynetdicom from this process, each C-STORE's response time measured.
4. **burst**: ``--burst`` studies from ``--clients`` concurrent ``storescu`` clients: every study
   answered once, each SR at the destination once, studies per hour.
5. **burst with SIGKILL**: the same on a fresh spool, the node killed when a third of the studies are
   answered and started again on the spool: every study answered once, nothing lost.

    python benchmarks/serve.py [--studies 10] [--burst 20] [--clients 4] [--slices 250] [--size 512]
                               [--settle 1] [--workers 1] [--model BUNDLE] [--pacs scp|orthanc]
                               [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))  # helpers.orthanc: the tests' Orthanc, started the same way here
PEDETECT = str(Path(sys.executable).with_name("pedetect"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q
    low, high = int(position), min(int(position) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


# ---------------------------------------------------------------------------------------------- studies
def make_studies(folder: Path, count: int, slices: int, size: int) -> list[tuple[str, Path]]:
    """``count`` studies: one synthetic positive study and clones of it with new UIDs (the same pixels)."""
    import pydicom
    from pydicom.uid import generate_uid

    from pedetect.synth.dataset import write_dataset

    labels = write_dataset(
        folder / "synth", 1, slices=slices, size=size, seed=11, split="test", positive_fraction=0.98, progress=False
    )
    files = sorted((folder / "synth" / "test").rglob("*.dcm"))
    datasets = [pydicom.dcmread(f) for f in files]
    studies = []
    for k in range(count):
        study, series = generate_uid(entropy_srcs=[f"bench-serve-study-{k}"]), generate_uid()
        target = folder / "studies" / f"study{k:03d}"
        target.mkdir(parents=True)
        for n, ds in enumerate(datasets):
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.AccessionNumber = f"BENCH{k:04d}"
            ds.save_as(target / f"{n:04d}.dcm", enforce_file_format=True)
        studies.append((study, target))
    assert len(labels) > 0
    return studies


def storescu(port: int, folder: Path) -> subprocess.Popen:
    return subprocess.Popen(
        ["storescu", "-aet", "BENCH", "-aec", "PEDETECT", "+sd", "127.0.0.1", str(port), str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


# ------------------------------------------------------------------------------- destination and alerts
class Destination:
    """A pynetdicom C-STORE SCP: the arrival time of each result, by study and modality."""

    def __init__(self) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
        from pynetdicom.presentation import AllStoragePresentationContexts

        self.port, self.lock = free_port(), threading.Lock()
        self.arrivals: dict[str, dict[str, list[tuple[float, str]]]] = {}
        ae = AE(ae_title="DEST")
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)

        def on_store(event):
            ds = event.dataset
            with self.lock:
                kinds = self.arrivals.setdefault(str(ds.StudyInstanceUID), {})
                kinds.setdefault(str(ds.Modality), []).append((time.time(), str(ds.SOPInstanceUID)))
            return 0x0000

        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def first(self, study: str, modality: str = "SR") -> float | None:
        with self.lock:
            got = self.arrivals.get(study, {}).get(modality)
            return got[0][0] if got else None

    def distinct(self, study: str, modality: str = "SR") -> int:
        with self.lock:
            return len({uid for _, uid in self.arrivals.get(study, {}).get(modality, [])})

    def stop(self) -> None:
        self.server.shutdown()


class OrthancDestination:
    """A real Orthanc (its own configuration and storage under ``folder``, loopback ports) as the
    destination: the time each study's SR is first seen there, by QIDO-RS every 50 ms (the latency
    phase's ``wait_until`` poll), so a time is at most ~50 ms plus one query late."""

    def __init__(self, folder: Path) -> None:
        from helpers.orthanc import Orthanc

        self.orthanc = Orthanc(folder, free_port())
        self.orthanc.start()
        self.port, self.lock, self.seen = self.orthanc.dicom, threading.Lock(), {}

    def _sr_instances(self, study: str) -> set[str]:
        uids: set[str] = set()
        for series in self.orthanc.series_of(study).get("SR", []):
            for item in self.orthanc.get(f"/dicom-web/studies/{study}/series/{series}/instances") or []:
                uids.add(item["00080018"]["Value"][0])
        return uids

    def first(self, study: str, modality: str = "SR") -> float | None:
        assert modality == "SR", "only SRs are looked for in Orthanc"
        with self.lock:
            if study not in self.seen and self._sr_instances(study):
                self.seen[study] = time.time()
            return self.seen.get(study)

    def distinct(self, study: str, modality: str = "SR") -> int:
        assert modality == "SR", "only SRs are looked for in Orthanc"
        return len(self._sr_instances(study))

    def stop(self) -> None:
        self.orthanc.stop()


def make_destination(kind: str, folder: Path) -> Destination | OrthancDestination:
    return OrthancDestination(folder) if kind == "orthanc" else Destination()


class Webhook:
    """A JSON webhook receiver: the arrival time of each study's first alert."""

    def __init__(self) -> None:
        self.port, self.arrivals, self.lock = free_port(), {}, threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with receiver.lock:
                    receiver.arrivals.setdefault(str(body.get("study")), time.time())
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.http.shutdown()


# ------------------------------------------------------------------------------------------------ node
class Node:
    def __init__(self, args, model: Path, spool: Path, destination, webhook: Webhook, port: int):
        self.spool, self.port, self.http_port = spool, port, free_port()
        alerts = spool.parent / f"{spool.name}-alerts.yaml"
        alerts.write_text(f"alerts:\n  receivers:\n    - {{kind: webhook, url: 'http://127.0.0.1:{webhook.port}/'}}\n")
        self.log = spool.parent / f"{spool.name}.log"
        command = [
            PEDETECT, "serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--spool", str(spool), "--settle", str(args.settle), "--device", "cpu", "--retry-max", "1",
            "--destination", f"dimse:{'ORTHANC' if args.pacs == 'orthanc' else 'DEST'}@127.0.0.1:{destination.port}", "--alerts", str(alerts),
            "--workers", str(args.workers), "--http-port", str(self.http_port), "--runtime", args.runtime,
        ]  # fmt: skip
        self.handle = open(self.log, "a")
        self.process = subprocess.Popen(command, stdout=self.handle, stderr=subprocess.STDOUT)
        wait_until(lambda: self.health().get("status") == "ok", 300, "the node's models to load")

    def health(self) -> dict:
        import urllib.error
        import urllib.request

        if self.process.poll() is not None:
            raise RuntimeError(f"the node ended: {self.log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=2) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            return json.loads(error.read() or b"{}")
        except OSError:
            return {}

    def record(self, study: str) -> dict | None:
        from pedetect.hospital.serve import answered

        return answered(self.spool, study)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.handle.close()


# ---------------------------------------------------------------------------------------------- phases
def load_once(model: Path, studies: list[tuple[str, Path]], repeats: int, runtime: str = "auto") -> dict:
    from pedetect.hospital.selection import select_series
    from pedetect.infer.predictor import Predictor

    def one(predictor, folder: Path) -> None:
        selection = select_series(sorted(folder.glob("*.dcm")), 20)
        predictor.predict_headers(selection.headers[0].study, selection.headers, selection.failures, None)

    def load():
        return Predictor([model], device="cpu", runtime=runtime)

    one(load(), studies[0][1])  # warm-up: imports, allocator
    each, once = [], []
    for _, folder in studies[1 : repeats + 1]:
        started = time.perf_counter()
        one(load(), folder)
        each.append(time.perf_counter() - started)
    predictor = load()
    for _, folder in studies[1 : repeats + 1]:
        started = time.perf_counter()
        one(predictor, folder)
        once.append(time.perf_counter() - started)
    return {
        "predictor_per_study_s": statistics.median(each),
        "predictor_once_s": statistics.median(once),
        "ratio": statistics.median(each) / statistics.median(once),
    }


def latency(args, node: Node, destination, webhook: Webhook, studies) -> dict:
    to_sr, to_alert, predict_s = [], [], []
    for study, folder in studies:
        client = storescu(node.port, folder)
        if client.wait(600):
            raise RuntimeError(f"storescu failed: {client.stderr.read().decode()[-500:]}")
        record = wait_until(lambda study=study: node.record(study), 600, f"study {study} answered")
        sr = wait_until(lambda study=study: destination.first(study), 120, "its SR at the destination")
        alert = wait_until(lambda study=study: webhook.arrivals.get(study), 120, "its alert")
        to_sr.append(sr - record["last_received"])
        to_alert.append(alert - record["last_received"])
        predict_s.append(record.get("seconds", float("nan")))
    return {
        "studies": len(studies),
        "to_sr_p50_s": percentile(to_sr, 0.5),
        "to_sr_p95_s": percentile(to_sr, 0.95),
        "to_alert_p50_s": percentile(to_alert, 0.5),
        "to_alert_p95_s": percentile(to_alert, 0.95),
        "to_sr_after_settle_p50_s": percentile(to_sr, 0.5) - args.settle,
        "to_sr_after_settle_p95_s": percentile(to_sr, 0.95) - args.settle,
        "predict_p50_s": percentile(predict_s, 0.5),
        "to_sr_s": [round(v, 3) for v in to_sr],  # each study's, in the order sent
        "to_alert_s": [round(v, 3) for v in to_alert],
        "predict_s": predict_s,
    }


def reception_while_predicting(node: Node, first: tuple[str, Path], second: tuple[str, Path]) -> dict:
    import pydicom
    from pynetdicom import AE

    client = storescu(node.port, first[1])
    client.wait(600)
    wait_until(
        lambda: any(w.get("state") == "predicting" for w in node.health().get("workers", [])), 120, "a prediction"
    )
    datasets = [pydicom.dcmread(p) for p in sorted(second[1].glob("*.dcm"))]
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(str(datasets[0].SOPClassUID), [str(datasets[0].file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PEDETECT")
    times, during = [], []
    try:
        for ds in datasets:
            started = time.time()
            status = assoc.send_c_store(ds)
            times.append(time.time() - started)
            during.append(started)
            assert status.Status == 0, status
    finally:
        assoc.release()
    record = wait_until(lambda: node.record(first[0]), 600, "the first study answered")
    wait_until(lambda: node.record(second[0]), 600, "the second study answered")
    predicting_from = record["answered_at"] - record["seconds"]
    overlapped = [t for t, s in zip(times, during) if predicting_from <= s <= record["answered_at"]]
    return {
        "instances": len(times),
        "during_prediction": len(overlapped),
        "p50_ms": 1000 * percentile(overlapped, 0.5),
        "p95_ms": 1000 * percentile(overlapped, 0.95),
        "max_ms": 1000 * max(overlapped, default=float("nan")),
    }


def burst(args, node_factory, destination, studies, kill: bool) -> dict:
    node = node_factory()
    queue = list(studies)
    lock = threading.Lock()
    failures: list[str] = []

    def client() -> None:
        while True:
            with lock:
                if not queue:
                    return
                _, folder = queue.pop(0)
            process = storescu(node.port, folder)
            if process.wait(900):
                failures.append(process.stderr.read().decode()[-300:])

    started = time.time()
    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    restarts = 0
    if kill:
        wait_until(lambda: sum(bool(node.record(s)) for s, _ in studies) >= len(studies) // 3, 1800, "a third answered")
        node.kill()
        restarts = 1
        for thread in threads:  # what the modalities were sending when the node died is sent again
            thread.join(900)
        node = node_factory()
        for study, folder in studies:  # the modalities send again what was not answered (a broken association)
            if not node.record(study) and storescu(node.port, folder).wait(900):
                raise RuntimeError(f"storescu failed after the restart on {folder}")
    for thread in threads:
        thread.join(900)
    wait_until(lambda: all(node.record(s) for s, _ in studies), 3600, "every study answered")
    done = time.time()
    wait_until(lambda: all(destination.first(s) for s, _ in studies), 600, "every SR at the destination")
    time.sleep(2.0)
    log = node.log.read_text()
    node.stop()
    answered_once = all(log.count(f"study {s} answered in") == 1 for s, _ in studies)
    return {
        "studies": len(studies),
        "clients": args.clients,
        "killed_and_restarted": restarts,
        "seconds": done - started,
        "studies_per_hour": 3600 * len(studies) / (done - started),
        "every_study_answered": True,
        "answered_once_each": answered_once,
        "one_sr_per_study_at_the_destination": all(destination.distinct(s) == 1 for s, _ in studies),
        "storescu_associations_failed": len(failures),  # with the kill: those the kill broke, sent again
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--burst", type=int, default=20)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--slices", type=int, default=250)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--runtime", default="auto", help="the node's --runtime (auto, torch, onnx, onnx-int8)")
    parser.add_argument("--repeats", type=int, default=3, help="studies of the load-once phase")
    parser.add_argument("--model", type=Path, default=None, help="a bundle (default: the demo recipe, random weights)")
    parser.add_argument("--phases", default="load,latency,reception,burst,kill")
    parser.add_argument(
        "--pacs", choices=("scp", "orthanc"), default="scp", help="the destination: a pynetdicom SCP or a real Orthanc"
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--logs", type=Path, default=None, help="copy the nodes' logs into this folder")
    args = parser.parse_args()
    if shutil.which("storescu") is None:
        raise SystemExit("storescu not found (Debian package dcmtk)")
    phases = set(args.phases.split(","))
    from pedetect.recipe import load_experiment
    from pedetect.testing import write_random_bundle

    out: dict = {
        "slices": args.slices,
        "size": args.size,
        "settle_s": args.settle,
        "workers": args.workers,
        "runtime": args.runtime,
        "pacs": args.pacs,
        "model": str(args.model) if args.model else "demo recipe, random weights",
    }
    with tempfile.TemporaryDirectory(prefix="pedetect-bench-serve-") as scratch:
        root = Path(scratch)
        if args.model is None:
            config = load_experiment(ROOT / "configs" / "demo.yaml")
            model = write_random_bundle(config, root / "model", folds=config.data.folds)
        else:
            model = args.model
        count = max(args.studies + 2, args.burst, args.repeats + 1)
        started = time.time()
        studies = make_studies(root, count, args.slices, args.size)
        print(f"{count} studies of {args.slices} × {args.size}² written in {time.time() - started:.0f} s", flush=True)
        destination, webhook = make_destination(args.pacs, root / "pacs-latency"), Webhook()
        try:
            if "load" in phases:
                out["load_once"] = load_once(model, studies, args.repeats, args.runtime)
                print("load once:", out["load_once"], flush=True)
            port = free_port()
            if {"latency", "reception"} & phases:
                node = Node(args, model, root / "spool-latency", destination, webhook, port)
                try:
                    if "latency" in phases:
                        out["latency"] = latency(args, node, destination, webhook, studies[: args.studies])
                        print("latency:", out["latency"], flush=True)
                    if "reception" in phases:
                        pair = studies[args.studies : args.studies + 2]
                        out["reception"] = reception_while_predicting(node, pair[0], pair[1])
                        print("reception while predicting:", out["reception"], flush=True)
                finally:
                    node.stop()
            for phase, kill in (("burst", False), ("kill", True)):
                if phase not in phases:
                    continue
                spool = root / f"spool-{phase}"
                shutil.rmtree(spool, ignore_errors=True)
                target = make_destination(args.pacs, root / f"pacs-{phase}")
                try:
                    out[phase] = burst(
                        args,
                        lambda spool=spool, target=target: Node(args, model, spool, target, webhook, port),
                        target,
                        studies[: args.burst],
                        kill,
                    )
                finally:
                    target.stop()
                print(f"{phase}:", out[phase], flush=True)
                shutil.rmtree(spool, ignore_errors=True)
        finally:
            destination.stop()
            webhook.stop()
            if args.logs is not None:
                args.logs.mkdir(parents=True, exist_ok=True)
                for log in root.glob("spool-*.log"):
                    shutil.copy(log, args.logs / log.name)
                for log in root.glob("pacs-*/orthanc.log"):
                    shutil.copy(log, args.logs / f"{log.parent.name}.log")
    out["cpus"] = os.cpu_count()
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
