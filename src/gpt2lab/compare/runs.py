"""Running a comparison: prepare the data, print the plan, run every job on the worker pool (cached per run
directory, so an interrupted comparison resumes), then analyse, plot and report.

Every training run goes through ``gpt2lab.train.train``, the loop of ``gpt2lab train``, and leaves its
``metrics.jsonl`` in ``OUT/runs/<job>/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gpt2lab import files, kernels
from gpt2lab.compare import analysis, plan
from gpt2lab.compare.efficiency import efficiency_job
from gpt2lab.compare.extrapolation import extrapolation_job
from gpt2lab.compare.lm import lm_job, pi_finetune_job, uptrain_job
from gpt2lab.compare.mqar import mqar_batch, mqar_job, reach
from gpt2lab.compare.plots import write_plots
from gpt2lab.compare.pool import RUNS, cached, job_keys, machine, makespan, run_jobs
from gpt2lab.compare.report import REPORT, RESULTS, render_report
from gpt2lab.compare.settings import CompareConfig
from gpt2lab.data import META, Source, TokenData, compact_vocabulary, prepare, write_token_dir
from gpt2lab.errors import ConfigError
from gpt2lab.model import GPT
from gpt2lab.train import BF16_PEAK_TFLOPS

# OUT/.gitignore: what a commit of the results leaves out (data, and the weights later jobs read)
GITIGNORE = "# written by gpt2lab compare: commit the results, not the data or the weights\ndata/\nruns/**/ckpt-*/\n"
JOBS = {
    "lm": lm_job,
    "mqar": mqar_job,
    "pi_finetune": pi_finetune_job,
    "uptrain": uptrain_job,
    "extrapolation": extrapolation_job,
    "efficiency": efficiency_job,
}
DRY_RUN_TOKENS = 160  # the dry run's step of each shape: more than two windows, cheap on a CPU
KV_LONGEST = 32768  # the KV-cache table's contexts: the training context doubled up to this


def execute(kind: str, params: dict, run_dir: Path, root: Path) -> dict:
    """Run one job (what the worker processes call)."""
    return JOBS[kind](params, run_dir, root)


def compare(cfg: CompareConfig, out: str | Path, command: str, progress: bool = True, dry_run: bool = False) -> dict:
    """Run the whole comparison into ``out`` and return the results (also written to results.json); with
    ``dry_run``, build and check every model of the plan and print the plan instead."""
    out = Path(out).expanduser()
    gpu = _targets_gpu(cfg)
    if dry_run:
        return _dry_run(cfg, out, gpu)
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    files.write_text(out / ".gitignore", GITIGNORE)
    data = ensure_data(cfg, out, progress)
    p = plan.build_plan(cfg, data, data["vocab_size"])
    workers = _workers(cfg, gpu)
    estimate = _estimate(cfg, p, out, workers, gpu)
    threads = None if gpu else 1
    job_results = run_jobs(p.jobs, out, execute, workers, threads, progress)
    results = _results(cfg, p, job_results, data, command, estimate, time.perf_counter() - started, gpu)
    files.write_text(out / RESULTS, json.dumps(results, indent=1) + "\n")
    write_plots(results, out)
    files.write_text(out / REPORT, render_report(results))
    return results


def _targets_gpu(cfg: CompareConfig) -> bool:
    device = cfg.train.run.device
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def _workers(cfg: CompareConfig, gpu: bool) -> int:
    return cfg.compare.workers or (4 if gpu else os.cpu_count() or 1)


def _estimate(cfg: CompareConfig, p: plan.Plan, out: Path, workers: int, gpu: bool) -> dict:
    """Job costs, the printed plan, and what it says (kept in results.json beside what the run took)."""
    keys = job_keys(p.jobs)
    todo = [job for job in p.jobs if cached(out / RUNS / job.name, keys[job.name]) is None]
    shapes = plan.shapes(cfg, p)
    if gpu:
        peak = (cfg.train.run.peak_tflops or dict(BF16_PEAK_TFLOPS)["H100"]) * 1e12
        costs, how = (
            plan.flop_costs(shapes, peak * cfg.compare.gpu_mfu),
            f"GPU seconds from FLOPs at {cfg.compare.gpu_mfu:.0%} MFU",
        )
    else:
        costs, how = plan.calibrate(shapes), "CPU seconds per step calibrated here, one thread per worker"
    plan.estimate(cfg, p, costs)
    rows = plan.pieces(p.jobs)
    wall = makespan(todo, 1 if gpu else workers)  # on a GPU the FLOP estimate is for the device as a whole
    text = plan.describe(rows, len(p.jobs) - len(todo), workers, wall, how)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cores = os.cpu_count() or 1
    if not gpu and load > cores:
        text += (
            f"\nwarning: load average {load:.1f} on {cores} cores: wall times will be about {load / cores:.1f}x "
            "longer than estimated; the results are unaffected"
        )
    print(text, file=sys.stderr, flush=True)
    return {
        "pieces": rows,
        "workers": workers,
        "estimated_wall_s": wall,
        "estimated_all_s": makespan(p.jobs, 1 if gpu else workers),
        "reused": len(p.jobs) - len(todo),
        "how": how,
        "load_average": load,
    }


def _dry_run(cfg: CompareConfig, out: Path, gpu: bool) -> dict:
    """Every model of the plan built and run forward and backward once on the CPU (batch 1, one thread, at
    most DRY_RUN_TOKENS tokens), one MQAR batch generated, and the plan with its estimate printed, counting
    the jobs ``out`` already holds where its data is prepared; nothing is trained or written."""
    vocab = cfg.compare.vocab or 50257
    placeholder = {"dir": "data", "overfit_dir": "data-overfit", "id": "dry-run", "vocab_size": vocab}
    data = ensure_data(cfg, out, progress=False, write=False) or placeholder
    p = plan.build_plan(cfg, data, data["vocab_size"])
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for shape in plan.shapes(cfg, p).values():
            model = GPT(shape.config)
            x = torch.randint(0, shape.config.vocab_size, (1, min(shape.seq_len, DRY_RUN_TOKENS)))
            model(x, x)[1].backward()
    finally:
        torch.set_num_threads(previous)
    mqar_batch(p.task, 2, np.random.default_rng(0), cfg.mqar.distances)
    estimate = _estimate(cfg, p, out, _workers(cfg, gpu), gpu)
    return {"plan": estimate, "jobs": len(p.jobs)}


def ensure_data(cfg: CompareConfig, out: Path, progress: bool, write: bool = True) -> dict | None:
    """The token directories the runs train on (prepared under ``out/data`` and reused): the corpus (the
    offline stdlib one without data.dir), its compact-vocabulary copy, and the overfitting slice. With
    ``write`` False nothing is prepared: None where something would have to be."""
    if cfg.train.data.dir:
        source = Path(cfg.train.data.dir).expanduser().resolve()
    else:
        source = out / "data" / "stdlib"
        meta = _read_json(source / META)
        max_docs = cfg.compare.max_docs or None
        if meta is None or meta.get("source", {}).get("max_docs") != max_docs:
            if not write:
                return None
            prepare(source, Source(corpus="stdlib", max_docs=max_docs), val_fraction=0.05, progress=progress)
    TokenData(source, "train")  # a clear error for a missing or unprepared directory
    target = source
    if cfg.compare.vocab:
        target = out / "data" / f"{source.name}-v{cfg.compare.vocab}"
        key = {"compact_of": _digest(source), "vocab": cfg.compare.vocab}
        if (_read_json(target / META) or {}).get("compact") != key:
            if not write:
                return None
            compact_vocabulary(source, target, cfg.compare.vocab, key)
    meta = _read_json(target / META)
    small = _overfit_slice(target, meta, cfg.overfitting.tokens, out, write)
    if small is None:
        return None
    rel = lambda p: str(p.relative_to(out)) if p.is_relative_to(out) else str(p)  # noqa: E731
    return {
        "dir": rel(target),
        "overfit_dir": rel(small),
        "id": _digest(target),
        "vocab_size": meta["vocab_size"],
        "source": str(source),
        "coverage": meta.get("coverage"),
        "python": sys.version.split()[0],
        "train_tokens": meta["splits"]["train"]["tokens"],
        "val_tokens": meta["splits"]["val"]["tokens"],
    }


def _overfit_slice(source: Path, meta: dict, tokens: int, out: Path, write: bool) -> Path | None:
    """A copy of ``source`` whose training split is its first ``tokens`` tokens (the val split whole); None
    where it would have to be written and ``write`` is False."""
    target = out / "data" / f"{source.name}-first{tokens}"
    key = {"slice_of": _digest(source), "tokens": tokens}
    if (_read_json(target / META) or {}).get("slice") != key:
        if not write:
            return None
        train, val = TokenData(source, "train"), TokenData(source, "val")
        if len(train) < tokens + 2:
            raise ConfigError(f"overfitting.tokens ({tokens}) exceeds the {len(train)} training tokens; lower it")
        splits = {"train": train.read(0, tokens), "val": val.read(0, len(val))}
        write_token_dir(target, splits, meta["vocab_size"], vocabulary=meta.get("vocabulary"), slice=key)
    return target


def _digest(data_dir: Path) -> str:
    """A digest of a prepared directory's tokens (its shards' checksums)."""
    splits = json.loads((data_dir / META).read_text())["splits"]
    shards = [s.get("sha256") for split in sorted(splits) for s in splits[split]["shards"]]
    return hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _results(
    cfg: CompareConfig, p: plan.Plan, jobs: dict, data: dict, command: str, estimate: dict, seconds: float, gpu: bool
) -> dict:
    """results.json: settings, environment, plan against what it took, and every experiment's analysis."""
    seeds = p.seeds
    results: dict = {
        "schema": analysis.SCHEMA,
        "command": command,
        "profile": cfg.profile,
        "config": cfg.to_dict(),
        "data": {k: v for k, v in data.items() if k != "overfit_dir"},
        "environment": _environment(gpu) | {"jobs_ran_on": _machines(p.jobs, jobs)},
        "seeds": seeds,
        "runtime_s": seconds,
        "plan": estimate | {"measured": _measured(p.jobs, jobs)},
        "models": analysis.model_table({v: p.lm[v] for v in cfg.compare.variants}),
    }
    results["lm"] = analysis.lm_section(
        jobs, cfg.compare.variants, seeds, cfg.compare.calibration, cfg.compare.calibration_factor
    )
    if cfg.overfitting.variants:
        kv = {v: p.lm[v].n_kv_head for v in cfg.overfitting.variants}
        results["overfitting"] = analysis.overfitting_section(jobs, cfg.overfitting.variants, seeds, kv)
    u = cfg.uptraining
    if u.kv_heads:
        results["uptraining"] = analysis.uptraining_section(jobs, seeds, u.kv_heads, u.methods, u.scratch)
    if p.mqar:
        models = {
            name: {
                "config": c.to_dict(),
                "reach": reach(c, p.task.seq_len),
                "steps": cfg.mqar.one_layer_steps if name.startswith("L1/") else cfg.mqar.two_layer_steps,
            }
            for name, c in p.mqar.items()
        }
        results["mqar"] = analysis.mqar_section(jobs, models, seeds, p.edges, 1 / p.task.n_values)
        results["mqar"]["task"] = p.task.__dict__ | {"vocab_size": p.task.vocab_size, "distances": cfg.mqar.distances}
    if cfg.extrapolation.variants:
        results["extrapolation"] = analysis.extrapolation_section(
            jobs, cfg.extrapolation.variants, seeds, cfg.train.data.block_size
        )
    configs = {name: p.lm[name] for name in [cfg.efficiency.reference, *cfg.efficiency.variants]}
    T = cfg.train.data.block_size
    contexts = [T * 2**i for i in range(max(1, (KV_LONGEST // T).bit_length()))]
    results["efficiency"] = analysis.efficiency_section(jobs["efficiency"], configs, cfg.efficiency.reference, contexts)
    results["holm_family"] = analysis.mark_holm(results)
    return results


def _measured(planned: list, jobs: dict) -> dict[str, float]:
    """CPU (or device) seconds each piece took, summed over its jobs, as recorded when they ran."""
    out: dict[str, float] = {}
    for job in planned:
        out[job.piece] = out.get(job.piece, 0.0) + jobs[job.name]["cpu_s"]
    return out


def _machines(planned: list, jobs: dict) -> dict[str, int]:
    """How many jobs ran on each machine, as each job recorded it (reused jobs ran where they first did)."""
    out: dict[str, int] = {}
    for job in planned:
        where = jobs[job.name].get("machine", "not recorded")
        out[where] = out.get(where, 0) + 1
    return out


def _environment(gpu: bool) -> dict:
    """Where a comparison ran: device (and the machine, as its jobs record theirs), versions, cores, load."""
    device = torch.cuda.get_device_name() if gpu else f"CPU: {kernels.cpu_model()}"
    return {
        "device": device,
        "machine": machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
