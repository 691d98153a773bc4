"""Running a comparison: the data, then per variant and seed a language-model run, its context losses
and (for the first ``compare.recall_seeds`` seeds) a recall run, then the variant's decode measurement.

Every training run goes through ``gpt2lab.train.train``, the loop of ``gpt2lab train``. Finished runs
are kept under ``OUT/runs`` and reused when the command is run again with the same settings, so an
interrupted comparison resumes at the run it was in.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gpt2lab import checkpoint, files
from gpt2lab.compare.measure import PeakMemory, decode_benchmark, environment, run_summary, stats
from gpt2lab.compare.plots import write_plots
from gpt2lab.compare.recall import RecallBatches, RecallTask, distance_bins, recall_accuracy
from gpt2lab.compare.report import REPORT, RESULTS, render_report
from gpt2lab.compare.settings import CompareConfig, variant_changes, variant_overrides
from gpt2lab.config import GPTConfig
from gpt2lab.data import META, Source, TokenData, compact_vocabulary, prepare
from gpt2lab.device import autocast, resolve_device
from gpt2lab.errors import ConfigError
from gpt2lab.eval import context_losses
from gpt2lab.model import GPT
from gpt2lab.train import TrainData, configure_optimizer, train
from gpt2lab.train_config import DataSection, ModelSection, TrainConfig

CACHE = "compare_cache.json"  # in each run directory: settings and measurements of finished work


def compare(cfg: CompareConfig, out: str | Path, command: str, progress: bool = True) -> dict:
    """Run the whole comparison into ``out`` and return the results (also written to results.json)."""
    device = resolve_device(cfg.train.run.device)
    with _threads(device, cfg.compare.threads):
        started = time.perf_counter()
        plan = _plan(cfg, Path(out).expanduser(), device, progress)
        _warm_up(plan.baseline, cfg.train, device)
        variants: dict[str, dict] = {}
        spec = cfg.compare
        jobs = len(spec.variants) * (spec.seeds + spec.recall_seeds + 1)  # LM runs, recall runs, decode
        with tqdm(total=jobs, desc="compare", unit="job", disable=not progress) as bar:
            for name in spec.variants:
                variants[name] = _variant(plan, name, bar)
        results = _results(plan, variants, command, time.perf_counter() - started)
    files.write_text(plan.out / RESULTS, json.dumps(results, indent=1) + "\n")
    write_plots(results, plan.out)
    files.write_text(plan.out / REPORT, render_report(results))
    return results


@dataclass
class _Plan:
    """What every run of one comparison shares."""

    cfg: CompareConfig
    out: Path
    device: torch.device
    progress: bool
    data_dir: Path
    data_info: dict
    model: ModelSection  # the baseline's model section (vocabulary compacted where asked)
    baseline: GPTConfig
    seeds: list[int]
    task: RecallTask
    bins: list[tuple[int, int]]
    val_tokens: np.ndarray

    @property
    def context(self) -> int:
        return self.cfg.train.data.block_size


def _plan(cfg: CompareConfig, out: Path, device: torch.device, progress: bool) -> _Plan:
    out.mkdir(parents=True, exist_ok=True)
    spec, base = cfg.compare, cfg.train
    model = base.model
    if spec.vocab:
        model = dataclasses.replace(model, vocab_size=spec.vocab, padded_vocab_size=None)
    if model.init != "scratch":
        raise ConfigError(
            f"compare trains every variant from scratch; model.init={model.init!r} cannot be changed "
            "into other architectures. Remove model.init (compare fine-tuned models with gpt2lab eval)"
        )
    data_dir, data_info = ensure_data(cfg, out, progress)
    val = TokenData(data_dir, "val")
    return _Plan(
        cfg=cfg,
        out=out,
        device=device,
        progress=progress,
        data_dir=data_dir,
        data_info=data_info,
        model=model,
        baseline=model.build(),
        seeds=[base.run.seed + i for i in range(spec.seeds)],
        task=RecallTask(spec.recall_keys, spec.recall_keys, spec.recall_pairs),
        bins=distance_bins(spec.window, base.data.block_size),
        val_tokens=val.read(0, len(val)),
    )


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
            stdlib = Source(corpus="stdlib", max_docs=cfg.compare.max_docs)
            prepare(source, stdlib, val_fraction=0.05, progress=progress)
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


def _variant(plan: _Plan, name: str, bar: tqdm) -> dict:
    """Every run of one variant, its decode measurement and the summary over seeds."""
    spec = plan.cfg.compare
    overrides = variant_overrides(name, spec, plan.baseline.n_head, plan.baseline.n_layer)
    section = dataclasses.replace(plan.model, **overrides)
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
    for seed in plan.seeds:
        entry["runs"].append(_seed_run(plan, name, section, seed, bar))
    bar.set_description(f"{name}: decode")
    dtype = torch.bfloat16 if plan.device.type == "cuda" else torch.float32
    entry["decode"] = decode_benchmark(
        config, spec.decode_context, spec.decode_tokens, plan.context, plan.device, dtype
    )
    bar.update()
    entry["summary"] = _summarize(entry["runs"], spec.extrapolation)
    return entry


def _seed_run(plan: _Plan, name: str, section: ModelSection, seed: int, bar: tqdm) -> dict:
    """One language-model run (trained, or reused), scored at each context multiple; then its recall run."""
    spec, base = plan.cfg.compare, plan.cfg.train
    run_dir = plan.out / "runs" / name.replace("+", "-") / f"seed{seed}"
    run_cfg = TrainConfig(
        model=section,
        data=dataclasses.replace(base.data, dir=str(plan.data_dir)),
        optim=base.optim,
        run=dataclasses.replace(base.run, out_dir=str(run_dir), seed=seed, progress=plan.progress),
    )
    bar.set_description(f"{name} seed {seed}: train")
    key = {"train_config": run_cfg.to_dict(), "data": plan.data_info}
    measured = _cached(run_dir / CACHE, key, lambda: _train_run(run_cfg, run_dir, plan.device))
    run = {"seed": seed, "out_dir": str(run_dir), **measured, **run_summary(run_dir)}
    model = checkpoint.load_model(run_dir, device=plan.device).eval()
    amp = autocast(plan.device, base.run.dtype)
    batch_tokens = base.data.batch_size * plan.context
    run["context_loss"] = context_losses(
        model, plan.val_tokens, plan.context, spec.extrapolation, spec.extrapolation_sequences, batch_tokens, amp
    )
    bar.update()
    if seed in plan.seeds[: spec.recall_seeds]:
        bar.set_description(f"{name} seed {seed}: recall")
        rkey = {"lm": key, "task": dataclasses.asdict(plan.task), "bins": plan.bins, "seed": seed}
        rkey["spec"] = [spec.recall_steps, spec.recall_batch_size, spec.recall_sequences, spec.recall_lr]
        run["recall"] = _cached(run_dir / "recall.json", rkey, lambda: _recall_run(plan, run_dir, seed))
        bar.update()
    return run


def _train_run(cfg: TrainConfig, run_dir: Path, device: torch.device) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)  # left by other settings or an interrupted run: start clean
    started = time.perf_counter()
    with PeakMemory(device) as peak:
        train(cfg)
    return {"peak_memory_bytes": peak.bytes, "wall_s": time.perf_counter() - started}


def _recall_run(plan: _Plan, lm_dir: Path, seed: int) -> dict:
    """The language model of ``lm_dir`` trained further on the recall task (the same training loop, on
    generated batches), then its accuracy by distance."""
    spec, base = plan.cfg.compare, plan.cfg.train
    out_dir = lm_dir / "recall"
    shutil.rmtree(out_dir, ignore_errors=True)
    steps = spec.recall_steps
    optim = dataclasses.replace(
        base.optim,
        lr=spec.recall_lr,
        min_lr=spec.recall_lr * base.optim.min_lr / base.optim.lr,
        warmup_steps=round(base.optim.warmup_steps * steps / base.run.steps),
    )
    run = dataclasses.replace(
        base.run, steps=steps, out_dir=str(out_dir), seed=seed, eval_every=0, ckpt_every=0, keep_last=1,
        log_every=max(1, steps // 20), progress=False,
    )  # fmt: skip
    cfg = TrainConfig(
        ModelSection(init=str(lm_dir)),
        DataSection(batch_size=spec.recall_batch_size, block_size=plan.context),
        optim,
        run,
    )

    def task_data(env, accum: int) -> TrainData:
        batches = RecallBatches(plan.task, plan.context, spec.recall_batch_size, accum, env.rank, seed)
        return TrainData(batches, [], plan.task.vocab_size)

    train(cfg, task_data)
    model = checkpoint.load_model(out_dir, device=plan.device).eval()
    amp = autocast(plan.device, base.run.dtype)
    accuracy = recall_accuracy(model, plan.task, plan.context, plan.bins, spec.recall_sequences, amp)
    curve = [[r["step"], r["loss"]] for r in files.read_jsonl(out_dir / "metrics.jsonl")[0]]
    return accuracy | {"loss_curve": curve}


def _summarize(runs: list[dict], factors: list[int]) -> dict:
    """Mean and spread over seeds of each per-run measurement."""
    recall = [r for r in runs if "recall" in r]
    summary = {
        "final_val_loss": stats([r["final_val_loss"] for r in runs]),
        "tokens_per_s": stats([r["tokens_per_s"] for r in runs]),
        "peak_memory_bytes": stats([r["peak_memory_bytes"] for r in runs]),
        "context_loss": {},
        "recall_accuracy": [stats(list(acc)) for acc in zip(*(r["recall"]["accuracy"] for r in recall), strict=True)],
    }
    for f in factors:
        values = [r["context_loss"][f"{f}x"] for r in runs]
        summary["context_loss"][f"{f}x"] = values[0] if isinstance(values[0], str) else stats(values)
    return summary


def _results(plan: _Plan, variants: dict, command: str, seconds: float) -> dict:
    spec = plan.cfg.compare
    return {
        "command": command,
        "config": {**plan.cfg.train.to_dict(), "compare": dataclasses.asdict(spec)},
        "data": {"dir": str(plan.data_dir), **plan.data_info},
        "environment": environment(plan.device),
        "seeds": plan.seeds,
        "context": plan.context,
        "recall_bins": plan.bins,
        "recall_reference": _recall_reference(variants),
        "recall_task": dataclasses.asdict(plan.task),
        "variants": variants,
        "runtime_s": seconds,
    }


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
    model = GPT(config).to(device)
    optimizer = configure_optimizer(model, cfg.optim)
    x = torch.randint(0, config.vocab_size, (cfg.data.batch_size, cfg.data.block_size), device=device)
    _, loss = model(x, x)
    loss.backward()
    optimizer.step()


@contextmanager
def _threads(device: torch.device, threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _cached(path: Path, key: dict, compute: Callable[[], dict]) -> dict:
    """``compute()``, or what it returned before with the same ``key`` (stored in ``path``)."""
    stored = _read_json(path) or {}
    key = json.loads(json.dumps(key))  # as it reads back from JSON
    if stored.get("key") == key:
        return stored["value"]
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_text(path, json.dumps({"key": key, "value": value}, indent=1) + "\n")
    return value


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
