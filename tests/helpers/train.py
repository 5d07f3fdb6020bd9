"""Shared helpers of the training tests: a tiny in-memory slice store and labels for it, tiny
configs, the real chain's inputs. ``pedetect`` run as a process: helpers/processes.py.

The real chain (synth → prepare → train) is exercised by tests/train/test_train.py; FakeStore makes
the unit tests of datasets, samplers and the training loop independent of the DICOM side and fast.
Fixtures built from these (the trained model several files share) are in tests/conftest.py.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from pedetect.demo import run as demo
from pedetect.labels import EXAM_LABELS, IMAGE_LABEL, SERIES, SOP, STUDY, TRAIN_COLUMNS


class FakeStore:
    """Store-like (``.slices``, ``.read_slice``): a bright artery disc per slice, with a dark
    filling defect on positive slices; three channels like the store's three windows."""

    def __init__(self, labels: pd.DataFrame, size: int = 48, seed: int = 0):
        self.size = size
        self.seed = seed
        frame = labels[[STUDY, SERIES, SOP, IMAGE_LABEL]].copy()
        frame["slice_index"] = frame.groupby(SERIES).cumcount()
        frame["z"] = frame["slice_index"] * 2.5
        frame["height"] = frame["width"] = size
        self.slices = frame.drop(columns=[IMAGE_LABEL]).reset_index(drop=True)
        self._positive = dict(zip(zip(frame[SERIES], frame["slice_index"]), frame[IMAGE_LABEL].astype(bool)))

    def _geometry(self, series_uid: str, slice_index: int):
        """(generator after the noise, artery centre, radius, defect mask or None) of one slice."""
        key = (series_uid, int(slice_index))
        if key not in self._positive:
            raise KeyError(key)
        rng = np.random.default_rng([self.seed, zlib.crc32(series_uid.encode()), int(slice_index)])
        s = self.size
        noise = rng.normal(0, 8, (s, s))
        cy, cx = rng.uniform(0.35 * s, 0.65 * s, 2)
        radius = s * 0.16
        defect = None
        if self._positive[key]:
            dy, dx = rng.uniform(-0.4 * radius, 0.4 * radius, 2)
            yy, xx = np.mgrid[:s, :s]
            defect = (yy - cy - dy) ** 2 + (xx - cx - dx) ** 2 < (0.45 * radius) ** 2
        return noise, (cy, cx), radius, defect

    def read_slice(self, series_uid: str, slice_index: int) -> np.ndarray:
        noise, (cy, cx), radius, defect = self._geometry(series_uid, slice_index)
        s = self.size
        yy, xx = np.mgrid[:s, :s]
        image = np.full((s, s), 60.0) + noise
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = 200
        if defect is not None:
            image[defect] = 70
        image = np.clip(image, 0, 255)
        return np.stack([image * 0.8, image, np.clip(image * 1.2, 0, 255)], axis=2).astype(np.uint8)

    def defect_box(self, series_uid: str, slice_index: int) -> tuple[int, int, int, int] | None:
        """The inclusive ``(row_min, row_max, col_min, col_max)`` of a positive slice's filling defect
        (None on a negative slice): the clot truth ``pedetect synth`` would write for it."""
        defect = self._geometry(series_uid, slice_index)[3]
        if defect is None:
            return None
        rows, cols = np.nonzero(defect)
        return int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())

    def clots_frame(self) -> pd.DataFrame:
        """Every defect as clots.csv rows (one embolus per study, visible on every positive slice)."""
        rows = []
        for study, series, index in self.slices[[STUDY, SERIES, "slice_index"]].itertuples(index=False):
            box = self.defect_box(series, index)
            if box is not None:
                rows.append((study, series, 1, index, *box, (box[1] - box[0] + 1) * (box[3] - box[2] + 1), "right", 1))
        columns = [STUDY, SERIES, "embolus", "slice_index", "row_min", "row_max", "col_min", "col_max"]
        return pd.DataFrame(rows, columns=[*columns, "pixels", "side", "visible"])

    def read_series(self, series_uid: str) -> np.ndarray:
        n = int((self.slices[SERIES] == series_uid).sum())
        return np.stack([self.read_slice(series_uid, i) for i in range(n)])


def fake_labels(n_studies: int, slices: int = 12, seed: int = 0, prefix: str = "s") -> pd.DataFrame:
    """RSNA-columned labels: about half the studies positive, with a run of positive slices."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_studies):
        positive = s % 2 == 0
        image = np.zeros(slices, dtype=int)
        if positive:
            start = int(rng.integers(0, slices // 2))
            image[start : start + int(rng.integers(slices // 4, slices // 2 + 1))] = 1
        exam = dict.fromkeys(EXAM_LABELS, 0)
        if positive:
            exam["rightsided_pe"] = 1
            exam["rv_lv_ratio_lt_1"] = 1
            exam["central_pe"] = int(rng.random() < 0.5)
        else:
            exam["negative_exam_for_pe"] = 1
        for i in range(slices):
            row = dict.fromkeys(TRAIN_COLUMNS, 0)
            row.update(
                {
                    STUDY: f"{prefix}{seed}.{s}",
                    SERIES: f"{prefix}{seed}.{s}.1",
                    SOP: f"{prefix}{seed}.{s}.1.{i}",
                    IMAGE_LABEL: int(image[i]),
                }
            )
            row.update(exam)
            rows.append(row)
    return pd.DataFrame(rows, columns=list(TRAIN_COLUMNS))


def synthetic_chain(
    root,
    *,
    n_train: int,
    n_val: int,
    size: int = 128,
    slices: int | None = 40,
    workers: int = 2,
    min_embolus_pixels: int = 0,
):
    """The real chain's inputs: synthetic studies (training seed 1, validation seed 2) prepared into one
    slice store. Returns (store, labels.csv, folds.csv) with the validation studies as fold 0."""
    import shutil

    from pedetect.store import prepare
    from pedetect.synth import write_dataset

    root = Path(root)
    dicom = root / "dicom"
    frames = []
    for name, n, seed in (("train", n_train, 1), ("val", n_val, 2)):
        frame = write_dataset(
            root / name,
            n,
            slices=slices,
            size=size,
            seed=seed,
            positive_fraction=demo.PROFILES["conspicuous"].positive_fraction,
            min_embolus_pixels=min_embolus_pixels,
            progress=False,
        )
        shutil.move(str(root / name / "train"), str(dicom / name))  # DICOM only under dicom/
        frame["fold"] = 0 if name == "val" else 1
        frames.append(frame)
    labels = pd.concat(frames, ignore_index=True)
    folds = labels[[STUDY, "fold"]].drop_duplicates(STUDY)
    assert folds[STUDY].is_unique, "training and validation seeds made the same study UIDs"
    labels_path, folds_path = root / "labels.csv", root / "folds.csv"
    labels.drop(columns=["fold"]).to_csv(labels_path, index=False)
    folds.to_csv(folds_path, index=False)
    prepare(dicom, root / "store", workers=workers, progress=False, echo=lambda message: None)
    return root / "store", labels_path, folds_path


# A CNN small enough for unit tests on FakeStore data (seconds per fold on a CPU), and a sequence head to match.
TINY_TRAINING = [
    "cnn.backbone.name=resnet10t",
    "cnn.backbone.kwargs={channels: [16, 32, 64, 128], stem_width: 16}",
    "cnn.input.image_size=32",
    "cnn.batch_size=16",
    "cnn.epochs=1",
    "data.num_workers=0",
    "data.folds=3",
    "logging.progress_bar=false",
    "embed.num_workers=0",
    "seq.hidden=16",
    "seq.epochs=3",
    "seq.batch_size=4",
]


def tiny_config(*extra: str):
    """The default experiment with :data:`TINY_TRAINING` and ``extra`` overrides."""
    from pedetect.recipe import ExperimentConfig, apply_overrides

    return apply_overrides(ExperimentConfig(), TINY_TRAINING + list(extra))


# The synthetic studies of the real-chain tests (tests/train/test_train.py): pedetect demo's data.
DEMO_CHAIN = dict(
    n_train=120,
    n_val=30,
    size=demo.SIZE,
    slices=demo.SLICES,
    min_embolus_pixels=demo.PROFILES["conspicuous"].min_embolus_pixels,
)


def fold_slice_auc(out, fold: int, store, labels: pd.DataFrame) -> float:
    """Slice AUC of MODEL_DIR ``out``'s exported CNN of ``fold`` on that fold's validation studies
    (``out/folds.csv``), computed here in one process, series by series: what the fold's
    ``metrics.json`` must record as ``val_auc``. ``store``: a SliceStore or FakeStore."""
    from sklearn.metrics import roc_auc_score

    from pedetect.data.folds import read_folds
    from pedetect.models.slice_classifier import embed_volume, load_slice_classifier
    from pedetect.recipe import load_experiment

    config = load_experiment(Path(out) / "config.yaml")
    model = load_slice_classifier(out, fold)
    folds = read_folds(Path(out) / "folds.csv")
    studies = set(folds.loc[folds["fold"] == fold, STUDY])
    truth = labels[labels[STUDY].isin(studies)].set_index(SOP)[IMAGE_LABEL]
    targets, logits = [], []
    for series, rows in store.slices[store.slices[STUDY].isin(studies)].groupby(SERIES):
        logits.append(embed_volume(model, store.read_series(series), config.cnn.input)[1])
        targets.append(truth.loc[rows.sort_values("slice_index")[SOP]].to_numpy())
    return float(roc_auc_score(np.concatenate(targets), np.concatenate(logits)))
