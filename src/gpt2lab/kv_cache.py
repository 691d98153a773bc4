"""Preallocated key/value cache for one attention layer.

Tokens are written at slot ``t % size`` where t is the time step (the token's index in the padded
batch sequence). A cache with ``size`` >= the generation length never wraps; a sliding-window layer
gets ``size = window`` and rolls, so its memory stays flat however long generation runs. Each slot
remembers the time step it holds, and the attention mask is derived from those times, so the order of
slots never matters (keys carry their rotary position already).
"""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(
        self,
        batch_size: int,
        n_kv_head: int,
        head_dim: int,
        size: int,
        window: int | None,
        rolls: bool,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        shape = (batch_size, n_kv_head, size, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # time step held by each slot; -1 = empty (never attended)
        self.register_buffer("times", torch.full((size,), -1, dtype=torch.long, device=device), persistent=False)
        self.size, self.window, self.rolls = size, window, rolls

    def reset(self) -> None:
        """Forget every stored token (the buffers stay allocated)."""
        self.times.fill_(-1)

    def update(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        t: torch.Tensor,
        pad: torch.Tensor | None,
        filled: int | torch.SymInt | None = None,
        from_start: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store k, v (B, nkv, T, hs) of time steps t (T,); return the keys, values and boolean mask
        (B, 1, T, S) to attend with. ``pad`` (B,) is each row's count of left-padding steps (None: no
        row is padded).

        ``filled`` (the last time step + 1, when known) lets a cache that does not roll attend over
        its written slots only, instead of the whole preallocated buffer; a compiled step off the
        CPU passes None and keeps static shapes. Where each query of an unpadded batch sees exactly the
        written slots up to its own time step, the mask is None: one query over the written slots, or
        a prompt written from time step 0 (``from_start``: t is 0, 1, ... filled - 1, which the model
        checks once for all its layers: ``written_from_start``). Then the mask is causal,
        which attention kernels apply without reading one; a cache that does not roll is no longer
        than its window, which then excludes nothing."""
        if self.rolls and t.numel() > 1:
            # Several new tokens in a rolling cache: writing first would overwrite keys that the
            # earlier of them still need, so attend over old + new and keep only the newest after.
            keys, values = torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)
            times = torch.cat((self.times, t))
            keep = slice(max(0, t.numel() - self.size), None)
            self._write(k[:, :, keep], v[:, :, keep], t[keep])
        else:
            self._write(k, v, t)
            keys, values, times = self.k, self.v, self.times
            if filled is not None and not self.rolls:  # slot == time step here, so [:filled] is all there is
                keys, values, times = keys[:, :, :filled], values[:, :, :filled], times[:filled]
                if pad is None and (t.numel() == 1 or from_start):
                    return keys, values, None
        return keys, values, attention_mask(t, times, pad, self.window)

    def slots(self, filled: int | torch.SymInt | None) -> int | torch.SymInt:
        """How many slots a step attends over (``update``'s keys): the written ones where ``filled`` is
        known and the cache does not roll, else all."""
        return filled if filled is not None and not self.rolls else self.size

    def attend_one(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t: torch.Tensor, pad: torch.Tensor | None, filled
    ) -> torch.Tensor:
        """``update`` with one new time step t (1,) and the attention of each row's query per head q
        (B, nh, 1, hs) over what it returns, as ``ops.one_query_attention`` with its ``avx2`` kernel:
        one C++ op (``gpt2lab.native``) that writes k and v, marks the slot's time step and attends
        over the slots each row sees, the mask taken from ``times`` as ``attention_mask`` makes it.
        (B, nh, 1, hs) out. A float32 cache on the CPU."""
        cache_attention = torch.ops.gpt2lab_native.cache_attention_avx2
        return cache_attention(q, k, v, self.k, self.v, self.times, t, self.slots(filled), pad, self.window)

    def _write(self, k: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> None:
        slots = t % self.size if self.rolls else t  # a cache that never wraps holds time step t in slot t
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        self.times.index_copy_(0, slots, t)


def written_from_start(t: torch.Tensor, filled: int | torch.SymInt | None) -> bool:
    """Whether time steps ``t`` are 0, 1, ... ``filled`` - 1: a prompt written from the start (``update``).
    On a GPU the comparison waits for the device, so a model asks once per forward, not per layer."""
    if filled is None or torch.compiler.is_compiling():  # a traced length cannot be compared with the steps
        return False
    return t.numel() == filled and torch.equal(t, torch.arange(filled, device=t.device))


def attention_mask(q_t: torch.Tensor, k_t: torch.Tensor, pad: torch.Tensor | None, window: int | None) -> torch.Tensor:
    """Which keys (times k_t, (S,)) each query (times q_t, (T,)) of each row may see: (B, 1, T, S).

    Causal, within the window (q - W < k), and never a padding step; a padding query sees itself
    only, so no row is fully masked (that would make NaNs that leak through the values).
    """
    q, k = q_t[:, None], k_t[None, :]  # (T, 1), (1, S)
    visible = (k <= q) & (k >= 0)
    if window is not None:
        visible &= k > q - window
    if pad is None:
        return visible[None, None]  # (1, 1, T, S): broadcast over the batch
    real = k[None] >= pad[:, None, None]  # (B, 1, S)
    return (visible[None] & (real | (k == q)[None])).unsqueeze(1)
