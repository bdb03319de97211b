"""diffusers' UNet2DModel behind the mdx model contract, and the registry of architectures.

    net = build_network("unet2d", UNet2DConfig(n_classes=9))
    eps = net(sample, timestep, context)       # (B, C, H, W), (B,) float, (B, K) -> (B, C, H, W)

Class conditioning is diffusers' own: a UNet2DModel with `num_class_embeds = K` holds a
(K, D) class-embedding table whose row is added to the time embedding. Here the table is
applied to the contract's `context` as a linear map, `context @ table` (D = the time
embedding's width), so that

- a one-hot context is exactly diffusers' `class_labels` lookup of that class;
- a multi-hot context adds the rows (a mix, as ContextUnet's multi-hot does);
- an all-zero context adds nothing: the unconditional model, which classifier-free-guidance
  dropout trains (the trainer zeroes the context of the dropped images).

The table keeps diffusers' parameter name `class_embedding.weight`, so the wrapped
network's state dict, prefixed `unet.`, is a diffusers UNet2DModel's state dict: an
mdx-trained unet2d loads into diffusers unchanged and a diffusers folder loads into this
wrapper (mdx.export.diffusers_import). A UNet2DModel without class embedding (an
unconditional diffusers model) is wrapped with one pseudo-class whose context is ignored
(the contract's K = 1; docs/contract.md).

The timestep enters raw (0..T-1, float): UNet2DModel's sinusoidal projection takes the
index itself, so nothing is normalised in the graph.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from mdx.train.model import ContextUnet, ModelConfig

ARCHITECTURES = ("contextunet", "unet2d")
DEFAULT_ARCHITECTURE = "contextunet"


def _positive_int(name: str, v: object) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"unet2d config: {name} must be a positive integer, got {v!r}")
    return v


@dataclass(frozen=True)
class UNet2DConfig:
    """The UNet2DModel of an mdx unet2d run; stored in checkpoints and ONNX metadata.

    Level i has `block_out_channels[i]` channels at resolution H / 2**i (the last level does
    not downsample). `attention_levels` lists the levels whose down and up blocks have
    self-attention (AttnDownBlock2D / AttnUpBlock2D); the middle block at the lowest
    resolution has attention when `mid_attention`. GroupNorm uses `norm_num_groups` groups,
    so every width must be divisible by it. The defaults (32/64/128 channels, attention at
    8x8 and 4x4, one layer per block) suit 16x16 images on a CPU.
    """

    in_channels: int = 3
    n_classes: int = 9
    image_size: int = 16
    num_train_timesteps: int = 500
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    attention_levels: tuple[int, ...] = (1, 2)
    mid_attention: bool = True
    norm_num_groups: int = 8
    attention_head_dim: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        object.__setattr__(self, "attention_levels", tuple(sorted(set(self.attention_levels))))
        for name in ("in_channels", "n_classes", "image_size", "num_train_timesteps", "layers_per_block",
                     "norm_num_groups", "attention_head_dim"):
            _positive_int(name, getattr(self, name))
        if not self.block_out_channels:
            raise ValueError("unet2d config: block_out_channels must list at least one width")
        for w in self.block_out_channels:
            _positive_int("block_out_channels", w)
            if w % self.norm_num_groups:
                raise ValueError(f"unet2d config: every width must be divisible by norm_num_groups="
                                 f"{self.norm_num_groups} (GroupNorm), got {list(self.block_out_channels)}")
        levels = len(self.block_out_channels)
        bad = [i for i in self.attention_levels if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < levels]
        if bad:
            raise ValueError(f"unet2d config: attention_levels {list(self.attention_levels)} must be level "
                             f"indices 0..{levels - 1}")
        if self.image_size % 2 ** (levels - 1):
            raise ValueError(f"unet2d config: image_size {self.image_size} must be divisible by "
                             f"2**(levels - 1) = {2 ** (levels - 1)} for {levels} levels")
        if not isinstance(self.mid_attention, bool):
            raise ValueError(f"unet2d config: mid_attention must be true or false, got {self.mid_attention!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_out_channels"], d["attention_levels"] = list(self.block_out_channels), list(self.attention_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNet2DConfig":
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unet2d config: unknown keys {', '.join(unknown)}")
        return cls(**d)

    def diffusers_config(self) -> dict[str, Any]:
        """The UNet2DModel constructor arguments (what its config.json holds)."""
        levels = range(len(self.block_out_channels))
        attn = set(self.attention_levels)
        down = [("AttnDownBlock2D" if i in attn else "DownBlock2D") for i in levels]
        up = [("AttnUpBlock2D" if i in attn else "UpBlock2D") for i in reversed(levels)]
        return dict(sample_size=self.image_size, in_channels=self.in_channels, out_channels=self.in_channels,
                    down_block_types=tuple(down), up_block_types=tuple(up),
                    block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                    norm_num_groups=self.norm_num_groups, attention_head_dim=self.attention_head_dim,
                    add_attention=self.mid_attention, num_class_embeds=self.n_classes)


class ContextEmbedding(nn.Module):
    """diffusers' class-embedding table applied to class weights: (B, K) @ (K, D) -> (B, D).

    Replaces UNet2DModel's nn.Embedding under the same parameter name, so the state dicts
    agree; a one-hot row gives the table's row for that class, as the lookup does.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())  # (K, D)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return context.to(self.weight.dtype) @ self.weight  # (B, D)


@dataclass(frozen=True)
class ContractShape:
    """The contract sizes of a wrapped UNet2DModel (what the exporter and validator read)."""

    in_channels: int
    n_classes: int
    image_size: int
    num_train_timesteps: int
    extra: dict = field(default_factory=dict, compare=False)


class ContextUNet2D(nn.Module):
    """A diffusers UNet2DModel with the contract's forward(sample, timestep, context).

    `unet` is class-conditional (num_class_embeds = K, its table applied to the context)
    or unconditional (no class embedding; the contract's one pseudo-class, context ignored).
    `config` is a UNet2DConfig for mdx-trained networks, else the contract sizes.
    """

    def __init__(self, unet: nn.Module, config: UNet2DConfig | ContractShape) -> None:
        super().__init__()
        table = getattr(unet, "class_embedding", None)
        if table is not None and not isinstance(table, nn.Embedding):
            raise ValueError(f"the UNet2DModel's class embedding is {type(table).__name__}; only a "
                             "num_class_embeds table (nn.Embedding) can take class weights")
        self.conditional = table is not None
        if self.conditional:
            unet.class_embedding = ContextEmbedding(table.weight)
        self.unet = unet
        self.config = config
        # A "learned" time embedding is a table indexed by the integer timestep.
        self.integer_timestep = getattr(unet.config, "time_embedding_type", "positional") == "learned"

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # An unconditional UNet ignores the context; the graph still takes it (the contract).
        labels = context.to(sample.dtype) if self.conditional else None  # (B, K), weights for the table
        t = timestep.round().long() if self.integer_timestep else timestep.to(sample.dtype)  # (B,)
        return self.unet(sample, t, class_labels=labels, return_dict=False)[0]


DIFFUSERS_HINT = "the unet2d architecture needs diffusers: pip install 'microdiffusion[train]'"


def unet2d_class() -> type:
    """diffusers' UNet2DModel; ValueError with the install hint when diffusers is missing."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise ValueError(DIFFUSERS_HINT) from None
    return UNet2DModel


def build_unet2d(config: UNet2DConfig) -> ContextUNet2D:
    """A freshly initialised class-conditional UNet2DModel for mdx training."""
    return ContextUNet2D(unet2d_class()(**config.diffusers_config()), config)


# --- the registry the trainer, checkpoints and exporter choose from -----------------------------

CONFIGS = {"contextunet": ModelConfig, "unet2d": UNet2DConfig}


def check_architecture(arch: str) -> str:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return arch


def config_from_dict(arch: str, d: dict) -> ModelConfig | UNet2DConfig:
    """The network config of `arch` from its stored dict (ValueError names a bad key or value)."""
    return CONFIGS[check_architecture(arch)].from_dict(d)


def build_network(arch: str, config: ModelConfig | UNet2DConfig) -> nn.Module:
    """The network of architecture `arch` ("contextunet" or "unet2d") built from its config."""
    expected = CONFIGS[check_architecture(arch)]
    if not isinstance(config, expected):
        raise ValueError(f"architecture {arch} takes a {expected.__name__}, got {type(config).__name__}")
    return ContextUnet(config) if arch == "contextunet" else build_unet2d(config)


def architecture_name(model: nn.Module) -> str:
    """The registry name of a built network (for logs and metadata)."""
    return "unet2d" if isinstance(model, ContextUNet2D) else "contextunet"


def network_summary(model: nn.Module) -> str:
    """One line naming a built network and its size (for logs and the ONNX doc string)."""
    if not isinstance(model, ContextUNet2D):
        return f"the course's ContextUnet, n_feat={model.config.n_feat}"
    cfg = model.unet.config
    attention = [i for i, name in enumerate(cfg.down_block_types) if name.startswith("Attn")]
    conditioning = f"{cfg.num_class_embeds}-class table" if model.conditional else "unconditional"
    return (f"diffusers UNet2DModel, channels {'/'.join(map(str, cfg.block_out_channels))}, "
            f"{cfg.layers_per_block} layer(s) per block, attention at levels "
            f"{','.join(map(str, attention)) or 'none'}{' and the middle' if cfg.add_attention else ''}, "
            f"{conditioning}")


def architecture_of(config: ModelConfig | UNet2DConfig) -> str:
    """The registry name of a network config."""
    return "unet2d" if isinstance(config, UNet2DConfig) else "contextunet"
