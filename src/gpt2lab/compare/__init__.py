"""``gpt2lab compare``: train every architectural variant on the same data, token budget, seeds and
optimizer, measure what each costs and buys, and write ``report.md``, ``results.json`` and plots.

A variant is ``baseline`` (GPT-2: learned positions, multi-head, full attention) or a ``+``-joined list
of changes to it: ``rope``, ``gqa``, ``mqa``, ``swa`` (a sliding window on every layer) and ``mixed``
(local window layers with periodic global ones). The package: ``settings`` (what to compare, no torch),
``runs`` (training and the order of work), ``measure`` (memory, logs, decode speed, statistics),
``recall`` (the synthetic recall task), ``report`` and ``plots`` (drawn from results.json alone).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpt2lab.compare.runs import compare

__all__ = ["compare"]


def __getattr__(name: str):
    """``compare`` is imported on first use, so reading the settings (``compare --help``) needs no torch."""
    if name != "compare":
        raise AttributeError(f"module 'gpt2lab.compare' has no attribute {name!r}")
    from gpt2lab.compare.runs import compare

    return compare
