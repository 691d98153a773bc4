"""The on-disk token format, defined once: uint16 shards plus ``meta.json``.

A prepared directory holds ``train_000000.bin``, ``train_000001.bin``, ... and ``val_000000.bin``, ...
(raw little-endian uint16 token ids; with GPT-2's tokenizer every document is followed by
``<|endoftext|>`` = 50256) and ``meta.json``, written last, which lists each split's shards with their
token counts and sha256, and the vocabulary size the ids are below. A split is read as one stream: the
concatenation of its shards in order. ``ShardWriter`` writes shards, ``write_meta`` the index,
``write_token_dir`` a whole directory from arrays; ``TokenData`` reads a split back.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gpt2lab import files
from gpt2lab.errors import ConfigError, GPT2LabError

META = "meta.json"
SPLITS = ("train", "val")
FORMAT = "gpt2lab-tokens"
FORMAT_VERSION = 1
DTYPE = np.dtype("<u2")  # little-endian uint16 on every machine; GPT-2 ids are < 65536
ID_LIMIT = 1 << 16  # the most token ids a shard can hold


def read_meta(data_dir: Path) -> dict:
    """The checked ``meta.json`` of a prepared directory (GPT2LabError naming the fix otherwise)."""
    meta_path = data_dir / META
    if data_dir.is_file():
        raise GPT2LabError(
            f"{data_dir} is a file, not a prepared data directory; make one from it with: "
            f"gpt2lab prepare --input {data_dir} --out DIR"
        )
    if not data_dir.is_dir():
        raise GPT2LabError(
            f"data directory {data_dir} does not exist; create it with: gpt2lab prepare --input ... --out {data_dir}"
        )
    if not meta_path.is_file():
        raise GPT2LabError(
            f"{data_dir} has no {META}, so it is not a prepared data directory (or its preparation did not "
            f"finish); run: gpt2lab prepare --input ... --out {data_dir}"
        )
    try:
        meta = json.loads(meta_path.read_text())
        for split in SPLITS:
            for shard in meta["splits"][split]["shards"]:
                if not isinstance(shard["file"], str) or not isinstance(shard["tokens"], int) or shard["tokens"] < 0:
                    raise ValueError(f"bad shard entry {shard!r}")
        if not isinstance(meta.get("vocab_size", 1), int) or not 0 < meta.get("vocab_size", 1) <= ID_LIMIT:
            raise ValueError(f"vocab_size {meta['vocab_size']!r} is not an integer in 1..{ID_LIMIT}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise GPT2LabError(f"{meta_path} is malformed ({e}); prepare the directory again") from None
    return meta


def write_meta(data_dir: Path, shards: dict[str, list[dict]], vocab_size: int, **fields) -> None:
    """meta.json for shards already written: ``shards`` maps each split to its shard records
    ({"file", "tokens", "sha256"}); ``fields`` (source, tokenizer, ...) are recorded as they are, and
    ``split_fields`` (optional) adds per-split fields such as document and byte counts."""
    extra = fields.pop("split_fields", {})
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "dtype": "uint16", "byteorder": "little"}
    meta |= {"vocab_size": vocab_size} | fields
    meta["splits"] = {
        split: extra.get(split, {}) | {"tokens": sum(s["tokens"] for s in records), "shards": records}
        for split, records in shards.items()
    }
    files.write_json(data_dir / META, meta)


def write_token_dir(
    data_dir: Path, splits: dict[str, np.ndarray], vocab_size: int, shard_tokens: int | None = None, **fields
) -> Path:
    """A whole prepared directory from in-memory token arrays (one shard per split unless ``shard_tokens``)."""
    if not 0 < vocab_size <= ID_LIMIT:
        raise ConfigError(f"vocab_size {vocab_size} does not fit the shards' uint16 ids: at most {ID_LIMIT} tokens")
    data_dir.mkdir(parents=True, exist_ok=True)
    shards = {}
    for split, tokens in splits.items():
        tokens = np.asarray(tokens)
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab_size):
            raise ConfigError(f"{split} token ids must lie in [0, {vocab_size})")
        writer = ShardWriter(data_dir, split, shard_tokens or max(1, len(tokens)))
        writer.write(tokens.astype(DTYPE))
        writer.close()
        shards[split] = writer.shards
    write_meta(data_dir, shards, vocab_size, **fields)
    return data_dir


class TokenData:
    """The token stream of one split of a prepared directory, memory-mapped (nothing is read up front).

    ``block_size``, when given, is checked: sampling a sequence needs at least ``block_size + 1`` tokens.
    """

    def __init__(self, data_dir: str | Path, split: str, block_size: int | None = None):
        self.data_dir = Path(data_dir)
        self.split = split
        if split not in SPLITS:
            raise GPT2LabError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        self.meta = read_meta(self.data_dir)
        self.vocab_size: int = self.meta.get("vocab_size", ID_LIMIT)
        self.vocabulary: dict | None = self.meta.get("vocabulary")  # a compact vocabulary's description
        self.records: list[dict] = self.meta["splits"][split]["shards"]
        self.shards: list[np.memmap] = []
        for shard in self.records:
            path = self.data_dir / shard["file"]
            expected = 2 * int(shard["tokens"])
            if not path.is_file():
                raise GPT2LabError(f"shard {path} is missing; prepare the directory again")
            size = path.stat().st_size
            if size != expected:
                raise GPT2LabError(f"shard {path} has {size} bytes instead of {expected}; prepare the directory again")
            if expected:  # numpy cannot map an empty file; an empty shard adds nothing anyway
                self.shards.append(np.memmap(path, dtype=DTYPE, mode="r"))
        # starts[i] = offset of shard i in the split's stream; starts[-1] = total tokens
        self.starts = np.cumsum([0] + [len(s) for s in self.shards], dtype=np.int64)
        if block_size is not None:
            self.check(block_size)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def bytes_per_token(self) -> float | None:
        """Bytes of text per token in this split, where meta.json records the split's bytes."""
        nbytes = self.meta["splits"][self.split].get("bytes")
        return nbytes / len(self) if isinstance(nbytes, (int, float)) and nbytes > 0 and len(self) else None

    def check(self, block_size: int) -> None:
        """Raise GPT2LabError unless the split can supply one sequence of ``block_size`` inputs + 1 target."""
        if block_size < 1:
            raise ConfigError(f"block_size must be at least 1, got {block_size}")
        if len(self) < block_size + 1:
            raise GPT2LabError(
                f"the {self.split} split of {self.data_dir} has {len(self)} tokens, fewer than block_size + 1 = "
                f"{block_size + 1}; use a smaller block_size, a larger corpus, or (for val) a larger --val-fraction"
            )

    def verify(self, progress: bool = False) -> None:
        """Check every shard against the sha256 that meta.json records (where it does) and every id
        against the vocabulary: one pass over the split. GPT2LabError names the damaged file."""
        chunk = 1 << 22
        total = sum(len(s) for s in self.shards)
        with tqdm(total=total, unit="tok", unit_scale=True, desc=f"check {self.split}", disable=not progress) as bar:
            for record, tokens in zip((r for r in self.records if r["tokens"]), self.shards, strict=True):
                digest = hashlib.sha256()
                for start in range(0, len(tokens), chunk):
                    block = np.asarray(tokens[start : start + chunk])
                    digest.update(block.tobytes())
                    if int(block.max()) >= self.vocab_size:
                        raise GPT2LabError(
                            f"shard {self.data_dir / record['file']} holds token id {int(block.max())}, outside "
                            f"the vocabulary of {self.vocab_size} that {META} declares; prepare the directory again"
                        )
                    bar.update(len(block))
                if "sha256" in record and digest.hexdigest() != record["sha256"]:
                    raise GPT2LabError(
                        f"shard {self.data_dir / record['file']} does not match the sha256 in {META}: it was "
                        "changed or damaged after preparation; prepare the directory again"
                    )

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the stream as a uint16 array (copied; may span shards)."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"tokens [{start}, {start + length}) outside a split of {len(self)} tokens")
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        out = np.empty(length, dtype=DTYPE)
        done = 0
        while done < length:
            offset = start + done - int(self.starts[i])
            take = min(length - done, len(self.shards[i]) - offset)
            out[done : done + take] = self.shards[i][offset : offset + take]
            done += take
            i += 1
        return out

    def sequences(self, starts: Sequence[int] | np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y int64 of shape (len(starts), block_size) with y[i] = the tokens after x[i]."""
        rows = np.stack([self.read(int(s), block_size + 1) for s in starts]).astype(np.int64)  # (B, T+1)
        buf = torch.from_numpy(rows)
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()


class ShardWriter:
    """Appends tokens to ``{split}_NNNNNN.bin`` shards of ``shard_tokens`` tokens each.

    A shard is written as ``*.bin.tmp`` and renamed when full (or at ``close``), so a file with the final
    name is always complete.
    """

    def __init__(self, directory: Path, split: str, shard_tokens: int, byte_lengths: np.ndarray | None = None):
        self.directory, self.split, self.shard_tokens = directory, split, shard_tokens
        self.shards: list[dict] = []  # {"file", "tokens", "sha256"} of finished shards
        self.tokens = 0
        self.byte_lengths = byte_lengths  # bytes of text each token id stands for, to count the split's bytes
        self.bytes = 0
        self._file = None
        self._hash = hashlib.sha256()
        self._n = 0  # tokens in the open shard

    def _name(self, index: int) -> str:
        return f"{self.split}_{index:06d}.bin"

    def write(self, ids: np.ndarray) -> None:
        if self.byte_lengths is not None:
            self.bytes += int(self.byte_lengths[ids].sum())
        with files.disk_space(self.directory / self._name(len(self.shards))):
            self._write(ids)

    def _write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._file is None:
                # open across many write() calls, closed by _finish
                self._file = open(self.directory / (self._name(len(self.shards)) + ".tmp"), "wb")  # noqa: SIM115
                self._hash, self._n = hashlib.sha256(), 0
            take = min(len(ids), self.shard_tokens - self._n)
            chunk = ids[:take].tobytes()
            self._file.write(chunk)
            self._hash.update(chunk)
            self._n += take
            self.tokens += take
            ids = ids[take:]
            if self._n == self.shard_tokens:
                self._finish()

    def _finish(self) -> None:
        name = self._name(len(self.shards))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self.directory / (name + ".tmp"), self.directory / name)
        self.shards.append({"file": name, "tokens": self._n, "sha256": self._hash.hexdigest()})

    def close(self) -> None:
        if self._file is not None:
            self._finish()

    def move_tail(self, start: int, into: ShardWriter) -> None:
        """Move tokens ``[start, end)`` of this closed split to the end of ``into``, shortening this one."""
        first = 0
        kept = []
        for shard in self.shards:
            path = self.directory / shard["file"]
            if first + shard["tokens"] <= start:
                kept.append(shard)
            else:
                keep = max(0, start - first)
                tokens = np.fromfile(path, dtype=DTYPE)
                into.write(tokens[keep:])
                if self.byte_lengths is not None:
                    self.bytes -= int(self.byte_lengths[tokens[keep:]].sum())
                if keep:
                    files.write_bytes(path, tokens[:keep].tobytes())
                    kept.append(
                        {"file": shard["file"], "tokens": keep, "sha256": hashlib.sha256(tokens[:keep]).hexdigest()}
                    )
                else:
                    path.unlink()
            first += shard["tokens"]
        self.shards = kept
        self.tokens = min(self.tokens, start)
