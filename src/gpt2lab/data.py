"""Corpus -> uint16 token shards on disk, and deterministic, rank-aware batches read back from them.

A prepared directory holds ``train_000000.bin``, ``train_000001.bin``, ... and ``val_000000.bin``, ...
(raw little-endian uint16 GPT-2 token ids; every document is followed by ``<|endoftext|>`` = 50256)
and ``meta.json``, written last, which lists the shards and their token counts. A split is read as one
stream: the concatenation of its shards in order.
"""

from __future__ import annotations

import codecs
import collections
import glob
import hashlib
import json
import multiprocessing
import os
import platform
import re
import secrets
import shutil
import signal
import sysconfig
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gpt2lab.errors import ConfigError, GPT2LabError
from gpt2lab.tokenizer import ENCODER_JSON_SHA256, EOT, VOCAB_BPE_SHA256, load_tokenizer

META = "meta.json"
SPLITS = ("train", "val")
FORMAT = "gpt2lab-tokens"
FORMAT_VERSION = 1
DTYPE = np.dtype("<u2")  # little-endian uint16 on every machine; GPT-2 ids are < 65536


class TokenData:
    """The token stream of one split of a prepared directory, memory-mapped (nothing is read up front).

    ``block_size``, when given, is checked: sampling a sequence needs at least ``block_size + 1`` tokens.
    """

    def __init__(self, data_dir: str | Path, split: str, block_size: int | None = None):
        self.data_dir = Path(data_dir)
        self.split = split
        if split not in SPLITS:
            raise GPT2LabError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        meta_path = self.data_dir / META
        if not self.data_dir.is_dir():
            raise GPT2LabError(
                f"data directory {self.data_dir} does not exist; "
                f"create it with: gpt2lab prepare --input ... --out {self.data_dir}"
            )
        if not meta_path.is_file():
            raise GPT2LabError(
                f"{self.data_dir} has no {META}, so it is not a prepared data directory (or its preparation did not "
                f"finish); run: gpt2lab prepare --input ... --out {self.data_dir}"
            )
        try:
            self.meta = json.loads(meta_path.read_text())
            shards = self.meta["splits"][split]["shards"]
        except (ValueError, KeyError, TypeError) as e:
            raise GPT2LabError(f"{meta_path} is malformed ({e!r}); prepare the directory again") from None
        self.shards: list[np.memmap] = []
        for shard in shards:
            path = self.data_dir / shard["file"]
            expected = 2 * int(shard["tokens"])
            size = path.stat().st_size if path.is_file() else -1
            if size != expected:
                raise GPT2LabError(
                    f"shard {path} is missing or has {size} bytes instead of {expected}; prepare the directory again"
                )
            if expected:  # numpy cannot map an empty file; an empty shard adds nothing anyway
                self.shards.append(np.memmap(path, dtype=DTYPE, mode="r"))
        # starts[i] = offset of shard i in the split's stream; starts[-1] = total tokens
        self.starts = np.cumsum([0] + [len(s) for s in self.shards], dtype=np.int64)
        if block_size is not None:
            self.check(block_size)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def check(self, block_size: int) -> None:
        """Raise GPT2LabError unless the split can supply one sequence of ``block_size`` inputs + 1 target."""
        if block_size < 1:
            raise ConfigError(f"block_size must be at least 1, got {block_size}")
        if len(self) < block_size + 1:
            raise GPT2LabError(
                f"the {self.split} split of {self.data_dir} has {len(self)} tokens, fewer than block_size + 1 = "
                f"{block_size + 1}; use a smaller block_size, a larger corpus, or (for val) a larger --val-fraction"
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


# ---------------------------------------------------------------------------------------------------
# prepare: corpus -> shards

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
CORPORA = ("stdlib", "shakespeare")
# directories of the standard library that are not "the library": its test suites and installed packages
STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
PIECE_CHARS = 1 << 18  # long texts are tokenized in pieces of about this many characters
TASK_CHARS = 1 << 18  # characters sent to a worker at once: large enough to amortize pickling
READ_BYTES = 1 << 20

# A cut at one of these positions never changes GPT-2 tokenization (encode(a + b) == encode(a) + encode(b)):
# the pre-tokenizer regex always ends a match there, and the match before it needs no lookahead past it.
# 1) after a "\n" that has non-space characters on both sides ("x\n|y"): the "\n" is a match of its own
#    (Python's \S is narrower than the tokenizer's, so what Python calls non-space is non-space there too);
# 2) before " " + letter after a letter ("x| y"; ASCII letters only): " y..." starts a new match.
# Checked at every cut on tiny-shakespeare, stdlib sources and random text in tests/test_data.py.
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)|(?<=[A-Za-z])(?= [A-Za-z])")


def _cut(text: str, limit: int) -> tuple[str, str]:
    """(head, rest) with head ending at a safe cut, at most ``limit`` characters when such a cut exists.

    Returns ("", text) when ``text`` is not longer than ``limit`` or has no safe cut at all.
    """
    if len(text) <= limit:
        return "", text
    # lookahead needs the characters just past the limit; a cut must leave a non-empty head
    window = _SAFE_CUT.finditer(text, max(1, limit - limit // 4), limit + 2)
    cut = max((m.start() for m in window if m.start() <= limit), default=None)
    if cut is None:
        cut = max((m.start() for m in _SAFE_CUT.finditer(text, 1, limit + 2) if m.start() <= limit), default=None)
    if cut is None:  # nothing safe before the limit: take the first cut after it, or keep the text whole
        m = _SAFE_CUT.search(text, limit)
        cut = m.start() if m else None
    return ("", text) if cut is None else (text[:cut], text[cut:])


def split_text(text: str, limit: int = PIECE_CHARS) -> list[str]:
    """``text`` as pieces of about ``limit`` characters whose tokens, concatenated, are those of the whole."""
    pieces = []
    while True:
        head, text = _cut(text, limit)
        if not head:
            return [*pieces, text]
        pieces.append(head)


# A source is a stream of (text, end_of_document, bytes_read) events. A text file arrives as pieces (each
# cut safely) read block by block, so a huge single-file corpus needs little memory and still tokenizes in
# parallel; a JSONL record is parsed whole, then cut the same way.
Events = Iterator[tuple[str, bool, int]]


def input_files(inputs: Sequence[str | Path], exclude: Path | None = None) -> list[Path]:
    """The files named by ``inputs`` (files, directories walked recursively, globs), in a fixed order.

    Directories are walked sorted, skipping hidden entries. Files under ``exclude`` (the output
    directory) are left out, and a file named twice is read once.
    """
    files: list[Path] = []
    for spec in inputs:
        path = Path(spec)
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = list(_walk(path))
        elif glob.has_magic(str(spec)):
            matches = sorted(glob.glob(str(spec), recursive=True))
            found = [f for m in matches for f in ([Path(m)] if Path(m).is_file() else _walk(Path(m)))]
            if not found:
                raise GPT2LabError(
                    f"--input {str(spec)!r} matches no files; check the pattern (quote it for the shell)"
                )
        else:
            raise GPT2LabError(
                f"--input {str(spec)!r} does not exist; give a file, a directory, a glob such as 'docs/**/*.txt', "
                "or a .jsonl file"
            )
        files += found
    seen = {exclude.resolve()} if exclude is not None else set()
    kept = []
    for f in files:
        real = f.resolve()
        if real not in seen and seen.isdisjoint(real.parents):
            kept.append(f)
        seen.add(real)
    return kept


def _walk(root: Path, suffix: str | None = None, skip: frozenset[str] = frozenset()) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skip)
        for name in sorted(filenames):
            if not name.startswith(".") and (suffix is None or name.endswith(suffix)):
                yield Path(dirpath, name)


def stdlib_files() -> list[Path]:
    """The Python standard library's own ``.py`` files (no test suites, no site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return list(_walk(root, suffix=".py", skip=STDLIB_SKIP_DIRS))


def _file_events(path: Path, text_field: str) -> Events:
    if path.suffix.lower() == ".jsonl":
        yield from _jsonl_events(path, text_field)
        return
    decoder = codecs.getincrementaldecoder("utf-8")()  # strict: a binary file is an error, not garbage tokens
    buf, pending, offset = "", 0, 0
    retry_at = 0  # after a failed cut, wait for the buffer to double: a cut-free file costs linear time
    with open(path, "rb") as f:  # bytes, so "\r\n" stays as written and progress counts real bytes
        while block := f.read(READ_BYTES):
            try:
                buf += decoder.decode(block)
            except UnicodeDecodeError as e:
                raise GPT2LabError(
                    f"{path} is not UTF-8 text (bad byte near offset {offset + e.start}); "
                    "convert it to UTF-8 or leave it out of --input"
                ) from None
            offset += len(block)
            pending += len(block)
            while len(buf) > max(PIECE_CHARS, retry_at):
                head, buf = _cut(buf, PIECE_CHARS)
                if not head:
                    retry_at = 2 * len(buf)
                    break
                yield head, False, pending
                pending, retry_at = 0, 0
        try:
            buf += decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise GPT2LabError(f"{path} ends inside a UTF-8 character; convert it to UTF-8 text") from None
    yield buf, True, pending


def _jsonl_events(path: Path, text_field: str) -> Events:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                yield "", True, len(line)  # an empty document: skipped, but its bytes count as read
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise GPT2LabError(
                    f"{path}:{lineno}: not a JSON object ({e}); a .jsonl file needs one object per line, "
                    f'such as {{"{text_field}": "..."}}'
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                keys = ", ".join(map(repr, record)) if isinstance(record, dict) else type(record).__name__
                raise GPT2LabError(
                    f"{path}:{lineno}: no string field {text_field!r} (found: {keys}); "
                    "name the field holding the text with --text-field"
                )
            pieces = split_text(record[text_field], PIECE_CHARS)
            for i, piece in enumerate(pieces):
                yield piece, i == len(pieces) - 1, len(line) if i == 0 else 0


def _text_events(text: str) -> Events:
    pieces = split_text(text, PIECE_CHARS)
    for i, piece in enumerate(pieces):
        yield piece, i == len(pieces) - 1, len(piece.encode())


def download_shakespeare() -> str:
    """tiny-shakespeare (Karpathy's char-rnn copy), verified by sha256."""
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as response:
            data = response.read()
    except (OSError, ValueError) as e:  # URLError and timeouts are OSErrors
        raise GPT2LabError(
            f"cannot download tiny-shakespeare from {SHAKESPEARE_URL} ({e}); without internet, copy that file "
            "here some other way and run: gpt2lab prepare --input path/to/input.txt --out DIR"
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise GPT2LabError(
            f"the downloaded tiny-shakespeare has sha256 {digest}, expected {SHAKESPEARE_SHA256}; "
            "retry, or use --input with a copy you trust"
        )
    return data.decode("utf-8")


# --- tokenization, in worker processes --------------------------------------------------------------

_encoding = None  # loaded once per process: building the tokenizer takes seconds


def _load_encoding() -> None:
    global _encoding
    _encoding = _encoding or load_tokenizer()


def _init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the parent
    _load_encoding()  # a no-op when the pool forks from a parent that has it


def _encode_task(pieces: list[tuple[str, bool]]) -> list[np.ndarray]:
    """Tokens of each piece (``<|endoftext|>`` appended after a document's last piece), as uint16."""
    out = []
    for text, end in pieces:
        # encode_ordinary: a literal "<|endoftext|>" in a document is text, never the separator
        ids = _encoding.encode_ordinary(text)
        if end:
            ids.append(EOT)
        out.append(np.array(ids, dtype=DTYPE))
    return out


def _tasks(events: Events, max_docs: int | None) -> Iterator[tuple[list[tuple[str, bool]], int]]:
    """Group events into tasks of about TASK_CHARS characters: (pieces, bytes read); empty documents dropped."""
    task: list[tuple[str, bool]] = []
    chars = nbytes = docs = 0
    in_doc = False
    for text, end, read in events:
        nbytes += read
        if text or in_doc:
            task.append((text, end))
            chars += len(text)
            in_doc = not end
            docs += end
        if chars >= TASK_CHARS or (max_docs is not None and docs >= max_docs):
            yield task, nbytes
            task, chars, nbytes = [], 0, 0
            if max_docs is not None and docs >= max_docs:
                return
    if task or nbytes:
        yield task, nbytes


def _encoded(tasks: Iterator[tuple[list[tuple[str, bool]], int]], workers: int):
    """(end-of-document flags, token arrays, bytes read) per task, in input order, a few tasks in flight."""
    _load_encoding()
    if workers == 1:
        for pieces, nbytes in tasks:
            yield [end for _, end in pieces], _encode_task(pieces), nbytes
        return
    # apply_async with a bounded window instead of Pool.imap: imap reads its input as fast as it can,
    # which would pull a large corpus into memory whenever reading outruns tokenizing
    pool = multiprocessing.Pool(workers, initializer=_init_worker)
    try:
        window: collections.deque = collections.deque()
        for pieces, nbytes in tasks:
            window.append(([end for _, end in pieces], pool.apply_async(_encode_task, (pieces,)), nbytes))
            if len(window) >= 2 * workers:
                ends, result, nbytes = window.popleft()
                yield ends, result.get(), nbytes
        while window:
            ends, result, nbytes = window.popleft()
            yield ends, result.get(), nbytes
        pool.close()
    finally:
        pool.terminate()
        pool.join()


# --- shards ------------------------------------------------------------------------------------------


class _ShardWriter:
    """Appends tokens to ``{split}_NNNNNN.bin`` shards of ``shard_tokens`` tokens each.

    A shard is written as ``*.bin.tmp`` and renamed when full (or at ``close``), so a file with the final
    name is always complete.
    """

    def __init__(self, directory: Path, split: str, shard_tokens: int):
        self.directory, self.split, self.shard_tokens = directory, split, shard_tokens
        self.shards: list[dict] = []  # {"file", "tokens", "sha256"} of finished shards
        self.tokens = 0
        self._file = None
        self._hash = hashlib.sha256()
        self._n = 0  # tokens in the open shard

    def _name(self, index: int) -> str:
        return f"{self.split}_{index:06d}.bin"

    def write(self, ids: np.ndarray) -> None:
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

    def move_tail(self, start: int, into: _ShardWriter) -> None:
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
                if keep:  # rewrite the shortened shard the same way as a new one: temp name, then rename
                    tmp = path.with_name(path.name + ".tmp")
                    tmp.write_bytes(tokens[:keep].tobytes())
                    os.replace(tmp, path)
                    kept.append(
                        {"file": shard["file"], "tokens": keep, "sha256": hashlib.sha256(tokens[:keep]).hexdigest()}
                    )
                else:
                    path.unlink()
            first += shard["tokens"]
        self.shards = kept
        self.tokens = min(self.tokens, start)


# --- prepare -----------------------------------------------------------------------------------------


@dataclass
class PrepareSummary:
    """What ``prepare`` wrote."""

    out: Path
    documents: dict[str, int]  # per split
    tokens: dict[str, int]  # per split
    shards: int
    bytes_read: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.bytes_read / 1e6 / max(self.seconds, 1e-9)

    def __str__(self) -> str:
        d, t = self.documents, self.tokens
        return (
            f"{d['train'] + d['val']:,} documents ({d['train']:,} train, {d['val']:,} val), "
            f"{t['train'] + t['val']:,} tokens ({t['train']:,} train, {t['val']:,} val) in {self.shards} shards; "
            f"{self.bytes_read / 1e6:.1f} MB in {self.seconds:.1f} s ({self.mb_per_s:.2f} MB/s) -> {self.out}"
        )


def prepare(
    out: str | Path,
    inputs: Sequence[str | Path] = (),
    corpus: str | None = None,
    *,
    val_fraction: float = 0.01,
    shard_tokens: int = 10_000_000,
    workers: int | None = None,
    text_field: str = "text",
    max_docs: int | None = None,
    progress: bool = True,
) -> PrepareSummary:
    """Tokenize a corpus (``inputs`` or a named ``corpus``) into a prepared directory ``out``.

    Document ``i`` (counting from 0, empty documents skipped) goes to val when ``floor((i + 1) * f)``
    exceeds ``floor(i * f)`` for ``f = val_fraction``: every 100th document for 0.01, deterministic and
    spread over the corpus. A corpus too small for that gives its last document to val, and a
    one-document corpus its last ``val_fraction`` of tokens.

    Everything is written into a temporary directory beside ``out`` and swapped in at the end, so an
    interrupted or failed run leaves an existing ``out`` as it was. ``max_docs`` stops early (a sample).
    """
    if bool(inputs) == (corpus is not None):
        raise ConfigError("give either input paths or a corpus name, not both and not neither")
    if corpus is not None and corpus not in CORPORA:
        raise ConfigError(f"unknown corpus {corpus!r}; choose one of {', '.join(CORPORA)}")
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if shard_tokens < 1:
        raise ConfigError(f"shard_tokens must be at least 1, got {shard_tokens}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    if max_docs is not None and max_docs < 1:
        raise ConfigError(f"max_docs must be at least 1, got {max_docs}")
    out = Path(out).expanduser().absolute()  # absolute: "." must become a name that can be swapped
    if out.exists() and not out.is_dir():
        raise GPT2LabError(f"--out {out} is a file; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not (out / META).is_file():
        raise GPT2LabError(
            f"--out {out} is a non-empty directory that is not a prepared data directory (no {META}); "
            "choose a new or empty directory (prepare replaces the directory it writes)"
        )

    # resolve the whole input list before writing anything, so a typo fails fast
    if corpus == "shakespeare":
        text = download_shakespeare()
        events, total = _text_events(text), len(text.encode())
        source = {"corpus": corpus, "url": SHAKESPEARE_URL, "sha256": SHAKESPEARE_SHA256}
    else:
        files = stdlib_files() if corpus == "stdlib" else input_files(inputs, exclude=out)
        if not files:
            raise GPT2LabError("the corpus is empty: no input files were found")
        events = (event for f in files for event in _file_events(f, text_field))
        total = sum(f.stat().st_size for f in files)
        if corpus == "stdlib":
            source = {"corpus": corpus, "path": sysconfig.get_paths()["stdlib"], "python": platform.python_version()}
        else:
            source = {"inputs": [str(i) for i in inputs], "text_field": text_field}
        source["files"] = len(files)
    if max_docs is not None:
        source["max_docs"] = max_docs

    _load_encoding()  # before the clock: a one-time cost, not throughput
    out.parent.mkdir(parents=True, exist_ok=True)
    # not tempfile.mkdtemp: its 0700 mode would become the mode of out
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    t0 = time.perf_counter()
    try:
        split = _write_splits(tmp, events, total, val_fraction, shard_tokens, workers, max_docs, progress)
        seconds = time.perf_counter() - t0
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "dtype": "uint16",
            "byteorder": "little",
            "eot": EOT,
            "vocab_size": EOT + 1,
            "tokenizer": {
                "name": "gpt2",
                "encoder_json_sha256": ENCODER_JSON_SHA256,
                "vocab_bpe_sha256": VOCAB_BPE_SHA256,
            },
            "source": source,
            "val_fraction": val_fraction,
            "shard_tokens": shard_tokens,
            "bytes": split.pop("bytes"),
            "splits": split,
        }
        _write_atomic(tmp / META, json.dumps(meta, indent=2) + "\n")
        _swap(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PrepareSummary(
        out=out,
        documents={s: meta["splits"][s]["documents"] for s in SPLITS},
        tokens={s: meta["splits"][s]["tokens"] for s in SPLITS},
        shards=sum(len(meta["splits"][s]["shards"]) for s in SPLITS),
        bytes_read=meta["bytes"],
        seconds=seconds,
    )


def _write_splits(
    directory: Path,
    events: Events,
    total_bytes: int,
    val_fraction: float,
    shard_tokens: int,
    workers: int,
    max_docs: int | None,
    progress: bool,
) -> dict:
    writers = {s: _ShardWriter(directory, s, shard_tokens) for s in SPLITS}
    docs = {s: 0 for s in SPLITS}
    frac = Fraction(val_fraction).limit_denominator(1_000_000)  # exact integer arithmetic from here on
    doc = 0  # index of the current document
    doc_start = last_start = -1  # where the current / the last finished document begins in its split
    bytes_read = 0
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=not progress) as bar:
        for ends, arrays, nbytes in _encoded(_tasks(events, max_docs), workers):
            for end, ids in zip(ends, arrays, strict=True):
                split = "val" if _is_val(doc, frac) else "train"
                if doc_start < 0:
                    doc_start = writers[split].tokens
                writers[split].write(ids)
                if end:
                    docs[split] += 1
                    doc += 1
                    last_start, doc_start = doc_start, -1
            bytes_read += nbytes
            bar.update(nbytes)
    for w in writers.values():
        w.close()
    if doc == 0:
        raise GPT2LabError("the corpus is empty: every input document has no text")
    if docs["val"] == 0:
        train = writers["train"]
        if doc >= 2:  # fewer than 1 / val_fraction documents: the last one is val
            train.move_tail(last_start, writers["val"])
            docs["train"], docs["val"] = docs["train"] - 1, 1
        else:  # one document: its last val_fraction of tokens
            held = min(train.tokens - 1, max(1, round(val_fraction * train.tokens)))
            train.move_tail(train.tokens - held, writers["val"])
        writers["val"].close()
    result = {s: {"documents": docs[s], "tokens": writers[s].tokens, "shards": writers[s].shards} for s in SPLITS}
    result["bytes"] = bytes_read
    return result


def _is_val(doc: int, frac: Fraction) -> bool:
    """Whether document ``doc`` is held out: floor(i * frac) steps up at i = doc + 1."""
    return (doc + 1) * frac.numerator // frac.denominator > doc * frac.numerator // frac.denominator


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _swap(new: Path, out: Path) -> None:
    """Put directory ``new`` at ``out``, replacing what is there (a previous prepared directory, or nothing)."""
    if not out.exists():
        os.replace(new, out)
        return
    # two renames: if the process dies between them the old data survives as .NAME.old-PID beside out
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old)
