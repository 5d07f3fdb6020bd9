"""Test and benchmark support, shipped with the package (as ``numpy.testing`` is).

A complete model bundle with random weights: for timing ``predict`` with any recipe's full-size
models without training them (benchmarks/predict.py), and for tests of the reading and bookkeeping
side of ``predict`` that do not depend on what a model has learnt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch

from pedetect.io import write_csv_atomic, write_json_atomic
from pedetect.labels import EXAM_LABELS, IMAGE_LABEL, STUDY
from pedetect.models.bundle import write_bundle_info, write_preprocessing
from pedetect.models.heart import HeartStack, build_heart_model, save_heart_model
from pedetect.models.layout import (
    CONFIG_FILE,
    FOLDS_FILE,
    HEART_STACK_FILE,
    PRIOR_FILE,
    WEIGHTS_FILE,
    cnn_dir,
    heart_dir,
    seq_dir,
    stage_root,
    write_complete,
)
from pedetect.models.sequence import build_sequence_head, save_sequence_head
from pedetect.models.slice_classifier import build_slice_classifier
from pedetect.models.weights import save_weights
from pedetect.recipe import save_config

# Roughly the RSNA training frequencies (slices for the image label, exams for the others).
DEFAULT_PRIOR = {
    IMAGE_LABEL: 0.054,
    "negative_exam_for_pe": 0.68,
    "rv_lv_ratio_gte_1": 0.13,
    "rv_lv_ratio_lt_1": 0.17,
    "leftsided_pe": 0.21,
    "chronic_pe": 0.04,
    "rightsided_pe": 0.26,
    "acute_and_chronic_pe": 0.02,
    "central_pe": 0.05,
    "indeterminate": 0.02,
}


def write_random_bundle(
    config: Any,
    out: str | Path,
    *,
    folds: int = 1,
    seed: int = 0,
    prior: dict[str, float] | None = None,
    store_settings: dict[str, Any] | None = None,
) -> Path:
    """Write a bundle of ``folds`` folds of ``config``'s CNN and sequence head (and heart model, with
    a stacker that weighs it, when the config has a heart section) with random weights (seeded),
    readable by :func:`pedetect.models.bundle.read_bundle` and ``predict``."""
    prior = prior or DEFAULT_PRIOR
    absent = {IMAGE_LABEL, *EXAM_LABELS} - set(prior)
    if absent:
        raise ValueError(f"the prior lacks {', '.join(sorted(absent))}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / CONFIG_FILE)
    write_csv_atomic(
        pd.DataFrame({STUDY: [f"random.{k}" for k in range(folds)], "fold": list(range(folds))}), out / FOLDS_FILE
    )
    write_json_atomic(out / PRIOR_FILE, prior)
    width = 0
    for k in range(folds):
        torch.manual_seed(seed + k)
        cnn = build_slice_classifier(config.cnn, load_pretrained=False, location_grid=config.embed.location_grid)
        width = cnn.embedding_dim
        save_weights(cnn, cnn_dir(out, k) / WEIGHTS_FILE)
        write_complete(cnn_dir(out, k), {})
        save_sequence_head(
            build_sequence_head(config.seq, width, input_columns=config.seq_input_columns),
            seq_dir(out, k) / WEIGHTS_FILE,
        )
        write_complete(seq_dir(out, k), {})
        if config.heart is not None:
            save_heart_model(build_heart_model(config.heart), heart_dir(out, k) / WEIGHTS_FILE)
            write_complete(heart_dir(out, k), {})
    stages = ["cnn", "embed", "seq"]
    if config.heart is not None:
        HeartStack(a=1.0, b=2.0, c=0.0).save(stage_root(out, "heart") / HEART_STACK_FILE)
        stages.append("heart")
    write_bundle_info(out, folds=list(range(folds)), embedding_dim=width, cv_score=None, stages=stages)
    if store_settings is not None:
        write_preprocessing(out, store_settings)
    return out
