"""train(cfg): one loop for a single process, DDP and FSDP: ``setup``, then ``train_step`` in ``loop``.

A step is ``grad_accum`` micro-steps of ``batch_size`` sequences on each rank; only the last one
all-reduces gradients. Then the global gradient norm is clipped, AdamW steps with the scheduled
learning rate, and, every ``log_every`` steps, the mean loss over all ranks goes to metrics.jsonl.
Batches are a pure function of (seed, step), so a run stopped anywhere resumes exactly from its newest
checkpoint by running the same command again. The run directory is locked while a run uses it.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from tqdm import tqdm

from gpt2lab import checkpoint, distributed, files
from gpt2lab.config import GPTConfig
from gpt2lab.data import Batches, TokenData, val_batches
from gpt2lab.device import autocast, check_fits, physical_memory, uses_bf16_autocast
from gpt2lab.distributed import DistEnv, all_reduce_sum, any_rank, full_tensor, grad_sync, on_every_rank
from gpt2lab.errors import ConfigError, GPT2LabError
from gpt2lab.eval import bits_per_byte
from gpt2lab.load import load_model, tokenizer_of
from gpt2lab.model import GPT
from gpt2lab.tokenizer import VOCABULARY_JSON, check_same_vocabulary, load_tokenizer, vocabulary_of
from gpt2lab.train_config import OptimSection, TrainConfig

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
    val_bpb: float | None = None  # the last evaluation in bits per byte, where the data records its bytes


class BatchSource(Protocol):
    grad_accum: int

    def get(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class TrainData:
    """What a run trains and evaluates on: training batches, this rank's share of the fixed val batches,
    the vocabulary the ids lie below, and text bytes per token of each split (None: unknown)."""

    train: BatchSource
    val: list[tuple[torch.Tensor, torch.Tensor]]
    vocab_size: int
    bytes_per_token: dict[str, float | None] = field(default_factory=dict)
    vocabulary: dict | None = None  # a compact vocabulary (written to out_dir/vocabulary.json), or GPT-2's
    # more measurements at every evaluation (a task's accuracy, say): model in eval mode -> fields of the record
    evaluations: Callable[[nn.Module], dict[str, float]] | None = None


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
    at the last step (a run that ends within its warmup never decays)."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    span = steps - 1 - optim.warmup_steps  # the decay's steps after its first
    progress = (step - optim.warmup_steps) / span if span > 0 else 1.0
    return optim.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (optim.lr - optim.min_lr)


def flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token, forward + backward: 6 per weight plus 12 * n_layer * seq_len * n_embd for
    the attention scores (PaLM, appendix B). The tied wte counts once, for the lm_head matmul; the
    position table is a lookup and is left out."""
    n = config.num_params() - (config.block_size * config.n_embd if config.pos_emb == "learned" else 0)
    return 6.0 * n + 12.0 * config.n_layer * seq_len * config.n_embd


def peak_flops(device: torch.device, bf16: bool, override_tflops: float | None) -> float | None:
    """Peak FLOP/s of one device for MFU: run.peak_tflops if set, else a known GPU in bf16, else None."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda" or not bf16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in BF16_PEAK_TFLOPS if key in name), None)


# --- setup ---------------------------------------------------------------------------------------


def train(cfg: TrainConfig, data: TrainData | Callable[[DistEnv, int], TrainData] | None = None) -> TrainResult:
    """Train (or resume) as configured; every rank of a torchrun job calls this. ``data`` replaces the
    prepared directory of ``cfg.data.dir`` (a task generated in memory): the data itself, or a function
    of (this rank's DistEnv, micro-steps per step) that makes it."""
    env = distributed.init(cfg.run.strategy, cfg.run.device)
    try:
        with ExitStack() as stack:
            if env.is_main:  # one run per directory: a second one is refused, naming this process
                stack.enter_context(files.locked(Path(cfg.run.out_dir), "training run"))
            return loop(setup(cfg, env, data))
    finally:
        distributed.shutdown(env)


@dataclass
class Run:
    """Everything the loop needs, made by ``setup``."""

    cfg: TrainConfig
    env: DistEnv
    model: GPT
    wrapped: nn.Module  # the model as the strategy trains it (itself, DDP, or FSDP-sharded)
    optimizer: torch.optim.AdamW
    data: TrainData
    amp: AbstractContextManager
    start: int  # steps already done (from the checkpoint resumed)
    resumed: Path | None
    resumed_config: dict | None  # the train config recorded in that checkpoint
    resumed_world_size: int | None  # and the world size it was written with
    meta: dict  # model and train config, recorded in every checkpoint

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.run.out_dir)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.data.batch_size * self.cfg.data.block_size * self.data.train.grad_accum * self.env.world_size

    def say(self, message: str) -> None:
        """A message from rank 0, printed above the progress bar."""
        if self.env.is_main:
            tqdm.write(message, file=sys.stderr)


def setup(cfg: TrainConfig, env: DistEnv, data: TrainData | Callable | None = None) -> Run:
    """Data, model (fresh, fine-tuned from ``model.init``, or resumed), wrapping and optimizer."""
    run = cfg.run
    if run.tensorboard:
        _summary_writer_class()  # a missing package, before any work; every rank meets it, not rank 0 alone
    if run.eval_every and run.eval_batches % env.world_size:
        fix = run.eval_batches // env.world_size * env.world_size or env.world_size
        raise ConfigError(
            f"run.eval_batches ({run.eval_batches}) must be a multiple of the world size ({env.world_size}) so that "
            f"every rank runs the same number of forward passes; use {fix}"
        )
    accum = cfg.data.accum_steps(env.world_size)
    # data first: a wrong path should fail before any model is built
    data = data(env, accum) if callable(data) else data or load_data(cfg, env, accum)
    resume = checkpoint.latest(run.out_dir)
    if resume is not None:
        checkpoint.check_resumable(resume, env.strategy)  # before a model is built for it
    check_data_vocabulary(cfg, resume, data)
    if cfg.model.init == "scratch" and data.vocabulary is not None:
        predict_compact_vocabulary(cfg, data)
    model = build_model(cfg, resume)
    if data.vocab_size > model.config.vocab_size:
        raise ConfigError(
            f"the data's token ids go up to {data.vocab_size - 1}, but the model predicts {model.config.vocab_size} "
            f"tokens; set model.vocab_size to at least {data.vocab_size} (or train on data made for this model)"
        )
    model.to(env.device)
    torch.manual_seed(run.seed + env.rank)  # dropout streams differ per rank
    if run.compile:
        for block in model.h:
            block.compile()
    wrapped = distributed.wrap(model, env)
    optimizer = configure_optimizer(wrapped, cfg.optim)
    start, saved = 0, None
    if resume is not None:
        saved = checkpoint.load(resume, wrapped, optimizer, env)
        start = saved["step"]
        set_hyperparameters(optimizer, cfg.optim)  # loading restored the checkpoint's; the config wins
    meta = {"model_config": model.config.to_dict(), "train_config": cfg.to_dict()}
    amp = autocast(env.device, run.dtype)
    resumed = (saved["train_config"], saved.get("world_size")) if saved else (None, None)
    return Run(cfg, env, model, wrapped, optimizer, data, amp, start, resume, *resumed, meta)


def load_data(cfg: TrainConfig, env: DistEnv, accum: int) -> TrainData:
    """The training batches and this rank's val batches of the prepared directory ``data.dir``, checked."""
    if not cfg.data.dir:
        raise ConfigError("data.dir is not set; pass --data.dir=DIR (made by: gpt2lab prepare --input FILE --out DIR)")
    tokens = cfg.data.batch_size * cfg.data.block_size
    ram = physical_memory()
    if tokens * 16 > ram:  # each token of a micro-step is at least its int64 input and target on the host
        raise ConfigError(
            f"a micro-step of data.batch_size x data.block_size = {tokens:,} tokens cannot fit in this machine's "
            f"memory ({ram / 2**30:,.1f} GiB); lower data.batch_size (data.grad_accum keeps the tokens per step)"
        )
    splits = {"train": TokenData(cfg.data.dir, "train", cfg.data.block_size)}
    if cfg.run.eval_every:
        splits["val"] = TokenData(cfg.data.dir, "val", cfg.data.block_size)
    for split in splits.values():
        split.verify(progress=env.is_main and cfg.run.progress)
    batch, block = cfg.data.batch_size, cfg.data.block_size
    val = []
    if cfg.run.eval_every:
        val = val_batches(splits["val"], batch, block, cfg.run.eval_batches, env.rank, env.world_size)
    return TrainData(
        train=Batches(splits["train"], batch, block, accum, env.rank, env.world_size, seed=cfg.run.seed),
        val=val,
        vocab_size=splits["train"].vocab_size,
        bytes_per_token={name: split.bytes_per_token for name, split in splits.items()},
        vocabulary=splits["train"].vocabulary,
    )


def check_data_vocabulary(cfg: TrainConfig, resume: Path | None, data: TrainData) -> None:
    """Refuse data whose ids are another vocabulary's than the model's: the run's when resuming (its
    vocabulary.json, else GPT-2's ids), the fine-tuned model's when starting from ``model.init``."""
    if resume is not None:
        model, name = vocabulary_of(load_tokenizer(cfg.run.out_dir)), f"the run in {cfg.run.out_dir}"
    elif cfg.model.init != "scratch":
        model, name = vocabulary_of(tokenizer_of(cfg.model.init)), f"model.init {cfg.model.init}"
    else:
        return
    check_same_vocabulary(model, data.vocabulary, name, f"data.dir {cfg.data.dir or '(the data given)'}")


def predict_compact_vocabulary(cfg: TrainConfig, data: TrainData) -> None:
    """A model trained from scratch on ids of a compact vocabulary predicts that vocabulary:
    ``model.vocab_size`` defaults to its size (as nanoGPT reads it from its data's meta.pkl), and another
    size is refused. eval and generate read such a model through the vocabulary, so outputs past it, which
    no text can reach, would only make the training losses differ from theirs."""
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = data.vocab_size
    elif cfg.model.vocab_size != data.vocab_size:
        raise ConfigError(
            f"data.dir {cfg.data.dir} holds ids of a compact vocabulary of {data.vocab_size:,}, but model.vocab_size "
            f"is {cfg.model.vocab_size:,}; leave it unset (it defaults to the data's) or set it to {data.vocab_size}"
        )


def build_model(cfg: TrainConfig, resume: Path | None) -> GPT:
    """The model to train, on the CPU: seeded random weights (scratch) or the fine-tuned model's, with
    the vocabulary padded. When resuming, the weights are placeholders that the checkpoint replaces."""
    if cfg.model.init == "scratch":
        config = cfg.model.build()
        if resume is not None:
            checkpoint.check_model_config(resume, config)
        check_fits(config, bytes_per_param=16)  # weights, gradients, AdamW's two moments
        torch.manual_seed(cfg.run.seed)  # every rank draws the same weights
        return GPT(config)
    if resume is not None:  # the checkpoint holds every weight: the base model need not be there any more
        config = cfg.model.build(GPTConfig.from_dict(checkpoint.read_meta(resume)["model_config"]))
        checkpoint.check_model_config(resume, config)
        return GPT(config)
    base = load_model(cfg.model.init).float()  # weights and AdamW's moments in float32, whatever the file held
    config = cfg.model.build(base.config)
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


# --- one step ------------------------------------------------------------------------------------


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: BatchSource,
    step: int,
    amp: AbstractContextManager,
    grad_clip: float,
    env: DistEnv,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over ``batches.grad_accum`` micro-steps; returns (``grad_accum`` times the step's
    mean loss on this rank, gradient norm before clipping), both float32 on ``env.device``, not
    synchronised. The gradient is that of the mean loss over every scored target (not -100) of the step,
    on every rank: each micro-step's mean loss weighs by its share of them, so accumulating, or splitting
    over ranks, equals one big batch even where batches score different numbers of targets (where all
    score alike, each weighs exactly 1 / grad_accum)."""
    accum, device = batches.grad_accum, env.device
    micro_batches = [batches.get(step, micro) for micro in range(accum)]
    weights = _scored_shares(micro_batches, env)  # DDP and FSDP average gradients over the ranks: undone here
    loss_sum = torch.zeros((), device=device)
    for micro, (x, y) in enumerate(micro_batches):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with grad_sync(model, micro == accum - 1):  # only the last micro-step all-reduces gradients
            with amp:
                _, loss = model(x, y)
            weighted = loss * weights[micro].to(loss.dtype)
            (weighted / accum).backward()
        loss_sum += weighted.detach().float()
    max_norm = grad_clip if grad_clip > 0 else math.inf  # inf: measure the norm, clip nothing
    norm = full_tensor(nn.utils.clip_grad_norm_(model.parameters(), max_norm)).float()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, norm


def _scored_shares(batches: list[tuple[torch.Tensor, torch.Tensor]], env: DistEnv) -> torch.Tensor:
    """Each batch's share of the scored targets (not -100) of all ranks' batches, times their number
    (every rank holds as many): float64 on ``env.device``, exactly 1.0 each where all score alike."""
    scored = torch.stack([(y != -100).sum() for _, y in batches]).to(env.device)
    total = all_reduce_sum(scored.sum(), env)
    return (scored * (len(batches) * env.world_size)).double() / total.double()


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], env: DistEnv, amp) -> float:
    """Mean loss over the scored targets (not -100) of the val batches of all ranks (each rank holds its
    share): each batch's mean weighs by its share of them (exactly 1 each where all score alike)."""
    model.eval()
    weights = _scored_shares(batches, env)
    loss_sum = torch.zeros((), device=env.device)
    for (x, y), weight in zip(batches, weights, strict=True):
        with amp:
            _, loss = model(x.to(env.device), y.to(env.device))
        loss_sum += loss.float() * weight.float()
    model.train()
    return all_reduce_sum(loss_sum, env).item() / (len(batches) * env.world_size)


# --- the loop ------------------------------------------------------------------------------------


def loop(run: Run) -> TrainResult:
    """Train from ``run.start`` to ``run.steps``: log, evaluate and checkpoint on schedule; stop cleanly
    (with a checkpoint) on Ctrl-C or SIGTERM; stop with a clear error if the loss diverges."""
    cfg, env = run.cfg, run.env
    run.say(_start_line(run))
    if run.start >= cfg.run.steps:
        run.say(f"nothing to do: {run.out_dir} is already trained to step {run.start} (raise run.steps to continue)")
        return TrainResult(run.start, None, None, run.resumed)
    # rank 0 prepares the out_dir, and counts the tokens trained before the start from the metrics it writes;
    # a failure there stops every rank
    counted = on_every_rank(env, lambda: _start_out_dir(run) if env.is_main else None)
    log = _Log(run, counted)
    bad = torch.zeros((), device=env.device)  # non-finite losses / gradient norms since the last check
    run.wrapped.train()
    try:
        with _GracefulStop(force_on_repeat=not env.distributed) as stop:
            for step in range(run.start, cfg.run.steps):
                lr = lr_at(step, cfg.optim, cfg.run.steps)
                for group in run.optimizer.param_groups:
                    group["lr"] = lr
                loss_sum, norm = train_step(
                    run.wrapped, run.optimizer, run.data.train, step, run.amp, cfg.optim.grad_clip, env
                )
                bad += (~torch.isfinite(loss_sum)).float() + (~torch.isfinite(norm)).float()
                log.bar.update(1)
                stopping = any_rank(stop.requested, env)  # every rank stops after the same step
                if log.due(step + 1, stopping):
                    log.record(step + 1, lr, loss_sum, norm, bad, stopping)
    finally:
        log.close()
    run.say(
        f"done: step {cfg.run.steps}, loss {log.loss:.4f}"
        + (f", val loss {log.val_loss:.4f}" if log.val_loss is not None else "")
        + (f" ({log.val_bpb:.4f} bits per byte)" if log.val_bpb is not None else "")
    )
    return TrainResult(cfg.run.steps, log.loss, log.val_loss, log.last_ckpt, log.val_bpb)


class _Log:
    """The loop's bookkeeping: when to synchronise, what to write to metrics.jsonl, when to checkpoint."""

    def __init__(self, run: Run, tokens_at_start: int | None) -> None:
        """``tokens_at_start``: as the metrics counted them, or None to count them at the present batch."""
        self.run = run
        self.tokens_at_start = run.start * run.tokens_per_step if tokens_at_start is None else tokens_at_start
        self.loss = self.val_loss = self.val_bpb = None
        self.last_ckpt = run.resumed
        self.t_last, self.tokens_since = time.perf_counter(), 0
        bf16 = uses_bf16_autocast(run.env.device, run.cfg.run.dtype)
        self.peak = peak_flops(run.env.device, bf16, run.cfg.run.peak_tflops)
        self.flops_step = flops_per_token(run.model.config, run.cfg.data.block_size) * run.tokens_per_step
        self.writer = _tensorboard(run.out_dir) if run.cfg.run.tensorboard and run.env.is_main else None
        show = run.env.is_main and run.cfg.run.progress
        self.bar = tqdm(total=run.cfg.run.steps, initial=run.start, unit="step", disable=not show, dynamic_ncols=True)

    def due(self, done: int, stop_requested: bool) -> bool:
        r = self.run.cfg.run
        self.tokens_since += self.run.tokens_per_step
        return bool(done % r.log_every == 0 or self._is_eval(done) or self._is_ckpt(done) or stop_requested)

    def _is_eval(self, done: int) -> bool:
        r = self.run.cfg.run
        return bool(r.eval_every) and (done % r.eval_every == 0 or done == r.steps)

    def _is_ckpt(self, done: int) -> bool:
        r = self.run.cfg.run
        return done == r.steps or (r.ckpt_every > 0 and done % r.ckpt_every == 0)

    def record(self, done: int, lr: float, loss_sum, norm, bad, stop_requested: bool) -> None:
        """One synchronisation (mean loss over ranks, and whether any rank diverged or was interrupted),
        then the metrics record, the evaluation and the checkpoint that are due."""
        run, env = self.run, self.run.env
        flag = torch.tensor(float(stop_requested), device=env.device)
        stats = torch.stack([loss_sum / run.data.train.grad_accum, bad, norm, flag])
        loss, n_bad, grad_norm, n_stop = all_reduce_sum(stats, env).tolist()
        self.loss = loss / env.world_size
        if n_bad:
            raise TrainingDiverged(_diverged_message(done, lr, self.last_ckpt))
        record = self._metrics(done, lr, grad_norm / env.world_size)
        if self._is_eval(done):
            self._evaluate(record)
        if env.is_main:
            self._write(record)
        if self._is_ckpt(done) or n_stop:
            r = run.cfg.run
            self.last_ckpt = checkpoint.save(run.out_dir, done, run.wrapped, run.optimizer, env, run.meta, r.keep_last)
        if n_stop and done < run.cfg.run.steps:  # stopped in the last step: the run is done, not interrupted
            run.say(f"stopped at step {done}; saved {self.last_ckpt}. Run the same command again to resume.")
            raise KeyboardInterrupt
        self.t_last, self.tokens_since = time.perf_counter(), 0

    def _metrics(self, done: int, lr: float, grad_norm: float) -> dict:
        run = self.run
        elapsed = time.perf_counter() - self.t_last
        record = {
            "step": done,
            "loss": self.loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": self.tokens_at_start + (done - run.start) * run.tokens_per_step,
            "tokens_per_s": self.tokens_since / elapsed,
        }
        train_bpb = bits_per_byte(self.loss, 1, run.data.bytes_per_token.get("train"))
        if train_bpb is not None:
            record["bpb"] = train_bpb
        if self.peak:
            steps = self.tokens_since / run.tokens_per_step
            record["mfu"] = self.flops_step * steps / elapsed / (self.peak * run.env.world_size)
        return record

    def _evaluate(self, record: dict) -> None:
        run = self.run
        self.val_loss = evaluate(run.wrapped, run.data.val, run.env, run.amp)
        record |= {"val_loss": self.val_loss, "val_ppl": math.exp(min(self.val_loss, 50.0))}
        if run.data.evaluations is not None:
            run.wrapped.eval()
            with torch.no_grad(), run.amp:
                record |= run.data.evaluations(run.wrapped)
            run.wrapped.train()
        self.val_bpb = bits_per_byte(self.val_loss, 1, run.data.bytes_per_token.get("val"))
        bpb = ""
        if self.val_bpb is not None:
            record["val_bpb"] = self.val_bpb
            bpb = f", {self.val_bpb:.4f} bits per byte"
        run.say(f"step {record['step']}: val loss {self.val_loss:.4f}, perplexity {record['val_ppl']:.2f}{bpb}")

    def _write(self, record: dict) -> None:
        files.append_line(self.run.out_dir / METRICS, json.dumps(record))
        if self.writer is not None:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()
        postfix = {"loss": f"{self.loss:.4f}", "tok/s": f"{record['tokens_per_s']:,.0f}"}
        if "mfu" in record:
            postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
        self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


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


def _start_line(run: Run) -> str:
    cfg, env = run.cfg, run.env
    where = f"resumed from {run.resumed} at step {run.start}" if run.resumed else "training from step 0"
    changed = _changed_settings(run.resumed_config, cfg.to_dict()) if run.resumed_config else []
    if run.resumed_world_size not in (None, env.world_size):
        batch = (
            "data.global_batch_size keeps the global batch"
            if cfg.data.global_batch_size
            else "the global batch with it: set data.global_batch_size to keep it"
        )
        changed.append(f"world size {run.resumed_world_size} -> {env.world_size} ({batch})")
    precision = "bf16 autocast" if uses_bf16_autocast(env.device, cfg.run.dtype) else "fp32"
    micro = f"{run.data.train.grad_accum} micro-step(s) of {cfg.data.batch_size} x {cfg.data.block_size}"
    return (
        f"{where}: {run.model.num_params():,} parameters, strategy {env.strategy} x {env.world_size}, device "
        f"{env.device}, {precision}, {micro}"
        + (f"; settings changed since the checkpoint: {', '.join(changed)}" if changed else "")
    )


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


def _start_out_dir(run: Run) -> int | None:
    """Write train_config.json, and drop metrics of steps after the start (logged by a run that was
    killed before its next checkpoint, and about to be redone) and a record torn by a crash. Returns the
    tokens trained before the start as the record of the start step counted them (a checkpoint's step is
    always logged), which holds across a change of the global batch; None without that record."""
    out_dir = run.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    files.write_json(out_dir / checkpoint.TRAIN_CONFIG_JSON, run.cfg.to_dict())
    if run.data.vocabulary is not None:  # the model's token ids are this vocabulary's, not GPT-2's
        files.write_json(out_dir / VOCABULARY_JSON, run.data.vocabulary)
    else:  # one an earlier run in this directory left (a resume with another vocabulary was refused)
        (out_dir / VOCABULARY_JSON).unlink(missing_ok=True)
    metrics = out_dir / METRICS
    if not metrics.is_file():
        return None
    records, torn = files.read_jsonl(metrics)
    if torn:
        run.say(f"{metrics}: dropped a last record cut off by a crash (it is logged again)")
    kept = [r for r in records if r.get("step", 0) <= run.start]
    if torn or len(kept) < len(records):
        files.write_text(metrics, "".join(json.dumps(r) + "\n" for r in kept))
    at_start = [r["tokens"] for r in kept if r.get("step") == run.start and isinstance(r.get("tokens"), int)]
    return at_start[-1] if at_start else None


def _summary_writer_class() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("run.tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def _tensorboard(out_dir: Path):
    return _summary_writer_class()(out_dir / "tb")
