"""``pedetect train``: the stages in order, cnn → embed → seq (→ heart), and the bundle they leave.

Each stage skips what is finished (COMPLETE markers, checked against the weights or embeddings they
were made from) and redoes it with ``force``; ``stage="all"`` runs the three and, once every fold of
every stage is complete, writes ``MODEL_DIR/bundle.json`` (:mod:`pedetect.models.bundle`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from pedetect.console import echo as console_echo
from pedetect.models.backbone import weights_provenance
from pedetect.models.bundle import write_bundle_info, write_preprocessing
from pedetect.models.layout import STAGES
from pedetect.recipe import ExperimentConfig
from pedetect.runtime import is_global_zero
from pedetect.train.cnn import check_cnn_config, run_cnn
from pedetect.train.embed import run_embed
from pedetect.train.heart import HeartTrainError, run_heart
from pedetect.train.parallel import shutdown_fold_processes
from pedetect.train.seq import run_seq
from pedetect.train.setup import training_inputs


def train(
    config: ExperimentConfig,
    *,
    stage: str = "all",
    store: str | Path | Any,
    labels: str | Path | pd.DataFrame,
    out: str | Path,
    folds: str | Path | None = None,
    fold: int | None = None,
    force: bool = False,
    callbacks: Sequence = (),
    clots: str | Path | None = None,
    echo: Callable[[str], None] = console_echo,
) -> dict[str, Any]:
    """Run ``stage`` (cnn, embed, seq, heart or all) on every fold (or ``fold``). ``clots``: the
    training emboli's boxes, which ``cnn.loss.clot_map_weight`` needs (``pedetect synth``'s clots.csv).

    Returns ``{"cnn": cnn/summary.json, "embed": embed/summary.json, "seq": seq/cv.json or None,
    "heart": heart/cv.json or None (recipes with a heart section),
    "seconds": {stage: wall time of this run}, "bundle": bundle.json or None}`` for the stages run.
    """
    if stage not in (*STAGES, "all"):
        raise ValueError(f"unknown stage {stage!r}; choose cnn, embed, seq, heart or all")
    if stage == "heart" and config.heart is None:
        raise HeartTrainError("the recipe has no heart section: nothing to train in the heart stage")
    stages = tuple(s for s in STAGES if s != "heart" or config.heart is not None) if stage == "all" else (stage,)
    if "cnn" in stages:
        check_cnn_config(config)
    inputs = training_inputs(
        config, store=store, labels=labels, out=out, folds=folds, fold=fold, force=force, clots=clots, echo=echo
    )
    runners = {
        "cnn": lambda: run_cnn(inputs, force=force, callbacks=callbacks, echo=echo),
        "embed": lambda: run_embed(inputs, force=force, echo=echo),
        "seq": lambda: run_seq(inputs, force=force, echo=echo),
        "heart": lambda: run_heart(inputs, force=force, echo=echo),
    }
    result: dict[str, Any] = {"seconds": {}, "bundle": None}
    try:
        for name in stages:
            started = time.perf_counter()
            result[name] = runners[name]()
            result["seconds"][name] = round(time.perf_counter() - started, 3)
    finally:
        shutdown_fold_processes()  # runtime.parallel_folds: the folds' processes, kept between stages
    finished = stage == "all" and result["seq"] is not None and (config.heart is None or result["heart"] is not None)
    if is_global_zero() and finished:
        dims = {m["embedding_dim"] for m in result["embed"]["folds"].values()}
        settings = getattr(inputs.source, "settings", None)
        if settings:  # how prepare read the DICOM: predict reads new studies the same way
            write_preprocessing(inputs.out, settings)
        backbone = inputs.config.cnn.backbone
        result["bundle"] = write_bundle_info(
            inputs.out,
            folds=list(range(inputs.n_folds)),
            embedding_dim=int(dims.pop()),
            cv_score=(result.get("heart") or result["seq"])["score"],
            stages=list(stages),
            starting_weights=weights_provenance(backbone.weights, backbone.name),
        )
    return result
