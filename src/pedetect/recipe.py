"""Experiment configuration: typed, validated models of the YAML recipes in ``configs/``.

This module is the one place where every setting and its default is written down. A recipe only
states what it changes; an unknown or misspelt key anywhere is an error naming the key, the file
and the allowed keys. The resolved config (defaults filled in) is saved as ``MODEL_DIR/config.yaml``
and is what later stages and ``predict`` rebuild the models from.

Layout (top-level sections)::

    name, source, seed
    data:     folds and loading, shared by every stage
    runtime:  devices, nodes, precision (shared by every stage)
    logging:  CSV always; TensorBoard, Weights & Biases (offline), MLflow when configured
    cnn:      stage 1, the slice CNN (backbone, input, augmentation, targets, loss, sampling,
              optimiser, schedule, epochs)
    embed:    the out-of-fold embedding pass between the stages (batch size, reader processes)
    seq:      stage 2, the sequence head over each series' slice embeddings (encoder, inputs,
              optimiser, schedule, epochs); :class:`OptimizerConfig`, :class:`SchedulerConfig`
              are shared with ``cnn``
    heart:    optional, the RV/LV heart model (crop, 3D CNN, training) stacked on stage 2

Single values can be overridden from the command line: ``--set cnn.optimizer.lr=3e-4``
(:func:`apply_overrides`); the value is read as YAML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from pedetect.config import ConfigError, StrictModel, allowed_keys, read_yaml, validate_config
from pedetect.io import write_text_atomic
from pedetect.labels import EXAM_LABELS

__all__ = ["ConfigError", "ExperimentConfig", "load_experiment", "apply_overrides", "save_config"]


class Section(StrictModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment."""


# --------------------------------------------------------------------------------------------------
# Shared sections


class DataConfig(Section):
    folds: int = Field(default=5, ge=2, description="Number of cross-validation folds when pedetect makes them itself.")
    fold_seed: int = Field(
        default=42, description="Seed of the fold split (the folds are grouped by study, stratified on exam labels)."
    )
    num_workers: int = Field(default=4, ge=0, description="DataLoader worker processes per device.")
    val_batch_size: int | None = Field(
        default=None, ge=1, description="Validation batch size; default: 2 × the training batch size."
    )


class RuntimeConfig(Section):
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = Field(
        default="auto", description="Lightning accelerator."
    )
    devices: int | Literal["auto"] | list[int] = Field(
        default="auto", description="Devices per node (an int, a list of ids, or 'auto')."
    )
    num_nodes: int = Field(
        default=1, ge=1, description="Number of nodes (DDP across nodes; launch with torchrun or SLURM)."
    )
    strategy: Literal["auto", "ddp", "ddp_find_unused_parameters_true"] = Field(
        default="auto", description="'auto' uses DDP whenever more than one device is used."
    )
    precision: Literal["auto", "32-true", "16-mixed", "bf16-mixed"] = Field(
        default="auto", description="'auto': bf16-mixed on GPUs that support it, else 16-mixed on GPU, 32-true on CPU."
    )
    deterministic: bool = Field(default=False, description="Ask PyTorch for deterministic algorithms (slower on GPU).")
    parallel_folds: int = Field(
        default=1,
        ge=1,
        description="On a CPU: stage 1, the embedding pass and stage 2 run this many folds at once, each in its "
        "own process with an equal share of the cores that reads its own data (small networks use a second core "
        "poorly); 1: one fold after another in this process. GPUs and several devices always take folds in turn.",
    )


class WandbConfig(Section):
    project: str = "pedetect"
    offline: bool = Field(
        default=True, description="Offline runs are written under MODEL_DIR and synced later with `wandb sync`."
    )


class MlflowConfig(Section):
    experiment: str = "pedetect"
    tracking_uri: str | None = Field(default=None, description="Default: a file store under MODEL_DIR/mlruns.")


class LoggingConfig(Section):
    tensorboard: bool = Field(default=False, description="Also log to TensorBoard (needs the tensorboard package).")
    wandb: WandbConfig | None = Field(default=None, description="Also log to Weights & Biases (needs wandb).")
    mlflow: MlflowConfig | None = Field(default=None, description="Also log to MLflow (needs mlflow).")
    progress_bar: bool = True
    log_every_n_steps: int = Field(default=20, ge=1)


class OptimizerConfig(Section):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(default=1e-3, gt=0, description="Peak learning rate (after warm-up).")
    weight_decay: float = Field(default=1e-2, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = Field(default=0.9, ge=0, description="SGD only.")


class SchedulerConfig(Section):
    name: Literal["cosine", "linear", "step", "constant"] = Field(
        default="cosine",
        description="LR curve per optimiser step after warm-up: cosine or linear decay to min_lr_ratio, step decay, or constant.",
    )
    warmup_epochs: float = Field(default=0.0, ge=0, description="Linear warm-up from 0, in (fractional) epochs.")
    min_lr_ratio: float = Field(
        default=0.0, ge=0, le=1, description="cosine, linear: final LR as a fraction of the peak."
    )
    step_epochs: float = Field(default=1.0, gt=0, description="step: multiply the LR by gamma every step_epochs.")
    gamma: float = Field(default=0.1, gt=0, le=1, description="step: decay factor.")
    step_steps: int | None = Field(
        default=None,
        ge=1,
        description="step: multiply the LR by gamma every this many optimiser steps instead of every step_epochs "
        "(5th place: 0.99 every 500 steps).",
    )


# --------------------------------------------------------------------------------------------------
# Stage 1: the slice CNN


class BackboneConfig(Section):
    name: str = Field(default="resnet10t", description="Any timm model name (timm.list_models()).")
    weights: Literal["pretrained"] | Path | None = Field(
        default=None,
        description="pretrained: timm's pretrained weights of the name's tag (fetched and cached by timm; offline: its cache, "
        "HF_HUB_OFFLINE=1); a path: local weights (.safetensors or a torch state dict); none: random init.",
    )
    drop_rate: float = Field(default=0.0, ge=0, lt=1, description="Dropout before the classifier.")
    drop_path_rate: float = Field(
        default=0.0, ge=0, lt=1, description="Stochastic depth, where the backbone supports it."
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments for timm.create_model.")


class LungCropConfig(Section):
    """Crop each series to its lungs (computed from Hounsfield units, pedetect.data.lung_box) before the resize."""

    margin: float = Field(
        default=0.05, ge=0, le=0.5, description="Added on each side of the lungs' box, as a fraction of the slice side."
    )
    min_side: float = Field(
        default=0.3, gt=0, le=1, description="The box is at least this fraction of the slice wide and high."
    )
    tissue_hu: float = Field(default=-500.0, description="Above: the body.")
    air_hu: float = Field(default=-400.0, description="Below, inside the body: lung and airway.")
    min_region: float = Field(
        default=0.1, gt=0, le=1, description="Air regions smaller than this × the largest are not lung (bowel gas)."
    )


class InputConfig(Section):
    mode: Literal["windows", "pe", "adjacent", "both"] = Field(
        default="windows",
        description="windows: lung/PE/mediastinal windows of one slice (3 ch); pe: the PE window of one slice (1 ch); "
        "adjacent: PE window of slices z-1, z, z+1 (3 ch, 1st/2nd places); both: the three windows of z-1, z, z+1 (9 ch).",
    )
    crop: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="Central square crop before the resize, as a fraction of the shorter side (1: the whole slice). "
        "A fixed stand-in for the 1st place's lung crop: it spends the pixels on the chest, where the pulmonary arteries are.",
    )
    lung_crop: LungCropConfig | None = Field(
        default=None,
        description="Crop every slice to its series' lung box (air inside the body, union over the series' slices, a margin), "
        "then resize (1st place; they regressed the box with a CNN). The boxes of the training series are recorded in "
        "MODEL_DIR/lung_boxes.json; predict computes each series' box the same way. None: off.",
    )
    image_size: int = Field(default=512, ge=16, description="Square side the (cropped) slice is resized to.")
    mean: float = Field(
        default=0.456,
        description="Input normalisation: (pixel/255 - mean) / std on every channel (ImageNet's middle values).",
    )
    std: float = Field(default=0.224, gt=0)

    @property
    def channels(self) -> int:
        return {"windows": 3, "pe": 1, "adjacent": 3, "both": 9}[self.mode]

    @model_validator(mode="after")
    def _one_crop(self) -> InputConfig:
        if self.lung_crop is not None and self.crop < 1:
            raise ValueError("crop and lung_crop both crop the slice: set crop to 1 with lung_crop")
        return self


class ShiftScaleRotateConfig(Section):
    p: float = Field(default=0.0, ge=0, le=1)
    shift: float = Field(default=0.0625, ge=0, description="Max shift as a fraction of the side.")
    scale: float = Field(default=0.1, ge=0, lt=1, description="Scale drawn from [1-scale, 1+scale].")
    rotate: float = Field(default=15.0, ge=0, le=180, description="Max rotation in degrees.")
    border: Literal["constant", "reflect"] = Field(
        default="constant", description="Outside the slice: 0, or the slice mirrored."
    )


class BrightnessContrastConfig(Section):
    p: float = Field(default=0.0, ge=0, le=1)
    brightness: float = Field(default=0.2, ge=0, description="Added offset drawn from [-b, b] × 255.")
    contrast: float = Field(
        default=0.2,
        ge=0,
        lt=1,
        description="Gain on pixel values drawn from [1-c, 1+c] (albumentations: brightness_by_max).",
    )


class CutoutConfig(Section):
    p: float = Field(default=0.0, ge=0, le=1)
    holes: int = Field(default=1, ge=1, description="Number of rectangles set to 0.")
    size: float = Field(
        default=0.2, gt=0, le=1, description="Max side of each rectangle, as a fraction of the image side."
    )
    fixed_size: bool = Field(
        default=False,
        description="Every rectangle exactly size × size (albumentations' Cutout); false: sides drawn up to size.",
    )


class GridDropoutConfig(Section):
    p: float = Field(default=0.0, ge=0, le=1)
    ratio: float = Field(
        default=0.5, gt=0, lt=1, description="Side of each dropped square as a fraction of its grid unit."
    )
    unit_min: float = Field(
        default=0.125, gt=0, le=1, description="Smallest grid unit, as a fraction of the image side."
    )
    unit_max: float = Field(default=0.25, gt=0, le=1, description="Largest grid unit, as a fraction of the image side.")

    @model_validator(mode="after")
    def _units(self) -> GridDropoutConfig:
        if self.unit_min > self.unit_max:
            raise ValueError(f"unit_min ({self.unit_min}) is larger than unit_max ({self.unit_max})")
        return self


class AugmentConfig(Section):
    hflip: float = Field(default=0.0, ge=0, le=1, description="Probability of a left-right flip.")
    vflip: float = Field(default=0.0, ge=0, le=1, description="Probability of an up-down flip.")
    rotate90: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Probability of a rotation by 90, 180 or 270 degrees (exact, no interpolation).",
    )
    shift_scale_rotate: ShiftScaleRotateConfig = Field(default_factory=ShiftScaleRotateConfig)
    brightness_contrast: BrightnessContrastConfig = Field(default_factory=BrightnessContrastConfig)
    cutout: CutoutConfig = Field(default_factory=CutoutConfig)
    grid_dropout: GridDropoutConfig = Field(default_factory=GridDropoutConfig)
    dropout_one_of: bool = Field(
        default=False,
        description="cutout and grid_dropout as alternatives (albumentations OneOf): a sample gets cutout with probability "
        "cutout.p, else grid dropout with probability grid_dropout.p, never both (the two p must sum to at most 1).",
    )

    @model_validator(mode="after")
    def _one_of(self) -> AugmentConfig:
        if self.dropout_one_of and self.cutout.p + self.grid_dropout.p > 1:
            raise ValueError(
                f"dropout_one_of: cutout.p + grid_dropout.p is {self.cutout.p + self.grid_dropout.p}, more than 1"
            )
        return self


class TargetsConfig(Section):
    exam_labels: list[str] = Field(
        default_factory=list,
        description="Exam labels also predicted per slice, trained on positive slices only (5th place); empty: slice label only.",
    )
    whole_exam_labels: list[str] = Field(
        default_factory=list,
        description="Exam labels also predicted per slice, trained on every slice of positive exams: findings seen away "
        "from the emboli, such as the RV/LV ratio at the heart (stage 2 pools them over the series).",
    )
    exam_weight: float = Field(
        default=1.0, ge=0, description="Weight of the exam-label loss relative to the slice loss."
    )
    exam_label_weights: Literal["mean", "metric"] = Field(
        default="mean",
        description="mean: the exam loss is the mean over every trained (slice, label) entry; metric: each label's loss times "
        "its weight in the competition metric, summed over labels and averaged over the slices that train them (5th place).",
    )

    @field_validator("exam_labels", "whole_exam_labels")
    @classmethod
    def _known_labels(cls, value: list[str]) -> list[str]:
        unknown = [label for label in value if label not in EXAM_LABELS]
        if unknown:
            raise ValueError(f"unknown exam label(s) {unknown}; allowed: {', '.join(EXAM_LABELS)}")
        if len(set(value)) != len(value):
            raise ValueError("exam labels repeat")
        return value

    @model_validator(mode="after")
    def _disjoint(self) -> TargetsConfig:
        both = sorted(set(self.exam_labels) & set(self.whole_exam_labels))
        if both:
            raise ValueError(
                f"{both} in both exam_labels and whole_exam_labels; a label is trained on one set of slices"
            )
        return self

    @property
    def head_labels(self) -> tuple[str, ...]:
        """The exam labels of the CNN's head, after the slice label: exam_labels, then whole_exam_labels."""
        return (*self.exam_labels, *self.whole_exam_labels)


class LossConfig(Section):
    kind: Literal["bce", "focal"] = "bce"
    focal_alpha: float | None = Field(
        default=0.25, ge=0, le=1, description="focal: weight of positives (None: no weighting)."
    )
    focal_gamma: float = Field(default=2.0, ge=0, description="focal: focusing exponent.")
    slice_weight: float = Field(
        default=1.0,
        gt=0,
        description="Factor on the slice-label loss (5th place: 2.5 beside metric-weighted exam labels).",
    )
    clot_map_weight: float = Field(
        default=0.0,
        ge=0,
        description="Factor on a dense loss that teaches the CNN's activation map the training emboli's boxes "
        "(pedetect train --clots: pedetect synth's clots.csv, its visible rows); 0: slice labels alone.",
    )


class SamplingConfig(Section):
    mode: Literal["all", "balanced", "per_study"] = Field(
        default="all",
        description="all: every training slice once per epoch, shuffled; balanced: samples_per_epoch slices, positive_share "
        "of them positive; per_study (5th place): study_slices random slices of every study, plus positive slices (at most "
        "study_positives per study) up to positive_share × the negatives among those.",
    )
    study_slices: int = Field(
        default=2, ge=1, description="per_study: slices drawn from every training study per epoch."
    )
    study_positives: int = Field(
        default=8, ge=0, description="per_study: most positive slices added from one study per epoch."
    )
    positive_share: float = Field(
        default=0.25, gt=0, lt=1, description="balanced: expected share of positive slices per epoch."
    )
    samples_per_epoch: int | None = Field(
        default=None, ge=1, description="balanced: slices per epoch; default: the training set size."
    )


class HeadConfig(Section):
    pool: Literal["backbone", "gem"] = Field(
        default="backbone",
        description="backbone: the backbone's own global pooling; gem: generalised mean pooling, p = 3 (4th place).",
    )
    hidden: int = Field(
        default=0,
        ge=0,
        description="0: one linear layer on the pooled features; n: dropout, n units, BatchNorm, ReLU, then the output layer (4th place: 256).",
    )


class CnnConfig(Section):
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    input: InputConfig = Field(default_factory=InputConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    targets: TargetsConfig = Field(default_factory=TargetsConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    epochs: int = Field(default=3, ge=1)
    batch_size: int = Field(default=32, ge=1, description="Per device.")
    accumulate_grad_batches: int = Field(
        default=1, ge=1, description="Effective batch = batch_size × accumulate × devices × nodes."
    )
    gradient_clip_norm: float | None = Field(
        default=None, gt=0, description="Clip the global gradient norm (none: no clipping)."
    )
    ema_decay: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="Validate and export an exponential moving average of the weights with this decay per "
        "optimiser step (0.99: about the last 100 steps); none: the weights as trained.",
    )
    monitor: Literal["val_auc", "val_loss"] = Field(
        default="val_auc", description="Metric that picks the best epoch (exported weights)."
    )
    export: Literal["best", "last"] = Field(
        default="best", description="Which epoch's weights become model.safetensors."
    )
    validation: Literal["every_epoch", "last_epoch"] = Field(
        default="every_epoch",
        description="every_epoch: validate after each epoch (the learning curve; best picks among them); "
        "last_epoch: only after the last (the exported weights are the last epoch's; saves a pass over the "
        "validation slices per epoch). Checkpoints for resume are written after every epoch either way.",
    )
    keep_checkpoints: bool = Field(
        default=False,
        description="Keep the Lightning .ckpt files (pickles) after a fold completes; the bundle never needs them.",
    )
    limit_train_batches: int | float | None = Field(
        default=None, description="Debugging: cap training batches per epoch."
    )
    limit_val_batches: int | float | None = Field(default=None, description="Debugging: cap validation batches.")


# --------------------------------------------------------------------------------------------------
# Between the stages: out-of-fold embeddings


class EmbedConfig(Section):
    batch_size: int = Field(
        default=64, ge=1, description="Slices per CNN forward pass when embedding a series (memory, not results)."
    )
    num_workers: int = Field(
        default=1,
        ge=0,
        description="Processes reading series from the store ahead of the CNN (0: in the main process).",
    )
    location_grid: int = Field(
        default=0,
        ge=0,
        le=8,
        description="Append to each slice's embedding the CNN's slice logit on every cell of a G x G grid "
        "over the slice (where the emboli are: left, right, central); 0: the pooled features alone.",
    )


# --------------------------------------------------------------------------------------------------
# Stage 2: the sequence head


class SeqConfig(Section):
    encoder: Literal["gru", "lstm", "transformer", "double_lstm"] = Field(
        default="gru",
        description="Bidirectional GRU or LSTM, a small transformer encoder, or double_lstm (4th place): two stacked "
        "bidirectional LSTMs of `layers` layers each, their outputs summed for the slices and pooled each by its own attention for the exam.",
    )
    hidden: int = Field(
        default=128, ge=1, description="Hidden size per direction (GRU/LSTM) or model width (transformer)."
    )
    layers: int = Field(default=2, ge=1, description="Stacked recurrent or transformer layers.")
    heads: int = Field(default=4, ge=1, description="transformer: attention heads (must divide hidden).")
    feedforward: int | None = Field(
        default=None, ge=1, description="transformer: feed-forward width; default 4 × hidden."
    )
    position: Literal["sinusoidal", "none"] = Field(
        default="sinusoidal", description="transformer: position encoding added to the inputs (5th place: none)."
    )
    exam_pool: Literal["attention_max", "attention", "mean_max"] = Field(
        default="attention_max",
        description="How the exam head pools the slices: attention (a learnt weighted mean) and max, attention alone (4th "
        "place), or mean and max (5th place).",
    )
    attention: Literal["linear", "tanh"] = Field(
        default="linear", description="Attention score per slice: linear, or tanh of a linear map (1st place)."
    )
    head_hidden: int = Field(
        default=0,
        ge=0,
        description="0: linear slice and exam outputs; n: a hidden layer of n units, ReLU and dropout before each (4th place: 256).",
    )
    dropout: float = Field(default=0.1, ge=0, lt=1, description="Dropout between layers and before the output heads.")
    input_dropout: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="Dropout on the slice embeddings (not the CNN logit) as they enter the head.",
    )
    neighbour_diffs: bool = Field(
        default=False, description="Input [f, f - f_prev, f - f_next] per slice (1st place) instead of f."
    )
    use_cnn_logit: bool = Field(default=True, description="Also input the CNN's slice logit.")
    inputs: Literal["features", "logits"] = Field(
        default="features",
        description="features: each slice's whole embedding (the CNN's pooled features, then its location logits); "
        "logits: the location logits alone (embed.location_grid² numbers, with the slice logit when use_cnn_logit): "
        "numbers that mean the same whichever fold's CNN made them.",
    )
    training_embeddings: Literal["out_of_fold", "own_cnn"] = Field(
        default="out_of_fold",
        description="What head k trains on. out_of_fold: every other fold's series as embedded by that fold's CNN, "
        "which never saw them; own_cnn: its own CNN's embeddings of its training series (the published solutions' "
        "way: one feature space for training, validation and prediction, at the price of features of series the "
        "CNN trained on). Either way head k is validated on, and predicts from, CNN k's embeddings of unseen series.",
    )
    fixed_length: int | None = Field(
        default=None,
        ge=2,
        description="Resize every series to this many slices and the slice logits back (1st place: 128); none: pad and mask.",
    )
    resize: Literal["all", "longer"] = Field(
        default="all",
        description="fixed_length: resize every series (all), or only those longer than fixed_length, padding the shorter (1st place).",
    )
    exam_structure: Literal["independent", "conditional"] = Field(
        default="independent",
        description="independent: nine exam logits from the pooled features; conditional: p(positive), p(indeterminate | "
        "not positive) and each positive-only label given positive, multiplied out (the label rules' structure).",
    )
    exam_pooling: Literal["shared", "per_output"] = Field(
        default="shared",
        description="shared: one attention pooling over the slices for every exam output; per_output: an attention per "
        "exam output (RV/LV can attend to the heart's slices while positive/negative attends to the emboli's).",
    )
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    epochs: int = Field(default=20, ge=1)
    batch_size: int = Field(default=16, ge=1, description="Series per batch (padded to the longest).")
    gradient_clip_norm: float | None = Field(
        default=1.0, gt=0, description="Clip the global gradient norm (none: no clipping)."
    )
    export: Literal["best", "last"] = Field(
        default="best",
        description="best: the epoch with the lowest validation score (the metric); last: the last epoch.",
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> SeqConfig:
        if self.encoder == "transformer" and self.hidden % self.heads:
            raise ValueError(
                f"hidden ({self.hidden}) must be a multiple of heads ({self.heads}) for the transformer encoder"
            )
        if self.encoder == "double_lstm" and self.exam_pooling != "shared":
            raise ValueError("double_lstm pools each LSTM by its own attention: exam_pooling must be shared")
        return self


class HeartConfig(Section):
    """The heart model (RV/LV): a small 2.5D or 3D CNN on each series' heart, found from its Hounsfield units
    (:mod:`pedetect.data.heart_box`), trained on the RV/LV label of positive exams, its logit stacked
    with the sequence head's RV/LV output by a logistic regression fitted out of fold."""

    depth: int = Field(
        default=16, ge=2, description="Slices of the heart crop (the heart's slices resampled to this many)."
    )
    size: int = Field(default=64, ge=16, description="Side of the square heart crop, in pixels.")
    window: tuple[float, float] = Field(
        default=(50.0, 350.0), description="Level and width of the crop's window (mediastinal)."
    )
    model: Literal["2.5d", "3d"] = Field(
        default="2.5d", description="2.5d: the crop's slices are the channels of a 2D CNN; 3d: 3D convolutions."
    )
    widths: list[int] = Field(
        default_factory=lambda: [16, 32, 64, 64], min_length=1, description="Channels of each conv stage."
    )
    dropout: float = Field(default=0.2, ge=0, lt=1, description="Dropout before the output.")
    shift: float = Field(
        default=0.06, ge=0, lt=0.5, description="Training: random shift of the crop, as a fraction of its side."
    )
    intensity: float = Field(
        default=0.1, ge=0, lt=1, description="Training: random gain and offset of the crop's values, [-i, i]."
    )
    class_weight: Literal["balanced", "none"] = Field(
        default="balanced",
        description="balanced: each class of the RV/LV label weighs the same in the loss (weighted BCE).",
    )
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(lr=1e-3, weight_decay=1e-2))
    scheduler: SchedulerConfig = Field(default_factory=lambda: SchedulerConfig(name="cosine"))
    epochs: int = Field(default=30, ge=1)
    batch_size: int = Field(default=16, ge=1)


# --------------------------------------------------------------------------------------------------


class ExperimentConfig(Section):
    name: str = Field(default="experiment", description="A short name for the experiment.")
    source: str = Field(default="", description="Where the recipe comes from (solution, write-up, changes).")
    seed: int = Field(default=42, description="Global seed (lightning.seed_everything), offset by the fold number.")
    data: DataConfig = Field(default_factory=DataConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    cnn: CnnConfig = Field(default_factory=CnnConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    seq: SeqConfig = Field(default_factory=SeqConfig)
    heart: HeartConfig | None = Field(
        default=None, description="The heart model for RV/LV (none: the sequence head's RV/LV alone)."
    )

    @model_validator(mode="after")
    def _seq_has_inputs(self) -> ExperimentConfig:
        if self.seq.inputs == "logits" and not self.embed.location_grid and not self.seq.use_cnn_logit:
            raise ValueError(
                "seq.inputs: logits needs embed.location_grid > 0 or seq.use_cnn_logit: the head would have no input"
            )
        return self

    @property
    def seq_input_columns(self) -> int | None:
        """How many trailing columns of each embedding the sequence head reads (None: all of them)."""
        return self.embed.location_grid**2 if self.seq.inputs == "logits" else None


# --------------------------------------------------------------------------------------------------
# Loading, overriding, saving


def validate_experiment(data: Any, source: str = "config") -> ExperimentConfig:
    """Validate a plain mapping as an :class:`ExperimentConfig`; errors name the key and the allowed keys."""
    return validate_config(data, ExperimentConfig, source=source)


BASE_KEY = "base"


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Read a YAML recipe into an :class:`ExperimentConfig` (with the shared loader, ``pedetect.config``).

    A recipe may start from another: ``base: other.yaml`` (a path relative to the recipe's folder)
    reads that one first and the recipe's own keys replace or extend it, section by section (a
    mapping merges into the base's mapping, anything else replaces it)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    data = _recipe_mapping(path, ())
    return validate_config(data, ExperimentConfig, source=str(path))


def _recipe_mapping(path: Path, seen: tuple[Path, ...]) -> dict:
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise ConfigError(f"{path}: recipes name each other as base in a loop ({chain})")
    data = read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level, got {type(data).__name__}")
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(
            f"{path}: base must name another recipe file (e.g. base: rsna_4th_rexnet200.yaml), got {base!r}"
        )
    base_path = path.parent / base
    if not base_path.is_file():
        raise ConfigError(f"{path}: base recipe {base_path} not found")
    return _merged(_recipe_mapping(base_path, (*seen, resolved)), data)


def _merged(base: dict, own: dict) -> dict:
    out = dict(base)
    for key, value in own.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def apply_overrides(config: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    """Return a copy of ``config`` with ``section.key=value`` overrides applied (values read as YAML)."""
    if not overrides:
        return config

    data = config.model_dump(mode="json")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' is not KEY=VALUE (e.g. cnn.optimizer.lr=3e-4)")
        parts = key.strip().split(".")
        node = data
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                if part in node and node[part] is None:
                    node[part] = {}
                else:
                    allowed = allowed_keys(ExperimentConfig, tuple(parts[:depth]))
                    raise ConfigError(
                        f"override '{item}': unknown section '{'.'.join(parts[: depth + 1])}'; allowed keys here: {', '.join(allowed)}"
                    )
            node = node[part]
        node[parts[-1]] = yaml.safe_load(raw)
    return validate_experiment(data, "--set overrides")


def config_to_yaml(config: ExperimentConfig) -> str:
    """The resolved config as YAML (every default written out), in field order."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, default_flow_style=False, width=100)


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    write_text_atomic(path, config_to_yaml(config))
