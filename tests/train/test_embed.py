"""The out-of-fold embedding pass on a small in-memory store (conftest.trained_model): who embeds
what, format, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers.train import FakeStore, fake_labels, tiny_config
from pedetect.data.dataset import series_inputs
from pedetect.data.folds import read_folds
from pedetect.labels import SERIES, SOP, STUDY
from pedetect.models.layout import COMPLETE, cnn_dir, embed_dir, embedding_path
from pedetect.models.slice_classifier import embed_volume, fold_batchnorm, load_slice_classifier
from pedetect.train.embed import read_series_embedding, run_embed
from pedetect.train.pipeline import train
from pedetect.train.setup import TrainError, training_inputs

pytestmark = [
    pytest.mark.xdist_group("train"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:DeprecationWarning"),
]


def test_each_study_is_embedded_by_its_own_folds_cnn_only(trained_model):
    config, labels, store, out, _ = trained_model
    folds = read_folds(out / "folds.csv").set_index(STUDY)["fold"]
    cnns = [fold_batchnorm(load_slice_classifier(out, k)) for k in range(3)]  # as the pass runs them
    files = {k: sorted(p.stem for p in embed_dir(out, k).glob("*.npz")) for k in range(3)}
    series_of = labels.drop_duplicates(SERIES).set_index(SERIES)[STUDY]
    # Every labelled series exactly once, under the fold of its study.
    assert sorted(sum(files.values(), [])) == sorted(series_of.index)
    for k, names in files.items():
        assert names and all(folds[series_of[s]] == k for s in names)
    series = files[1][0]
    stored = read_series_embedding(embedding_path(out, 1, series))
    assert stored.embedding.dtype == np.float16 and stored.logit.dtype == np.float32
    assert stored.embedding.shape == (10, cnns[1].embedding_dim)
    expected_sops = store.slices[store.slices[SERIES] == series].sort_values("slice_index")[SOP].tolist()
    assert stored.sop.tolist() == expected_sops  # position order
    # The numbers are CNN 1's (which never trained on this study), not another fold's.
    volume = store.read_series(series)
    own = embed_volume(cnns[1], volume, config.cnn.input)
    other = embed_volume(cnns[0], volume, config.cnn.input)
    # Equal up to float32 summation order (the pass and this test may run on different thread
    # counts), which can move a stored float16 by one unit in the last place (~1e-3 relative);
    # another fold's CNN differs by orders of magnitude more.
    np.testing.assert_allclose(stored.embedding, own[0], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(stored.logit, own[1], rtol=1e-5, atol=1e-5)
    assert np.abs(other[1] - stored.logit).max() > 1e-3
    assert np.abs(other[0].astype(np.float32) - stored.embedding.astype(np.float32)).max() > 1e-2
    marker = json.loads((embed_dir(out, 1) / COMPLETE).read_text())
    assert marker["series"] == 4 and marker["embedding_dim"] == cnns[1].embedding_dim


def test_embed_volume_is_the_training_preprocessing_whatever_the_batch(trained_model):
    config, labels, store, out, _ = trained_model
    model = load_slice_classifier(out, 0)
    volume = store.read_series(labels[SERIES].iloc[0])
    with torch.no_grad():
        reference_embedding, reference_logit = model.embed(series_inputs(volume, config.cnn.input))
    for batch_size in (1, 3, 64):  # batch edges cut between a slice and its neighbours
        embedding, logit = embed_volume(model, volume, config.cnn.input, batch_size=batch_size)
        np.testing.assert_allclose(embedding.astype(np.float32), reference_embedding.numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(logit, reference_logit.numpy(), rtol=1e-4, atol=1e-4)


def test_a_rerun_embeds_only_what_is_missing(trained_model, trained_copy):
    config, labels, store, _, _ = trained_model
    directory = embed_dir(trained_copy, 2)
    files = sorted(directory.glob("*.npz"))
    before = {p: p.stat().st_mtime_ns for p in files}
    content = read_series_embedding(files[0])
    files[0].unlink()
    (directory / COMPLETE).unlink()  # as after a kill
    inputs = training_inputs(config, store=store, labels=labels, out=trained_copy)
    run_embed(inputs)
    assert (directory / COMPLETE).is_file()
    np.testing.assert_array_equal(read_series_embedding(files[0]).embedding, content.embedding)
    assert all(p.stat().st_mtime_ns == before[p] for p in files[1:])  # untouched
    after = {p: p.stat().st_mtime_ns for p in files}
    run_embed(inputs)  # complete: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in files} == after


def test_a_retrained_cnn_invalidates_its_embeddings(trained_model, trained_copy):
    config, labels, store, _, _ = trained_model
    copy = trained_copy
    weights = cnn_dir(copy, 0) / "model.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights))
    state["head.bias"] = state["head.bias"] + 1.0  # another CNN: every logit moves by 1
    save_file(state, str(weights))
    series = sorted(p.stem for p in embed_dir(copy, 0).glob("*.npz"))[0]
    old = read_series_embedding(embedding_path(copy, 0, series))
    run_embed(training_inputs(config, store=store, labels=labels, out=copy))
    new = read_series_embedding(embedding_path(copy, 0, series))
    np.testing.assert_allclose(new.logit, old.logit + 1.0, atol=1e-4)


def test_embedding_needs_the_cnn_first(tmp_path):
    labels = fake_labels(6, slices=6, seed=4)
    with pytest.raises(TrainError, match=r"cnn/fold0/COMPLETE"):
        train(tiny_config(), stage="embed", store=FakeStore(labels, size=32), labels=labels, out=tmp_path / "model")
