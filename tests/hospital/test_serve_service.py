"""``pedetect serve`` as a service: several prediction workers sharing only the spool, a YAML config,
``/healthz`` and ``/metrics`` (Prometheus text), and no worker outliving a node killed with SIGKILL.

Real parts: the node as a process on loopback, dcmtk's ``storescu`` as the modalities (four at once),
the HTTP endpoint read with urllib and its metrics parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from helpers.serve import PEDETECT, SIZE, SLICES, wait_for
from helpers.train import tiny_config
from pedetect.hospital.serve import answered
from pedetect.synth import write_dataset
from pedetect.testing import write_random_bundle

N_STUDIES = 4


@pytest.fixture(scope="module")
def burst(tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    labels = write_dataset(root / "data", N_STUDIES, slices=SLICES, size=SIZE, seed=21, split="test", progress=False)
    model = write_random_bundle(tiny_config(), root / "model", folds=2)
    studies = {
        uid: sorted((root / "data" / "test" / uid).rglob("*.dcm")) for uid in labels["StudyInstanceUID"].unique()
    }
    assert len(studies) == N_STUDIES
    return studies, model


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def metrics(port: int) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    status, text = http_get(port, "/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def send_concurrently(port: int, studies: dict[str, list[Path]], clients: int) -> list[int]:
    """Each study sent by its own dcmtk ``storescu`` (one association), ``clients`` at a time, as
    modalities do; their exit codes."""
    import shutil

    if shutil.which("storescu") is None:
        pytest.fail("storescu not installed (Debian package dcmtk; .ci/run installs it)")
    codes: list[int] = []
    lock = threading.Lock()
    queue = list(studies.values())

    def client() -> None:
        while True:
            with lock:
                if not queue:
                    return
                files = queue.pop()
            run = subprocess.run(
                ["storescu", "-aet", "MODALITY", "-aec", "PEDETECT", "127.0.0.1", str(port), *map(str, files)],
                capture_output=True,
                text=True,
                timeout=120,
            )
            with lock:
                codes.append(run.returncode)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(150)
    return codes


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def test_two_workers_from_a_config_file_answer_a_burst_once_each_and_the_metrics_count_it(burst, serves, tmp_path):
    studies, model = burst
    config = tmp_path / "serve.yaml"
    # Paths relative to the file; the flags the test gives (port, spool, ...) beside it.
    config.write_text(f"models: [{os.path.relpath(model, tmp_path)}]\nworkers: 2\nsettle: 0.5\n")
    spool = tmp_path / "spool"
    node = serves(None, spool, None, settle=0.5, extra=("--config", str(config)))
    ready = wait_for(
        lambda: (lambda r: r if r[0] == 200 else None)(http_get(node.http_port, "/healthz")),
        120,
        "both workers to load their models",
        node.process,
        node.log,
    )
    health = json.loads(ready[1])
    assert health["status"] == "ok" and health["listening"] and health["queue"] == 0
    assert [w["name"] for w in health["workers"]] == ["worker-1", "worker-2"]
    assert {w["state"] for w in health["workers"]} == {"idle"}
    # Two processes of their own, not the node's.
    pids = {json.loads((spool / "workers" / f"worker-{n}.json").read_text())["pid"] for n in (1, 2)}
    assert len(pids) == 2 and node.process.pid not in pids

    assert send_concurrently(node.port, studies, clients=4) == [0] * N_STUDIES
    n_files = sum(len(files) for files in studies.values())
    records = wait_for(
        lambda: (lambda r: r if all(r) else None)([answered(spool, uid) for uid in studies]),
        180,
        "every study to be answered",
        node.process,
        node.log,
    )
    assert all("results" in r and r["slices"] == SLICES for r in records), records
    assert {r["worker"] for r in records} <= {"worker-1", "worker-2"}
    # Answered once each: one outbox folder per study, each with its SR, SC, KOS (and SEG with candidates).
    assert sorted(p.name for p in (spool / "outbox").iterdir()) == sorted(studies)
    for uid in studies:
        assert {"sr.dcm", "sc.dcm", "ko.dcm"} <= {p.name for p in (spool / "outbox" / uid).glob("*.dcm")}
    # The log line follows the study's done record: wait for the last one to be written, then count.
    wait_for(lambda: node.text().count("answered in") >= N_STUDIES, 30, "every answer logged", node.process, node.log)
    assert node.text().count("answered in") == N_STUDIES
    assert not list((spool / "work").glob("*.claim"))  # each claim went with its answer

    found = wait_for(
        lambda: (lambda m: m if m[("pedetect_studies_answered_total", ())] == N_STUDIES else None)(
            metrics(node.http_port)
        ),
        10,
        "the metrics to count every study",
        node.process,
        node.log,
    )
    assert found[("pedetect_instances_received_total", (("outcome", "kept"),))] == n_files
    assert found[("pedetect_studies_failed_total", ())] == 0
    assert found[("pedetect_answer_latency_seconds_count", ())] == N_STUDIES
    assert found[("pedetect_answer_latency_seconds_sum", ())] > 0
    assert found[("pedetect_store_seconds_count", ())] == n_files
    assert found[("pedetect_queue_studies", ())] == 0
    assert found[("pedetect_outbox_studies", ())] == N_STUDIES  # no destination: the results wait
    assert found[("pedetect_workers_ready", ())] == 2
    assert http_get(node.http_port, "/nothing")[0] == 404


def test_a_node_killed_mid_burst_leaves_no_worker_and_its_restart_answers_every_study_once(burst, serves, tmp_path):
    """SIGKILL reaches the node only; the kernel ends its workers with it (parent-death signal): the
    restarted node answers every study not answered before, and none twice."""
    studies, model = burst
    spool = tmp_path / "spool"
    node = serves(model, spool, None, settle=0.3, extra=("--workers", "2"))
    wait_for(lambda: http_get(node.http_port, "/healthz")[0] == 200, 120, "the workers", node.process, node.log)
    pids = [json.loads((spool / "workers" / f"worker-{n}.json").read_text())["pid"] for n in (1, 2)]
    assert send_concurrently(node.port, studies, clients=4) == [0] * N_STUDIES
    wait_for(lambda: "predicting study" in node.text(), 60, "a prediction to start", node.process, node.log)
    node.kill()  # SIGKILL: the node cannot tell its workers
    wait_for(lambda: not any(alive(pid) for pid in pids), 60, "the orphaned workers to end")
    before = {uid for uid in studies if answered(spool, uid)}
    assert len(before) < N_STUDIES
    again = serves(model, spool, None, settle=0.3, port=node.port, extra=("--workers", "2"))
    wait_for(
        lambda: all(answered(spool, uid) for uid in studies), 180, "every study answered", again.process, again.log
    )
    time.sleep(1.5)  # nothing is answered a second time
    log = node.text()
    restarted = log[log.rindex("listening as") :]
    assert f"resuming {N_STUDIES - len(before)} received study" in restarted
    for uid in studies:
        assert log.count(f"study {uid} answered in") == 1, uid
        assert (f"study {uid} answered in" in restarted) == (uid not in before)
    assert sorted(p.name for p in (spool / "outbox").iterdir()) == sorted(studies)


def test_a_bad_config_file_is_refused_naming_the_key_and_the_allowed_ones(burst, tmp_path):
    _, model = burst
    config = tmp_path / "serve.yaml"
    config.write_text(f"models: ['{model}']\nworkerz: 2\n")
    run = subprocess.run([PEDETECT, "serve", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "unknown key 'workerz'" in run.stderr and "workers" in run.stderr and str(config) in run.stderr
    config.write_text(f"models: ['{model}']\nworkers: 0\n")
    run = subprocess.run([PEDETECT, "serve", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "workers" in run.stderr
    config.write_text(f"models: ['{model}']\nruntime: fastest\n")
    run = subprocess.run([PEDETECT, "serve", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "runtime" in run.stderr and "onnx-int8" in run.stderr
    run = subprocess.run([PEDETECT, "serve"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--model" in run.stderr
