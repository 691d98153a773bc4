"""Model configuration: one typed dataclass, presets looked up by exact name. Needs no torch."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from gpt2lab.errors import ConfigError

POS_EMB = ("learned", "rope")


def _arch(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class GPTConfig:
    """Architecture of a GPT-2-style decoder.

    The defaults are GPT-2 124M. Variants are switched on by field and combine freely:
    ``pos_emb="rope"`` (rotary positions, no learned table), ``n_kv_head < n_head`` (grouped-query
    attention; 1 = multi-query), ``window=W`` (sliding window: query i sees keys i-W < j <= i), and
    ``window_pattern`` (a string of ``L``/``G`` repeated over the layers: local-window or global).
    """

    vocab_size: int = _arch(50257, "tokens the model predicts")
    block_size: int = _arch(1024, "longest sequence (learned positions end here; rotary models may run past it)")
    n_layer: int = _arch(12, "transformer blocks")
    n_head: int = _arch(12, "query heads per attention layer")
    n_embd: int = _arch(768, "width of the residual stream (n_head x head_dim)")
    n_kv_head: int | None = _arch(None, "key/value heads (fewer than n_head: grouped-query; 1: multi-query)")
    pos_emb: str = _arch("learned", "learned (GPT-2's position table) or rope (rotary, no table)")
    rope_theta: float = _arch(10000.0, "rotary base: pair i turns by position * rope_theta^(-2i/head_dim)")
    rope_interpolation: float = _arch(
        1.0, "rotary position interpolation: positions are multiplied by this (train length / target length)"
    )
    window: int | None = _arch(None, "sliding window of local layers: query i sees keys i - window < j <= i")
    window_pattern: str = _arch("L", "L (local window) / G (global) per layer, repeated over the layers")
    dropout: float = _arch(0.0, "dropout on embeddings, attention weights and residual branches")
    layer_norm_epsilon: float = _arch(1e-5, "LayerNorm epsilon")
    padded_vocab_size: int | None = _arch(None, "embedding rows (>= vocab_size; extra rows are never predicted)")

    def __post_init__(self) -> None:
        self._check_types()
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"pick n_head from {divisors(self.n_embd)}"
            )
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if not 1 <= self.n_kv_head <= self.n_head or self.n_head % self.n_kv_head:
            raise ConfigError(
                f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head}); "
                f"pick one of {divisors(self.n_head)} (1 = multi-query, {self.n_head} = multi-head)"
            )
        if self.pos_emb not in POS_EMB:
            raise ConfigError(f"pos_emb must be one of {POS_EMB}, got {self.pos_emb!r}")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ConfigError(f"rope needs an even head_dim (n_embd / n_head), got {self.head_dim}")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise ConfigError(f"rope_theta must be a positive number, got {self.rope_theta}")
        if not (math.isfinite(self.rope_interpolation) and 0 < self.rope_interpolation <= 1):
            raise ConfigError(
                f"rope_interpolation must be in (0, 1] (train length / target length), got {self.rope_interpolation}"
            )
        if self.rope_interpolation != 1 and self.pos_emb != "rope":
            raise ConfigError("rope_interpolation scales rotary positions; it needs pos_emb='rope'")
        if self.window is not None and self.window < 1:
            raise ConfigError(f"window must be a positive integer or None (full attention), got {self.window!r}")
        if not self.window_pattern or set(self.window_pattern) - {"L", "G"}:
            raise ConfigError(
                f"window_pattern must be a non-empty string of L (local window) and G (global) "
                f"characters, e.g. 'LLLG'; got {self.window_pattern!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not (math.isfinite(self.layer_norm_epsilon) and self.layer_norm_epsilon > 0):
            raise ConfigError(
                f"layer_norm_epsilon must be a small positive number (GPT-2: 1e-5), got {self.layer_norm_epsilon}"
            )
        if self.padded_vocab_size is None:
            self.padded_vocab_size = self.vocab_size
        if self.padded_vocab_size < self.vocab_size:
            raise ConfigError(f"padded_vocab_size ({self.padded_vocab_size}) must be >= vocab_size ({self.vocab_size})")

    def _check_types(self) -> None:
        """Every field has its declared type (values from JSON files can be anything)."""
        for name in (
            "vocab_size",
            "block_size",
            "n_layer",
            "n_head",
            "n_embd",
            "n_kv_head",
            "window",
            "padded_vocab_size",
        ):
            value = getattr(self, name)
            optional = name in ("n_kv_head", "window", "padded_vocab_size")
            if (value is None and optional) or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                continue
            raise ConfigError(f"{name} must be a positive integer{' or null' if optional else ''}, got {value!r}")
        for name in ("rope_theta", "rope_interpolation", "dropout", "layer_norm_epsilon"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name} must be a number, got {value!r}")
            setattr(self, name, float(value))
        for name in ("pos_emb", "window_pattern"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string, got {getattr(self, name)!r}")

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

    def num_params(self) -> int:
        """Parameters of the model (the tied lm_head counted once), by formula: no tensor is made."""
        C, kv = self.n_embd, self.n_kv_head * self.head_dim
        attention = C * (C + 2 * kv) + (C + 2 * kv) + C * C + C  # c_attn, c_proj (weights + biases)
        mlp = C * 4 * C + 4 * C + 4 * C * C + C
        block = attention + mlp + 4 * C  # + two LayerNorms
        positions = self.block_size * C if self.pos_emb == "learned" else 0
        return self.padded_vocab_size * C + positions + self.n_layer * block + 2 * C

    def kv_cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """K and V bytes one token adds to the cache (all layers), at the given element size."""
        return 2 * self.n_layer * self.n_kv_head * self.head_dim * bytes_per_element

    def kv_cache_bytes(self, context: int, bytes_per_element: int = 2) -> int:
        """K and V bytes of one sequence's cache at ``context`` tokens: a full-attention layer holds every
        token, a window layer at most ``window`` (its rolling cache), as ``GPT.setup_cache`` allocates."""
        per_layer_token = self.kv_cache_bytes_per_token(bytes_per_element) // self.n_layer
        slots = sum(context if w is None else min(w, context) for w in map(self.layer_window, range(self.n_layer)))
        return per_layer_token * slots

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"a model config must be a JSON object of GPTConfig fields, got {type(d).__name__}")
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


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})
