"""The Lightning module of stage 1: loss, optimiser, schedule, validation metrics, epoch history."""

from __future__ import annotations

import copy
import math
import time
from typing import Any, cast

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pedetect.labels import EXAM_WEIGHTS
from pedetect.metric.evaluate import roc_auc
from pedetect.metric.loss import binary_cross_entropy
from pedetect.models.slice_classifier import SliceClassifier, fold_batchnorm
from pedetect.recipe import CnnConfig, LossConfig, OptimizerConfig, SchedulerConfig


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float, alpha: float | None) -> torch.Tensor:
    """Element-wise sigmoid focal loss (Lin et al. 2017): ``α_t (1 − p_t)^γ · BCE``."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = bce * (1 - p_t).pow(gamma)
    if alpha is not None:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


def elementwise_loss(config: LossConfig, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    if config.kind == "focal":
        return focal_loss(logits, targets, config.focal_gamma, config.focal_alpha)
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none")


def slice_loss(config: CnnConfig, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Slice-label loss (× ``loss.slice_weight``), plus (weighted) exam-label loss where the target is
    not NaN: positive slices for ``exam_labels`` (5th place), every slice of a positive exam for
    ``whole_exam_labels``. ``targets.exam_label_weights`` metric: each label's loss times its metric
    weight, summed over labels, averaged over the slices with a trained label (the 5th place's sum)."""
    loss = config.loss.slice_weight * elementwise_loss(config.loss, logits[:, 0], targets[:, 0]).mean()
    if logits.shape[1] > 1:
        trained = ~torch.isnan(targets[:, 1:])
        exam = elementwise_loss(config.loss, logits[:, 1:], torch.nan_to_num(targets[:, 1:]))
        # Mean over the trained entries; a batch without any adds 0 (and keeps the graph the same on
        # every process).
        if config.targets.exam_label_weights == "metric":
            weights = torch.tensor(
                [EXAM_WEIGHTS[label] for label in config.targets.head_labels], dtype=exam.dtype, device=exam.device
            )
            exam_term = (exam * trained * weights).sum() / trained.any(dim=1).sum().clamp(min=1)
        else:
            exam_term = (exam * trained).sum() / trained.sum().clamp(min=1)
        loss = loss + config.targets.exam_weight * exam_term
    return loss


def clot_map_loss(activation: torch.Tensor, clot_maps: torch.Tensor) -> torch.Tensor:
    """The dense loss of ``cnn.loss.clot_map_weight``: binary cross-entropy of the activation map
    ``(B, h, w)`` against the clot maps ``(B, 1, S, S)`` (uint8, 255 on the boxes of visible emboli).
    A position is positive when any input pixel under it is on a box (the maps max-pooled to the
    activation's size). Positives and negatives are averaged apart and added: a clot covers one to a
    few of the 256 positions of a 16 × 16 map, so a plain mean would teach "nowhere"."""
    target = (F.adaptive_max_pool2d(clot_maps.float(), activation.shape[-2:])[:, 0] >= 128).float()
    loss = F.binary_cross_entropy_with_logits(activation.float(), target, reduction="none")
    positive = target > 0.5
    negative_term = loss[~positive].mean() if (~positive).any() else loss.sum() * 0.0
    positive_term = loss[positive].mean() if positive.any() else loss.sum() * 0.0
    return positive_term + negative_term


class LrSchedule:
    """LR factor per optimiser step: linear warm-up, then cosine or linear decay, step decay or constant.

    A plain object of numbers, so ``LambdaLR.state_dict`` (and the checkpoint) stays weights-only.
    """

    def __init__(self, config: SchedulerConfig, total_steps: int, steps_per_epoch: float):
        self.name = config.name
        self.total = max(int(total_steps), 1)
        self.warmup = int(round(config.warmup_epochs * steps_per_epoch))
        self.min_ratio = config.min_lr_ratio
        self.step_every = (
            float(config.step_steps) if config.step_steps else max(config.step_epochs * steps_per_epoch, 1.0)
        )
        self.gamma = config.gamma

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = min((step - self.warmup) / max(self.total - self.warmup, 1), 1.0)
        if self.name == "cosine":
            return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.name == "linear":
            return self.min_ratio + (1 - self.min_ratio) * (1 - progress)
        if self.name == "step":
            return self.gamma ** int((step - self.warmup) // self.step_every)
        return 1.0


def build_optimizer(config: OptimizerConfig, parameters) -> torch.optim.Optimizer:
    # No weight decay on biases and norm weights (1-d tensors), as timm and torchvision's references.
    decay: list[torch.Tensor] = []
    no_decay: list[torch.Tensor] = []
    for p in parameters:
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.name == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)
    if config.name == "adam":
        return torch.optim.Adam(groups, lr=config.lr, betas=config.betas)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0)


def log_loss(target: np.ndarray, probability: np.ndarray) -> float:
    """Mean binary log loss with the metric's clipping (pedetect.metric.loss)."""
    return float(np.mean(binary_cross_entropy(target.astype(np.float64), probability.astype(np.float64))))


class SliceModule(L.LightningModule):
    """Trains a :class:`SliceClassifier`; keeps a per-epoch history that survives resume."""

    def __init__(self, model: SliceClassifier, config: CnnConfig):
        super().__init__()
        self.model = model
        self.config = config
        # An exponential moving average of the weights (and BatchNorm statistics): validated and
        # exported in place of the last step's weights. Part of the module's state, so checkpoints
        # and resume carry it; frozen, so DDP and the optimiser leave it alone.
        self.ema: torch.optim.swa_utils.AveragedModel | None = None
        if config.ema_decay is not None:
            self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
            self.ema.requires_grad_(False)
        self.history: list[dict[str, Any]] = []
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._train_loss_sum = 0.0
        self._train_loss_n = 0
        self._train_samples = 0
        self._epoch_start = 0.0
        self._val_start = 0.0
        self._validated: tuple[SliceClassifier, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @property
    def evaluated_model(self) -> SliceClassifier:
        """The network that is validated and exported: the weight average when configured."""
        # AveragedModel's module is its own copy of self.model (a SliceClassifier); the stubs say Module.
        return self.model if self.ema is None else cast(SliceClassifier, self.ema.module)

    # ----------------------------------------------------------------------------------- training
    def on_train_epoch_start(self) -> None:
        self._train_loss_sum, self._train_loss_n, self._train_samples = 0.0, 0, 0
        self._epoch_start = time.perf_counter()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch[0], batch[1]
        if len(batch) > 3 and self.config.loss.clot_map_weight > 0:  # the dataset was given the clot boxes
            logits, activation = self.model.forward_with_map(images)
            loss = slice_loss(self.config, logits, targets)
            loss = loss + self.config.loss.clot_map_weight * clot_map_loss(activation, batch[3])
        else:
            loss = slice_loss(self.config, self.model(images), targets)
        # Per step only: the epoch mean is in the history (no per-step all-reduce under DDP).
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(images))
        optimizer = self.optimizers()
        assert not isinstance(optimizer, list)  # configure_optimizers returns one optimizer
        self.log("lr", optimizer.param_groups[0]["lr"], on_step=True, on_epoch=False, batch_size=len(images))
        self._train_loss_sum += float(loss.detach())
        self._train_loss_n += 1
        self._train_samples += len(images)
        return loss

    def on_train_epoch_end(self) -> None:
        # Runs after the epoch's validation, if there was one (which recorded the epoch already):
        # an epoch without validation (cnn.validation: last_epoch) is recorded with its training only.
        if self.trainer.sanity_checking or any(h["epoch"] == int(self.current_epoch) for h in self.history):
            return
        seconds = time.perf_counter() - self._epoch_start if self._epoch_start else float("nan")
        self.history.append(
            {
                **self._training_record(seconds),
                "val_loss": float("nan"),
                "val_auc": float("nan"),
                "val_seconds": float("nan"),
                "val_slices": 0,
                "val_positive": 0,
            }
        )

    @property
    def epoch_train_loss(self) -> float:
        """The mean training loss of the epoch so far."""
        return self._train_loss_sum / max(self._train_loss_n, 1)

    def _training_record(self, train_seconds: float) -> dict[str, Any]:
        lr = float("nan")
        if self.trainer.optimizers:
            optimizer = self.optimizers()
            assert not isinstance(optimizer, list)  # configure_optimizers returns one optimizer
            lr = float(optimizer.param_groups[0]["lr"])
        return {
            "epoch": int(self.current_epoch),
            "train_loss": self.epoch_train_loss,
            "lr": lr,
            "train_seconds": train_seconds,
            "train_slices_per_second": self._train_samples * self.trainer.world_size / train_seconds
            if train_seconds and train_seconds > 0
            else float("nan"),
        }

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if (
            self.ema is not None and (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0
        ):  # after an optimiser step
            self.ema.update_parameters(self.model)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.config.optimizer, self.model.parameters())
        total = int(self.trainer.estimated_stepping_batches)
        schedule = LrSchedule(self.config.scheduler, total, total / max(self.trainer.max_epochs or 1, 1))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --------------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val_outputs = []
        self._val_start = time.perf_counter()
        # Validated with BatchNorm folded into the convolutions, as the embedding pass and predict run
        # it (the same outputs, faster); a copy, so training goes on with its own. Held in a tuple, not
        # as an attribute module, so it is no part of the checkpoint.
        self._validated = (fold_batchnorm(copy.deepcopy(self.evaluated_model).eval()),)

    def validation_step(self, batch, batch_idx: int) -> None:
        images, targets, index = batch[:3]
        logits = self._validated[0](images)
        loss = slice_loss(self.config, logits, targets)
        self.log("val_batch_loss", loss, on_step=False, on_epoch=True, batch_size=len(images), sync_dist=True)
        probability = torch.sigmoid(logits[:, 0].float())
        self._val_outputs.append((index.detach(), probability.detach(), targets[:, 0].detach()))

    def _gather_validation(self) -> tuple[np.ndarray, np.ndarray]:
        """(target, probability) of every validation row once, gathered over processes."""
        device = self.device
        if self._val_outputs:
            index = torch.cat([o[0] for o in self._val_outputs]).to(device)
            prob = torch.cat([o[1] for o in self._val_outputs]).to(device)
            target = torch.cat([o[2] for o in self._val_outputs]).to(device)
        else:
            index = torch.zeros(0, dtype=torch.long, device=device)
            prob = target = torch.zeros(0, device=device)
        if self.trainer.world_size > 1:
            # Pad to a common length, gather, then drop the padding (index −1).
            n = torch.tensor([len(index)], device=device)
            # all_gather gives a tensor back for a tensor (the stubs: any collection of tensors)
            longest = int(cast(torch.Tensor, self.all_gather(n)).max())
            pad = longest - len(index)
            index = torch.cat([index, torch.full((pad,), -1, dtype=index.dtype, device=device)])
            prob = torch.cat([prob, torch.zeros(pad, device=device)])
            target = torch.cat([target, torch.zeros(pad, device=device)])
            index, prob, target = (cast(torch.Tensor, self.all_gather(t)).reshape(-1) for t in (index, prob, target))
            keep = index >= 0
            index, prob, target = index[keep], prob[keep], target[keep]
            _, first = np.unique(index.cpu().numpy(), return_index=True)
            return target.cpu().numpy()[first], prob.cpu().numpy()[first]
        return target.cpu().numpy(), prob.cpu().numpy()

    def on_validation_epoch_end(self) -> None:
        target, prob = self._gather_validation()
        self._val_outputs, self._validated = [], ()
        if self.trainer.sanity_checking:
            return
        auc = roc_auc(target, prob)
        loss = log_loss(target, prob) if len(target) else float("nan")
        self.log("val_auc", auc, prog_bar=True, sync_dist=True)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)
        now = time.perf_counter()
        train_seconds = (self._val_start - self._epoch_start) if self._epoch_start else float("nan")
        record = {
            **self._training_record(train_seconds),
            "val_loss": loss,
            "val_auc": auc,
            "val_seconds": now - self._val_start,
            "val_slices": int(len(target)),
            "val_positive": int((target > 0.5).sum()),
        }
        # A re-run of the same epoch (resume from a checkpoint saved before validation ended) replaces it.
        self.history = [h for h in self.history if h["epoch"] != record["epoch"]] + [record]

    # -------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["pedetect_history"] = [dict(h) for h in self.history]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = [dict(h) for h in checkpoint.get("pedetect_history", [])]
