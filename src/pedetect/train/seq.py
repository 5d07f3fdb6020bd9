"""Stage 2 runner: a sequence head per fold over out-of-fold embeddings (``pedetect train --stage seq``).

Fold k's head trains on the series of every other fold — by default each embedded by its own fold's
CNN, which never saw it (``embed/fold<j>``); with ``seq.training_embeddings: own_cnn`` as CNN k
embedded them (one feature space, the published solutions' way) — and is validated, epoch by epoch,
with the competition metric on fold k's series as embedded by CNN k. The loss is the metric itself (:func:`metric_loss`), the
same code as ``pedetect evaluate``. Pairing at inference is the same as here: head k reads CNN k's
embeddings, so the cross-validated score below is what ``predict`` (the mean over folds of head k on
CNN k) is measured by. Writes::

    MODEL_DIR/prior.json                 training frequency of every label (predict's fallback)
    MODEL_DIR/seq/fold<k>/model.safetensors   the exported head (best or last epoch)
    MODEL_DIR/seq/fold<k>/metrics.json   validation score and its parts per epoch, exported epoch
    MODEL_DIR/seq/fold<k>/metrics.csv, curves.png
    MODEL_DIR/seq/fold<k>/oof_predictions.csv  fold k's studies, id,label (probabilities)
    MODEL_DIR/seq/fold<k>/COMPLETE       written last; holds the fingerprint of the embeddings used
    MODEL_DIR/seq/oof_predictions.csv    every study, out of fold (``pedetect evaluate`` reproduces cv.json)
    MODEL_DIR/seq/cv.json                score before and after consistency fixing, image and exam parts,
                                         per-label AUC, and the baselines on the same studies: the label
                                         prior, and stage 1 alone (exam labels by rule from slice probabilities)

All series are held in memory as float16 (RSNA with 2048-wide embeddings: about 7 GB).
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pedetect.console import echo as console_echo
from pedetect.data.folds import FOLD
from pedetect.io import read_json, write_csv_atomic, write_json_atomic
from pedetect.labels import EXAM_LABELS, IMAGE_LABEL, SERIES, SOP, STUDY, UID_COLUMNS, exam_id
from pedetect.metric.baselines import exam_from_slices, label_prior, positive_exam_prior, prior_submission
from pedetect.metric.consistency import fix_submission
from pedetect.metric.evaluate import evaluate_frames, roc_auc
from pedetect.metric.loss import sigmoid, weighted_log_loss_parts
from pedetect.metric.submission import align
from pedetect.models.layout import (
    COMPLETE,
    CV_FILE,
    METRICS_FILE,
    OOF_FILE,
    PRIOR_FILE,
    WEIGHTS_FILE,
    embed_dir,
    embedding_path,
    is_complete,
    read_complete,
    seq_dir,
    stage_root,
    write_complete,
)
from pedetect.models.sequence import build_sequence_head, metric_loss, save_sequence_head
from pedetect.runtime import is_global_zero, resolve_device
from pedetect.train.embed import read_series_embedding
from pedetect.train.parallel import processes_for, run_folds
from pedetect.train.reporting import finite, write_fold_report
from pedetect.train.setup import TrainError, TrainingInputs


@dataclass
class SeriesRecord:
    """One series (one exam) with its out-of-fold features and its targets."""

    study: str
    series: str
    fold: int
    embedding: np.ndarray  # (N, D) float16
    logit: np.ndarray  # (N,) float32, the CNN's
    sop: np.ndarray  # (N,)
    slice_target: np.ndarray  # (N,) float32 (0 where unlabelled)
    labelled: np.ndarray  # (N,) bool: the slice is in the labels (scored)
    exam_target: np.ndarray  # (9,) float32


def load_records(inputs: TrainingInputs, *, cnn: int | None = None) -> list[SeriesRecord]:
    """Every labelled series with its embeddings: by its own fold's CNN, which never saw it (``cnn``
    None: out of fold), or all by fold ``cnn``'s CNN (``seq.training_embeddings: own_cnn``)."""
    items = inputs.items
    per_study = items.groupby(STUDY)[SERIES].nunique()
    if (per_study > 1).any():
        raise TrainError(
            f"{int((per_study > 1).sum())} studies have more than one series in the labels (e.g. {per_study[per_study > 1].index[0]}); "
            "stage 2 takes one series per study, as the RSNA data has"
        )
    needed = range(inputs.n_folds) if cnn is None else [cnn]
    missing = [k for k in needed if not is_complete(embed_dir(inputs.out, k))]
    if missing:
        raise TrainError(
            f"stage 2 needs the embeddings of every fold; folds {missing} have none ({embed_dir(inputs.out, missing[0]) / COMPLETE} "
            "is missing): run pedetect train --stage embed"
        )
    if cnn is not None and read_complete(embed_dir(inputs.out, cnn)).get("scope") != "all":
        raise TrainError(
            f"seq.training_embeddings own_cnn needs fold {cnn}'s CNN to have embedded every series; "
            f"{embed_dir(inputs.out, cnn)} holds only its own fold's: run pedetect train --stage embed"
        )
    target_of = dict(zip(items[SOP], items[IMAGE_LABEL].astype(np.float32)))
    records = []
    for (study, series, fold), exam in (
        items.groupby([STUDY, SERIES, FOLD], sort=True)[list(EXAM_LABELS)].first().iterrows()
    ):
        stored = read_series_embedding(embedding_path(inputs.out, int(fold) if cnn is None else cnn, series))
        labelled = np.array([s in target_of for s in stored.sop])
        target = np.array([target_of.get(s, 0.0) for s in stored.sop], dtype=np.float32)
        records.append(
            SeriesRecord(
                study,
                series,
                int(fold),
                stored.embedding,
                stored.logit,
                stored.sop,
                target,
                labelled,
                exam.to_numpy(dtype=np.float32),
            )
        )
    return records


def training_records(inputs: TrainingInputs, records: Sequence[SeriesRecord], fold: int) -> list[SeriesRecord]:
    """What head k learns from (``seq.training_embeddings``): the other folds' out-of-fold records,
    or the other folds' series as CNN k embedded them."""
    if inputs.config.seq.training_embeddings == "own_cnn":
        return [r for r in load_records(inputs, cnn=fold) if r.fold != fold]
    return [r for r in records if r.fold != fold]


def collate(records: Sequence[SeriesRecord], device) -> dict[str, Any]:
    """Pad a list of series to the longest: tensors on ``device`` with masks of real and labelled slices."""
    t = max(len(r.logit) for r in records)
    d = records[0].embedding.shape[1]
    b = len(records)
    embedding = np.zeros((b, t, d), dtype=np.float32)
    logit, target = np.zeros((b, t), np.float32), np.zeros((b, t), np.float32)
    mask, labelled = np.zeros((b, t), bool), np.zeros((b, t), bool)
    for i, r in enumerate(records):
        n = len(r.logit)
        embedding[i, :n], logit[i, :n], target[i, :n] = r.embedding, r.logit, r.slice_target
        mask[i, :n], labelled[i, :n] = True, r.labelled
    as_tensor = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return {
        "embedding": as_tensor(embedding),
        "logit": as_tensor(logit),
        "mask": as_tensor(mask),
        "labelled": as_tensor(labelled),
        "slice_target": as_tensor(target),
        "exam_target": as_tensor(np.stack([r.exam_target for r in records])),
    }


def predict_records(
    head, records: Sequence[SeriesRecord], *, batch_size: int, device
) -> tuple[list[np.ndarray], np.ndarray]:
    """Slice logits per series and exam logits ``(J, 9)`` of ``records``, in eval mode."""
    head.eval()
    slices, exams = [], []
    with torch.inference_mode():
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            batch = collate(chunk, device)
            slice_logits, exam_logits = head(batch["embedding"], batch["mask"], batch["logit"])
            slice_logits = slice_logits.double().cpu().numpy()
            slices += [slice_logits[i, : len(r.logit)] for i, r in enumerate(chunk)]
            exams.append(exam_logits.double().cpu().numpy())
    return slices, np.concatenate(exams)


def score_records(records: Sequence[SeriesRecord], slice_logits: Sequence[np.ndarray], exam_logits: np.ndarray):
    """The metric's parts (:class:`LossParts`) over ``records``, labelled slices only."""
    image_target = np.concatenate([r.slice_target[r.labelled] for r in records]).astype(np.float64)
    image_logit = np.concatenate([s[r.labelled] for r, s in zip(records, slice_logits)])
    exam_index = np.concatenate([np.full(int(r.labelled.sum()), j) for j, r in enumerate(records)]).astype(np.int64)
    exam_target = np.stack([r.exam_target for r in records]).astype(np.float64)
    return weighted_log_loss_parts(image_target, image_logit, exam_index, exam_target, exam_logits, from_logits=True)


def oof_submission(
    records: Sequence[SeriesRecord], slice_probability: Sequence[np.ndarray], exam_probability: np.ndarray
) -> pd.DataFrame:
    """``id,label`` rows (nine exam rows per study, one per labelled slice) of probabilities."""
    ids: list[str] = []
    values: list[np.ndarray] = []
    for j, r in enumerate(records):
        ids += [exam_id(r.study, label) for label in EXAM_LABELS]
        values.append(np.asarray(exam_probability[j], dtype=np.float64))
    for r, p in zip(records, slice_probability):
        ids += r.sop[r.labelled].tolist()
        values.append(np.asarray(p[r.labelled], dtype=np.float64))
    return pd.DataFrame({"id": ids, "label": np.concatenate(values)})


def embeddings_fingerprint(out: Path, n_folds: int) -> str:
    """Identifies the embeddings a head learnt from (the CNN weights behind every fold's embeddings)."""
    markers = [read_complete(embed_dir(out, k))["cnn_sha256"] for k in range(n_folds)]
    return hashlib.sha256("|".join(markers).encode()).hexdigest()


def train_epoch(head, optimizer, schedule, train: Sequence[SeriesRecord], order: np.ndarray, *, seq, device) -> float:
    """One pass over ``train`` in ``order``, the metric as the loss; returns the mean batch loss."""
    head.train()
    losses = []
    for start in range(0, len(order), seq.batch_size):
        batch = collate([train[i] for i in order[start : start + seq.batch_size]], device)
        slice_logits, exam_logits = head(batch["embedding"], batch["mask"], batch["logit"])
        loss = metric_loss(slice_logits, exam_logits, batch["labelled"], batch["slice_target"], batch["exam_target"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if seq.gradient_clip_norm:
            torch.nn.utils.clip_grad_norm_(head.parameters(), seq.gradient_clip_norm)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return float(np.mean(losses))


def validate(head, val: Sequence[SeriesRecord], *, batch_size: int, device) -> dict[str, float]:
    """The competition score of ``val`` and its parts, and the slice AUC."""
    slice_logits, exam_logits = predict_records(head, val, batch_size=batch_size, device=device)
    parts = score_records(val, slice_logits, exam_logits)
    auc = roc_auc(
        np.concatenate([r.slice_target[r.labelled] for r in val]),
        np.concatenate([s[r.labelled] for r, s in zip(val, slice_logits)]),
    )
    return {
        "val_loss": float(parts.score),
        "val_image_part": float(parts.image_score),
        "val_exam_part": float(parts.exam_score),
        "val_auc": auc,
    }


def train_seq_fold(
    inputs: TrainingInputs,
    records: Sequence[SeriesRecord],
    fold: int,
    *,
    device: str,
    echo: Callable[[str], None] = console_echo,
) -> dict[str, Any]:
    """Train fold k's head on the other folds' series; export the best (or last) epoch."""
    # imports Lightning (seconds): only here, since pedetect export imports this module to score
    from pedetect.train.module import LrSchedule, build_optimizer

    config = inputs.config
    seq = config.seq
    train = training_records(inputs, records, fold)
    val = [r for r in records if r.fold == fold]
    if not train or not val:
        raise TrainError(f"fold {fold} leaves no {'training' if not train else 'validation'} series for stage 2")
    started = time.perf_counter()
    seed = config.seed + fold
    torch.manual_seed(seed)
    generator = np.random.default_rng(seed)
    head = build_sequence_head(seq, train[0].embedding.shape[1], input_columns=config.seq_input_columns).to(device)
    optimizer = build_optimizer(seq.optimizer, head.parameters())
    steps_per_epoch = -(-len(train) // seq.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, LrSchedule(seq.scheduler, seq.epochs * steps_per_epoch, steps_per_epoch)
    )
    history: list[dict[str, Any]] = []
    best_score, best_state, best_epoch = float("inf"), None, -1
    for epoch in range(seq.epochs):
        train_loss = train_epoch(
            head, optimizer, schedule, train, generator.permutation(len(train)), seq=seq, device=device
        )
        scores = validate(head, val, batch_size=seq.batch_size, device=device)
        history.append({"epoch": epoch, "train_loss": train_loss, **scores, "lr": optimizer.param_groups[0]["lr"]})
        if scores["val_loss"] < best_score:
            best_score, best_epoch = scores["val_loss"], epoch
            best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
    if seq.export == "best" and best_state is not None:
        head.load_state_dict(best_state)
        chosen = history[best_epoch]
    else:
        chosen = history[-1]
    metrics = export_seq_fold(
        inputs,
        head,
        train,
        val,
        fold,
        chosen=chosen,
        history=history,
        seconds=time.perf_counter() - started,
        device=device,
    )
    echo(
        f"seq fold {fold}: validation score {chosen['val_loss']:.4f} (epoch {chosen['epoch']}), {metrics['seconds']:.1f} s"
    )
    return metrics


def export_seq_fold(
    inputs: TrainingInputs,
    head,
    train: Sequence[SeriesRecord],
    val: Sequence[SeriesRecord],
    fold: int,
    *,
    chosen: dict[str, Any],
    history: list[dict[str, Any]],
    seconds: float,
    device,
) -> dict[str, Any]:
    """Fold k's head, its out-of-fold predictions, metrics and curves, then its COMPLETE marker."""
    config, out = inputs.config, inputs.out
    seq = config.seq
    directory = seq_dir(out, fold)
    save_sequence_head(head.cpu(), directory / WEIGHTS_FILE)
    head.to(device)
    slice_logits, exam_logits = predict_records(head, val, batch_size=seq.batch_size, device=device)
    write_csv_atomic(
        oof_submission(val, [sigmoid(s) for s in slice_logits], sigmoid(exam_logits)), directory / OOF_FILE
    )
    metrics = {
        "fold": fold,
        "val_score": finite(chosen["val_loss"]),
        "val_image_part": finite(chosen["val_image_part"]),
        "val_exam_part": finite(chosen["val_exam_part"]),
        "val_slice_auc": finite(chosen["val_auc"]),
        "exported_epoch": int(chosen["epoch"]),
        "export": seq.export,
        "train_series": len(train),
        "val_series": len(val),
        "embedding_dim": int(head.embedding_dim),
        "seconds": round(seconds, 3),
    }
    title = f"{config.name} — sequence head fold {fold} ({seq.encoder}); val loss = the metric"
    metrics = write_fold_report(directory, metrics, history, title)
    write_complete(
        directory, {"val_score": metrics["val_score"], "embeddings": embeddings_fingerprint(out, inputs.n_folds)}
    )
    return metrics


def is_trained(out: Path, fold: int, n_folds: int) -> bool:
    """Fold k's head is complete and learnt from the embeddings now in ``embed/``."""
    if not is_complete(seq_dir(out, fold)):
        return False
    try:
        return read_complete(seq_dir(out, fold)).get("embeddings") == embeddings_fingerprint(out, n_folds)
    except (FileNotFoundError, KeyError):
        return False


def write_prior(inputs: TrainingInputs) -> dict[str, float]:
    """``MODEL_DIR/prior.json``: every label's training frequency (predict's fallback)."""
    prior = label_prior(inputs.labels)
    write_json_atomic(inputs.out / PRIOR_FILE, prior)
    return prior


def oof_scores(truth: pd.DataFrame, oof: pd.DataFrame, what: str) -> dict[str, Any]:
    """The metric of out-of-fold predictions ``oof`` (id, label) against ``truth``, before and after
    the consistency fix: the fields every cv.json starts with."""
    oof = oof.assign(label_text=oof["label"].map(repr))  # the fix works on the values as written
    report = evaluate_frames(truth, oof, what)
    fixed, fixes = fix_submission(oof, align(oof, truth))
    fixed_report = evaluate_frames(truth, fixed, "fixed " + what)
    return {
        "score": report["score"],
        "score_consistent": fixed_report["score"],
        "image_part": report["image_part"],
        "exam_part": report["exam_part"],
        "slice_auc": report["slice_auc"],
        "exams_fixed": len(fixes),
        "n_studies": report["n_studies"],
        "n_slices": report["n_slices"],
        "labels": {
            label: {"auc": row["auc"], "log_loss": row["log_loss"], "positives": row["positives"]}
            for label, row in report["labels"].items()
        },
    }


def cross_validation(inputs: TrainingInputs, records: Sequence[SeriesRecord]) -> dict[str, Any]:
    """``seq/oof_predictions.csv`` and ``seq/cv.json`` from every fold's out-of-fold predictions."""
    out = inputs.out
    oof = pd.concat([pd.read_csv(seq_dir(out, k) / OOF_FILE) for k in range(inputs.n_folds)], ignore_index=True)
    truth = inputs.labels[inputs.labels[STUDY].isin({r.study for r in records})]

    prior = label_prior(inputs.labels)
    prior_report = evaluate_frames(truth, prior_submission(prior, truth[list(UID_COLUMNS)]))
    positive_prior = positive_exam_prior(inputs.labels)
    slice_probability = [sigmoid(r.logit) for r in records]
    exam_probability = np.array(
        [[exam_from_slices(p, prior, positive_prior)[label] for label in EXAM_LABELS] for p in slice_probability]
    )
    stage1_report = evaluate_frames(truth, oof_submission(records, slice_probability, exam_probability))

    def brief(r: dict[str, Any]) -> dict[str, Any]:
        return {
            "score": r["score"],
            "image_part": r["image_part"],
            "exam_part": r["exam_part"],
            "slice_auc": r["slice_auc"],
        }

    folds = {}
    for k in range(inputs.n_folds):
        m = read_json(seq_dir(out, k) / METRICS_FILE)
        folds[str(k)] = {key: m[key] for key in ("val_score", "exported_epoch", "val_series", "seconds")}
    cv = {
        **oof_scores(truth, oof, "out-of-fold predictions"),
        "baselines": {"prior": brief(prior_report), "stage1_alone": brief(stage1_report)},
        "folds": folds,
    }
    write_csv_atomic(oof[["id", "label"]], stage_root(out, "seq") / OOF_FILE)
    write_json_atomic(stage_root(out, "seq") / CV_FILE, cv)
    return cv


def _train_fold_in_process(inputs: TrainingInputs, fold: int) -> dict[str, Any]:
    """One fold's head in a process of its own (``runtime.parallel_folds``)."""
    return train_seq_fold(inputs, load_records(inputs), fold, device="cpu")


def run_seq(
    inputs: TrainingInputs, *, force: bool = False, echo: Callable[[str], None] = console_echo
) -> dict[str, Any] | None:
    """Stage 2 on the folds of ``inputs``; finished folds are skipped unless ``force``. Once every fold
    is complete, writes and returns the cross-validation (``seq/cv.json``); else returns None."""

    if not is_global_zero():
        return None
    out = inputs.out
    records = load_records(inputs)
    write_prior(inputs)
    device = resolve_device(inputs.config.runtime.accelerator)
    pending = []
    for k in inputs.todo:
        if force:
            shutil.rmtree(seq_dir(out, k), ignore_errors=True)
        if is_trained(out, k, inputs.n_folds):
            echo(f"seq fold {k}: already complete ({seq_dir(out, k) / COMPLETE}); --force retrains it")
            continue
        shutil.rmtree(seq_dir(out, k), ignore_errors=True)  # stale: learnt from other embeddings
        pending.append(k)
    processes = processes_for(inputs, pending, device=device, needs_store=False)
    run_folds(
        inputs,
        pending,
        processes,
        in_process=_train_fold_in_process,
        needs_store=False,
        stage="seq",
        echo=echo,
        in_turn=lambda k: train_seq_fold(inputs, records, k, device=device, echo=echo),
    )
    if not all(is_trained(out, k, inputs.n_folds) for k in range(inputs.n_folds)):
        return None
    return cross_validation(inputs, records)
