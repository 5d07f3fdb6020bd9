"""The model bundle: one folder holding everything ``predict`` needs (docs/design.md, "The model folder").

``pedetect train CONFIG`` (all stages) leaves a model folder whose names are in
:mod:`pedetect.models.layout`; this module reads it as a whole and checks that it is complete.

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

from pedetect.models.layout import (
    BUNDLE_FILE,
    COMPLETE,
    CONFIG_FILE,
    FOLDS_FILE,
    PREPROCESSING_FILE,
    PRIOR_FILE,
    complete_folds,
    fold_dir,
    read_model_config,
)

if TYPE_CHECKING:
    from pedetect.recipe import ExperimentConfig

BUNDLE_FORMAT = 1


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


def paired_folds(model_dir: str | Path) -> list[int]:
    """Fold ids with both a finished CNN and a finished sequence head."""
    return sorted(set(complete_folds(model_dir, "cnn")) & set(complete_folds(model_dir, "seq")))


def read_bundle(model_dir: str | Path, *, allow_partial: bool = False) -> Bundle:
    """Read and check a model folder made by ``pedetect train``.

    A complete bundle has config.yaml, prior.json, folds.csv and, for every fold of folds.csv, a CNN
    and a sequence head. ``allow_partial``: accept a bundle where only some folds have both (at least one).
    Raises :class:`BundleError` naming what is missing.
    """
    from pedetect.config import ConfigError

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise BundleError(f"model folder not found: {model_dir}")
    missing = [name for name in (CONFIG_FILE, PRIOR_FILE, FOLDS_FILE) if not (model_dir / name).is_file()]
    if missing:
        raise BundleError(f"{model_dir} is not a complete model bundle: {', '.join(missing)} missing (train it with pedetect train CONFIG)")
    try:
        config = read_model_config(model_dir)
    except ConfigError as error:
        raise BundleError(f"{model_dir / CONFIG_FILE} cannot be read: {error}") from None
    expected = _fold_ids(model_dir / FOLDS_FILE)
    folds = paired_folds(model_dir)
    lacking = [k for k in expected if k not in folds]
    if lacking and (not allow_partial or not folds):
        what = [
            str((fold_dir(model_dir, stage, k) / COMPLETE).relative_to(model_dir))
            for k in lacking
            for stage in ("cnn", "seq")
            if not (fold_dir(model_dir, stage, k) / COMPLETE).is_file()
        ]
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


def write_bundle_info(
    model_dir: str | Path, *, folds: list[int], embedding_dim: int, cv_score: float | None, starting_weights: dict[str, str] | None = None
) -> dict[str, Any]:
    """``MODEL_DIR/bundle.json``, written when a full training run finishes; ``starting_weights``:
    where the CNN's training started (:func:`pedetect.models.backbone.weights_provenance`)."""
    from pedetect.io import write_json_atomic
    from pedetect.models.layout import STAGES

    info = {"format": BUNDLE_FORMAT, "folds": folds, "stages": list(STAGES), "embedding_dim": embedding_dim, "cv_score": cv_score}
    if starting_weights is not None:
        info["starting_weights"] = starting_weights
    write_json_atomic(Path(model_dir) / BUNDLE_FILE, info)
    return info


def write_preprocessing(model_dir: str | Path, store_settings: dict[str, Any]) -> dict[str, Any]:
    """``MODEL_DIR/preprocessing.json`` from the settings of the slice store the model was trained on
    (``SliceStore.settings``): what ``predict`` needs to read DICOM exactly as ``prepare`` did."""
    from pedetect.io import write_json_atomic

    keys = ("windows", "window_names", "image_size", "jpeg_quality", "jpeg_sampling")
    record = {key: store_settings[key] for key in keys if key in store_settings}
    write_json_atomic(Path(model_dir) / PREPROCESSING_FILE, record)
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
