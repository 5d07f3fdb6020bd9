"""``pedetect predict --dicomweb URL``: studies retrieved from a DICOMweb server (QIDO-RS, WADO-RS),
predicted as ``pedetect predict`` does, answered with DICOM results (and sent back with
``--destination``).

Each study's CT series are retrieved one instance at a time (``iter_series``) into a temporary
folder; the CTPA series is chosen by :mod:`pedetect.hospital.selection`; the chosen series of all
studies are predicted in one run of :func:`pedetect.infer.predict.predict` (one study in memory at
a time), then each study's SR, SC and KOS are written to ``--dicom-out`` (a temporary folder when
not given) and stored with ``--destination``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

from pedetect.console import echo as console_echo
from pedetect.hospital.selection import MIN_SLICES, Selection, select_series

STUDY_UID_TAG, SERIES_UID_TAG, MODALITY_TAG = "0020000D", "0020000E", "00080060"


def _value(item: dict, tag: str) -> Optional[str]:
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
    dicom_out: Optional[Path] = None,
    destination: Optional[str] = None,
    report_dir: Optional[Path] = None,
    min_slices: int = MIN_SLICES,
    echo: Callable[[str], None] = console_echo,
    **options,
):
    """Retrieve, select, predict, write DICOM results and (with ``destination``) store them; returns
    predict's summary with the studies that could not be retrieved, selected or delivered among its failures."""
    from dicomweb_client.api import DICOMwebClient

    from pedetect.hospital.deliver import parse_destination
    from pedetect.hospital.results import algorithm_of, describe, result_from_report, write_study_results
    from pedetect.infer.report import safe_name
    from pedetect.infer.predict import predict
    from pedetect.models.bundle import read_bundle

    target = parse_destination(destination) if destination else None
    client = DICOMwebClient(url=url.rstrip("/"))
    uids = find_studies(client, studies, filters)
    if not uids:
        raise ValueError(f"no study to predict: give --study UID or a --qido filter that finds studies at {url}")
    with tempfile.TemporaryDirectory(prefix="pedetect-dicomweb-") as scratch:
        scratch = Path(scratch)
        selections: dict[str, Selection] = {}
        failed: list[tuple[str, str]] = []
        for uid in uids:
            try:
                files = retrieve_study(client, uid, scratch / "retrieved")
            except Exception as error:  # this study lost, the others go on
                failed.append((uid, f"not retrieved from {url}: {type(error).__name__}: {str(error)[:200]}"))
                continue
            selection = select_series(files, min_slices)
            echo(f"study {uid}: {len(files)} CT instance(s) retrieved; " + "; ".join(selection.notes()))
            if selection.chosen is None:
                failed.append((uid, "no usable CT series: " + "; ".join(selection.notes()[1:])))
                continue
            selections[uid] = selection
            for path in selection.files:
                link = scratch / "input" / safe_name(uid) / path.name
                link.parent.mkdir(parents=True, exist_ok=True)
                os.link(path, link)
        report = Path(report_dir) if report_dir else scratch / "report"
        results_dir = Path(dicom_out) if dicom_out else scratch / "dicom"
        (scratch / "input").mkdir(exist_ok=True)
        summary = predict(scratch / "input", model_dirs, out, report_dir=report, echo=echo, **options)
        algorithm = algorithm_of([read_bundle(path) for path in model_dirs])
        for uid, selection in selections.items():
            json_path = report / f"{safe_name(uid)}.json"
            try:
                written = write_study_results(
                    result_from_report(json_path),
                    {p.stem: p for p in selection.files},
                    json_path.with_suffix(".png"),
                    algorithm,
                    results_dir,
                    notes=selection.notes(),
                )
                echo(describe(written))
                if target is not None:
                    target.send(written.files)
                    echo(f"study {uid}: results stored ({target.describe()})")
            except Exception as error:
                failed.append(
                    (uid, f"DICOM results not written or not stored: {type(error).__name__}: {str(error)[:200]}")
                )
        summary.studies_failed += failed
        summary.n_studies += sum(1 for uid, _ in failed if uid not in selections)
        if report_dir is None:
            summary.report = None
        shutil.rmtree(scratch / "retrieved", ignore_errors=True)
    return summary
