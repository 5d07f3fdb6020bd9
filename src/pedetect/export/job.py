"""``pedetect export``: a bundle's models in ONNX (and an int8 CNN), checked on real slices.

For every fold of the bundle (:mod:`pedetect.models.onnx` has the file formats):

1. the CNN and the sequence head are exported (``MODEL_DIR/onnx/fold<k>/cnn.onnx``, ``seq.onnx``);
2. with ``int8``, the CNN is quantized, its activation ranges calibrated on slices of the fold's
   *training* series in the store (``cnn_int8.onnx``);
3. on the fold's *validation* series (the ones its CNN never saw; any series of the store when no
   labels are given), every runtime runs the whole fold (CNN, then head) on the same slices as
   PyTorch does: the largest differences of embeddings, logits and probabilities, and, with labels,
   the slice AUC and the competition score of each runtime, pooled over the folds as the
   cross-validation pools them.

``MODEL_DIR/onnx/export.json`` records it all with the SHA-256 of the weights each file was made
from, each runtime's time on the check series, and which runtimes are exact enough to be
``predict``'s default: ONNX fp32 when no probability moves by more than :data:`FP32_TOLERANCE`, int8
when the score moves by at most :data:`INT8_SCORE_TOLERANCE` and the slice AUC by at most
:data:`INT8_AUC_TOLERANCE`. ``auto`` takes the fastest of those and PyTorch as measured here (int8
is not faster for every network: on the demo's small CNN its quantize and dequantize steps cost
more than they save).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pandas as pd
import torch

from pedetect.console import echo as console_echo
from pedetect.data.dataset import SLICE_INDEX, open_store, series_inputs, series_lung_box, slice_items
from pedetect.data.folds import FOLD, attach_folds, read_folds, read_labels
from pedetect.io import file_sha256, write_json_atomic
from pedetect.labels import EXAM_LABELS, IMAGE_LABEL, SERIES, SOP, STUDY
from pedetect.metric.evaluate import roc_auc
from pedetect.metric.loss import sigmoid
from pedetect.models.bundle import read_bundle, read_preprocessing
from pedetect.models.layout import EXPORT_FILE, FOLDS_FILE, ONNX_DIR, WEIGHTS_FILE, cnn_dir, onnx_dir, seq_dir
from pedetect.models.onnx import (
    CNN_FILE,
    CNN_INT8_FILE,
    SEQ_FILE,
    OnnxSequenceHead,
    OnnxSliceClassifier,
    export_sequence_head,
    export_slice_classifier,
    quantize_slice_classifier,
)
from pedetect.models.sequence import load_sequence_head
from pedetect.models.slice_classifier import embed_volume, load_slice_classifier
from pedetect.train.embed import store_windows
from pedetect.train.seq import SeriesRecord, score_records

EXPORT_FORMAT = 1
FP32_TOLERANCE = 1e-4  # largest change of any probability for ONNX fp32 to count as the same model
INT8_SCORE_TOLERANCE = 0.005  # int8 is the default only when the score moves by at most this ...
INT8_AUC_TOLERANCE = 0.002  # ... and the slice AUC by at most this
CALIBRATION_BATCH = 1


class ExportError(ValueError):
    """An export that cannot be made; the message names the file or setting."""


@dataclass
class _Check:
    """What one runtime gave on the check series, against PyTorch's run of the same fold."""

    max_embedding: float = 0.0
    max_logit: float = 0.0
    max_probability: float = 0.0
    seconds: float = 0.0  # the runtime's own time on the check series (CNN and head)
    slices: int = 0
    slice_logits: list[np.ndarray] = field(default_factory=list)  # the CNN's, per series
    head_slices: list[np.ndarray] = field(default_factory=list)  # the head's slice logits, per series
    head_exams: list[np.ndarray] = field(default_factory=list)  # the head's exam logits, per series

    def timed(self, seconds: float, slices: int) -> None:
        self.seconds += seconds
        self.slices += slices

    def add(self, run: tuple[np.ndarray, ...], reference: tuple[np.ndarray, ...] | None = None) -> None:
        """One series' (embedding, CNN logit, head slice logits, head exam logits); the largest
        differences are taken against ``reference`` (PyTorch's run of the same series) when given."""
        _, l1, s1, x1 = run
        self.slice_logits.append(l1)
        self.head_slices.append(s1)
        self.head_exams.append(x1)
        if reference is None:
            return
        e0, l0, s0, x0 = reference
        e1 = run[0]
        self.max_embedding = max(self.max_embedding, float(np.abs(e0.astype(np.float32) - e1.astype(np.float32)).max()))
        self.max_logit = max(self.max_logit, float(np.abs(l0 - l1).max()))
        moved = max(float(np.abs(sigmoid(s0) - sigmoid(s1)).max()), float(np.abs(sigmoid(x0) - sigmoid(x1)).max()))
        self.max_probability = max(self.max_probability, moved)

    def record(self) -> dict[str, float | None]:
        return {
            "max_abs_embedding": self.max_embedding,
            "max_abs_slice_logit": self.max_logit,
            "max_abs_probability": self.max_probability,
            "seconds_per_100_slices": 100 * self.seconds / self.slices if self.slices else None,
        }


def copy_bundle(model_dir: Path, out: Path) -> None:
    """What ``predict`` needs of a bundle, copied to ``out`` (not the checkpoints, embeddings or logs)."""
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"--out {out} exists and is not empty: give a new folder")
    skip = shutil.ignore_patterns("checkpoints", "logs", "mlruns", "*.npz", "*.tmp*")
    shutil.copytree(model_dir, out, ignore=skip, dirs_exist_ok=True)
    # The embedding pass's folder held only embeddings; its empty shell would look like a stage.
    shutil.rmtree(out / "embed", ignore_errors=True)


def _labelled_items(source, labels: str | Path | pd.DataFrame, model_dir: Path) -> pd.DataFrame:
    frame = labels if isinstance(labels, pd.DataFrame) else read_labels(labels)
    items = slice_items(frame, source.slices, source="the labels" if isinstance(labels, pd.DataFrame) else str(labels))
    return attach_folds(items, read_folds(model_dir / FOLDS_FILE), source=str(model_dir / FOLDS_FILE))


def _choose(series: list[str], n: int | None, seed: int) -> list[str]:
    series = sorted(series)
    if n is None or len(series) <= n:
        return series
    picked = np.random.default_rng(seed).choice(len(series), size=n, replace=False)
    return [series[i] for i in sorted(picked)]


def _calibration_batches(source, series: list[str], input_config, *, slices: int, batch_size: int, seed: int):
    """``slices`` slices of the given series, as the CNN takes them, ``batch_size`` at a time."""
    rng = np.random.default_rng(seed)
    order = [series[i] for i in rng.permutation(len(series))]
    per_series = max(1, -(-slices // max(len(order), 1)))
    pending, given = [], 0
    for uid in order:
        if given >= slices:
            break
        volume = source.read_series(uid)
        box = series_lung_box(volume, input_config, store_windows(source))  # None without cnn.input.lung_crop
        inputs = series_inputs(volume, input_config, box).numpy()
        take = rng.choice(len(inputs), size=min(per_series, len(inputs), slices - given), replace=False)
        pending.append(inputs[np.sort(take)])
        given += len(take)
        while sum(len(p) for p in pending) >= batch_size:
            stacked = np.concatenate(pending)
            yield stacked[:batch_size]
            pending = [stacked[batch_size:]]
    if pending and sum(len(p) for p in pending):
        yield np.concatenate(pending)


def export_bundle(
    model_dir: str | Path,
    store: str | Path | Any,
    *,
    labels: str | Path | pd.DataFrame | None = None,
    out: str | Path | None = None,
    int8: bool = False,
    calibration_slices: int = 512,
    check_series: int | None = 40,
    threads: int | None = None,
    batch_size: int = 32,
    echo: Callable[[str], None] = console_echo,
) -> dict[str, Any]:
    """Export every fold of the bundle at ``model_dir`` (into ``out``, a copy, when given); returns
    the record written to ``onnx/export.json``. Raises :class:`ExportError` or
    :class:`~pedetect.models.bundle.BundleError` before writing anything when an argument is unusable."""
    started = time.perf_counter()
    model_dir = Path(model_dir)
    bundle = read_bundle(model_dir)
    source = open_store(store) if isinstance(store, (str, Path)) else store  # a path, or a store object (tests)
    items = _labelled_items(source, labels, model_dir) if labels is not None else None
    _check_preprocessing(read_preprocessing(model_dir), source, store, echo)
    if out is not None:
        copy_bundle(model_dir, Path(out))
        model_dir = Path(out)
        echo(f"export: copied the bundle to {model_dir}")
    shutil.rmtree(model_dir / ONNX_DIR, ignore_errors=True)  # a new export replaces every file of the old one
    if threads:
        torch.set_num_threads(int(threads))

    config = bundle.config
    if config.seq.fixed_length is not None and config.seq.resize == "longer":
        raise ExportError(
            "this bundle's sequence head resizes only series longer than seq.fixed_length (seq.resize: longer): "
            "a branch on the length that ONNX export cannot keep; predict it with --runtime torch"
        )
    store_series = sorted(source.slices[SERIES].unique().tolist())
    checks = {"onnx": _Check(), "onnx-int8": _Check()} if int8 else {"onnx": _Check()}
    reference = _Check()
    records: list[Any] = []  # SeriesRecord of each check series (labels given)
    folds: dict[str, Any] = {}
    for k in bundle.folds:
        fold_started = time.perf_counter()
        folder = onnx_dir(model_dir, k)
        cnn, head = _load_fold(model_dir, k, config)
        export_slice_classifier(
            cnn, folder / CNN_FILE, channels=config.cnn.input.channels, image_size=config.cnn.input.image_size
        )
        export_sequence_head(head, folder / SEQ_FILE)
        if items is not None:
            own = items[items[FOLD] == k]
            check = _choose(own[SERIES].unique().tolist(), check_series, seed=k)
            training = sorted(items.loc[items[FOLD] != k, SERIES].unique().tolist())
        else:
            check = _choose(store_series, check_series, seed=k)
            training = [s for s in store_series if s not in set(check)] or store_series
        record: dict[str, Any] = {
            "cnn_sha256": file_sha256(cnn_dir(model_dir, k) / WEIGHTS_FILE),
            "seq_sha256": file_sha256(seq_dir(model_dir, k) / WEIGHTS_FILE),
            "files": [CNN_FILE, SEQ_FILE],
            "check_series": len(check),
        }
        if int8:
            # One slice per calibration batch: onnxruntime's calibrator keeps every activation of a batch
            # (rexnet_200 at 512 px: 1.7 GB a slice; 14 GB for batches of 8). Min-max ranges do not depend on it.
            batches = _calibration_batches(
                source, training, config.cnn.input, slices=calibration_slices, batch_size=CALIBRATION_BATCH, seed=k
            )
            quantize_slice_classifier(folder / CNN_FILE, folder / CNN_INT8_FILE, batches)
            record["files"].append(CNN_INT8_FILE)
            record["calibration_slices"] = calibration_slices
        fold_reference, fold_checks = _check_fold(
            source, check, cnn, head, folder, config, int8=int8, threads=threads, batch_size=batch_size
        )
        for name, own_check in fold_checks.items():
            record[name] = own_check.record()
            _merge(checks[name], own_check)
        _merge(reference, fold_reference)
        if items is not None:
            records += _records(items, source, check, k)
        folds[str(k)] = record
        echo(
            f"export fold {k}: {', '.join(record['files'])}; on {len(check)} series, largest probability change "
            + ", ".join(f"{name} {record[name]['max_abs_probability']:.2g}" for name in checks)
            + f" ({time.perf_counter() - fold_started:.0f} s)"
        )

    # Per runtime: the check's numbers (None where undefined) and the quality scores (JSON record).
    summary: dict[str, dict[str, Any]] = {name: check.record() for name, check in checks.items()}
    summary["torch"] = {"seconds_per_100_slices": reference.record()["seconds_per_100_slices"]}
    if records:
        summary["torch"].update(_quality(records, reference))
        for name, runtime_check in checks.items():
            summary[name].update(_quality(records, runtime_check))
            summary[name]["score_change"] = summary[name]["score"] - summary["torch"]["score"]
            summary[name]["slice_auc_change"] = summary[name]["slice_auc"] - summary["torch"]["slice_auc"]
    accepted = {"onnx": summary["onnx"]["max_abs_probability"] <= FP32_TOLERANCE}
    reasons = {
        "onnx": f"largest probability change {summary['onnx']['max_abs_probability']:.2g} (tolerance {FP32_TOLERANCE:g})"
    }
    if int8:
        accepted["onnx-int8"], reasons["onnx-int8"] = _int8_verdict(summary)
    record = {
        "format": EXPORT_FORMAT,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "labelled_check": items is not None,
        "check": summary,
        "default_ok": accepted,
        "why": reasons,
        "folds": folds,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(model_dir / ONNX_DIR / EXPORT_FILE, record)
    return record


def _check_preprocessing(preprocessing: dict, source, store, echo) -> None:
    settings = getattr(source, "settings", None) or {}
    if (
        preprocessing.get("recorded")
        and settings.get("windows")
        and [list(map(float, w)) for w in settings["windows"]]
        != [list(map(float, w)) for w in preprocessing["windows"]]
    ):
        echo(
            f"note: {store} was prepared with other windows than the bundle's training store: the check compares runtimes, not the model's quality"
        )


def _load_fold(model_dir: Path, fold: int, config):
    return load_slice_classifier(model_dir, fold, config=config), load_sequence_head(model_dir, fold, config=config)


def _check_fold(source, check: list[str], cnn, head, folder: Path, config, *, int8: bool, threads, batch_size: int):
    """PyTorch's :class:`_Check` and each runtime's, over the fold's check series."""
    onnx_head = OnnxSequenceHead(folder / SEQ_FILE, threads=threads)
    # No memory arenas: PyTorch and two ONNX Runtime CNNs side by side would each keep their peak
    # (a full-size CNN at 512 px: about 5 GB apiece).
    runtimes = {"onnx": (OnnxSliceClassifier(folder / CNN_FILE, threads=threads, keep_memory=False), onnx_head)}
    if int8:
        # Only the CNN is quantized: the int8 runtime's head is the exact one.
        runtimes["onnx-int8"] = (
            OnnxSliceClassifier(folder / CNN_INT8_FILE, threads=threads, keep_memory=False),
            onnx_head,
        )
    reference, results = _Check(), {name: _Check() for name in runtimes}
    for uid in check:
        volume = source.read_series(uid)
        if not len(volume):
            continue
        started = time.perf_counter()
        embedding, logit = embed_volume(cnn, volume, config.cnn.input, batch_size=batch_size)
        torch_run = (embedding, logit, *head.predict_series(embedding, logit))
        reference.timed(time.perf_counter() - started, len(volume))
        reference.add(torch_run)
        for name, (runtime_cnn, runtime_head) in runtimes.items():
            started = time.perf_counter()
            embeddings, logits = embed_volume(runtime_cnn, volume, config.cnn.input, batch_size=batch_size)
            run = (embeddings, logits, *runtime_head.predict_series(embeddings, logits))
            results[name].timed(time.perf_counter() - started, len(volume))
            results[name].add(run, torch_run)
    return reference, results


def _merge(into: _Check, other: _Check) -> None:
    into.max_embedding = max(into.max_embedding, other.max_embedding)
    into.max_logit = max(into.max_logit, other.max_logit)
    into.max_probability = max(into.max_probability, other.max_probability)
    into.seconds += other.seconds
    into.slices += other.slices
    into.slice_logits += other.slice_logits
    into.head_slices += other.head_slices
    into.head_exams += other.head_exams


def _records(items: pd.DataFrame, source, check: list[str], fold: int) -> list[Any]:
    """A :class:`~pedetect.train.seq.SeriesRecord` (targets; PyTorch's embeddings are not kept) per
    check series, in the order the checks ran."""
    target_of = dict(zip(items[SOP], items[IMAGE_LABEL].astype(np.float32)))
    exam_of = items.groupby(SERIES)[[STUDY, *EXAM_LABELS]].first()
    slices = source.slices
    records = []
    for uid in check:
        sops = slices.loc[slices[SERIES] == uid].sort_values(SLICE_INDEX)[SOP].to_numpy()
        if not len(sops):  # as _check_fold skips it
            continue
        labelled = np.array([s in target_of for s in sops])
        target = np.array([target_of.get(s, 0.0) for s in sops], dtype=np.float32)
        row = exam_of.loc[uid]
        records.append(
            SeriesRecord(
                row[STUDY],
                uid,
                fold,
                np.zeros((len(sops), 0), np.float16),
                np.zeros(len(sops), np.float32),
                sops,
                target,
                labelled,
                row[list(EXAM_LABELS)].to_numpy(dtype=np.float32),
            )
        )
    return records


def _quality(records: list[Any], check: _Check) -> dict[str, float]:
    """Score (the competition metric) and slice AUC (the CNN's logits) of one runtime on the records."""
    parts = score_records(records, check.head_slices, np.stack(check.head_exams).astype(np.float64))
    target = np.concatenate([r.slice_target[r.labelled] for r in records])
    score = np.concatenate([s[r.labelled] for r, s in zip(records, check.slice_logits)])
    return {"score": float(parts.score), "slice_auc": float(roc_auc(target, score))}


def _int8_verdict(summary: dict[str, Any]) -> tuple[bool, str]:
    int8 = summary["onnx-int8"]
    if "score_change" not in int8:
        return False, "no labels were given (--labels): the score and slice AUC of int8 were not measured"
    ok = abs(int8["score_change"]) <= INT8_SCORE_TOLERANCE and abs(int8["slice_auc_change"]) <= INT8_AUC_TOLERANCE
    return ok, (
        f"score {int8['score']:.4f} against {summary['torch']['score']:.4f} ({int8['score_change']:+.4f}, tolerance {INT8_SCORE_TOLERANCE}), "
        f"slice AUC {int8['slice_auc']:.4f} against {summary['torch']['slice_auc']:.4f} ({int8['slice_auc_change']:+.4f}, tolerance {INT8_AUC_TOLERANCE})"
    )
