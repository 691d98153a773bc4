"""Throughput of ``gpt2lab prepare`` against tiktoken's own single-thread ``encode_ordinary``, same text.

    python bench/prepare.py [--corpus shakespeare|stdlib|both] [--workers N] [--repeat 3]

prepare's time is the whole command after the tokenizer is loaded: reading, UTF-8 decoding, safe
cutting, tokenizing in worker processes (started and stopped each run), writing and hashing shards.
tiktoken's time is ``encode_ordinary`` alone on text already in memory, one document at a time. Both
are measured in the same run, alternating, median of ``--repeat``; MB are bytes of input text.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from common import interleaved

from gpt2lab.data import Source, prepare, stdlib_files
from gpt2lab.tokenizer import load_tokenizer

SHAKESPEARE = Path(__file__).resolve().parents[1] / "tests" / "data" / "tinyshakespeare-200k.txt"


def bench(name: str, files: list[Path], workers: int, repeat: int) -> None:
    enc = load_tokenizer()  # loaded once here: forked workers inherit it, and neither side pays for it
    texts = [f.read_text(encoding="utf-8") for f in files]
    mb = sum(f.stat().st_size for f in files) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        inputs = [str(f) for f in files] if name == "shakespeare" else None

        def run_prepare():
            if inputs:
                prepare(Path(tmp) / "out", Source(inputs), workers=workers, progress=False)
            else:
                prepare(Path(tmp) / "out", Source(corpus="stdlib"), workers=workers, progress=False)

        def run_tiktoken():
            for text in texts:
                enc.encode_ordinary(text)

        t = interleaved({"prepare": run_prepare, "tiktoken": run_tiktoken}, repeat=repeat, warmup=0)
    ours, theirs = mb / t["prepare"], mb / t["tiktoken"]
    print(
        f"{name:<12} {mb:6.1f} MB  prepare ({workers} workers) {ours:6.2f} MB/s   "
        f"tiktoken encode_ordinary (1 thread) {theirs:6.2f} MB/s   ratio {ours / theirs:.2f}x"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", choices=["shakespeare", "stdlib", "both"], default="both")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    if args.corpus in ("shakespeare", "both"):
        if SHAKESPEARE.is_file():
            bench("shakespeare", [SHAKESPEARE], args.workers, args.repeat)
        else:
            print(f"shakespeare: skipped, {SHAKESPEARE} not found")
    if args.corpus in ("stdlib", "both"):
        bench("stdlib", stdlib_files(), args.workers, args.repeat)


if __name__ == "__main__":
    main()
