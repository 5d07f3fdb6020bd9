"""The heart model: RV/LV from a 3D crop of the heart, and its stacking with stage 2.

The 2nd place of the RSNA-STR challenge found that the ratio of the ventricles is best learnt by a
model that looks only at the heart. :class:`HeartCNN` is a small 2.5D (or 3D) CNN over the heart
crop of a series (:func:`pedetect.data.heart_box.heart_crop`, ``depth × size²`` in a mediastinal
window): stages of two 3×3 conv-BN-ReLU, halving the resolution between stages, then average and max pooling
(the ratio is about the chambers' extent, which average pooling keeps, and their brightest walls,
which max pooling keeps) and one logit, RV/LV ≥ 1 given a positive exam.

:class:`HeartStack` combines it with the sequence head: the head's conditional RV/LV ≥ 1
probability (``p_gte / (p_gte + p_lt)``) and the heart logit, through a logistic regression
(three numbers, fitted on out-of-fold predictions of positive exams). The stacked probability
``q`` replaces only the split of P(positive) between the two RV/LV labels —
``p_gte = P(positive) · q``, ``p_lt = P(positive) · (1 − q)`` — so the two still sum to the head's
P(positive) and the label rules hold as before.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize
from torch import nn

from pedetect.io import write_json_atomic
from pedetect.labels import EXAM_LABELS, RV_LV_LABELS
from pedetect.models.weights import load_weights, save_weights
from pedetect.recipe import HeartConfig

GTE, LT = (EXAM_LABELS.index(label) for label in RV_LV_LABELS)
EPS = 1e-6


def _conv_bn_relu(in_chans: int, out_chans: int, dims: int) -> nn.Sequential:
    conv, norm = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
    return nn.Sequential(conv(in_chans, out_chans, 3, padding=1, bias=False), norm(out_chans), nn.ReLU(inplace=True))


class HeartCNN(nn.Module):
    """(B, 1, D, S, S) heart crops in [0, 1] → (B,) RV/LV ≥ 1 logits.

    ``kind`` "2.5d": the crop's D slices are the input channels of a 2D CNN (the crop always spans
    the heart's slices, so channel d is the same level of every heart); "3d": 3D convolutions.
    Measured on the demo's data the 2.5D net learns the ratio in fewer steps at a third of the
    cost (docs/stage2_notes.md, "The heart model")."""

    def __init__(self, depth: int, widths: Sequence[int] = (16, 32, 64, 64), dropout: float = 0.2, kind: str = "2.5d"):
        super().__init__()
        if kind not in ("2.5d", "3d"):
            raise ValueError(f"heart model kind must be '2.5d' or '3d', got {kind!r}")
        self.dims = 2 if kind == "2.5d" else 3
        pool = nn.MaxPool2d(2) if self.dims == 2 else nn.MaxPool3d(2, ceil_mode=True)
        stages: list[nn.Module] = []
        previous = int(depth) if self.dims == 2 else 1
        for i, width in enumerate(int(w) for w in widths):
            layers: list[nn.Module] = [pool] if i else []
            layers += [_conv_bn_relu(previous, width, self.dims), _conv_bn_relu(width, width, self.dims)]
            stages.append(nn.Sequential(*layers))
            previous = width
        self.stages = nn.Sequential(*stages)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(2 * previous, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 0.5) / 0.25
        f = self.stages(x[:, 0] if self.dims == 2 else x)
        spatial = tuple(range(2, f.ndim))
        pooled = torch.cat([f.mean(dim=spatial), f.amax(dim=spatial)], dim=1)
        return self.out(self.drop(pooled))[:, 0]

    @torch.no_grad()
    def predict(self, crops: np.ndarray, *, batch_size: int = 16, device: str | torch.device = "cpu") -> np.ndarray:
        """Logits of uint8 crops (N, D, S, S), float32 (N,)."""
        self.eval()
        out = []
        for start in range(0, len(crops), batch_size):
            x = (
                torch.from_numpy(np.ascontiguousarray(crops[start : start + batch_size]))
                .to(device)
                .float()
                .div_(255.0)[:, None]
            )
            out.append(self(x).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def build_heart_model(heart: HeartConfig) -> HeartCNN:
    return HeartCNN(heart.depth, widths=heart.widths, dropout=heart.dropout, kind=heart.model)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0 - EPS)
    return np.log(p) - np.log1p(-p)


def rv_lv_given_positive(exam: np.ndarray) -> np.ndarray:
    """P(RV/LV ≥ 1 | positive) of exam probabilities ``exam`` (..., 9): how they split P(positive)."""
    exam = np.asarray(exam, dtype=np.float64)
    return exam[..., GTE] / np.maximum(exam[..., GTE] + exam[..., LT], EPS)


@dataclass
class HeartStack:
    """q = σ(a · logit(p_gte | positive, stage 2) + b · heart logit + c)."""

    a: float = 1.0
    b: float = 0.0
    c: float = 0.0

    def conditional(self, exam: np.ndarray, heart_logit: np.ndarray | float) -> np.ndarray:
        """The stacked P(RV/LV ≥ 1 | positive) of exam probabilities ``exam`` (..., 9)."""
        z = self.a * _logit(rv_lv_given_positive(exam)) + self.b * np.asarray(heart_logit, dtype=np.float64) + self.c
        return 1.0 / (1.0 + np.exp(-z))

    def apply(self, exam: np.ndarray, heart_logit: np.ndarray | float) -> np.ndarray:
        """Exam probabilities (..., 9) with the two RV/LV labels re-split by the stacked probability."""
        exam = np.array(exam, dtype=np.float64, copy=True)
        positive = exam[..., GTE] + exam[..., LT]
        q = self.conditional(exam, heart_logit)
        exam[..., GTE], exam[..., LT] = positive * q, positive * (1.0 - q)
        return exam

    @classmethod
    def fit(cls, exam: np.ndarray, heart_logit: np.ndarray, target: np.ndarray, *, l2: float = 1e-2) -> HeartStack:
        """Maximum likelihood (with a small L2 on a and b) on positive exams: ``exam`` (N, 9) stage-2
        probabilities, ``heart_logit`` (N,), ``target`` (N,) the RV/LV ≥ 1 label."""
        x = np.stack(
            [_logit(rv_lv_given_positive(exam)), np.asarray(heart_logit, dtype=np.float64), np.ones(len(exam))], axis=1
        )
        y = np.asarray(target, dtype=np.float64)
        if len(y) == 0 or y.min() == y.max():
            return cls()  # nothing to learn the split from: stage 2's own

        def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
            z = x @ w
            value = np.sum(np.logaddexp(0.0, z) - y * z) / len(y) + l2 * (w[0] ** 2 + w[1] ** 2) / 2.0
            p = 1.0 / (1.0 + np.exp(-z))
            grad = x.T @ (p - y) / len(y) + l2 * np.array([w[0], w[1], 0.0])
            return float(value), grad

        result = minimize(loss, np.array([1.0, 0.0, 0.0]), jac=True, method="L-BFGS-B")
        a, b, c = (float(v) for v in result.x)
        return cls(a, b, c)

    def save(self, path: str | Path, **extra) -> None:
        write_json_atomic(Path(path), {**asdict(self), **extra})

    @classmethod
    def load(cls, path: str | Path) -> HeartStack:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        values = {}
        for key in ("a", "b", "c"):
            value = data.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise ValueError(f"{path}: {key} is {value!r}, not a finite number")
            values[key] = float(value)
        return cls(**values)


def save_heart_model(model: HeartCNN, path: str | Path) -> None:
    save_weights(model, path, kind="pedetect.heart_model", metadata={})


def load_heart_model(path: str | Path, heart: HeartConfig, *, device: str | torch.device = "cpu") -> HeartCNN:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trained heart model: {path} is missing (run pedetect train --stage heart)")
    model = build_heart_model(heart)
    return load_weights(model, path).eval().to(device)
