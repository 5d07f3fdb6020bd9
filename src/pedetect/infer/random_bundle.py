"""A complete model bundle with random weights: for timing ``predict`` with any recipe's full-size
models without training them (benchmarks/predict.py), and for tests of the reading and bookkeeping
side of ``predict`` that do not depend on what a model has learnt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pedetect.labels import EXAM_LABELS, IMAGE_LABEL, STUDY

# Roughly the RSNA training frequencies (slices for the image label, exams for the others).
DEFAULT_PRIOR = {IMAGE_LABEL: 0.054, "negative_exam_for_pe": 0.68, "rv_lv_ratio_gte_1": 0.13, "rv_lv_ratio_lt_1": 0.17,
                 "leftsided_pe": 0.21, "chronic_pe": 0.04, "rightsided_pe": 0.26, "acute_and_chronic_pe": 0.02,
                 "central_pe": 0.05, "indeterminate": 0.02}


def write_random_bundle(
    config: Any,
    out: str | Path,
    *,
    folds: int = 1,
    seed: int = 0,
    prior: dict[str, float] | None = None,
    store_settings: dict[str, Any] | None = None,
) -> Path:
    """Write a bundle of ``folds`` folds of ``config``'s CNN and sequence head with random weights
    (seeded), readable by :func:`pedetect.models.bundle.read_bundle` and ``predict``."""
    import torch

    from pedetect.models.bundle import COMPLETE, PRIOR_FILE, write_bundle_info, write_preprocessing
    from pedetect.models.sequence import build_sequence_head, save_sequence_head, seq_dir
    from pedetect.models.slice_classifier import WEIGHTS_FILE, build_slice_classifier, fold_dir, save_weights
    from pedetect.train.config import save_config

    prior = prior or DEFAULT_PRIOR
    absent = {IMAGE_LABEL, *EXAM_LABELS} - set(prior)
    if absent:
        raise ValueError(f"the prior lacks {', '.join(sorted(absent))}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    (out / "folds.csv").write_text(f"{STUDY},fold\n" + "".join(f"random.{k},{k}\n" for k in range(folds)))
    (out / PRIOR_FILE).write_text(json.dumps(prior, indent=2))
    width = 0
    for k in range(folds):
        torch.manual_seed(seed + k)
        cnn = build_slice_classifier(config.cnn, load_pretrained=False, location_grid=config.embed.location_grid)
        width = cnn.embedding_dim
        save_weights(cnn, fold_dir(out, k) / WEIGHTS_FILE)
        (fold_dir(out, k) / COMPLETE).write_text("{}\n")
        save_sequence_head(build_sequence_head(config.seq, width), seq_dir(out, k) / WEIGHTS_FILE)
        (seq_dir(out, k) / COMPLETE).write_text("{}\n")
    write_bundle_info(out, folds=list(range(folds)), embedding_dim=width, cv_score=None)
    if store_settings is not None:
        write_preprocessing(out, store_settings)
    return out
