"""``pedetect predict --dicomweb URL``: studies retrieved from a DICOMweb server (QIDO-RS, WADO-RS),
predicted as ``pedetect predict`` does, answered with DICOM results (and sent back with
``--destination``).

Each study's CT series are retrieved one instance at a time (``iter_series``) into a temporary
folder, and every retrieved study goes through one run of :func:`pedetect.infer.predict.predict`
(one study in memory at a time) with :mod:`pedetect.hospital.answer`'s hooks: the CTPA series
chosen on the headers predict scanned (:class:`~pedetect.hospital.answer.SeriesChoice`), and each
study's SR, SC, KOS and SEG made from its prediction (:class:`~pedetect.hospital.answer.DicomAnswer`),
written to ``--dicom-out`` (a temporary folder when not given) and stored with ``--destination``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from dicomweb_client.api import DICOMwebClient

from pedetect.console import echo as console_echo
from pedetect.hospital.answer import DicomAnswer, SeriesChoice
from pedetect.hospital.deliver import parse_destination
from pedetect.hospital.selection import MIN_SLICES
from pedetect.infer.predict import predict

STUDY_UID_TAG, SERIES_UID_TAG, MODALITY_TAG = "0020000D", "0020000E", "00080060"


def _value(item: dict, tag: str) -> str | None:
    values = (item.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


def find_studies(client, studies: Sequence[str], filters: dict[str, str]) -> list[str]:
    """The given StudyInstanceUIDs, then those a QIDO-RS search with ``filters`` finds (no duplicates)."""
    found = list(studies)
    if filters:
        found += [
            uid
            for uid in (_value(item, STUDY_UID_TAG) for item in client.search_for_studies(search_filters=filters))
            if uid
        ]
    return list(dict.fromkeys(found))


def retrieve_study(client, study: str, folder: Path) -> list[Path]:
    """Every CT instance of the study (WADO-RS, series by series, one instance in memory at a time)."""
    paths = []
    for item in client.search_for_series(study_instance_uid=study):
        series = _value(item, SERIES_UID_TAG)
        if not series or _value(item, MODALITY_TAG) != "CT":
            continue
        target = folder / study / series
        target.mkdir(parents=True, exist_ok=True)
        for ds in client.iter_series(study, series):
            path = target / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths


def parse_filters(pairs: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` pairs (QIDO-RS attributes, e.g. StudyDate=20200101-20201231); ValueError naming a bad one."""
    filters = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--qido {pair!r}: expected KEY=VALUE, e.g. StudyDate=20200101-20201231")
        filters[key] = value
    return filters


def predict_dicomweb(
    url: str,
    studies: Sequence[str],
    filters: dict[str, str],
    model_dirs: list,
    out: Path,
    *,
    dicom_out: Path | None = None,
    destination: str | None = None,
    min_slices: int = MIN_SLICES,
    echo: Callable[[str], None] = console_echo,
    **options,
):
    """Retrieve, select, predict, write DICOM results and (with ``destination``) store them; returns
    predict's summary with the studies that could not be retrieved, selected or delivered among its failures."""
    target = parse_destination(destination) if destination else None
    client = DICOMwebClient(url=url.rstrip("/"))
    uids = find_studies(client, studies, filters)
    if not uids:
        raise ValueError(f"no study to predict: give --study UID or a --qido filter that finds studies at {url}")
    with tempfile.TemporaryDirectory(prefix="pedetect-dicomweb-") as scratch:
        retrieved = Path(scratch) / "retrieved"
        retrieved.mkdir()
        failed: list[tuple[str, str]] = []
        for uid in uids:
            try:
                files = retrieve_study(client, uid, retrieved)
            except Exception as error:  # this study lost, the others go on
                failed.append((uid, f"not retrieved from {url}: {type(error).__name__}: {str(error)[:200]}"))
                continue
            echo(f"study {uid}: {len(files)} CT instance(s) retrieved")
        choice = SeriesChoice(min_slices)
        answer = DicomAnswer(
            Path(dicom_out) if dicom_out else Path(scratch) / "dicom",
            notes=choice.notes,
            send=target.send if target is not None else None,
            sent_to=target.describe() if target is not None else "",
            echo=echo,
        )
        summary = predict(retrieved, model_dirs, out, echo=echo, choose_series=choice, on_prediction=answer, **options)
        summary.studies_failed += failed
        summary.n_studies += len(failed)
    return summary
