"""The model bundle: one folder holding everything ``predict`` needs (DESIGN.md §4).

``pedetect train CONFIG`` (all stages) leaves::

    MODEL_DIR/config.yaml              the resolved config: the models are rebuilt from it
    MODEL_DIR/folds.csv                where every training study was
    MODEL_DIR/prior.json               training frequency of every label (for studies that cannot be read)
    MODEL_DIR/cnn/fold<k>/model.safetensors   slice CNN of fold k (+ metrics, curves)
    MODEL_DIR/seq/fold<k>/model.safetensors   sequence head of fold k (+ metrics, curves)
    MODEL_DIR/seq/cv.json, oof_predictions.csv   the cross-validation
    MODEL_DIR/bundle.json              format version, folds, stages complete, embedding width, CV score
    MODEL_DIR/preprocessing.json       the slice store's settings (windows, image size) that ``predict``
                                       reads DICOM with; absent: the store defaults (DESIGN.md §2 windows,
                                       each series' own size)

Pairing at inference: fold k's sequence head reads the embeddings of fold k's CNN
(``embed_volume(load_slice_classifier(dir, k), …)`` then ``predict_series(load_sequence_head(dir, k), …)``),
and ``predict`` averages the folds' probabilities. That pairing is exactly what the cross-validated
score measures (fold k's studies embedded by CNN k, scored by head k).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pedetect.train.config import ExperimentConfig

BUNDLE_FILE = "bundle.json"
PRIOR_FILE = "prior.json"
PREPROCESSING_FILE = "preprocessing.json"
BUNDLE_FORMAT = 1
COMPLETE = "COMPLETE"  # the marker every stage writes last in a finished fold (pedetect.train.cnn.COMPLETE)


class BundleError(ValueError):
    """A model folder that is not a complete bundle; the message names what is missing."""


@dataclass(frozen=True)
class Bundle:
    path: Path
    config: ExperimentConfig
    folds: list[int]  # folds with both a CNN and a sequence head
    prior: dict[str, float]  # label -> training frequency
    embedding_dim: int | None  # from bundle.json (None for a bundle of part of the folds)


def _fold_ids(folds_csv: Path) -> list[int]:
    import pandas as pd

    return sorted(int(k) for k in pd.read_csv(folds_csv)["fold"].unique())


def complete_folds(model_dir: str | Path) -> list[int]:
    """Fold ids with both ``cnn/fold<k>/COMPLETE`` and ``seq/fold<k>/COMPLETE``."""
    model_dir = Path(model_dir)
    ids = set()
    for stage in ("cnn", "seq"):
        found = {int(p.parent.name[4:]) for p in (model_dir / stage).glob(f"fold*/{COMPLETE}") if p.parent.name[4:].isdigit()}
        ids = found if stage == "cnn" else ids & found
    return sorted(ids)


def read_bundle(model_dir: str | Path, *, allow_partial: bool = False) -> Bundle:
    """Read and check a model folder made by ``pedetect train``.

    A complete bundle has config.yaml, prior.json, folds.csv and, for every fold of folds.csv, a CNN
    and a sequence head. ``allow_partial``: accept a bundle where only some folds have both (at least one).
    Raises :class:`BundleError` naming what is missing.
    """
    from pedetect.config import ConfigError
    from pedetect.train.config import read_resolved_config

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise BundleError(f"model folder not found: {model_dir}")
    missing = [name for name in ("config.yaml", PRIOR_FILE, "folds.csv") if not (model_dir / name).is_file()]
    if missing:
        raise BundleError(f"{model_dir} is not a complete model bundle: {', '.join(missing)} missing (train it with pedetect train CONFIG)")
    try:
        config = read_resolved_config(model_dir)
    except ConfigError as error:
        raise BundleError(f"{model_dir / 'config.yaml'} cannot be read: {error}") from None
    expected = _fold_ids(model_dir / "folds.csv")
    folds = complete_folds(model_dir)
    lacking = [k for k in expected if k not in folds]
    if lacking and (not allow_partial or not folds):
        what = [f"{stage}/fold{k}/{COMPLETE}" for k in lacking for stage in ("cnn", "seq") if not (model_dir / stage / f"fold{k}" / COMPLETE).is_file()]
        raise BundleError(
            f"{model_dir} is not a complete model bundle: fold(s) {lacking} lack {', '.join(what[:6])}{' …' if len(what) > 6 else ''} "
            "(run pedetect train CONFIG with the same --out to finish it)"
        )
    prior = json.loads((model_dir / PRIOR_FILE).read_text())
    from pedetect.labels import EXAM_LABELS, IMAGE_LABEL

    absent = [label for label in (IMAGE_LABEL, *EXAM_LABELS) if label not in prior]
    if absent:
        raise BundleError(f"{model_dir / PRIOR_FILE} lacks the label(s) {', '.join(absent)}")
    info: dict[str, Any] = json.loads((model_dir / BUNDLE_FILE).read_text()) if (model_dir / BUNDLE_FILE).is_file() else {}
    if info and info.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{model_dir / BUNDLE_FILE}: bundle format {info.get('format')} is not the supported {BUNDLE_FORMAT}")
    return Bundle(model_dir, config, [k for k in folds if k in expected], prior, info.get("embedding_dim"))


def write_bundle_info(model_dir: str | Path, *, folds: list[int], embedding_dim: int, cv_score: float | None) -> dict[str, Any]:
    """``MODEL_DIR/bundle.json``, written when a full training run finishes."""
    from pedetect.io import atomic_path

    info = {"format": BUNDLE_FORMAT, "folds": folds, "stages": ["cnn", "embed", "seq"], "embedding_dim": embedding_dim, "cv_score": cv_score}
    with atomic_path(Path(model_dir) / BUNDLE_FILE) as tmp:
        tmp.write_text(json.dumps(info, indent=2) + "\n")
    return info


def write_preprocessing(model_dir: str | Path, store_settings: dict[str, Any]) -> dict[str, Any]:
    """``MODEL_DIR/preprocessing.json`` from the settings of the slice store the model was trained on
    (``SliceStore.settings``): what ``predict`` needs to read DICOM exactly as ``prepare`` did."""
    from pedetect.io import atomic_path

    keys = ("windows", "window_names", "image_size", "jpeg_quality", "jpeg_sampling")
    record = {key: store_settings[key] for key in keys if key in store_settings}
    with atomic_path(Path(model_dir) / PREPROCESSING_FILE) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return record


def read_preprocessing(model_dir: str | Path) -> dict[str, Any]:
    """The recorded store settings (:func:`write_preprocessing`), or the store defaults with
    ``"recorded": False`` for a bundle that has none."""
    path = Path(model_dir) / PREPROCESSING_FILE
    if path.is_file():
        record = json.loads(path.read_text())
        if len(record.get("windows", ())) != 3:
            raise BundleError(f"{path}: 'windows' must list three [level, width] pairs")
        return {"image_size": record.get("image_size"), **record, "recorded": True}
    from pedetect.dicom.pixels import DEFAULT_WINDOWS

    return {"windows": [list(w) for w in DEFAULT_WINDOWS], "image_size": None, "recorded": False}
