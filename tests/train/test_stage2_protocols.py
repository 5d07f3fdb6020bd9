"""Stage 2's options for what a head learns from: ``seq.inputs`` (the whole embedding, or the
location logits alone) and ``seq.training_embeddings`` (out of fold, or the head's own CNN)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers.train import tiny_config
from pedetect.config import ConfigError
from pedetect.models.layout import embed_dir, embedding_path, read_complete, seq_dir
from pedetect.models.sequence import SequenceHead, build_sequence_head
from pedetect.recipe import apply_overrides
from pedetect.train.embed import read_series_embedding
from pedetect.train.pipeline import train
from pedetect.train.seq import load_records, training_records
from pedetect.train.setup import TrainError, training_inputs

pytestmark = [
    pytest.mark.xdist_group("train"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:DeprecationWarning"),
]


def _outputs(head: SequenceHead, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.ones(embeddings.shape[:2], dtype=torch.bool)
    with torch.no_grad():
        return head(embeddings, mask, torch.zeros(embeddings.shape[:2]))


def test_a_logits_only_head_reads_the_trailing_location_logits_and_nothing_else():
    config = tiny_config("embed.location_grid=2", "seq.inputs=logits")
    assert config.seq_input_columns == 4
    torch.manual_seed(0)
    head = build_sequence_head(config.seq, 12, input_columns=config.seq_input_columns).eval()
    embeddings = torch.randn(2, 7, 12)
    slices, exams = _outputs(head, embeddings)

    features_changed = embeddings.clone()
    features_changed[..., :8] = torch.randn(2, 7, 8) * 10  # the pooled features: ignored
    same_slices, same_exams = _outputs(head, features_changed)
    assert torch.equal(slices, same_slices) and torch.equal(exams, same_exams)

    logits_changed = embeddings.clone()
    logits_changed[..., 8:] += 3.0  # the location logits: read
    other_slices, other_exams = _outputs(head, logits_changed)
    assert (other_slices - slices).abs().max() > 1e-3 and (other_exams - exams).abs().max() > 1e-3
    # The recurrent layer is sized for the four columns and the CNN logit, not the whole embedding.
    assert head.encoder.input_size == 4 + 1


def test_the_default_head_reads_the_whole_embedding():
    config = tiny_config("embed.location_grid=2")
    assert config.seq_input_columns is None
    torch.manual_seed(0)
    head = build_sequence_head(config.seq, 12).eval()
    embeddings = torch.randn(1, 5, 12)
    changed = embeddings.clone()
    changed[..., 0] += 5.0
    assert (_outputs(head, changed)[1] - _outputs(head, embeddings)[1]).abs().max() > 1e-4


def test_a_head_with_no_input_at_all_is_refused():
    with pytest.raises(ConfigError, match="seq.inputs: logits needs embed.location_grid > 0 or seq.use_cnn_logit"):
        tiny_config("seq.inputs=logits", "seq.use_cnn_logit=false")
    with pytest.raises(ValueError, match="no input"):
        SequenceHead(8, input_columns=0, use_cnn_logit=False)


def test_own_cnn_heads_train_on_their_own_cnns_embeddings_and_validate_out_of_fold(trained_model, trained_copy):
    config, labels, store, out, _ = trained_model
    before = {k: {p.name: p.read_bytes() for p in embed_dir(out, k).glob("*.npz")} for k in range(3)}
    own = apply_overrides(config, ["seq.training_embeddings=own_cnn"])
    result = train(own, store=store, labels=labels, out=trained_copy)
    assert result["bundle"] is not None and result["seq"]["n_studies"] == 12

    all_series = sorted(labels["SeriesInstanceUID"].unique())
    inputs = training_inputs(own, store=store, labels=labels, out=trained_copy)
    oof = load_records(inputs)
    for k in range(3):
        marker = read_complete(embed_dir(trained_copy, k))
        assert marker["scope"] == "all" and marker["series"] == 12
        assert sorted(p.stem for p in embed_dir(trained_copy, k).glob("*.npz")) == all_series
        # The fold's own series were kept (the same CNN made them), the others were added.
        for name, data in before[k].items():
            assert (embed_dir(trained_copy, k) / name).read_bytes() == data
        # Head k learns from CNN k's embeddings of the other folds' series ...
        train_records = training_records(inputs, oof, k)
        assert {r.fold for r in train_records} == {0, 1, 2} - {k}
        for r in train_records:
            stored = read_series_embedding(embedding_path(trained_copy, k, r.series))
            assert np.array_equal(r.embedding, stored.embedding) and np.array_equal(r.logit, stored.logit)
        # ... and is validated on fold k's series, out of fold, as before.
        assert (seq_dir(trained_copy, k) / "oof_predictions.csv").is_file()
    # Out of fold, each series still comes from its own fold's CNN.
    for r in oof:
        assert np.array_equal(
            r.embedding, read_series_embedding(embedding_path(trained_copy, r.fold, r.series)).embedding
        )


def test_own_cnn_without_every_series_embedded_is_a_clear_error(trained_model):
    config, labels, store, out, _ = trained_model
    inputs = training_inputs(config, store=store, labels=labels, out=out)
    with pytest.raises(TrainError, match="needs fold 1's CNN to have embedded every series"):
        load_records(inputs, cnn=1)
