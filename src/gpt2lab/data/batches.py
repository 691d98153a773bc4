"""Batches read back from a prepared split: random training batches as a pure function of (seed, step),
a fixed evaluation set, and sliding windows over one long text for perplexity."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from gpt2lab.data.format import TokenData
from gpt2lab.errors import ConfigError, GPT2LabError


class Batches:
    """Random training batches as a pure function of (seed, step): no state, so resuming is calling ``get``.

    The global batch of step ``s`` is ``G = batch_size * grad_accum * world_size`` sequences whose start
    offsets come from ``np.random.default_rng([seed, s])``. Rank ``r`` at micro-step ``m`` takes block
    ``m * world_size + r`` of ``batch_size`` of them. Ranks and micro-steps are therefore disjoint, and
    their union is the same set of sequences for any split of the same G (e.g. 2 ranks x 2 micro-steps
    x 8 == 1 rank x 1 micro-step x 32), which is what lets a DDP/FSDP run be compared to one process.
    """

    def __init__(
        self,
        data: TokenData,
        batch_size: int,
        block_size: int,
        grad_accum: int = 1,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ):
        if batch_size < 1 or grad_accum < 1 or world_size < 1:
            raise ConfigError(
                f"batch_size, grad_accum and world_size must be >= 1, got {batch_size}, {grad_accum}, {world_size}"
            )
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, {world_size}), got {rank}")
        if seed < 0:
            raise ConfigError(f"seed must be >= 0, got {seed}")
        data.check(block_size)
        self.data = data
        self.batch_size = batch_size
        self.block_size = block_size
        self.grad_accum = grad_accum
        self.rank = rank
        self.world_size = world_size
        self.seed = seed

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step over all ranks and micro-steps."""
        return self.batch_size * self.grad_accum * self.world_size

    def starts(self, step: int) -> np.ndarray:
        """Start offsets of all ``global_batch`` sequences of ``step`` (the same on every rank)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        rng = np.random.default_rng([self.seed, step])
        # the last usable start leaves room for block_size inputs plus one target
        return rng.integers(0, len(self.data) - self.block_size, size=self.global_batch)

    def get(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y int64 of shape (batch_size, block_size) for this rank at (step, micro_step)."""
        if not 0 <= micro_step < self.grad_accum:
            raise ValueError(f"micro_step must be in [0, {self.grad_accum}), got {micro_step}")
        block = micro_step * self.world_size + self.rank
        starts = self.starts(step)[block * self.batch_size : (block + 1) * self.batch_size]
        return self.data.sequences(starts, self.block_size)


def val_batches(
    data: TokenData, batch_size: int, block_size: int, n_batches: int, rank: int = 0, world_size: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed evaluation set: ``n_batches`` batches whose starts are evenly spaced over the whole split.

    No randomness, so every call and every run evaluates the same tokens. With the defaults each caller
    gets all ``n_batches``; with ``world_size > 1`` rank ``r`` gets batches ``r, r + world_size, ...``
    (``n_batches`` must then be a multiple of ``world_size`` so that every rank runs the same number of
    forward passes, which FSDP needs); sum losses over ranks to get the full-set mean.
    """
    if n_batches < 1 or batch_size < 1:
        raise ConfigError(f"n_batches and batch_size must be >= 1, got {n_batches}, {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    if n_batches % world_size:
        raise ConfigError(f"n_batches ({n_batches}) must be a multiple of world_size ({world_size})")
    data.check(block_size)
    last = len(data) - block_size - 1
    starts = np.linspace(0, last, n_batches * batch_size).round().astype(np.int64)
    return [
        data.sequences(starts[i * batch_size : (i + 1) * batch_size], block_size)
        for i in range(rank, n_batches, world_size)
    ]


def iter_windows(
    tokens: Sequence[int] | np.ndarray | torch.Tensor, block_size: int, stride: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sliding windows over one long text for perplexity (HF's "perplexity of fixed-length models").

    Yields x, y int64 of shape (1, L), L <= block_size. Windows start every ``stride`` tokens; in each,
    targets already scored by an earlier window are set to -100 (ignored by the loss), so every token
    after the first is scored exactly once, with up to ``block_size - stride`` tokens of extra context.
    """
    if not 1 <= stride <= block_size:
        raise ConfigError(f"stride must be in [1, block_size={block_size}], got {stride}")
    ids = torch.as_tensor(np.asarray(tokens), dtype=torch.int64).flatten()
    n_targets = ids.numel() - 1  # target j (1-based position in ids) is predicted from ids[:j]
    if n_targets < 1:
        raise GPT2LabError("the text needs at least 2 tokens to score")
    scored = 0  # targets 1..scored are done
    for begin in range(0, n_targets, stride):
        end = min(begin + block_size, n_targets)  # the window predicts targets begin+1 .. end
        x = ids[begin:end].clone()
        y = ids[begin + 1 : end + 1].clone()
        y[: scored - begin] = -100
        yield x.unsqueeze(0), y.unsqueeze(0)
        scored = end
        if end == n_targets:
            break


def count_windows(n_tokens: int, block_size: int, stride: int) -> int:
    """How many windows ``iter_windows`` yields for a text of ``n_tokens`` tokens."""
    n_targets = n_tokens - 1
    if n_targets < 1:
        return 0
    last = -(-max(n_targets - block_size, 0) // stride)  # the first start whose window reaches the end
    return min(last + 1, -(-n_targets // stride))
