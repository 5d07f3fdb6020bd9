"""Subgroups of the studies by their own DICOM headers, for the validation report (``--dicom DIR``).

The files are found and their headers read by pedetect.dicom's hardened scan (:func:`~pedetect.dicom.read.scan_files`:
any layout or a zip, unreadable files are failures, never a crash). That scan takes only what the
read path needs, so the equipment fields (Manufacturer, ManufacturerModelName, ConvolutionKernel,
ContrastBolusAgent, ContrastBolusStartTime) are read here from one file per series, header only
(``dcmread(stop_before_pixels=True, specific_tags=...)``). No patient field is read.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from pedetect.dicom.header import describe_error, is_input_failure, printable
from pedetect.dicom.read import scan_files
from pedetect.dicom.series import group_headers
from pedetect.dicom.source import ZipMember, discover, open_path, read_bytes, source_label
from pedetect.dicom.values import numbers

FIELDS: dict[str, str] = {
    "manufacturer": "Manufacturer",
    "model": "Manufacturer / ManufacturerModelName",
    "slice_thickness": "Slice thickness (SliceThickness)",
    "kernel": "Reconstruction kernel (ConvolutionKernel)",
    "contrast": "Contrast timing in the header (ContrastBolusAgent, ContrastBolusStartTime)",
    "slices": "Number of slices of the series",
}
UNKNOWN = "unknown"
NO_DICOM = "unknown (no DICOM found)"
THICKNESS_BUCKETS: tuple[tuple[float, str], ...] = ((1.0, "<=1 mm"), (2.0, "(1, 2] mm"), (3.0, "(2, 3] mm"))
THICKNESS_ABOVE = ">3 mm"
SLICE_BUCKETS: tuple[tuple[int, str], ...] = ((100, "<100"), (200, "100-199"), (300, "200-299"), (400, "300-399"))
SLICES_ABOVE = ">=400"
_TAGS = (
    "Manufacturer",
    "ManufacturerModelName",
    "ConvolutionKernel",
    "ContrastBolusAgent",
    "ContrastBolusStartTime",
    "SliceThickness",
    "SharedFunctionalGroupsSequence",  # Enhanced CT: the kernel and thickness may sit in the shared groups
)


def thickness_bucket(thickness: float | None) -> str:
    """The slice-thickness group of a thickness in mm."""
    if thickness is None:
        return UNKNOWN
    for limit, name in THICKNESS_BUCKETS:
        if thickness <= limit:
            return name
    return THICKNESS_ABOVE


def slices_bucket(slices: int) -> str:
    """The slice-count group of a series of ``slices`` slices."""
    for limit, name in SLICE_BUCKETS:
        if slices < limit:
            return name
    return SLICES_ABOVE


def contrast_group(agent: str, start_time: str) -> str:
    """What the header says of the contrast bolus."""
    if agent and start_time:
        return "agent and start time recorded"
    if agent:
        return "agent recorded, no start time"
    if start_time:
        return "start time recorded, no agent"
    return "not recorded"


@dataclass
class SeriesHeader:
    """The fields of one study's series that the subgroups use."""

    study: str
    series: str
    slices: int
    manufacturer: str = ""
    model: str = ""
    kernel: str = ""
    thickness: float | None = None
    contrast_agent: str = ""
    contrast_start: str = ""
    unreadable: str = ""  # why the equipment fields could not be read, if so

    def groups(self) -> dict[str, str]:
        """This study's value of every field of :data:`FIELDS`."""
        manufacturer = self.manufacturer or UNKNOWN
        return {
            "manufacturer": manufacturer,
            "model": f"{manufacturer} / {self.model or UNKNOWN}",
            "slice_thickness": thickness_bucket(self.thickness),
            "kernel": self.kernel or UNKNOWN,
            "contrast": UNKNOWN if self.unreadable else contrast_group(self.contrast_agent, self.contrast_start),
            "slices": slices_bucket(self.slices),
        }


def _value(ds: Any, keyword: str) -> str:
    value = ds.get(keyword) if ds is not None else None
    if value is None:
        return ""
    if not isinstance(value, (str, bytes)) and hasattr(value, "__iter__"):
        return " / ".join(printable(v) for v in value if str(v).strip())
    return printable(value)


def _first_item(ds: Any, keyword: str) -> Any:
    try:
        sequence = ds.get(keyword) if ds is not None else None
        return sequence[0] if sequence else None
    except (TypeError, IndexError, AttributeError):
        return None


def read_equipment(source: Any) -> dict[str, Any]:
    """The equipment fields of one file, its header only; raises the reader's errors."""
    handle = io.BytesIO(read_bytes(source)) if isinstance(source, ZipMember) else open_path(source)
    with handle, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(handle, stop_before_pixels=True, specific_tags=list(_TAGS), force=True)
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    reconstruction = _first_item(shared, "CTReconstructionSequence")
    measures = _first_item(shared, "PixelMeasuresSequence")
    thickness = numbers(ds.get("SliceThickness"), 1) or numbers(measures.get("SliceThickness") if measures else None, 1)
    return {
        "manufacturer": _value(ds, "Manufacturer"),
        "model": _value(ds, "ManufacturerModelName"),
        "kernel": _value(ds, "ConvolutionKernel") or _value(reconstruction, "ConvolutionKernel"),
        "thickness": thickness[0] if thickness else None,
        "contrast_agent": _value(ds, "ContrastBolusAgent"),
        "contrast_start": _value(ds, "ContrastBolusStartTime"),
    }


def scan_series(
    dicom: str | Path, series_of: Mapping[str, Iterable[str]] | None = None
) -> tuple[dict[str, SeriesHeader], dict[str, Any]]:
    """One :class:`SeriesHeader` per study found under ``dicom`` (a folder in any layout, or a zip),
    and what the scan found (files, unreadable files). A study's series is the one the labels name
    (``series_of``: study → its series in the labels) when present, else its largest."""
    sources = discover(dicom)
    headers, failures = scan_files(sources)
    by_series, duplicates = group_headers(headers)
    by_study: dict[str, dict[str, list]] = {}
    for series, members in by_series.items():
        by_study.setdefault(members[0].study, {})[series] = members
    studies: dict[str, SeriesHeader] = {}
    unreadable = 0
    for study, series_map in by_study.items():
        wanted = set((series_of or {}).get(study, ()))
        named = [s for s in series_map if s in wanted]
        series = named[0] if named else max(series_map, key=lambda s: (len(series_map[s]), s))
        members = series_map[series]
        thicknesses = sorted(h.slice_thickness for h in members if h.slice_thickness is not None)
        record = SeriesHeader(study=study, series=series, slices=len(members))
        first = min(members, key=lambda h: source_label(h.source))
        try:
            equipment = read_equipment(first.source)
        except BaseException as error:
            if not is_input_failure(error):
                raise
            unreadable += 1
            record.unreadable = describe_error(error)
        else:
            for key, value in equipment.items():
                setattr(record, key, value)
        if thicknesses:  # the scan's own value (per frame for Enhanced CT) wins: the median of the series
            record.thickness = thicknesses[len(thicknesses) // 2]
        studies[study] = record
    info = {
        "files": len(sources),
        "slices_read": len(headers),
        "unreadable_files": len(failures) + len(duplicates),
        "unreadable_equipment": unreadable,
        "studies_found": len(studies),
    }
    return studies, info


def study_attributes(
    study_uids: Iterable[str], dicom: str | Path, series_of: Mapping[str, Iterable[str]] | None = None
) -> tuple[dict[str, dict[str, str]], dict[str, Any]]:
    """Per field of :data:`FIELDS`, each study's group (:data:`NO_DICOM` where no file of the study
    was found), and a summary of the scan for the report."""
    study_uids = list(study_uids)
    found, info = scan_series(dicom, series_of)
    attributes: dict[str, dict[str, str]] = {name: {} for name in FIELDS}
    missing = 0
    for uid in study_uids:
        record = found.get(uid)
        if record is None:
            missing += 1
            values = dict.fromkeys(FIELDS, NO_DICOM)
        else:
            values = record.groups()
        for name, value in values.items():
            attributes[name][uid] = value
    known = set(study_uids)
    info.update(
        dicom=str(dicom),
        titles=dict(FIELDS),
        studies_without_dicom=missing,
        studies_not_in_labels=sum(1 for uid in found if uid not in known),
        thickness_buckets=[name for _, name in THICKNESS_BUCKETS] + [THICKNESS_ABOVE],
        slice_buckets=[name for _, name in SLICE_BUCKETS] + [SLICES_ABOVE],
    )
    return attributes, info
