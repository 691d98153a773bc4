"""The settings of ``gpt2lab train``: four sections on the settings engine (gpt2lab.settings).

``[model]`` (what to train), ``[data]`` (where tokens come from, how many per step), ``[optim]``
(AdamW and its schedule) and ``[run]`` (length, output, device, distribution). The model section's
architecture keys are GPTConfig's own fields, derived from it, so a new model field is a new
``--model.key`` with nothing else to change. Needs no torch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gpt2lab import settings
from gpt2lab.config import PRESETS, GPTConfig
from gpt2lab.errors import ConfigError
from gpt2lab.settings import nonnegative, opt, positive

STRATEGIES = ("single", "ddp", "fsdp")
TRAIN_DTYPES = ("auto", "float32", "bfloat16")
# GPTConfig fields that may differ from the model being fine-tuned (the rest is its architecture)
FINETUNE_FIELDS = ("dropout", "padded_vocab_size", "rope_interpolation")


class _ModelSettings:
    """What to train: a preset with optional architecture overrides (from scratch), or a model to fine-tune."""

    def __post_init__(self) -> None:
        positive(self, "model", "pad_vocab_multiple")
        if self.init == "scratch":
            if self.preset not in PRESETS:
                raise ConfigError(f"model.preset {self.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
            try:
                self.build()
            except ConfigError as e:
                raise ConfigError(f"model: {e}") from None
            return
        fixed = sorted(k for k in self.overrides() if k not in FINETUNE_FIELDS)
        if fixed:
            raise ConfigError(
                f"model.{fixed[0]} cannot be set when fine-tuning from {self.init!r}: the architecture is that "
                f"model's. Remove {', '.join('model.' + k for k in fixed)} (only model.dropout and model.rope_interpolation may change), "
                "or train from scratch with model.init=scratch"
            )

    def overrides(self) -> dict:
        """The GPTConfig fields set in this section."""
        names = (f.name for f in dataclasses.fields(GPTConfig))
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def build(self, base: GPTConfig | None = None) -> GPTConfig:
        """The GPTConfig to train: the preset with overrides (scratch), or ``base`` (the model fine-tuned
        from) with the overrides allowed there; the vocabulary padded unless padded_vocab_size is given."""
        if base is None:
            config = GPTConfig.from_name(self.preset, **self.overrides())
        else:
            config = dataclasses.replace(base, **self.overrides())
        if self.padded_vocab_size is None:
            multiple = self.pad_vocab_multiple
            padded = max(config.padded_vocab_size, math.ceil(config.vocab_size / multiple) * multiple)
            config = dataclasses.replace(config, padded_vocab_size=padded)
        return config


def _model_section() -> type:
    """The [model] section: init, preset and pad_vocab_multiple, then every GPTConfig field as an optional
    override (default None: the preset's value)."""
    hints = typing.get_type_hints(GPTConfig)
    own = [
        (
            "init",
            str,
            opt(
                "scratch",
                "'scratch' (random weights: preset + overrides) or a model to fine-tune: an HF GPT-2 directory, "
                "a hub name, a gpt2lab directory or a training out_dir",
            ),
        ),
        ("preset", str, opt("gpt2", f"architecture for init=scratch: {', '.join(PRESETS)}")),
        (
            "pad_vocab_multiple",
            int,
            opt(
                64,
                "round the embedding rows up to a multiple of this (50257 -> 50304): faster matmuls and even FSDP "
                "shards for power-of-two world sizes up to 128; independent of the world size so checkpoints "
                "resume anywhere",
            ),
        ),
    ]
    arch = []
    for f in dataclasses.fields(GPTConfig):
        default = {
            "padded_vocab_size": "vocab_size rounded up to pad_vocab_multiple",
            "vocab_size": "the preset's; on data of a compact vocabulary, its size",
            "dropout": "the preset's; when fine-tuning, the model's own",
            "rope_interpolation": "the preset's; when fine-tuning, the model's own",
        }.get(f.name, "the preset's")
        arch.append((f.name, hints[f.name] | None, opt(None, f"{f.metadata['help']} (default: {default})")))
    section = dataclasses.make_dataclass("ModelSection", own + arch, bases=(_ModelSettings,))
    section.__module__, section.__doc__ = __name__, _ModelSettings.__doc__
    return section


ModelSection = _model_section()


@dataclass
class DataSection:
    """Where the tokens come from and how many go into one step."""

    dir: str = opt("", "prepared data directory (made by: gpt2lab prepare --input FILE --out DIR)")
    batch_size: int = opt(8, "sequences per micro-step on each rank")
    block_size: int = opt(256, "tokens per training sequence (at most the model's block_size)")
    grad_accum: int | None = opt(None, "micro-steps per optimizer step (default 1, or set by global_batch_size)")
    global_batch_size: int | None = opt(
        None,
        "sequences per optimizer step over all ranks and micro-steps; "
        "grad_accum = global_batch_size / (batch_size x world_size)",
    )

    def __post_init__(self) -> None:
        self.dir = os.path.expanduser(self.dir)  # "--data.dir=~/x": no shell expands a ~ after "="
        positive(self, "data", "batch_size", "block_size")
        positive(self, "data", "grad_accum", "global_batch_size", optional=True)
        if self.global_batch_size is not None:
            if self.grad_accum is not None:
                raise ConfigError(
                    "set data.grad_accum or data.global_batch_size, not both (global_batch_size determines grad_accum)"
                )
            if self.global_batch_size % self.batch_size:
                raise ConfigError(
                    f"data.global_batch_size ({self.global_batch_size}) is not a multiple of data.batch_size "
                    f"({self.batch_size}); use {_near_multiples(self.global_batch_size, self.batch_size)}, "
                    "or change data.batch_size"
                )

    def accum_steps(self, world_size: int) -> int:
        """Micro-steps per optimizer step with ``world_size`` ranks."""
        if self.global_batch_size is None:
            return self.grad_accum or 1
        per_micro = self.batch_size * world_size
        if self.global_batch_size % per_micro:
            raise ConfigError(
                f"data.global_batch_size ({self.global_batch_size}) is not a multiple of data.batch_size x world "
                f"size = {self.batch_size} x {world_size} = {per_micro}; use "
                f"{_near_multiples(self.global_batch_size, per_micro)}, or change data.batch_size"
            )
        return self.global_batch_size // per_micro


@dataclass
class OptimSection:
    """AdamW with linear warmup then cosine decay to min_lr."""

    lr: float = opt(6e-4, "peak learning rate, reached after warmup_steps")
    min_lr: float = opt(6e-5, "learning rate at the last step (cosine decay from lr)")
    warmup_steps: int = opt(100, "steps of linear warmup from lr / warmup_steps to lr")
    weight_decay: float = opt(0.1, "AdamW weight decay, applied to matrices and embeddings only")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    eps: float = opt(1e-8, "AdamW epsilon")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = no clipping)")

    def __post_init__(self) -> None:
        for name in ("lr", "min_lr", "weight_decay", "beta1", "beta2", "eps", "grad_clip"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"optim.{name} must be a finite number, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optim.min_lr must be in [0, optim.lr={self.lr}], got {self.min_lr}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        nonnegative(self, "optim", "warmup_steps", "weight_decay", "grad_clip")
        if not self.eps > 0:
            raise ConfigError(f"optim.eps must be > 0, got {self.eps}")


@dataclass
class RunSection:
    """How long, where, and on what."""

    steps: int = opt(1000, "optimizer steps in the whole run (the schedule ends here)")
    eval_every: int = opt(100, "evaluate val loss every this many steps and at the end (0 = never)")
    eval_batches: int = opt(20, "val batches per evaluation (a multiple of the world size)")
    ckpt_every: int = opt(500, "checkpoint every this many steps (0 = only at the end)")
    keep_last: int = opt(3, "complete checkpoints to keep; older ones are deleted")
    out_dir: str = opt("out", "checkpoints, metrics.jsonl and train_config.json; rerunning resumes from here")
    seed: int = opt(1337, "seed of the initial weights, the data order and dropout")
    strategy: str = opt("single", f"{' | '.join(STRATEGIES)}; ddp and fsdp run under torchrun")
    device: str = opt("auto", "cpu, cuda, cuda:N, or auto (cuda:LOCAL_RANK when available, else cpu)")
    dtype: str = opt("auto", "float32, or bfloat16 autocast (weights stay float32); auto = bfloat16 on CUDA")
    compile: bool = opt(False, "torch.compile each transformer block")
    log_every: int = opt(10, "write a metrics.jsonl record every this many steps")
    progress: bool = opt(True, "show a progress bar (rank 0)")
    tensorboard: bool = opt(False, "also write TensorBoard events to out_dir/tb (needs the tensorboard package)")
    peak_tflops: float | None = opt(None, "peak TFLOP/s per device for MFU (default: known GPUs in bf16, else no MFU)")

    def __post_init__(self) -> None:
        positive(self, "run", "steps", "eval_batches", "keep_last", "log_every")
        nonnegative(self, "run", "eval_every", "ckpt_every", "seed")
        if self.seed >= 2**62:  # torch takes seeds below 2**64; per-rank and per-job offsets are added to it
            raise ConfigError(f"run.seed must be below 2**62, got {self.seed}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"run.strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.dtype not in TRAIN_DTYPES:
            raise ConfigError(
                f"run.dtype must be one of {', '.join(TRAIN_DTYPES)}, got {self.dtype!r} "
                "(float16 would need loss scaling; use bfloat16)"
            )
        if not self.out_dir:
            raise ConfigError("run.out_dir is empty; name a directory for checkpoints and metrics")
        self.out_dir = os.path.expanduser(self.out_dir)
        if self.peak_tflops is not None and not (math.isfinite(self.peak_tflops) and self.peak_tflops > 0):
            raise ConfigError(f"run.peak_tflops must be > 0, got {self.peak_tflops}")


SECTIONS = {"model": ModelSection, "data": DataSection, "optim": OptimSection, "run": RunSection}


@dataclass
class TrainConfig:
    """Everything ``train`` needs. Build it with ``TrainConfig.load(toml_path, ["--optim.lr=3e-4", ...])``."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)

    def __post_init__(self) -> None:
        if self.optim.warmup_steps > self.run.steps:
            raise ConfigError(
                f"optim.warmup_steps ({self.optim.warmup_steps}) exceeds run.steps ({self.run.steps}); "
                "lower the warmup or train longer"
            )
        if self.model.init == "scratch":
            limit = self.model.build().max_positions
            if limit is not None and self.data.block_size > limit:
                raise ConfigError(
                    f"data.block_size ({self.data.block_size}) exceeds the model's block_size ({limit}); "
                    f"lower data.block_size or raise model.block_size"
                )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Mapping]) -> TrainConfig:
        """From nested {section: {key: value}}; strings are parsed to each field's type, unknown keys rejected."""
        return cls(**settings.build(SECTIONS, d))

    @classmethod
    def load(
        cls, path: str | Path | None = None, overrides: Sequence[str] = (), defaults: TrainConfig | None = None
    ) -> TrainConfig:
        """``defaults`` (or the built-in ones), then a TOML file, then ``--section.key=value`` overrides."""
        layers = [defaults.to_dict()] if defaults is not None else []
        if path is not None:
            layers.append(settings.read_toml(path))
        layers.append(settings.parse_overrides(overrides))
        return cls.from_dict(settings.merge(*layers))


def describe_train_config() -> str:
    """Every config key with its default and help text, for ``gpt2lab train --help``."""
    return settings.describe(SECTIONS)


def _near_multiples(value: int, multiple: int) -> str:
    below = value // multiple * multiple
    above = below + multiple
    return f"{below} or {above}" if below else str(above)
