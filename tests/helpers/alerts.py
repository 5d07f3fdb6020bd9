"""An HTTP receiver of alerts on 127.0.0.1 (http.server in a thread): a FHIR endpoint that checks
each transaction with ``fhir.resources`` (R4B), or a JSON webhook (tests/hospital/test_alerts.py,
tests/hospital/test_serve.py)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pydantic import ValidationError


class HTTPReceiver:
    """A small HTTP server in a thread. ``fhir``: each POSTed transaction Bundle is checked with
    fhir.resources (R4B) and its resources stored by type/id; otherwise the JSON body and headers
    are kept. ``status``: what it answers (500: an OperationOutcome)."""

    def __init__(self, fhir: bool = False, port: int = 0):
        self.fhir, self.status = fhir, 200
        self.posts: list[tuple[dict, dict]] = []  # (headers, body)
        self.stored: dict[str, dict] = {}  # "Type/id" -> resource
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                code, answer = receiver.answer(dict(self.headers), body)
                data = json.dumps(answer).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/fhir+json" if receiver.fhir else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}" + ("/fhir" if fhir else "/hook")
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def answer(self, headers: dict, body: bytes) -> tuple[int, dict]:
        document = json.loads(body)
        if self.status != 200:
            return self.status, {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "exception", "diagnostics": "database is locked"}],
            }
        if not self.fhir:
            self.posts.append((headers, document))
            return 200, {"ok": True}
        from fhir.resources.R4B import get_fhir_model_class
        from fhir.resources.R4B.bundle import Bundle

        try:
            Bundle.model_validate(document)
            for entry in document["entry"]:  # each resource as its own type
                get_fhir_model_class(entry["resource"]["resourceType"]).model_validate(entry["resource"])
        except ValidationError as error:
            return 400, {"resourceType": "OperationOutcome", "issue": [{"diagnostics": str(error)[:200]}]}
        assert document["type"] == "transaction" and headers["Content-Type"] == "application/fhir+json"
        self.posts.append((headers, document))
        statuses = []
        for entry in document["entry"]:
            assert entry["request"]["method"] == "PUT"
            key = entry["request"]["url"]
            assert key == f"{entry['resource']['resourceType']}/{entry['resource']['id']}"
            assert entry["fullUrl"] == f"{self.url}/{key}"
            statuses.append("200 OK" if key in self.stored else "201 Created")
            self.stored[key] = entry["resource"]
        entries = [{"response": {"status": s}} for s in statuses]
        return 200, {"resourceType": "Bundle", "type": "transaction-response", "entry": entries}

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
