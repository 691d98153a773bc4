"""The settings of ``gpt2lab compare``: which variants, how each is measured, the default training.

The training sections are ``gpt2lab train``'s, plus a ``[compare]`` section, all on the settings
engine (gpt2lab.settings). Reading, checking and describing them, as ``gpt2lab compare --help`` does,
needs no torch.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gpt2lab import settings
from gpt2lab.errors import ConfigError
from gpt2lab.settings import opt, positive
from gpt2lab.train_config import SECTIONS, TrainConfig

DEFAULT_VARIANTS = ["baseline", "rope", "gqa", "mqa", "swa", "rope+gqa+swa", "mixed"]
PARTS = ("rope", "gqa", "mqa", "swa", "mixed")


@dataclass
class CompareSection:
    """What to compare and how to measure it (the [compare] table of a config file)."""

    variants: list[str] = opt(
        DEFAULT_VARIANTS, "variants to train: baseline, or changes joined by '+': " + ", ".join(PARTS)
    )
    seeds: int = opt(2, "seeds per variant: run.seed, run.seed + 1, ... (initial weights and data order)")
    vocab: int = opt(
        4096,
        "compact vocabulary: 256 byte ids plus the (vocab - 256) most frequent training tokens, other tokens "
        "spelled as bytes (lossless), so a small model is not mostly an embedding table (0 = GPT-2's own)",
    )
    threads: int = opt(
        0,
        "torch threads on CPU (0 = torch's default, one per core). On a machine shared with other work, 1 avoids "
        "the stalls of multi-threaded kernels waiting for a descheduled thread (10x slower steps seen here)",
    )
    max_docs: int = opt(200, "documents of the offline stdlib corpus to prepare when no data.dir is given")
    window: int = opt(8, "sliding window (tokens, the current one included) of swa and mixed layers")
    local_global: str = opt("LLLG", "layer pattern of 'mixed' (L = window layer, G = global), repeated over layers")
    gqa_kv_heads: int = opt(0, "key/value heads of 'gqa' (0 = half the query heads)")
    extrapolation: list[int] = opt([1, 2, 4], "context lengths to score, as multiples of the training context")
    extrapolation_sequences: int = opt(16, "val stretches of (largest multiple x context) tokens scored")
    decode_context: int = opt(1024, "context length at which cache memory and decode speed are measured")
    decode_tokens: int = opt(128, "tokens decoded (and timed) to reach decode_context")
    recall_seeds: int = opt(1, "recall runs per variant, with the first seeds (each costs about one LM run)")
    recall_steps: int = opt(550, "training steps of each recall model")
    recall_batch_size: int = opt(16, "sequences (of data.block_size tokens) per recall training step")
    recall_lr: float = opt(3e-3, "peak learning rate of recall training (the rest of [optim] is shared)")
    recall_keys: int = opt(8, "distinct keys (and as many values) of the recall task")
    recall_pairs: int = opt(8, "key/value pairs planted per recall sequence (at most recall_keys)")
    recall_sequences: int = opt(256, "recall evaluation sequences (every position but the pairs is a query)")

    def __post_init__(self) -> None:
        positive(self, "compare", "seeds", "max_docs", "window", "extrapolation_sequences", "decode_context")
        positive(self, "compare", "decode_tokens", "recall_seeds", "recall_steps", "recall_batch_size")
        positive(self, "compare", "recall_keys", "recall_pairs", "recall_sequences")
        if self.recall_pairs > self.recall_keys:
            raise ConfigError(
                f"compare.recall_pairs ({self.recall_pairs}) exceeds compare.recall_keys ({self.recall_keys}): "
                "each planted pair needs its own key"
            )
        if self.recall_seeds > self.seeds:
            raise ConfigError(f"compare.recall_seeds ({self.recall_seeds}) exceeds compare.seeds ({self.seeds})")
        if self.vocab and not 257 <= self.vocab <= 65536:
            raise ConfigError(f"compare.vocab must be 0 (GPT-2's vocabulary) or in [257, 65536], got {self.vocab}")
        if self.threads < 0:
            raise ConfigError(f"compare.threads must be >= 0 (0 = torch's default), got {self.threads}")
        if self.gqa_kv_heads < 0:
            raise ConfigError(f"compare.gqa_kv_heads must be >= 0 (0 = half the heads), got {self.gqa_kv_heads}")
        if not self.recall_lr > 0:
            raise ConfigError(f"compare.recall_lr must be > 0, got {self.recall_lr}")
        if not self.variants:
            raise ConfigError(f"compare.variants is empty; name at least one, e.g. {','.join(DEFAULT_VARIANTS)}")
        if len(set(self.variants)) != len(self.variants):
            raise ConfigError(f"compare.variants names a variant twice: {self.variants}")
        for name in self.variants:
            variant_changes(name)  # fail on a bad name before anything runs
        if (
            not self.extrapolation
            or min(self.extrapolation) < 1
            or any(max(self.extrapolation) % f for f in self.extrapolation)
        ):
            raise ConfigError(
                f"compare.extrapolation must be positive multiples that divide the largest one, e.g. [1, 2, 4]; "
                f"got {self.extrapolation}"
            )
        if self.decode_tokens >= self.decode_context:
            raise ConfigError(
                f"compare.decode_tokens ({self.decode_tokens}) must be below compare.decode_context ({self.decode_context})"
            )


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


def variant_overrides(name: str, spec: CompareSection, n_head: int, n_layer: int) -> dict:
    """GPTConfig fields that turn the baseline into variant ``name``."""
    out: dict = {}
    for part in variant_changes(name):
        if part == "rope":
            out["pos_emb"] = "rope"
        elif part == "gqa":
            kv = spec.gqa_kv_heads or n_head // 2
            if kv < 1 or kv >= n_head or n_head % kv:
                raise ConfigError(
                    f"gqa needs key/value heads that divide n_head ({n_head}) and are fewer than it; "
                    f"set compare.gqa_kv_heads or use a model with more heads"
                )
            out["n_kv_head"] = kv
        elif part == "mqa":
            out["n_kv_head"] = 1
        elif part == "swa":
            out |= {"window": spec.window, "window_pattern": "L"}
        else:
            kinds = {spec.local_global[i % len(spec.local_global)] for i in range(n_layer)}
            if kinds != {"L", "G"}:
                raise ConfigError(
                    f"'mixed' needs both window (L) and global (G) layers, but compare.local_global="
                    f"{spec.local_global!r} over {n_layer} layers gives only {''.join(sorted(kinds))}; "
                    "use e.g. 'LG' or 'LLLG' (a pattern no longer than n_layer)"
                )
            out |= {"window": spec.window, "window_pattern": spec.local_global}
    return out


# The CPU-sized default: about 15 minutes on 2 cores. A config file is applied on top of it.
DEFAULT_CONFIG: dict = {
    "model": {"preset": "gpt2", "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64},
    "data": {"batch_size": 16, "block_size": 64},
    "optim": {"lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 6},
    "run": {"steps": 60, "eval_every": 15, "eval_batches": 8, "log_every": 5, "ckpt_every": 0, "keep_last": 1},
    "compare": {"threads": 1},
}

# A seconds-long smoke run of the whole machinery (--quick, and the tests).
QUICK_CONFIG: dict = {
    "model": {"preset": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 32},
    "data": {"batch_size": 4, "block_size": 32},
    "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2},
    "run": {"steps": 4, "eval_every": 2, "eval_batches": 2, "log_every": 1, "ckpt_every": 0, "keep_last": 1},
    "compare": {
        "vocab": 320,
        "max_docs": 12,
        "window": 8,
        "local_global": "LG",
        "extrapolation_sequences": 2,
        "decode_context": 64,
        "decode_tokens": 4,
        "recall_seeds": 2,
        "recall_steps": 3,
        "recall_batch_size": 4,
        "recall_keys": 4,
        "recall_pairs": 2,
        "recall_sequences": 8,
    },
}

_ARCH_KEYS = ("n_layer", "n_head", "n_embd", "block_size")
COMPARE_SECTIONS = {**SECTIONS, "compare": CompareSection}


@dataclass
class CompareConfig:
    train: TrainConfig  # the baseline's training; run.out_dir and run.seed are set per run
    compare: CompareSection


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    quick: bool = False,
    named: dict[str, object] | None = None,
) -> CompareConfig:
    """The defaults (or the --quick ones), then a TOML file, then ``--section.key=value`` overrides,
    then the named options (``{"compare.seeds": 3, "data.dir": ...}``). A file that sets
    ``model.preset`` drops the default model size, so the preset's own size applies."""
    defaults = copy.deepcopy(QUICK_CONFIG if quick else DEFAULT_CONFIG)
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
    values.setdefault("data", {}).setdefault("dir", "")
    values.setdefault("run", {})["out_dir"] = "compare"  # placeholder: every run gets its own directory
    built = settings.build(COMPARE_SECTIONS, values)
    compare = built.pop("compare")
    return CompareConfig(TrainConfig(**built), compare)


def describe_compare_config() -> str:
    """The [compare] keys with defaults and help, and the default training settings, for --help."""
    lines = [settings.describe({"compare": CompareSection})]
    lines.append(
        "\nDefault training settings (any [model]/[data]/[optim]/[run] key of `gpt2lab train --help` applies):"
    )
    for section, values in DEFAULT_CONFIG.items():
        if section != "compare":
            lines.append(f"  [{section}] " + " ".join(f"{k}={v}" for k, v in values.items()))
    return "\n".join(lines)
