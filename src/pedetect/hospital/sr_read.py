"""pedetect's SR read back (pydicom): what the tests, the viewers' checks and a PACS integrator compare
with the predictions. The content tree it reads is docs/dicom_results.md's."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.multival import MultiValue

from pedetect.dicom.frames import frame_key
from pedetect.hospital.codes import (
    AREA,
    COMMENT,
    LABEL_CONCEPTS,
    PE_TRACKING,
    PRESENT,
    PROBABILITY,
    PULMONARY_EMBOLISM,
    QUALITATIVE_EVALUATIONS,
    label_key,
)


def sr_comments(sr) -> list[str]:
    """The comments of a pedetect SR (pydicom dataset): what was not used and why."""
    found = []
    for item in sr.ContentSequence:
        if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeValue == QUALITATIVE_EVALUATIONS[0]:
            found += [
                str(child.TextValue)
                for child in item.ContentSequence
                if child.ValueType == "TEXT" and _concept(child) == COMMENT[:2]
            ]
    return found


def read_sr_values(path: str | Path) -> dict[str, Any]:
    """The values of a pedetect SR: ``findings``: per exam output (``pulmonary_embolism`` and the nine
    labels) the code, the model probability and the decision (True: present), from the Qualitative
    Evaluations; ``key_sops``: the key slices the PE evaluation is inferred from, by their names in the
    predictions (``sop#frame`` for a frame of a multi-frame instance); ``algorithm``: name, version,
    parameters; ``comments``; ``candidates``: per measurement group its number, tracking identifier and
    UID, finding and finding site codes, probability, SCOORD (graphic type, GraphicData as (column, row)
    pairs, the key slice's name) and comment; ``library``: the Image Library's slices."""
    sr = pydicom.dcmread(str(path))
    values: dict[str, Any] = {
        "findings": {},
        "key_sops": [],
        "algorithm": None,
        "comments": sr_comments(sr),
        "candidates": [],
        "library": [],
    }
    labels = {label_key(*concept): label for label, concept in LABEL_CONCEPTS.items()}
    for item in sr.ContentSequence:
        concept = _concept(item)
        if concept == QUALITATIVE_EVALUATIONS[:2]:
            for child in item.get("ContentSequence", []):
                if child.ValueType != "CODE":
                    continue
                code = _concept(child)
                grandchildren = list(child.get("ContentSequence", []))
                modifiers = [
                    (_concept(g), _concept_value(g))
                    for g in grandchildren
                    if g.ValueType == "CODE" and g.RelationshipType == "HAS CONCEPT MOD"
                ]
                key = label_key(code, modifiers)
                tracking = PE_TRACKING if key == label_key(PULMONARY_EMBOLISM, ()) else labels.get(key)
                if tracking is None:
                    continue
                numbers = [g for g in grandchildren if g.ValueType == "NUM" and _concept(g) == PROBABILITY[:2]]
                values["findings"][tracking] = {
                    "code": code,
                    "probability": float(numbers[0].MeasuredValueSequence[0].NumericValue) if numbers else math.nan,
                    "present": str(child.ConceptCodeSequence[0].CodeValue) == PRESENT[0],
                }
                if tracking == PE_TRACKING:
                    values["key_sops"] = [_slice_name(g) for g in grandchildren if g.ValueType == "IMAGE"]
                    values["algorithm"] = _algorithm_texts(grandchildren)
        elif concept == ("111028", "DCM"):  # Image Library
            for group in item.get("ContentSequence", []):
                values["library"] += [
                    _slice_name(g) for g in group.get("ContentSequence", []) if g.ValueType == "IMAGE"
                ]
        elif concept == ("126010", "DCM"):  # Imaging Measurements
            for group in item.get("ContentSequence", []):
                values["candidates"].append(_read_group(group))
    return values


def _concept(item) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return (str(code.CodeValue), str(code.CodingSchemeDesignator))


def _algorithm_texts(items) -> dict[str, Any]:
    texts = [(_concept(i)[0], str(i.TextValue)) for i in items if i.ValueType == "TEXT"]
    return {
        "name": next((t for code, t in texts if code == "111001"), None),
        "version": next((t for code, t in texts if code == "111003"), None),
        "parameters": [t for code, t in texts if code == "111002"],
    }


def _scoord(item) -> dict[str, Any]:
    (image,) = [i for i in item.ContentSequence if i.ValueType == "IMAGE"]
    return {
        "graphic_type": str(item.GraphicType),
        "graphic_data": [[float(x), float(y)] for x, y in np.asarray(item.GraphicData, float).reshape(-1, 2)],
        "sop": _slice_name(image),
    }


def _read_group(group) -> dict[str, Any]:
    """One candidate's measurement group (TID 1410) as read back."""
    found: dict[str, Any] = {"comment": None, "finding": None, "finding_site": None, "algorithm": None, "area": None}
    children = list(group.ContentSequence)
    for item in children:
        concept = _concept(item)
        if concept == ("112039", "DCM"):
            found["tracking_id"] = str(item.TextValue)
        elif concept == ("112040", "DCM"):
            found["tracking_uid"] = str(item.UID)
        elif concept == ("121071", "DCM"):
            found["finding"] = _concept_value(item)
        elif concept == ("363698007", "SCT"):
            found["finding_site"] = _concept_value(item)
        elif item.ValueType == "SCOORD" and concept == ("111030", "DCM"):
            found["region"] = _scoord(item)
        elif item.ValueType == "NUM" and concept == AREA[:2]:
            found["area"] = float(item.MeasuredValueSequence[0].NumericValue)
        elif item.ValueType == "NUM" and concept == PROBABILITY[:2]:
            found["probability"] = float(item.MeasuredValueSequence[0].NumericValue)
            inferred = [i for i in item.get("ContentSequence", []) if i.ValueType == "SCOORD"]
            found["probability_region"] = _scoord(inferred[0]) if inferred else None
        elif item.ValueType == "TEXT" and concept == COMMENT[:2]:
            found["comment"] = str(item.TextValue)
    found["algorithm"] = _algorithm_texts(children)
    number = re.search(r"PE candidate (\d+)$", found.get("tracking_id", ""))
    found["candidate"] = int(number.group(1)) if number else None
    slices = re.search(r"slices (\d+)-(\d+) of the series \(key slice (\d+)\)", found["comment"] or "")
    if slices:
        found["slice_first"], found["slice_last"], found["slice_index"] = map(int, slices.groups())
    return found


def _concept_value(item) -> tuple[str, str, str]:
    code = item.ConceptCodeSequence[0]
    return (str(code.CodeValue), str(code.CodingSchemeDesignator), str(code.CodeMeaning))


def _slice_name(reference) -> str:
    """The slice name of an SR image reference (an IMAGE content item): ``sop`` or ``sop#frame``."""
    item = reference.ReferencedSOPSequence[0]
    frames = item.get("ReferencedFrameNumber")
    if frames is None or frames == "":
        return str(item.ReferencedSOPInstanceUID)
    return frame_key(str(item.ReferencedSOPInstanceUID), int(frames[0] if isinstance(frames, MultiValue) else frames))
