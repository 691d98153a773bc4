"""Measurements of a comparison run: peak memory, what a training log says, KV-cache bytes and decode
speed, and summary statistics over seeds."""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from gpt2lab import files
from gpt2lab.config import GPTConfig
from gpt2lab.generation import stream
from gpt2lab.model import GPT
from gpt2lab.train import METRICS


class PeakMemory:
    """Peak memory added while the block runs, in bytes (``None`` where it cannot be measured).

    CUDA: the allocator's peak (torch.cuda.max_memory_allocated) above what was allocated at entry.
    CPU (Linux): the rise of the process's peak resident set, VmHWM, after resetting it through
    /proc/self/clear_refs; freed heap memory is returned to the system first (malloc_trim), so that
    memory kept from an earlier run does not hide this one's. It counts everything the process touches:
    weights, gradients, optimizer state, activations, batches and any allocator slack.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
            self.base = _proc_status("VmRSS")
        except OSError:
            self.base = None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.base is not None:
            self.bytes = _proc_status("VmHWM") - self.base


def _proc_status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def run_summary(out_dir: Path) -> dict:
    """What a training run's metrics.jsonl says: the val-loss curve, the final val loss, and training
    speed (the median tokens/s of the logged intervals after the first, which holds start-up costs)."""
    records, _ = files.read_jsonl(out_dir / METRICS)
    curve = [[r["step"], r["val_loss"]] for r in records if "val_loss" in r]
    speeds = [r["tokens_per_s"] for r in records[1:]] or [records[-1]["tokens_per_s"]]
    return {
        "val_curve": curve,
        "final_val_loss": curve[-1][1] if curve else None,
        "train_loss_curve": [[r["step"], r["loss"]] for r in records],
        "tokens_per_s": statistics.median(speeds),
        "tokens": records[-1]["tokens"],
    }


@torch.no_grad()
def decode_benchmark(
    config: GPTConfig, context: int, new_tokens: int, train_context: int, device: torch.device, dtype
) -> dict:
    """KV-cache bytes (summed over the K/V buffers that ``setup_cache`` allocates) at the training
    context and at ``context``, and greedy decode speed at ``context`` tokens, with random weights.
    Learned-position variants get a position table as long as ``context`` for this, since speed and
    memory do not depend on what it holds."""
    config = dataclasses.replace(config, block_size=max(config.block_size, context), dropout=0.0)
    torch.manual_seed(0)
    model = GPT(config).to(device=device, dtype=dtype).eval()

    def cache_bytes(length: int) -> int:
        model.setup_cache(1, length)
        try:
            return sum(block.attn.kv_cache.k.nbytes + block.attn.kv_cache.v.nbytes for block in model.h)
        finally:
            model.clear_cache()

    prompt = torch.randint(0, config.vocab_size, (context - new_tokens,), generator=torch.Generator().manual_seed(0))
    stamps = []
    for _ in stream(model, [prompt.tolist()], new_tokens, temperature=0.0, eos_id=None):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())
    # the first token comes after the prefill; the intervals after it are single-token decode steps
    tokens_per_s = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "kv_bytes_per_token": cache_bytes(train_context) / train_context,
        "cache_bytes": cache_bytes(context),
        "tokens_per_s": tokens_per_s,
    }


def stats(values: list) -> dict | None:
    """Mean, standard deviation, range and the values of a measurement over seeds (None if any is missing)."""
    if any(v is None for v in values):
        return None
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def environment(device: torch.device) -> dict:
    """Where a comparison ran: device, threads, versions, load."""
    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
