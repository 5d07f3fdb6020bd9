"""What every training stage starts from: the model folder, its recipe and its folds.

:func:`training_inputs` opens the slice store and the labels, checks the model folder against the
recipe (:func:`prepare_model_dir`: a changed recipe removes exactly the outputs it makes stale) and
resolves the folds (given, recorded in the folder, or made here), for the stages in
:mod:`pedetect.train.cnn`, :mod:`pedetect.train.embed` and :mod:`pedetect.train.seq`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pedetect.console import echo as console_echo
from pedetect.data.dataset import SLICE_INDEX, open_store, slice_items
from pedetect.data.folds import (
    FOLD,
    attach_folds,
    check_fold_index,
    fold_summary,
    make_folds,
    n_folds_of,
    read_folds,
    read_labels,
)
from pedetect.io import folder_lock, write_csv_atomic
from pedetect.labels import SERIES
from pedetect.metric.froc import BOX, read_clots, visible_truth
from pedetect.metric.submission import InputError
from pedetect.models.layout import CONFIG_FILE, FOLDS_FILE, OUTPUTS_AFTER, remove_outputs
from pedetect.recipe import ConfigError, ExperimentConfig, apply_overrides, load_experiment, save_config
from pedetect.runtime import is_global_zero

# Sections whose change means a different model; runtime and logging may change between runs.
# A change in MODEL_SECTIONS invalidates every stage (stage 1 and all built on it); a change in
# SEQ_SECTIONS only the sequence heads (stage 2 is redone, stage 1 and the embeddings are kept).
MODEL_SECTIONS = ("seed", "data", "cnn")
SEQ_SECTIONS = ("seq",)
# Settings of the embedding pass that change what it writes (batch size and workers do not): a change
# redoes the embeddings and stage 2, not the CNNs.
EMBEDDING_KEYS = ("embed.location_grid",)


class TrainError(RuntimeError):
    """A training request that cannot run as asked; the message says why."""


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def config_differences(a: ExperimentConfig, b: ExperimentConfig, sections: Sequence[str] = MODEL_SECTIONS) -> list[str]:
    """Dotted keys of the given (by default the model-defining) sections where two configs differ."""
    fa, fb = (_flatten({k: c.model_dump(mode="json")[k] for k in sections}) for c in (a, b))
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))


def prepare_model_dir(config: ExperimentConfig, out: Path, *, force: bool, echo: Callable[[str], None]) -> None:
    """Write the resolved config; refuse a folder trained with another stage-1 config unless ``force``.

    A changed ``embed.location_grid`` removes the embeddings and stage 2 (the CNNs stay); a changed
    ``seq`` section alone removes the previous stage-2 results (stage 1 and the embeddings stay).
    """
    path = out / CONFIG_FILE
    if path.is_file():
        try:
            previous = load_experiment(path)
        except ConfigError as error:
            raise TrainError(f"{path} cannot be read ({error}); use another --out") from None
        changed = config_differences(previous, config)
        if changed:
            if not force:
                raise TrainError(
                    f"{out} holds a model trained with another config (differs in {', '.join(changed[:8])}"
                    f"{' …' if len(changed) > 8 else ''}); use another --out, or --force to retrain every fold"
                )
            if is_global_zero():
                echo(f"config changed ({', '.join(changed[:8])}): removing the previous results of every stage")
                remove_outputs(out, OUTPUTS_AFTER["cnn"])
        embed_changed = [k for k in config_differences(previous, config, ("embed",)) if k in EMBEDDING_KEYS]
        if embed_changed and is_global_zero():
            echo(
                f"embedding config changed ({', '.join(embed_changed)}): removing the previous embeddings and sequence heads"
            )
            remove_outputs(out, OUTPUTS_AFTER["embed"])
        seq_changed = config_differences(previous, config, SEQ_SECTIONS)
        if seq_changed and is_global_zero():
            echo(f"stage-2 config changed ({', '.join(seq_changed[:8])}): removing the previous sequence heads")
            remove_outputs(out, OUTPUTS_AFTER["seq"])
        heart_changed = config_differences(previous, config, ("heart",))
        if heart_changed and is_global_zero():
            echo(f"heart config changed ({', '.join(heart_changed[:8])}): removing the previous heart models")
            remove_outputs(out, OUTPUTS_AFTER["heart"])
    if is_global_zero():
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, path)


def resolve_folds(
    config: ExperimentConfig,
    labels: pd.DataFrame,
    out: Path,
    folds_path: Path | None,
    *,
    force: bool,
    echo: Callable[[str], None],
) -> pd.DataFrame:
    """The folds of this model: ``--folds`` if given, else those already in MODEL_DIR, else new ones.

    They are written to ``MODEL_DIR/folds.csv`` so the bundle records where every study was.
    """
    recorded = out / FOLDS_FILE
    if folds_path is not None:
        folds = read_folds(folds_path)
        if recorded.is_file() and not force and Path(folds_path).resolve() != recorded.resolve():
            previous = read_folds(recorded)
            same = (
                previous.sort_values("StudyInstanceUID")
                .reset_index(drop=True)
                .equals(folds.sort_values("StudyInstanceUID").reset_index(drop=True))
            )
            if not same:
                raise TrainError(
                    f"{folds_path} differs from the folds this model was trained on ({recorded}); use --force"
                )
        source = str(folds_path)
    elif recorded.is_file():
        folds = read_folds(recorded)
        source = str(recorded)
    else:
        folds = make_folds(labels, config.data.folds, config.data.fold_seed)
        source = f"{config.data.folds} folds made with seed {config.data.fold_seed}"
        echo(f"folds: {source}\n{fold_summary(labels, folds).to_string()}")
    attach_folds(labels.drop_duplicates("StudyInstanceUID"), folds, source=source)  # every study has a fold
    if is_global_zero() and (not recorded.is_file() or folds_path is not None):
        write_csv_atomic(folds.sort_values([FOLD, "StudyInstanceUID"]), recorded)
    return folds


# --------------------------------------------------------------------------------------- training
def resolve_paths(config: ExperimentConfig) -> ExperimentConfig:
    """The config with relative file paths made absolute (as saved in MODEL_DIR/config.yaml)."""
    weights = config.cnn.backbone.weights
    if isinstance(weights, Path) and not weights.is_absolute():
        config = config.model_copy(deep=True)
        config.cnn.backbone.weights = weights.resolve()
    return config


@dataclass
class TrainingInputs:
    """What every stage starts from: the resolved config, the store, labelled slices with their fold."""

    config: ExperimentConfig
    store: Any  # a Path, or a store object (tests)
    source: Any  # the opened store
    out: Path
    labels: pd.DataFrame
    items: pd.DataFrame  # slice_items + fold
    n_folds: int
    todo: list[int]  # the folds asked for
    # (series, slice_index) -> (K, 4) boxes of the emboli visible there (read_clot_boxes), for
    # cnn.loss.clot_map_weight; None without --clots.
    clot_boxes: dict[tuple[str, int], np.ndarray] | None = None


def read_clot_boxes(path: str | Path, items: pd.DataFrame, source: Any) -> dict[tuple[str, int], np.ndarray]:
    """The boxes of the emboli visible on each training slice (``pedetect synth``'s clots.csv, its
    ``visible`` rows; the truth ``pedetect evaluate --clots`` scores): ``(series, slice_index) ->
    (K, 4)`` inclusive ``[row_min, row_max, col_min, col_max]`` in the store's pixels.

    Raises :class:`TrainError` for a file that cannot be read, boxes on no slice of the labels
    (another dataset), or boxes outside their slice (a store prepared at another size: the boxes
    are in the DICOM's own pixels, so prepare the store without ``--image-size``)."""
    try:
        truth, _ = visible_truth(read_clots(path))
    except (InputError, OSError) as error:
        raise TrainError(f"--clots: {error}") from None
    keys = pd.MultiIndex.from_frame(truth[[SERIES, SLICE_INDEX]])
    labelled = pd.MultiIndex.from_frame(items[[SERIES, SLICE_INDEX]])
    unknown = ~keys.isin(labelled)
    if unknown.any():
        first = truth[unknown].iloc[0]
        raise TrainError(
            f"--clots {path}: {int(unknown.sum())} of {len(truth)} visible rows name a slice the labels do not have "
            f"(first: series {first[SERIES]}, slice {first[SLICE_INDEX]}); give the clots.csv of the same training data"
        )
    sizes = source.slices.groupby(SERIES)[["height", "width"]].first()
    height = sizes["height"].reindex(truth[SERIES]).to_numpy()
    width = sizes["width"].reindex(truth[SERIES]).to_numpy()
    outside = (truth["row_max"].to_numpy() >= height) | (truth["col_max"].to_numpy() >= width)
    if outside.any():
        first = truth[outside].iloc[0]
        raise TrainError(
            f"--clots {path}: {int(outside.sum())} box(es) reach past their slice in the store (first: series "
            f"{first[SERIES]}, slice {first[SLICE_INDEX]}); the boxes are in the DICOM's pixels, so prepare the store "
            "at the DICOM's own size (no --image-size)"
        )
    return {
        (str(series), int(index)): group[list(BOX)].to_numpy(dtype=np.int64)
        for (series, index), group in truth.groupby([SERIES, SLICE_INDEX], sort=False)
    }


def training_inputs(
    config: ExperimentConfig,
    *,
    store: str | Path | Any,
    labels: str | Path | pd.DataFrame,
    out: str | Path,
    folds: str | Path | None = None,
    fold: int | None = None,
    force: bool = False,
    clots: str | Path | None = None,
    echo: Callable[[str], None] = console_echo,
) -> TrainingInputs:
    """Open the store and labels, check the model folder's config (:func:`prepare_model_dir`) and
    resolve the folds: the common set-up of every stage. ``clots``: the training emboli's boxes
    (:func:`read_clot_boxes`), which ``cnn.loss.clot_map_weight`` needs."""
    out = Path(out)
    source = open_store(store) if isinstance(store, (str, Path)) else store  # a path, or a store object (tests)
    if isinstance(store, str):
        store = Path(store)
    config = resolve_paths(config)
    label_frame = labels if isinstance(labels, pd.DataFrame) else read_labels(labels)
    items = slice_items(
        label_frame, source.slices, source="the labels" if isinstance(labels, pd.DataFrame) else str(labels)
    )
    if config.cnn.loss.clot_map_weight > 0 and clots is None:
        raise TrainError(
            "cnn.loss.clot_map_weight is set: give the training emboli's boxes with --clots "
            "(pedetect synth writes them to clots.csv beside train.csv)"
        )
    clot_boxes = read_clot_boxes(clots, items, source) if clots is not None else None
    prepare_model_dir(config, out, force=force, echo=echo)
    fold_frame = resolve_folds(config, label_frame, out, Path(folds) if folds else None, force=force, echo=echo)
    n_folds = n_folds_of(fold_frame)
    items = attach_folds(items, fold_frame, source=str(folds or out / FOLDS_FILE))
    if fold is not None:
        check_fold_index(fold, n_folds)
    todo = [fold] if fold is not None else list(range(n_folds))
    return TrainingInputs(config, store, source, out, label_frame, items, n_folds, todo, clot_boxes)


def model_dir_lock(out: str | Path, *, echo: Callable[[str], None] = console_echo):
    """The model folder's lock (:func:`pedetect.io.folder_lock`) for the process that writes it: a
    second ``pedetect train`` into the same folder is refused before it changes anything. The other
    processes of a distributed run (rank > 0) are started by the holder and take no lock."""
    if not is_global_zero():
        return contextlib.nullcontext(Path(out))
    return folder_lock(out, command="pedetect train", echo=echo)


def read_config_for_training(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """A recipe file with ``--set`` overrides applied."""
    return apply_overrides(load_experiment(path), list(overrides))
