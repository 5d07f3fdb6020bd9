"""Stage 1: the slice classifier (a timm backbone and a linear head, or the 4th place's GeM pooling
and hidden layer: ``cnn.head``).

Input: a ``(B, C, H, W)`` batch of uint8 (0–255) or float pixels in the 0–255 scale; the model
normalises it itself, so data loaders ship compact uint8 tensors and every caller (training, the
stage-2 embedding pass, ``predict``) feeds the same thing. Output: one logit per slice for
``pe_present_on_image`` and, when configured, one per exam label (5th place).

For later stages::

    model = load_slice_classifier(model_dir, fold)      # resolved config + fold<k>/model.safetensors
    embedding, slice_logit = model.embed(batch)         # (B, D), (B,)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from pedetect.data.dataset import input_region, series_inputs, series_lung_box
from pedetect.models.backbone import create_backbone
from pedetect.models.layout import WEIGHTS_FILE, cnn_dir, read_model_config
from pedetect.models.weights import load_weights

if TYPE_CHECKING:
    from pedetect.models.onnx import OnnxSliceClassifier
    from pedetect.recipe import CnnConfig, ExperimentConfig


class GeM(nn.Module):
    """Generalised mean pooling to 1 × 1, ``(mean x^p)^(1/p)`` with a learnt p (from 3): between average
    (p = 1) and max pooling (p → ∞); the 4th place's pooling."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.to(x.dtype)
        return x.clamp(min=self.eps).pow(p).mean(dim=(-2, -1), keepdim=True).pow(1.0 / p)


class SliceClassifier(nn.Module):
    mean: torch.Tensor  # buffers (register_buffer)
    std: torch.Tensor

    def __init__(
        self,
        backbone: nn.Module,
        *,
        exam_labels: tuple[str, ...] = (),
        mean: float = 0.456,
        std: float = 0.224,
        head_dropout: float = 0.0,
        location_grid: int = 0,
        pool: str = "backbone",
        hidden: int = 0,
    ):
        super().__init__()
        if pool not in ("backbone", "gem"):
            raise ValueError(f"unknown pooling {pool!r}; choose backbone or gem")
        if location_grid < 0:
            raise ValueError(f"location_grid must be 0 (off) or a grid side, got {location_grid}")
        # A timm model (or pedetect_small_cnn): num_features, forward_features and forward_head are timm's
        # API, not nn.Module's (whose __getattr__ the stubs type as Tensor | Module), so it is held as Any.
        self.backbone: Any = backbone
        self.exam_labels = tuple(exam_labels)
        # timm: pooled features are head_hidden_size wide where a model has a pre-logits head (MobileNetV3).
        timm_model = cast(Any, backbone)  # as self.backbone: timm's attributes
        self.feature_dim = int(getattr(timm_model, "head_hidden_size", None) or timm_model.num_features)
        self.location_grid = int(location_grid)
        # What stage 2 reads per slice: the pooled features, then one slice logit per cell of the grid.
        self.embedding_dim = self.feature_dim + self.location_grid**2
        self.dropout = nn.Dropout(head_dropout) if head_dropout else nn.Identity()
        # pool gem: the backbone was built without pooling (global_pool=""); GeM pools its map here.
        self.gem = GeM() if pool == "gem" else None
        # hidden n (4th place): n units, BatchNorm, ReLU between the pooled features and the outputs.
        self.hidden = (
            nn.Sequential(nn.Linear(self.feature_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
            if hidden
            else nn.Identity()
        )
        self.head = nn.Linear(hidden or self.feature_dim, 1 + len(self.exam_labels))
        self.register_buffer("mean", torch.tensor(float(mean) * 255.0), persistent=False)
        self.register_buffer("std", torch.tensor(float(std) * 255.0), persistent=False)
        # Channels-last layout: oneDNN convolutions on CPU and tensor-core convolutions under mixed
        # precision on GPU run faster in it (a third less time per training step of the demo's CNN on
        # two cores). Loading a state dict copies into it; saved weights are made contiguous.
        self.to(memory_format=torch.channels_last)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.head.weight.dtype if not torch.is_autocast_enabled() else torch.float32
        return ((x.to(dtype) - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def _head_of_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """The backbone's own head (pre-logits) on a pooled ``(B, C, 1, 1)`` map: ``(B, feature_dim)``."""
        return self.backbone.forward_head(pooled, pre_logits=True).flatten(1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features, ``(B, feature_dim)``."""
        if self.gem is not None:
            return self._head_of_pooled(self.gem(self.backbone.forward_features(self.normalise(x))))
        return self.backbone(self.normalise(x))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The outputs on pooled features (the hidden layer, when there is one, then the output layer)."""
        return self.head(self.hidden(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 1 + len(exam_labels))``; column 0 is the slice label."""
        return self.logits(self.dropout(self.features(x)))

    def forward_with_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward`'s logits and the activation map ``(B, h, w)`` of :meth:`embed_with_map`
        from one backbone pass: what training with ``cnn.loss.clot_map_weight`` supervises."""
        feature_map = self.backbone.forward_features(self.normalise(x))
        return self.logits(self.dropout(self._pooled(feature_map))), self._activation(feature_map)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embedding (B, D), slice logit (B,))``: what stage 2 and ``predict`` consume.

        With ``location_grid`` G, the embedding ends with G × G location logits: the slice head applied
        to each cell of a G × G pooling of the last feature map (a coarse class-activation map), so
        stage 2 learns where on the slice the emboli are (left, right, central) from numbers that
        mean the same in every fold, not from the features' layout.
        """
        if not self.location_grid:
            features = self.features(x)
            return features, self.logits(features)[:, 0]
        embedding, logit, _ = self._embed_map(self.backbone.forward_features(self.normalise(x)), with_map=False)
        return embedding, logit

    def embed_with_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`embed` plus the activation map ``(B, h, w)``: the slice logit of every position of the
        last feature map (the slice head on that position alone, as if the map were one pixel), from
        the same backbone pass. With global max pooling the slice logit is the head on each channel's
        maximum, so the map is highest where the CNN found what made it fire: a detector's map learnt
        from slice labels alone (docs/localisation.md). The embedding and slice logit are those of
        :meth:`embed`, to the bit."""
        embedding, logit, activation = self._embed_map(self.backbone.forward_features(self.normalise(x)), with_map=True)
        assert activation is not None  # with_map=True: the map is always drawn
        return embedding, logit, activation

    def _embed_map(
        self, feature_map: torch.Tensor, *, with_map: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        features = self._pooled(feature_map)
        logit = self.logits(features)[:, 0]
        embedding = features
        if self.location_grid:
            cells = _pool_cells(self.backbone, feature_map, self.location_grid, gem=self.gem)  # (B * G * G, C, 1, 1)
            cell_logits = self._cell_logits(cells, pooled=True).reshape(-1, self.location_grid**2)
            embedding = torch.cat([features, cell_logits.to(features.dtype)], dim=1)
        if not with_map:
            return embedding, logit, None
        return embedding, logit, self._activation(feature_map).to(logit.dtype)

    def _pooled(self, feature_map: torch.Tensor) -> torch.Tensor:
        """The pooled features ``(B, feature_dim)`` of a ``(B, C, h, w)`` map: GeM, or the backbone's own pooling."""
        if self.gem is not None:
            return self._head_of_pooled(self.gem(feature_map))
        return self.backbone.forward_head(feature_map, pre_logits=True)

    def _activation(self, feature_map: torch.Tensor) -> torch.Tensor:
        """The slice logit of every position of a ``(B, C, h, w)`` map: ``(B, h, w)``."""
        channels, height, width = feature_map.shape[1:]
        # Every position a one-pixel map, pooled as the backbone pools (max, mean or GeM of one value is that value).
        positions = feature_map.permute(0, 2, 3, 1).reshape(-1, channels, 1, 1)
        return self._cell_logits(positions, pooled=False).reshape(-1, height, width)

    def _cell_logits(self, cells: torch.Tensor, *, pooled: bool) -> torch.Tensor:
        """The slice logit of each one-pixel map ``(K, C, 1, 1)``: ``(K,)``. ``pooled``: the cells are
        GeM-pooled already (the location grid's), else GeM pools them here."""
        if self.gem is not None:
            return self.logits(self._head_of_pooled(cells if pooled else self.gem(cells)))[:, 0]
        return self.logits(self.backbone.forward_head(cells, pre_logits=True))[:, 0]


def _pool_cells(backbone: nn.Module, feature_map: torch.Tensor, grid: int, gem: GeM | None = None) -> torch.Tensor:
    """A ``(B, C, H, W)`` feature map pooled to ``grid`` × ``grid`` cells the way the backbone pools
    globally (max or average), as ``(B · grid², C, 1, 1)`` one-pixel maps for its own head."""
    pool = getattr(backbone, "global_pool", None)
    # timm names its pooling in pool_type ("avg", "max", "avgmax", ...); pedetect_small_cnn uses torch's.
    kind = getattr(pool, "pool_type", "max" if isinstance(pool, nn.AdaptiveMaxPool2d) else "avg")
    c, height, width = feature_map.shape[1:]
    # Adaptive pooling's own cells (rows floor(i·H/G) … ceil((i+1)·H/G)), written as slices: the same
    # numbers as F.adaptive_max_pool2d, and exportable to ONNX, which has no adaptive pooling for a
    # grid that does not divide the map (8 × 8 into 3 × 3 for the demo's CNN).
    rows = [(i * height // grid, -(-(i + 1) * height // grid)) for i in range(grid)]
    cols = [(j * width // grid, -(-(j + 1) * width // grid)) for j in range(grid)]
    reduce = (lambda cell: cell.amax(dim=(2, 3))) if kind == "max" else (lambda cell: cell.mean(dim=(2, 3)))
    if gem is not None:
        reduce = lambda cell: gem(cell)[:, :, 0, 0]  # noqa: E731
    cells = [reduce(feature_map[:, :, r0:r1, c0:c1]) for r0, r1 in rows for c0, c1 in cols]  # G² × (B, C), row-major
    return torch.stack(cells, dim=1).reshape(-1, c, 1, 1)  # -1, not b · G²: a batch size an export keeps dynamic


def build_slice_classifier(cnn: CnnConfig, *, load_pretrained: bool = True, location_grid: int = 0) -> SliceClassifier:
    """The model of a resolved ``cnn`` config section; ``load_pretrained=False`` skips the backbone's
    weights file (when trained weights are about to be loaded anyway); ``location_grid``: the
    ``embed.location_grid`` its embeddings carry (no weights of its own)."""
    b = cnn.backbone
    kwargs = dict(b.kwargs)
    if cnn.head.pool == "gem":
        kwargs["global_pool"] = ""  # the map unpooled: SliceClassifier pools it by GeM
    backbone = create_backbone(
        b.name,
        in_chans=cnn.input.channels,
        weights=b.weights if load_pretrained else None,
        drop_path_rate=b.drop_path_rate,
        **kwargs,
    )
    return SliceClassifier(
        backbone,
        exam_labels=cnn.targets.head_labels,
        mean=cnn.input.mean,
        std=cnn.input.std,
        head_dropout=b.drop_rate,
        location_grid=location_grid,
        pool=cnn.head.pool,
        hidden=cnn.head.hidden,
    )


def load_slice_classifier(
    model_dir: str | Path,
    fold: int,
    *,
    config: ExperimentConfig | None = None,
    device: str | torch.device = "cpu",
) -> SliceClassifier:
    """The trained stage-1 model of one fold, in eval mode: built from ``MODEL_DIR/config.yaml``
    (or ``config``) and loaded from ``MODEL_DIR/cnn/fold<k>/model.safetensors``."""
    if config is None:
        config = read_model_config(model_dir)
    path = cnn_dir(model_dir, fold) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no trained CNN for fold {fold}: {path} is missing (run pedetect train --stage cnn)")
    model = build_slice_classifier(config.cnn, load_pretrained=False, location_grid=config.embed.location_grid)
    return load_weights(model, path).eval().to(device)


_Model = TypeVar("_Model", bound=nn.Module)


def fold_batchnorm(model: _Model) -> _Model:
    """``model`` (in eval mode) for inference only, in place: each BatchNorm2d that follows a Conv2d in a
    ``Sequential`` is folded into the convolution's weights and bias (the same outputs to rounding).
    On a CPU the normalisation is a memory-bound pass over every full-resolution feature map, so
    folding it doubled the demo CNN's slices per second in the embedding pass; the folded model can no
    longer train (its BatchNorm is gone). timm's fused norm-and-activation layers are left as they are."""
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (training BatchNorm uses batch statistics)")
    channels_last = any(
        isinstance(m, nn.Conv2d)
        and m.weight.is_contiguous(memory_format=torch.channels_last)
        and not m.weight.is_contiguous()
        for m in model.modules()
    )
    for sequence in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(sequence._modules)
        for first, second in zip(names, names[1:]):
            conv, norm = sequence._modules[first], sequence._modules[second]
            if type(conv) is nn.Conv2d and type(norm) is nn.BatchNorm2d and norm.running_mean is not None:
                sequence._modules[first] = fuse_conv_bn_eval(conv, norm)
                sequence._modules[second] = nn.Identity()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision for inference: bf16 on GPUs that have it, else fp16 on CUDA; none elsewhere."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def embed_volume(
    model: SliceClassifier | OnnxSliceClassifier,
    volume,
    input_config,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    windows=None,
    maps: bool = False,
):
    """Embeddings and slice logits of one series: ``(float16 (N, D), float32 (N,))`` numpy arrays;
    with ``maps``, also the activation maps ``float32 (N, h, w)`` (:meth:`SliceClassifier.embed_with_map`)
    and the region of each slice the CNN saw (``(row0, col0, row1, col1)`` pixels of ``volume``'s slices).

    ``volume``: the series as ``SliceStore.read_series`` gives it, ``(N, H, W, 3)`` uint8 in position
    order; ``input_config``: the resolved ``cnn.input``. Slices go through exactly the training
    preprocessing (:func:`pedetect.data.dataset.series_inputs`) ``batch_size`` at a time, so memory is
    one volume plus one batch; autocast on CUDA, ``torch.inference_mode``. The stage-2 embedding pass
    and ``predict`` both call this. With ``cnn.input.lung_crop`` the series' lung box is computed
    here from the whole volume (``windows``: the [level, width] windows it was made with).
    """
    device = torch.device(device)
    n = len(volume)
    embeddings = np.zeros((n, model.embedding_dim), dtype=np.float16)
    logits = np.zeros(n, dtype=np.float32)
    activations = None
    dtype = autocast_dtype(device)
    box = series_lung_box(volume, input_config, windows)
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            # One slice of context each side, so adjacent-slice inputs see their true neighbours.
            lo, hi = max(start - 1, 0), min(stop + 1, n)
            inputs = series_inputs(volume[lo:hi], input_config, box)[start - lo : stop - lo]
            if maps:
                embedding, logit, activation = model.embed_with_map(inputs.to(device, non_blocking=True))
                if activations is None:
                    activations = np.zeros((n, *activation.shape[1:]), dtype=np.float32)
                activations[start:stop] = activation.float().cpu().numpy()
            else:
                embedding, logit = model.embed(inputs.to(device, non_blocking=True))
            embeddings[start:stop] = embedding.float().cpu().numpy()
            logits[start:stop] = logit.float().cpu().numpy()
    if not maps:
        return embeddings, logits
    if activations is None:
        activations = np.zeros((0, 1, 1), dtype=np.float32)
    return embeddings, logits, activations, input_region(volume.shape[1], volume.shape[2], input_config, box)
