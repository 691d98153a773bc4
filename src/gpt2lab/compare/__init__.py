"""``gpt2lab compare``: decisive evidence on what each architectural variant costs and buys.

Language models of every variant trained from paired initial weights over several seeds (paired differences
with intervals and verdicts), synthetic recall with planted distances and a key-swap control (MQAR), length
extrapolation, GQA uptraining, overfitting against n_kv_head, and decode and kernel speed timed in alternation.
The package: ``settings`` (what to run, no torch), ``plan`` (the jobs and their estimated cost), ``pool``
(worker processes, caching per job), ``training`` (paired initial weights, runs of the training loop), the
experiments (``lm``, ``mqar``, ``extrapolation``, ``efficiency``), ``stats`` and ``analysis`` (results.json),
``report`` and ``plots`` (drawn from results.json alone), and ``runs`` (the whole command).
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
