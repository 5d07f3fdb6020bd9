"""Between the stages: out-of-fold slice embeddings (``pedetect train --stage embed``).

Each fold's CNN embeds every slice of the series of *its own validation studies*, the studies it
never trained on; across the folds every labelled series is embedded exactly once, by the one CNN
that did not see it, so stage 2 learns from honest features (docs/design.md, "Data flow"). Writes::

    MODEL_DIR/embed/fold<k>/<SeriesInstanceUID>.npz   embedding float16 (N, D), logit float32 (N,),
                                                      sop (N,) SOPInstanceUIDs, all in position order
    MODEL_DIR/embed/fold<k>/SOURCE.json               sha256 of the CNN weights that made them
    MODEL_DIR/embed/fold<k>/COMPLETE                  written last: series count, embedding width, CNN hash

Series are read one at a time (by ``embed.num_workers`` reader processes ahead of the CNN) and
embedded ``embed.batch_size`` slices at a time by :func:`pedetect.models.slice_classifier.embed_volume`,
the function ``predict`` uses, so memory stays bounded whatever the data size. Each series file is
written atomically: a killed run keeps the series it finished and does the rest. A retrained CNN
(other weights) invalidates the fold's embeddings: they are redone.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch

from pedetect.console import echo as console_echo
from pedetect.data.dataset import open_store
from pedetect.data.folds import FOLD
from pedetect.io import atomic_path, file_sha256, read_json, write_json_atomic
from pedetect.labels import SERIES, SOP
from pedetect.models.layout import (
    COMPLETE,
    EMBEDDING_SOURCE_FILE,
    SUMMARY_FILE,
    WEIGHTS_FILE,
    cnn_dir,
    embed_dir,
    embedding_path,
    is_complete,
    read_complete,
    stage_root,
    write_complete,
)
from pedetect.models.slice_classifier import embed_volume, fold_batchnorm, load_slice_classifier
from pedetect.runtime import is_global_zero, resolve_device
from pedetect.train.parallel import processes_for, reopened, run_folds
from pedetect.train.setup import TrainError, TrainingInputs


@dataclass(frozen=True)
class SeriesEmbedding:
    embedding: np.ndarray  # (N, D) float16
    logit: np.ndarray  # (N,) float32, the CNN's slice logit
    sop: np.ndarray  # (N,) SOPInstanceUIDs, position order


def write_series_embedding(path: Path, item: SeriesEmbedding) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(
            handle,
            embedding=item.embedding.astype(np.float16),
            logit=item.logit.astype(np.float32),
            sop=item.sop.astype(str),
        )


def read_series_embedding(path: Path) -> SeriesEmbedding:
    if not path.is_file():
        raise TrainError(f"embeddings missing: {path} (run pedetect train --stage embed)")
    with np.load(path, allow_pickle=False) as data:
        return SeriesEmbedding(data["embedding"], data["logit"], data["sop"])


class _SeriesReader:
    """Dataset of whole series volumes, read from the store (in DataLoader workers when asked)."""

    def __init__(self, store: Any, series: list[str]):
        self.store_ref = store
        self.series = series
        # a SliceStore (read_series is the store's, beyond the datasets' SliceSource protocol)
        self._store: Any = None if isinstance(store, (str, Path)) else store

    def __len__(self) -> int:
        return len(self.series)

    def __getitem__(self, i: int) -> tuple[str, np.ndarray]:
        if self._store is None:
            self._store = open_store(self.store_ref)
        return self.series[i], self._store.read_series(self.series[i])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if isinstance(self.store_ref, (str, Path)):
            state["_store"] = None  # reopened in the worker
        return state


def store_windows(source: Any):
    """The [level, width] windows a store was made with (its prepare.json), or None (pedetect's own)."""
    settings = getattr(source, "settings", None)
    return settings.get("windows") if isinstance(settings, dict) else None


def fold_series(items: pd.DataFrame, fold: int) -> list[str]:
    """Series of fold k's studies (its validation studies), in a stable order."""
    return sorted(items.loc[items[FOLD] == fold, SERIES].unique())


def embedding_scope(config) -> str:
    """Which series each fold's CNN embeds: ``own_fold`` (its validation studies, the ones it never
    saw), or ``all`` when stage 2 trains head k on CNN k's embeddings of its training series too
    (``seq.training_embeddings: own_cnn``)."""
    return "all" if config.seq.training_embeddings == "own_cnn" else "own_fold"


def series_to_embed(items: pd.DataFrame, fold: int, scope: str) -> list[str]:
    return fold_series(items, fold) if scope == "own_fold" else sorted(items[SERIES].unique())


def embed_fold(
    inputs: TrainingInputs, fold: int, *, device: str | None = None, echo: Callable[[str], None] = console_echo
) -> dict[str, Any]:
    """Embed fold k's own series (every series, with scope ``all``) with fold k's CNN; returns what
    its COMPLETE marker holds."""
    config, out = inputs.config, inputs.out
    weights = cnn_dir(out, fold) / WEIGHTS_FILE
    if not is_complete(cnn_dir(out, fold)) or not weights.is_file():
        raise TrainError(
            f"fold {fold} has no trained CNN ({cnn_dir(out, fold) / COMPLETE} is missing): run pedetect train --stage cnn first"
        )
    directory = embed_dir(out, fold)
    cnn_hash = file_sha256(weights)
    source = directory / EMBEDDING_SOURCE_FILE
    if source.is_file() and read_json(source).get("cnn_sha256") != cnn_hash:
        echo(f"embed fold {fold}: the CNN was retrained since; embedding again")
        shutil.rmtree(directory)
    write_json_atomic(source, {"cnn_sha256": cnn_hash, "cnn_weights": str(weights.relative_to(out))}, indent=None)

    scope = embedding_scope(config)
    series = series_to_embed(inputs.items, fold, scope)
    todo = [s for s in series if not embedding_path(out, fold, s).is_file()]
    device = device or resolve_device(config.runtime.accelerator)
    model = fold_batchnorm(load_slice_classifier(out, fold, config=config, device=device))
    sops = inputs.source.slices.sort_values("slice_index").groupby(SERIES, sort=False)[SOP].agg(list)
    echo(f"embed fold {fold}: {len(todo)} of {len(series)} series to embed with fold {fold}'s CNN on {device}")
    started = time.perf_counter()
    workers = config.embed.num_workers
    # _SeriesReader is a map-style dataset by its __getitem__ and __len__ (not a Dataset subclass)
    reader = cast("torch.utils.data.Dataset[tuple[str, np.ndarray]]", _SeriesReader(inputs.store, todo))
    loader = torch.utils.data.DataLoader(
        reader, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None
    )
    n_slices = 0
    for series_uid, volume in loader:
        volume = np.asarray(volume)
        sop = np.asarray(sops[series_uid])
        if len(sop) != len(volume):
            raise TrainError(f"series {series_uid}: the store lists {len(sop)} slices but read {len(volume)}")
        embedding, logit = embed_volume(
            model,
            volume,
            config.cnn.input,
            batch_size=config.embed.batch_size,
            device=device,
            windows=store_windows(inputs.source),
        )
        write_series_embedding(embedding_path(out, fold, series_uid), SeriesEmbedding(embedding, logit, sop))
        n_slices += len(volume)
    seconds = time.perf_counter() - started
    marker = {
        "series": len(series),
        "scope": scope,
        "embedding_dim": int(model.embedding_dim),
        "cnn_sha256": cnn_hash,
        "seconds": round(seconds, 3),  # of the run that finished the fold
    }
    write_complete(directory, marker)
    rate = f", {n_slices / seconds:.0f} slices/s" if n_slices and seconds > 0 else ""
    echo(f"embed fold {fold}: {n_slices} slices in {seconds:.1f} s{rate}")
    return marker


def is_embedded(out: Path, fold: int, scope: str = "own_fold") -> bool:
    """Fold k's embeddings are complete, cover ``scope`` and were made by the CNN now in ``cnn/fold<k>``."""
    weights = cnn_dir(out, fold) / WEIGHTS_FILE
    if not is_complete(embed_dir(out, fold)) or not weights.is_file():
        return False
    marker = read_complete(embed_dir(out, fold))
    covers = scope == "own_fold" or marker.get("scope") == "all"
    return covers and marker.get("cnn_sha256") == file_sha256(weights)


def _embed_fold_in_process(inputs: TrainingInputs, fold: int) -> dict[str, Any]:
    """One fold's embedding pass in a process of its own (``runtime.parallel_folds``)."""
    return embed_fold(reopened(inputs), fold, device="cpu")


def run_embed(
    inputs: TrainingInputs, *, force: bool = False, echo: Callable[[str], None] = console_echo
) -> dict[str, Any]:
    """The embedding pass on the folds of ``inputs``; finished folds are skipped unless ``force``.

    Returns ``{"folds_complete": [...], "folds": {k: COMPLETE contents}}``, also ``embed/summary.json``.
    """
    if not is_global_zero():
        return {}
    out = inputs.out
    pending = []
    for k in inputs.todo:
        if force:
            shutil.rmtree(embed_dir(out, k), ignore_errors=True)
        if is_embedded(out, k, embedding_scope(inputs.config)):
            echo(f"embed fold {k}: already complete ({embed_dir(out, k) / COMPLETE}); --force redoes it")
            continue
        pending.append(k)
    processes = processes_for(inputs, pending, device=resolve_device(inputs.config.runtime.accelerator))
    run_folds(
        inputs,
        pending,
        processes,
        in_process=_embed_fold_in_process,
        in_turn=lambda k: embed_fold(inputs, k, echo=echo),
        stage="embed",
        echo=echo,
    )
    folds = {k: read_complete(embed_dir(out, k)) for k in range(inputs.n_folds) if is_complete(embed_dir(out, k))}
    summary = {"folds_complete": sorted(folds), "folds": {str(k): v for k, v in folds.items()}}
    write_json_atomic(stage_root(out, "embed") / SUMMARY_FILE, summary)
    return summary
