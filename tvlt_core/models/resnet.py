"""ResNet backbone (stage-4 feature maps) for TVP, with the Hugging Face ``ResNetBackbone`` parameter names.

Plain PyTorch, no torchvision: the module tree mirrors ``transformers``' ResNet so the backbone weights inside a
TVP checkpoint (``model.vision_model.backbone.*``) load by name, BatchNorm buffers included:

    embedder.embedder.{convolution, normalization}                     7x7/2 stem conv + BN + act, then 3x3/2 max-pool
    encoder.stages.{s}.layers.{i}.shortcut.{convolution, normalization} 1x1 projection where the shape changes
    encoder.stages.{s}.layers.{i}.layer.{j}.{convolution, normalization}  bottleneck 1x1 -> 3x3 -> 1x1 (or basic 3x3 x2)

``downsample_in_bottleneck`` puts a stage's stride-2 on the first 1x1 conv (MSRA / Caffe style, what TVP's
original backbone used) instead of the 3x3 conv (torchvision style).

BatchNorm always runs on its running statistics, also in ``train()`` mode: TVP's backbone sees the 48 frames of one
clip as a "batch", so batch statistics would let frames (and, batched, different videos) normalise each other,
and a batch would no longer equal its samples run one by one. The affine weights still train.

Shape legend:
    N  images (TVP: batch x frames)        C  input channels (3)
    H, W  input height / width             C4 hidden_sizes[-1] (2048 for ResNet-50)
    stage-4 output is (N, C4, H/32, W/32)
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


# --------------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class ResNetConfig:
    """The ``backbone_config`` section of a TVP ``config.json`` (Hugging Face ``ResNetConfig`` fields we use)."""

    num_channels: int = 3
    embedding_size: int = 64
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])
    depths: list[int] = field(default_factory=lambda: [3, 4, 6, 3])
    layer_type: Literal["bottleneck", "basic"] = "bottleneck"
    hidden_act: Literal["relu", "gelu", "silu"] = "relu"
    downsample_in_first_stage: bool = False
    downsample_in_bottleneck: bool = False
    out_features: list[str] = field(default_factory=lambda: ["stage4"])

    def __post_init__(self) -> None:
        if len(self.hidden_sizes) != len(self.depths):
            raise ValueError(
                f"backbone_config: hidden_sizes {self.hidden_sizes} and depths {self.depths} differ in length"
            )
        if self.layer_type not in ("bottleneck", "basic"):
            raise ValueError(f"backbone_config.layer_type={self.layer_type!r}: use 'bottleneck' or 'basic'")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"backbone_config.hidden_act={self.hidden_act!r}: use one of {sorted(_ACTIVATIONS)}")
        last = f"stage{len(self.depths)}"
        if list(self.out_features) != [last]:
            # TVP's grid encoder reads hidden_sizes[-1] channels, i.e. the last stage only.
            raise ValueError(f"backbone_config.out_features={self.out_features}: TVP uses the last stage, [{last!r}]")

    @property
    def stage_names(self) -> list[str]:
        return ["stem"] + [f"stage{i}" for i in range(1, len(self.depths) + 1)]

    def to_dict(self) -> dict:
        """Hugging Face layout (``model_type``, ``out_indices`` and ``stage_names`` included)."""
        out = dataclasses.asdict(self)
        out["model_type"] = "resnet"
        out["stage_names"] = self.stage_names
        out["out_indices"] = [self.stage_names.index(name) for name in self.out_features]
        return out

    @classmethod
    def from_dict(cls, values: dict) -> ResNetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        ignored = sorted(set(values) - known)
        if ignored:
            log.debug("backbone_config: ignoring keys %s", ignored)
        if values.get("model_type", "resnet") != "resnet":
            raise ValueError(f"backbone_config.model_type={values['model_type']!r}: only 'resnet' is implemented")
        kwargs = {k: v for k, v in values.items() if k in known}
        if "out_features" not in kwargs and "out_indices" in values:
            names = ["stem"] + [f"stage{i}" for i in range(1, len(kwargs.get("depths", cls().depths)) + 1)]
            kwargs["out_features"] = [names[i] for i in values["out_indices"]]
        return cls(**kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Submodules
# --------------------------------------------------------------------------------------------------------------------
class ResNetConvLayer(nn.Module):
    """Conv (no bias, "same" padding) -> BatchNorm -> activation (or none). (N, Cin, H, W) -> (N, Cout, H/s, W/s)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        activation: str | None = "relu",
    ):
        super().__init__()
        self.convolution = nn.Conv2d(
            in_channels, out_channels, kernel_size=kernel_size, stride=stride, padding=kernel_size // 2, bias=False
        )
        self.normalization = nn.BatchNorm2d(out_channels)
        self.activation = _ACTIVATIONS[activation]() if activation is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.normalization(self.convolution(x)))


class ResNetEmbeddings(nn.Module):
    """Stem: 7x7/2 conv + BN + act, 3x3/2 max-pool. (N, C, H, W) -> (N, embedding_size, H/4, W/4)."""

    def __init__(self, config: ResNetConfig):
        super().__init__()
        self.embedder = ResNetConvLayer(config.num_channels, config.embedding_size, 7, 2, config.hidden_act)
        self.pooler = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.num_channels = config.num_channels

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} channels, the backbone expects {self.num_channels}"
            )
        return self.pooler(self.embedder(pixel_values))


class ResNetShortCut(nn.Module):
    """1x1 projection (+ stride) of the residual where a layer changes channels or resolution."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2):
        super().__init__()
        self.convolution = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)
        self.normalization = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalization(self.convolution(x))


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    if in_channels != out_channels or stride != 1:
        return ResNetShortCut(in_channels, out_channels, stride=stride)
    return nn.Identity()


class ResNetBasicLayer(nn.Module):
    """Two 3x3 convs plus the residual (ResNet-18/34 layer)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, activation: str = "relu"):
        super().__init__()
        self.shortcut = _shortcut(in_channels, out_channels, stride)
        self.layer = nn.Sequential(
            ResNetConvLayer(in_channels, out_channels, stride=stride, activation=activation),
            ResNetConvLayer(out_channels, out_channels, activation=None),
        )
        self.activation = _ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.layer(x) + self.shortcut(x))


class ResNetBottleNeckLayer(nn.Module):
    """1x1 reduce (by 4) -> 3x3 -> 1x1 expand, plus the residual (ResNet-50 layer).

    The stride sits on the first 1x1 conv when ``downsample_in_bottleneck`` is set, else on the 3x3 conv.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        activation: str = "relu",
        reduction: int = 4,
        downsample_in_bottleneck: bool = False,
    ):
        super().__init__()
        reduced = out_channels // reduction
        self.shortcut = _shortcut(in_channels, out_channels, stride)
        self.layer = nn.Sequential(
            ResNetConvLayer(in_channels, reduced, 1, stride if downsample_in_bottleneck else 1, activation),
            ResNetConvLayer(reduced, reduced, 3, 1 if downsample_in_bottleneck else stride, activation),
            ResNetConvLayer(reduced, out_channels, 1, activation=None),
        )
        self.activation = _ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.layer(x) + self.shortcut(x))


class ResNetStage(nn.Module):
    """``depth`` layers; the first one changes channels and applies the stage's stride."""

    def __init__(self, config: ResNetConfig, in_channels: int, out_channels: int, stride: int, depth: int):
        super().__init__()
        act = config.hidden_act
        if config.layer_type == "bottleneck":
            first = ResNetBottleNeckLayer(
                in_channels, out_channels, stride, act, downsample_in_bottleneck=config.downsample_in_bottleneck
            )
            rest = [ResNetBottleNeckLayer(out_channels, out_channels, activation=act) for _ in range(depth - 1)]
        else:
            first = ResNetBasicLayer(in_channels, out_channels, stride, act)
            rest = [ResNetBasicLayer(out_channels, out_channels, activation=act) for _ in range(depth - 1)]
        self.layers = nn.Sequential(first, *rest)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ResNetEncoder(nn.Module):
    """Stages 1..4; stage 1 keeps the resolution unless ``downsample_in_first_stage``, the others halve it."""

    def __init__(self, config: ResNetConfig):
        super().__init__()
        in_sizes = [config.embedding_size] + config.hidden_sizes[:-1]
        strides = [2 if config.downsample_in_first_stage else 1] + [2] * (len(config.depths) - 1)
        self.stages = nn.ModuleList(
            ResNetStage(config, c_in, c_out, stride, depth)
            for c_in, c_out, stride, depth in zip(in_sizes, config.hidden_sizes, strides, config.depths)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x


# --------------------------------------------------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------------------------------------------------
class ResNetBackbone(nn.Module):
    """Last-stage feature map of a ResNet: (N, C, H, W) -> (N, hidden_sizes[-1], H/32, W/32).

    Parameter names equal ``transformers``' ``ResNetBackbone`` (no classifier, no pooler).
    """

    def __init__(self, config: ResNetConfig):
        super().__init__()
        self.config = config
        self.embedder = ResNetEmbeddings(config)
        self.encoder = ResNetEncoder(config)
        self.reset_parameters()

    @property
    def out_channels(self) -> int:
        return self.config.hidden_sizes[-1]

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan_out) convs, BatchNorm weight 1 / bias 0, as the reference initialises a ResNet."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def train(self, mode: bool = True) -> ResNetBackbone:
        """Switch the rest as asked, but keep BatchNorm on running statistics (see the module docstring)."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embedder(pixel_values))


# --------------------------------------------------------------------------------------------------------------------
# Size presets
# --------------------------------------------------------------------------------------------------------------------
def resnet50_config(**overrides) -> ResNetConfig:
    """ResNet-50 as in ``Intel/tvp-base`` (bottleneck, depths 3-4-6-3, 2048 stage-4 channels)."""
    return ResNetConfig(**overrides)


def resnet_tiny_config(**overrides) -> ResNetConfig:
    """One bottleneck per stage, 16..128 channels: a backbone that runs a CPU training step in milliseconds."""
    values = dict(embedding_size=16, hidden_sizes=[32, 64, 96, 128], depths=[1, 1, 1, 1])
    return ResNetConfig(**{**values, **overrides})
