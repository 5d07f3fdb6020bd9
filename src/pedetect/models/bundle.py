"""The model bundle: one folder holding everything ``predict`` needs (docs/design.md, "The model folder").

``pedetect train CONFIG`` (all stages) leaves a model folder whose names are in
:mod:`pedetect.models.layout`; this module reads it as a whole and checks that it is complete.

Pairing at inference: fold k's sequence head reads the embeddings of fold k's CNN
(``embed_volume(load_slice_classifier(dir, k), …)`` then ``predict_series(load_sequence_head(dir, k), …)``),
and ``predict`` averages the folds' probabilities. That pairing is exactly what the cross-validated
score measures (fold k's studies embedded by CNN k, scored by head k).
"""

from __future__ import annotations

import io
import json
import math
import stat
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
import yaml
from safetensors import safe_open

from pedetect.config import ConfigError
from pedetect.dicom.pixels import DEFAULT_WINDOWS
from pedetect.io import write_json_atomic
from pedetect.labels import EXAM_LABELS, IMAGE_LABEL
from pedetect.models.heart import HeartStack, build_heart_model
from pedetect.models.layout import (
    BUNDLE_FILE,
    COMPLETE,
    CONFIG_FILE,
    FOLDS_FILE,
    HEART_STACK_FILE,
    ONNX_DIR,
    PREPROCESSING_FILE,
    PRIOR_FILE,
    STAGES,
    WEIGHTS_FILE,
    cnn_dir,
    complete_folds,
    fold_dir,
    heart_dir,
    read_model_config,
    seq_dir,
)
from pedetect.models.sequence import build_sequence_head
from pedetect.models.slice_classifier import build_slice_classifier

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


def _fold_ids(root: Path, folds_csv: Path) -> list[int]:
    """The fold numbers of folds.csv (whole numbers from 0)."""
    try:
        column = pd.read_csv(io.BytesIO(_small_file(root, folds_csv)))["fold"]
    except (KeyError, ValueError) as error:
        raise BundleError(
            f"{folds_csv} is not a folds table with a 'fold' column ({type(error).__name__}: {error})"
        ) from None
    if column.isna().any() or not pd.api.types.is_integer_dtype(column) or (column < 0).any():
        raise BundleError(f"{folds_csv}: 'fold' must hold whole numbers from 0")
    return sorted(int(k) for k in column.unique())


def paired_folds(model_dir: str | Path) -> list[int]:
    """Fold ids with both a finished CNN and a finished sequence head."""
    return sorted(set(complete_folds(model_dir, "cnn")) & set(complete_folds(model_dir, "seq")))


# What a bundle from someone else may hold: bundle.json's keys, and caps on the small files read whole.
BUNDLE_KEYS = ("format", "folds", "stages", "embedding_dim", "cv_score", "starting_weights")
MAX_SMALL_FILE = 16 << 20  # config.yaml, prior.json, folds.csv, bundle.json, preprocessing.json, COMPLETE
WEIGHT_KINDS = {"cnn": "pedetect.slice_classifier", "seq": "pedetect.sequence_head", "heart": "pedetect.heart_model"}


def _inside(root: Path, path: Path) -> Path:
    """``path`` if it resolves (links followed) to a place inside the bundle folder ``root``."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise BundleError(f"{path} leads outside the bundle folder (to {resolved}): a bundle's files must be inside it")
    return path


def _small_file(root: Path, path: Path) -> bytes:
    """A small file of the bundle, whole (inside the folder, a regular file, under MAX_SMALL_FILE)."""
    _inside(root, path)
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise BundleError(f"{path} is not a regular file")
    if info.st_size > MAX_SMALL_FILE:
        raise BundleError(f"{path} is {info.st_size} bytes; a bundle's {path.name} is under {MAX_SMALL_FILE} bytes")
    return path.read_bytes()


def _json_file(root: Path, path: Path) -> Any:
    try:
        return json.loads(_small_file(root, path))
    except ValueError as error:
        raise BundleError(f"{path} is not valid JSON ({error})") from None


def _check_yaml(root: Path, path: Path) -> None:
    """A bundle's config.yaml: plain YAML only. It is parsed with ``yaml.safe_load`` (no Python
    objects) by :func:`pedetect.config.load_config`; aliases (``&a`` / ``*a``, never written by
    ``pedetect train``) are refused here, since nested aliases expand exponentially when validated."""
    text = _small_file(root, path)
    try:
        for event in yaml.parse(text.decode("utf-8", "replace"), Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise BundleError(f"{path} uses YAML aliases (*{event.anchor}); a bundle's config is plain YAML")
    except yaml.YAMLError as error:
        raise BundleError(f"{path} is not valid YAML: {error}") from None


def _without_outside_paths(config: ExperimentConfig) -> ExperimentConfig:
    """The config with its one path setting, ``cnn.backbone.weights`` (where training *started*),
    cleared: trained weights come from the bundle's own files, so nothing read through a bundle's
    config can open a file outside the bundle. (bundle.json keeps that provenance as a record.)"""
    if isinstance(config.cnn.backbone.weights, PurePath):
        config = config.model_copy(deep=True)
        config.cnn.backbone.weights = None
    return config


def _safetensors_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor names → shapes, and the metadata, from a safetensors file's header (no tensor is read)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
    except Exception as error:  # SafetensorError (a Rust panic is a BaseException: also a bad file)
        raise BundleError(
            f"{path} is not a readable safetensors file ({type(error).__name__}: {str(error)[:200]})"
        ) from None
    return shapes, metadata


def _compare_shapes(
    path: Path, found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], what: str
) -> None:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing:
        raise BundleError(
            f"{path}: tensor {missing[0]!r} of the {what} is missing ({len(missing)} missing); the weights do not match config.yaml"
        )
    if extra:
        raise BundleError(
            f"{path}: tensor {extra[0]!r} is not part of the {what} config.yaml describes ({len(extra)} unexpected)"
        )
    for name, shape in expected.items():
        if found[name] != shape:
            raise BundleError(
                f"{path}: tensor {name!r} has shape {list(found[name])}, config.yaml's {what} needs {list(shape)}"
            )


def check_weights(model_dir: Path, config: ExperimentConfig, folds: list[int], embedding_dim: int | None) -> None:
    """Every fold's weights against the models ``config`` describes, before any is loaded: each file
    a safetensors file of the right kind, with exactly the tensors, and the shapes, of the model
    built from the config (built on torch's meta device: no memory, no weights)."""
    root = model_dir.resolve()
    try:
        with torch.device("meta"):
            cnn = build_slice_classifier(config.cnn, load_pretrained=False, location_grid=config.embed.location_grid)
    except Exception as error:
        raise BundleError(
            f"{model_dir / CONFIG_FILE}: the CNN it describes cannot be built ({type(error).__name__}: {error})"
        ) from None
    width = int(cnn.embedding_dim)
    if embedding_dim is not None and embedding_dim != width:
        raise BundleError(
            f"{model_dir / BUNDLE_FILE}: embedding_dim {embedding_dim}, but config.yaml's CNN embeds {width} values per slice"
        )
    cnn_shapes = {name: tuple(t.shape) for name, t in cnn.state_dict().items()}
    with torch.device("meta"):
        head = build_sequence_head(config.seq, width, input_columns=config.seq_input_columns)
    head_shapes = {name: tuple(t.shape) for name, t in head.state_dict().items()}
    checks = [("cnn", cnn_dir, cnn_shapes, "CNN"), ("seq", seq_dir, head_shapes, "sequence head")]
    if config.heart is not None:
        with torch.device("meta"):
            heart = build_heart_model(config.heart)
        checks.append(
            ("heart", heart_dir, {name: tuple(t.shape) for name, t in heart.state_dict().items()}, "heart model")
        )
    for k in folds:
        for stage, directory_of, expected, what in checks:
            directory = directory_of(model_dir, k)
            path = directory / WEIGHTS_FILE
            if not path.is_file():
                raise BundleError(f"{path} is missing: fold {k}'s {what} has no weights")
            _inside(root, path)
            found, metadata = _safetensors_shapes(path)
            kind = metadata.get("kind")
            if kind is not None and kind != WEIGHT_KINDS[stage]:
                raise BundleError(f"{path} holds a {kind}, not a {WEIGHT_KINDS[stage]}")
            if stage == "seq" and metadata.get("embedding_dim") not in (None, str(width)):
                raise BundleError(
                    f"{path}: made for embeddings {metadata['embedding_dim']} wide, the CNN gives {width}"
                )
            _compare_shapes(path, found, expected, f"fold {k} {what}")


def _check_onnx(model_dir: Path, folds: list[int]) -> None:
    """Exported models (``pedetect export``) carry their weights inside: a tensor stored as external
    data would name a file to open, possibly outside the bundle; refused."""
    root = model_dir.resolve()
    folder = model_dir / ONNX_DIR
    if not folder.exists():
        return
    _inside(root, folder)
    files = sorted(folder.rglob("*.onnx"))
    if not files:
        return
    # onnx (about a second to import) only for a bundle with an ONNX export
    import onnx
    from onnx.external_data_helper import uses_external_data

    for path in files:
        _inside(root, path)
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as error:
            raise BundleError(f"{path} is not a readable ONNX model ({type(error).__name__})") from None
        for tensor in model.graph.initializer:
            if uses_external_data(tensor):
                location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "?")
                raise BundleError(
                    f"{path}: tensor {tensor.name!r} is stored in an external file ({location!r}); a bundle's ONNX models hold their weights"
                )


def read_bundle(model_dir: str | Path, *, allow_partial: bool = False) -> Bundle:
    """Read and check a model folder made by ``pedetect train`` (or received from someone else).

    A complete bundle has config.yaml, prior.json, folds.csv and, for every fold of folds.csv, a CNN
    and a sequence head. ``allow_partial``: accept a bundle where only some folds have both (at least one).
    Raises :class:`BundleError` naming the file (and the key or tensor) before any weight is loaded:

    - every file read resolves inside the folder (no link out of it), small files are capped;
    - config.yaml is plain YAML (safe loading, no aliases) and validates as a recipe; its path
      setting (where training started) is cleared in the returned config;
    - bundle.json has only known keys, format 1, its folds and embedding width agree with the rest;
    - prior.json gives every label a probability, preprocessing.json three windows;
    - each fold's weights are safetensors with exactly the tensors and shapes of the config's models;
    - exported ONNX models keep their weights inside.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise BundleError(f"model folder not found: {model_dir}")
    root = model_dir.resolve()
    missing = [name for name in (CONFIG_FILE, PRIOR_FILE, FOLDS_FILE) if not (model_dir / name).is_file()]
    if missing:
        raise BundleError(
            f"{model_dir} is not a complete model bundle: {', '.join(missing)} missing (train it with pedetect train CONFIG)"
        )
    _check_yaml(root, model_dir / CONFIG_FILE)
    try:
        config = read_model_config(model_dir)
    except ConfigError as error:
        raise BundleError(f"{model_dir / CONFIG_FILE} cannot be read: {error}") from None
    config = _without_outside_paths(config)
    expected = _fold_ids(root, model_dir / FOLDS_FILE)
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
    usable = [k for k in folds if k in expected]
    for k in usable:
        for stage in ("cnn", "seq"):
            _small_file(root, fold_dir(model_dir, stage, k) / COMPLETE)
    prior = _json_file(root, model_dir / PRIOR_FILE)
    if not isinstance(prior, dict):
        raise BundleError(f"{model_dir / PRIOR_FILE} is not a JSON object of label: probability")
    absent = [label for label in (IMAGE_LABEL, *EXAM_LABELS) if label not in prior]
    if absent:
        raise BundleError(f"{model_dir / PRIOR_FILE} lacks the label(s) {', '.join(absent)}")
    for label in (IMAGE_LABEL, *EXAM_LABELS):
        value = prior[label]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise BundleError(f"{model_dir / PRIOR_FILE}: {label} is {value!r}, not a probability between 0 and 1")
    info: dict[str, Any] = _json_file(root, model_dir / BUNDLE_FILE) if (model_dir / BUNDLE_FILE).is_file() else {}
    embedding_dim = _check_info(model_dir / BUNDLE_FILE, info, expected)
    read_preprocessing(model_dir)
    check_weights(model_dir, config, usable, embedding_dim)
    if config.heart is not None:
        _check_stack(root, model_dir)
    _check_onnx(model_dir, usable)
    return Bundle(model_dir, config, usable, {label: float(prior[label]) for label in prior}, embedding_dim)


def _check_stack(root: Path, model_dir: Path) -> None:
    """heart/stack.json: the stacker's three finite numbers."""
    path = model_dir / "heart" / HEART_STACK_FILE
    if not path.is_file():
        raise BundleError(
            f"{path} is missing: the recipe has a heart model but no stacker (run pedetect train --stage heart)"
        )
    _small_file(root, path)
    try:
        HeartStack.load(path)
    except ValueError as error:
        raise BundleError(str(error)) from None


def _check_info(path: Path, info: Any, folds: list[int]) -> int | None:
    """bundle.json's fields; returns its embedding width (None when there is no bundle.json)."""
    if not isinstance(info, dict):
        raise BundleError(f"{path} is not a JSON object")
    if not info:
        return None
    unknown = sorted(set(info) - set(BUNDLE_KEYS))
    if unknown:
        raise BundleError(f"{path}: unknown key {unknown[0]!r}; a bundle.json holds only {', '.join(BUNDLE_KEYS)}")
    if info.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: bundle format {info.get('format')!r} is not the supported {BUNDLE_FORMAT}")
    listed = info.get("folds")
    if listed is not None and (not isinstance(listed, list) or sorted(listed) != folds):
        raise BundleError(f"{path}: folds {listed!r} are not the folds of {FOLDS_FILE} ({folds})")
    width = info.get("embedding_dim")
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise BundleError(f"{path}: embedding_dim {width!r} is not a positive whole number")
    return width


def write_bundle_info(
    model_dir: str | Path,
    *,
    folds: list[int],
    embedding_dim: int,
    cv_score: float | None,
    starting_weights: dict[str, Any] | None = None,
    stages: list[str] | None = None,
) -> dict[str, Any]:
    """``MODEL_DIR/bundle.json``, written when a full training run finishes; ``starting_weights``:
    where the CNN's training started (:func:`pedetect.models.backbone.weights_provenance`)."""
    info = {
        "format": BUNDLE_FORMAT,
        "folds": folds,
        "stages": list(stages or STAGES[:3]),
        "embedding_dim": embedding_dim,
        "cv_score": cv_score,
    }
    if starting_weights is not None:
        info["starting_weights"] = starting_weights
    write_json_atomic(Path(model_dir) / BUNDLE_FILE, info)
    return info


def write_preprocessing(model_dir: str | Path, store_settings: dict[str, Any]) -> dict[str, Any]:
    """``MODEL_DIR/preprocessing.json`` from the settings of the slice store the model was trained on
    (``SliceStore.settings``): what ``predict`` needs to read DICOM exactly as ``prepare`` did."""
    keys = ("windows", "window_names", "image_size", "jpeg_quality", "jpeg_sampling")
    record = {key: store_settings[key] for key in keys if key in store_settings}
    write_json_atomic(Path(model_dir) / PREPROCESSING_FILE, record)
    return record


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def read_preprocessing(model_dir: str | Path) -> dict[str, Any]:
    """The recorded store settings (:func:`write_preprocessing`), or the store defaults with
    ``"recorded": False`` for a bundle that has none."""
    path = Path(model_dir) / PREPROCESSING_FILE
    if path.is_file():
        record = _json_file(Path(model_dir).resolve(), path)
        windows = record.get("windows") if isinstance(record, dict) else None
        if (
            not isinstance(windows, list)
            or len(windows) != 3
            or not all(isinstance(w, list) and len(w) == 2 and all(_number(v) for v in w) and w[1] > 0 for w in windows)
        ):
            raise BundleError(f"{path}: 'windows' must list three [level, width] pairs (width > 0)")
        size = record.get("image_size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or not 16 <= size <= 4096):
            raise BundleError(f"{path}: image_size {size!r} is not a whole number of pixels from 16 to 4096")
        return {"image_size": record.get("image_size"), **record, "recorded": True}

    return {"windows": [list(w) for w in DEFAULT_WINDOWS], "image_size": None, "recorded": False}
