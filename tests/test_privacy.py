"""No patient data leaks: synthetic studies whose PatientName, PatientID,
PatientBirthDate, AccessionNumber and InstitutionName hold canary strings go through the real chain
as processes — prepare → train (every stage, a recipe of seconds) → predict with ``--report`` and
``--dicom-out``, and ``pedetect serve`` fed the test studies by C-STORE on a loopback port — and every byte of every file written (archives and Parquet tables opened, PNG
text read), every line the commands print, and every temporary file they leave must be free of
every canary. The DICOM results are the one exception the standard makes: they copy the Patient and
General Study modules from the source, and nothing else of the source's identity may travel in them
(InstitutionName belongs to neither module: it must not appear at all)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from helpers.processes import pedetect_command
from helpers.train import tiny_config

CANARIES = {
    "PatientName": "QXCANARYNAME^ZELDA",
    "PatientID": "QXCANARYPID4417",
    "PatientBirthDate": "19010203",
    "AccessionNumber": "QXCANARYACC9",
    "InstitutionName": "QXCANARY INSTITUTE OF LEAKS",
}
# What a canary could look like once written: the value, its name parts, a date in ISO form.
NEEDLES = {
    "PatientName": ["QXCANARYNAME", "ZELDA"],
    "PatientID": ["QXCANARYPID4417"],
    "PatientBirthDate": ["19010203", "1901-02-03"],
    "AccessionNumber": ["QXCANARYACC9"],
    "InstitutionName": ["QXCANARY INSTITUTE", "INSTITUTE OF LEAKS"],
}
# The modules the DICOM results copy from the source (docs/dicom_results.md): Patient, General Study.
COPIED_INTO_RESULTS = {"PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"}


def add_canaries(folder: Path) -> int:
    """Write the canaries into every DICOM file under ``folder`` (pydicom, in place)."""
    import pydicom

    n = 0
    for path in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        for keyword, value in CANARIES.items():
            setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)
        n += 1
    return n


def texts(data: bytes) -> list[bytes]:
    """``data`` and what it holds in readable form: zip members (npz, …) inflated, Parquet tables
    as CSV, PNG text chunks."""
    out = [data]
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for name in archive.namelist():
                out += [name.encode()] + texts(archive.read(name))
    elif data[:4] == b"PAR1":
        import pandas as pd

        out.append(pd.read_parquet(io.BytesIO(data)).to_csv().encode("utf-8", "replace"))
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            out.append(json.dumps({str(k): str(v) for k, v in image.info.items()}).encode())
    return out


def leaks(data: bytes, fields=CANARIES) -> list[str]:
    """The canaries found in ``data`` (any case; UTF-8 or UTF-16)."""
    found = []
    for blob in texts(data):
        lowered = blob.lower()
        for field in fields:
            for needle in NEEDLES[field]:
                forms = [
                    needle.lower().encode(),
                    needle.lower().encode("utf-16-le"),
                    needle.lower().encode("utf-16-be"),
                ]
                if any(form in lowered for form in forms):
                    found.append(f"{field} ({needle})")
    return sorted(set(found))


def result_leaks(path: Path) -> list[str]:
    """Canaries in a DICOM result beyond the Patient and General Study attributes it must copy."""
    import pydicom

    ds = pydicom.dcmread(path)
    for keyword in COPIED_INTO_RESULTS:  # top level only: a copy anywhere else is a leak
        if keyword in ds:
            del ds[keyword]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return leaks(buffer.getvalue())


def run(*args, cwd: Path, env: dict, log: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(pedetect_command(*args), capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    log += [f"$ pedetect {' '.join(map(str, args))}", result.stdout, result.stderr]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


class Chain:
    def __init__(self, inputs: Path, work: Path, log: list[str]):
        self.inputs, self.work, self.log = inputs, work, log
        self.results = sorted((work / "dicom_results").rglob("*.dcm"))


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Chain:
    """The chain as processes on canary studies (about 20 s on two cores)."""
    import pandas as pd

    from pedetect.recipe import save_config
    from pedetect.synth import write_dataset

    root = tmp_path_factory.mktemp("privacy")
    inputs, work = root / "inputs", root / "work"
    write_dataset(inputs / "train", 6, slices=8, size=48, seed=61, progress=False)
    write_dataset(inputs / "test", 2, slices=8, size=48, seed=62, split="test", progress=False)
    assert add_canaries(inputs) == 64

    # Everything pedetect writes goes under work/: the outputs, its working folder, TMPDIR.
    for name in ("cwd", "tmp"):
        (work / name).mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(work / "tmp")}
    labels = pd.read_csv(inputs / "train" / "train.csv")
    studies = labels["StudyInstanceUID"].drop_duplicates().tolist()
    pd.DataFrame({"StudyInstanceUID": studies, "fold": [k % 2 for k in range(len(studies))]}).to_csv(
        work / "folds.csv", index=False
    )
    save_config(
        tiny_config(
            "cnn.backbone.name=pedetect_small_cnn",
            "cnn.backbone.kwargs={}",
            "cnn.batch_size=8",
            "embed.location_grid=2",
        ),
        work / "recipe.yaml",
    )
    log: list[str] = []
    run(
        "prepare",
        inputs / "train" / "train",
        "--out",
        work / "store",
        "--no-progress",
        cwd=work / "cwd",
        env=env,
        log=log,
    )
    run(
        "train",
        work / "recipe.yaml",
        "--store",
        work / "store",
        "--labels",
        inputs / "train" / "train.csv",
        "--folds",
        work / "folds.csv",
        "--out",
        work / "model",
        cwd=work / "cwd",
        env=env,
        log=log,
    )
    run(
        "predict",
        inputs / "test" / "test",
        "--model",
        work / "model",
        "--out",
        work / "submission.csv",
        "--report",
        work / "report",
        "--dicom-out",
        work / "dicom_results",
        "--device",
        "cpu",
        "--no-progress",
        cwd=work / "cwd",
        env=env,
        log=log,
    )
    return Chain(inputs, work, log)


def test_the_scan_finds_every_canary_where_it_is(chain):
    sample = next((chain.inputs / "test").rglob("*.dcm"))
    every = sorted(
        f"{f} ({n})" for f, needles in NEEDLES.items() for n in needles if n != "1901-02-03"
    )  # DICOM dates have no dashes
    assert leaks(sample.read_bytes()) == every
    # and inside what it opens: a compressed npz member, a Parquet table
    import numpy as np
    import pandas as pd

    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=np.frombuffer(b"...QXCANARYPID4417...", dtype=np.uint8))
    assert leaks(buffer.getvalue()) == ["PatientID (QXCANARYPID4417)"]
    buffer = io.BytesIO()
    pd.DataFrame({"a": ["qxcanaryacc9"] * 3}).to_parquet(buffer)
    assert leaks(buffer.getvalue()) == ["AccessionNumber (QXCANARYACC9)"]


def test_no_canary_reaches_any_output_log_or_temporary_file(chain):
    work = chain.work
    written = [p for p in work.rglob("*") if p.is_file() and p not in chain.results]
    assert len(written) > 50  # the store, every stage's folders, the report and its slices
    found = {str(p.relative_to(work)): hits for p in written if (hits := leaks(p.read_bytes()))}
    if hits := leaks("\n".join(chain.log).encode()):
        found["the commands' output"] = hits
    found.update(
        {f"{p.relative_to(work)} (its name)": hits for p in work.rglob("*") if (hits := leaks(p.name.encode()))}
    )
    assert found == {}, found


def test_dicom_results_copy_the_patient_and_study_modules_whole(chain):
    import pydicom

    names = sorted(Path(p).name for p in chain.results)
    assert {"sr.dcm", "sc.dcm", "ko.dcm"} <= set(names) <= {"sr.dcm", "sc.dcm", "ko.dcm", "seg.dcm"}, chain.results
    assert 2 * 3 <= len(chain.results) <= 2 * 4  # sr, sc, ko per study, and a seg with clot candidates
    for path in chain.results:
        ds = pydicom.dcmread(path)
        for keyword in COPIED_INTO_RESULTS:
            assert str(ds.data_element(keyword).value) == CANARIES[keyword], (path, keyword)


def test_dicom_results_carry_nothing_else_of_the_source(chain):
    found = {str(p.relative_to(chain.work)): hits for p in chain.results if (hits := result_leaks(p))}
    assert found == {}, found


# ------------------------------------------------------------------------------------------ serve
def test_serve_writes_and_logs_no_canary_beyond_the_instances_it_receives(chain):
    """``pedetect serve`` (the chain's model) receives the canary test studies by C-STORE, answers
    them, and is stopped. Its spool keeps the received instances as they came (incoming/: the
    input, kept so that a restarted node can answer them; checked to be exactly the instances sent);
    every other byte it writes (results in outbox/, answered records in done/, its working folder,
    temporary files) and every line it logs is scanned: the results may hold only the Patient and
    General Study attributes they must copy, everything else no canary at all."""
    import signal

    import pydicom

    from helpers.serve import c_store, echo_ok, free_port, wait_for
    from pedetect.hospital.serve import answered

    # Its own folder beside the chain's (whose scan must not meet the received instances).
    work = chain.work.parent / "serve"
    for name in ("cwd", "tmp"):
        (work / name).mkdir(parents=True)
    spool, log_path = work / "spool", work / "serve.log"
    studies = sorted(p for p in (chain.inputs / "test" / "test").iterdir() if p.is_dir())
    assert len(studies) == 2
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(work / "tmp"), "PYTHONUNBUFFERED": "1"}
    args = [
        *pedetect_command(
            "serve",
            "--model",
            chain.work / "model",
            "--ae-title",
            "PEDETECT",
            "--host",
            "127.0.0.1",
            "--port",
            port,
            "--spool",
            spool,
            "--settle",
            "0.5",
            "--device",
            "cpu",
            "--min-slices",
            "8",
            "--http-port",
            free_port(),
        )
    ]
    with open(log_path, "w") as handle:
        node = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, cwd=work / "cwd", env=env)
    try:
        wait_for(lambda: echo_ok(port), 90, "pedetect serve to answer C-ECHO", node, log_path)
        sent, n_results = {}, 0
        for study in studies:
            files = sorted(study.rglob("*.dcm"))
            assert c_store(port, files) == [0] * len(files)
            sent.update({str(pydicom.dcmread(f).SOPInstanceUID): f for f in files})
        for study in studies:
            record = wait_for(
                lambda study=study: answered(spool, study.name),
                180,
                f"study {study.name} to be answered",
                node,
                log_path,
            )
            assert record["slices"] == 8 and set(record["results"]) - {"seg.dcm"} == {"ko.dcm", "sc.dcm", "sr.dcm"}
            n_results += len(record["results"])
    finally:
        if node.poll() is None:
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(30)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
    received = sorted((spool / "incoming").rglob("*.dcm"))
    assert {str(pydicom.dcmread(p).SOPInstanceUID) for p in received} == set(sent)
    for path in received:  # kept as they came: the same dataset as the file sent
        got, want = pydicom.dcmread(path), pydicom.dcmread(sent[str(pydicom.dcmread(path).SOPInstanceUID)])
        assert got == want, path
    results = sorted((spool / "outbox").rglob("*.dcm"))
    assert len(results) == n_results  # no destination: the results wait in the outbox
    found = {str(p.relative_to(work)): hits for p in results if (hits := result_leaks(p))}
    others = [p for p in work.rglob("*") if p.is_file() and p not in received and p not in results and p != log_path]
    assert any(p.parent.name == "done" for p in others)  # the answered records are scanned too
    found.update({str(p.relative_to(work)): hits for p in others if (hits := leaks(p.read_bytes()))})
    found.update(
        {f"{p.relative_to(work)} (its name)": hits for p in work.rglob("*") if (hits := leaks(p.name.encode()))}
    )
    log = log_path.read_text()
    assert "answered" in log and "Traceback" not in log
    if hits := leaks(log.encode()):
        found["the serve log"] = hits
    assert found == {}, found
