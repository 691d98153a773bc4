"""Rotary position embeddings, rotate-half convention (as HF Llama / GPT-NeoX).

A pair of channels (i, i + head_dim/2) is rotated by the angle ``position * theta**(-2i/head_dim)``.
With position interpolation (Chen et al., 2023) positions are first multiplied by a scale below 1
(train length / target length), so a longer sequence spans only the angles seen in training.
"""

from __future__ import annotations

import torch
from torch import nn


def inv_frequencies(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """The rotation speed of each channel pair: ``theta ** (-2i / head_dim)``, shape (head_dim/2,)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim))


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's angles, shape positions.shape + (head_dim,), float32."""
    freqs = positions.float()[..., None] * inv_freq  # (..., hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., hs): both halves of a pair share an angle
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, head_dim) by tables broadcastable to it; computed in at least float32 (half precision
    is upcast, float64 is kept), returned in x's dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * cos + rotate_half(xf) * sin).type_as(x)


class Rotary(nn.Module):
    """Cached cos/sin tables indexed by position; grown on demand, so positions are not capped.
    ``scale`` multiplies every position (1: plain RoPE; below 1: position interpolation)."""

    def __init__(self, head_dim: int, theta: float, length: int, scale: float = 1.0) -> None:
        super().__init__()
        self.head_dim, self.theta, self.scale = head_dim, theta, scale
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.build(length)

    def build(self, length: int, device: torch.device | None = None) -> None:
        """(Re)compute the tables for positions [0, length) on ``device`` (default: where they are)."""
        device = device or self.cos.device
        positions = torch.arange(length, device=device) * self.scale
        self.cos, self.sin = rope_tables(positions, inv_frequencies(self.head_dim, self.theta, device))

    def _apply(self, fn, recurse: bool = True):
        """After ``.to()``, ``.half()``, ``.cuda()`` and the like: the tables stay float32, made anew
        where the move cast them to half precision (as ``build`` makes them when they grow), so a model
        gives the same logits before and after its tables grow."""
        super()._apply(fn, recurse)
        if self.cos.dtype in (torch.float16, torch.bfloat16):
            self.build(self.cos.shape[0])
        return self

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for positions ``pos`` (B, T), shaped (B, 1, T, hs) to broadcast over heads."""
        return self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)
