"""Model configuration: one typed dataclass, presets looked up by exact name."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

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
