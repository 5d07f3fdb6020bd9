"""The pieces of a Lightning run of stage 1: loggers, precision, checkpoint I/O, quiet logs.

Kept apart from the stage itself (:mod:`pedetect.train.cnn`) so that the stage reads as what it
does: data, model, trainer, export.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Literal

import torch

from pedetect.io import atomic_path
from pedetect.recipe import ExperimentConfig
from pedetect.train.setup import TrainError

# Lightning is imported inside the functions, as in pedetect.train.cnn (which imports this module
# whatever the stage); the TensorBoard, W&B and MLflow loggers only when the recipe asks for them.


def _require(module: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise TrainError(f"{what} is configured but the '{module}' package is not installed (pip install {module})")


def build_loggers(config: ExperimentConfig, directory: Path, out: Path, fold: int) -> list:
    from lightning.pytorch.loggers import CSVLogger

    loggers: list = [
        CSVLogger(save_dir=str(directory), name="logs")
    ]  # logs/version_<n>: a resumed run keeps the old log
    log = config.logging
    if log.tensorboard:
        if find_spec("tensorboard") is None and find_spec("tensorboardX") is None:
            raise TrainError("logging.tensorboard is set but neither 'tensorboard' nor 'tensorboardX' is installed")
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(directory), name="tensorboard", version=""))
    if log.wandb is not None:
        _require("wandb", "logging.wandb")
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(
            WandbLogger(
                project=log.wandb.project,
                name=f"{config.name}-cnn-fold{fold}",
                offline=log.wandb.offline,
                save_dir=str(directory),
                config=config.model_dump(mode="json"),
            )
        )
    if log.mlflow is not None:
        _require("mlflow", "logging.mlflow")
        from lightning.pytorch.loggers import MLFlowLogger

        uri = log.mlflow.tracking_uri or (out / "mlruns").resolve().as_uri()
        loggers.append(
            MLFlowLogger(
                experiment_name=log.mlflow.experiment, run_name=f"{config.name}-cnn-fold{fold}", tracking_uri=uri
            )
        )
    return loggers


class _DropTips:
    """Drops Lightning's advertising tips from its info log (the rest passes)."""

    def filter(self, record) -> bool:
        return "litlogger" not in str(record.getMessage())


def quiet_lightning() -> None:
    """Drop Lightning's advertising tips and the warnings from its own internals, not about this run."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in log.filters):
            log.addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", message="torch.distributed.nn.functional.all_gather is deprecated")
    warnings.filterwarnings("ignore", message="The number of training batches .* is smaller than the logging interval")


def uses_gpu(config: ExperimentConfig) -> bool:
    """The recipe trains on CUDA (``gpu``/``cuda``, or ``auto`` with a CUDA device present)."""
    accelerator = config.runtime.accelerator
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def resolve_precision(config: ExperimentConfig) -> Literal["32-true", "16-mixed", "bf16-mixed"]:
    """``auto``: bf16-mixed on GPUs that support it, 16-mixed on other GPUs, 32-true on CPU."""
    if config.runtime.precision != "auto":
        return config.runtime.precision
    if uses_gpu(config):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def safe_checkpoint_io():
    """Lightning checkpoint I/O that writes atomically (a kill never leaves half a last.ckpt) and
    reads weights-only (a checkpoint is a pickle: only tensors and plain containers are accepted)."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class SafeCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            with atomic_path(path) as tmp:
                torch.save(checkpoint, tmp)

        def load_checkpoint(self, path, map_location=None, weights_only=None):
            if not Path(path).is_file():
                raise FileNotFoundError(f"checkpoint not found: {path}")
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)

    return SafeCheckpointIO()


def load_checkpoint_state(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
