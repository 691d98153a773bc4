"""A prepared directory with a compact vocabulary: the most frequent training tokens keep ids of their
own, every other token shares one "rare" id. A small model then spends its parameters on the
transformer instead of a 50,257-row embedding table; the map back to GPT-2 ids is kept in meta.json."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from gpt2lab import files
from gpt2lab.data.format import DTYPE, SPLITS, TokenData, read_meta, write_token_dir
from gpt2lab.errors import ConfigError


def compact_vocabulary(source: Path, target: Path, size: int, key: dict | None = None) -> dict:
    """Copy ``source`` to ``target`` with token ids remapped: the ``size - 1`` most frequent training
    tokens become 0 .. size - 2 (by frequency, ties to the lower id), every other token ``size - 1``.
    ``key`` is recorded in meta.json (callers use it to tell whether a copy is current). Returns the
    coverage: tokens per split and the share of each that became the rare id."""
    if not 2 <= size <= 65536:
        raise ConfigError(f"a compact vocabulary needs between 2 and 65536 tokens, got {size}")
    train = TokenData(source, "train")
    counts = np.zeros(65536, dtype=np.int64)
    for start in range(0, len(train), 1 << 24):
        counts += np.bincount(train.read(start, min(1 << 24, len(train) - start)), minlength=65536)
    kept = np.argsort(-counts, kind="stable")[: size - 1]
    table = np.full(65536, size - 1, dtype=DTYPE)
    table[kept] = np.arange(size - 1, dtype=DTYPE)
    splits, coverage = {}, {}
    for split in SPLITS:
        data = TokenData(source, split)
        splits[split] = table[data.read(0, len(data))]
        coverage[f"{split}_tokens"] = len(splits[split])
        coverage[f"{split}_rare_fraction"] = float(np.mean(splits[split] == size - 1))
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    source_splits = read_meta(source)["splits"]
    per_split = {s: {"bytes": source_splits[s]["bytes"]} for s in SPLITS if "bytes" in source_splits[s]}
    write_token_dir(
        tmp, splits, size, split_fields=per_split, compact=key or {}, coverage=coverage, kept_gpt2_ids=kept.tolist()
    )
    files.replace_dir(tmp, target)
    return coverage
