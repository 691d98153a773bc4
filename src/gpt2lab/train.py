"""train(cfg): one loop for a single process, DDP and FSDP; and sliding-window perplexity of a text.

A step is ``grad_accum`` micro-steps of ``batch_size`` sequences on each rank; only the last one
all-reduces gradients. Then the global gradient norm is clipped, AdamW steps with the scheduled
learning rate, and, every ``log_every`` steps, the mean loss over all ranks goes to metrics.jsonl.
Batches are a pure function of (seed, step), so a run stopped anywhere resumes exactly from its newest
checkpoint by running the same command again.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from gpt2lab import checkpoint, distributed
from gpt2lab.config import GPTConfig, OptimSection, TrainConfig
from gpt2lab.data import Batches, TokenData, iter_windows, val_batches
from gpt2lab.distributed import DistEnv, all_reduce_sum, full_tensor, grad_sync
from gpt2lab.errors import ConfigError, GPT2LabError
from gpt2lab.model import GPT

METRICS = "metrics.jsonl"
# Dense bf16 tensor-core peak TFLOP/s per GPU (vendor datasheets, no sparsity), matched in this order
# against torch.cuda.get_device_name(); anything else needs run.peak_tflops for an MFU figure.
BF16_PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


class TrainingDiverged(GPT2LabError):
    """The loss or the gradient norm became NaN or infinite."""


@dataclass
class TrainResult:
    step: int  # optimizer steps done
    loss: float | None  # training loss of the last logged step (None if no step ran in this call)
    val_loss: float | None  # last evaluation (None if none ran in this call)
    checkpoint: Path | None  # newest complete checkpoint


# --- optimizer, schedule, FLOPs ------------------------------------------------------------------


def configure_optimizer(model: nn.Module, optim: OptimSection) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings (dim >= 2) only: biases and LayerNorm gains
    are not decayed. The fused kernel (one pass over each tensor) on every device: on CPU it is about
    three times faster than the default per-tensor loop, and it handles FSDP2's DTensor parameters."""
    params = [p for p in model.parameters() if p.requires_grad]  # a tied parameter appears once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": optim.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=True)


def set_hyperparameters(optimizer: torch.optim.AdamW, optim: OptimSection) -> None:
    """Apply betas, eps and weight decay to the (decay, no-decay) groups of ``configure_optimizer``."""
    decay, no_decay = optimizer.param_groups
    for group in (decay, no_decay):
        group["betas"], group["eps"] = (optim.beta1, optim.beta2), optim.eps
    decay["weight_decay"], no_decay["weight_decay"] = optim.weight_decay, 0.0


def lr_at(step: int, optim: OptimSection, steps: int) -> float:
    """Learning rate of step ``step`` (0-based): linear warmup to ``lr``, then cosine decay to ``min_lr``
    at the last step."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    progress = (step - optim.warmup_steps) / max(1, steps - 1 - optim.warmup_steps)
    return optim.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (optim.lr - optim.min_lr)


def flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token, forward + backward: 6 per weight plus 12 * n_layer * seq_len * n_embd for
    the attention scores (PaLM, appendix B). The tied wte counts once, for the lm_head matmul; the
    position table is a lookup and is left out."""
    with torch.device("meta"):  # shapes only, no memory
        n = GPT(config).num_params(exclude_positions=True)
    return 6.0 * n + 12.0 * config.n_layer * seq_len * config.n_embd


def peak_flops(device: torch.device, bf16: bool, override_tflops: float | None) -> float | None:
    """Peak FLOP/s of one device for MFU: run.peak_tflops if set, else a known GPU in bf16, else None."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda" or not bf16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in BF16_PEAK_TFLOPS if key in name), None)


# --- the loop ------------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or resume) as configured; every rank of a torchrun job calls this."""
    env = distributed.init(cfg.run.strategy, cfg.run.device)
    try:
        return _train(cfg, env)
    finally:
        distributed.shutdown(env)


def _train(cfg: TrainConfig, env: DistEnv) -> TrainResult:
    run, device = cfg.run, env.device
    out_dir = Path(run.out_dir)
    accum = cfg.data.accum_steps(env.world_size)
    if run.eval_every and run.eval_batches % env.world_size:
        raise ConfigError(
            f"run.eval_batches ({run.eval_batches}) must be a multiple of the world size ({env.world_size}) so that "
            f"every rank runs the same number of forward passes; use {run.eval_batches // env.world_size * env.world_size or env.world_size}"
        )
    bf16 = run.dtype == "bfloat16" or (run.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    # data first: a wrong path should fail before any model is built
    if not cfg.data.dir:
        raise ConfigError("data.dir is not set; pass --data.dir=DIR (made by: gpt2lab prepare --input FILE --out DIR)")
    train_data = TokenData(cfg.data.dir, "train", cfg.data.block_size)
    batches = Batches(
        train_data, cfg.data.batch_size, cfg.data.block_size, accum, env.rank, env.world_size, seed=run.seed
    )
    val = []
    if run.eval_every:
        val_data = TokenData(cfg.data.dir, "val", cfg.data.block_size)
        val = val_batches(
            val_data, cfg.data.batch_size, cfg.data.block_size, run.eval_batches, env.rank, env.world_size
        )

    resume = checkpoint.latest(out_dir)
    model = build_model(cfg, resume)
    config = model.config
    model.to(device)
    torch.manual_seed(run.seed + env.rank)  # dropout streams differ per rank
    if run.compile:
        for block in model.h:
            block.compile()
    wrapped = distributed.wrap(model, env)
    optimizer = configure_optimizer(wrapped, cfg.optim)

    start, changed = 0, []
    if resume is not None:
        saved = checkpoint.load(resume, wrapped, optimizer, env)
        start, changed = saved["step"], _changed_settings(saved["train_config"], cfg.to_dict())
        set_hyperparameters(optimizer, cfg.optim)  # loading restored the checkpoint's; the config wins
    if env.is_main:
        _start_out_dir(out_dir, cfg, start)
    meta = {"model_config": config.to_dict(), "train_config": cfg.to_dict()}
    say = _Say(env)
    say(
        f"{'resumed from ' + str(resume) + ' at step ' + str(start) if resume else 'training from step 0'}: "
        f"{model.num_params():,} parameters, strategy {env.strategy} x {env.world_size}, device {device}, "
        f"{'bf16 autocast' if bf16 else 'fp32'}, {accum} micro-step(s) of {cfg.data.batch_size} x {cfg.data.block_size}"
        + (f"; settings changed since the checkpoint: {', '.join(changed)}" if changed else "")
    )
    if start >= run.steps:
        say(f"nothing to do: {out_dir} is already trained to step {start} (raise run.steps to continue)")
        return TrainResult(start, None, None, resume)

    tokens_per_step = cfg.data.batch_size * cfg.data.block_size * accum * env.world_size
    flops_step = flops_per_token(config, cfg.data.block_size) * tokens_per_step
    peak = peak_flops(device, bf16, run.peak_tflops)
    writer = _tensorboard(out_dir) if run.tensorboard and env.is_main else None
    bar = tqdm(
        total=run.steps, initial=start, unit="step", disable=not (env.is_main and run.progress), dynamic_ncols=True
    )
    bad = torch.zeros((), device=device)  # non-finite losses / gradient norms since the last check
    last_ckpt, loss_value, val_loss = resume, None, None
    wrapped.train()
    try:
        with _GracefulStop(force_on_repeat=not env.distributed) as stop:
            t_last, tokens_since = time.perf_counter(), 0
            for step in range(start, run.steps):
                lr = lr_at(step, cfg.optim, run.steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum, norm = train_step(wrapped, optimizer, batches, step, amp, cfg.optim.grad_clip, device)
                bad += (~torch.isfinite(loss_sum)).float() + (~torch.isfinite(norm)).float()
                done, tokens_since = step + 1, tokens_since + tokens_per_step
                bar.update(1)

                is_eval = bool(run.eval_every) and (done % run.eval_every == 0 or done == run.steps)
                is_ckpt = done == run.steps or (run.ckpt_every > 0 and done % run.ckpt_every == 0)
                if not (done % run.log_every == 0 or is_eval or is_ckpt or (stop.requested and not env.distributed)):
                    continue
                # one synchronisation: mean loss over ranks, and whether any rank diverged or was interrupted
                stats = torch.stack([loss_sum / accum, bad, norm, torch.tensor(float(stop.requested), device=device)])
                loss_value, n_bad, grad_norm, n_stop = all_reduce_sum(stats, env).tolist()
                loss_value /= env.world_size
                grad_norm /= env.world_size
                if n_bad:
                    raise TrainingDiverged(_diverged_message(done, lr, last_ckpt))
                elapsed = time.perf_counter() - t_last
                record = {
                    "step": done,
                    "loss": loss_value,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": done * tokens_per_step,
                    "tokens_per_s": tokens_since / elapsed,
                }
                if peak:
                    record["mfu"] = flops_step * (tokens_since / tokens_per_step) / elapsed / (peak * env.world_size)
                if is_eval:
                    val_loss = evaluate(wrapped, val, env, amp)
                    record |= {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
                    say(f"step {done}: val loss {val_loss:.4f}, perplexity {record['val_ppl']:.2f}")
                if env.is_main:
                    _append_metrics(out_dir, record, writer)
                    postfix = {"loss": f"{loss_value:.4f}", "tok/s": f"{record['tokens_per_s']:,.0f}"}
                    if "mfu" in record:
                        postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
                    bar.set_postfix(postfix, refresh=False)
                if is_ckpt or n_stop:
                    last_ckpt = checkpoint.save(out_dir, done, wrapped, optimizer, env, meta, run.keep_last)
                if n_stop:
                    say(f"stopped at step {done}; saved {last_ckpt}. Run the same command again to resume.")
                    raise KeyboardInterrupt
                t_last, tokens_since = time.perf_counter(), 0
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    say(
        f"done: step {run.steps}, loss {loss_value:.4f}"
        + (f", val loss {val_loss:.4f}" if val_loss is not None else "")
    )
    return TrainResult(run.steps, loss_value, val_loss, last_ckpt)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Batches,
    step: int,
    amp,
    grad_clip: float,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over ``batches.grad_accum`` micro-steps; returns (sum of the micro-step losses,
    gradient norm before clipping; 0 without clipping), both float32 on ``device``, not synchronised."""
    accum = batches.grad_accum
    loss_sum = torch.zeros((), device=device)
    for micro in range(accum):
        x, y = batches.get(step, micro)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with grad_sync(model, micro == accum - 1):  # only the last micro-step all-reduces gradients
            with amp:
                _, loss = model(x, y)
            (loss / accum).backward()
        loss_sum += loss.detach().float()
    norm = torch.zeros((), device=device)
    if grad_clip > 0:
        norm = full_tensor(nn.utils.clip_grad_norm_(model.parameters(), grad_clip)).float()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, norm


def build_model(cfg: TrainConfig, resume: Path | None) -> GPT:
    """The model to train, on the CPU: seeded random weights (scratch) or the fine-tuned model's, with
    the vocabulary padded. When resuming, the weights are placeholders that the checkpoint replaces."""
    if cfg.model.init == "scratch":
        config = cfg.model.build()
        if resume is not None:
            checkpoint.check_model_config(resume, config)
        torch.manual_seed(cfg.run.seed)  # every rank draws the same weights
        return GPT(config)
    from gpt2lab.hf import load_pretrained

    base = load_pretrained(cfg.model.init)
    config = cfg.model.build(base.config)
    if resume is not None:
        checkpoint.check_model_config(resume, config)
    limit = config.max_positions
    if limit is not None and cfg.data.block_size > limit:
        raise ConfigError(
            f"data.block_size ({cfg.data.block_size}) exceeds the block_size ({limit}) of {cfg.model.init}; lower it"
        )
    state_dict = base.state_dict()
    wte = state_dict["wte.weight"][: config.vocab_size]
    padding = wte.new_zeros(config.padded_vocab_size - config.vocab_size, wte.shape[1])  # never predicted
    state_dict["wte.weight"] = state_dict["lm_head.weight"] = torch.cat([wte, padding])
    return GPT.from_state_dict(config, state_dict)


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], env: DistEnv, amp) -> float:
    """Mean loss over the val batches of all ranks (each rank holds its share)."""
    model.eval()
    total = torch.zeros((), device=env.device)
    for x, y in batches:
        with amp:
            _, loss = model(x.to(env.device), y.to(env.device))
        total += loss.float()
    model.train()
    return all_reduce_sum(total, env).item() / (len(batches) * env.world_size)


# --- perplexity of a text ------------------------------------------------------------------------


@torch.no_grad()
def perplexity(
    model: GPT,
    tokens: np.ndarray | torch.Tensor | Iterable[int],
    block_size: int,
    stride: int,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[float, int]:
    """(mean loss per token, tokens scored) over one long text: windows of ``block_size`` every
    ``stride`` tokens, each token scored once with up to ``block_size - stride`` tokens of extra context."""
    model.eval()
    device = model.wte.weight.device
    tokens = np.asarray(tokens)
    n_windows = math.ceil(max(len(tokens) - 1, 0) / stride)
    nll, count = 0.0, 0
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def flush() -> None:
        nonlocal nll, count
        x, y = torch.cat([p[0] for p in pending]).to(device), torch.cat([p[1] for p in pending]).to(device)
        _, loss = model(x, y)
        n = int((y != -100).sum())
        nll, count = nll + float(loss) * n, count + n
        pending.clear()

    for x, y in tqdm(iter_windows(tokens, block_size, stride), total=n_windows, disable=not progress, unit="window"):
        if pending and x.shape[1] != pending[0][0].shape[1]:  # only the last window is shorter
            flush()
        pending.append((x, y))
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    return nll / count, count


# --- helpers -------------------------------------------------------------------------------------


class _GracefulStop:
    """Ctrl-C or SIGTERM ask the loop to stop at the next step boundary (and checkpoint there).

    A second Ctrl-C in a single process stops at once (checkpoints are atomic, so nothing is corrupted).
    Under torchrun the launcher forwards the signal itself and kills the workers after its grace
    period, so repeats are ignored there.
    """

    def __init__(self, force_on_repeat: bool) -> None:
        self.force_on_repeat = force_on_repeat
        self.requested = False
        self.previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and self.force_on_repeat:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _GracefulStop:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class _Say:
    """Messages from rank 0, printed above the progress bar."""

    def __init__(self, env: DistEnv) -> None:
        self.enabled = env.is_main

    def __call__(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message, file=sys.stderr)


def _diverged_message(step: int, lr: float, last: Path | None) -> str:
    fix = "lower optim.lr (or raise optim.warmup_steps, or lower optim.grad_clip)"
    then = (
        f"The last good checkpoint, {last}, is kept: {fix} and run the same command to resume from it"
        if last is not None
        else f"No checkpoint had been saved yet: {fix} and start again"
    )
    return f"the loss or gradient norm became NaN/inf by step {step} (learning rate {lr:.3g}); stopped without saving. {then}"


def _changed_settings(before: dict, after: dict) -> list[str]:
    """``section.key old -> new`` for every setting that differs between two TrainConfig dicts."""
    return [
        f"{section}.{key} {before.get(section, {}).get(key)!r} -> {value!r}"
        for section, values in after.items()
        for key, value in values.items()
        if before.get(section, {}).get(key) != value
    ]


def _start_out_dir(out_dir: Path, cfg: TrainConfig, start: int) -> None:
    """Write train_config.json, and drop metrics of steps after ``start`` (logged by a run that was killed
    before its next checkpoint, and about to be redone)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _replace_text(out_dir / checkpoint.TRAIN_CONFIG_JSON, json.dumps(cfg.to_dict(), indent=2) + "\n")
    metrics = out_dir / METRICS
    if metrics.is_file():
        kept = [line for line in metrics.read_text().splitlines() if line and json.loads(line)["step"] <= start]
        _replace_text(metrics, "".join(line + "\n" for line in kept))


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _append_metrics(out_dir: Path, record: dict, writer) -> None:
    with open(out_dir / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")
    if writer is not None:
        for key, value in record.items():
            if key != "step":
                writer.add_scalar(key, value, record["step"])
        writer.flush()


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("run.tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(out_dir / "tb")
