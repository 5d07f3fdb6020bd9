"""A study's prediction as DICOM objects: a Comprehensive SR (TID 1500), a Secondary Capture of the
report picture, a Key Object Selection of the key slices and a Segmentation of the clot candidates
(docs/dicom_results.md).

Every object is a new series of the source study. Only the patient and study modules are copied
from the source (highdicom copies them from the first evidence instance); type 2 attributes the
source lacks are written empty, so a real study missing them still gets a result. Nothing of the
patient is ever logged: the functions here name studies by UID.

The objects' UIDs are derived from the study, the bundle and the predicted instances, so a result
written twice for the same study and model (a restart, a re-delivery) is the same instance, not a
second answer.

What the objects share is :mod:`pedetect.hospital.identity`; the SR's content,
:mod:`pedetect.hospital.sr`; the SEG's, :mod:`pedetect.hospital.seg`. This module chooses the key
slices, makes the SC and the KOS, and writes a study's objects.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from highdicom.sc import SCImage
from pydicom.sr.codedict import codes

from pedetect.dicom.frames import split_frame_key
from pedetect.dicom.source import Source, read_bytes
from pedetect.hospital.identity import (
    FILE_NAMES,
    NOT_DIAGNOSTIC,
    PATIENT_STUDY,
    Algorithm,
    CandidateRef,
    KeyRef,
    ResultError,
    algorithm_of,
    finish_result,
    observer_context,
    pixel_spacing_of,
    result_identity,
    result_uid,
    with_type2,
)
from pedetect.hospital.seg import SegError, build_seg
from pedetect.hospital.sr import build_sr
from pedetect.infer.report import StudyResult, safe_name
from pedetect.io import atomic_path
from pedetect.metric.rules import THRESHOLD
from pedetect.view.page import suspicious_slices

N_KEY_TOP = 3  # the most suspicious slices always referenced (as the report picture shows them)


@dataclass
class StudyDicom:
    """The files written for one study (None: not made, with the reason in ``notes``)."""

    study_uid: str
    sr: Path | None = None
    sc: Path | None = None
    ko: Path | None = None
    seg: Path | None = None
    key_sops: list[str] = field(default_factory=list)
    candidates: int = 0  # the candidates in the SR (and the SEG)
    notes: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        return [p for p in (self.sr, self.sc, self.ko, self.seg) if p is not None]


def key_slices(result: StudyResult) -> list[int]:
    """Indices (position order) of the key slices: the most suspicious (the model's highest slice
    of each run above the threshold, and at least the top three) and every slice whose written
    value is above the threshold."""
    model = np.asarray(result.model_slice_probabilities, dtype=float)
    top = list(np.argsort(-model, kind="stable")[:N_KEY_TOP]) if len(model) else []
    chosen = {int(i) for i in top} | set(suspicious_slices(list(result.model_slice_probabilities), THRESHOLD))
    chosen |= {i for i, p in enumerate(result.slice_probabilities) if p > THRESHOLD}
    return sorted(chosen)


def _header(source: Source):
    """A source instance's header (no pixels); ResultError naming the file when unreadable."""
    try:
        return pydicom.dcmread(io.BytesIO(read_bytes(source)), stop_before_pixels=True, force=True)
    except Exception as error:
        raise ResultError(f"{source}: cannot read the header ({type(error).__name__}: {error})") from None


def build_sc(reference, picture: np.ndarray, algorithm: Algorithm, *, series_uid: str, sop_uid: str):
    """The Secondary Capture (highdicom SCImage) of the report picture, RGB."""
    sc = SCImage.from_ref_dataset(
        ref_dataset=reference,
        pixel_array=np.ascontiguousarray(picture, dtype=np.uint8),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        **result_identity("sc", series_uid=series_uid, sop_uid=sop_uid),
        patient_orientation=("L", "P"),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    finish_result(sc, "sc", algorithm)
    # Laterality (type 2C) is for a paired body part: a chest has none, so it is absent (not empty), and the
    # body part says so (without it dciodvfy cannot tell that the condition is false).
    if "Laterality" in sc:
        del sc.Laterality
    sc.BodyPartExamined = "CHEST"
    sc.BurnedInAnnotation = "NO"  # the picture holds probabilities and slice numbers, nothing of the patient
    return sc


def build_ko(key_refs: Sequence[KeyRef], algorithm: Algorithm, *, series_uid: str, sop_uid: str):
    """The Key Object Selection ("Of Interest", DCM 113000) of the key slices: one IMAGE item per
    instance, in the order of its first key slice; a multi-frame instance's item lists its key frames
    in ReferencedFrameNumber (PS3.3 C.10.2.1: required when the reference is not to every frame)."""
    instances: dict[str, tuple[Any, list[int]]] = {}
    for ref in key_refs:
        _, frames = instances.setdefault(str(ref.dataset.SOPInstanceUID), (ref.dataset, []))
        if ref.frame is not None:
            frames.append(ref.frame)
    content = KeyObjectSelection(
        document_title=codes.DCM.OfInterest,
        referenced_objects=[ds for ds, _ in instances.values()],
        observer_device_context=observer_context(algorithm),
        description=f"pedetect: most suspicious slices and slices above {THRESHOLD} ({NOT_DIAGNOSTIC})",
    )
    # highdicom's KeyObjectSelection references whole instances; the frames are added to its IMAGE items.
    for item in content[0].ContentSequence:
        if item.ValueType == "IMAGE":
            reference = item.ReferencedSOPSequence[0]
            frames = instances[str(reference.ReferencedSOPInstanceUID)][1]
            if frames:
                reference.ReferencedFrameNumber = frames if len(frames) > 1 else frames[0]
    ko = KeyObjectSelectionDocument(
        evidence=[ds for ds, _ in instances.values()],
        content=content,
        **result_identity("ko", series_uid=series_uid, sop_uid=sop_uid),
    )
    finish_result(ko, "ko", algorithm)
    return ko


def read_picture(path: Path) -> np.ndarray:
    """A PNG as (H, W, 3) uint8 RGB (even sizes are not needed: SC frames may be odd)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ResultError(f"{path}: cannot read the report picture")
    return image[..., ::-1].copy()


def write_study_results(
    result: StudyResult,
    sources: dict[str, Source],
    picture: np.ndarray | Path | None,
    algorithm: Algorithm,
    out_dir: Path,
    notes: Sequence[str] = (),
) -> StudyDicom:
    """Write ``out_dir/<study>/{sr,sc,ko,seg}.dcm`` for one predicted study.

    ``sources``: slice name or SOPInstanceUID -> the file it came from (a frame ``sop#n`` is looked up
    under its name, then its instance's UID; the key slices' and the candidates' headers are read for
    the references, once per instance; the first readable one gives the patient and study modules).
    ``picture``: the report picture, an RGB array (``Predictor.picture``) or its PNG (no SC without it). No candidate: no SEG. Raises :class:`ResultError`
    when no source header is readable (nothing to copy the patient from); parts that cannot be made
    are skipped with a note. ``notes`` (and every file the prediction could not use, from
    ``result.skipped_files``) become the SR's comments.
    """
    written = StudyDicom(result.study_uid)
    folder = Path(out_dir) / safe_name(result.study_uid)
    headers: dict[str, Any] = {}  # SOPInstanceUID -> the full header (None: unreadable), read once
    key_refs = [
        ref
        for ref in _refs([result.sop_uids[i] for i in key_slices(result)], sources, headers, written.notes)
        if ref is not None
    ]
    written.key_sops = [ref.name for ref in key_refs]
    seed = (result.study_uid, algorithm.identity, hashlib.sha256("|".join(result.sop_uids).encode()).hexdigest())
    found = _refs([str(c.get("sop", "")) for c in result.candidates], sources, headers, written.notes)
    candidates = []
    for record, ref in zip(result.candidates, found):
        if ref is None:
            written.notes.append(f"candidate {record.get('candidate')}: key slice {record.get('sop')} not referenced")
            continue
        tracking_uid = result_uid(*seed, "candidate", str(record.get("candidate")))
        candidates.append(CandidateRef(record, ref, tracking_uid, pixel_spacing_of(ref.dataset, ref.frame)))
    reference = key_refs[0].dataset if key_refs else (candidates[0].ref.dataset if candidates else None)
    for source in sources.values() if reference is None else ():
        try:
            reference = _header(source)
            break
        except ResultError as error:
            written.notes.append(str(error))
    if reference is None:
        raise ResultError(f"study {result.study_uid}: no readable source instance to copy the patient and study from")
    reference = with_type2(reference)
    kept: dict[str, Any] = {}  # one reduced header per instance (the frames of one file share theirs)

    def reduced(ref: KeyRef) -> KeyRef:
        sop = str(ref.dataset.SOPInstanceUID)
        if sop not in kept:
            kept[sop] = with_type2(ref.dataset)
        return KeyRef(kept[sop], ref.frame)

    full_candidates = candidates
    key_refs = [reduced(ref) for ref in key_refs]
    candidates = [CandidateRef(c.record, reduced(c.ref), c.tracking_uid, c.pixel_spacing) for c in candidates]
    library = _library(result, key_refs + [c.ref for c in candidates])
    frames_of_reference = [str(headers[str(r.dataset.SOPInstanceUID)].get("FrameOfReferenceUID", "")) for r in library]
    evidence = list(kept.values()) or [reference]
    written.candidates = len(candidates)

    def uids(kind: str) -> dict[str, str]:
        return {"series_uid": result_uid(*seed, kind, "series"), "sop_uid": result_uid(*seed, kind, "instance")}

    comments = list(notes) + skipped_notes(result)
    sr = build_sr(
        result,
        evidence,
        key_refs,
        algorithm,
        comments=comments,
        candidates=candidates,
        library=library,
        frames_of_reference=[f for f in frames_of_reference if f],
        **uids("sr"),
    )
    written.sr = _save(sr, folder / FILE_NAMES["sr"], reference)
    if isinstance(picture, (str, Path)):  # the report's PNG
        picture = read_picture(Path(picture)) if Path(picture).exists() else None
    if picture is not None:
        written.sc = _save(
            build_sc(reference, picture, algorithm, **uids("sc")),
            folder / FILE_NAMES["sc"],
            reference,
        )
    else:
        written.notes.append("no report picture (no decoded slice): no secondary capture")
    if key_refs:
        written.ko = _save(build_ko(key_refs, algorithm, **uids("ko")), folder / FILE_NAMES["ko"], reference)
    else:
        written.notes.append("no key slice: no key object selection")
    if full_candidates:
        try:
            seg = build_seg(full_candidates, algorithm, notes=written.notes, **uids("seg"))
            written.seg = _save(seg, folder / FILE_NAMES["seg"], reference)
        except SegError as error:
            written.notes.append(f"no segmentation: {error}")
    else:
        written.notes.append("no clot candidate: no segmentation")
    return written


def _library(result: StudyResult, refs: Sequence[KeyRef]) -> list[KeyRef]:
    """Every referenced slice once, in position order (slices the predictions do not name: last)."""
    order = {name: i for i, name in enumerate(result.sop_uids)}
    unique = {ref.name: ref for ref in refs}
    return sorted(unique.values(), key=lambda ref: (order.get(ref.name, len(order)), ref.name))


def _refs(names: Sequence[str], sources: dict[str, Source], headers: dict[str, Any], notes: list[str]):
    """Each slice name (``sop`` or ``sop#frame``) as a :class:`KeyRef` to its full header, or None when
    its source is unknown or unreadable or its frame number is not in the file (the file changed since
    the prediction: a note). ``headers`` caches each instance's header (None: unreadable)."""
    refs: list[KeyRef | None] = []
    for name in names:
        sop, frame = split_frame_key(name)
        source = sources.get(name, sources.get(sop))
        if source is None:
            refs.append(None)
            continue
        if sop not in headers:
            try:
                headers[sop] = _header(source)
            except ResultError as error:
                headers[sop] = None
                notes.append(str(error))
        ds = headers[sop]
        if ds is None:
            refs.append(None)
            continue
        frames = int(ds.get("NumberOfFrames") or 1)
        if frame is not None and not (1 <= frame <= frames and str(ds.get("SOPInstanceUID", "")) == sop):
            notes.append(
                f"{source}: key slice {name} not referenced (the file holds {frames} frame(s) of instance "
                f"{ds.get('SOPInstanceUID', '(none)')})"
            )
            refs.append(None)
            continue
        refs.append(KeyRef(ds, frame))
    return refs


def skipped_notes(result: StudyResult) -> list[str]:
    """One line per file the prediction could not use: its SOPInstanceUID (else its file name) and why."""
    return [
        f"instance {item.get('SOPInstanceUID') or Path(str(item.get('path', ''))).name} not used: {item.get('reason')}"
        for item in result.skipped_files
    ]


def result_from_report(path: Path) -> StudyResult:
    """A study's :class:`StudyResult` from its report JSON (``REPORT/<study>.json``)."""
    record = json.loads(Path(path).read_text())
    names = {f.name for f in dataclasses.fields(StudyResult)}
    return StudyResult(**{k: v for k, v in record.items() if k in names})


def _copy_patient_study(target, reference) -> None:
    """The patient and study attributes of ``reference`` that ``target`` lacks (highdicom's SC and KOS
    take only the main ones), so that every result carries the same modules as the SR."""
    for keyword in PATIENT_STUDY:
        if keyword in reference and keyword not in target:
            target.add(reference.data_element(keyword))


def _save(dataset, path: Path, reference=None) -> Path:
    if reference is not None:
        _copy_patient_study(dataset, reference)
    with atomic_path(path) as tmp:
        dataset.save_as(tmp, enforce_file_format=True)
    return path


def describe(written: StudyDicom) -> str:
    """One line for a log: the study UID and what was written (no patient field)."""
    kinds = ", ".join(p.name for p in written.files) or "nothing"
    notes = f" ({'; '.join(written.notes)})" if written.notes else ""
    return (
        f"DICOM results of study {written.study_uid}: {kinds}, {len(written.key_sops)} key slice(s), "
        f"{written.candidates} clot candidate(s){notes}"
    )


def write_results(
    results: Sequence[StudyResult],
    sources: dict[str, dict[str, Source]],
    report_dir: Path,
    bundles: Sequence[Any],
    out_dir: Path,
) -> list[tuple[str, StudyDicom | None, str | None]]:
    """``pedetect predict --dicom-out``: the DICOM results of every predicted study, from the report's
    pictures (``report_dir/<study>.png``). Returns per study (UID, what was written, the error)."""
    algorithm = algorithm_of(bundles)
    done: list[tuple[str, StudyDicom | None, str | None]] = []
    for result in results:
        picture = Path(report_dir) / f"{safe_name(result.study_uid)}.png"
        try:
            written = write_study_results(result, sources.get(result.study_uid, {}), picture, algorithm, Path(out_dir))
            done.append((result.study_uid, written, None))
        except Exception as error:  # one study's results lost, the others still written
            done.append((result.study_uid, None, f"DICOM results not written: {type(error).__name__}: {error}"))
    return done
