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

import pandas as pd

from pedetect.console import echo as console_echo
from pedetect.data.dataset import open_store, slice_items
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


def training_inputs(
    config: ExperimentConfig,
    *,
    store: str | Path | Any,
    labels: str | Path | pd.DataFrame,
    out: str | Path,
    folds: str | Path | None = None,
    fold: int | None = None,
    force: bool = False,
    echo: Callable[[str], None] = console_echo,
) -> TrainingInputs:
    """Open the store and labels, check the model folder's config (:func:`prepare_model_dir`) and
    resolve the folds: the common set-up of every stage."""
    out = Path(out)
    source = open_store(store) if isinstance(store, (str, Path)) else store  # a path, or a store object (tests)
    if isinstance(store, str):
        store = Path(store)
    config = resolve_paths(config)
    label_frame = labels if isinstance(labels, pd.DataFrame) else read_labels(labels)
    items = slice_items(
        label_frame, source.slices, source="the labels" if isinstance(labels, pd.DataFrame) else str(labels)
    )
    prepare_model_dir(config, out, force=force, echo=echo)
    fold_frame = resolve_folds(config, label_frame, out, Path(folds) if folds else None, force=force, echo=echo)
    n_folds = n_folds_of(fold_frame)
    items = attach_folds(items, fold_frame, source=str(folds or out / FOLDS_FILE))
    if fold is not None:
        check_fold_index(fold, n_folds)
    todo = [fold] if fold is not None else list(range(n_folds))
    return TrainingInputs(config, store, source, out, label_frame, items, n_folds, todo)


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
