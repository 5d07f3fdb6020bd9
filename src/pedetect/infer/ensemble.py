"""The models of ``predict``: every fold's CNN and sequence head of every bundle, averaged.

Fold k's head reads fold k's CNN embeddings (the pairing the cross-validated score measured).
Probabilities are averaged over the folds of a bundle, then over bundles (each bundle weighs the
same whatever its fold count). ``tta``: each fold also sees the series flipped left–right, and the
two are averaged.

``runtime``: each bundle's folds run in PyTorch or, when ``pedetect export`` made them, in ONNX
Runtime (fp32, or an int8 CNN); ``auto`` takes per bundle the fastest one its export found exact
enough (:func:`pedetect.models.onnx.choose_runtime`). Every runtime answers the same two calls
(``embed`` a batch of slices, ``predict_series`` one series), so batching and pairing do not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pedetect.labels import EXAM_LABELS, IMAGE_LABEL
from pedetect.metric.loss import sigmoid


def preprocessing_key(preprocessing: dict[str, Any]) -> tuple:
    """What the reader needs to know: the three windows and the image size."""
    return tuple(tuple(float(v) for v in w) for w in preprocessing["windows"]), preprocessing.get("image_size")


@dataclass
class _Member:
    bundle: int
    fold: int
    cnn: Any
    head: Any
    input_config: Any
    read: tuple  # preprocessing key
    runtime: str


class Ensemble:
    """Loaded once; :meth:`predict_series` maps one series' volumes to probabilities."""

    def __init__(
        self,
        model_dirs: list[str | Path],
        *,
        device: str = "cpu",
        tta: bool = False,
        batch_size: int = 32,
        runtime: str = "auto",
        threads: int | None = None,
    ):
        from pedetect.models.bundle import read_bundle, read_preprocessing
        from pedetect.models.onnx import choose_runtime, load_runtime_fold
        from pedetect.models.sequence import load_sequence_head
        from pedetect.models.slice_classifier import load_slice_classifier

        if not model_dirs:
            raise ValueError("no model: give at least one --model MODEL_DIR")
        self.device = device
        self.tta = tta
        self.batch_size = batch_size
        self.bundles = [read_bundle(d) for d in model_dirs]
        self.preprocessing = [read_preprocessing(d) for d in model_dirs]
        self.reads = list(dict.fromkeys(preprocessing_key(p) for p in self.preprocessing))  # distinct, in order
        self.runtimes = [choose_runtime(bundle.path, runtime, bundle.folds, device=device) for bundle in self.bundles]  # (name, why)
        self.members: list[_Member] = []
        for b, bundle in enumerate(self.bundles):
            chosen = self.runtimes[b][0]
            for k in bundle.folds:
                if chosen == "torch":
                    cnn = load_slice_classifier(bundle.path, k, config=bundle.config, device=device)
                    head = load_sequence_head(bundle.path, k, config=bundle.config, device=device)
                else:
                    cnn, head = load_runtime_fold(bundle.path, k, chosen, threads=threads)
                self.members.append(_Member(b, k, cnn, head, bundle.config.cnn.input, preprocessing_key(self.preprocessing[b]), chosen))
        labels = (IMAGE_LABEL, *EXAM_LABELS)
        self.prior = {label: float(np.mean([bundle.prior[label] for bundle in self.bundles])) for label in labels}

    @property
    def description(self) -> str:
        parts = [
            f"{bundle.path} ({len(bundle.folds)} fold{'s' if len(bundle.folds) != 1 else ''}, {bundle.config.name}, runtime {name})"
            for bundle, (name, _) in zip(self.bundles, self.runtimes)
        ]
        return ", ".join(parts) + f" on {self.device}" + (", flip TTA" if self.tta else "")

    def predict_series(self, volumes: dict[tuple, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Slice probabilities ``(N,)`` and exam probabilities ``(9,)`` of one series.

        ``volumes``: the series read with each distinct preprocessing of the bundles (:attr:`reads`),
        ``(N, H, W, 3)`` uint8 in position order.
        """
        from pedetect.models.slice_classifier import embed_volume

        per_bundle: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        for member in self.members:
            volume = volumes[member.read]
            views = [volume, volume[:, :, ::-1]] if self.tta else [volume]  # flip: a view, copied batch by batch
            for view in views:
                embeddings, logits = embed_volume(member.cnn, view, member.input_config, batch_size=self.batch_size, device=self.device)
                slice_logits, exam_logits = member.head.predict_series(embeddings, logits)
                per_bundle.setdefault(member.bundle, []).append((sigmoid(slice_logits), sigmoid(exam_logits)))
        slices = np.mean([np.mean([s for s, _ in runs], axis=0) for runs in per_bundle.values()], axis=0)
        exams = np.mean([np.mean([e for _, e in runs], axis=0) for runs in per_bundle.values()], axis=0)
        return slices, exams
