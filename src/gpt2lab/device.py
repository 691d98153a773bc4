"""Where to compute and in which precision: the one place that resolves ``auto``."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext

import torch

from gpt2lab.config import GPTConfig
from gpt2lab.errors import ConfigError, first_line

INFERENCE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> cuda:LOCAL_RANK when CUDA is available, else cpu; other names are checked to be usable."""
    if device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as e:
        reason = first_line(e).split(". ")[0]  # torch goes on to list every backend it has
        raise ConfigError(f"device {device!r} is not usable here ({reason}); use cpu or auto") from None
    if dev.type == "meta":  # tensors without data: nothing can be computed there
        raise ConfigError("device 'meta' holds no data and computes nothing; use cpu or auto")
    return dev


def uses_bf16_autocast(device: torch.device, dtype: str) -> bool:
    """Whether training runs under bfloat16 autocast: ``bfloat16``, or ``auto`` on a GPU that has it."""
    if dtype == "bfloat16":
        return True
    return dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()


def autocast(device: torch.device, dtype: str) -> AbstractContextManager:
    """The mixed-precision context of training and evaluation (weights stay float32)."""
    if uses_bf16_autocast(device, dtype):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def inference_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype:
    """The weight dtype to run a model in: ``auto`` = bfloat16 on a GPU, float32 elsewhere."""
    if dtype not in INFERENCE_DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(INFERENCE_DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def physical_memory() -> int:
    """Bytes of RAM this machine has."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_memory() -> int | None:
    """Bytes of RAM the OS could give this process now without swapping (Linux's MemAvailable), or
    None where it does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_of(device: torch.device | None) -> tuple[int, str]:
    """Bytes of memory ``device`` has in all, and how to name it: a CUDA device's own, else (the CPU,
    or None) this machine's RAM."""
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, f"{device}'s memory"
    return physical_memory(), "this machine's memory"


def check_fits(config: GPTConfig, bytes_per_param: int = 4, device: torch.device | None = None) -> None:
    """Refuse, before anything is allocated, a model whose weights alone exceed the memory of
    ``device`` (default: this machine's RAM, where every model is first built or loaded)."""
    need = config.num_params() * bytes_per_param
    have, where = memory_of(device)
    if need > have:
        raise ConfigError(
            f"the model's {config.num_params():,} parameters need {need / 2**30:,.1f} GiB for the weights alone, "
            f"more than {where} ({have / 2**30:,.1f} GiB); check n_layer, n_embd and vocab_size "
            f"(got {config.n_layer}, {config.n_embd}, {config.vocab_size})"
        )
