"""The models of ``predict``: every fold's CNN and sequence head of every bundle, averaged.

Fold k's head reads fold k's CNN embeddings (the pairing the cross-validated score measured).
Probabilities are averaged over the folds of a bundle, then over bundles (each bundle weighs the
same whatever its fold count). ``tta``: each fold also sees the series flipped left–right, and the
two are averaged, the flipped view's leftsided_pe and rightsided_pe swapped back (a mirrored series
shows the patient's left on the other side) and its location grid mirrored back.

``runtime``: each bundle's folds run in PyTorch or, when ``pedetect export`` made them, in ONNX
Runtime (fp32, or an int8 CNN); ``auto`` takes per bundle the fastest one its export found exact
enough (:func:`pedetect.models.onnx.choose_runtime`). Every runtime answers the same two calls
(``embed`` a batch of slices, ``predict_series`` one series), so batching and pairing do not change.

Bundles with a heart model (a ``heart:`` section): each fold's heart model reads the series' heart
crop (found from its Hounsfield units, :mod:`pedetect.data.heart_box`), and the bundle's stacker
re-splits that fold's P(positive) between the two RV/LV labels (:class:`pedetect.models.heart.HeartStack`).

Where the model looks: with ``embed.location_grid`` G, each CNN's embedding ends with its slice
logit on each cell of a G × G grid over its (cropped) input. The report's viewer draws those cells'
probabilities, averaged over the folds (and flip views) of the first bundle that has a grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pedetect.data.heart_box import series_heart_crop
from pedetect.infer.localise import ActivationMaps
from pedetect.labels import EXAM_LABELS, IMAGE_LABEL, SIDE_LABELS
from pedetect.metric.calibrate import first_operating_points
from pedetect.metric.loss import sigmoid
from pedetect.models.bundle import read_bundle, read_preprocessing
from pedetect.models.heart import HeartStack, load_heart_model
from pedetect.models.layout import WEIGHTS_FILE, heart_dir, heart_stack_path
from pedetect.models.onnx import choose_runtime, load_runtime_fold
from pedetect.models.sequence import load_sequence_head
from pedetect.models.slice_classifier import embed_volume, fold_batchnorm, load_slice_classifier

# EXAM_LABELS order with leftsided_pe and rightsided_pe exchanged: a flipped view's exam outputs back in place.
SIDE_SWAP = np.array(
    [
        EXAM_LABELS.index({SIDE_LABELS[0]: SIDE_LABELS[1], SIDE_LABELS[1]: SIDE_LABELS[0]}.get(label, label))
        for label in EXAM_LABELS
    ]
)


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
    location: tuple[int, float]  # (embed.location_grid, cnn.input.crop): the grid over the CNN's crop of the slice
    heart: Any = None  # (HeartCNN, HeartConfig, HeartStack) of a bundle with a heart model


class LocationView(NamedTuple):
    """How to place the location grid on a slice: G × G cells over the central square crop of side
    ``crop`` × the slice's shorter side (the CNN's input), for slices read with ``read``."""

    grid: int
    crop: float
    read: tuple


class SeriesPrediction(NamedTuple):
    """One series through the ensemble, slices in position order."""

    slices: np.ndarray  # (N,) slice PE probabilities
    exams: np.ndarray  # (9,) exam probabilities, EXAM_LABELS order
    location: np.ndarray | None  # (N, G, G) probability of each grid cell, None without a grid (see LocationView)
    maps: ActivationMaps | None = None  # where the CNNs find embolus, over the slices read with reads[0]


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
        localise: bool = True,
    ):
        if not model_dirs:
            raise ValueError("no model: give at least one --model MODEL_DIR")
        self.device = device
        self.tta = tta
        self.localise = localise  # activation maps for clot candidates (predict_series' maps)
        self.batch_size = batch_size
        self.bundles = [read_bundle(d) for d in model_dirs]
        self.preprocessing = [read_preprocessing(d) for d in model_dirs]
        self.reads = list(dict.fromkeys(preprocessing_key(p) for p in self.preprocessing))  # distinct, in order
        self.runtimes = [
            choose_runtime(bundle.path, runtime, bundle.folds, device=device) for bundle in self.bundles
        ]  # (name, why)
        self.members: list[_Member] = []
        for b, bundle in enumerate(self.bundles):
            chosen = self.runtimes[b][0]
            stack = HeartStack.load(heart_stack_path(bundle.path)) if bundle.config.heart is not None else None
            for k in bundle.folds:
                if chosen == "torch":
                    cnn = fold_batchnorm(load_slice_classifier(bundle.path, k, config=bundle.config, device=device))
                    head = load_sequence_head(bundle.path, k, config=bundle.config, device=device)
                else:
                    cnn, head = load_runtime_fold(bundle.path, k, chosen, threads=threads)
                # A lung-cropped CNN's grid lies over each series' own box, not a central crop: not drawn.
                grid = 0 if bundle.config.cnn.input.lung_crop is not None else int(bundle.config.embed.location_grid)
                location = (grid, float(bundle.config.cnn.input.crop))
                heart = None
                if stack is not None:  # small: PyTorch whatever the runtime of the CNN
                    assert bundle.config.heart is not None  # the stack is loaded only with a heart model
                    model = load_heart_model(
                        heart_dir(bundle.path, k) / WEIGHTS_FILE, bundle.config.heart, device=device
                    )
                    heart = (model, bundle.config.heart, stack)
                self.members.append(
                    _Member(
                        b,
                        k,
                        cnn,
                        head,
                        bundle.config.cnn.input,
                        preprocessing_key(self.preprocessing[b]),
                        chosen,
                        location,
                        heart,
                    )
                )
        # One grid for the viewer: members drawing on other grids or crops cannot be averaged cell by cell.
        first = next((m for m in self.members if m.location[0] > 0), None)
        self.location_view = LocationView(first.location[0], first.location[1], first.read) if first else None
        # The first bundle's operating points (pedetect calibrate), for a decision at a chosen threshold.
        self.operating_points = first_operating_points([b.path for b in self.bundles])
        labels = (IMAGE_LABEL, *EXAM_LABELS)
        self.prior = {label: float(np.mean([bundle.prior[label] for bundle in self.bundles])) for label in labels}

    @property
    def description(self) -> str:
        parts = [
            f"{bundle.path} ({len(bundle.folds)} fold{'s' if len(bundle.folds) != 1 else ''}, {bundle.config.name}, runtime {name})"
            for bundle, (name, _) in zip(self.bundles, self.runtimes)
        ]
        return ", ".join(parts) + f" on {self.device}" + (", flip TTA" if self.tta else "")

    def predict_series(self, volumes: dict[tuple, np.ndarray]) -> SeriesPrediction:
        """Slice and exam probabilities of one series, and where on each slice the CNNs see PE.

        ``volumes``: the series read with each distinct preprocessing of the bundles (:attr:`reads`),
        ``(N, H, W, 3)`` uint8 in position order.
        """
        per_bundle: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        cells: list[np.ndarray] = []
        maps: list[tuple[tuple[int, int, int, int], np.ndarray]] = []  # (region, probabilities) per member and view
        view_of_grid = self.location_view
        crops: dict[tuple, np.ndarray] = {}
        for member in self.members:
            volume = volumes[member.read]
            heart_logit = self._heart_logit(member, volume, crops) if member.heart is not None else None
            views = (
                [(volume, False), (volume[:, :, ::-1], True)] if self.tta else [(volume, False)]
            )  # flip: a view, copied batch by batch
            # Maps over the pixels the report keeps (the first reading), where the CNN can make them.
            with_map = self.localise and member.read == self.reads[0] and getattr(member.cnn, "has_map", True)
            for view, flipped in views:
                outputs = embed_volume(
                    member.cnn,
                    view,
                    member.input_config,
                    batch_size=self.batch_size,
                    device=self.device,
                    windows=member.read[0],
                    maps=with_map,
                )
                embeddings, logits = outputs[:2]
                if with_map:
                    activation, (r0, c0, r1, c1) = sigmoid(outputs[2]), outputs[3]
                    if flipped:  # back in place: the flipped slice's region is the mirror of the original's
                        width = volume.shape[2]
                        activation, (c0, c1) = activation[:, :, ::-1], (width - c1, width - c0)
                    maps.append(((r0, c0, r1, c1), activation))
                slice_logits, exam_logits = member.head.predict_series(embeddings, logits)
                if flipped:  # a mirrored series is a mirrored patient: its left is the original's right
                    exam_logits = exam_logits[SIDE_SWAP]
                exams = sigmoid(exam_logits)
                if (
                    heart_logit is not None
                ):  # RV/LV re-split by the stacker (the heart read unflipped: its sides matter)
                    exams = member.heart[2].apply(exams, heart_logit).astype(exams.dtype)
                per_bundle.setdefault(member.bundle, []).append((sigmoid(slice_logits), exams))
                if (
                    view_of_grid is not None
                    and member.location == (view_of_grid.grid, view_of_grid.crop)
                    and member.read == view_of_grid.read
                ):
                    g = view_of_grid.grid
                    # The embedding's last G² columns, row-major over the crop (SliceClassifier.embed).
                    grid = sigmoid(embeddings[:, -g * g :]).reshape(-1, g, g)
                    cells.append(grid[:, :, ::-1] if flipped else grid)  # a flipped view's columns back in place
        slices = np.mean([np.mean([s for s, _ in runs], axis=0) for runs in per_bundle.values()], axis=0)
        exams = np.mean([np.mean([e for _, e in runs], axis=0) for runs in per_bundle.values()], axis=0)
        # Probabilities, not logits, are averaged: the folds' CNNs end on different logit scales.
        location = np.mean(cells, axis=0).astype(np.float32) if cells else None
        return SeriesPrediction(slices, exams, location, _average_maps(maps))

    def _heart_logit(self, member: _Member, volume: np.ndarray, crops: dict[tuple, np.ndarray]) -> float:
        """Fold ``member``'s heart model on the series' heart crop (made once per reading and crop setting)."""
        model, heart, _ = member.heart
        key = (member.read, heart.depth, heart.size, tuple(heart.window))
        if key not in crops:
            windows = member.read[0]  # the three windows the series was read with (preprocessing_key)
            crops[key], _ = series_heart_crop(volume, windows, depth=heart.depth, size=heart.size, window=heart.window)
        return float(model.predict(crops[key][None], device=self.device)[0])


def _average_maps(maps: list[tuple[tuple[int, int, int, int], np.ndarray]]) -> ActivationMaps | None:
    """The mean of the members' maps that lie over the first one's region (within a pixel: a flipped
    view's centre crop can sit one pixel over) with its shape; other maps are left out."""
    if not maps:
        return None
    region, first = maps[0]
    same = [m for r, m in maps if m.shape == first.shape and all(abs(a - b) <= 1 for a, b in zip(r, region))]
    row0, col0, row1, col1 = region
    return ActivationMaps(np.mean(same, axis=0).astype(np.float32), (int(row0), int(col0), int(row1), int(col1)))
