"""The model folder's layout: every name in ``MODEL_DIR``, in one place (as nnU-Net's results folder).

``pedetect train`` writes, and ``predict`` reads::

    MODEL_DIR/config.yaml                      the resolved recipe: the models are rebuilt from it
    MODEL_DIR/folds.csv                        StudyInstanceUID,fold: where every training study was
    MODEL_DIR/prior.json                       training frequency of every label (predict's fallback)
    MODEL_DIR/bundle.json                      format, folds, stages, embedding width, CV score (written last)
    MODEL_DIR/preprocessing.json               how prepare read the DICOM (windows, image size)
    MODEL_DIR/lung_boxes.json                  the training series' lung boxes (recipes with cnn.input.lung_crop)
    MODEL_DIR/cnn/summary.json                 stage 1: per-fold and mean validation AUC
    MODEL_DIR/cnn/fold<k>/model.safetensors    stage 1: fold k's slice CNN
    MODEL_DIR/cnn/fold<k>/checkpoints/         while fold k trains: last.ckpt, best.ckpt (resume)
    MODEL_DIR/embed/summary.json               the embedding pass: folds complete
    MODEL_DIR/embed/fold<k>/<series>.npz       series embedded by fold k's CNN (its own fold's; all with own_cnn)
    MODEL_DIR/embed/fold<k>/SOURCE.json        hash of the CNN weights that made them
    MODEL_DIR/seq/fold<k>/model.safetensors    stage 2: fold k's sequence head
    MODEL_DIR/seq/fold<k>/oof_predictions.csv  fold k's studies, out of fold
    MODEL_DIR/seq/oof_predictions.csv, cv.json the cross-validation of stage 2
    MODEL_DIR/heart/crops.npz                  the heart crop of every training series (and its box)
    MODEL_DIR/heart/fold<k>/model.safetensors  fold k's heart model (recipes with a heart section)
    MODEL_DIR/heart/stack.json                 the stacker of the heart and stage 2's RV/LV outputs
    MODEL_DIR/heart/oof_predictions.csv, cv.json  the cross-validation with the heart model
    MODEL_DIR/onnx/fold<k>/cnn.onnx, seq.onnx  pedetect export: fold k's CNN and head for ONNX Runtime
    MODEL_DIR/onnx/fold<k>/cnn_int8.onnx       pedetect export --int8: the CNN quantized to int8
    MODEL_DIR/onnx/export.json                 what was exported from which weights, and how exact it is
    MODEL_DIR/operating_points.json            pedetect calibrate: thresholds of the exam-level PE decision

Every stage's fold folder also holds ``metrics.json``, ``metrics.csv`` and ``curves.png``, and
``COMPLETE``, written last: a fold is finished exactly when its marker exists (the marker's JSON
records what the fold was made from, so a later stage can tell stale inputs).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pedetect.io import write_json_atomic
from pedetect.metric.calibrate import OPERATING_POINTS_FILE
from pedetect.recipe import ConfigError, load_experiment

if TYPE_CHECKING:
    from pedetect.recipe import ExperimentConfig

CONFIG_FILE = "config.yaml"
FOLDS_FILE = "folds.csv"
PRIOR_FILE = "prior.json"
BUNDLE_FILE = "bundle.json"
PREPROCESSING_FILE = "preprocessing.json"
SUMMARY_FILE = "summary.json"

WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
METRICS_TABLE = "metrics.csv"
CURVES_FILE = "curves.png"
COMPLETE = "COMPLETE"
CHECKPOINTS_DIR = "checkpoints"
EMBEDDING_SOURCE_FILE = "SOURCE.json"
OOF_FILE = "oof_predictions.csv"
CV_FILE = "cv.json"
ONNX_DIR = "onnx"
HEART_CROPS_FILE = "crops.npz"
HEART_STACK_FILE = "stack.json"
LUNG_BOXES_FILE = "lung_boxes.json"
HEART_OOF_LOGITS_FILE = "oof_logits.csv"
EXPORT_FILE = "export.json"

STAGES = ("cnn", "embed", "seq", "heart")  # heart: only for recipes with a heart section

# What a change of each kind invalidates: a new stage-1 model (seed, data, cnn) makes every later
# output stale, new embeddings make stage 2 stale, a new stage 2 only itself.
OUTPUTS_AFTER = {
    "cnn": ("cnn", "embed", "seq", "heart", PRIOR_FILE, BUNDLE_FILE, ONNX_DIR),
    "embed": ("embed", "seq", "heart", BUNDLE_FILE, ONNX_DIR),
    "seq": ("seq", "heart", BUNDLE_FILE, ONNX_DIR),  # the heart's stacker is fitted on stage 2's predictions
    "heart": ("heart", BUNDLE_FILE),
}


def stage_root(model_dir: str | Path, stage: str) -> Path:
    """``MODEL_DIR/<stage>``: cnn, embed or seq."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; the stages are {', '.join(STAGES)}")
    return Path(model_dir) / stage


def fold_dir(model_dir: str | Path, stage: str, fold: int) -> Path:
    """``MODEL_DIR/<stage>/fold<k>``: one fold's outputs of one stage."""
    return stage_root(model_dir, stage) / f"fold{fold}"


def cnn_dir(model_dir: str | Path, fold: int) -> Path:
    return fold_dir(model_dir, "cnn", fold)


def embed_dir(model_dir: str | Path, fold: int) -> Path:
    return fold_dir(model_dir, "embed", fold)


def seq_dir(model_dir: str | Path, fold: int) -> Path:
    return fold_dir(model_dir, "seq", fold)


def heart_dir(model_dir: str | Path, fold: int) -> Path:
    return fold_dir(model_dir, "heart", fold)


def onnx_dir(model_dir: str | Path, fold: int) -> Path:
    """``MODEL_DIR/onnx/fold<k>``: fold k's exported models (``pedetect export``)."""
    return Path(model_dir) / ONNX_DIR / f"fold{fold}"


def embedding_path(model_dir: str | Path, fold: int, series_uid: str) -> Path:
    """Fold k's embeddings of one series (fold k's own studies only)."""
    return embed_dir(model_dir, fold) / f"{series_uid}.npz"


def heart_stack_path(model_dir: str | Path) -> Path:
    """``MODEL_DIR/heart/stack.json``: the stacker of the heart model and stage 2's RV/LV outputs."""
    return stage_root(model_dir, "heart") / HEART_STACK_FILE


def lung_boxes_path(model_dir: str | Path) -> Path:
    """``MODEL_DIR/lung_boxes.json``: the training series' lung boxes (pedetect.train.boxes)."""
    return Path(model_dir) / LUNG_BOXES_FILE


def operating_points_path(model_dir: str | Path) -> Path:
    """``MODEL_DIR/operating_points.json``: the thresholds ``pedetect calibrate`` chose (read them with
    :func:`pedetect.metric.calibrate.read_operating_points`)."""
    return Path(model_dir) / OPERATING_POINTS_FILE


def is_complete(directory: Path) -> bool:
    return (directory / COMPLETE).is_file()


def read_complete(directory: Path) -> dict[str, Any]:
    """The record a finished fold's marker holds."""
    return json.loads((directory / COMPLETE).read_text())


def write_complete(directory: Path, record: dict[str, Any]) -> None:
    """Mark a fold finished; call last, after everything else of the fold is written."""
    write_json_atomic(directory / COMPLETE, record, indent=None)


def complete_folds(model_dir: str | Path, stage: str) -> list[int]:
    """Fold ids of ``stage`` whose marker exists."""
    found = []
    for marker in stage_root(model_dir, stage).glob(f"fold*/{COMPLETE}"):
        number = marker.parent.name[len("fold") :]
        if number.isdigit():
            found.append(int(number))
    return sorted(found)


def remove_outputs(model_dir: str | Path, names: tuple[str, ...]) -> None:
    """Delete the named folders and files of MODEL_DIR (missing ones are fine)."""
    for name in names:
        path = Path(model_dir) / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def read_model_config(model_dir: str | Path) -> ExperimentConfig:
    """The resolved recipe saved in a model folder by ``pedetect train``."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{model_dir} is not a model folder: {path.name} is missing")
    return load_experiment(path)
