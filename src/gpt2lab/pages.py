"""Weights in 2 MiB pages, for CPU decoding.

A decode step reads every weight from memory once. In the 4 KiB pages Linux gives by default that is
a new page every 4 KiB: GPT-2 124M's step crosses about 30,000 of them at 8 bits and 120,000 in
float32, each a miss in the TLB (the processor's cache of page addresses), and the hardware
prefetchers stop at each page's end. Linux backs memory with 2 MiB pages (transparent huge pages)
everywhere it can in its ``always`` mode, and in its ``madvise`` mode (a common default) only where
a program asks for them, which torch's allocator does not. ``huge_copies`` asks: it lays tensors one
after another in one anonymous mapping, from the start of a 2 MiB page, advises the whole 2 MiB pages
they fill ``MADV_HUGEPAGE`` (the last partial page stays in 4 KiB pages, so the copies take no more
memory than the tensors), and returns copies of them there. ``GPT`` moves the weights a decode step
reads into such copies where the mode is ``madvise`` (``wanted``); docs/benchmarks.md has what the
step gains (``bench/pages.py``).
"""

from __future__ import annotations

import functools
import mmap
import sys
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch

HUGE_PAGE = 2 * 2**20
ALIGN = 64  # bytes: each tensor starts on a cache line
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")

_mappings: weakref.WeakValueDictionary[int, mmap.mmap] = weakref.WeakValueDictionary()  # storage address: mapping


@functools.cache
def wanted() -> bool:
    """Whether weights should be copied into 2 MiB pages here: Linux with transparent huge pages in
    mode ``madvise`` (the bracketed word of ``THP_MODE``). In mode ``always`` torch's memory gets them
    already; in ``never``, or on another OS, a copy would gain nothing."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        mode = THP_MODE.read_text()
    except OSError:
        return False
    return "[madvise]" in mode


def in_huge_pages(t: torch.Tensor) -> bool:
    """Whether ``t`` lies in memory ``huge_copies`` made."""
    return t.device.type == "cpu" and t.untyped_storage().data_ptr() in _mappings


def nbytes(tensors: Sequence[torch.Tensor]) -> int:
    """The bytes ``huge_copies`` lays ``tensors`` out in: each rounded up to ``ALIGN``."""
    return sum(_aligned(t.numel() * t.element_size()) for t in tensors)


def _aligned(n: int) -> int:
    """``n`` bytes rounded up to a whole number of ``ALIGN``: where the next tensor starts."""
    return -(-n // ALIGN) * ALIGN


def huge_copies(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of the CPU ``tensors`` (contiguous; the same shapes, dtypes and values, outside inference
    mode), one after another in one anonymous mapping, each on a cache line, the first at the start
    of a 2 MiB page; the whole 2 MiB pages they fill are advised ``MADV_HUGEPAGE``. The mapping lives
    as long as any of the copies (or a view of one). The copies share one storage of ``nbytes`` bytes,
    which is what ``torch.save`` writes of any one of them: pass several only where none of them is
    saved on its own."""
    total = nbytes(tensors)
    mapping = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = -torch.frombuffer(mapping, dtype=torch.uint8, count=1).data_ptr() % HUGE_PAGE  # touches nothing
    whole = total // HUGE_PAGE * HUGE_PAGE
    if whole and hasattr(mmap, "MADV_HUGEPAGE"):
        mapping.madvise(mmap.MADV_HUGEPAGE, start, whole)  # before the first write: pages come on first touch
    with torch.inference_mode(False):  # a weight moved here may be trained later
        memory = torch.frombuffer(mapping, dtype=torch.uint8, count=max(total, 1), offset=start)  # holds the mapping
        _mappings[memory.untyped_storage().data_ptr()] = mapping
        copies, offset = [], 0
        for t in tensors:
            n = t.numel() * t.element_size()
            copies.append(memory[offset : offset + n].view(t.dtype).view(t.shape).copy_(t))
            offset += _aligned(n)
    return copies
