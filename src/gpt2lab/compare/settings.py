"""The settings of ``gpt2lab compare``: what to compare, each experiment's size, and the profiles.

The language models train with ``gpt2lab train``'s sections ([model] [data] [optim] [run]); the [compare]
section says which variants and seeds, and one section per experiment sizes it: [mqar], [extrapolation],
[uptraining], [overfitting], [efficiency]. A profile (``default``, ``quick``, ``full``, ``gpu``) gives every
default; a TOML file and ``--section.key=value`` overrides go on top. All on the settings engine
(gpt2lab.settings), so unknown keys are rejected with a suggestion; reading them needs no torch.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gpt2lab import settings
from gpt2lab.errors import ConfigError
from gpt2lab.settings import nonnegative, opt, positive
from gpt2lab.train_config import SECTIONS, TrainConfig

PARTS = ("rope", "gqa", "mqa", "swa", "mixed")
METHODS = ("mean", "first")


@dataclass
class CompareSection:
    """Which variants, seeds and data; the language-model grid; how many worker processes."""

    variants: list[str] = opt(
        ["baseline", "rope", "rope+mqa", "rope+swa", "rope+mixed"],
        "language-model variants, every one trained with every seed: baseline (GPT-2), or changes joined by '+' "
        "from " + ", ".join(PARTS) + ". Each is compared with its reference: rope with baseline, rope+X with rope, "
        "X with baseline",
    )
    seeds: int = opt(5, "paired seeds run.seed, run.seed + 1, ...: per seed every variant starts from the same weights")
    vocab: int = opt(
        1024,
        "compact vocabulary: 256 byte ids plus the (vocab - 256) most frequent training tokens, others spelled as "
        "bytes (lossless; 0 = GPT-2's own)",
    )
    max_docs: int = opt(0, "stdlib files to prepare when no data.dir is given (0 = all of them)")
    window: int = opt(16, "sliding window (tokens, the current one included) of swa and mixed layers")
    local_global: str = opt("LLLG", "layer pattern of 'mixed' (L = window layer, G = global), repeated over layers")
    gqa_kv_heads: int = opt(0, "key/value heads of 'gqa' (0 = half the query heads)")
    val_tokens: int = opt(102400, "fixed val tokens every final loss is measured on (evenly spaced windows)")
    calibration: list[str] = opt(
        ["rope", "rope+swa"],
        "variants trained once more, first seed, for calibration_factor x run.steps: whether their difference has "
        "settled (empty: none)",
    )
    calibration_factor: int = opt(3, "how many times longer the calibration runs train")
    workers: int = opt(0, "worker processes (0 = one per CPU core, at most the jobs; on CUDA 4 sharing the GPU)")
    gpu_mfu: float = opt(0.12, "model FLOP utilisation assumed by the plan's time estimate on a GPU")

    def __post_init__(self) -> None:
        positive(self, "compare", "seeds", "window", "val_tokens", "calibration_factor")
        if self.vocab and not 257 <= self.vocab <= 65536:
            raise ConfigError(f"compare.vocab must be 0 (GPT-2's vocabulary) or in [257, 65536], got {self.vocab}")
        nonnegative(self, "compare", "max_docs", "workers", "gqa_kv_heads")
        if not 0 < self.gpu_mfu <= 1:
            raise ConfigError(f"compare.gpu_mfu must be in (0, 1], got {self.gpu_mfu}")
        check_variants("compare.variants", self.variants, empty_ok=False)
        unknown = sorted(set(self.calibration) - set(self.variants))
        if unknown:
            raise ConfigError(f"compare.calibration names {unknown}, which compare.variants does not train")


@dataclass
class MqarSection:
    """Multi-query associative recall with planted distances and the key-swap control (empty lists: skipped)."""

    seq_len: int = opt(64, "tokens per sequence")
    keys: int = opt(8, "distinct keys (at least 2 x groups)")
    values: int = opt(8, "distinct values")
    groups: int = opt(4, "twin groups per sequence (two pairs each, each queried once at a planted distance)")
    window: int = opt(8, "sliding window of the swa and mixed models")
    width: int = opt(64, "model width (n_embd)")
    heads: int = opt(4, "query heads")
    batch_size: int = opt(32, "sequences per step")
    lr: float = opt(3e-3, "peak learning rate (5% warmup, cosine to a tenth)")
    distances: str = opt("log-uniform", "training distances: log-uniform (half of them short) or uniform")
    one_layer: list[str] = opt(["rope", "baseline", "rope+mqa", "rope+swa"], "variants of the one-layer models")
    one_layer_steps: int = opt(1200, "training steps of a one-layer model")
    two_layers: list[str] = opt(
        ["rope+swa", "rope+mixed"], "variants of the two-layer models (a window stack, and window + global)"
    )
    two_layer_steps: int = opt(1400, "training steps of a two-layer model")
    two_layer_pattern: str = opt("LG", "layer pattern of 'mixed' in the two-layer models")
    eval_every: int = opt(100, "steps between accuracy checks (the plateau curve)")
    eval_sequences: int = opt(512, "fixed evaluation sequences (every distance bin gets about an equal share)")

    def __post_init__(self) -> None:
        positive(self, "mqar", "seq_len", "keys", "values", "groups", "window", "width", "heads", "batch_size")
        positive(self, "mqar", "one_layer_steps", "two_layer_steps", "eval_every", "eval_sequences")
        if self.distances not in ("log-uniform", "uniform"):
            raise ConfigError(f"mqar.distances must be log-uniform or uniform, got {self.distances!r}")
        check_variants("mqar.one_layer", self.one_layer)
        check_variants("mqar.two_layers", self.two_layers)
        if any("mixed" in variant_changes(v) for v in self.one_layer):
            raise ConfigError("mqar.one_layer cannot hold 'mixed': one layer is either local or global")


@dataclass
class ExtrapolationSection:
    """Per-position loss past the training length, against the same tokens with the 1x context."""

    variants: list[str] = opt(
        ["baseline", "rope", "rope+swa", "rope+mixed"],
        "language-model variants scored (learned positions report their error instead)",
    )
    factor: int = opt(8, "longest context scored, as a multiple of the training context")
    stretches: int = opt(16, "val stretches of factor x context tokens scored")
    pi_factors: list[int] = opt([2, 4, 8], "zero-shot position interpolation of rope to these multiples")
    pi_finetune_factor: int = opt(4, "rope fine-tuned with position interpolation to this multiple (0 = none)")
    pi_finetune_fraction: float = opt(0.05, "its fine-tuning steps, as a fraction of run.steps (tokens per step kept)")
    lr: float = opt(1e-3, "peak learning rate of the fine-tune (10% warmup, cosine to a tenth)")

    def __post_init__(self) -> None:
        positive(self, "extrapolation", "factor", "stretches")
        check_variants("extrapolation.variants", self.variants)
        if any(f < 2 or self.factor % f for f in self.pi_factors):
            raise ConfigError(f"extrapolation.pi_factors must be >= 2 and divide factor ({self.factor})")
        if self.pi_finetune_factor and (self.pi_finetune_factor < 2 or self.factor % self.pi_finetune_factor):
            raise ConfigError(f"extrapolation.pi_finetune_factor must be 0, or >= 2 and divide factor ({self.factor})")
        if not 0 < self.pi_finetune_fraction <= 1 or not self.lr > 0:
            raise ConfigError("extrapolation.pi_finetune_fraction must be in (0, 1] and extrapolation.lr > 0")


@dataclass
class UptrainingSection:
    """The GQA paper's uptraining: rope (multi-head) converted to fewer key/value heads, then trained briefly."""

    kv_heads: list[int] = opt([1], "key/value heads to convert to (1 = multi-query; empty: skipped)")
    methods: list[str] = opt(list(METHODS), "conversions: mean (pool each group's heads) and first (keep its first)")
    fractions: list[float] = opt([0.05, 0.1], "uptraining steps as fractions of run.steps (0 is always measured)")
    lr: float = opt(1e-3, "peak learning rate of uptraining (10% warmup, cosine to a tenth)")
    scratch: bool = opt(True, "also train the converted shape from scratch for (1 + largest fraction) x run.steps")

    def __post_init__(self) -> None:
        if any(k < 1 for k in self.kv_heads) or not set(self.methods) <= set(METHODS) or not self.methods:
            raise ConfigError(f"uptraining.kv_heads must be >= 1 and uptraining.methods from {', '.join(METHODS)}")
        if any(not 0 < f <= 1 for f in self.fractions) or not self.lr > 0:
            raise ConfigError("uptraining.fractions must lie in (0, 1] and uptraining.lr must be > 0")


@dataclass
class OverfittingSection:
    """Many epochs over a few training tokens: the train-minus-validation gap against n_kv_head."""

    variants: list[str] = opt(["rope", "rope+gqa", "rope+mqa"], "variants trained on the small slice (empty: skipped)")
    tokens: int = opt(12288, "training tokens: the first this many of the training split")
    steps: int = opt(120, "training steps (epochs = steps x batch tokens / tokens)")
    eval_every: int = opt(10, "steps between val-loss evaluations (the overfitting curve)")

    def __post_init__(self) -> None:
        positive(self, "overfitting", "tokens", "steps", "eval_every")
        check_variants("overfitting.variants", self.variants)


@dataclass
class EfficiencySection:
    """Decode speed timed in alternation against a reference, and window vs full attention kernels."""

    reference: str = opt("rope", "the variant every other is timed against (rotary, so long contexts are legal)")
    variants: list[str] = opt(
        ["baseline", "rope+mqa", "rope+swa", "rope+mixed"],
        "variants timed against the reference (learned positions only up to their block size)",
    )
    batches: list[int] = opt([1, 8], "decode batch sizes")
    contexts: list[int] = opt([256, 1024, 4096], "contexts decoded at")
    rounds: int = opt(6, "alternation rounds (reference, variant, ... in a rotating order)")
    new_tokens: int = opt(32, "decode steps timed per measurement")
    kernel_contexts: list[int] = opt([1024, 4096], "sequence lengths of the attention-kernel table")
    kernel_ratios: list[int] = opt([4, 8, 16, 32, 64], "context / window ratios of the kernel table")
    kernel_rounds: int = opt(5, "interleaved repetitions per kernel and shape")

    def __post_init__(self) -> None:
        positive(self, "efficiency", "rounds", "new_tokens", "kernel_rounds")
        check_variants("efficiency.variants", [self.reference, *self.variants])
        if any(b < 1 for b in self.batches) or any(c <= self.new_tokens for c in self.contexts):
            raise ConfigError("efficiency.batches must be >= 1 and every context above efficiency.new_tokens")
        if "rope" not in variant_changes(self.reference):
            raise ConfigError(
                f"efficiency.reference {self.reference!r} has learned positions, which end at its block size: "
                "it is timed at every context, so name a rotary variant (e.g. rope)"
            )
        if any(c < 1 for c in self.kernel_contexts) or any(
            not 1 <= r <= c for r in self.kernel_ratios for c in self.kernel_contexts
        ):
            raise ConfigError(
                "efficiency.kernel_contexts must be >= 1 and every efficiency.kernel_ratios value between 1 and "
                f"the smallest kernel context (a window of at least one position); got contexts "
                f"{self.kernel_contexts}, ratios {self.kernel_ratios}"
            )


def check_variants(key: str, names: list[str], empty_ok: bool = True) -> None:
    """Each name is a valid variant and none repeats."""
    if not names and not empty_ok:
        raise ConfigError(f"{key} is empty; name at least one variant, e.g. baseline,rope")
    if len(set(names)) != len(names):
        raise ConfigError(f"{key} names a variant twice: {names}")
    for name in names:
        variant_changes(name)


def variant_changes(name: str) -> list[str]:
    """The changes a variant name asks for: ``"rope+gqa"`` -> ["rope", "gqa"], ``"baseline"`` -> []."""
    if name == "baseline":
        return []
    parts = name.split("+")
    for part in parts:
        if part not in PARTS:
            close = difflib.get_close_matches(part, [*PARTS, "baseline"], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown variant part {part!r} in {name!r}{hint} (use baseline, or parts joined by '+': {', '.join(PARTS)})"
            )
    if len(set(parts)) != len(parts) or {"gqa", "mqa"} <= set(parts) or {"swa", "mixed"} <= set(parts):
        raise ConfigError(f"variant {name!r} repeats or contradicts itself (gqa/mqa and swa/mixed exclude each other)")
    return parts


def reference_of(name: str) -> str | None:
    """The variant ``name`` is compared with: rope with baseline, rope+X with rope, X with baseline."""
    changes = variant_changes(name)
    if not changes:
        return None
    return "rope" if "rope" in changes and len(changes) > 1 else "baseline"


def variant_overrides(name: str, n_head: int, n_layer: int, window: int, pattern: str, gqa_kv: int = 0) -> dict:
    """GPTConfig fields that turn the baseline into variant ``name``."""
    out: dict = {}
    for part in variant_changes(name):
        if part == "rope":
            out["pos_emb"] = "rope"
        elif part in ("gqa", "mqa"):
            kv = 1 if part == "mqa" else gqa_kv or n_head // 2
            if kv < 1 or kv >= n_head or n_head % kv:
                raise ConfigError(
                    f"{part} needs key/value heads that divide n_head ({n_head}) and are fewer than it; "
                    "set compare.gqa_kv_heads or use a model with more heads"
                )
            out["n_kv_head"] = kv
        elif part == "swa":
            out |= {"window": window, "window_pattern": "L"}
        else:
            kinds = {pattern[i % len(pattern)] for i in range(n_layer)}
            if kinds != {"L", "G"}:
                raise ConfigError(
                    f"'mixed' needs both window (L) and global (G) layers, but the pattern {pattern!r} over {n_layer} "
                    f"layers gives only {''.join(sorted(kinds))}; use e.g. 'LG' or 'LLLG' (no longer than n_layer)"
                )
            out |= {"window": window, "window_pattern": pattern}
    return out


EXPERIMENTS = {
    "compare": CompareSection,
    "mqar": MqarSection,
    "extrapolation": ExtrapolationSection,
    "uptraining": UptrainingSection,
    "overfitting": OverfittingSection,
    "efficiency": EfficiencySection,
}
COMPARE_SECTIONS = {**SECTIONS, **EXPERIMENTS}
_LM_RUN = {"ckpt_every": 0, "keep_last": 1, "log_every": 10}

# About 45 minutes on 2 idle CPU cores (the plan printed before a run re-estimates it).
DEFAULT_CONFIG: dict = {
    "model": {"preset": "gpt2", "n_layer": 4, "n_head": 4, "n_embd": 64, "block_size": 256},
    "data": {"batch_size": 12, "block_size": 256},
    "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 20},
    "run": {"steps": 300, "eval_every": 50, "eval_batches": 4, **_LM_RUN},
}

# Every code path at toy sizes, for the tests: well under 2 minutes on 2 cores.
QUICK_CONFIG: dict = {
    "model": {"preset": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 64},
    "data": {"batch_size": 8, "block_size": 64},
    "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 3},
    "run": {"steps": 30, "eval_every": 10, "eval_batches": 2, **_LM_RUN},
    "compare": {
        "variants": ["baseline", "rope", "rope+mqa", "rope+swa", "rope+mixed"],
        "seeds": 2,
        "vocab": 320,
        "max_docs": 12,
        "window": 8,
        "local_global": "LG",
        "val_tokens": 4096,
        "calibration_factor": 2,
    },
    "mqar": {
        "seq_len": 32,
        "width": 32,
        "batch_size": 16,
        "one_layer": ["rope", "rope+swa"],
        "one_layer_steps": 60,
        "two_layers": ["rope+swa", "rope+mixed"],
        "two_layer_steps": 40,
        "eval_every": 20,
        "eval_sequences": 64,
    },
    "extrapolation": {
        "factor": 4,
        "stretches": 2,
        "pi_factors": [2, 4],
        "pi_finetune_factor": 2,
        "pi_finetune_fraction": 0.1,
    },
    "uptraining": {"fractions": [0.1]},
    "overfitting": {"variants": ["rope", "rope+mqa"], "tokens": 1024, "steps": 10, "eval_every": 5},
    "efficiency": {
        "batches": [1, 2],
        "contexts": [64, 128],
        "rounds": 2,
        "new_tokens": 4,
        "kernel_contexts": [256],
        "kernel_ratios": [4, 8],
        "kernel_rounds": 2,
    },
}

# The default at three times the steps (its calibration pair for every variant), rope+gqa added: ~1.5 h on 2 cores.
FULL_CONFIG: dict = copy.deepcopy(DEFAULT_CONFIG) | {
    "compare": {"variants": ["baseline", "rope", "rope+gqa", "rope+mqa", "rope+swa", "rope+mixed"], "calibration": []},
    "mqar": {
        "one_layer": ["rope", "baseline", "rope+gqa", "rope+mqa", "rope+swa"],
        "one_layer_steps": 2400,
        "two_layers": ["rope", "rope+swa", "rope+mixed"],
        "two_layer_steps": 3600,
    },
    "extrapolation": {"stretches": 64},
    "uptraining": {"kv_heads": [1, 2]},
    "efficiency": {"rounds": 10},
}
FULL_CONFIG["run"] = FULL_CONFIG["run"] | {"steps": 900, "eval_every": 100}

# One H100/H200 for about 5 minutes (FLOP-based estimate; check with --dry-run): 6 layers of 256, T = 1024,
# W = 64, so a window stack reaches 6 x 63 = 378 < 1024 and the reach cliff lies inside the context.
GPU_CONFIG: dict = {
    "model": {"preset": "gpt2", "n_layer": 6, "n_head": 8, "n_embd": 256, "block_size": 1024},
    "data": {"batch_size": 32, "block_size": 1024},
    "optim": {"lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 40},
    "run": {"steps": 400, "eval_every": 50, "eval_batches": 4, "device": "cuda", **_LM_RUN},
    "compare": {"window": 64, "local_global": "LLLLLG", "calibration": [], "workers": 4},
    "mqar": {
        "seq_len": 256,
        "keys": 32,
        "values": 32,
        "groups": 16,
        "window": 32,
        "width": 128,
        "heads": 8,
        "batch_size": 64,
        "one_layer": ["rope", "baseline", "rope+gqa", "rope+mqa", "rope+swa"],
        "one_layer_steps": 2000,
        "two_layer_steps": 2000,
        "eval_sequences": 1024,
    },
    "extrapolation": {"stretches": 16},
    "uptraining": {"kv_heads": [1, 2]},
    "efficiency": {
        "contexts": [1024, 4096, 16384],
        "batches": [1, 16],
        "rounds": 10,
        "new_tokens": 64,
        "kernel_contexts": [4096, 16384],
    },
}

PROFILES = {"default": DEFAULT_CONFIG, "quick": QUICK_CONFIG, "full": FULL_CONFIG, "gpu": GPU_CONFIG}
_ARCH_KEYS = ("n_layer", "n_head", "n_embd", "block_size")


@dataclass
class CompareConfig:
    train: TrainConfig  # the language models' training; run.out_dir, run.seed and model.init are set per run
    compare: CompareSection
    mqar: MqarSection
    extrapolation: ExtrapolationSection
    uptraining: UptrainingSection
    overfitting: OverfittingSection
    efficiency: EfficiencySection
    profile: str = "default"

    def __post_init__(self) -> None:
        if self.train.model.init != "scratch":
            raise ConfigError(NO_INIT)
        unknown = sorted(set(self.extrapolation.variants) - set(self.compare.variants))
        if unknown:
            raise ConfigError(f"extrapolation.variants names {unknown}, which compare.variants does not train")
        if self.uptraining.kv_heads and "rope" not in self.compare.variants:
            raise ConfigError(
                "uptraining converts the 'rope' runs: add rope to compare.variants or set uptraining.kv_heads="
            )
        heads = self.train.model.build().n_head
        if any(heads % k or k >= heads for k in self.uptraining.kv_heads):
            raise ConfigError(f"uptraining.kv_heads must divide n_head ({heads}) and be fewer than it")

    def to_dict(self) -> dict:
        import dataclasses

        out = self.train.to_dict()
        for name in EXPERIMENTS:
            out[name] = dataclasses.asdict(getattr(self, name))
        return out


NO_INIT = "compare trains every variant from paired initial weights; remove model.init"


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    profile: str = "default",
    named: dict[str, object] | None = None,
) -> CompareConfig:
    """The profile's defaults, then a TOML file, then ``--section.key=value`` overrides, then the named options
    (``{"compare.seeds": 3, "data.dir": ...}``). A file that sets ``model.preset`` drops the profile's model
    size, so the preset's own size applies."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    defaults = copy.deepcopy(PROFILES[profile])
    layers = [defaults]
    if path is not None:
        user = settings.read_toml(path)
        if isinstance(user.get("model"), dict) and "preset" in user["model"]:
            for key in _ARCH_KEYS:
                defaults["model"].pop(key)
        layers.append(user)
    layers.append(settings.parse_overrides(overrides))
    for key, value in (named or {}).items():
        if value is not None:
            section, _, name = key.partition(".")
            layers.append({section: {name: value}})
    values = settings.merge(*layers)
    if values.get("model", {}).get("init", "scratch") != "scratch":  # before the profile's model keys clash with it
        raise ConfigError(NO_INIT)
    values.setdefault("data", {}).setdefault("dir", "")
    values.setdefault("run", {})["out_dir"] = "compare"  # placeholder: every run gets its own directory
    built = settings.build(COMPARE_SECTIONS, values)
    train = TrainConfig(**{name: built.pop(name) for name in SECTIONS})
    return CompareConfig(train, **built, profile=profile)


def describe_compare_config() -> str:
    """Every experiment key with its default and help, and the default training settings, for --help."""
    lines = [settings.describe(EXPERIMENTS, DEFAULT_CONFIG)]
    lines.append(
        "\nDefault training settings of the language models (any [model]/[data]/[optim]/[run] key of "
        "`gpt2lab train --help` applies):"
    )
    for section in SECTIONS:
        lines.append(f"  [{section}] " + " ".join(f"{k}={v}" for k, v in DEFAULT_CONFIG[section].items()))
    lines.append(f"\nProfiles (--profile): {', '.join(PROFILES)}; --quick is --profile quick.")
    return "\n".join(lines)
