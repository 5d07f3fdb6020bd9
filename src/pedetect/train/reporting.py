"""What a finished fold leaves beside its weights, for both stages: metrics.json (the exported
epoch and every epoch's history), metrics.csv (the history as a table) and curves.png."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from pedetect.io import atomic_path, write_csv_atomic, write_json_atomic
from pedetect.models.layout import CURVES_FILE, METRICS_FILE, METRICS_TABLE


def write_curves(history: list[dict[str, Any]], path: Path, title: str) -> None:
    # matplotlib (slow to import) here only: export and the train command import this module's
    # users (train.seq, train.heart) without drawing.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(9, 3.5), constrained_layout=True)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="val log loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_auc.plot(epochs, [h["val_auc"] for h in history], "o-", color="tab:green")
    ax_auc.set_xlabel("epoch")
    ax_auc.set_ylabel("validation slice AUC")
    for ax in (ax_loss, ax_auc):
        ax.grid(alpha=0.3)
        ax.set_xticks(epochs)
    fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def finite(value: Any) -> Any:
    """``value``, or None where it is a NaN or infinite float (JSON has neither)."""
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else value


def write_fold_report(
    directory: Path, metrics: dict[str, Any], history: list[dict[str, Any]], title: str
) -> dict[str, Any]:
    """``metrics`` plus the per-epoch ``history`` (non-finite values as null) as metrics.json, the
    history as metrics.csv, and its curves as curves.png; returns what metrics.json holds."""
    record = {**metrics, "epochs": [{k: finite(v) for k, v in h.items()} for h in history]}
    write_json_atomic(directory / METRICS_FILE, record)
    write_csv_atomic(pd.DataFrame(history), directory / METRICS_TABLE)
    write_curves(history, directory / CURVES_FILE, title)
    return record
