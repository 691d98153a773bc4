"""gpt2lab: exact GPT-2 and its modern variants in plain PyTorch.

The names below are imported on first use, so ``import gpt2lab`` (and ``gpt2lab --help``, and a
command line with a mistake in it) answers without loading torch.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING

# numpy's OpenBLAS threads look for more work for 2^20 cycles (under a millisecond) before they sleep,
# not OpenBLAS's default 2^28 (a tenth of a second). A decode step whose products run in numpy's BLAS
# (gpt2lab.ops.numpy_blas_threads) gives them work every few dozen microseconds, well within that;
# with the default they went on spinning through torch's next multi-threaded work (a 2-thread read of
# 494 MB right after a 124M step took 23.5 ms instead of 15.3). OpenBLAS reads the environment once,
# when numpy loads: a value the user set is kept, and where numpy is loaded already nothing changes.
OPENBLAS_SPIN = "20"
if "numpy" not in sys.modules:
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", OPENBLAS_SPIN)

if TYPE_CHECKING:
    from gpt2lab.config import GPTConfig
    from gpt2lab.errors import CheckpointError, ConfigError, GPT2LabError
    from gpt2lab.generation import generate, stream
    from gpt2lab.load import load_model, save_pretrained
    from gpt2lab.model import GPT, Backends
    from gpt2lab.tokenizer import load_tokenizer

_HOME = {
    "GPT": "gpt2lab.model",
    "Backends": "gpt2lab.model",
    "load_model": "gpt2lab.load",
    "save_pretrained": "gpt2lab.load",
    "GPTConfig": "gpt2lab.config",
    "GPT2LabError": "gpt2lab.errors",
    "CheckpointError": "gpt2lab.errors",
    "ConfigError": "gpt2lab.errors",
    "generate": "gpt2lab.generation",
    "stream": "gpt2lab.generation",
    "load_tokenizer": "gpt2lab.tokenizer",
}
__all__ = [
    "GPT",
    "Backends",
    "GPTConfig",
    "GPT2LabError",
    "CheckpointError",
    "ConfigError",
    "generate",
    "stream",
    "load_model",
    "save_pretrained",
    "load_tokenizer",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'gpt2lab' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value  # once: later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])
