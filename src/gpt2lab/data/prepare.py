"""``prepare``: a corpus -> a prepared token directory (gpt2lab.data.format), tokenized in parallel.

Everything is written into a temporary directory beside the output and swapped in at the end, so an
interrupted or failed run leaves an existing directory as it was.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import multiprocessing
import os
import re
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gpt2lab import files
from gpt2lab.data.format import DTYPE, META, SPLITS, ShardWriter, write_meta
from gpt2lab.data.sources import Events, Source
from gpt2lab.errors import ConfigError, GPT2LabError
from gpt2lab.tokenizer import ENCODER_JSON_SHA256, EOT, VOCAB_BPE_SHA256, load_tokenizer, token_byte_lengths

TASK_CHARS = 1 << 18  # characters sent to a worker at once: large enough to amortize pickling

# --- tokenization, in worker processes --------------------------------------------------------------

_encoding = None  # loaded once per process: building the tokenizer takes seconds


def _load_encoding() -> None:
    global _encoding
    _encoding = _encoding or load_tokenizer()


def _init_worker(parent: int) -> None:
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the parent
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the pool's terminate ends a worker (not the parent's handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # held in the parent while it forked this one
    _load_encoding()  # a no-op when the pool forks from a parent that has it


def _die_with_parent(parent: int) -> None:
    """On Linux, end this worker (SIGKILL) when the thread of ``parent`` that forked it ends. The pool's own
    thread replaces workers that end; one it forks while the pool is torn down by an interrupt outlives
    the parent, waiting forever on a queue lock a terminated worker held (and holding the parent's
    standard streams open). Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent ended before the request: nothing would send the signal
        os._exit(1)


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


TOKENIZER = {"name": "gpt2", "encoder_json_sha256": ENCODER_JSON_SHA256, "vocab_bpe_sha256": VOCAB_BPE_SHA256}
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when the thread that forked it ends


@contextlib.contextmanager
def _held(signals: set[signal.Signals]) -> Iterator[None]:
    """Delay ``signals`` to the end of the block (they stay pending, then arrive)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _encoded(tasks: Iterator[tuple[list[tuple[str, bool]], int]], workers: int):
    """(end-of-document flags, token arrays, bytes read) per task, in input order, a few tasks in flight."""
    _load_encoding()
    if workers == 1:
        for pieces, nbytes in tasks:
            yield [end for _, end in pieces], _encode_task(pieces), nbytes
        return
    # apply_async with a bounded window instead of Pool.imap: imap reads its input as fast as it can,
    # which would pull a large corpus into memory whenever reading outruns tokenizing
    pool = None
    try:  # from before the pool exists: an interrupt held while it forked arrives as the block ends
        with _held(STOP_SIGNALS):  # an interrupt raised while forking would be lost (printed, then ignored)
            pool = multiprocessing.Pool(workers, initializer=_init_worker, initargs=(os.getpid(),))
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
    finally:  # here, not at exit: there the pool's thread would replace the workers exit ends, and the
        # new ones, orphans, would wait forever on a queue lock a terminated worker held
        if pool is not None:
            pool.terminate()
            pool.join()


# --- prepare -----------------------------------------------------------------------------------------


MIN_VAL_TOKENS = 1025  # one GPT-2 context of inputs plus its targets: enough to evaluate any model


@dataclass
class PrepareSummary:
    """What ``prepare`` wrote."""

    out: Path
    documents: dict[str, int]  # per split
    tokens: dict[str, int]  # per split
    shards: int
    bytes_read: int
    seconds: float
    skipped_binary_files: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def mb_per_s(self) -> float:
        return self.bytes_read / 1e6 / max(self.seconds, 1e-9)

    def __str__(self) -> str:
        d, t = self.documents, self.tokens
        skipped = f"; skipped {self.skipped_binary_files} binary files" if self.skipped_binary_files else ""
        return (
            f"{d['train'] + d['val']:,} document{'s' * (d['train'] + d['val'] != 1)} ({d['train']:,} train, {d['val']:,} val), "
            f"{t['train'] + t['val']:,} tokens ({t['train']:,} train, {t['val']:,} val) in {self.shards} shards; "
            f"{self.bytes_read / 1e6:.1f} MB in {self.seconds:.1f} s ({self.mb_per_s:.2f} MB/s){skipped} -> {self.out}"
        )


def prepare(
    out: str | Path,
    source: Source,
    *,
    val_fraction: float = 0.01,
    shard_tokens: int = 10_000_000,
    workers: int | None = None,
    progress: bool = True,
) -> PrepareSummary:
    """Tokenize ``source`` into a prepared directory ``out`` (format: gpt2lab.data.format).

    Document ``i`` (counting from 0, empty documents skipped) goes to val when ``floor((i + 1) * f)``
    exceeds ``floor(i * f)`` for ``f = val_fraction``: every 100th document for 0.01, deterministic and
    spread over the corpus. A corpus too small for that gives its last document to val, and a
    one-document corpus its last ``val_fraction`` of tokens. Val is then topped up from the end of train
    to at least ``MIN_VAL_TOKENS`` tokens where the corpus has ten times that.
    """
    workers = _check_options(val_fraction, shard_tokens, workers)
    out = _check_out(out)
    events, total, info = source.open(exclude=out)
    _load_encoding()  # before the clock: a one-time cost, not throughput
    out.parent.mkdir(parents=True, exist_ok=True)
    files.restore_abandoned(out)  # a prepare killed while it put its output in place
    files.remove_abandoned(out.parent, f".{out.name}.tmp-")  # a killed prepare's partial output
    # not tempfile.mkdtemp: its 0700 mode would become the mode of out
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    t0 = time.perf_counter()
    try:
        with _terminate_as_interrupt():  # a kill or a timeout cleans up as Ctrl-C does
            tmp.mkdir()
            splits = _Splits(tmp, shard_tokens, val_fraction, token_byte_lengths(_encoding))
            # closed when the block ends, interrupted or not: its pool ends now, not when it is collected
            with contextlib.closing(_encoded(_tasks(events, source.max_docs), workers)) as encoded:
                bytes_read = splits.write(encoded, total, progress)
            seconds = time.perf_counter() - t0
            write_meta(
                tmp, splits.shards(), EOT + 1, eot=EOT, tokenizer=TOKENIZER, source=info, val_fraction=val_fraction,
                shard_tokens=shard_tokens, bytes=bytes_read, split_fields=splits.counts(),
            )  # fmt: skip
            with files.disk_space(out):
                left = files.replace_dir(tmp, out)
    except files.DiskFullError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise files.DiskFullError(files.full_message(out)) from None  # name the directory, not its temp twin
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PrepareSummary(
        out=out,
        documents=dict(splits.docs),
        tokens={s: splits.writers[s].tokens for s in SPLITS},
        shards=sum(len(splits.writers[s].shards) for s in SPLITS),
        bytes_read=bytes_read,
        seconds=seconds,
        skipped_binary_files=info.get("skipped_binary_files", 0),
        warnings=splits.warnings() + ([left] if left else []),
    )


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (kill, timeout) raises KeyboardInterrupt in the block, so the partial output is removed as on
    Ctrl-C; elsewhere than the main thread (where no handler can be set) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_options(val_fraction: float, shard_tokens: int, workers: int | None) -> int:
    """The options checked; returns the number of tokenizer processes (default: one per core)."""
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if shard_tokens < 1:
        raise ConfigError(f"shard_tokens must be at least 1, got {shard_tokens}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    return workers


def _check_out(out: str | Path) -> Path:
    out = Path(out).expanduser().resolve()  # "." must become a name that can be swapped; a link, what it names
    if out.exists() and not out.is_dir():
        raise GPT2LabError(f"--out {out} is a file; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not (out / META).is_file():
        raise GPT2LabError(
            f"--out {out} is a non-empty directory that is not a prepared data directory (no {META}); "
            "choose a new or empty directory (prepare replaces the directory it writes)"
        )
    foreign = sorted(p.name for p in out.iterdir() if not _prepared_file(p.name)) if out.is_dir() else []
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise GPT2LabError(
            f"--out {out} is a prepared data directory that also holds {shown}, which preparing it again "
            "would delete (prepare replaces the directory it writes); move them out or choose another --out"
        )
    return out


def _prepared_file(name: str) -> bool:
    """Whether ``name`` is one a prepared directory holds: its meta.json and its splits' shards."""
    return name == META or re.fullmatch(rf"({'|'.join(SPLITS)})_\d{{6,}}\.bin", name) is not None


class _Splits:
    """Documents dealt into the train and val shard writers as they arrive (see ``prepare``)."""

    def __init__(self, directory: Path, shard_tokens: int, val_fraction: float, byte_lengths: np.ndarray) -> None:
        self.writers = {s: ShardWriter(directory, s, shard_tokens, byte_lengths) for s in SPLITS}
        self.docs = {s: 0 for s in SPLITS}
        self.val_fraction = val_fraction
        self.frac = Fraction(val_fraction).limit_denominator(1_000_000)  # exact integer arithmetic from here on

    def write(self, encoded, total_bytes: int, progress: bool) -> int:
        """Deal every encoded piece into its split, then settle the val split; returns the bytes read."""
        doc = 0  # index of the current document
        doc_start = -1  # where the current document begins in its split
        train_starts: list[int] = []  # where each finished train document begins
        bytes_read = 0
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=not progress) as bar:
            for ends, arrays, nbytes in encoded:
                for end, ids in zip(ends, arrays, strict=True):
                    split = "val" if _is_val(doc, self.frac) else "train"
                    if doc_start < 0:
                        doc_start = self.writers[split].tokens
                    self.writers[split].write(ids)
                    if end:
                        self.docs[split] += 1
                        doc += 1
                        if split == "train":
                            train_starts.append(doc_start)
                        doc_start = -1
                bytes_read += nbytes
                bar.update(nbytes)
        for w in self.writers.values():
            w.close()
        if doc == 0:
            raise GPT2LabError("the corpus is empty: every input document has no text")
        self._settle_val(train_starts)
        return bytes_read

    def _settle_val(self, train_starts: list[int]) -> None:
        """Enough val tokens to evaluate with: whole documents moved from the end of train (the last one,
        for a corpus with fewer than 1 / val_fraction documents) until val has ``MIN_VAL_TOKENS`` where
        the corpus has ten times that; a one-document corpus gives its last tokens instead."""
        train, val = self.writers["train"], self.writers["val"]
        total = train.tokens + val.tokens
        want = MIN_VAL_TOKENS if total >= 10 * MIN_VAL_TOKENS else 1
        if self.docs["train"] + self.docs["val"] == 1:  # one document: its last tokens
            held = min(train.tokens - 1, max(round(self.val_fraction * train.tokens), want))
            train.move_tail(train.tokens - held, val)
        else:  # whole documents from the end of train, keeping at least one there
            cut, moved = train.tokens, 0
            while len(train_starts) > 1 and (self.docs["val"] + moved == 0 or val.tokens + train.tokens - cut < want):
                cut = train_starts.pop()
                moved += 1
            if moved:
                train.move_tail(cut, val)
                self.docs["train"], self.docs["val"] = self.docs["train"] - moved, self.docs["val"] + moved
        val.close()

    def counts(self) -> dict[str, dict]:
        """Documents and bytes of text per split, for meta.json."""
        return {s: {"documents": self.docs[s], "bytes": self.writers[s].bytes} for s in SPLITS}

    def shards(self) -> dict[str, list[dict]]:
        return {s: w.shards for s, w in self.writers.items()}

    def warnings(self) -> list[str]:
        short = [f"{s} has {w.tokens:,} tokens" for s, w in self.writers.items() if w.tokens < MIN_VAL_TOKENS]
        if not short:
            return []
        return [
            f"the corpus is small: {' and '.join(short)}; training and evaluation need more tokens than "
            f"their sequence length (train's default is 256, eval's the model's context), so train with "
            f"a small --data.block_size or prepare more text"
        ]


def _is_val(doc: int, frac: Fraction) -> bool:
    """Whether document ``doc`` is held out: floor(i * frac) steps up at i = doc + 1."""
    return (doc + 1) * frac.numerator // frac.denominator > doc * frac.numerator // frac.denominator
