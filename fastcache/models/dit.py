"""A small class-conditional DiT (Peebles & Xie, "Scalable Diffusion Models with
Transformers", arXiv 2212.09748), written here for fastcache's tests and demos.

The structure follows the paper's DiT with adaLN-Zero blocks (Sec. 3.2, Fig. 3):

    x (B, C, H, W) --patchify--> (B, N, D) + fixed 2-D sin-cos pos_embed
    c = t_embedder(t) + y_embedder(y)                     (B, D)
    for block in self.blocks: x = block(x, c)            (B, N, D)
    final_layer(x, c) --unpatchify--> (B, C, H, W)       epsilon prediction

The caching runtime relies on these exact names: ``DiT.blocks`` (an ``nn.ModuleList``
looped as above), ``DiTBlock.norm1`` / ``attn`` / ``norm2`` / ``mlp`` /
``adaLN_modulation`` and the six-way chunk order (shift_msa, scale_msa, gate_msa,
shift_mlp, scale_mlp, gate_mlp). The output is epsilon only (no learned sigma).

Example::

    model = DiT(input_size=16, patch_size=2, in_channels=1, hidden_size=128, depth=6, num_heads=4)
    eps = model(torch.randn(4, 1, 16, 16), torch.tensor([999, 500, 10, 0]), torch.tensor([0, 3, 7, 10]))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DiT", "DiTBlock", "DiTConfig", "modulate", "sincos_pos_embed_2d"]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: ``x (B, N, D) * (1 + scale (B, D)) + shift (B, D)``."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """Sin-cos embedding of 1-D positions: ``(M,) -> (M, dim)``, first half sin, second cos."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positional embedding ``(grid_size**2, dim)``, row-major tokens.

    Half of the channels encode the row (h) coordinate, half the column (w) coordinate,
    as in MAE / DiT. ``dim`` must be divisible by 4.
    """
    if dim % 4 != 0:
        raise ValueError(f"sincos_pos_embed_2d: dim={dim} must be divisible by 4 (two axes x sin/cos)")
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    emb = np.concatenate([_sincos_1d(dim // 2, rows), _sincos_1d(dim // 2, cols)], axis=1)
    return torch.from_numpy(emb).float()


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Constructor arguments of :class:`DiT`; saved next to the weights as JSON."""

    input_size: int = 16
    patch_size: int = 2
    in_channels: int = 1
    hidden_size: int = 128
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10
    class_dropout_prob: float = 0.1

    def __post_init__(self):
        positive = (
            "input_size",
            "patch_size",
            "in_channels",
            "hidden_size",
            "depth",
            "num_heads",
            "num_classes",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DiTConfig.{name}={value!r}: must be a positive int")
        if self.input_size % self.patch_size:
            raise ValueError(
                f"DiTConfig.input_size={self.input_size} is not divisible by patch_size={self.patch_size}: "
                "choose a patch size that tiles the image"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"DiTConfig.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(
                f"DiTConfig.hidden_size={self.hidden_size} must be divisible by 4 (2-D sin-cos pos embedding)"
            )
        if not self.mlp_ratio > 0:
            raise ValueError(f"DiTConfig.mlp_ratio={self.mlp_ratio!r}: must be > 0")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"DiTConfig.class_dropout_prob={self.class_dropout_prob!r}: must be in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"DiTConfig.from_dict: unknown keys {sorted(unknown)}; known keys are {sorted(known)}")
        return cls(**d)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: ``(B, C, H, W) -> (B, (H/p)*(W/p), D)`` via a strided Conv2d."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps ``(B,)`` -> ``(B, D)``: sinusoidal frequencies, then a 2-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.frequency_size = frequency_size
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def frequency_embedding(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.frequency_embedding(t).to(self.mlp[0].weight.dtype)
        return self.mlp(freq)


class LabelEmbedder(nn.Module):
    """Class labels ``(B,)`` -> ``(B, D)``. Row ``num_classes`` of the table is the null
    (unconditional) class used for classifier-free guidance; during training labels are
    replaced by it with probability ``dropout_prob``."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


class Attention(nn.Module):
    """Multi-head self-attention on ``(B, N, D)`` with a fused qkv projection and SDPA."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, N, D/H)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    """Linear -> GELU(tanh) -> Linear."""

    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block (DiT paper Sec. 3.2): ``forward(x (B, N, D), c (B, D)) -> (B, N, D)``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN shift/scale, then a linear map of each token to its ``p*p*C`` patch values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Class-conditional DiT predicting epsilon: ``forward(x (B, C, H, W), t (B,), y (B,)) -> (B, C, H, W)``.

    ``t`` are DDPM timesteps in ``[0, 1000)`` (int or float); ``y`` are long labels in
    ``[0, num_classes]`` where ``num_classes`` is the null class (classifier-free guidance).
    ``self.config`` is a frozen :class:`DiTConfig`.
    """

    def __init__(
        self,
        input_size: int = 16,
        patch_size: int = 2,
        in_channels: int = 1,
        hidden_size: int = 128,
        depth: int = 6,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        num_classes: int = 10,
        class_dropout_prob: float = 0.1,
    ):
        super().__init__()
        self.config = DiTConfig(
            input_size=input_size,
            patch_size=patch_size,
            in_channels=in_channels,
            hidden_size=hidden_size,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=float(mlp_ratio),
            num_classes=num_classes,
            class_dropout_prob=float(class_dropout_prob),
        )
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.grid_size = input_size // patch_size

        self.patch_embed = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed, not learned; persistent=False keeps it out of the shipped state_dict.
        self.register_buffer(
            "pos_embed",
            sincos_pos_embed_2d(hidden_size, self.grid_size).unsqueeze(0),
            persistent=False,
        )
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def x_embedder(self) -> PatchEmbed:
        """Alias of ``patch_embed`` under the reference DiT's name (not a second module)."""
        return self.patch_embed

    @classmethod
    def from_config(cls, config: DiTConfig | dict[str, Any]) -> DiT:
        if isinstance(config, dict):
            config = DiTConfig.from_dict(config)
        return cls(**config.to_dict())

    def initialize_weights(self) -> None:
        """Xavier-uniform linears, then adaLN-Zero: every modulation and the final
        projection start at zero, so each block is the identity at initialisation."""

        def _xavier(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_xavier)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, p*p*C) -> (B, C, H, W)``, inverse of the row-major patch order."""
        B, p, g, C = x.shape[0], self.patch_size, self.grid_size, self.out_channels
        x = x.reshape(B, g, g, p, p, C)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(B, C, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)
        return self.unpatchify(x)
