"""``pedetect_small_cnn``: a small fully-convolutional slice classifier for CPU training from scratch.

ImageNet backbones (resnet, efficientnet) halve the resolution twice in their stem, so a filling
defect 4–6 pixels across is a pixel or less by their first block: with pretrained weights and
hours of GPU that still works on real CTPA at 512 px, but a from-scratch model trained for minutes
on a CPU learns the slice's level in the series instead (docs/stage1_notes.md). This net keeps full
resolution for its first two convolutions, halves it only between stages, and max-pools the last
feature map, so one clear defect anywhere on the slice is enough to fire it: a detector-shaped
alternative to resnet-style stems, and the demo recipe's backbone (measurements in docs/stage1_notes.md).

It is registered with timm whenever :mod:`pedetect.models.backbone` checks or creates a backbone
(:func:`register`), so it is chosen like any
timm backbone (``cnn.backbone.name: pedetect_small_cnn``, ``kwargs: {widths: [...]}``) and has the
timm feature-extractor interface that :class:`~pedetect.models.slice_classifier.SliceClassifier` uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _conv_bn_relu(in_chans: int, out_chans: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chans, out_chans, 3, padding=1, bias=False), nn.BatchNorm2d(out_chans), nn.ReLU(inplace=True)
    )


class SmallSliceCNN(nn.Module):
    """Stages of two 3×3 conv-BN-ReLU, 2×2 max pooling between stages, global max (or average) pooling."""

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 0,
        widths: Sequence[int] = (16, 32, 64, 128),
        global_pool: str = "max",
        drop_rate: float = 0.0,
        space_to_depth: int = 1,
    ):
        super().__init__()
        if int(space_to_depth) < 1:
            raise ValueError(f"pedetect_small_cnn: space_to_depth must be 1 or more, got {space_to_depth}")
        if not widths or any(int(w) < 1 for w in widths):
            raise ValueError(f"pedetect_small_cnn: widths must be positive channel counts, got {list(widths)}")
        if global_pool not in ("max", "avg"):
            raise ValueError(f"pedetect_small_cnn: global_pool must be 'max' or 'avg', got {global_pool!r}")
        # Space-to-depth (pixel unshuffle) halves the resolution without discarding a pixel: each
        # 2×2 block becomes 4 channels, so a defect a few pixels across is still all there for the
        # first convolution, at a quarter of the cost of convolving at full resolution. Measured on the
        # demo data it learns less in the same steps (docs/stage1_notes.md), so the default is off.
        self.space_to_depth = nn.PixelUnshuffle(int(space_to_depth)) if int(space_to_depth) > 1 else nn.Identity()
        stages: list[nn.Module] = []
        previous = in_chans * int(space_to_depth) ** 2
        for i, width in enumerate(int(w) for w in widths):
            layers: list[nn.Module] = [nn.MaxPool2d(2)] if i else []
            layers += [_conv_bn_relu(previous, width), _conv_bn_relu(width, width)]
            stages.append(nn.Sequential(*layers))
            previous = width
        self.stages = nn.Sequential(*stages)
        self.num_features = previous
        self.global_pool = nn.AdaptiveMaxPool2d(1) if global_pool == "max" else nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(previous, num_classes) if num_classes else nn.Identity()
        # What backbone.load_backbone_weights looks up in timm models.
        self.pretrained_cfg = {"first_conv": "stages.0.0.0", "classifier": "head"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.space_to_depth(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.global_pool(x).flatten(1))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def register() -> None:
    """Register ``pedetect_small_cnn`` with timm (once)."""
    import timm  # imported when a backbone is named or built (pedetect.models.backbone says why)
    from timm.models import register_model

    if timm.is_model("pedetect_small_cnn"):
        return

    def pedetect_small_cnn(pretrained: bool = False, **kwargs) -> SmallSliceCNN:
        if pretrained:
            raise ValueError(
                "pedetect_small_cnn has no pretrained weights; give cnn.backbone.weights a local file instead"
            )
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "drop_path_rate"):
            kwargs.pop(key, None)  # timm passes these to every model; nothing here uses them
        return SmallSliceCNN(**kwargs)

    pedetect_small_cnn.__module__ = __name__
    register_model(pedetect_small_cnn)
