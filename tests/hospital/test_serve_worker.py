"""A serve worker in this process (pedetect.hospital.serve.Worker): the headers of a study scanned
while it arrives, the warm-up on load, and the alert queued before the DICOM results are made."""

from __future__ import annotations

import logging
import os
import shutil
import time

import pydicom
import pytest

from pedetect.hospital import answer as answer_module
from pedetect.hospital.serve import INCOMING, WORK, ServeConfig, Spool, Worker, answered


def received(spool_root, uid, files, seconds_ago: float = 0.0, as_study: str | None = None):
    """The study's files in the spool as the node stores them, last modified ``seconds_ago``;
    ``as_study``: its instances given that StudyInstanceUID (another study with the same pixels)."""
    folder = spool_root / INCOMING / (as_study or uid)
    folder.mkdir(parents=True)
    when = time.time() - seconds_ago
    for n, path in enumerate(files):
        target = folder / f"{n:04d}.dcm"
        if as_study:
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID = as_study
            ds.save_as(target)
        else:
            shutil.copyfile(path, target)
        os.utime(target, (when, when))
    return folder


def test_spool_states_lists_settled_studies_oldest_first_and_when_the_others_will_be(study, tmp_path):
    uid, files, _ = study
    spool = Spool(tmp_path / "spool")
    received(spool.root, "older", files[:2], seconds_ago=30)
    received(spool.root, "newer", files[:2], seconds_ago=20)
    received(spool.root, "arriving", files[:2], seconds_ago=4)
    now = time.time()
    ready, arriving = spool.states(settle=10, now=now)
    assert ready == ["older", "newer"] and list(arriving) == ["arriving"]
    assert arriving["arriving"] == pytest.approx(6.0, abs=0.05)
    assert spool.pending(10, now) == ready


@pytest.fixture
def worker(study, tmp_path, caplog):
    _, _, model = study
    alerts = tmp_path / "alerts.yaml"
    alerts.write_text("receivers:\n  - kind: webhook\n    url: http://127.0.0.1:9/never\n")
    config = ServeConfig(
        model_dirs=[model], spool=tmp_path / "spool", settle=0.5, device="cpu", alerts=alerts, min_slices=8
    )
    with caplog.at_level(logging.INFO, logger="pedetect.serve"):
        made = Worker(config)
        made.load()
    yield made
    made.close()


def test_a_worker_warms_up_on_load_and_leaves_nothing_behind(worker, caplog):
    loading = "\n".join(record.getMessage() for record in caplog.get_records("setup"))
    assert "warmed up in" in loading and "warm-up failed" not in loading
    assert list((worker.spool.root / WORK).iterdir()) == []
    assert list((worker.spool.root / "outbox").rglob("*.dcm")) == [] and worker.alerts.pending() == []


def test_a_failed_warm_up_is_logged_and_the_worker_still_answers(study, worker, monkeypatch, caplog):
    uid, files, _ = study

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("pedetect.synth.dataset.write_dataset", broken)
    with caplog.at_level(logging.INFO, logger="pedetect.serve"):
        worker.warm_up()
    assert "warm-up failed (OSError: disk full)" in caplog.text
    assert list((worker.spool.root / WORK).iterdir()) == []
    received(worker.spool.root, uid, files, seconds_ago=5)
    assert worker.take(uid) and answered(worker.spool.root, uid)["results"]


def test_the_headers_of_an_arriving_study_are_scanned_once_and_reused_when_it_is_complete(study, worker):
    uid, files, _ = study
    folder = received(worker.spool.root, uid, files[: len(files) // 2])
    worker.headers.scan(sorted(folder.glob("*.dcm")))  # what the idle worker does while the study arrives
    early = {h.source: h for h in worker.headers.scan(sorted(folder.glob("*.dcm")))[0]}
    for n, path in enumerate(files[len(files) // 2 :], len(files) // 2):
        shutil.copyfile(path, folder / f"{n:04d}.dcm")
    headers, failures = worker.headers.scan(sorted(folder.glob("*.dcm")))
    assert failures == [] and len(headers) == len(files)
    reused = [h for h in headers if h.source in early]
    assert len(reused) == len(early) and all(early[h.source] is h for h in reused)
    # a file replaced (the same instance sent again) is scanned again
    replaced = sorted(folder.glob("*.dcm"))[0]
    shutil.copyfile(files[0], replaced.with_suffix(".tmp"))
    os.replace(replaced.with_suffix(".tmp"), replaced)
    again = {h.source: h for h in worker.headers.scan(sorted(folder.glob("*.dcm")))[0]}
    assert again[str(replaced)] is not early[str(replaced)]
    assert again[str(replaced)].sop == early[str(replaced)].sop
    worker.headers.retain([])
    assert len(worker.headers) == 0


def test_the_alert_is_queued_before_the_dicom_results_and_survives_their_failure(study, worker, monkeypatch):
    uid, files, _ = study
    received(worker.spool.root, uid, files, seconds_ago=5)
    order = []
    write = answer_module.DicomAnswer.write

    def logged_write(self, *args):
        order.append(("results", len(worker.alerts.pending())))
        return write(self, *args)

    monkeypatch.setattr(answer_module.DicomAnswer, "write", logged_write)
    assert worker.take(uid)
    assert order == [("results", 1)]  # the alert was waiting when the results were made
    record = answered(worker.spool.root, uid)
    assert record["alerts"] == [p["id"] for p in worker.alerts.pending()] and len(record["results"]) >= 2

    def failing_write(self, *args):
        raise ValueError("no picture")

    other = "1.2.826.0.1.3680043.8.498.1"
    received(worker.spool.root, uid, files, seconds_ago=5, as_study=other)
    monkeypatch.setattr(answer_module.DicomAnswer, "write", failing_write)
    assert worker.take(other)
    assert answered(worker.spool.root, other)["error"] == "ValueError: no picture"
    assert sorted(p["study"] for p in worker.alerts.pending()) == sorted([uid, other])
