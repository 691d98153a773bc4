"""Multi-query associative recall (MQAR, the Zoology paper's task) with planted distances and a key-swap control.

Token ids: 0 filler, keys ``1..K``, values ``K+1..K+V``, and *fused pairs* ``P(k, v)`` ("key k holds value v")
after them, so a lookup is one attention hop and a single layer can learn it. A sequence of T tokens holds
``groups`` twin groups: two pairs side by side, ``P(k1, v1) P(k2, v2)``, all keys of a sequence distinct and the
twins' values different. Every pair is queried once, later, by its key token at a *planted* distance d (query
position minus pair position); these controlled queries make the distance tables. Every other free position
after the first pair is a dense query for a random key planted before it (scored in training, not tabled).

Key-swap control: a counterfactual copy exchanges the two keys of every group (``P(k2, v1) P(k1, v2)``), values
and positions unchanged, so each query's answer becomes its twin's value. A model that reads the key is right on
both copies; any rule that picks a value by position (newest pair, nearest, "the group about d back") gives the
same answer on both and is right on at most one, so "both right" stays at or below 0.25 even for a coin flip
between the twins. Lookup is claimed only where "both" is above 0.25.

Reach: a window layer (query i sees keys i - W < j <= i) reaches d <= W - 1; L stacked window layers reach at
most L (W - 1); a model with any global layer reaches the whole sequence.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gpt2lab.compare.training import INIT, load_trained, run_config, train_paired, val_curve
from gpt2lab.config import GPTConfig
from gpt2lab.device import resolve_device
from gpt2lab.errors import ConfigError
from gpt2lab.train import TrainData
from gpt2lab.train_config import TrainConfig

IGNORE = -100  # targets the loss skips
DISTANCES = ("log-uniform", "uniform")


@dataclass(frozen=True)
class MQARTask:
    """The token layout: sequences of ``seq_len`` tokens with ``groups`` twin groups of fused pairs."""

    seq_len: int = 64
    n_keys: int = 8
    n_values: int = 8
    groups: int = 4

    def __post_init__(self) -> None:
        if self.n_values < 2 or 2 * self.groups > self.n_keys or self.groups < 1:
            raise ConfigError(
                f"mqar needs at least 2 values and 2 x groups <= keys (every pair its own key); got "
                f"{self.n_keys} keys, {self.n_values} values, {self.groups} groups"
            )
        if self.seq_len < 4 * self.groups + 4:
            raise ConfigError(f"mqar sequences of {self.seq_len} tokens cannot hold {self.groups} groups and queries")

    @property
    def vocab_size(self) -> int:
        return 1 + self.n_keys + self.n_values + self.n_keys * self.n_values

    @property
    def max_distance(self) -> int:
        """The longest planted distance: the second pair at position 1, its query at the last position."""
        return self.seq_len - 2

    def key(self, k):
        return 1 + k

    def value(self, v):
        return 1 + self.n_keys + v

    def pair(self, k, v):
        return 1 + self.n_keys + self.n_values + k * self.n_values + v


@dataclass
class MQARBatch:
    """Inputs and targets (B, T) of the original (``x``, ``y``) and the key-swapped copy (``xs``, ``ys``);
    ``distance`` (B, T): how far back a scored query's pair lies (-1 elsewhere); ``controlled`` (B, T): the
    queries with planted distances."""

    x: np.ndarray
    y: np.ndarray
    xs: np.ndarray
    ys: np.ndarray
    distance: np.ndarray
    controlled: np.ndarray


def reach(config: GPTConfig, seq_len: int) -> int:
    """The longest distance a model can carry information over: L (W - 1) for a stack of window layers,
    the whole sequence once any layer is global."""
    windows = [config.layer_window(i) for i in range(config.n_layer)]
    if any(w is None for w in windows):
        return seq_len
    return sum(w - 1 for w in windows)


def distance_edges(window: int, reaches: list[int], seq_len: int) -> list[int]:
    """Bin edges [lo, hi) of the distance tables: inside the window (two halves), the two distances just past
    it, then just inside and just past each window stack's reach, then the rest of the sequence in two."""
    task_max = seq_len - 2
    edges = {1, max(1, window // 2), window, window + 2, seq_len // 2, task_max + 1}
    for r in reaches:
        edges |= {r + 1, r + 3}
    return sorted(e for e in edges if 1 <= e <= task_max + 1)


def sample_distances(rng: np.random.Generator, shape: tuple, dmax: int, kind: str | list[int]) -> np.ndarray:
    """Planted distances in [1, dmax]: ``log-uniform`` (half of them short, as Zoology's power-law query
    positions), ``uniform``, or, given bin edges, a uniformly chosen bin and a uniform distance inside it."""
    if isinstance(kind, list):
        lo, hi = np.array(kind[:-1]), np.array(kind[1:])
        b = rng.integers(len(lo), size=shape)
        return lo[b] + (rng.random(shape) * (hi[b] - lo[b])).astype(np.int64)
    if kind == "uniform":
        return rng.integers(1, dmax + 1, size=shape)
    return np.clip(np.exp(rng.random(shape) * math.log(dmax + 1)).astype(np.int64), 1, dmax)


def _place_groups(task: MQARTask, B: int, rng: np.random.Generator, kind) -> tuple[np.ndarray, np.ndarray]:
    """Start positions (B, G) of every group and the distances (B, G, 2) of its two queries, with no two of
    the group's and its queries' positions colliding with each other or with earlier groups."""
    T, G = task.seq_len, task.groups
    used = np.zeros((B, T), dtype=bool)
    starts = np.zeros((B, G), dtype=np.int64)
    dist = np.zeros((B, G, 2), dtype=np.int64)
    rows = np.arange(B)
    for g in range(G):
        todo = rows
        d = sample_distances(rng, (B, 2), task.max_distance, kind)
        for attempt in range(1000):
            if attempt and attempt % 10 == 0:  # a distance that keeps colliding is drawn again
                d[todo] = sample_distances(rng, (len(todo), 2), task.max_distance, kind)
            d0, d1 = d[todo, 0], d[todo, 1]
            s_max = np.minimum(T - 1 - d0, T - 2 - d1)
            s = (rng.random(len(todo)) * np.maximum(s_max + 1, 1)).astype(np.int64)
            occupied = np.stack([s, s + 1, s + d0, s + 1 + d1], axis=1)  # pair, twin, their queries
            ok = (s_max >= 0) & (d0 != 1) & (d0 != d1 + 1)
            ok &= ~used[todo[:, None], np.clip(occupied, 0, T - 1)].any(1)
            done = todo[ok]
            used[done[:, None], occupied[ok]] = True
            starts[done, g], dist[done, g] = s[ok], d[done]
            todo = todo[~ok]
            if not len(todo):
                break
        else:
            raise ConfigError(f"mqar could not place {G} groups in {T} tokens; use longer sequences or fewer groups")
    return starts, dist


def mqar_batch(task: MQARTask, B: int, rng: np.random.Generator, distances="log-uniform") -> MQARBatch:
    """``B`` sequences of the task (see the module docstring); ``distances`` as ``sample_distances`` takes them."""
    T, G, K, V = task.seq_len, task.groups, task.n_keys, task.n_values
    starts, dist = _place_groups(task, B, rng, distances)
    keys = np.argsort(rng.random((B, K)), axis=1)[:, : 2 * G].reshape(B, G, 2)
    v0 = rng.integers(V, size=(B, G))
    values = np.stack([v0, (v0 + 1 + rng.integers(V - 1, size=(B, G))) % V], axis=2)  # twins differ
    pos = np.stack([starts, starts + 1], axis=2)  # (B, G, 2) pair positions
    queries = pos + dist
    r = np.arange(B)[:, None, None]
    x = np.zeros((B, T), dtype=np.int64)
    y = np.full((B, T), IGNORE, dtype=np.int64)
    distance = np.full((B, T), -1, dtype=np.int64)
    x[r, pos] = task.pair(keys, values)
    _dense_queries(task, x, y, distance, pos, keys, values, rng, distances)
    x[r, queries], y[r, queries], distance[r, queries] = task.key(keys), task.value(values), dist
    xs = x.copy()
    xs[r, pos] = task.pair(keys[:, :, ::-1], values)  # the keys of each group exchanged; queries shared
    ys = _swapped_targets(task, x, y, keys, values)
    controlled = np.zeros((B, T), dtype=bool)
    controlled[r, queries] = True
    return MQARBatch(x, y, xs, ys, distance, controlled)


def _dense_queries(task, x, y, distance, pos, keys, values, rng, kind) -> None:
    """Every position that is not a pair and comes after the first pair asks about a pair planted before it
    (written into x, y and distance in place; controlled queries overwrite some of them later): with
    ``log-uniform`` distances the pair at distance d is chosen with weight log(1 + 1/d), so about half the
    queries are short, as for the planted ones; otherwise uniformly among the pairs before it."""
    B, T = x.shape
    flat_pos, flat_keys, flat_values = pos.reshape(B, -1), keys.reshape(B, -1), values.reshape(B, -1)
    d = np.arange(T)[None, :, None] - flat_pos[:, None, :]  # (B, T, pairs): distance to each pair
    weight = np.where(d > 0, np.log1p(1 / np.maximum(d, 1)) if kind == "log-uniform" else 1.0, 0.0)
    total = weight.sum(2)
    free = (total > 0) & (x == 0)
    cumulative = np.cumsum(weight, 2)
    u = rng.random((B, T, 1)) * total[..., None]
    chosen = np.minimum((cumulative <= u).sum(2), flat_pos.shape[1] - 1)  # (B, T)
    k, v = np.take_along_axis(flat_keys, chosen, 1), np.take_along_axis(flat_values, chosen, 1)
    x[free], y[free] = task.key(k)[free], task.value(v)[free]
    distance[free] = np.take_along_axis(d, chosen[..., None], 2)[..., 0][free]


def _swapped_targets(task, x, y, keys, values) -> np.ndarray:
    """Targets of the key-swapped copy: a query of key k answers the value its twin held."""
    B = x.shape[0]
    twin_value = np.zeros((B, task.n_keys), dtype=np.int64)
    rows = np.arange(B)[:, None, None]
    twin_value[rows, keys] = task.value(values[:, :, ::-1])
    key_of = np.clip(x - 1, 0, task.n_keys - 1)
    return np.where(y != IGNORE, np.take_along_axis(twin_value, key_of, 1), IGNORE)


class MQARBatches:
    """Training batches as a pure function of (seed, step), identical for every variant of a seed, so runs
    are paired and resume exactly (like gpt2lab.data.Batches)."""

    def __init__(self, task: MQARTask, batch_size: int, grad_accum: int, rank: int, seed: int, distances: str):
        self.task, self.batch_size, self.grad_accum = task, batch_size, grad_accum
        self.rank, self.seed, self.distances = rank, seed, distances

    def get(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step, micro_step, self.rank])
        batch = mqar_batch(self.task, self.batch_size, rng, self.distances)
        return torch.from_numpy(batch.x), torch.from_numpy(batch.y)


@torch.no_grad()
def in_reach_accuracy(model, batch: MQARBatch, limit: int) -> dict[str, float]:
    """Accuracy over every scored query (dense ones included) and over those within ``limit`` tokens: the
    training curve a plateau is read from."""
    device = next(model.parameters()).device
    logits, _ = model(torch.from_numpy(batch.x).to(device))
    right = (logits.argmax(-1).cpu().numpy() == batch.y) & (batch.y != IGNORE)
    scored = batch.y != IGNORE
    near = scored & (batch.distance <= limit)
    return {"mqar_accuracy": float(right.sum() / scored.sum()), "mqar_in_reach": float(right[near].sum() / near.sum())}


@torch.no_grad()
def evaluate(model, task: MQARTask, edges: list[int], n_sequences: int, seed: int = 12345, batch: int = 64) -> dict:
    """Per planted distance d (index d of each list): controlled queries ``n``, right on the original
    (``orig``), right on both the original and the key-swapped copy (``both``), and answered with the twin's
    value on the original (``twin``), over ``n_sequences`` fixed sequences whose distances are spread evenly
    over the bins of ``edges``. Argmax over the whole vocabulary."""
    device = model.wte.weight.device
    rng = np.random.default_rng(seed)
    size = task.max_distance + 1
    out = {name: np.zeros(size, dtype=np.int64) for name in ("n", "orig", "both", "twin")}
    for start in range(0, n_sequences, batch):
        b = mqar_batch(task, min(batch, n_sequences - start), rng, edges)
        pred = model(torch.from_numpy(b.x).to(device))[0].argmax(-1).cpu().numpy()
        pred_swapped = model(torch.from_numpy(b.xs).to(device))[0].argmax(-1).cpu().numpy()
        m, d = b.controlled, b.distance[b.controlled]
        orig, swapped = pred[m] == b.y[m], pred_swapped[m] == b.ys[m]
        for name, hit in (
            ("n", np.ones_like(orig)),
            ("orig", orig),
            ("both", orig & swapped),
            ("twin", pred[m] == b.ys[m]),
        ):
            np.add.at(out[name], d, hit.astype(np.int64))
    return {name: values.tolist() for name, values in out.items()}


def mqar_job(params: dict, run_dir: Path, root: Path) -> dict:
    """Train one MQAR model from its seed's paired weights (accuracy within its reach logged at every
    evaluation: the plateau curve), then score it by planted distance with the key-swap control."""
    task = MQARTask(**params["task"])
    seed, steps, lr, distances = params["seed"], params["steps"], params["lr"], params["distances"]
    base = TrainConfig.from_dict(params["train"])
    every = params["eval_every"]
    cfg = run_config(
        base,
        run_dir,
        run_dir / INIT,
        data={
            "dir": "",
            "batch_size": params["batch_size"],
            "block_size": task.seq_len,
            "grad_accum": None,
            "global_batch_size": None,
        },
        optim={"lr": lr, "min_lr": lr / 10, "warmup_steps": max(1, steps // 20)},
        run={"steps": steps, "eval_every": every, "eval_batches": 2, "log_every": every, "seed": seed},
    )
    held_out = mqar_batch(task, 128, np.random.default_rng(4242), distances)
    val = [(torch.from_numpy(held_out.x[i::2]), torch.from_numpy(held_out.y[i::2])) for i in range(2)]

    def data(env, accum: int) -> TrainData:
        batches = MQARBatches(task, params["batch_size"], accum, env.rank, seed, distances)
        check = functools.partial(in_reach_accuracy, batch=held_out, limit=params["reach"])
        return TrainData(batches, val, task.vocab_size, evaluations=check)

    records = train_paired(cfg, {"config": params["config"], "seed": seed}, data)
    model = load_trained(run_dir, resolve_device(base.run.device))
    return {
        "curve": val_curve(records, "mqar_in_reach"),
        "loss_curve": val_curve(records),
        "eval": evaluate(model, task, params["edges"], params["eval_sequences"]),
    }
