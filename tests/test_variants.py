"""Variants (RoPE, GQA/MQA, sliding windows) against a naive float64 reference, their invariants, the KV
cache for every combination, and config validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gpt2lab import GPTConfig
from gpt2lab.errors import ConfigError
from gpt2lab.rope import apply_rotary, inv_frequencies, rope_tables

pytestmark = pytest.mark.usefixtures("one_thread")

# --- a naive reference written from the definitions, not from the model code ------------------------


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _rope_reference(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate channel pairs (i, i + d/2) of x (B, T, n, d) by positions * theta**(-2i/d) (rotate-half).

    The angles are computed in float32, as transformers' LlamaRotaryEmbedding does; the rotation in x's dtype."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angles = positions.float()[None, :, None, None] * inv_freq  # (1, T, 1, d/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _naive_attention(q, k, v, n_head: int, n_kv_head: int, window: int | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v per query head; q (B, T, nh, d), k/v (B, T, nkv, d) -> (B, T, nh, d).
    Query head h reads kv head h // (n_head // n_kv_head); query i sees keys j with i - W < j <= i."""
    B, T, _, d = q.shape
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (j > i - window)
    out = torch.empty_like(q)
    for h in range(n_head):
        kv = h // (n_head // n_kv_head)
        scores = q[:, :, h] @ k[:, :, kv].transpose(1, 2) / math.sqrt(d)  # (B, T, T)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[:, :, h] = scores.softmax(-1) @ v[:, :, kv]
    return out


def naive_forward(model, idx: torch.Tensor) -> torch.Tensor:
    """The whole forward pass in float64 from the model's parameters: logits (B, T, vocab_size)."""
    cfg = model.config
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    B, T = idx.shape
    C, nh, nkv = cfg.n_embd, cfg.n_head, cfg.n_kv_head
    d = C // nh
    x = sd["wte.weight"][idx]
    if cfg.pos_emb == "learned":
        x = x + sd["wpe.weight"][:T]
    for layer in range(cfg.n_layer):
        p = {k.removeprefix(f"h.{layer}."): v for k, v in sd.items() if k.startswith(f"h.{layer}.")}
        h = _layer_norm(x, p["ln_1.weight"], p["ln_1.bias"], 1e-5)
        qkv = h @ p["attn.c_attn.weight"].T + p["attn.c_attn.bias"]
        q = qkv[..., :C].reshape(B, T, nh, d)
        k = qkv[..., C : C + nkv * d].reshape(B, T, nkv, d)
        v = qkv[..., C + nkv * d :].reshape(B, T, nkv, d)
        if cfg.pos_emb == "rope":
            q, k = (
                _rope_reference(q, torch.arange(T), cfg.rope_theta),
                _rope_reference(k, torch.arange(T), cfg.rope_theta),
            )
        local = cfg.window is not None and cfg.window_pattern[layer % len(cfg.window_pattern)] == "L"
        y = _naive_attention(q, k, v, nh, nkv, cfg.window if local else None).reshape(B, T, C)
        x = x + y @ p["attn.c_proj.weight"].T + p["attn.c_proj.bias"]
        h = _layer_norm(x, p["ln_2.weight"], p["ln_2.bias"], 1e-5)
        x = x + _gelu_tanh(h @ p["mlp.c_fc.weight"].T + p["mlp.c_fc.bias"]) @ p["mlp.c_proj.weight"].T
        x = x + p["mlp.c_proj.bias"]
    x = _layer_norm(x, sd["ln_f.weight"], sd["ln_f.bias"], 1e-5)
    return x @ sd["wte.weight"][: cfg.vocab_size].T


POS = {"learned": dict(), "rope": dict(pos_emb="rope", rope_theta=300.0)}
ATTN = {"mha": dict(), "gqa": dict(n_kv_head=2), "mqa": dict(n_kv_head=1)}
WINDOW = {"full": dict(), "window4": dict(window=4), "mixedLG": dict(window=4, window_pattern="LG")}
COMBOS = [(p, a, w) for p in POS for a in ATTN for w in WINDOW]


def _combo(pos: str, attn: str, window: str) -> dict:
    return POS[pos] | ATTN[attn] | WINDOW[window]


def _tokens(T: int, B: int = 2, seed: int = 0, vocab: int = 97) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pos, attn, window", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_forward_matches_naive_float64_reference(make_gpt, pos, attn, window):
    """In float64, the model's full forward equals the naive reference (explicit masks, per-head loops)."""
    model = make_gpt(seed=1, **_combo(pos, attn, window)).double()
    idx = _tokens(13)
    with torch.no_grad():
        logits, _ = model(idx)
    ref = naive_forward(model, idx)
    assert ref.std() > 0.5
    torch.testing.assert_close(logits, ref, atol=1e-9, rtol=0)


# --- invariants of each variant --------------------------------------------------------------------


def _expand_kv(sd: dict, config: GPTConfig, repeat_interleave: bool = True) -> dict:
    """A GQA state dict as an equivalent multi-head one: each kv head's k/v rows copied to its query heads."""
    C, d, nkv, group = config.n_embd, config.head_dim, config.n_kv_head, config.n_head // config.n_kv_head
    out = dict(sd)
    for key in [k for k in sd if k.endswith("attn.c_attn.weight") or k.endswith("attn.c_attn.bias")]:
        q, k, v = sd[key].split([C, nkv * d, nkv * d], dim=0)

        def expand(t):
            t = t.reshape(nkv, d, *t.shape[1:])
            t = t.repeat_interleave(group, dim=0) if repeat_interleave else t.repeat(group, *[1] * (t.ndim - 1))
            return t.reshape(C, *t.shape[2:])

        out[key] = torch.cat([q, expand(k), expand(v)], dim=0)
    return out


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_gqa_equals_mha_with_shared_kv_heads(make_gpt, pos, n_kv_head):
    """GQA/MQA equals multi-head attention whose query head h reads a copy of kv head h // (n_head // n_kv_head);
    n_kv_head = n_head is plain multi-head attention."""
    gqa = make_gpt(seed=3, n_kv_head=n_kv_head, **POS[pos])
    mha = make_gpt(seed=0, **POS[pos])
    mha.load_state_dict(_expand_kv(gqa.state_dict(), gqa.config))
    idx = _tokens(12)
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx)[0], mha(idx)[0], atol=1e-5, rtol=0)
        if n_kv_head == 2:  # `repeat` (kv head h % n_kv_head) is the wrong mapping and must not match
            mha.load_state_dict(_expand_kv(gqa.state_dict(), gqa.config, repeat_interleave=False))
            assert (gqa(idx)[0] - mha(idx)[0]).abs().max() > 1e-2


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_window_at_least_t_equals_full_causal(make_gpt, pos):
    """A window covering the whole sequence (W >= T) is plain causal attention; W = T - 1 is not."""
    T = 12
    full = make_gpt(seed=4, **POS[pos])
    idx = _tokens(T)
    with torch.no_grad():
        ref = full(idx)[0]
        for window, same in [(T, True), (T + 5, True), (T - 1, False)]:
            windowed = make_gpt(seed=0, window=window, **POS[pos])
            windowed.load_state_dict(full.state_dict())
            diff = (windowed(idx)[0] - ref).abs().max().item()
            assert diff < 1e-5 if same else diff > 1e-3, (window, diff)


@pytest.mark.parametrize("shift", [1, 7, 100])
def test_rope_scores_depend_only_on_relative_position(shift):
    """q.k after RoPE is unchanged when every position is shifted by the same amount."""
    g = torch.Generator().manual_seed(shift)
    q, k = torch.randn(2, 4, 10, 16, generator=g), torch.randn(2, 4, 10, 16, generator=g)
    inv_freq = inv_frequencies(16, 10000.0)

    def scores(start):
        cos, sin = rope_tables(torch.arange(start, start + 10), inv_freq)
        return apply_rotary(q, cos, sin) @ apply_rotary(k, cos, sin).transpose(-1, -2)

    torch.testing.assert_close(scores(shift), scores(0), atol=1e-4, rtol=1e-5)
    assert (scores(0) - q @ k.transpose(-1, -2)).abs().max() > 1e-1  # the rotation does something


@pytest.mark.parametrize("window", ["full", "window4", "mixedLG"])
def test_rope_model_is_translation_invariant(make_gpt, window):
    """End to end: a rope model run at positions 9..20 (through the KV cache) gives the logits of positions
    0..11 - it has no absolute position information."""
    model = make_gpt(seed=5, pos_emb="rope", n_kv_head=2, **WINDOW[window])
    idx, shift = _tokens(12), 9
    with torch.no_grad():
        ref = model(idx)[0]
        model.setup_cache(2, shift + 12)
        shifted = model(idx, input_pos=torch.arange(shift, shift + 12))[0]
    model.clear_cache()
    torch.testing.assert_close(shifted, ref, atol=1e-5, rtol=0)


def test_rope_tables_stay_float32_in_a_half_precision_model(make_gpt):
    """A model moved to bfloat16 keeps float32 rotary tables, as the tables it builds when a call runs
    past them are: the same tokens give the same logits before and after the tables grow."""
    model = make_gpt(seed=2, pos_emb="rope", block_size=16).to(torch.bfloat16)
    assert (model.rotary.cos.dtype, model.rotary.sin.dtype) == (torch.float32, torch.float32)
    idx = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(idx)[0]
        model(torch.randint(0, 97, (1, 17)))  # past the tables: they grow
        assert model.rotary.cos.shape[0] == 17
        assert torch.equal(model(idx)[0], before)


def test_rope_matches_transformers_llama(make_gpt):
    """Our rotary tables and rotation equal transformers' LlamaRotaryEmbedding + apply_rotary_pos_emb on the
    same q/k, for per-row position offsets and a non-default rope_theta."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    model = make_gpt(pos_emb="rope", rope_theta=300.0, n_embd=64, n_head=4, block_size=64)
    d = model.config.head_dim
    hf_rope = LlamaRotaryEmbedding(
        config=LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=d, rope_theta=300.0)
    )
    torch.testing.assert_close(inv_frequencies(d, 300.0), hf_rope.inv_freq, atol=0, rtol=0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 9, d, generator=g), torch.randn(2, 2, 9, d, generator=g)
    pos = torch.stack([torch.arange(9), torch.arange(30, 39)])  # (B, T)
    hf_cos, hf_sin = hf_rope(q, pos)  # (B, T, d)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    cos, sin = model.rotary(pos)  # (B, 1, T, d)
    torch.testing.assert_close(cos[:, 0], hf_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[:, 0], hf_sin, atol=1e-6, rtol=0)
    torch.testing.assert_close(apply_rotary(q, cos, sin), hf_q, atol=1e-6, rtol=0)
    torch.testing.assert_close(apply_rotary(k, cos, sin), hf_k, atol=1e-6, rtol=0)


# --- the KV cache, for every combination ------------------------------------------------------------


def _cached_logits(model, idx: torch.Tensor, chunks: list[int], pad: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of idx fed through the KV cache in consecutive chunks (a prefill, then decode steps)."""
    B, T = idx.shape
    assert sum(chunks) == T
    model.setup_cache(B, T, pad=pad)
    out, t = [], 0
    with torch.no_grad():
        for n in chunks:
            out.append(model(idx[:, t : t + n], input_pos=torch.arange(t, t + n))[0])
            t += n
    model.clear_cache()
    return torch.cat(out, dim=1)


SCHEDULES = {
    "prompt7": [7] + [1] * 13,  # a prompt longer than the window, then decode
    "prompt1": [1] * 20,  # decode from a one-token prompt
    "chunked": [6, 5] + [1] * 9,  # a second multi-token chunk into a cache that already rolled
}


@pytest.mark.parametrize("pos, attn, window", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_kv_cache_decode_equals_full_forward(make_gpt, pos, attn, window):
    """For every {learned, rope} x {MHA, GQA, MQA} x {full, window 4, pattern LG}: logits through the KV cache
    (20 tokens = 5 windows) equal the full forward at every position, for several prefill/decode schedules
    and for a left-padded row next to an unpadded one."""
    model = make_gpt(seed=6, **_combo(pos, attn, window))
    idx = _tokens(20, seed=1)
    with torch.no_grad():
        full = model(idx)[0]
        short = model(idx[:1, :17])[0]
    for name, chunks in SCHEDULES.items():
        cached = _cached_logits(model, idx, chunks)
        torch.testing.assert_close(cached, full, atol=1e-5, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
    padded = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), idx[:1, :17]], dim=1), idx[1:]])
    cached = _cached_logits(model, padded, SCHEDULES["prompt7"], pad=torch.tensor([3, 0]))
    torch.testing.assert_close(cached[:1, 3:], short, atol=1e-5, rtol=0)
    torch.testing.assert_close(cached[1:], full[1:], atol=1e-5, rtol=0)


# --- sliding-window semantics end to end -----------------------------------------------------------


@pytest.mark.parametrize("pos, attn", [("learned", "mha"), ("rope", "gqa"), ("rope", "mqa")])
def test_sliding_window_receptive_field(make_gpt, pos, attn):
    """One layer with window W = 4: changing token j changes the logits of positions j..j+W-1 and no others
    (so a token W or more positions before the last one cannot affect the last position's logits)."""
    W, T = 4, 16
    model = make_gpt(seed=7, n_layer=1, window=W, **POS[pos], **ATTN[attn])
    idx = _tokens(T, B=1, seed=2)
    with torch.no_grad():
        ref = model(idx)[0][0]
        for j in [0, 5, T - 1 - W, T - W, T - 1]:
            changed = idx.clone()
            changed[0, j] = (idx[0, j] + 1) % 97
            diff = (model(changed)[0][0] - ref).abs().amax(-1)  # (T,)
            inside = (torch.arange(T) >= j) & (torch.arange(T) < j + W)
            assert diff[inside].min() > 1e-3, (j, diff)
            assert diff[~inside].max() < 1e-6, (j, diff)


# --- config validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n_embd=66, n_head=4), "n_embd"),
        (dict(n_kv_head=3), "n_kv_head"),
        (dict(n_kv_head=8), "n_kv_head"),
        (dict(n_kv_head=0), "n_kv_head"),
        (dict(window=0), "window"),
        (dict(window=-2), "window"),
        (dict(window=2.5), "window"),
        (dict(window=4, window_pattern="LXG"), "window_pattern"),
        (dict(window=4, window_pattern=""), "window_pattern"),
        (dict(window=4, window_pattern="lg"), "window_pattern"),
        (dict(pos_emb="alibi"), "pos_emb"),
        (dict(pos_emb="rope", n_embd=36, n_head=4), "head_dim"),
        (dict(pos_emb="rope", rope_theta=0.0), "rope_theta"),
        (dict(n_head=0), "n_head"),
    ],
)
def test_bad_config_raises_config_error(kwargs, field):
    """Impossible settings raise ConfigError with a message naming the field to change."""
    with pytest.raises(ConfigError, match=field):
        GPTConfig(**(dict(n_layer=2, n_head=4, n_embd=32) | kwargs))


def test_position_interpolation_scales_the_rotary_angles(make_gpt):
    """rope_interpolation = s makes position p look like position p * s: a model with s = 1/2 on a
    sequence of 2T tokens gives each token the angles of plain RoPE at half its position, and its
    cached decode equals its full forward."""
    plain = make_gpt(seed=3, pos_emb="rope", block_size=16)
    half = make_gpt(seed=3, pos_emb="rope", block_size=16, rope_interpolation=0.5)
    positions = torch.arange(32)
    plain.rotary.build(32), half.rotary.build(32)
    torch.testing.assert_close(half.rotary(positions[None])[0][0, 0, 2], plain.rotary(positions[None])[0][0, 0, 1])
    idx = torch.randint(0, 97, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = half(idx)[0]
        half.setup_cache(1, 32)
        half(idx[:, :20], input_pos=torch.arange(20))
        steps = [half(idx[:, t : t + 1], input_pos=torch.tensor([t]))[0][:, -1] for t in range(20, 32)]
        half.clear_cache()
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 20:], atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="needs pos_emb='rope'"):
        GPTConfig(rope_interpolation=0.5)
    with pytest.raises(ConfigError, match=r"in \(0, 1\]"):
        GPTConfig(pos_emb="rope", rope_interpolation=2.0)


@pytest.mark.parametrize("kernel", ["products", "sdpa", "reduction", "avx2"])
@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("hs", [16, 20])
def test_one_query_attention_equals_sdpa(n_kv_head, masked, hs, kernel):
    """A decode step's attention, by any kernel (three small products with grouped heads as blocks of
    rows, SDPA's own, sums for a compiler, gpt2lab's own C++ one), equals SDPA with enable_gqa, with and
    without a per-row boolean mask, whether or not 1/sqrt(head_dim) is exact or the head size a whole
    number of 8-float vectors."""
    from gpt2lab import native
    from gpt2lab.ops import one_query_attention

    if kernel == "avx2" and not native.available():
        pytest.skip(f"gpt2lab's kernels: {native.unavailable_reason()}")

    g = torch.Generator().manual_seed(n_kv_head)
    q = torch.randn(3, 4, 1, hs, generator=g)
    k, v = torch.randn(3, n_kv_head, 9, hs, generator=g), torch.randn(3, n_kv_head, 9, hs, generator=g)
    mask = (torch.rand(3, 1, 1, 9, generator=g) > 0.4) | (torch.arange(9) == 8) if masked else None
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=n_kv_head != 4)
    got = one_query_attention(q, k, v, mask, n_kv_head != 4, kernel)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def test_dropout_applies_in_training_only(make_gpt):
    """Dropout (after the embeddings and each residual branch) draws new masks in training; in eval its
    modules are not even called (each call costs a decode step time), and the logits are deterministic."""
    model = make_gpt(dropout=0.5)
    calls = []
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.register_forward_hook(lambda *args: calls.append(1))
    idx = torch.randint(0, 97, (2, 8))
    logits, _ = model(idx)
    torch.testing.assert_close(model(idx)[0], logits, rtol=0, atol=0)
    assert not calls
    model.train()
    first, second = model(idx)[0], model(idx)[0]
    assert len(calls) == 2 * (2 * model.config.n_layer + 1)
    assert not torch.allclose(first, second) and not torch.allclose(first, logits)
