"""The competition metric: weighted binary log loss, written once.

The same functions run on numpy arrays (``pedetect evaluate``, the consistency fixer) and on torch
tensors (the stage-2 training loss, differentiable), because they only use operations that both
libraries spell the same way (``log``, ``log1p``, ``exp``, ``abs``, ``clip``, ``sum``). The one
operation they spell differently, a sum per exam, lives in :func:`_sum_per_exam`.

Score = Σ weight × BCE over every slice and every exam label of every exam, divided by Σ weight.
Slice i of exam j weighs ``IMAGE_WEIGHT × q_j`` (q_j: fraction of positive slices of exam j, from the
truth); exam label k weighs ``EXAM_WEIGHTS[k]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pedetect.labels import EXAM_LABELS, EXAM_WEIGHTS, IMAGE_WEIGHT

# Probabilities are clipped away from 0 and 1 before the log, as sklearn's log_loss did when the
# challenge was scored. float32 cannot hold 1 - 1e-15, so narrower dtypes clip at their own eps.
EPS_FLOAT64 = 1e-15

EXAM_WEIGHT_VECTOR = np.array([EXAM_WEIGHTS[label] for label in EXAM_LABELS], dtype=np.float64)


def _namespace(array: Any):
    """numpy or torch, whichever ``array`` belongs to (torch is only imported if already in use)."""
    if type(array).__module__.startswith("torch"):
        import torch

        return torch
    return np


def _clip_eps(xp, array) -> float:
    if xp is np:
        return EPS_FLOAT64 if array.dtype == np.float64 else float(np.finfo(array.dtype).eps)
    return EPS_FLOAT64 if array.dtype == xp.float64 else float(xp.finfo(array.dtype).eps)


def sigmoid(logit) -> np.ndarray:
    """Probabilities of logits, in float64 (numpy; training uses torch's own)."""
    return 1.0 / (1.0 + np.exp(-np.asarray(logit, dtype=np.float64)))


def binary_cross_entropy(target, prediction, *, from_logits: bool = False):
    """Element-wise binary cross-entropy; ``target`` may be soft (any value in [0, 1]).

    With ``from_logits`` the prediction is a logit and the computation is the numerically stable
    ``max(x, 0) − x·y + log(1 + exp(−|x|))``; otherwise a probability, clipped to [eps, 1 − eps].
    """
    xp = _namespace(prediction)
    if from_logits:
        return xp.clip(prediction, 0, None) - prediction * target + xp.log1p(xp.exp(-xp.abs(prediction)))
    eps = _clip_eps(xp, prediction)
    p = xp.clip(prediction, eps, 1 - eps)
    return -(target * xp.log(p) + (1 - target) * xp.log1p(-p))


def _sum_per_exam(values, exam_index, n_exams: int):
    """Sum of ``values`` over the slices of each exam: shape (n_exams,)."""
    xp = _namespace(values)
    if xp is np:
        return np.bincount(exam_index, weights=values, minlength=n_exams)
    out = xp.zeros(n_exams, dtype=values.dtype, device=values.device)
    return out.index_add(0, exam_index, values)


@dataclass(frozen=True)
class LossParts:
    """Numerators and denominators of the metric; arrays or 0-d tensors.

    Keeping the parts (not only the ratio) lets callers report the image and exam halves and
    combine batches or folds exactly: the metric is one ratio of sums over the whole set.
    """

    image_loss: Any  # Σ slice weight × BCE
    image_weight: Any  # Σ slice weight
    exam_loss: Any  # Σ exam-label weight × BCE
    exam_weight: Any  # Σ exam-label weight
    exam_loss_per_label: Any  # (9,) Σ over exams of BCE, unweighted, per exam label

    @property
    def score(self):
        return (self.image_loss + self.exam_loss) / (self.image_weight + self.exam_weight)

    @property
    def image_score(self):
        return self.image_loss / self.image_weight

    @property
    def exam_score(self):
        return self.exam_loss / self.exam_weight


def slice_weights(image_target, exam_index, n_exams: int):
    """Metric weight of every slice: ``IMAGE_WEIGHT × q_j`` for its exam j."""
    xp = _namespace(image_target)
    positives = _sum_per_exam(image_target, exam_index, n_exams)
    counts = _sum_per_exam(image_target * 0 + 1, exam_index, n_exams)
    q = positives / xp.clip(counts, 1, None)
    return IMAGE_WEIGHT * q[exam_index]


def weighted_log_loss_parts(
    image_target,
    image_prediction,
    exam_index,
    exam_target,
    exam_prediction,
    *,
    from_logits: bool = False,
) -> LossParts:
    """The metric's parts over a set of exams.

    image_target, image_prediction: (N,) over all slices; exam_index: (N,) integer exam of each
    slice in [0, J); exam_target, exam_prediction: (J, 9) in :data:`EXAM_LABELS` order.
    Predictions are probabilities, or logits with ``from_logits``. Differentiable in torch.
    """
    xp = _namespace(image_prediction)
    n_exams = exam_target.shape[0]
    image_w = slice_weights(image_target, exam_index, n_exams)
    image_bce = binary_cross_entropy(image_target, image_prediction, from_logits=from_logits)
    exam_bce = binary_cross_entropy(exam_target, exam_prediction, from_logits=from_logits)
    label_w = EXAM_WEIGHT_VECTOR
    if xp is not np:
        label_w = xp.as_tensor(label_w, dtype=exam_bce.dtype, device=exam_bce.device)
    return LossParts(
        image_loss=xp.sum(image_w * image_bce),
        image_weight=xp.sum(image_w),
        exam_loss=xp.sum(exam_bce * label_w),
        exam_weight=label_w.sum() * n_exams,
        exam_loss_per_label=exam_bce.sum(0),
    )


def weighted_log_loss(*args, **kwargs):
    """The competition score itself; arguments as :func:`weighted_log_loss_parts`."""
    return weighted_log_loss_parts(*args, **kwargs).score
