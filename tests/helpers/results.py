"""Checks of DICOM results shared by the hospital tests: the validators (dcmtk's dsrdump,
dicom3tools' dciodvfy), OHIF 3.13.2's SR reader run in node (tests/ohif/check_sr.mjs) with the
inputs OHIF would give it, and a synthetic study whose clot candidates are put by hand on its real
emboli (tests/hospital/test_dicom_results.py, test_enhanced_results.py, test_serve_selection.py,
test_ohif.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from helpers.browser import missing
from pedetect.dicom.frames import frame_geometry, split_frame_key
from pedetect.hospital.identity import Algorithm
from pedetect.infer.report import StudyResult
from pedetect.labels import EXAM_LABELS
from pedetect.synth import write_dataset

VALIDATORS = ("dciodvfy", "dsrdump")
OHIF_DIR = Path(__file__).resolve().parents[1] / "ohif"  # package.json, package-lock.json, check_sr.mjs
# dsrdump's own limits, not the object's: DCMTK checks TID 1500 but not the KOS's TID 2010.
DSRDUMP_NOTICES = ("W: Check for template constraints not yet supported",)
PHANTOM_SLICES, PHANTOM_SIZE, PHANTOM_SEED = 40, 256, 3  # seed 3's first positive test study: five emboli
ALGORITHM = Algorithm(bundles=("phantom-candidates demo folds=0 sha256:0123456789abcdef",))


def validator_report(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) of dciodvfy on any object and of dsrdump on SR and KOS documents."""
    absent = [tool for tool in VALIDATORS if shutil.which(tool) is None]
    if absent:
        pytest.fail(f"{', '.join(absent)} not installed (Debian packages dicom3tools, dcmtk; .ci/run installs them)")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    errors = [f"dciodvfy: {line}" for line in lines if line.startswith("Error")]
    warnings = [f"dciodvfy: {line}" for line in lines if line.startswith("Warning")]
    if pydicom.dcmread(path, stop_before_pixels=True).Modality in ("SR", "KO"):
        run = subprocess.run(["dsrdump", "-Ee", str(path)], capture_output=True, text=True, timeout=60)
        lines = (run.stdout + run.stderr).splitlines()
        errors += [f"dsrdump: {line}" for line in lines if line.startswith(("E:", "F:"))]
        warnings += [f"dsrdump: {line}" for line in lines if line.startswith("W:") and line not in DSRDUMP_NOTICES]
        errors += [f"dsrdump exit {run.returncode}"] if run.returncode else []
    return errors, warnings


def validator_errors(path: Path) -> list[str]:
    """Errors dciodvfy reports on any object, and dsrdump on SR and KOS documents (warnings allowed)."""
    return validator_report(path)[0]


def phantom_study(root: Path, seed: int = PHANTOM_SEED, *, positive: bool = True, enhanced: bool = False):
    """A synthetic test study (``root/data/test``) and a :class:`StudyResult` made by hand: positive,
    one candidate per embolus on the slice where it shows most (its outline the mask's contour, its
    point the mask's centroid, its side the phantom's), slices of the emboli at 0.9; negative, no
    candidate and every slice at 0.05. Returns (result, sources: SOPInstanceUID -> file)."""
    import cv2

    from pedetect.synth import plan_study
    from pedetect.synth.dataset import clot_side_and_level, embolus_masks

    options = dict(
        slices=PHANTOM_SLICES,
        size=PHANTOM_SIZE,
        seed=seed,
        split="test",
        positive_fraction=1.0 if positive else 0.0,
        indeterminate_fraction=0.0,
        min_embolus_pixels=25,
    )
    labels = write_dataset(root / "data", 1, progress=False, enhanced=enhanced, **options)
    plan = plan_study(0, **options)
    names = labels["SOPInstanceUID"].tolist()
    slices = np.full(len(names), 0.05)
    candidates = []
    for i, ((k0, r0, c0), mask) in enumerate(embolus_masks(plan) if positive else []):
        counts = mask.sum(axis=(1, 2))
        dk = int(np.argmax(counts))
        contours, _ = cv2.findContours(mask[dk].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        contour = max(contours, key=cv2.contourArea)
        rows, cols = np.nonzero(mask[dk])
        on = np.flatnonzero(counts)
        slices[k0 + on] = 0.9
        candidates.append(
            {
                "candidate": i + 1,
                "series": plan.series_uid,
                "score": round(0.95 - 0.1 * i, 3),
                "side": clot_side_and_level(plan, i)[0],
                "sop": names[k0 + dk],
                "slice_index": k0 + dk,
                "row": float(rows.mean() + r0),
                "col": float(cols.mean() + c0),
                "slice_first": int(k0 + on[0]),
                "slice_last": int(k0 + on[-1]),
                "patient_mm": None,
                "outline": [[float(p[0][1] + r0), float(p[0][0] + c0)] for p in contour],
            }
        )
    exam = dict.fromkeys(EXAM_LABELS, 0.1)
    exam["negative_exam_for_pe"] = 0.1 if positive else 0.9
    exam["rv_lv_ratio_lt_1"] = 0.8 if positive else 0.1
    result = StudyResult(
        study_uid=str(labels["StudyInstanceUID"].iloc[0]),
        exam_probabilities=dict(exam),
        sop_uids=names,
        z=[float(i) for i in range(len(names))],
        slice_probabilities=slices.tolist(),
        model_exam_probabilities={label: round(p + 0.01, 3) for label, p in exam.items()},
        model_slice_probabilities=slices.tolist(),
        candidates=candidates,
    )
    files = sorted((root / "data" / "test").rglob("*.dcm"))
    sources = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    return result, sources


def write_picture(path: Path) -> Path:
    import cv2

    picture = np.zeros((120, 200, 3), dtype=np.uint8)
    cv2.putText(picture, "pedetect", (10, 60), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (255, 255, 255), 2)
    cv2.imwrite(str(path), picture)
    return path


def slice_geometry(sources: dict, name: str) -> dict:
    """Where slice ``name`` (``sop`` or ``sop#frame``) is: its instance's rows, columns, frame of
    reference and its plane (position, orientation, spacing: the frame's for a multi-frame file)."""
    sop, frame = split_frame_key(name)
    ds = pydicom.dcmread(sources[sop], stop_before_pixels=True)
    if frame is None:
        plane = {
            "position": [float(v) for v in ds.ImagePositionPatient],
            "orientation": [float(v) for v in ds.ImageOrientationPatient],
            "pixel_spacing": [float(v) for v in ds.PixelSpacing],
        }
    else:
        plane = frame_geometry(ds, int(ds.NumberOfFrames))[frame - 1]
    return {
        "sop": sop,
        "frame": frame or 1,
        "rows": int(ds.Rows),
        "columns": int(ds.Columns),
        "frame_of_reference": str(ds.FrameOfReferenceUID),
        "position": [float(v) for v in plane["position"]],
        "orientation": [float(v) for v in plane["orientation"]],
        "pixel_spacing": [float(v) for v in plane["pixel_spacing"]],
    }


def patient_mm(geometry: dict, row: float, col: float) -> list[float]:
    """Patient coordinates of pixel (row, col), 0-based pixel-centre indices (PS3.3 C.7.6.2.1.1)."""
    position, orientation = np.array(geometry["position"]), np.array(geometry["orientation"])
    spacing = geometry["pixel_spacing"]  # (between rows, between columns)
    return (position + orientation[:3] * spacing[1] * col + orientation[3:] * spacing[0] * row).tolist()


def adapter_inputs(result: StudyResult, sources: dict, values: dict) -> tuple[dict, list]:
    """What OHIF's metadata provider gives cornerstone for each candidate's key slice (imagePlaneModule,
    keyed ``sop:frame``), and per candidate the tool state expected: the tool, the slice, and its
    outline's vertices (or its point) in patient coordinates."""
    images, expected = {}, []
    uid_of = {c["candidate"]: c["tracking_uid"] for c in values["candidates"]}
    for c in result.candidates:
        g = slice_geometry(sources, c["sop"])
        images[f"{g['sop']}:{g['frame']}"] = {
            "frameOfReferenceUID": g["frame_of_reference"],
            "sopInstanceUID": g["sop"],
            "rows": g["rows"],
            "columns": g["columns"],
            "imagePositionPatient": g["position"],
            "imageOrientationPatient": g["orientation"],
            "rowCosines": g["orientation"][:3],
            "columnCosines": g["orientation"][3:],
            "pixelSpacing": g["pixel_spacing"],
            "rowPixelSpacing": g["pixel_spacing"][0],
            "columnPixelSpacing": g["pixel_spacing"][1],
        }
        polygon = len(c["outline"]) >= 3
        points = c["outline"] if polygon else [[c["row"], c["col"]]]
        expected.append(
            {
                "trackingUid": uid_of[c["candidate"]],
                "toolName": "PlanarFreehandROI" if polygon else "Probe",
                "sop": g["sop"],
                "frame": g["frame"],
                "closed": True if polygon else None,
                "points": [patient_mm(g, r, col) for r, col in points],
            }
        )
    return images, expected


def run_adapter(sr: Path, images: dict, expected: list, work: Path) -> dict:
    """tests/ohif/check_sr.mjs on ``sr``: OHIF 3.13.2's adapters turn its groups into tool state."""
    node = shutil.which("node")
    if node is None:
        missing("node is not installed (Debian: nodejs npm; .ci/run installs them)")
    if not (OHIF_DIR / "node_modules" / "@cornerstonejs" / "adapters").is_dir():
        pytest.fail(f"run `npm ci` in {OHIF_DIR} (.ci/run does): @cornerstonejs/adapters is not installed")
    (work / "images.json").write_text(json.dumps(images))
    (work / "expected.json").write_text(json.dumps(expected))
    run = subprocess.run(
        [node, str(OHIF_DIR / "check_sr.mjs"), str(sr), str(work / "images.json"), str(work / "expected.json")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=OHIF_DIR,
    )
    assert run.stdout.strip(), run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert run.returncode == 0 and report["errors"] == [], report["errors"] or run.stderr[-3000:]
    return report
