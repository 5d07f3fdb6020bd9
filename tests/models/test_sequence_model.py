"""The stage-2 sequence head: masking, resizing, and the metric as its loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pedetect.labels import EXAM_LABELS
from pedetect.metric.loss import weighted_log_loss
from pedetect.models.sequence import (
    CONDITIONAL_OUTPUTS,
    SequenceHead,
    conditional_exam_logits,
    metric_loss,
    neighbour_differences,
)

D = 8
LENGTHS = [5, 9, 3]
CONFIGS = [
    dict(encoder="gru", layers=2),
    dict(encoder="lstm", layers=1, neighbour_diffs=True),
    dict(encoder="transformer", layers=2, heads=2, hidden=16),
    dict(encoder="gru", fixed_length=16, neighbour_diffs=True),
    dict(encoder="gru", exam_structure="conditional"),
    dict(encoder="gru", exam_structure="conditional", exam_pooling="per_output"),
    dict(encoder="transformer", heads=2, hidden=16, exam_pooling="per_output"),
]


def batch(seed: int = 0, pad_value: float = 0.0):
    generator = torch.Generator().manual_seed(seed)
    t = max(LENGTHS)
    embeddings = torch.randn(len(LENGTHS), t, D, generator=generator)
    cnn_logits = torch.randn(len(LENGTHS), t, generator=generator)
    mask = torch.arange(t).unsqueeze(0) < torch.tensor(LENGTHS).unsqueeze(1)
    embeddings[~mask] = pad_value
    cnn_logits[~mask] = pad_value
    return embeddings, mask, cnn_logits


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_padding_never_changes_outputs(config):
    torch.manual_seed(0)
    head = SequenceHead(D, **config).eval()
    embeddings, mask, cnn_logits = batch()
    slice_logits, exam_logits = head(embeddings, mask, cnn_logits)
    assert slice_logits.shape == mask.shape and exam_logits.shape == (len(LENGTHS), len(EXAM_LABELS))
    # Garbage in the padded positions: real slices and exams come out the same.
    garbage_embeddings, _, garbage_logits = batch(pad_value=1e3)
    slice2, exam2 = head(garbage_embeddings, mask, garbage_logits)
    torch.testing.assert_close(slice2[mask], slice_logits[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(exam2, exam_logits, atol=1e-5, rtol=1e-5)
    assert torch.all(slice_logits[~mask] == 0)
    # A series alone gives the same as within the padded batch (no leakage between series).
    alone_slice, alone_exam = head(embeddings[2:, :3], mask[2:, :3], cnn_logits[2:, :3])
    torch.testing.assert_close(alone_slice[0], slice_logits[2, :3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone_exam[0], exam_logits[2], atol=1e-5, rtol=1e-5)


def test_padded_inputs_get_no_gradient():
    head = SequenceHead(D, encoder="gru")
    embeddings, mask, cnn_logits = batch()
    embeddings.requires_grad_(True)
    slice_logits, exam_logits = head(embeddings, mask, cnn_logits)
    targets = (torch.rand(mask.shape) < 0.3).float()
    loss = metric_loss(slice_logits, exam_logits, mask, targets, torch.ones(len(LENGTHS), len(EXAM_LABELS)))
    loss.backward()
    assert embeddings.grad[~mask].abs().max() == 0
    assert embeddings.grad[mask].abs().max() > 0


def test_neighbour_differences_at_series_ends():
    features = torch.tensor([[[1.0], [3.0], [6.0], [0.0]]])
    mask = torch.tensor([[True, True, True, False]])
    out = neighbour_differences(features, mask)
    # [f, f - prev, f - next]; the first slice has no previous, the last real one no next.
    assert out[0, :3].tolist() == [[1, 0, -2], [3, 2, -3], [6, 3, 0]]


def test_metric_loss_equals_the_evaluation_metric():
    embeddings, mask, cnn_logits = batch(3)
    head = SequenceHead(D, encoder="lstm")
    slice_logits, exam_logits = head(embeddings, mask, cnn_logits)
    slice_targets = (torch.rand(mask.shape) < 0.4).float()
    exam_targets = (torch.rand(len(LENGTHS), len(EXAM_LABELS)) < 0.5).float()
    loss = metric_loss(slice_logits, exam_logits, mask, slice_targets, exam_targets)
    # The same numbers through the numpy metric of `pedetect evaluate`, from probabilities.
    sigmoid = lambda t: torch.sigmoid(t.double()).detach().numpy()  # noqa: E731
    exam_index = np.repeat(np.arange(len(LENGTHS)), LENGTHS)
    reference = weighted_log_loss(
        slice_targets[mask].double().numpy(),
        sigmoid(slice_logits[mask]),
        exam_index,
        exam_targets.double().numpy(),
        sigmoid(exam_logits),
    )
    assert loss.item() == pytest.approx(reference, abs=1e-6)


def test_head_learns_a_toy_problem():
    """Slices whose first feature is high are positive; an exam is positive when any slice is."""
    torch.manual_seed(1)
    generator = torch.Generator().manual_seed(1)
    n, t = 64, 12
    embeddings = torch.randn(n, t, D, generator=generator)
    lengths = torch.randint(4, t + 1, (n,), generator=generator)
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    slice_targets = ((embeddings[..., 0] > 1.0) & mask).float()
    exam_targets = torch.zeros(n, len(EXAM_LABELS))
    positive = slice_targets.amax(1)
    exam_targets[:, EXAM_LABELS.index("negative_exam_for_pe")] = 1 - positive
    exam_targets[:, EXAM_LABELS.index("central_pe")] = positive
    head = SequenceHead(D, encoder="gru", hidden=32, use_cnn_logit=False)
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        optimiser.zero_grad()
        loss = metric_loss(*head(embeddings, mask), mask, slice_targets, exam_targets)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[0] > 0.55 and losses[-1] < 0.25 * losses[0]


def test_conditional_exam_logits_multiply_out_and_obey_the_rules():
    generator = torch.Generator().manual_seed(3)
    outputs = torch.randn(200, len(CONDITIONAL_OUTPUTS), generator=generator) * 4
    outputs[0], outputs[1] = 60.0, -60.0  # saturated: logits stay finite
    p = torch.sigmoid(conditional_exam_logits(outputs).double())
    q = {name: torch.sigmoid(outputs[:, i].double()) for i, name in enumerate(CONDITIONAL_OUTPUTS)}
    column = {label: p[:, i] for i, label in enumerate(EXAM_LABELS)}
    positive = q["positive"]
    torch.testing.assert_close(
        column["negative_exam_for_pe"], (1 - positive) * (1 - q["indeterminate_if_not_positive"]), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        column["indeterminate"], (1 - positive) * q["indeterminate_if_not_positive"], atol=1e-6, rtol=0
    )
    torch.testing.assert_close(column["central_pe"], positive * q["central_pe_if_positive"], atol=1e-6, rtol=0)
    torch.testing.assert_close(column["leftsided_pe"], positive * q["leftsided_pe_if_positive"], atol=1e-6, rtol=0)
    # Exactly one RV/LV label of a positive exam; negative + indeterminate + positive = 1.
    torch.testing.assert_close(column["rv_lv_ratio_gte_1"] + column["rv_lv_ratio_lt_1"], positive, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        column["negative_exam_for_pe"] + column["indeterminate"] + positive,
        torch.ones(200, dtype=torch.float64),
        atol=1e-6,
        rtol=0,
    )
    assert torch.isfinite(conditional_exam_logits(outputs)).all()
    # No positive-only label above its exam's P(positive): a confident negative exam is consistent.
    for label in ("rv_lv_ratio_gte_1", "central_pe", "rightsided_pe", "chronic_pe", "acute_and_chronic_pe"):
        assert (column[label] <= positive + 1e-9).all()
    # Gradients flow in the saturated tails too (log space).
    x = outputs.clone().requires_grad_(True)
    conditional_exam_logits(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_per_output_pooling_gives_each_exam_output_its_own_slices():
    """With per-output attention, output k's logit is row k of the head on [attention_k pooling, max
    pooling]: steering one output's attention changes that output alone."""
    torch.manual_seed(0)
    head = SequenceHead(D, encoder="gru", hidden=6, exam_pooling="per_output").eval()
    embeddings, mask, cnn_logits = batch(5)
    _, before = head(embeddings, mask, cnn_logits)
    with torch.no_grad():
        head.attention.weight[3] += 5.0 * torch.randn(head.attention.weight.shape[1])
    _, after = head(embeddings, mask, cnn_logits)
    changed = (after - before).abs().amax(0) > 1e-6
    assert changed.tolist() == [k == 3 for k in range(len(EXAM_LABELS))]
    # The shared head's attention has one row; per_output one per exam output.
    assert SequenceHead(D, exam_pooling="shared").attention.out_features == 1
    assert head.attention.out_features == len(EXAM_LABELS)
    with pytest.raises(ValueError, match="exam_pooling"):
        SequenceHead(D, exam_pooling="mean")
