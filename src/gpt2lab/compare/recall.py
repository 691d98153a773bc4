"""A synthetic long-range recall task: can the model retrieve what a key was given ``d`` tokens ago?

A sequence stores a few key/value pairs and asks about them everywhere else. Token ids fall in three
disjoint ranges (K keys, V values):

- ``P(k, v) = k * V + v``: "key k holds value v", planted at a few random positions (distinct keys);
- ``Q(k)``: "what does key k hold?", at every other position; k is drawn uniformly from the keys
  planted before that position (positions before the first pair ask about a random key, unscored);
- ``A(v)``: the answer, the target of a query.

A query at position i whose key was planted at position a has distance ``d = i - a``; with a sliding
window of W (query i sees keys i - W < j <= i), one attention step reaches the pair iff ``d < W``, and
L stacked window layers can carry information at most L * (W - 1) tokens.

Why this shape: a pair is one token, so retrieval is one content-addressed attention hop (a two-token
``key value`` pair would first need an induction circuit, which small models take thousands of steps
to form); every position is a scored query, so a batch carries thousands of training signals; and no
query is unanswerable, so a model cannot settle on a "not seen" answer. A model that ignores the key
and names one of the values it can see scores about 1 / (pairs before the query): ``reference``
reports that level per distance, so accuracy above it is real key lookup.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gpt2lab.errors import ConfigError
from gpt2lab.model import GPT

IGNORE = -100  # targets the loss skips: the planted pair tokens themselves


@dataclass(frozen=True)
class RecallTask:
    """The token layout: ``n_keys`` keys, ``n_values`` values, ``n_pairs`` pairs planted per sequence."""

    n_keys: int = 8
    n_values: int = 8
    n_pairs: int = 8

    def __post_init__(self) -> None:
        if self.n_keys < 1 or self.n_values < 1 or not 1 <= self.n_pairs <= self.n_keys:
            raise ConfigError(
                f"recall needs n_keys, n_values >= 1 and 1 <= n_pairs <= n_keys; got {self.n_keys}, "
                f"{self.n_values}, {self.n_pairs}"
            )

    def pair(self, key, value):
        return key * self.n_values + value

    def query(self, key):
        return self.n_keys * self.n_values + key

    def answer(self, value):
        return self.n_keys * self.n_values + self.n_keys + value

    @property
    def vocab_size(self) -> int:
        return self.answer(self.n_values)


@dataclass
class RecallBatch:
    """Inputs ``x`` and targets ``y`` (B, T); ``distance`` (B, T) is, at a scored query, how far back its
    key's pair is (-1 elsewhere), and ``visible`` (B, T) how many pairs lie before the position."""

    x: torch.Tensor
    y: torch.Tensor
    distance: np.ndarray
    visible: np.ndarray


def recall_batch(task: RecallTask, seq_len: int, batch_size: int, rng: np.random.Generator) -> RecallBatch:
    """``batch_size`` sequences of ``seq_len`` tokens (see the module docstring)."""
    if seq_len < task.n_pairs + 1:
        raise ConfigError(f"recall sequences of {seq_len} tokens cannot hold {task.n_pairs} pairs and a query")
    i = np.arange(seq_len)
    x = np.empty((batch_size, seq_len), dtype=np.int64)
    y = np.empty((batch_size, seq_len), dtype=np.int64)
    distance = np.empty((batch_size, seq_len), dtype=np.int64)
    visible = np.empty((batch_size, seq_len), dtype=np.int64)
    for row in range(batch_size):
        keys = rng.permutation(task.n_keys)[: task.n_pairs]
        values = rng.integers(task.n_values, size=task.n_pairs)
        where = rng.choice(seq_len, size=task.n_pairs, replace=False)
        planted_at = np.full(task.n_keys, seq_len)  # seq_len = never planted
        planted_at[keys] = where
        value_of = np.zeros(task.n_keys, dtype=np.int64)
        value_of[keys] = values
        # each query asks about a key planted before it, drawn uniformly from those
        order = np.argsort(where)
        seen = np.searchsorted(where[order], i, side="left")  # pairs strictly before position i
        pick = (rng.random(seq_len) * np.maximum(seen, 1)).astype(np.int64)
        asked = np.where(
            seen > 0, keys[order][np.minimum(pick, task.n_pairs - 1)], rng.integers(task.n_keys, size=seq_len)
        )
        a = planted_at[asked]
        known = a < i
        x[row] = task.query(asked)
        y[row] = np.where(known, task.answer(value_of[asked]), IGNORE)
        distance[row] = np.where(known, i - a, -1)
        x[row, where] = task.pair(keys, values)
        y[row, where] = IGNORE
        distance[row, where] = -1
        visible[row] = seen
    return RecallBatch(torch.from_numpy(x), torch.from_numpy(y), distance, visible)


def distance_bins(window: int | None, seq_len: int) -> list[tuple[int, int]]:
    """Distance ranges [lo, hi) to report: inside the window (two halves), then multiples of it, up to
    the longest distance the sequence allows."""
    if window is None or window >= seq_len:
        edges = {1, seq_len // 8, seq_len // 4, seq_len // 2, 3 * seq_len // 4, seq_len}
    else:
        edges = {1, window // 2, window, 2 * window, 3 * window, 4 * window, 6 * window, seq_len}
    edges = sorted(e for e in edges if 1 <= e <= seq_len)
    return list(zip(edges[:-1], edges[1:], strict=True))


class RecallBatches:
    """Training batches of the task as a pure function of (seed, step), like gpt2lab.data.Batches: each
    rank and micro-step draws its own sequences, so a run resumes exactly."""

    def __init__(self, task: RecallTask, seq_len: int, batch_size: int, grad_accum: int, rank: int, seed: int):
        self.task, self.seq_len, self.batch_size = task, seq_len, batch_size
        self.grad_accum, self.rank, self.seed = grad_accum, rank, seed

    def get(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step, micro_step, self.rank])
        batch = recall_batch(self.task, self.seq_len, self.batch_size, rng)
        return batch.x, batch.y


@torch.no_grad()
def recall_accuracy(
    model: GPT,
    task: RecallTask,
    seq_len: int,
    bins: list[tuple[int, int]],
    n_sequences: int,
    amp,
    batch_size: int = 64,
) -> dict:
    """Exact-match accuracy (argmax over the whole vocabulary) of the queries whose pair lies at a distance
    in each bin, on the same fixed sequences for every model; with the query counts and the ``reference``
    accuracy of naming a random one of the pairs planted before the query (what ignoring the key gives)."""
    device = model.wte.weight.device
    rng = np.random.default_rng(12345)
    correct, count, reference = np.zeros(len(bins)), np.zeros(len(bins)), np.zeros(len(bins))
    for start in range(0, n_sequences, batch_size):
        batch = recall_batch(task, seq_len, min(batch_size, n_sequences - start), rng)
        with amp:
            logits, _ = model(batch.x.to(device))
        right = (logits.argmax(-1).cpu() == batch.y).numpy()
        for b, (lo, hi) in enumerate(bins):
            in_bin = (batch.distance >= lo) & (batch.distance < hi)
            correct[b] += right[in_bin].sum()
            count[b] += in_bin.sum()
            reference[b] += (1.0 / batch.visible[in_bin]).sum()
    return {
        "accuracy": [float(c / n) if n else None for c, n in zip(correct, count, strict=True)],
        "queries": count.astype(int).tolist(),
        "reference": [float(r / n) if n else None for r, n in zip(reference, count, strict=True)],
    }
