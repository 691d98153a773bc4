"""A prepared directory in a compact vocabulary (``gpt2lab.tokenizer.CompactTokenizer``): the most frequent
training tokens keep an id of their own, every other token is spelled as its bytes. Lossless, so the
text and its bytes are unchanged and bits per byte compare with any other vocabulary; a small model
then spends its parameters on the transformer instead of a 50,257-row embedding table."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from gpt2lab import files
from gpt2lab.data.format import SPLITS, TokenData, read_meta, write_token_dir
from gpt2lab.errors import ConfigError, GPT2LabError
from gpt2lab.tokenizer import EOT, CompactTokenizer


def compact_vocabulary(source: Path, target: Path, size: int, key: dict | None = None) -> dict:
    """Copy ``source`` (GPT-2 tokens) to ``target`` in a ``size``-token compact vocabulary: 256 byte ids,
    then the ``size - 256`` most frequent training tokens (``<|endoftext|>`` always among them; ties to the
    lower id). ``key`` is recorded in meta.json (callers use it to tell whether a copy is current).
    Returns the coverage: per split, the tokens before and after, and the share of GPT-2 tokens spelled
    as bytes."""
    if not 257 <= size <= 65536:
        raise ConfigError(f"a compact vocabulary needs between 257 and 65536 tokens (256 are bytes), got {size}")
    meta = read_meta(source)
    if meta.get("tokenizer", {}).get("name") != "gpt2" or meta.get("vocab_size") != EOT + 1:
        raise GPT2LabError(f"{source} does not hold GPT-2 tokens (prepared by gpt2lab prepare); it cannot be compacted")
    train = TokenData(source, "train")
    counts = np.zeros(EOT + 1, dtype=np.int64)
    for start in range(0, len(train), 1 << 24):
        counts += np.bincount(train.read(start, min(1 << 24, len(train) - start)), minlength=EOT + 1)
    counts[EOT] = np.iinfo(np.int64).max  # the document separator always keeps its id
    tokenizer = CompactTokenizer(np.argsort(-counts, kind="stable")[: size - 256].tolist())
    splits, coverage = {}, {}
    for split in SPLITS:
        data = TokenData(source, split)
        gpt2 = data.read(0, len(data))
        splits[split] = tokenizer.from_gpt2(gpt2)
        coverage[f"{split}_gpt2_tokens"] = len(gpt2)
        coverage[f"{split}_tokens"] = len(splits[split])
        coverage[f"{split}_spelled_fraction"] = float(np.mean(tokenizer.spelled(gpt2))) if len(gpt2) else 0.0
    files.restore_abandoned(target)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    per_split = {s: {"bytes": meta["splits"][s]["bytes"]} for s in SPLITS if "bytes" in meta["splits"][s]}
    write_token_dir(
        tmp, splits, size, split_fields=per_split, vocabulary=tokenizer.to_dict(), eot=tokenizer.eot_token,
        compact=key or {}, coverage=coverage,
    )  # fmt: skip
    files.replace_dir(tmp, target)
    return coverage
