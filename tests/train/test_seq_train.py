"""Stage 2 on a small in-memory store (conftest.trained_model): the metric as loss and as evaluate
computes it, padding, predict_series = training's forward, cross-validation files, config changes,
the bundle reader."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from helpers.train import tiny_config
from pedetect.labels import EXAM_LABELS, IMAGE_LABEL, SOP, STUDY
from pedetect.metric.evaluate import evaluate_files, evaluate_frames
from pedetect.metric.loss import sigmoid
from pedetect.models.bundle import BundleError, read_bundle
from pedetect.models.layout import COMPLETE, cnn_dir, embed_dir, seq_dir
from pedetect.models.sequence import build_sequence_head, load_sequence_head, metric_loss, predict_series
from pedetect.recipe import ConfigError, apply_overrides
from pedetect.train.embed import read_series_embedding
from pedetect.train.pipeline import train
from pedetect.train.seq import collate, load_records, oof_submission, predict_records
from pedetect.train.setup import TrainError, training_inputs

pytestmark = [
    pytest.mark.xdist_group("train"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:DeprecationWarning"),
]


def test_the_training_loss_is_the_score_evaluate_gives(trained_model):
    config, labels, store, out, _ = trained_model
    records = load_records(training_inputs(config, store=store, labels=labels, out=out))
    head = build_sequence_head(config.seq, records[0].embedding.shape[1]).eval()
    batch = collate(records, "cpu")  # every series at once, padded to the longest
    with torch.no_grad():
        slice_logits, exam_logits = head(batch["embedding"], batch["mask"], batch["logit"])
        loss = metric_loss(slice_logits, exam_logits, batch["labelled"], batch["slice_target"], batch["exam_target"])
    slices = [sigmoid(slice_logits[i, : len(r.logit)].double().numpy()) for i, r in enumerate(records)]
    submission = oof_submission(records, slices, sigmoid(exam_logits.double().numpy()))
    assert evaluate_frames(labels, submission)["score"] == pytest.approx(loss.item(), abs=1e-6)


@pytest.mark.parametrize(
    "extra", [(), ("seq.fixed_length=16", "seq.neighbour_diffs=true"), ("seq.encoder=transformer", "seq.heads=2")]
)
def test_predict_series_is_the_batched_padded_forward(trained_model, extra):
    config, labels, store, out, _ = trained_model
    records = load_records(training_inputs(config, store=store, labels=labels, out=out))
    config = apply_overrides(config, list(extra))
    # Series of different lengths in one padded batch: cut two of them short.
    for r, n in zip(records[:2], (4, 7)):
        r.embedding, r.logit, r.sop, r.slice_target, r.labelled = (
            r.embedding[:n],
            r.logit[:n],
            r.sop[:n],
            r.slice_target[:n],
            r.labelled[:n],
        )
    torch.manual_seed(0)
    head = build_sequence_head(config.seq, records[0].embedding.shape[1]).eval()
    slices, exams = predict_records(head, records[:5], batch_size=5, device="cpu")
    for r, s, e in zip(records[:5], slices, exams):
        alone_slices, alone_exam = predict_series(head, r.embedding, r.logit)
        assert alone_slices.shape == (len(r.logit),) and alone_exam.shape == (len(EXAM_LABELS),)
        np.testing.assert_allclose(alone_slices, s, atol=1e-5)
        np.testing.assert_allclose(alone_exam, e, atol=1e-5)


def test_cross_validation_files_agree_with_evaluate(trained_model, tmp_path, cli):
    config, labels, store, out, result = trained_model
    cv = json.loads((out / "seq" / "cv.json").read_text())
    assert cv == result["seq"]
    labels_path = tmp_path / "labels.csv"
    labels.to_csv(labels_path, index=False)
    report = evaluate_files(labels_path, out / "seq" / "oof_predictions.csv")
    assert report["score"] == pytest.approx(cv["score"], abs=1e-9)
    assert report["n_studies"] == 12 and cv["n_slices"] == 120
    assert set(cv["labels"]) == {IMAGE_LABEL, *EXAM_LABELS}
    # pedetect check --fix on the out-of-fold predictions fixes as many exams, and evaluate gives
    # the fixed file score_consistent.
    fixed = tmp_path / "fixed.csv"
    checked = cli("check", out / "seq" / "oof_predictions.csv", "--studies", labels_path, "--fix", fixed)
    assert f"fixed {cv['exams_fixed']} studies (" in checked.stderr, checked.output
    assert evaluate_files(labels_path, fixed)["score"] == pytest.approx(cv["score_consistent"], abs=1e-9)
    # Each fold's validation score (computed from logits while training) is evaluate's on its studies.
    for k in range(3):
        metrics = json.loads((seq_dir(out, k) / "metrics.json").read_text())
        fold_oof = pd.read_csv(seq_dir(out, k) / "oof_predictions.csv")
        studies = {i.split("_")[0] for i in fold_oof["id"] if "_" in i}
        fold_report = evaluate_frames(labels[labels[STUDY].isin(studies)], fold_oof)
        assert fold_report["score"] == pytest.approx(metrics["val_score"], abs=1e-6)
    # The baselines are on the same studies; the prior is the labels' frequency.
    prior = json.loads((out / "prior.json").read_text())
    assert prior[IMAGE_LABEL] == pytest.approx(labels[IMAGE_LABEL].mean())
    assert cv["baselines"]["prior"]["slice_auc"] == 0.5
    # Stage 1 alone ranks the slices by the out-of-fold CNN logits of the embedding pass.
    stored = [read_series_embedding(p) for k in range(3) for p in embed_dir(out, k).glob("*.npz")]
    truth = labels.set_index(SOP)[IMAGE_LABEL]
    stage1_auc = roc_auc_score(
        truth.loc[np.concatenate([e.sop for e in stored])], np.concatenate([e.logit for e in stored])
    )
    assert cv["baselines"]["stage1_alone"]["slice_auc"] == pytest.approx(stage1_auc, abs=1e-9)


def test_bundle_reader(trained_model, trained_copy):
    config, labels, store, out, result = trained_model
    bundle = read_bundle(out)
    assert bundle.folds == [0, 1, 2] and bundle.embedding_dim == result["bundle"]["embedding_dim"]
    assert bundle.config == config
    assert bundle.prior == json.loads((out / "prior.json").read_text())
    head = load_sequence_head(out, 1)
    assert not head.training and head.embedding_dim == bundle.embedding_dim
    copy = trained_copy
    (seq_dir(copy, 2) / COMPLETE).unlink()
    with pytest.raises(BundleError, match=r"fold\(s\) \[2\] lack seq/fold2/COMPLETE"):
        read_bundle(copy)
    assert read_bundle(copy, allow_partial=True).folds == [0, 1]
    (copy / "prior.json").unlink()
    with pytest.raises(BundleError, match="prior.json missing"):
        read_bundle(copy)


def test_a_changed_seq_section_redoes_stage_2_only(trained_model, trained_copy):
    config, labels, store, _, _ = trained_model
    copy = trained_copy
    kept = [cnn_dir(copy, 0) / COMPLETE, embed_dir(copy, 0) / COMPLETE]
    stamps = [p.stat().st_mtime_ns for p in kept]
    old_head = (seq_dir(copy, 0) / "model.safetensors").read_bytes()
    result = train(apply_overrides(config, ["seq.hidden=8"]), store=store, labels=labels, out=copy)
    assert [p.stat().st_mtime_ns for p in kept] == stamps
    assert (seq_dir(copy, 0) / "model.safetensors").read_bytes() != old_head
    assert result["seq"] == json.loads((copy / "seq" / "cv.json").read_text()) and (copy / "bundle.json").is_file()
    # where the CNN's training started, in the bundle and in each fold's marker (random here)
    assert json.loads((copy / "bundle.json").read_text())["starting_weights"] == {"weights": "random"}
    assert json.loads((cnn_dir(copy, 0) / COMPLETE).read_text())["starting_weights"] == {"weights": "random"}
    assert load_sequence_head(copy, 0).encoder.hidden_size == 8
    # A changed stage-1 section is refused without --force.
    with pytest.raises(TrainError, match="cnn.epochs"):
        train(apply_overrides(config, ["cnn.epochs=2"]), stage="seq", store=store, labels=labels, out=copy)


def test_folds_trained_in_parallel_processes_match_one_after_another(trained_model, trained_copy):
    """runtime.parallel_folds: each fold's head in its own process (seeded by its fold alone) gives
    the heads and the cross-validation of the folds trained in turn; a fold that fails is named."""
    config, labels, store, out, result = trained_model
    copy = trained_copy
    shutil.rmtree(copy / "seq")
    parallel = train(
        apply_overrides(config, ["runtime.parallel_folds=3"]), stage="seq", store=store, labels=labels, out=copy
    )["seq"]
    assert parallel["score"] == pytest.approx(result["seq"]["score"], rel=1e-4)
    for k in range(3):
        ours, theirs = load_sequence_head(copy, k).state_dict(), load_sequence_head(out, k).state_dict()
        assert all(torch.allclose(ours[name], theirs[name], atol=1e-4) for name in theirs), k
    # Folds 0 and 1 to train again, fold 1's folder a file: its process fails, the stage says which,
    # and fold 0, trained beside it, is kept.
    shutil.rmtree(seq_dir(copy, 0)), shutil.rmtree(seq_dir(copy, 1))
    seq_dir(copy, 1).write_text("in the way")
    with pytest.raises(TrainError, match="seq fold 1 failed in its process"):
        train(apply_overrides(config, ["runtime.parallel_folds=2"]), stage="seq", store=store, labels=labels, out=copy)
    assert (seq_dir(copy, 0) / COMPLETE).is_file()


def test_stage_2_needs_every_folds_embeddings(trained_model, trained_copy):
    config, labels, store, _, _ = trained_model
    copy = trained_copy
    shutil.rmtree(embed_dir(copy, 1))
    shutil.rmtree(copy / "seq")
    with pytest.raises(TrainError, match=r"folds \[1\] have none .*embed/fold1/COMPLETE"):
        train(config, stage="seq", store=store, labels=labels, out=copy)


@pytest.mark.parametrize(
    "override, message",
    [
        ("seq.encoder=rnn", "seq.encoder"),
        ("seq.hiden=8", "unknown key 'seq.hiden'"),
        ("seq.fixed_length=1", "seq.fixed_length"),
    ],
)
def test_seq_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(override)


def test_transformer_heads_must_divide_the_width():
    with pytest.raises(ConfigError, match=r"hidden \(10\) must be a multiple of heads \(4\)"):
        tiny_config("seq.encoder=transformer", "seq.hidden=10", "seq.heads=4")
