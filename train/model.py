"""The course's ContextUnet, branch-free so that it exports to ONNX as one static graph.

Every submodule is built in `__init__` and `forward` has no Python control flow
that depends on its inputs (the seed built a Conv2d inside `forward`, which
exported as an unknown `aten::random`). Layout and sizes follow docs/contract.md.

Shapes: F = n_feat, K = n_classes, C = in_channels, H = image_size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network; stored in checkpoints and ONNX metadata."""

    in_channels: int = 3
    n_feat: int = 64
    n_classes: int = 9
    image_size: int = 16
    num_train_timesteps: int = 500

    def __post_init__(self) -> None:
        for name in ("in_channels", "n_feat", "n_classes", "image_size", "num_train_timesteps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"model config: {name} must be a positive integer, got {v!r}")
        if self.image_size % 4:
            raise ValueError(f"model config: image_size must be divisible by 4, got {self.image_size}")
        if self.n_feat % 8:
            # GroupNorm(8, F) needs F divisible by 8.
            raise ValueError(f"model config: n_feat must be divisible by 8, got {self.n_feat}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"model config: unknown keys {', '.join(unknown)}")
        return cls(**d)


class ResidualConvBlock(nn.Module):
    """Two Conv3x3-BatchNorm-GELU layers; with `is_res`, a scaled residual connection."""

    def __init__(self, in_channels: int, out_channels: int, is_res: bool = False) -> None:
        super().__init__()
        self.is_res = is_res
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, 1, 1), nn.BatchNorm2d(out_channels), nn.GELU()
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(out_channels, out_channels, 3, 1, 1), nn.BatchNorm2d(out_channels), nn.GELU()
        )
        # Built here, not in forward: the shape decision is static, so the graph is too.
        if is_res and in_channels != out_channels:
            self.shortcut: nn.Module = nn.Conv2d(in_channels, out_channels, 1, 1, 0)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.conv1(x))  # (B, out, H, W)
        if self.is_res:  # a constructor flag, not data: traced away
            return (self.shortcut(x) + h) / 1.414
        return h


class UnetDown(nn.Module):
    """Two ResidualConvBlocks, then halve the resolution."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(
            ResidualConvBlock(in_channels, out_channels),
            ResidualConvBlock(out_channels, out_channels),
            nn.MaxPool2d(2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class UnetUp(nn.Module):
    """Concatenate the skip connection, double the resolution, two ResidualConvBlocks."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.ConvTranspose2d(in_channels, out_channels, 2, 2),
            ResidualConvBlock(out_channels, out_channels),
            ResidualConvBlock(out_channels, out_channels),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.model(torch.cat((x, skip), 1))


class EmbedFC(nn.Module):
    """A two-layer MLP embedding a vector (time or class weights) into `out_dim` channels."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class ContextUnet(nn.Module):
    """The class-conditional U-Net of the course, with the ONNX contract's signature.

    forward(sample (B, C, H, W), timestep (B,) raw index 0..T-1, context (B, K) weights)
    -> model_output (B, C, H, W). An all-zero context is the unconditional model.
    """

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ModelConfig()
        C, F, K, H = config.in_channels, config.n_feat, config.n_classes, config.image_size
        self.init_conv = ResidualConvBlock(C, F, is_res=True)
        self.down1 = UnetDown(F, F)
        self.down2 = UnetDown(F, 2 * F)
        self.to_vec = nn.Sequential(nn.AvgPool2d(H // 4), nn.GELU())
        self.timeembed1 = EmbedFC(1, 2 * F)
        self.timeembed2 = EmbedFC(1, F)
        self.contextembed1 = EmbedFC(K, 2 * F)
        self.contextembed2 = EmbedFC(K, F)
        self.up0 = nn.Sequential(
            nn.ConvTranspose2d(2 * F, 2 * F, H // 4, H // 4), nn.GroupNorm(8, 2 * F), nn.ReLU()
        )
        self.up1 = UnetUp(4 * F, F)
        self.up2 = UnetUp(2 * F, F)
        self.out = nn.Sequential(
            nn.Conv2d(2 * F, F, 3, 1, 1), nn.GroupNorm(8, F), nn.ReLU(), nn.Conv2d(F, C, 3, 1, 1)
        )
        # A buffer, not a Python float, keeps 1/T inside the graph as one constant.
        self.register_buffer("inv_timesteps", torch.tensor(1.0 / config.num_train_timesteps), persistent=False)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        F = self.config.n_feat
        t = (timestep.to(sample.dtype) * self.inv_timesteps).reshape(-1, 1)  # (B, 1) in [0, 1)
        c = context.to(sample.dtype)  # (B, K)
        x = self.init_conv(sample)  # (B, F, H, W)
        d1 = self.down1(x)  # (B, F, H/2, W/2)
        d2 = self.down2(d1)  # (B, 2F, H/4, W/4)
        h = self.to_vec(d2)  # (B, 2F, 1, 1)
        cemb1 = self.contextembed1(c).reshape(-1, 2 * F, 1, 1)
        temb1 = self.timeembed1(t).reshape(-1, 2 * F, 1, 1)
        cemb2 = self.contextembed2(c).reshape(-1, F, 1, 1)
        temb2 = self.timeembed2(t).reshape(-1, F, 1, 1)
        u1 = self.up0(h)  # (B, 2F, H/4, W/4)
        u2 = self.up1(cemb1 * u1 + temb1, d2)  # (B, F, H/2, W/2)
        u3 = self.up2(cemb2 * u2 + temb2, d1)  # (B, F, H, W)
        return self.out(torch.cat((u3, x), 1))  # (B, C, H, W)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or frozen, e.g. an EMA copy)."""
    return sum(p.numel() for p in model.parameters())
