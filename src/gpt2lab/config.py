"""Model configuration: one typed dataclass, presets looked up by exact name."""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import textwrap
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gpt2lab.errors import ConfigError

POS_EMB = ("learned", "rope")


@dataclass
class GPTConfig:
    """Architecture of a GPT-2-style decoder.

    The defaults are GPT-2 124M. Variants are switched on by field and combine freely:
    ``pos_emb="rope"`` (rotary positions, no learned table), ``n_kv_head < n_head`` (grouped-query
    attention; 1 = multi-query), ``window=W`` (sliding window: query i sees keys i-W < j <= i), and
    ``window_pattern`` (a string of ``L``/``G`` repeated over the layers: local-window or global).
    """

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None
    pos_emb: str = "learned"
    rope_theta: float = 10000.0
    window: int | None = None
    window_pattern: str = "L"
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    padded_vocab_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"pick n_head from {_divisors(self.n_embd)}"
            )
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if not 1 <= self.n_kv_head <= self.n_head or self.n_head % self.n_kv_head:
            raise ConfigError(
                f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head}); "
                f"pick one of {_divisors(self.n_head)} (1 = multi-query, {self.n_head} = multi-head)"
            )
        if self.pos_emb not in POS_EMB:
            raise ConfigError(f"pos_emb must be one of {POS_EMB}, got {self.pos_emb!r}")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ConfigError(f"rope needs an even head_dim (n_embd / n_head), got {self.head_dim}")
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta}")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ConfigError(f"window must be a positive integer or None (full attention), got {self.window!r}")
        if not self.window_pattern or set(self.window_pattern) - {"L", "G"}:
            raise ConfigError(
                f"window_pattern must be a non-empty string of L (local window) and G (global) "
                f"characters, e.g. 'LLLG'; got {self.window_pattern!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.padded_vocab_size is None:
            self.padded_vocab_size = self.vocab_size
        if self.padded_vocab_size < self.vocab_size:
            raise ConfigError(f"padded_vocab_size ({self.padded_vocab_size}) must be >= vocab_size ({self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of a layer, or None where the layer attends to the full causal prefix."""
        if self.window is None:
            return None
        kind = self.window_pattern[layer % len(self.window_pattern)]
        return self.window if kind == "L" else None

    @property
    def max_positions(self) -> int | None:
        """Longest sequence the model can address: learned tables end at block_size, rotary ones do not."""
        return self.block_size if self.pos_emb == "learned" else None

    def kv_cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """K and V bytes one token adds to the cache (all layers), at the given element size."""
        return 2 * self.n_layer * self.n_kv_head * self.head_dim * bytes_per_element

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown GPTConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_name(cls, name: str, **overrides) -> GPTConfig:
        """A preset by exact name (``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``, ``debug``)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    "debug": dict(n_layer=2, n_head=4, n_embd=64, block_size=128),
}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# --- training configuration ---------------------------------------------------------------------------
# Four sections, each a dataclass; every field is settable from a TOML file ([section] key = value) or
# the command line (--section.key=value). The help text of a field is its metadata["help"].

STRATEGIES = ("single", "ddp", "fsdp")
TRAIN_DTYPES = ("auto", "float32", "bfloat16")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
# GPTConfig fields that may differ from the model being fine-tuned (the rest is its architecture)
_FINETUNE_FIELDS = ("dropout", "padded_vocab_size")


def _opt(default, help: str):
    """A config field with its help text (listed by ``--help``); a list default is copied per instance."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _arch(name: str):
    return _opt(None, f"GPTConfig.{name} (default: the preset's)")


@dataclass
class ModelSection:
    """What to train: a preset with optional architecture overrides (from scratch), or a model to fine-tune."""

    init: str = _opt(
        "scratch",
        "'scratch' (random weights: preset + overrides) or a model to fine-tune: an HF GPT-2 directory, "
        "a hub name, a gpt2lab directory or a training out_dir",
    )
    preset: str = _opt("gpt2", f"architecture for init=scratch: {', '.join(PRESETS)}")
    pad_vocab_multiple: int = _opt(
        64,
        "round the embedding rows up to a multiple of this (50257 -> 50304): faster matmuls and even FSDP "
        "shards for power-of-two world sizes up to 64; independent of the world size so checkpoints resume anywhere",
    )
    vocab_size: int | None = _arch("vocab_size")
    block_size: int | None = _arch("block_size")
    n_layer: int | None = _arch("n_layer")
    n_head: int | None = _arch("n_head")
    n_embd: int | None = _arch("n_embd")
    n_kv_head: int | None = _arch("n_kv_head")
    pos_emb: str | None = _arch("pos_emb")
    rope_theta: float | None = _arch("rope_theta")
    window: int | None = _arch("window")
    window_pattern: str | None = _arch("window_pattern")
    dropout: float | None = _arch("dropout")
    layer_norm_epsilon: float | None = _arch("layer_norm_epsilon")
    padded_vocab_size: int | None = _opt(None, "embedding rows (default: vocab_size rounded up to pad_vocab_multiple)")

    def __post_init__(self) -> None:
        if not isinstance(self.pad_vocab_multiple, int) or self.pad_vocab_multiple < 1:
            raise ConfigError(f"model.pad_vocab_multiple must be a positive integer, got {self.pad_vocab_multiple!r}")
        if self.init == "scratch":
            if self.preset not in PRESETS:
                raise ConfigError(f"model.preset {self.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
            try:
                self.build()
            except ConfigError as e:
                raise ConfigError(f"model: {e}") from None
            return
        fixed = sorted(k for k in self.overrides() if k not in _FINETUNE_FIELDS)
        if fixed:
            raise ConfigError(
                f"model.{fixed[0]} cannot be set when fine-tuning from {self.init!r}: the architecture is that "
                f"model's. Remove {', '.join('model.' + k for k in fixed)} (only model.dropout may change), "
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


@dataclass
class DataSection:
    """Where the tokens come from and how many go into one step."""

    dir: str = _opt("", "prepared data directory (made by: gpt2lab prepare --input FILE --out DIR)")
    batch_size: int = _opt(8, "sequences per micro-step on each rank")
    block_size: int = _opt(256, "tokens per training sequence (at most the model's block_size)")
    grad_accum: int | None = _opt(None, "micro-steps per optimizer step (default 1, or set by global_batch_size)")
    global_batch_size: int | None = _opt(
        None,
        "sequences per optimizer step over all ranks and micro-steps; "
        "grad_accum = global_batch_size / (batch_size x world_size)",
    )

    def __post_init__(self) -> None:
        _positive(self, "data", "batch_size", "block_size")
        _positive(self, "data", "grad_accum", "global_batch_size", optional=True)
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

    lr: float = _opt(6e-4, "peak learning rate, reached after warmup_steps")
    min_lr: float = _opt(6e-5, "learning rate at the last step (cosine decay from lr)")
    warmup_steps: int = _opt(100, "steps of linear warmup from lr / warmup_steps to lr")
    weight_decay: float = _opt(0.1, "AdamW weight decay, applied to matrices and embeddings only")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.95, "AdamW beta2")
    eps: float = _opt(1e-8, "AdamW epsilon")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0 = no clipping)")

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optim.min_lr must be in [0, optim.lr={self.lr}], got {self.min_lr}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("warmup_steps", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"optim.{name} must be >= 0, got {getattr(self, name)}")
        if not self.eps > 0:
            raise ConfigError(f"optim.eps must be > 0, got {self.eps}")


@dataclass
class RunSection:
    """How long, where, and on what."""

    steps: int = _opt(1000, "optimizer steps in the whole run (the schedule ends here)")
    eval_every: int = _opt(100, "evaluate val loss every this many steps and at the end (0 = never)")
    eval_batches: int = _opt(20, "val batches per evaluation (a multiple of the world size)")
    ckpt_every: int = _opt(500, "checkpoint every this many steps (0 = only at the end)")
    keep_last: int = _opt(3, "complete checkpoints to keep; older ones are deleted")
    out_dir: str = _opt("out", "checkpoints, metrics.jsonl and train_config.json; rerunning resumes from here")
    seed: int = _opt(1337, "seed of the initial weights, the data order and dropout")
    strategy: str = _opt("single", f"{' | '.join(STRATEGIES)}; ddp and fsdp run under torchrun")
    device: str = _opt("auto", "cpu, cuda, cuda:N, or auto (cuda:LOCAL_RANK when available, else cpu)")
    dtype: str = _opt("auto", "float32, or bfloat16 autocast (weights stay float32); auto = bfloat16 on CUDA")
    compile: bool = _opt(False, "torch.compile each transformer block")
    log_every: int = _opt(10, "write a metrics.jsonl record every this many steps")
    progress: bool = _opt(True, "show a progress bar (rank 0)")
    tensorboard: bool = _opt(False, "also write TensorBoard events to out_dir/tb (needs the tensorboard package)")
    peak_tflops: float | None = _opt(None, "peak TFLOP/s per device for MFU (default: known GPUs in bf16, else no MFU)")

    def __post_init__(self) -> None:
        _positive(self, "run", "steps", "eval_batches", "keep_last", "log_every")
        for name in ("eval_every", "ckpt_every", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"run.{name} must be >= 0, got {getattr(self, name)}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"run.strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.dtype not in TRAIN_DTYPES:
            raise ConfigError(
                f"run.dtype must be one of {', '.join(TRAIN_DTYPES)}, got {self.dtype!r} "
                "(float16 would need loss scaling; use bfloat16)"
            )
        if not self.out_dir:
            raise ConfigError("run.out_dir is empty; name a directory for checkpoints and metrics")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
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
    def from_dict(cls, d: dict) -> TrainConfig:
        """From nested {section: {key: value}}; strings are parsed to each field's type, unknown keys rejected."""
        sections = {}
        for name, values in d.items():
            if name not in SECTIONS:
                raise ConfigError(f"unknown config section {name!r}{_suggest(name, SECTIONS)}")
            if not isinstance(values, dict):
                raise ConfigError(f"config section {name!r} must be a table of key = value, got {values!r}")
            sections[name] = values
        built = {}
        for name, section in SECTIONS.items():
            hints = typing.get_type_hints(section)
            values = sections.get(name, {})
            for key in values:
                if key not in hints:
                    raise ConfigError(f"unknown config key {name}.{key}{_suggest_key(f'{name}.{key}')}")
            built[name] = section(**{k: _coerce(f"{name}.{k}", v, hints[k]) for k, v in values.items()})
        return cls(**built)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
        """A TOML file (optional) with ``--section.key=value`` overrides applied on top."""
        d: dict = {}
        if path is not None:
            d = read_toml(Path(path))
        for key, value in parse_overrides(overrides):
            section, _, name = key.partition(".")
            if not name:
                raise ConfigError(f"--{key}: config keys are section.key, e.g. --optim.lr=3e-4")
            if not isinstance(d.get(section, {}), dict):
                raise ConfigError(f"config section {section!r} must be a table")
            d.setdefault(section, {})[name] = value
        return cls.from_dict(d)


def read_toml(path: Path) -> dict:
    if sys.version_info < (3, 11):
        raise ConfigError("reading TOML configs needs Python 3.11+ (tomllib); pass --section.key=value instead")
    import tomllib

    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None


def parse_overrides(args: Sequence[str]) -> list[tuple[str, str]]:
    """``["--a.b=1", "--c.d", "2", "--run.compile"]`` -> [("a.b", "1"), ("c.d", "2"), ("run.compile", "true")]."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}; config overrides look like --section.key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            else:
                value = "true"  # a bare --run.compile switches a flag on
        out.append((key, value))
        i += 1
    return out


def all_keys() -> list[str]:
    return [f"{name}.{f.name}" for name, section in SECTIONS.items() for f in dataclasses.fields(section)]


def describe_train_config() -> str:
    """Every config key with its default and help text, for ``gpt2lab train --help``."""
    lines = []
    for name, section in SECTIONS.items():
        lines.append(f"[{name}]  {section.__doc__.strip()}")
        for f in dataclasses.fields(section):
            lines.append(f"  --{name}.{f.name}={_show(f.default)}")
            lines.append(
                textwrap.fill(f.metadata["help"], width=100, initial_indent=" " * 6, subsequent_indent=" " * 6)
            )
    return "\n".join(lines)


def _show(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}"


def _suggest_key(key: str) -> str:
    name = key.partition(".")[2]
    elsewhere = [k for k in all_keys() if k.partition(".")[2] == name]  # the right key in the wrong section
    return f"; did you mean {elsewhere[0]!r}?" if elsewhere else _suggest(key, all_keys())


def _coerce(key: str, value, hint):
    """``value`` (from TOML, or a string from the command line) as the type ``hint`` of field ``key``."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if args else hint
    if isinstance(value, str) and base is not str:
        text = value.strip().lower()
        if optional and text in ("none", "null"):
            return None
        if base is bool:
            if text in _TRUE + _FALSE:
                return text in _TRUE
        else:
            try:
                return base(value)
            except ValueError:
                pass
    elif value is None and optional:
        return None
    elif base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    elif isinstance(value, base) and not (base is int and isinstance(value, bool)):
        return value
    kind = base.__name__ + (" or none" if optional else "")
    raise ConfigError(f"{key} must be {kind}, got {value!r}")


def _positive(obj, section: str, *names: str, optional: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        if optional and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{section}.{name} must be a positive integer, got {value!r}")


def _near_multiples(value: int, multiple: int) -> str:
    below = value // multiple * multiple
    above = below + multiple
    return f"{below} or {above}" if below else str(above)
