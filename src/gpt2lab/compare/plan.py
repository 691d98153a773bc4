"""The comparison's plan: every job the settings ask for (with its dependencies) and its estimated cost.

Job parameters name other runs and the data by paths relative to the output directory, so the cache keys do
not depend on where it lies. Costs come from a calibration on this machine: a few training steps and a
forward pass of every distinct model shape, in CPU seconds (what an idle core delivers as wall time, whatever
the load), one thread; on a GPU they come from FLOPs (``flops_per_token``) at an assumed utilisation.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from gpt2lab.compare.mqar import MQARTask, distance_edges, reach
from gpt2lab.compare.pool import RUNS, Job, machine
from gpt2lab.compare.settings import CompareConfig, variant_overrides
from gpt2lab.config import GPTConfig
from gpt2lab.decode import decode_one_token, prefill
from gpt2lab.model import GPT
from gpt2lab.train import configure_optimizer, flops_per_token
from gpt2lab.train_config import ModelSection, OptimSection

CPU_BYTES_PER_S = 5e9  # what a decode step streams from the KV cache per second, one core (rough)
GPU_BYTES_PER_S = 3e12  # the same for an H100/H200 (HBM3)


@dataclass
class Shape:
    """A model as trained: its config, batch and sequence length (what one step costs depends on)."""

    config: GPTConfig
    batch: int
    seq_len: int


@dataclass
class Plan:
    """The jobs of a comparison, the model configs they train, and the MQAR task they share."""

    jobs: list[Job]
    lm: dict[str, GPTConfig]  # language-model variant (and uptraining shape 'rope kvK') -> config
    mqar: dict[str, GPTConfig]  # 'L1/<variant>', 'L2/<variant>' -> config
    task: MQARTask
    edges: list[int]  # MQAR distance bins
    seeds: list[int]


def run_dir(name: str) -> str:
    """A job's directory, relative to the output directory."""
    return f"{RUNS}/{name}"


def lm_config(cfg: CompareConfig, name: str, vocab_size: int) -> GPTConfig:
    """The GPTConfig of language-model variant ``name``."""
    model, spec = cfg.train.model, cfg.compare
    base = model.build()
    overrides = variant_overrides(name, base.n_head, base.n_layer, spec.window, spec.local_global, spec.gqa_kv_heads)
    return dataclasses.replace(model, vocab_size=vocab_size, padded_vocab_size=None, **overrides).build()


def mqar_config(cfg: CompareConfig, name: str, layers: int) -> GPTConfig:
    """The GPTConfig of an MQAR model: variant ``name`` with ``layers`` layers."""
    m = cfg.mqar
    pattern = m.two_layer_pattern if layers > 1 else "L"
    overrides = variant_overrides(name, m.heads, layers, m.window, pattern)
    vocab = mqar_task(cfg).vocab_size
    section = ModelSection(n_layer=layers, n_head=m.heads, n_embd=m.width, block_size=m.seq_len, vocab_size=vocab)
    return dataclasses.replace(section, **overrides).build()


def mqar_task(cfg: CompareConfig) -> MQARTask:
    m = cfg.mqar
    return MQARTask(m.seq_len, m.keys, m.values, m.groups)


def build_plan(cfg: CompareConfig, data: dict, vocab_size: int) -> Plan:
    """Every job of the comparison; ``data`` holds the data directories (``dir``, ``overfit_dir``, relative
    to the output directory or absolute) and ``id``, a digest of their tokens."""
    spec = cfg.compare
    seeds = [cfg.train.run.seed + i for i in range(spec.seeds)]
    lm = {name: lm_config(cfg, name, vocab_size) for name in dict.fromkeys([*spec.variants, *cfg.overfitting.variants])}
    for name in cfg.efficiency.variants + [cfg.efficiency.reference]:
        lm.setdefault(name, lm_config(cfg, name, vocab_size))
    if "rope" in lm:
        lm |= {f"rope kv{k}": dataclasses.replace(lm["rope"], n_kv_head=k) for k in cfg.uptraining.kv_heads}
    mqar = {f"L1/{n}": mqar_config(cfg, n, 1) for n in cfg.mqar.one_layer}
    mqar |= {f"L2/{n}": mqar_config(cfg, n, 2) for n in cfg.mqar.two_layers}
    task = mqar_task(cfg)
    reaches = sorted({reach(c, task.seq_len) for c in mqar.values()} - {task.seq_len})
    edges = distance_edges(cfg.mqar.window, reaches, task.seq_len)
    jobs = _lm_jobs(cfg, data, lm, seeds) + _mqar_jobs(cfg, mqar, task, edges, seeds)
    jobs += _evaluation_jobs(cfg, data, seeds)
    jobs.append(_efficiency_job(cfg, lm, tuple(j.name for j in jobs if j.kind != "extrapolation")))
    return Plan(jobs, lm, mqar, task, edges, seeds)


def _lm_params(cfg: CompareConfig, data_dir: str, data_id: str, config: GPTConfig, seed: int, **run) -> dict:
    train = cfg.train.to_dict()
    train["run"] |= run
    return {
        "train": train,
        "init": {"config": config.to_dict(), "seed": seed},
        "data": data_dir,
        "data_id": data_id,
        "val_tokens": cfg.compare.val_tokens,
    }


def _tokens_per_step(cfg: CompareConfig) -> int:
    """Tokens a language-model training step reads (uptraining's too)."""
    return cfg.train.data.batch_size * cfg.train.data.block_size


def _lm_jobs(cfg: CompareConfig, data: dict, lm: dict, seeds: list[int]) -> list[Job]:
    """The language-model grid, the calibration runs, the overfitting runs and uptraining's from-scratch
    references (the converted shape trained for the uptrained model's total steps)."""
    spec, S = cfg.compare, cfg.train.run.steps
    tokens = _tokens_per_step(cfg)
    d, i = data["dir"], data["id"]

    def job(name: str, shape: str, seed: int, piece: str, steps: int, **extra) -> Job:
        params = _lm_params(cfg, extra.pop("dir", d), i, lm[shape], seed, steps=steps, **extra)
        return Job(name, "lm", params, piece, shape, steps=steps, tokens=steps * tokens)

    jobs = [job(f"lm/{v}/seed{s}", v, s, "language models", S) for v in spec.variants for s in seeds]
    f = spec.calibration_factor
    every = cfg.train.run.eval_every * f
    jobs += [
        job(
            f"calibration/{v}/seed{seeds[0]}",
            v,
            seeds[0],
            f"calibration ({f}x steps, first seed)",
            S * f,
            eval_every=every,
        )
        for v in spec.calibration
    ]
    o = cfg.overfitting
    for v in o.variants:
        for s in seeds:
            jobs.append(
                job(
                    f"overfit/{v}/seed{s}",
                    v,
                    s,
                    "overfitting",
                    o.steps,
                    eval_every=o.eval_every,
                    dir=data["overfit_dir"],
                )
            )
            jobs[-1].params["train_tokens"] = o.tokens
    u = cfg.uptraining
    if u.scratch and u.fractions:
        long = round((1 + max(u.fractions)) * S)
        jobs += [
            job(f"uptrain/scratch-kv{k}/seed{s}", f"rope kv{k}", s, "uptraining", long)
            for k in u.kv_heads
            for s in seeds
        ]
    return jobs


def _mqar_jobs(cfg: CompareConfig, configs: dict, task: MQARTask, edges: list[int], seeds: list[int]) -> list[Job]:
    m = cfg.mqar
    jobs = []
    for name, config in configs.items():
        steps = m.one_layer_steps if name.startswith("L1/") else m.two_layer_steps
        params = {
            "task": dataclasses.asdict(task),
            "config": config.to_dict(),
            "steps": steps,
            "batch_size": m.batch_size,
            "lr": m.lr,
            "distances": m.distances,
            "eval_every": m.eval_every,
            "eval_sequences": m.eval_sequences,
            "edges": edges,
            "reach": reach(config, task.seq_len),
            "train": cfg.train.to_dict(),
        }
        tokens = steps * m.batch_size * task.seq_len
        jobs += [
            Job(f"mqar/{name}/seed{s}", "mqar", params | {"seed": s}, "MQAR", name, steps=steps, tokens=tokens)
            for s in seeds
        ]
    return jobs


def _evaluation_jobs(cfg: CompareConfig, data: dict, seeds: list[int]) -> list[Job]:
    """PI fine-tuning, extrapolation and uptraining: jobs that read finished language-model runs."""
    e, S = cfg.extrapolation, cfg.train.run.steps
    base = {"train": cfg.train.to_dict(), "data": data["dir"], "data_id": data["id"]}
    pi_steps = max(1, round(e.pi_finetune_fraction * S))
    B, T, f = cfg.train.data.batch_size, cfg.train.data.block_size, e.pi_finetune_factor
    pi_tokens = pi_steps * max(1, B // f) * f * T if f else 0  # f times the context, tokens per step kept
    jobs = []
    for s in seeds:
        rope = f"lm/rope/seed{s}"
        pi = f"pi-finetune/rope/seed{s}" if e.pi_finetune_factor and "rope" in e.variants else None
        if pi:
            params = base | {
                "source": run_dir(rope),
                "factor": e.pi_finetune_factor,
                "steps": pi_steps,
                "lr": e.lr,
                "seed": s,
            }
            jobs.append(
                Job(pi, "pi_finetune", params, "extrapolation", "rope", deps=(rope,), steps=pi_steps, tokens=pi_tokens)
            )
        for v in e.variants:
            tuned = pi if v == "rope" else None
            params = {
                "model": run_dir(f"lm/{v}/seed{s}"),
                "pi_model": tuned and run_dir(tuned),
                "factor": e.factor,
                "context": cfg.train.data.block_size,
                "stretches": e.stretches,
                "pi_factors": e.pi_factors,
                "data": data["dir"],
                "data_id": data["id"],
                "device": cfg.train.run.device,
            }
            deps = (f"lm/{v}/seed{s}",) + ((tuned,) if tuned else ())
            jobs.append(Job(f"extrapolation/{v}/seed{s}", "extrapolation", params, "extrapolation", v, deps=deps))
        jobs += _uptraining_jobs(cfg, base, s)
    return jobs


def _uptraining_jobs(cfg: CompareConfig, base: dict, seed: int) -> list[Job]:
    """The seed's rope run converted to each of ``uptraining.kv_heads`` by each method, then uptrained."""
    u, S = cfg.uptraining, cfg.train.run.steps
    rope = f"lm/rope/seed{seed}"
    steps = sum(max(1, round(f * S)) for f in u.fractions)
    jobs = []
    for k in u.kv_heads:
        for method in u.methods:
            params = base | {
                "source": run_dir(rope),
                "kv": k,
                "method": method,
                "fractions": u.fractions,
                "lr": u.lr,
                "seed": seed,
                "val_tokens": cfg.compare.val_tokens,
            }
            name = f"uptrain/kv{k}-{method}/seed{seed}"
            jobs.append(
                Job(
                    name,
                    "uptrain",
                    params,
                    "uptraining",
                    "rope",
                    deps=(rope,),
                    steps=steps,
                    tokens=steps * _tokens_per_step(cfg),
                )
            )
    return jobs


def _efficiency_job(cfg: CompareConfig, lm: dict, after: tuple[str, ...]) -> Job:
    """The timing job: it waits for every training job, then runs beside the remaining evaluations."""
    f = cfg.efficiency
    configs = {name: lm[name].to_dict() for name in [f.reference, *f.variants]}
    # timings hold on the machine that took them: another machine times again (training results carry over)
    params = dataclasses.asdict(f) | {"configs": configs, "device": cfg.train.run.device, "machine": machine()}
    return Job("efficiency", "efficiency", params, "efficiency (timed in alternation)", f.reference, after=after)


# --- costs ---------------------------------------------------------------------------------------


def shapes(cfg: CompareConfig, plan: Plan) -> dict[str, Shape]:
    """Every distinct trained shape, by the names the jobs use for them."""
    out = {name: Shape(c, cfg.train.data.batch_size, cfg.train.data.block_size) for name, c in plan.lm.items()}
    return out | {name: Shape(c, cfg.mqar.batch_size, plan.task.seq_len) for name, c in plan.mqar.items()}


def calibrate(shapes: dict[str, Shape], steps: int = 4) -> dict[str, dict[str, float]]:
    """CPU seconds of a training step and of a forward pass per token of every shape, and of one batch-1
    decode step (2 warm-up steps, one thread)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    measured: dict[str, dict[str, float]] = {}
    try:
        for shape in shapes.values():
            key = repr((shape.config, shape.batch, shape.seq_len))
            if key not in measured:
                measured[key] = _time_shape(shape, steps)
    finally:
        torch.set_num_threads(previous)
    out = {}
    for name, s in shapes.items():
        c = measured[repr((s.config, s.batch, s.seq_len))]
        flops = flops_per_token(s.config, s.seq_len) * s.batch * s.seq_len / c["step_s"]
        out[name] = c | {"bytes_per_s": CPU_BYTES_PER_S, "flops_per_s": flops}
    return out


def _time_shape(shape: Shape, steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = GPT(shape.config)
    optimizer = configure_optimizer(model, OptimSection())
    x = torch.randint(0, shape.config.vocab_size, (shape.batch, shape.seq_len))

    def step() -> None:
        _, loss = model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    began = time.process_time()
    for _ in range(steps):
        step()
    out = {"step_s": (time.process_time() - began) / steps}
    model.eval()
    with torch.no_grad():
        began = time.process_time()
        model(x, x)
        out["forward_s_per_token"] = (time.process_time() - began) / x.numel()
        model.setup_cache(1, 16)
        token = prefill(model, x[:1, :8], torch.arange(8)).argmax(-1, keepdim=True)
        began = time.process_time()
        for t in range(8, 16):
            token = decode_one_token(model, token, torch.tensor([t])).argmax(-1, keepdim=True)
        out["decode_step_s"] = (time.process_time() - began) / 8
    return out


def flop_costs(shapes: dict[str, Shape], flops_per_s: float) -> dict[str, dict[str, float]]:
    """The same costs from FLOPs at ``flops_per_s`` (a GPU's peak times the assumed utilisation); a decode
    step is taken as launch-bound, 1 ms, plus its cache read."""
    out = {}
    for name, s in shapes.items():
        per_token = flops_per_token(s.config, s.seq_len)
        out[name] = {
            "step_s": per_token * s.batch * s.seq_len / flops_per_s,
            "forward_s_per_token": per_token / 3 / flops_per_s,
            "decode_step_s": 1e-3,
            "bytes_per_s": GPU_BYTES_PER_S,
            "flops_per_s": flops_per_s,
        }
    return out


def estimate(cfg: CompareConfig, plan: Plan, costs: dict[str, dict[str, float]]) -> None:
    """Fill in every job's estimated seconds from the per-shape ``costs``."""
    T, B = cfg.train.data.block_size, cfg.train.data.batch_size
    curve = cfg.train.run.eval_batches * B * T  # tokens of one evaluation during training
    for job in plan.jobs:
        c, p = costs[job.shape], job.params
        step, forward = c["step_s"], c["forward_s_per_token"]
        if job.kind == "lm":
            evals = p["train"]["run"]["steps"] // max(1, p["train"]["run"]["eval_every"])
            scored = p["val_tokens"] + evals * curve + p.get("train_tokens", 0)
            job.cost = job.steps * step + scored * forward
        elif job.kind == "mqar":
            scored = (job.steps // p["eval_every"] * 128 + 2 * p["eval_sequences"]) * plan.task.seq_len
            job.cost = job.steps * step + scored * forward
        elif job.kind in ("pi_finetune", "uptrain"):  # a longer context costs more attention per token
            factor = 1.5 if job.kind == "pi_finetune" else 1.0
            job.cost = job.steps * step * factor + (1 + len(p.get("fractions", []))) * cfg.compare.val_tokens * forward
        elif job.kind == "extrapolation":
            passes = 2 + len(p["pi_factors"]) + bool(p["pi_model"])
            job.cost = passes * p["stretches"] * p["factor"] * T * forward * (1 + p["factor"] / 8)
        else:
            job.cost = _efficiency_cost(cfg, plan, c)


def _efficiency_cost(cfg: CompareConfig, plan: Plan, c: dict[str, float]) -> float:
    """Decode steps (a batch-1 step plus reading the cache), prefills, and kernel calls (by FLOPs)."""
    f, ref = cfg.efficiency, plan.lm[cfg.efficiency.reference]
    kv, n = ref.kv_cache_bytes_per_token(4), len(f.variants)
    settings = [(b, ctx) for b in f.batches for ctx in f.contexts]
    steps = sum(
        f.rounds * n * 2 * f.new_tokens * (c["decode_step_s"] + b * ctx * kv / c["bytes_per_s"]) for b, ctx in settings
    )
    prefill = sum((n + 1) * b * ctx * c["forward_s_per_token"] for b, ctx in settings)
    prefill += sum((n + 1) * b * 2 * ref.n_layer * ctx * ctx * ref.n_embd / c["flops_per_s"] for b, ctx in settings)
    attention = sum(
        4 * T * T * ref.n_embd * 2 * len(f.kernel_ratios) * (f.kernel_rounds + 1) for T in f.kernel_contexts
    )
    return steps + prefill + attention / c["flops_per_s"]


def pieces(jobs: list[Job]) -> list[dict]:
    """The plan's rows: per piece, its jobs, steps and tokens per job, and estimated seconds."""
    rows: dict[str, dict] = {}
    for job in jobs:
        row = rows.setdefault(
            job.piece, {"piece": job.piece, "jobs": 0, "steps": set(), "tokens": set(), "cost_s": 0.0}
        )
        row["jobs"] += 1
        row["steps"].add(job.steps)
        row["tokens"].add(job.tokens)
        row["cost_s"] += job.cost
    return [r | {"steps": sorted(r["steps"]), "tokens": sorted(r["tokens"])} for r in rows.values()]


def describe(rows: list[dict], done: int, workers: int, wall_s: float, how: str) -> str:
    """The printout before a comparison starts."""
    total = sum(r["jobs"] for r in rows)
    lines = [
        f"plan: {total} jobs ({done} already done) on {workers} worker process(es); {how}",
        f"  {'piece':<42}{'jobs':>6}{'steps per job':>22}{'tokens per job':>26}{'est. s':>10}",
    ]
    for r in rows:
        steps = "/".join(f"{s:,}" for s in r["steps"]) if any(r["steps"]) else "-"
        tokens = "/".join(f"{t:,}" for t in r["tokens"]) if any(r["tokens"]) else "-"
        lines.append(f"  {r['piece']:<42}{r['jobs']:>6}{steps:>22}{tokens:>26}{r['cost_s']:>10,.0f}")
    lines.append(f"  {'total':<96}{sum(r['cost_s'] for r in rows):>10,.0f}")
    lines.append(f"estimated time: {wall_s / 60:.1f} min (the jobs not yet done, longest first over {workers} workers)")
    return "\n".join(lines)
