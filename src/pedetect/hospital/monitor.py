"""``pedetect serve``'s health and metrics: ``/healthz`` (JSON) and ``/metrics`` (Prometheus text format).

The node's counters come from what it does itself (instances received, the C-STORE handling time) and
from the spool, the one thing the node shares with its workers: each answered study's record
(``SPOOL/done/<study>.json``, written by whichever worker answered it) is counted once when it
appears, answered or failed, its latency (the study's last instance to its results queued) into a
histogram; the queue, the outbox and the alerts waiting are counted on disk. The endpoint listens on
loopback unless told otherwise: it says which studies wait, not who the patients are (UIDs only).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pedetect.io import read_json

LOG = logging.getLogger("pedetect.serve")
# Seconds from a study's last instance to its results queued: a CPU node answers a 250-slice study in
# seconds to a minute; a queue behind a burst takes longer.
LATENCY_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
STORE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)  # seconds to store one instance
READY = ("idle", "predicting")  # worker states of a node that answers


class Monitor:
    """The node's metrics (a registry of its own) and the HTTP endpoint that serves them."""

    def __init__(self, server: Any, poll: float = 0.5):
        self.server, self.poll = server, poll
        self.registry = CollectorRegistry()
        self.received_total = Counter(
            "pedetect_instances_received",
            "Instances received by C-STORE, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.store_seconds = Histogram(
            "pedetect_store_seconds",
            "Seconds to handle one C-STORE request",
            buckets=STORE_BUCKETS,
            registry=self.registry,
        )
        self.answered_total = Counter(
            "pedetect_studies_answered", "Studies answered with results", registry=self.registry
        )
        self.failed_total = Counter(
            "pedetect_studies_failed", "Studies answered with an error instead of results", registry=self.registry
        )
        self.latency = Histogram(
            "pedetect_answer_latency_seconds",
            "Seconds from a study's last instance received to its results queued",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue = Gauge("pedetect_queue_studies", "Studies received and not yet answered", registry=self.registry)
        self.outbox = Gauge(
            "pedetect_outbox_studies", "Studies whose results wait for the destination", registry=self.registry
        )
        self.alerts = Gauge("pedetect_alerts_pending", "Alerts waiting for their receiver", registry=self.registry)
        self.workers = Gauge(
            "pedetect_workers_ready", "Prediction workers with their models loaded", registry=self.registry
        )
        self._seen = self._done_names()  # what earlier nodes answered is not this node's
        self._http: ThreadingHTTPServer | None = None

    # -- counting
    def received(self, outcome: str, started: float) -> None:
        self.received_total.labels(outcome).inc()
        self.store_seconds.observe(time.perf_counter() - started)

    def _done_names(self) -> set[str]:
        # Names only (no stat per record): a study answered again lost its record meanwhile (a new
        # instance removes it), so it comes back as a new name.
        return {name for name in os.listdir(Path(self.server.spool.root) / "done") if name.endswith(".json")}

    def update(self) -> None:
        """Count the records answered since the last call; refresh the gauges."""
        done = Path(self.server.spool.root) / "done"
        current = self._done_names()
        for name in sorted(current - self._seen):
            try:
                record = read_json(done / name)
            except (OSError, ValueError):
                continue  # replaced meanwhile: counted when seen again
            if record.get("error"):
                self.failed_total.inc()
            else:
                self.answered_total.inc()
                if record.get("answered_at") and record.get("last_received"):
                    self.latency.observe(max(0.0, float(record["answered_at"]) - float(record["last_received"])))
        self._seen = current
        self.queue.set(len(self.server.spool.unanswered()))
        self.outbox.set(len(self.server.outbox.waiting()))
        if self.server.alerts is not None:
            self.alerts.set(len(self.server.alerts.pending()))
        self.workers.set(sum(1 for w in self.worker_states() if w.get("state") in READY))

    def watch(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.update()
            except Exception as error:  # the monitor never takes the node down
                LOG.error("monitor: %s: %s", type(error).__name__, str(error)[:200])
            stop.wait(self.poll)

    # -- health
    def worker_states(self) -> list[dict]:
        """Each worker's last word (SPOOL/workers/<name>.json), with whether its process lives."""
        states = []
        for name in self.server.worker_names:
            path = Path(self.server.spool.root) / "workers" / f"{name}.json"
            try:
                state = read_json(path)
            except (OSError, ValueError):
                state = {"name": name, "state": "starting"}
            process = self.server.processes.get(name)
            if process is not None and not process.is_alive():
                state["state"] = "ended"
            states.append(state)
        return states

    def health(self) -> tuple[bool, dict]:
        """(healthy, what /healthz says): the node listens and every worker has its models loaded."""
        workers = self.worker_states()
        listening = self.server.server is not None
        ok = listening and all(w.get("state") in READY for w in workers)
        unanswered = self.server.spool.unanswered()
        oldest = min((self.server.spool.last_received(s) for s in unanswered), default=None)
        return ok, {
            "status": "ok" if ok else ("starting" if listening else "not listening"),
            "listening": listening,
            "workers": [{k: w.get(k) for k in ("name", "state", "study", "since")} for w in workers],
            "queue": len(unanswered),
            "oldest_waiting_s": round(time.time() - oldest, 1) if oldest else None,
            "outbox": len(self.server.outbox.waiting()),
            "alerts_pending": len(self.server.alerts.pending()) if self.server.alerts is not None else None,
        }

    # -- the endpoint
    def start(self, host: str, port: int) -> None:
        monitor = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    monitor.update()
                    body, status, kind = generate_latest(monitor.registry), 200, CONTENT_TYPE_LATEST
                elif path in ("/healthz", "/health"):
                    ok, state = monitor.health()
                    body, status, kind = json.dumps(state).encode(), 200 if ok else 503, "application/json"
                else:
                    body, status, kind = b"/healthz or /metrics\n", 404, "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # scrapes are not news
                pass

        self._http = ThreadingHTTPServer((host, port), Handler)
        self._http.daemon_threads = True
        threading.Thread(target=self._http.serve_forever, name="pedetect-http", daemon=True).start()
        LOG.info("health and metrics on http://%s:%d/healthz and /metrics", host, port)

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
