"""The heart stage (``pedetect train --stage heart``, recipes with a ``heart:`` section).

After stage 2, for the RV/LV labels (a third of the exam weight, and what the slice CNN never
looks at on purpose):

1. every training series' heart is found from its Hounsfield units and cropped to ``depth × size²``
   (:mod:`pedetect.data.heart_box`), once, into ``heart/crops.npz``;
2. fold k's heart model (:class:`pedetect.models.heart.HeartCNN`) trains on the positive exams of
   the other folds with their RV/LV ≥ 1 label, and predicts fold k's series (out of fold); the last
   epoch is kept (choosing the epoch on fold k would flatter the cross-validation);
3. the stacker (:class:`pedetect.models.heart.HeartStack`) of stage 2's RV/LV output and the heart
   logit is fitted on positive exams out of fold. The cross-validation is itself cross-fitted: fold
   k's exams are stacked by a stacker fitted on the other folds' predictions. The stacker kept for
   ``predict`` is fitted on every fold's.

Writes::

    MODEL_DIR/heart/crops.npz                 crops (uint8), series, boxes, the crop settings
    MODEL_DIR/heart/fold<k>/model.safetensors fold k's heart model
    MODEL_DIR/heart/fold<k>/metrics.json, metrics.csv, curves.png, oof_logits.csv (series, logit)
    MODEL_DIR/heart/fold<k>/COMPLETE          written last: the crops' and stage 2's fingerprints
    MODEL_DIR/heart/stack.json                the stacker for predict
    MODEL_DIR/heart/oof_predictions.csv       stage 2's out-of-fold predictions, RV/LV stacked
    MODEL_DIR/heart/cv.json                   the score with the heart, and stage 2's without it
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import shutil
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from pedetect.console import echo as console_echo
from pedetect.data.folds import FOLD
from pedetect.data.heart_box import series_heart_crop
from pedetect.io import atomic_path, read_json, write_csv_atomic, write_json_atomic
from pedetect.labels import EXAM_LABELS, NEGATIVE_LABELS, RV_LV_LABELS, SERIES, STUDY, exam_id
from pedetect.models.heart import GTE as GTE_COLUMN
from pedetect.models.heart import LT as LT_COLUMN
from pedetect.models.heart import HeartStack, build_heart_model, rv_lv_given_positive, save_heart_model
from pedetect.models.layout import (
    COMPLETE,
    CV_FILE,
    METRICS_FILE,
    OOF_FILE,
    WEIGHTS_FILE,
    heart_dir,
    heart_stack_path,
    seq_dir,
    stage_root,
    write_complete,
)
from pedetect.models.layout import (
    HEART_CROPS_FILE as CROPS_FILE,
)
from pedetect.models.layout import (
    HEART_OOF_LOGITS_FILE as OOF_LOGITS_FILE,
)
from pedetect.runtime import is_global_zero, resolve_device
from pedetect.store.config import DEFAULT_WINDOW_SPECS
from pedetect.train.reporting import finite, write_fold_report
from pedetect.train.seq import oof_scores

GTE = RV_LV_LABELS[0]
NEGATIVE, INDETERMINATE = NEGATIVE_LABELS


class HeartTrainError(RuntimeError):
    pass


def crop_settings(inputs) -> dict[str, Any]:
    """What the crops depend on: the heart section's crop settings and the store's windows."""
    heart = inputs.config.heart
    settings = getattr(inputs.source, "settings", None) or {}
    windows = settings.get("windows") or default_windows()
    return {
        "depth": heart.depth,
        "size": heart.size,
        "window": list(heart.window),
        "store_windows": [list(map(float, w)) for w in windows],
    }


def default_windows() -> list[list[float]]:
    return [[float(w["level"]), float(w["width"])] for w in DEFAULT_WINDOW_SPECS]


def series_table(inputs) -> pd.DataFrame:
    """One row per training series: study, series, fold, positive exam, RV/LV ≥ 1."""
    per_series = inputs.items.groupby(SERIES, sort=True).agg(study=(STUDY, "first"), fold=(FOLD, "first")).reset_index()
    exams = inputs.labels.groupby(STUDY).first()
    positive = (exams[NEGATIVE] == 0) & (exams[INDETERMINATE] == 0)
    per_series["positive"] = per_series["study"].map(positive).fillna(False).astype(bool).to_numpy()
    per_series["target"] = per_series["study"].map(exams[GTE]).fillna(0).astype(int).to_numpy()
    return per_series.rename(columns={SERIES: "series"})


def heart_crops(inputs, table: pd.DataFrame, *, echo: Callable[[str], None]) -> np.ndarray:
    """The crop of every series of ``table`` (row order), from ``heart/crops.npz`` when it holds them
    with the same settings, else made from the store (and saved)."""
    settings = crop_settings(inputs)
    path = stage_root(inputs.out, "heart") / CROPS_FILE
    wanted = table["series"].tolist()
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as saved:
                if json.loads(str(saved["settings"])) == settings:
                    index = {uid: i for i, uid in enumerate(saved["series"].tolist())}
                    if all(uid in index for uid in wanted):
                        return saved["crops"][[index[uid] for uid in wanted]]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:  # unreadable: made again below
            echo(f"heart crops: {path} cannot be read ({type(error).__name__}); making the crops again")
    heart = inputs.config.heart
    crops = np.zeros((len(wanted), heart.depth, heart.size, heart.size), dtype=np.uint8)
    boxes = np.zeros((len(wanted), 7), dtype=np.int32)
    started = time.perf_counter()
    # The embedding pass's reader processes, plus this one: finding the heart is CPU work per series.
    processes = inputs.config.embed.num_workers + 1 if inputs.config.embed.num_workers else 0
    for i, (crop, box) in enumerate(_crops_of(inputs.source, wanted, settings, processes)):
        crops[i] = crop
        boxes[i] = (box.z0, box.z1, box.y0, box.y1, box.x0, box.x1, int(box.found))
        if (i + 1) % 100 == 0 or i + 1 == len(wanted):
            echo(f"heart crops: {i + 1}/{len(wanted)} series ({time.perf_counter() - started:.0f} s)")
    not_found = int((boxes[:, 6] == 0).sum())
    if not_found:
        echo(f"heart crops: no enhanced blood pool found in {not_found} series (cropped the cavity's centre instead)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, crops=crops, series=np.array(wanted), boxes=boxes, settings=np.array(json.dumps(settings)))
    return crops


_WORKER: dict[str, Any] = {}


def _start_crop_worker(source, settings: dict[str, Any], single_thread: bool = True) -> None:
    if single_thread:  # a worker process: one series at a time, threads would only contend
        torch.set_num_threads(1)
    _WORKER.update(source=source, settings=settings)


def _crop_one(series_uid: str):
    settings = _WORKER["settings"]
    volume = _WORKER["source"].read_series(series_uid)
    return series_heart_crop(
        volume, settings["store_windows"], depth=settings["depth"], size=settings["size"], window=settings["window"]
    )


def _crops_of(source, series_uids: list[str], settings: dict[str, Any], processes: int):
    """(crop, box) of each series, in order; in ``processes`` spawned processes (0: this one)."""
    if processes < 2 or len(series_uids) < 2 * processes:
        _start_crop_worker(source, settings, single_thread=False)
        yield from map(_crop_one, series_uids)
        return

    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch's threads
    with ProcessPoolExecutor(
        processes, mp_context=context, initializer=_start_crop_worker, initargs=(source, settings)
    ) as pool:
        yield from pool.map(_crop_one, series_uids, chunksize=8)


def augment(batch: np.ndarray, rng: np.random.Generator, *, shift: float, intensity: float) -> np.ndarray:
    """Random in-plane shift (wrapped: the crop's border is background) and a gain and offset."""
    out = np.empty(batch.shape, dtype=np.float32)
    side = batch.shape[-1]
    most = int(round(shift * side))
    for i, crop in enumerate(batch):
        x = crop.astype(np.float32) / 255.0
        if most:
            dy, dx = rng.integers(-most, most + 1, size=2)
            x = np.roll(x, (int(dy), int(dx)), axis=(1, 2))
        if intensity:
            x = x * (1.0 + rng.uniform(-intensity, intensity)) + rng.uniform(-intensity, intensity) * 0.5
        out[i] = x
    return out


def train_heart_fold(
    inputs,
    table: pd.DataFrame,
    crops: np.ndarray,
    fold: int,
    *,
    device: str,
    fingerprint: str,
    echo: Callable[[str], None],
) -> dict[str, Any]:
    # imports Lightning (seconds): only here, since pedetect train imports this module whatever the stage
    from pedetect.train.module import LrSchedule, build_optimizer, log_loss

    heart = inputs.config.heart
    train = np.flatnonzero((table["fold"] != fold).to_numpy() & table["positive"].to_numpy())
    val = np.flatnonzero((table["fold"] == fold).to_numpy() & table["positive"].to_numpy())
    targets = table["target"].to_numpy().astype(np.float32)
    if len(train) == 0 or len(np.unique(targets[train])) < 2:
        raise HeartTrainError(
            f"heart fold {fold}: the other folds hold {len(train)} positive exams, not both RV/LV classes; nothing to learn"
        )
    started = time.perf_counter()
    seed = inputs.config.seed + fold
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_heart_model(heart).to(device)
    optimizer = build_optimizer(heart.optimizer, model.parameters())
    steps_per_epoch = -(-len(train) // heart.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, LrSchedule(heart.scheduler, heart.epochs * steps_per_epoch, steps_per_epoch)
    )
    share = float(targets[train].mean())
    weights = {1.0: 0.5 / share, 0.0: 0.5 / (1.0 - share)} if heart.class_weight == "balanced" else {1.0: 1.0, 0.0: 1.0}
    history: list[dict[str, Any]] = []
    for epoch in range(heart.epochs):
        model.train()
        order = rng.permutation(train)
        total, seen = 0.0, 0
        for start in range(0, len(order), heart.batch_size):
            batch = order[start : start + heart.batch_size]
            x = torch.from_numpy(augment(crops[batch], rng, shift=heart.shift, intensity=heart.intensity))[:, None].to(
                device
            )
            y = torch.from_numpy(targets[batch]).to(device)
            w = torch.tensor([weights[float(t)] for t in targets[batch]], device=device)
            loss = (torch.nn.functional.binary_cross_entropy_with_logits(model(x), y, reduction="none") * w).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(batch)
            seen += len(batch)
        row: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": total / max(seen, 1),
            "lr": optimizer.param_groups[0]["lr"],
        }
        if len(val):
            p = 1.0 / (1.0 + np.exp(-model.predict(crops[val], batch_size=heart.batch_size, device=device)))
            row["val_loss"] = log_loss(targets[val], p)
            row["val_auc"] = (
                float(roc_auc_score(targets[val], p)) if len(np.unique(targets[val])) == 2 else float("nan")
            )
        history.append(row)
    directory = heart_dir(inputs.out, fold)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    save_heart_model(model, directory / WEIGHTS_FILE)
    mine = np.flatnonzero((table["fold"] == fold).to_numpy())
    logits = model.predict(crops[mine], batch_size=heart.batch_size, device=device)
    write_csv_atomic(
        pd.DataFrame({"series": table["series"].to_numpy()[mine], "logit": logits}), directory / OOF_LOGITS_FILE
    )
    chosen = history[-1]
    metrics = {
        "fold": fold,
        "exported_epoch": chosen["epoch"],
        "val_auc": finite(chosen.get("val_auc")),
        "val_loss": finite(chosen.get("val_loss")),
        "train_exams": int(len(train)),
        "val_exams": int(len(val)),
        "seconds": round(time.perf_counter() - started, 2),
    }
    metrics = write_fold_report(directory, metrics, history, f"heart fold {fold}")
    write_complete(directory, {"val_auc": metrics["val_auc"], "inputs": fingerprint})
    echo(
        f"heart fold {fold}: validation RV/LV AUC {metrics['val_auc']} on {len(val)} positive exams, {metrics['seconds']:.1f} s"
    )
    return metrics


def inputs_fingerprint(out: Path, n_folds: int, settings: dict[str, Any]) -> str:
    """Stage 2's fold markers and the crop settings: a heart fold made from others is stale."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for k in range(n_folds):
        marker = seq_dir(out, k) / COMPLETE
        digest.update(marker.read_bytes() if marker.is_file() else b"-")
    return digest.hexdigest()[:16]


def is_trained(out: Path, fold: int, fingerprint: str) -> bool:
    marker = heart_dir(out, fold) / COMPLETE
    if not marker.is_file():
        return False
    try:
        return read_json(marker).get("inputs") == fingerprint
    except (OSError, ValueError):
        return False


def exam_matrix(oof: pd.DataFrame, studies: list[str]) -> np.ndarray:
    """(studies, 9) exam probabilities of a submission frame (id, label)."""
    values = dict(zip(oof["id"], oof["label"]))
    return np.array([[float(values[exam_id(s, label)]) for label in EXAM_LABELS] for s in studies])


def with_exams(oof: pd.DataFrame, studies: list[str], exams: np.ndarray) -> pd.DataFrame:
    """``oof`` with the RV/LV rows of ``studies`` replaced from ``exams`` (studies, 9)."""
    replace = {}
    for s, row in zip(studies, exams):
        replace[exam_id(s, RV_LV_LABELS[0])] = float(row[GTE_COLUMN])
        replace[exam_id(s, RV_LV_LABELS[1])] = float(row[LT_COLUMN])
    out = oof[["id", "label"]].copy()
    hit = out["id"].isin(replace)
    out.loc[hit, "label"] = out.loc[hit, "id"].map(replace)
    return out


def stack_and_score(inputs, table: pd.DataFrame) -> dict[str, Any]:
    """Cross-fitted stacking of the out-of-fold predictions, ``heart/cv.json`` and the final stacker."""
    out = inputs.out
    logits = pd.concat(
        [pd.read_csv(heart_dir(out, k) / OOF_LOGITS_FILE) for k in range(inputs.n_folds)], ignore_index=True
    )
    by_series = dict(zip(logits["series"], logits["logit"]))
    studies_table = (
        table.assign(logit=table["series"].map(by_series))
        .groupby("study", sort=True)
        .agg(
            fold=("fold", "first"), positive=("positive", "first"), target=("target", "first"), logit=("logit", "mean")
        )
    )
    studies = studies_table.index.tolist()
    seq_oof = pd.read_csv(stage_root(out, "seq") / OOF_FILE)
    exams = exam_matrix(seq_oof, studies)
    heart_logit = studies_table["logit"].to_numpy()
    folds = studies_table["fold"].to_numpy()
    positive = studies_table["positive"].to_numpy()
    target = studies_table["target"].to_numpy()
    stacked = exams.copy()
    for k in range(inputs.n_folds):
        fit = positive & (folds != k)
        stack = HeartStack.fit(exams[fit], heart_logit[fit], target[fit])
        mine = folds == k
        stacked[mine] = stack.apply(exams[mine], heart_logit[mine])
    final = HeartStack.fit(exams[positive], heart_logit[positive], target[positive])

    def auc(values: np.ndarray) -> float | None:
        y = target[positive]
        return float(roc_auc_score(y, values[positive])) if len(np.unique(y)) == 2 else None

    rv_lv_auc = {
        "sequence_head": auc(rv_lv_given_positive(exams)),
        "heart_model": auc(heart_logit),
        "stacked": auc(rv_lv_given_positive(stacked)),
    }
    final.save(heart_stack_path(out), positive_exams=int(positive.sum()), rv_lv_auc_out_of_fold=rv_lv_auc)

    oof = with_exams(seq_oof, studies, stacked)
    truth = inputs.labels[inputs.labels[STUDY].isin(set(studies))]
    seq_cv = read_json(stage_root(out, "seq") / CV_FILE)
    folds_metrics = {
        str(k): {
            key: read_json(heart_dir(out, k) / METRICS_FILE)[key]
            for key in ("val_auc", "val_loss", "val_exams", "seconds")
        }
        for k in range(inputs.n_folds)
    }
    cv = {
        **oof_scores(truth, oof, "out-of-fold predictions with the heart model"),
        "rv_lv_auc_given_positive": rv_lv_auc,
        "stack": {"a": final.a, "b": final.b, "c": final.c},
        "without_heart": {"score": seq_cv["score"], "score_consistent": seq_cv["score_consistent"]},
        "baselines": seq_cv.get("baselines"),
        "folds": folds_metrics,
    }
    write_csv_atomic(oof[["id", "label"]], stage_root(out, "heart") / OOF_FILE)
    write_json_atomic(stage_root(out, "heart") / CV_FILE, cv)
    return cv


def run_heart(inputs, *, force: bool = False, echo: Callable[[str], None] = console_echo) -> dict[str, Any] | None:
    """The heart stage on the folds of ``inputs`` (after stage 2); returns ``heart/cv.json`` once every
    fold is complete, else None. A recipe without a ``heart`` section has nothing to do here."""
    if inputs.config.heart is None or not is_global_zero():
        return None
    out = inputs.out
    missing = [k for k in range(inputs.n_folds) if not (seq_dir(out, k) / COMPLETE).is_file()]
    if missing:
        raise HeartTrainError(
            f"the heart stage stacks on stage 2: fold(s) {missing} have no sequence head yet (run --stage seq first)"
        )
    if not (stage_root(out, "seq") / OOF_FILE).is_file():
        raise HeartTrainError(
            f"{stage_root(out, 'seq') / OOF_FILE} is missing: run --stage seq to finish stage 2's cross-validation"
        )
    table = series_table(inputs)
    fingerprint = inputs_fingerprint(out, inputs.n_folds, crop_settings(inputs))
    todo = [k for k in inputs.todo if force or not is_trained(out, k, fingerprint)]
    for k in inputs.todo:
        if k not in todo:
            echo(f"heart fold {k}: already complete ({heart_dir(out, k) / COMPLETE}); --force retrains it")
    if todo:
        crops = heart_crops(inputs, table, echo=echo)
        device = resolve_device(inputs.config.runtime.accelerator)
        for k in todo:
            train_heart_fold(inputs, table, crops, k, device=device, fingerprint=fingerprint, echo=echo)
    if not all(is_trained(out, k, fingerprint) for k in range(inputs.n_folds)):
        return None
    cv = stack_and_score(inputs, table)
    echo(
        f"heart: cross-validated score {cv['score']:.4f} (stage 2 alone {cv['without_heart']['score']:.4f}); "
        f"RV/LV >= 1 AUC given positive: stage 2 {cv['rv_lv_auc_given_positive']['sequence_head']}, "
        f"heart {cv['rv_lv_auc_given_positive']['heart_model']}, stacked {cv['rv_lv_auc_given_positive']['stacked']}"
    )
    return cv
