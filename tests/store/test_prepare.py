"""``pedetect prepare`` end to end: synthetic studies in every transfer syntax synth writes, pydicom's
real series, bad files, zip input, resume after a kill, several workers and a Dask cluster."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from helpers.dicom import CT2, CT5N, bad_files, ct_series, make_ct, real_file, reference_window
from pedetect.cli import app
from pedetect.dicom import AIR_HU, read_files
from pedetect.dicom.source import discover
from pedetect.labels import SERIES, SOP, STUDY
from pedetect.store import SliceStore, prepare
from pedetect.store.format import SERIES_DIR, decode_frame, encode_frame, jpeg_params

SYNTAXES = {"explicit": 11, "rle": 12, "jpeg2000": 13}  # transfer syntax → seed (UIDs differ by seed)
SIZE, SLICES = 64, 5


def run(*args: str):
    return CliRunner().invoke(app, ["prepare", *args, "--no-progress"], catch_exceptions=False)


@pytest.fixture(scope="module")
def synth_input(tmp_path_factory):
    """Synthetic studies (one per transfer syntax), pydicom's CT5N and CT2 series, and bad files."""
    from pedetect.synth import write_dataset

    root = tmp_path_factory.mktemp("input")
    labels = []
    for syntax, seed in SYNTAXES.items():
        labels.append(
            write_dataset(root / syntax, 1, slices=SLICES, size=SIZE, seed=seed, transfer_syntax=syntax, progress=False)
        )
    for name, folder in (("ct5n", CT5N), ("ct2", CT2)):
        shutil.copytree(folder, root / "real" / name)
    good = ct_series(root / "hand", 3, rows=16, cols=16)
    make_ct(
        root / "hand" / "scout",
        np.zeros((20, 16), np.uint16),
        study="1.2.826.0.1.3680043.8.498.1",
        series=str(_series_of(good[0])),
        position=(0, 0, 500),
        instance=99,
    )
    bad = bad_files(root / "bad", good[0])
    return root, pd.concat(labels, ignore_index=True), bad


def _series_of(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


@pytest.fixture(scope="module")
def prepared(synth_input, tmp_path_factory):
    root, labels, bad = synth_input
    out = tmp_path_factory.mktemp("store") / "store"
    result = run(str(root), "--out", str(out))
    return out, result


def test_prepare_synthetic_every_syntax(prepared, synth_input):
    out, result = prepared
    root, labels, bad = synth_input
    assert result.exit_code == 1, result.output  # bad files were found: non-zero
    store = SliceStore(out)
    slices = store.slices
    for column in (STUDY, SERIES, SOP, "slice_index", "z", "height", "width", "file"):
        assert column in slices.columns
    assert slices[SOP].is_unique
    # every synthetic slice, in synth's position order
    for series_uid, group in labels.groupby(SERIES, sort=False):
        ours = slices[slices[SERIES] == series_uid].sort_values("slice_index")
        assert ours[SOP].tolist() == group[SOP].tolist()
        assert ours["slice_index"].tolist() == list(range(len(group)))
        assert np.all(np.diff(ours["z"].to_numpy()) > 0)
    # 3 synthetic + CT5N + CT2 + the hand-made series
    assert store.series[SERIES].nunique() == 6
    assert len(slices) == len(labels) + 5 + 4 + 3


def test_store_pixels_match_independent_hounsfield(prepared):
    from pedetect.synth import render_study

    out, _ = prepared
    store = SliceStore(out)
    for syntax, seed in SYNTAXES.items():
        study = render_study(0, seed=seed, slices=SLICES, size=SIZE)
        hu = study.hu.astype(np.float64).copy()
        if study.plan.scanner.padding is not None:
            hu[study.stored == study.plan.scanner.padding] = AIR_HU
        info = store.series_info(study.plan.series_uid)
        assert info["n_slices"] == SLICES and info["height"] == SIZE
        assert syntax == "explicit" or len(info["transfer_syntaxes"]) == 1
        volume = store.read_series(study.plan.series_uid)
        for k, sop in enumerate(study.plan.sop_uids):
            row = store.slices[store.slices[SOP] == sop].iloc[0]
            expected = reference_window(hu[k])
            got = store.read_slice(study.plan.series_uid, int(row["slice_index"]))
            np.testing.assert_array_equal(got, volume[int(row["slice_index"])])
            # exactly the JPEG (q90, 4:4:4) of the independently windowed HU
            jpeg = decode_frame(encode_frame(np.ascontiguousarray(expected[:, :, ::-1]), jpeg_params(90, "444")))
            np.testing.assert_array_equal(got, jpeg)
            assert np.abs(got.astype(int) - expected).mean() < 4  # and that is close to the truth


def test_reader_in_memory_is_exact_for_synth(synth_input):
    from pedetect.synth import render_study

    root, _, _ = synth_input
    for syntax, seed in SYNTAXES.items():
        files = sorted(str(p) for p in (root / syntax).rglob("*.dcm"))
        volumes, failures = read_files(files)
        assert failures == [] and len(volumes) == 1
        study = render_study(0, seed=seed, slices=SLICES, size=SIZE)
        hu = study.hu.astype(np.float64).copy()
        if study.plan.scanner.padding is not None:
            hu[study.stored == study.plan.scanner.padding] = AIR_HU
        order = [study.plan.sop_uids.index(s) for s in volumes[0].sop_uids]
        np.testing.assert_array_equal(volumes[0].images, reference_window(hu[order]))


def test_failures_and_summary(prepared, synth_input):
    out, result = prepared
    _, _, bad = synth_input
    failures = SliceStore(out).failures
    assert {"path", "reason", STUDY, SERIES, SOP} <= set(failures.columns)
    reasons = {Path(p).name: r for p, r in zip(failures["path"], failures["reason"])}
    assert reasons["empty.dcm"].startswith("empty file")
    assert reasons["notes.txt"].startswith("not DICOM")
    assert "truncated" in reasons["trunc_header"]
    assert reasons["no_pixels"].startswith("DICOM without pixel data")
    assert reasons["trunc_pixels"].startswith("pixel data unreadable")
    assert reasons["scout"].startswith("slice size 20x16 differs")
    assert reasons["train.csv"].startswith("not DICOM")  # synth's CSVs sit in the input folder
    assert failures.loc[failures["path"].str.endswith("trunc_pixels"), SERIES].notna().all()
    assert "lost:" in result.output and "not DICOM" in result.output
    assert "series" in result.output and "slices" in result.output
    info = SliceStore(out).series
    hand = info[info[SERIES] == _series_of(bad["truncated_pixels"].parent.parent / "hand" / "img_000")].iloc[0]
    assert any(text.startswith("mixed sizes") for text in hand["irregularities"])


def test_real_series_in_store(prepared):
    import pydicom

    store = SliceStore(prepared[0])
    ct5n = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(CT5N.iterdir())]
    series_uid = str(ct5n[0].SeriesInstanceUID)
    rows = store.slices[store.slices[SERIES] == series_uid].sort_values("slice_index")
    by_z = sorted(ct5n, key=lambda ds: float(ds.ImagePositionPatient[2]))
    assert rows[SOP].tolist() == [str(ds.SOPInstanceUID) for ds in by_z]
    assert rows["instance_number"].tolist() == [10, 9, 8, 7, 6]
    np.testing.assert_allclose(rows["z"], [-1.2375, 1.2625, 3.7625, 6.2625, 8.7625])
    ct2 = pydicom.dcmread(next(CT2.iterdir()), stop_before_pixels=True)
    info = store.series_info(str(ct2.SeriesInstanceUID))
    assert info["n_gaps"] == 1 and info["order_by"] == "position"


def test_no_patient_fields_anywhere_in_the_store(prepared):
    out, result = prepared
    for path in Path(out).rglob("*"):
        if path.is_file() and not path.name.endswith(".jpgs"):
            assert b"Secret" not in path.read_bytes() and b"SECRET-ID" not in path.read_bytes(), path
    assert "Secret" not in result.output


def test_rerun_is_a_no_op_and_changed_settings_are_refused(prepared, synth_input, tmp_path):
    out, _ = prepared
    root, _, _ = synth_input
    before = {p: p.stat().st_mtime_ns for p in (Path(out) / SERIES_DIR).iterdir()}
    result = run(str(root), "--out", str(out))
    assert result.exit_code == 1  # still the same failures
    assert "6 series already done" in result.output
    assert {p: p.stat().st_mtime_ns for p in (Path(out) / SERIES_DIR).iterdir()} == before
    refused = run(str(root), "--out", str(out), "--image-size", "32")
    assert refused.exit_code == 2 and "other settings" in refused.output


def test_clean_input_exit_zero_image_size_and_zip(tmp_path):
    files = ct_series(tmp_path / "in" / "x", 4, rows=24, cols=40)
    archive = tmp_path / "in.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for k, p in enumerate(files):
            z.write(p, f"../../../escape/{k}.dcm")
    result = run(str(tmp_path / "in"), "--out", str(tmp_path / "a"), "--image-size", "32")
    assert result.exit_code == 0, result.output
    assert "lost: nothing" in result.output
    folder = SliceStore(tmp_path / "a")
    assert folder.read_slice(folder.series_uids[0], 0).shape == (32, 32, 3)
    assert folder.series_info(folder.series_uids[0])["scale"] == pytest.approx(32 / 40)
    result = run(str(archive), "--out", str(tmp_path / "b"), "--image-size", "32")
    assert result.exit_code == 0, result.output
    zipped = SliceStore(tmp_path / "b")
    assert zipped.slices[SOP].tolist() == folder.slices[SOP].tolist()
    assert all("::" in s for s in zipped.slices["source"])
    np.testing.assert_array_equal(zipped.read_series(zipped.series_uids[0]), folder.read_series(folder.series_uids[0]))
    assert not (tmp_path.parent / "escape").exists() and not (tmp_path / "escape").exists()


def test_config_file_unknown_key_and_windows(tmp_path):
    ct_series(tmp_path / "in", 2, rows=16, cols=16)
    bad = tmp_path / "bad.yaml"
    bad.write_text("image_size: 32\njpeg_qualty: 90\n")
    result = run(str(tmp_path / "in"), "--out", str(tmp_path / "s0"), "--config", str(bad))
    assert result.exit_code == 2
    assert "jpeg_qualty" in result.output and "bad.yaml" in result.output and "jpeg_quality" in result.output
    cfg = tmp_path / "ok.yaml"
    cfg.write_text(
        "windows:\n  - {name: a, level: 40, width: 400}\n  - {name: b, level: 40, width: 400}\n  - {name: c, level: 40, width: 400}\njpeg_quality: 100\n"
    )
    result = run(str(tmp_path / "in"), "--out", str(tmp_path / "s1"), "--config", str(cfg))
    assert result.exit_code == 0, result.output
    store = SliceStore(tmp_path / "s1")
    image = store.read_slice(store.series_uids[0], 0).astype(int)
    assert np.abs(image[..., 0] - image[..., 2]).max() <= 2  # three equal windows
    assert store.settings["windows"][0] == [40.0, 400.0] and store.settings["jpeg_quality"] == 100


def test_resume_after_kill(tmp_path, monkeypatch):
    import pedetect.store.job as job

    for k in range(3):
        ct_series(tmp_path / "in" / f"s{k}", 3, rows=16, cols=16)
    out = tmp_path / "store"
    real = job.prepare_series
    calls = []

    def killed_during_second(task):
        calls.append(task.name)
        if len(calls) == 2:  # die half-way: a partial data file and no marker
            partial = Path(task.store) / SERIES_DIR / f"{task.name}.jpgs.tmp-999-dead"
            partial.write_bytes(b"\xff\xd8 half")
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(job, "prepare_series", killed_during_second)
    with pytest.raises(KeyboardInterrupt):
        job.prepare(tmp_path / "in", out, progress=False, echo=lambda m: None)
    markers = sorted((out / SERIES_DIR).glob("*.json"))
    assert len(markers) == 1 and not (out / "slices.parquet").exists()
    first = markers[0].stat().st_mtime_ns
    monkeypatch.setattr(job, "prepare_series", real)
    summary = job.prepare(tmp_path / "in", out, progress=False, echo=lambda m: None)
    assert summary.series_done_before == 1 and summary.series_prepared == 2 and summary.ok
    assert markers[0].stat().st_mtime_ns == first
    assert not list((out / SERIES_DIR).glob("*tmp*"))
    store = SliceStore(out)
    assert len(store.slices) == 9 and store.series[SERIES].nunique() == 3
    # a file that changed since is noticed: its series is redone
    victim = sorted((tmp_path / "in" / "s0").iterdir())[0]
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))
    summary = job.prepare(tmp_path / "in", out, progress=False, echo=lambda m: None)
    assert summary.series_done_before == 2 and summary.series_prepared == 1


def test_a_crashing_series_is_reported_and_retried(tmp_path, monkeypatch):
    import pedetect.store.job as job

    ct_series(tmp_path / "in", 3, rows=16, cols=16)
    monkeypatch.setattr(job, "_prepare_series", lambda task: (_ for _ in ()).throw(MemoryError("boom")))
    summary = job.prepare(tmp_path / "in", tmp_path / "store", progress=False, echo=lambda m: None)
    assert not summary.ok and summary.series_failed == 1
    assert "series not prepared" in SliceStore(tmp_path / "store").failures["reason"].iloc[0]
    monkeypatch.undo()
    summary = job.prepare(tmp_path / "in", tmp_path / "store", progress=False, echo=lambda m: None)
    assert summary.ok and summary.series_prepared == 1


@pytest.fixture(scope="module")
def small_input(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    for k in range(4):
        ct_series(root / f"s{k}", 3 + k, rows=16, cols=16)
    (root / "junk.txt").write_text("x")
    return root


def _same_store(a: Path, b: Path) -> None:
    sa, sb = SliceStore(a), SliceStore(b)
    columns = [STUDY, SERIES, SOP, "slice_index", "z", "file", "offset", "length"]
    key = [SERIES, "slice_index"]
    pd.testing.assert_frame_equal(
        sa.slices[columns].sort_values(key).reset_index(drop=True),
        sb.slices[columns].sort_values(key).reset_index(drop=True),
    )
    for uid in sa.series_uids:
        np.testing.assert_array_equal(sa.read_series(uid), sb.read_series(uid))
    assert sorted(sa.failures["path"]) == sorted(sb.failures["path"])


def test_workers_give_the_same_store(small_input, tmp_path):
    one = run(str(small_input), "--out", str(tmp_path / "one"))
    two = run(str(small_input), "--out", str(tmp_path / "two"), "--workers", "2")
    assert one.exit_code == two.exit_code == 1  # junk.txt
    _same_store(tmp_path / "one", tmp_path / "two")


def test_dask_local_cluster(small_input, tmp_path):
    import distributed

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        result = run(str(small_input), "--out", str(tmp_path / "dask"), "--scheduler", cluster.scheduler_address)
    assert result.exit_code == 1, result.output
    assert "Dask cluster" in result.output
    run(str(small_input), "--out", str(tmp_path / "local"))
    _same_store(tmp_path / "dask", tmp_path / "local")


def test_help_explains_options():
    result = CliRunner().invoke(app, ["prepare", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    assert result.exit_code == 0
    for option in ("--out", "--workers", "--image-size", "--config", "--scheduler"):
        assert option in result.output


def test_real_single_files(tmp_path):
    for name in ("CT_small.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm"):
        shutil.copy(real_file(name), tmp_path / name.replace(".dcm", ""))
    result = run(str(tmp_path), "--out", str(tmp_path.parent / (tmp_path.name + "_store")), "--image-size", "128")
    assert result.exit_code == 0, result.output
    store = SliceStore(tmp_path.parent / (tmp_path.name + "_store"))
    assert len(store.slices) == 3 and set(store.slices["height"]) == {128}


def test_a_truncated_compressed_file_is_named_as_truncated(tmp_path):
    from pedetect.synth import write_dataset

    write_dataset(tmp_path / "in", 1, slices=4, size=32, seed=3, transfer_syntax="jpeg2000", progress=False)
    victim = sorted((tmp_path / "in").rglob("*.dcm"))[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 200])  # ends inside the encapsulated JPEG 2000 frame
    summary = prepare(tmp_path / "in" / "train", tmp_path / "store", progress=False, echo=lambda m: None)
    failures = pd.read_parquet(tmp_path / "store" / "failures.parquet")
    assert len(SliceStore(tmp_path / "store").slices) == 3 and not summary.ok
    assert failures["path"].tolist() == [str(victim)]
    assert failures["reason"].iloc[0].startswith("pixel data unreadable") and "truncated" in failures["reason"].iloc[0]
    # the in-memory read (predict's) names it the same way: prepare and predict share one DICOM read path.
    # Its header reads, so like prepare the read path loses it as a slice of its series.
    series, unread = read_files(discover(tmp_path / "in" / "train"))
    assert unread == [] and len(series) == 1 and len(series[0]) == 3
    assert [(f.path, f.reason, f.sop) for f in series[0].failures] == [
        (str(victim), failures["reason"].iloc[0], failures[SOP].iloc[0])
    ]
