"""``gpt2lab compare``: train every architectural variant on the same data, token budget, seeds and
optimizer, measure what each costs and buys, and write ``report.md``, ``results.json`` and plots.

A variant is ``baseline`` (GPT-2: learned positions, multi-head, full attention) or a ``+``-joined list
of changes to it: ``rope``, ``gqa``, ``mqa``, ``swa`` (a sliding window on every layer) and ``mixed``
(local window layers with periodic global ones). Per variant and seed, language-model training runs
through ``gpt2lab.train.train`` (the same loop as ``gpt2lab train``; its metrics.jsonl is the source
of the loss curves and speeds), then the trained model is scored at 1x/2x/4x its training context,
and (for the first compare.recall_seeds seeds) trained further on the synthetic recall task
(gpt2lab.recall) to measure how far back it can look a key up. Cache memory and decode speed are
measured once per variant with random weights (they do not depend on the weights).

Finished runs are kept under ``OUT/runs`` and reused when the command is run again with the same
settings, so an interrupted comparison resumes at the run it was in.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gpt2lab.compare_config import CompareConfig, variant_changes, variant_overrides
from gpt2lab.config import GPTConfig, TrainConfig
from gpt2lab.data import DTYPE, META, TokenData, prepare
from gpt2lab.errors import ConfigError, GPT2LabError
from gpt2lab.model import GPT
from gpt2lab.recall import RecallTask, distance_bins, recall_accuracy, recall_model, train_recall

RESULTS, REPORT = "results.json", "report.md"
PLOTS = ("loss_curves.png", "memory_speed.png", "extrapolation.png", "recall.png")
CACHE = "compare_cache.json"  # in each run directory: settings and measurements of finished work
MIB = 2**20


# --- data ------------------------------------------------------------------------------------------


def ensure_data(cfg: CompareConfig, out: Path, progress: bool) -> tuple[Path, dict]:
    """The token directory the runs train on, and a description of it.

    Without data.dir, the offline stdlib corpus (its first compare.max_docs files) is prepared under
    ``out/data``. With compare.vocab > 0 a compacted copy is made beside it (and reused)."""
    if cfg.train.data.dir:
        source = Path(cfg.train.data.dir).expanduser()
    else:
        source = out / "data" / "stdlib"
        meta = _read_json(source / META)
        if meta is None or meta.get("source", {}).get("max_docs") != cfg.compare.max_docs:
            prepare(source, corpus="stdlib", val_fraction=0.05, max_docs=cfg.compare.max_docs, progress=progress)
    TokenData(source, "train")  # a clear error for a missing or unprepared directory
    info = {"source": str(source), "vocab": cfg.compare.vocab or None}
    if not cfg.compare.vocab:
        return source, info
    target = out / "data" / f"{source.name}-v{cfg.compare.vocab}"
    key = {"compact_of": str(source.resolve()), "vocab": cfg.compare.vocab, "meta": _read_json(source / META)}
    meta = _read_json(target / META)
    if meta is None or meta.get("compact") != key:
        compact_vocabulary(source, target, cfg.compare.vocab, key)
        meta = _read_json(target / META)
    return target, info | meta["coverage"]


def compact_vocabulary(source: Path, target: Path, size: int, key: dict) -> None:
    """Copy a prepared directory with token ids remapped: the ``size - 1`` most frequent training tokens
    become 0 .. size - 2 (by frequency), every other token becomes ``size - 1``."""
    counts = np.zeros(65536, dtype=np.int64)
    train = TokenData(source, "train")
    for start in range(0, len(train), 1 << 24):
        counts += np.bincount(train.read(start, min(1 << 24, len(train) - start)), minlength=65536)
    kept = np.argsort(-counts, kind="stable")[: size - 1]  # ties: lower id first
    table = np.full(65536, size - 1, dtype=DTYPE)
    table[kept] = np.arange(size - 1, dtype=DTYPE)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    splits, coverage = {}, {}
    for split in ("train", "val"):
        data = TokenData(source, split)
        tokens = table[data.read(0, len(data))]
        tokens.tofile(tmp / f"{split}_000000.bin")
        splits[split] = {"tokens": len(tokens), "shards": [{"file": f"{split}_000000.bin", "tokens": len(tokens)}]}
        coverage[f"{split}_tokens"] = len(tokens)
        coverage[f"{split}_rare_fraction"] = float(np.mean(tokens == size - 1))
    meta = {"format": "gpt2lab-tokens", "version": 1, "vocab_size": size, "splits": splits}
    meta |= {"compact": key, "coverage": coverage, "kept_gpt2_ids": kept.tolist()}
    (tmp / META).write_text(json.dumps(meta) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


# --- measuring -------------------------------------------------------------------------------------


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
    from gpt2lab.train import METRICS

    records = [json.loads(line) for line in (out_dir / METRICS).read_text().splitlines() if line]
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
def context_losses(
    model: GPT, tokens: np.ndarray, context: int, factors: Sequence[int], n_stretches: int, batch_tokens: int, amp
) -> dict[str, float | str]:
    """Mean val loss at each context multiple, on the same tokens for every multiple: ``n_stretches``
    evenly spaced stretches of (largest multiple x context) tokens, cut into windows of the length tested."""
    span = max(factors) * context
    if len(tokens) < span + 1:
        raise GPT2LabError(
            f"the val split has {len(tokens)} tokens, too few for one {span}-token stretch; "
            "use more data, a smaller context or smaller compare.extrapolation multiples"
        )
    starts = np.linspace(0, len(tokens) - span - 1, n_stretches).round().astype(np.int64)
    rows = torch.from_numpy(np.stack([tokens[s : s + span + 1] for s in starts]).astype(np.int64))
    device, limit = model.wte.weight.device, model.config.max_positions
    out: dict[str, float | str] = {}
    for f in factors:
        length = f * context
        if limit is not None and length > limit:
            out[f"{f}x"] = f"n/a: learned positions end at block_size ({limit})"
            continue
        x, y = rows[:, :-1].reshape(-1, length), rows[:, 1:].reshape(-1, length)
        per_batch = max(1, batch_tokens // length)
        total = 0.0
        for i in range(0, len(x), per_batch):
            with amp:
                _, loss = model(x[i : i + per_batch].to(device), y[i : i + per_batch].to(device))
            total += loss.item() * len(x[i : i + per_batch])
        out[f"{f}x"] = total / len(x)
    return out


@torch.no_grad()
def decode_benchmark(
    config: GPTConfig, context: int, new_tokens: int, train_context: int, device: torch.device, dtype
) -> dict:
    """KV-cache bytes (summed over the K/V buffers that ``setup_cache`` allocates) at the training
    context and at ``context``, and greedy decode speed at ``context`` tokens, with random weights.
    Learned-position variants get a position table as long as ``context`` for this, since speed and
    memory do not depend on what it holds."""
    from gpt2lab.generation import stream

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


def _cached(path: Path, key: dict, compute: Callable[[], dict]) -> dict:
    """``compute()``, or what it returned before with the same ``key`` (stored in ``path``)."""
    stored = _read_json(path) or {}
    key = json.loads(json.dumps(key))  # as it reads back from JSON
    if stored.get("key") == key:
        return stored["value"]
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "value": value}, indent=1) + "\n")
    return value


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --- the comparison --------------------------------------------------------------------------------


def compare(cfg: CompareConfig, out: str | Path, command: str, progress: bool = True) -> dict:
    """Run the whole comparison into ``out`` and return the results (also written to results.json)."""
    from gpt2lab.distributed import resolve_device

    device = resolve_device(cfg.train.run.device)
    previous = torch.get_num_threads()
    if device.type == "cpu" and cfg.compare.threads:
        torch.set_num_threads(cfg.compare.threads)
    try:
        return _compare(cfg, Path(out).expanduser(), command, progress, device)
    finally:
        torch.set_num_threads(previous)


def _compare(cfg: CompareConfig, out: Path, command: str, progress: bool, device: torch.device) -> dict:
    from gpt2lab.checkpoint import load_model
    from gpt2lab.train import train

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    spec, base = cfg.compare, cfg.train
    bf16 = base.run.dtype == "bfloat16" or (
        base.run.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    data_dir, data_info = ensure_data(cfg, out, progress)
    model_section = base.model
    if spec.vocab:
        model_section = dataclasses.replace(model_section, vocab_size=spec.vocab, padded_vocab_size=None)
    if model_section.init != "scratch":
        raise ConfigError(
            f"compare trains every variant from scratch; model.init={model_section.init!r} cannot be changed "
            "into other architectures. Remove model.init (compare fine-tuned models with gpt2lab eval)"
        )
    baseline = model_section.build()
    plans = {name: variant_overrides(name, spec, baseline.n_head, baseline.n_layer) for name in spec.variants}
    context = base.data.block_size
    seeds = [base.run.seed + i for i in range(spec.seeds)]
    task = RecallTask(spec.recall_keys, spec.recall_keys, spec.recall_pairs)
    bins = distance_bins(spec.window, context)
    recall_optim = dataclasses.replace(
        base.optim,
        lr=spec.recall_lr,
        min_lr=spec.recall_lr * base.optim.min_lr / base.optim.lr,
        warmup_steps=round(base.optim.warmup_steps * spec.recall_steps / base.run.steps),
    )
    val_tokens = TokenData(data_dir, "val").read(0, len(TokenData(data_dir, "val")))

    _warm_up(baseline, base, device)
    variants: dict[str, dict] = {}
    jobs = len(spec.variants) * (len(seeds) + spec.recall_seeds + 1)  # LM runs, recall runs, decode
    bar = tqdm(total=jobs, desc="compare", unit="job", disable=not progress)
    try:
        for name in spec.variants:
            overrides = plans[name]
            section = dataclasses.replace(model_section, **overrides)
            config = section.build()
            with torch.device("meta"):
                meta_model = GPT(config)
            entry: dict = {
                "changes": variant_changes(name),
                "overrides": overrides,
                "model_config": config.to_dict(),
                "params": meta_model.num_params(),
                "non_embedding_params": meta_model.num_params(exclude_positions=True) - meta_model.wte.weight.numel(),
                "runs": [],
            }
            del meta_model
            for seed in seeds:
                run_dir = out / "runs" / _slug(name) / f"seed{seed}"
                run_cfg = TrainConfig(
                    model=section,
                    data=dataclasses.replace(base.data, dir=str(data_dir)),
                    optim=base.optim,
                    run=dataclasses.replace(base.run, out_dir=str(run_dir), seed=seed, progress=progress),
                )
                bar.set_description(f"{name} seed {seed}: train")
                key = {"train_config": run_cfg.to_dict(), "data": data_info}
                measured = _cached(
                    run_dir / CACHE, key, lambda rc=run_cfg, rd=run_dir: _train_run(rc, rd, device, train)
                )
                run = {"seed": seed, "out_dir": str(run_dir), **measured, **run_summary(run_dir)}
                model = load_model(run_dir, device=device).eval()
                run["context_loss"] = context_losses(
                    model, val_tokens, context, spec.extrapolation, spec.extrapolation_sequences,
                    base.data.batch_size * context, amp,
                )  # fmt: skip
                entry["runs"].append(run)
                bar.update()
                if seed in seeds[: spec.recall_seeds]:
                    bar.set_description(f"{name} seed {seed}: recall")
                    rkey = {"lm": key, "task": dataclasses.asdict(task), "bins": bins, "seed": seed,
                            "optim": dataclasses.asdict(recall_optim),
                            "spec": [spec.recall_steps, spec.recall_batch_size, spec.recall_sequences]}  # fmt: skip
                    run["recall"] = _cached(
                        run_dir / "recall.json",
                        rkey,
                        lambda m=model, s=seed: _recall_run(m, task, context, bins, spec, recall_optim, s, device, amp, progress),
                    )  # fmt: skip
                    bar.update()
                del model
            bar.set_description(f"{name}: decode")
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            entry["decode"] = decode_benchmark(config, spec.decode_context, spec.decode_tokens, context, device, dtype)
            bar.update()
            entry["summary"] = _summarize(entry["runs"], spec.extrapolation)
            variants[name] = entry
    finally:
        bar.close()

    results = {
        "command": command,
        "config": {**cfg.train.to_dict(), "compare": dataclasses.asdict(spec)},
        "data": {"dir": str(data_dir), **data_info},
        "environment": _environment(device),
        "seeds": seeds,
        "context": context,
        "recall_bins": bins,
        "recall_reference": _recall_reference(variants),
        "recall_task": dataclasses.asdict(task),
        "variants": variants,
        "runtime_s": time.perf_counter() - started,
    }
    (out / RESULTS).write_text(json.dumps(results, indent=1) + "\n")
    write_plots(results, out)
    (out / REPORT).write_text(render_report(results))
    return results


def _recall_reference(variants: dict) -> list[float | None] | None:
    """The key-ignoring reference accuracy per distance bin (the same evaluation sequences for every model)."""
    for v in variants.values():
        for r in v["runs"]:
            if "recall" in r:
                return r["recall"]["reference"]
    return None


def _warm_up(config: GPTConfig, cfg: TrainConfig, device: torch.device) -> None:
    """One throwaway training step, so that one-time costs (thread pools, kernel scratch buffers, lazy
    initialisation) are not charged to the memory and speed of whichever variant runs first."""
    from gpt2lab.train import configure_optimizer

    model = GPT(config).to(device)
    optimizer = configure_optimizer(model, cfg.optim)
    x = torch.randint(0, config.vocab_size, (cfg.data.batch_size, cfg.data.block_size), device=device)
    _, loss = model(x, x)
    loss.backward()
    optimizer.step()


def _train_run(cfg: TrainConfig, run_dir: Path, device: torch.device, train: Callable) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)  # left by other settings or an interrupted run: start clean
    started = time.perf_counter()
    with PeakMemory(device) as peak:
        train(cfg)
    return {"peak_memory_bytes": peak.bytes, "wall_s": time.perf_counter() - started}


def _recall_run(lm, task, context, bins, spec, optim, seed, device, amp, progress) -> dict:
    model = recall_model(lm, task, context)
    model, curve = train_recall(
        model, task, context, spec.recall_steps, spec.recall_batch_size, optim, seed, device, amp, progress
    )
    return recall_accuracy(model, task, context, bins, spec.recall_sequences, amp) | {"loss_curve": curve}


def _summarize(runs: list[dict], factors: Sequence[int]) -> dict:
    """Mean and spread over seeds of each per-run measurement."""
    recall = [r for r in runs if "recall" in r]
    summary = {
        "final_val_loss": _stats([r["final_val_loss"] for r in runs]),
        "tokens_per_s": _stats([r["tokens_per_s"] for r in runs]),
        "peak_memory_bytes": _stats([r["peak_memory_bytes"] for r in runs]),
        "context_loss": {},
        "recall_accuracy": [_stats(list(acc)) for acc in zip(*(r["recall"]["accuracy"] for r in recall), strict=True)],
    }
    for f in factors:
        values = [r["context_loss"][f"{f}x"] for r in runs]
        summary["context_loss"][f"{f}x"] = values[0] if isinstance(values[0], str) else _stats(values)
    return summary


def _stats(values: list) -> dict | None:
    if any(v is None for v in values):
        return None
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def _environment(device: torch.device) -> dict:
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


def _slug(name: str) -> str:
    return name.replace("+", "-")


# --- plots -----------------------------------------------------------------------------------------


def write_plots(results: dict, out: Path, dpi: int = 90) -> None:
    """loss_curves.png, memory_speed.png, extrapolation.png and recall.png (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = results["variants"]
    names = list(variants)
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(names)}

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, v in variants.items():
        steps = [s for s, _ in v["runs"][0]["val_curve"]]
        losses = np.array([[loss for _, loss in r["val_curve"]] for r in v["runs"]])  # (seeds, evals)
        ax.plot(steps, losses.mean(0), label=name, color=colors[name])
        ax.fill_between(steps, losses.min(0), losses.max(0), color=colors[name], alpha=0.15)
    ax.set(
        xlabel="step",
        ylabel="val loss",
        title=f"Validation loss (mean, band = min-max of {len(results['seeds'])} seeds)",
    )
    ax.legend(fontsize=8)
    _save(fig, out / "loss_curves.png", dpi)

    fig, axes = plt.subplots(1, 4, figsize=(13, 3.4))
    bars = [
        ("train tokens/s", [variants[n]["summary"]["tokens_per_s"] for n in names], 1.0),
        ("peak train memory (MiB)", [variants[n]["summary"]["peak_memory_bytes"] for n in names], MIB),
        (f"KV cache at {_ctx(results)} tokens (MiB)", [variants[n]["decode"]["cache_bytes"] for n in names], MIB),
        (f"decode tokens/s at {_ctx(results)}", [variants[n]["decode"]["tokens_per_s"] for n in names], 1.0),
    ]
    for ax, (title, values, scale) in zip(axes, bars, strict=True):
        heights = [_mean(v) / scale if _mean(v) is not None else 0.0 for v in values]
        errors = [v["std"] / scale if isinstance(v, dict) else 0.0 for v in values]
        ax.bar(range(len(names)), heights, yerr=errors, color=[colors[n] for n in names])
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
    _save(fig, out / "memory_speed.png", dpi)

    fig, ax = plt.subplots(figsize=(6.4, 4))
    factors = results["config"]["compare"]["extrapolation"]
    missing = []
    for name, v in variants.items():
        points = [(f, v["summary"]["context_loss"][f"{f}x"]) for f in factors]
        runnable = [(f, s["mean"]) for f, s in points if isinstance(s, dict)]
        if len(runnable) < len(points):
            missing.append(name)
        ax.plot(*zip(*runnable, strict=True), marker="o", label=name, color=colors[name])
    ax.set_xticks(factors, [f"{f}x\n({f * results['context']})" for f in factors])
    ax.set(xlabel="evaluation context (multiple of the training context)", ylabel="val loss")
    ax.set_title("Context extrapolation" + (f"\n(stop at 1x: {', '.join(missing)})" if missing else ""), fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, out / "extrapolation.png", dpi)

    fig, ax = plt.subplots(figsize=(6.4, 4))
    bins = results["recall_bins"]
    middles = [(lo + hi - 1) / 2 for lo, hi in bins]
    for name, v in variants.items():
        acc = [_mean(a) for a in v["summary"]["recall_accuracy"]]
        points = [(m, a) for m, a in zip(middles, acc, strict=True) if a is not None]
        ax.plot(*zip(*points, strict=True), marker="o", label=name, color=colors[name])
    reference = results["recall_reference"]
    points = [(m, r) for m, r in zip(middles, reference, strict=True) if r is not None]
    ax.plot(*zip(*points, strict=True), color="black", linestyle=":", linewidth=1, label="key ignored (reference)")
    window = results["config"]["compare"]["window"]
    n_layer = next(iter(variants.values()))["model_config"]["n_layer"]
    for x, label in ((window, f" window {window}"), (n_layer * (window - 1), f" {n_layer} x (window - 1)")):
        ax.axvline(x, color="gray", linestyle="--", linewidth=1)
        ax.text(x, 1.02, label, fontsize=8, color="gray")
    ax.set(xlabel="distance from the planted pair to the query (tokens, bin middles)", ylabel="recall accuracy")
    ax.set_ylim(0, 1.08)
    n = results["config"]["compare"]["recall_seeds"]
    ax.set_title(f"Long-range recall (mean of {n} seed{'s' * (n > 1)})", fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, out / "recall.png", dpi)


def _save(fig, path: Path, dpi: int) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    import matplotlib.pyplot as plt

    plt.close(fig)


def _mean(value) -> float | None:
    return value["mean"] if isinstance(value, dict) else value


def _ctx(results: dict) -> int:
    return results["config"]["compare"]["decode_context"]


# --- report ----------------------------------------------------------------------------------------


def fmt_stats(stats: dict | None, digits: int = 4, scale: float = 1.0) -> str:
    """``mean ± std`` of a measurement over seeds (``n/a`` when it could not be measured)."""
    if stats is None:
        return "n/a"
    return f"{stats['mean'] / scale:.{digits}f} ± {stats['std'] / scale:.{digits}f}"


def fmt_value(value, digits: int = 4, scale: float = 1.0) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    return f"{value / scale:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_report(results: dict) -> str:
    """report.md: every number in it is read from ``results``."""
    cfg, variants = results["config"], results["variants"]
    spec, run, data = cfg["compare"], cfg["run"], cfg["data"]
    T, seeds = results["context"], results["seeds"]
    command = f"`{results['command']}`"
    tokens = variants[next(iter(variants))]["runs"][0]["tokens"]
    source = results["data"]
    env = results["environment"]
    parts = [
        "# Architectural variants compared",
        "",
        f"Produced by {command} in {results['runtime_s'] / 60:.1f} min on {env['device']} "
        f"(torch threads: {env['torch_threads']}, torch {env['torch']}). Every number below is read from "
        f"`{RESULTS}` beside this file, which holds the per-run values behind each mean; each run's "
        "`metrics.jsonl` (the training log the curves and speeds come from) is in `runs/<variant>/seed<seed>/`.",
        "",
        "## Setup",
        "",
        "- Variants: " + "; ".join(f"**{n}** = {_describe(v)}" for n, v in variants.items()) + ".",
        f"- Model: {_arch(variants[next(iter(variants))]['model_config'])}.",
        f"- Training (identical for every variant): {run['steps']} steps of {data['batch_size']} x {T} tokens "
        f"({tokens:,} tokens per run), AdamW lr {cfg['optim']['lr']} -> {cfg['optim']['min_lr']} (cosine, "
        f"{cfg['optim']['warmup_steps']} warmup steps), weight decay {cfg['optim']['weight_decay']}, seeds "
        f"{', '.join(map(str, seeds))} (the seed sets the initial weights and the order of the batches).",
        f"- Data: `{source['source']}`"
        + (
            f", compacted to a {spec['vocab']}-token vocabulary (the {spec['vocab'] - 1} most frequent training "
            f"tokens; the rest, {100 * source['val_rare_fraction']:.1f}% of val tokens, share one id); "
            f"{source['train_tokens']:,} train and {source['val_tokens']:,} val tokens"
            if spec["vocab"]
            else " (full GPT-2 vocabulary)"
        )
        + ".",
        "",
        "Configuration (defaults plus the command's options; `gpt2lab compare --help` explains each key):",
        "",
        "```toml",
        _toml(cfg),
        "```",
        "",
        "## Quality and training cost",
        "",
        _table(
            ["variant", "parameters", "non-embedding", "final val loss", "train tokens/s", "peak train memory (MiB)"],
            [
                [
                    name,
                    f"{v['params']:,}",
                    f"{v['non_embedding_params']:,}",
                    fmt_stats(v["summary"]["final_val_loss"]),
                    fmt_stats(v["summary"]["tokens_per_s"], 0),
                    fmt_stats(v["summary"]["peak_memory_bytes"], 1, MIB),
                ]
                for name, v in variants.items()
            ],
        ),
        "",
        f"{command}; mean ± standard deviation over {len(seeds)} seeds. Val loss: the last evaluation of each "
        f"run (`val_loss` in its metrics.jsonl: {run['eval_batches']} x {data['batch_size']} fixed val sequences of "
        f"{T} tokens). Tokens/s: median over the logged intervals of a run after the first (evaluation time "
        "excluded). Peak memory: "
        + (
            "the CUDA allocator's peak during training above what was allocated before it."
            if "cpu" not in env["device"]
            else "rise of the process's peak resident set (VmHWM, reset before each run) during the whole "
            "training call: weights, gradients, AdamW state, activations, batches and allocator slack."
        )
        + f" Non-embedding parameters exclude the token and position tables. Load average at the end: "
        f"{_load(env)}: on a shared machine speeds carry that noise.",
        "",
        "![validation loss](loss_curves.png)",
        "",
        "## Inference memory and speed",
        "",
        _table(
            [
                "variant",
                f"KV bytes/token at {T}",
                f"KV cache at {spec['decode_context']} (MiB)",
                f"decode tokens/s at {spec['decode_context']}",
            ],
            [
                [
                    name,
                    fmt_value(v["decode"]["kv_bytes_per_token"], 0),
                    fmt_value(v["decode"]["cache_bytes"], 2, MIB),
                    fmt_value(v["decode"]["tokens_per_s"], 1),
                ]
                for name, v in variants.items()
            ],
        ),
        "",
        f"{command}; cache buffers as `setup_cache` allocates them for one sequence ({variants[next(iter(variants))]['decode']['dtype']}), "
        f"summed over layers (a window layer keeps only its {spec['window']} newest positions). Decode: greedy "
        f"generation through `gpt2lab.stream` with random weights, prompt of "
        f"{spec['decode_context'] - spec['decode_tokens']} tokens, the {spec['decode_tokens']} decode steps up to "
        f"{spec['decode_context']} tokens timed (prefill excluded); learned-position variants get a position table "
        "that long for this measurement only.",
        "",
        "![memory and speed](memory_speed.png)",
        "",
        "## Context extrapolation",
        "",
        _table(
            ["variant"] + [f"{f}x ({f * T} tokens)" for f in spec["extrapolation"]],
            [
                [name] + [_fmt_context(v["summary"]["context_loss"][f"{f}x"]) for f in spec["extrapolation"]]
                for name, v in variants.items()
            ],
        ),
        "",
        f"{command}; mean val loss over all positions of windows of each length, cut from the same "
        f"{spec['extrapolation_sequences']} val stretches of {max(spec['extrapolation']) * T} tokens, so every column "
        "scores the same tokens; only the context each token gets differs. Trained at "
        f"{T} tokens. Mean ± std over seeds.",
        "",
        "![extrapolation](extrapolation.png)",
        "",
        "## Long-range recall",
        "",
        _table(
            ["variant"] + [f"d {lo}-{hi - 1}" for lo, hi in results["recall_bins"]],
            [[name] + [_fmt_acc(a) for a in v["summary"]["recall_accuracy"]] for name, v in variants.items()]
            + [["key ignored (reference)"] + [fmt_value(r, 2) for r in results["recall_reference"] or []]],
        ),
        "",
        f"{command}; {_recall_text(results)}",
        "",
        "![recall](recall.png)",
        "",
        "## Every run",
        "",
        _table(
            [
                "variant",
                "seed",
                "final val loss",
                "train tokens/s",
                "peak train memory (MiB)",
                "train wall s",
                "mean recall",
            ],
            [
                [
                    name,
                    str(r["seed"]),
                    fmt_value(r["final_val_loss"]),
                    fmt_value(r["tokens_per_s"], 0),
                    fmt_value(r["peak_memory_bytes"], 1, MIB),
                    fmt_value(r["wall_s"], 1),
                    fmt_value(_recall_mean(r["recall"]), 3) if "recall" in r else "not run",
                ]
                for name, v in variants.items()
                for r in v["runs"]
            ],
        ),
        "",
        f"{command}; one row per training run (its directory: `runs/<variant>/seed<seed>`).",
        "",
    ]
    return "\n".join(parts)


def _describe(variant: dict) -> str:
    if not variant["changes"]:
        return "GPT-2 (learned positions, multi-head, full attention)"
    return ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in variant["overrides"].items())


def _arch(c: dict) -> str:
    return (
        f"{c['n_layer']} layers, {c['n_head']} heads of {c['n_embd'] // c['n_head']}, width {c['n_embd']}, "
        f"{c['block_size']} positions, vocabulary {c['vocab_size']}"
    )


def _fmt_context(value) -> str:
    return value if isinstance(value, str) else fmt_stats(value)


def _fmt_acc(stats: dict | None) -> str:
    if stats is None:
        return "n/a"
    return f"{stats['mean']:.2f} ({stats['min']:.2f}-{stats['max']:.2f})"


def _recall_mean(recall: dict) -> float:
    """A run's recall accuracy over all its answered queries (bins weighted by their query counts)."""
    pairs = [(a, n) for a, n in zip(recall["accuracy"], recall["queries"], strict=True) if n]
    return sum(a * n for a, n in pairs) / sum(n for _, n in pairs)


def _load(env: dict) -> str:
    load = env.get("load_average")
    return ", ".join(f"{x:.1f}" for x in load) + f" on {env['cpu_count']} cores" if load else "unknown"


def _recall_text(results: dict) -> str:
    spec, task, T = results["config"]["compare"], results["recall_task"], results["context"]
    n_layer = next(iter(results["variants"].values()))["model_config"]["n_layer"]
    seeds = ", ".join(map(str, results["seeds"][: spec["recall_seeds"]]))
    W = spec["window"]
    return (
        "exact-match accuracy (argmax over the whole vocabulary) of the queries whose key's pair lies d tokens "
        f"back, mean (min-max) over the recall runs (seed {seeds}), on the same {spec['recall_sequences']} evaluation "
        "sequences for every model. Task (`gpt2lab.recall`): sequences of "
        f'{T} tokens in which {task["n_pairs"]} pair tokens "key k holds value v" ({task["n_keys"]} keys, '
        f"{task['n_values']} values) are planted at random positions and every other position asks for the value of "
        "a key planted before it. The reference row is the accuracy of ignoring the key and naming one of the "
        "planted values at random; above it, the model looks the key up. Each variant's trained language model "
        f"(same seed) is trained further on the task, {spec['recall_steps']} steps of {spec['recall_batch_size']} "
        f"sequences (AdamW as above, peak lr {spec['recall_lr']}; the token table keeps the LM's first rows). Why a "
        "dedicated run: it measures what each attention pattern can reach, not how a mixing ratio trades against "
        "language modelling, and the LM runs are far too short to pick the skill up on the side. Why start from "
        "the LM: from random weights the task sat on a plateau for 300-600 steps at this size when this was built "
        "(the attention must first learn to look anywhere in particular), which a 2-core CPU cannot pay for "
        f"every variant; the LM-trained attention starts learning it within ~150 steps. A window of {W} reaches "
        f"d < {W} in one attention step; through {n_layer} stacked window layers information can travel at most "
        f"{n_layer} x {W - 1} = {n_layer * (W - 1)} tokens."
    )


def _toml(cfg: dict) -> str:
    lines = []
    for section, values in cfg.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is None:
                continue
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines).rstrip()
