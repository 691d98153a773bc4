"""Generation: greedy parity with transformers, KV-cache decoding, batching, samplers, stopping, limits."""

from __future__ import annotations

import copy
import itertools
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gpt2lab.model
from gpt2lab import Backends, GPT2LabError, generate, generation, kernels, ops, stream
from gpt2lab.decode import prefill
from gpt2lab.generation import greedy, next_token_probs, sample
from gpt2lab.load import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = [5, 17, 99, 3, 250, 42, 7, 311]
SHORT = [5, 17, 3]  # within the 97-token vocabulary of the tiny models


def _hf_greedy(hf_model, prompt: list[int], n: int, pad_token_id: int) -> list[int]:
    out = hf_model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=pad_token_id,
    )
    return out[0, len(prompt) :].tolist()


def test_greedy_matches_transformers_small(hf_small):
    """40 greedy tokens from a small random model equal GPT2LMHeadModel.generate(do_sample=False)."""
    model = load_model(hf_small.safetensors_dir)
    ours = generate(model, [PROMPT], 40, temperature=0, eos_id=None)[0]
    assert len(ours) == 40
    assert len(set(ours)) > 5, "a degenerate (repeating) continuation would prove little"
    assert ours == _hf_greedy(hf_small.model, PROMPT, 40, pad_token_id=0)


@pytest.mark.slow
def test_greedy_matches_transformers_124m(hf_124m):
    """10 greedy tokens of random-weight GPT-2 124M after "The dog" equal transformers' generate."""
    model = load_model(hf_124m.safetensors_dir)
    prompt = [464, 3290]
    ours = generate(model, [prompt], 10, temperature=0)[0]
    assert ours == _hf_greedy(hf_124m.model, prompt, 10, pad_token_id=50256)


@pytest.mark.parametrize("B", [1, 2])
def test_kv_cache_decoding_equals_full_forward(hf_small, B):
    """Prefilling 7 tokens then decoding one token at a time through the KV cache reproduces the logits
    of one full forward pass at every position (1e-5)."""
    model = load_model(hf_small.safetensors_dir).eval()
    T, P = 40, 7
    idx = torch.randint(0, 500, (B, T), generator=torch.Generator().manual_seed(B))
    with torch.no_grad():
        full, _ = model(idx)
        model.setup_cache(B, T)
        steps = [model(idx[:, :P], input_pos=torch.arange(P))[0]]
        for t in range(P, T):
            steps.append(model(idx[:, t : t + 1], input_pos=torch.tensor([t]))[0])
    model.clear_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("B", [1, 3])
def test_prefill_logits_equal_the_full_forwards_last_row(make_gpt, B):
    """Prefill computes the lm_head for the last prompt position only; those logits equal the last row of
    a full forward, and next_token_probs (which does the same) ranks as the full forward's softmax."""
    model = make_gpt(seed=5)
    idx = torch.randint(0, 97, (B, 11), generator=torch.Generator().manual_seed(B))
    with torch.no_grad():
        full, _ = model(idx)
        model.setup_cache(B, 16)
        last = prefill(model, idx, torch.arange(11))
    model.clear_cache()
    assert last.shape == (B, 97)
    torch.testing.assert_close(last, full[:, -1], atol=1e-5, rtol=0)
    [(token, prob), *_] = next_token_probs(model, idx[0].tolist(), 3)
    assert token == int(full[0, -1].argmax())
    assert prob == pytest.approx(float(full[0, -1].softmax(-1).max()), abs=1e-6)


BATCH_PROMPTS = [[11, 3, 58], [7, 80, 2, 44, 19, 61, 5, 33, 90], [42], [60, 1, 22, 71, 8, 13]]


@pytest.mark.parametrize(
    "variant",
    [dict(), dict(pos_emb="rope", n_kv_head=2, window=4, window_pattern="LG")],
    ids=["gpt2", "rope-gqa-window"],
)
def test_batched_left_padded_generation_equals_per_prompt(make_gpt, variant):
    """Prompts of lengths 3, 9, 1 and 6 generated as one left-padded batch give each prompt's own greedy
    continuation (positions, masks and rolling window caches honour the padding)."""
    model = make_gpt(seed=2, **variant)
    batched = generate(model, BATCH_PROMPTS, 12, temperature=0, eos_id=None)
    single = [generate(model, [p], 12, temperature=0, eos_id=None)[0] for p in BATCH_PROMPTS]
    assert batched == single
    assert len({tuple(row) for row in single}) == len(single)


def test_same_seed_same_tokens(make_gpt):
    """Sampling with a seed is reproducible, and another seed gives another sample."""
    model = make_gpt(seed=4, std=0.05)  # flat-ish distribution: many tokens are plausible
    a = generate(model, [SHORT], 20, temperature=1.0, seed=123, eos_id=None)
    b = generate(model, [SHORT], 20, temperature=1.0, seed=123, eos_id=None)
    c = generate(model, [SHORT], 20, temperature=1.0, seed=124, eos_id=None)
    assert a == b
    assert a != c


def test_top_k_1_is_greedy(make_gpt):
    """top_k=1 samples the argmax at every step, whatever the temperature and seed."""
    model = make_gpt(seed=4, std=0.05)
    greedy = generate(model, BATCH_PROMPTS, 15, temperature=0, eos_id=None)
    assert generate(model, BATCH_PROMPTS, 15, temperature=1.5, top_k=1, seed=9, eos_id=None) == greedy


def _support(logits: list[float], n: int = 4000, **kwargs) -> tuple[set[int], torch.Tensor]:
    """The set of tokens sample() draws from a fixed logits vector over n draws, and their frequencies."""
    rows = torch.tensor(logits).log().expand(n, -1) if kwargs.pop("probs", False) else torch.tensor(logits)
    rows = rows.expand(n, -1).clone()
    tokens = sample(rows, generator=torch.Generator().manual_seed(0), **kwargs)
    return set(tokens.tolist()), torch.bincount(tokens, minlength=rows.shape[1]).float() / n


@pytest.mark.parametrize(
    "k, expected",
    [(1, {1}), (2, {1, 3}), (3, {1, 2, 3}), (5, {1, 2, 3, 4, 5}), (8, set(range(8)))],
)
def test_top_k_keeps_exactly_k_tokens(k, expected):
    """Top-k samples from exactly the k best tokens; ties at the cut go to the lower token ids."""
    logits = [1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.5, -1.0]
    support, _ = _support(logits, top_k=k)
    assert support == expected


def test_top_k_ties_are_cut_reproducibly():
    """With 334 tokens tied for best in a 1000-token vocabulary, top_k=5 keeps the 5 lowest ids among them."""
    logits = [1.0 if i % 3 == 0 else 0.0 for i in range(1000)]
    support, _ = _support(logits, top_k=5)
    assert support == {0, 3, 6, 9, 12}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_greedy_is_torchs_argmax_ties_and_nans_included(dtype):
    """Greedy picks (numpy's argmax for float32 on the CPU) are torch's argmax: the first of tied
    largest, the first NaN above any number, int64, also for rows that are views with gaps between them."""
    torch.manual_seed(0)
    logits = torch.randn(6, 2, 50257).to(dtype)[:, -1]  # each row a view into a larger tensor
    logits[0, [7, 9000, 30000]] = 50.0  # tied largest: the first
    logits[1, [100, 200]] = float("nan")  # NaNs: the first, above a larger number
    logits[1, 300] = float("inf")
    logits[2] = float("-inf")  # nothing above -inf: index 0
    logits[3, -1] = 60.0  # the last token
    picked = greedy(logits)
    assert picked.dtype == torch.int64 and picked.shape == (6,)
    assert picked.tolist() == logits.argmax(-1).tolist()
    assert picked[:4].tolist() == [7, 100, 0, 50256]
    assert sample(logits, temperature=0).tolist() == picked.tolist()


@pytest.mark.parametrize(
    "p, expected",
    [
        (0.45, {1}),
        (0.75, {1, 3}),
        (0.85, {1, 2, 3}),
        (0.92, {0, 1, 2, 3}),
        (0.97, {0, 1, 2, 3, 4}),
        (1.0, set(range(5))),
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    """Top-p samples from the smallest set of most likely tokens whose probability reaches p."""
    support, _ = _support([0.05, 0.5, 0.1, 0.3, 0.05], probs=True, top_p=p)
    assert support == expected


def test_top_p_renormalises_and_follows_temperature():
    """Within the top-p set tokens keep their relative probabilities; temperature is applied before the cut."""
    probs = [0.05, 0.5, 0.1, 0.3, 0.05]
    _, freq = _support(probs, n=20000, probs=True, top_p=0.85)
    torch.testing.assert_close(freq, torch.tensor([0, 0.5, 0.1, 0.3, 0]) / 0.9, atol=0.02, rtol=0)
    # temperature 2 flattens the distribution to ~[.11, .35, .16, .27, .11], so 0.7 needs three tokens
    support, _ = _support(probs, probs=True, top_p=0.7, temperature=2.0)
    assert support == {1, 2, 3}


def test_top_p_1_keeps_every_token_even_where_float32_sums_reach_1_early(monkeypatch):
    """With one token at probability ~1 the float32 running sum is 1.0 from the first token on; top_p=1
    still leaves every token a probability above 0, as no top-p at all does."""
    drawn_from = []
    draw = generation.draw
    monkeypatch.setattr(generation, "draw", lambda probs, *a: drawn_from.append(probs) or draw(probs, *a))
    logits = torch.full((1, 1000), -15.0)
    logits[0, 0] = 15.0
    sample(logits, top_p=1.0)
    assert (drawn_from[0] > 0).all()


def _stable_sort_cut(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """The tokens top-k, then top-p keep, by the definition: each row sorted whole, stably (ties: the
    lower ids first), the first k kept, then a token while the probability before it is below p."""
    kept = logits.clone()
    for row in kept:
        order = row.sort(descending=True, stable=True).indices
        if top_k is not None:
            row[order[top_k:]] = float("-inf")
        if top_p is not None:
            ordered = row.softmax(dim=0)[order]
            row[order[ordered.cumsum(dim=0) - ordered >= top_p]] = float("-inf")
    return kept


@pytest.mark.parametrize("spread", [0.5, 8.0], ids=["flat", "peaked"])
def test_top_k_and_top_p_keep_what_a_stable_sort_of_the_whole_row_keeps(spread):
    """Without sorting the whole vocabulary, top-k and top-p keep the very tokens (and logits) the
    definition keeps, with many ties at every cut, in rows whose nucleus lies within the tokens top-p
    orders first (peaked) and beyond them (flat); and so does top-p sorting all rows whole at once,
    as it does off the CPU."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randint(0, 400, (3, 5000), generator=g).float() * spread / 100).neg_()  # ~12 tokens a value
    for k in (1, 7, 50, 1024, 4999):
        assert torch.equal(generation._top_k(logits, k), _stable_sort_cut(logits, top_k=k))
    for p, whole in itertools.product((0.01, 0.3, 0.9, 0.999), (False, True)):  # whole: as on a GPU
        assert torch.equal(generation._top_p(logits, p, whole), _stable_sort_cut(logits, top_p=p))
        cut = generation._top_k(logits, 2000)
        assert torch.equal(generation._top_p(cut, p, whole), _stable_sort_cut(logits, top_k=2000, top_p=p))


def test_descending_order_is_that_of_a_stable_sort_for_every_kind_of_float32_value():
    """The order top-p reads its nucleus in is a stable descending sort's, on rows of every sign and
    magnitude, long enough to be ordered by their integer keys (a position takes 16 and 17 bits): ties
    (in position order), -inf and inf, -0.0 with 0.0 (equal), subnormals."""
    assert generation.RADIX_SORTED <= 40000
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-45, -1e-45, 3e38, -3e38, 1.0, -1.0])
    rows = [
        special[torch.randint(0, len(special), (3, 40000), generator=g)],
        torch.randn(2, 70000, generator=g) * torch.logspace(-40, 38, 70000).sqrt(),  # every exponent, both signs
        torch.randint(-5, 5, (2, 70000), generator=g).float() / 4,  # thousands of ties at each value
    ]
    for logits in rows:
        expected = logits.sort(dim=-1, descending=True, stable=True).indices
        assert torch.equal(generation._descending_order(logits), expected)


def test_draw_picks_each_token_with_its_probability_never_one_of_probability_0(monkeypatch):
    """Each row's tokens are drawn in proportion to their probabilities, those of probability 0 never,
    not even where the uniform draw times the row's total rounds up to the total; a NaN row raises."""
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.0, 0.3, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]]).repeat(10000, 1)
    tokens = generation.draw(probs, torch.Generator().manual_seed(0)).view(-1, 2)
    freq = torch.bincount(tokens[:, 0], minlength=6).float() / len(tokens)
    torch.testing.assert_close(freq, torch.tensor([0.2, 0, 0.5, 0, 0.3, 0]), atol=0.015, rtol=0)
    assert (tokens[:, 1] == 1).all()
    rand = torch.rand
    for u, want in ((1.0, [4, 1]), (0.0, [0, 1])):  # the ends of the draw's range, and a rounded-up end
        monkeypatch.setattr(torch, "rand", lambda *a, u=u, **k: rand(*a, **k).fill_(u))
        assert generation.draw(probs[:2]).tolist() == want
    monkeypatch.setattr(torch, "rand", rand)
    with pytest.raises(GPT2LabError, match="NaN"):
        generation.draw(torch.tensor([[0.5, float("nan")]]))


@pytest.mark.parametrize("temperature", [1e-30, 1e-40, 1e-300, 5e-324])
def test_a_tiny_temperature_is_greedy_not_nan(make_gpt, temperature):
    """A temperature so small that logits / temperature overflows float32 samples the argmax, its limit."""
    model = make_gpt()
    greedy = generate(model, BATCH_PROMPTS, 6, temperature=0, eos_id=None)
    assert generate(model, BATCH_PROMPTS, 6, temperature=temperature, seed=0, eos_id=None) == greedy


def test_eos_stops_a_row(make_gpt):
    """A row stops at eos_id (its output ends with it), while other rows of the batch run to the end;
    a stream gives a finished row eos_id at every step after."""
    model = make_gpt(seed=2)
    first = generate(model, [SHORT], 5, temperature=0, eos_id=None)[0][0]
    assert generate(model, [SHORT], 10, temperature=0, eos_id=first) == [[first]]
    assert len(list(stream(model, [SHORT], 10, temperature=0, eos_id=first))) == 1  # no decode step after it
    other = [9, 9, 4]
    free = generate(model, [other], 10, temperature=0, eos_id=None)[0]
    assert first not in free, "pick another second prompt: it must not produce the eos token"
    assert generate(model, [SHORT, other], 10, temperature=0, eos_id=first) == [[first], free]
    steps = [token.tolist() for token in stream(model, [SHORT, other], 10, temperature=0, eos_id=first)]
    assert steps == [[first, tok] for tok in free]


def test_context_limit_of_learned_positions(make_gpt):
    """Learned positions: the model reads the prompt and every new token but the last, which must fit in
    block_size (as transformers allows: a prompt that fills the context still gets its next token)."""
    model = make_gpt(block_size=16)
    assert len(generate(model, [[1] * 6], 11, temperature=0, eos_id=None)[0]) == 11
    assert len(generate(model, [[1] * 16], 1, temperature=0, eos_id=None)[0]) == 1
    with pytest.raises(GPT2LabError, match="needs 17 positions .* exceeds the context of 16"):
        generate(model, [[1] * 6], 12, temperature=0)
    with pytest.raises(GPT2LabError, match="exceeds the context"):
        generate(model, [[1] * 17], 0, temperature=0)


def test_rope_generates_past_block_size(make_gpt):
    """Rotary models have no position table, so generation may run past block_size; each greedy token is
    still the argmax of a full forward pass over the sequence so far."""
    model = make_gpt(seed=6, block_size=8, pos_emb="rope")
    prompt = [3, 1, 4, 1, 5, 9]
    new = generate(model, [prompt], 10, temperature=0, eos_id=None)[0]
    with torch.no_grad():
        logits, _ = model(torch.tensor([prompt + new]))
    assert new == logits[0, len(prompt) - 1 : -1].argmax(-1).tolist()


@pytest.mark.parametrize("prompts", [[[]], [], [[1, 2], []]], ids=["empty", "no-prompts", "one-empty"])
def test_empty_prompt_raises(make_gpt, prompts):
    """An empty prompt (or no prompt at all) is an input error, not a crash."""
    with pytest.raises(GPT2LabError, match="empty"):
        generate(make_gpt(), prompts, 5)


@pytest.mark.parametrize(
    "prompts, phrase",
    [
        ([5, 17, 3], "for one prompt of ids pass \\[ids\\]"),
        ("hello", "not text"),
        (["hello"], "not text"),
        (torch.tensor([5, 17]), "for one prompt of ids use ids\\[None\\]"),
        (torch.tensor([[0.5, 1.0]]), "integer ids"),
        ([[5, 97]], "the prompt holds 97, not a token id of this model \\(integers 0 to 96\\)"),
        ([[5], [-1]], "prompt 1 holds -1"),
        ([[5, 1.0]], "holds 1.0"),
        ([[True]], "holds True"),
        (None, "got NoneType"),
        (5, "got int"),
        ((p for p in [[1, 2]]), "got generator"),
    ],
    ids=[
        "flat",
        "text",
        "list-of-text",
        "1d-tensor",
        "float-tensor",
        "past-vocab",
        "negative",
        "float",
        "bool",
        "none",
        "int",
        "generator",
    ],  # fmt: skip
)
def test_bad_prompts_raise_saying_what_to_pass(make_gpt, prompts, phrase):
    """Prompts that are not token-id rows of this model raise before the model runs (an id past the
    vocabulary would otherwise be an IndexError from the embedding)."""
    with pytest.raises(GPT2LabError, match=phrase):
        generate(make_gpt(), prompts, 3)


def test_prompts_as_tensors_arrays_and_tuples_decode_as_lists(make_gpt):
    """A (batch, tokens) tensor, rows that are 1-D tensors, NumPy arrays or tuples: the lists' tokens."""
    import numpy as np

    model = make_gpt(seed=2)
    expected = generate(model, [SHORT, SHORT[:2]], 4, temperature=0, eos_id=None)
    for prompts in ([torch.tensor(SHORT), np.array(SHORT[:2])], [tuple(SHORT), list(np.array(SHORT[:2]))]):
        assert generate(model, prompts, 4, temperature=0, eos_id=None) == expected
    batch = torch.tensor([SHORT, SHORT])
    assert generate(model, batch, 4, temperature=0, eos_id=None) == [expected[0]] * 2
    assert next_token_probs(model, np.array(SHORT), 3) == next_token_probs(model, SHORT, 3)
    with pytest.raises(GPT2LabError, match="holds 97"):
        next_token_probs(model, [97], 3)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=98), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_new_tokens=2.5), "max_new_tokens must be an integer"),
        (dict(top_k=2.5), "top_k must be an integer"),
        (dict(top_k=True), "top_k must be an integer"),
        (dict(temperature="0.7"), "temperature must be a number"),
        (dict(top_p="0.9"), "top_p must be a number"),
        (dict(seed=1.5), "seed must be an integer"),
        (dict(eos_id="x"), "eos_id must be an integer"),
        (dict(seed=2**64), r"seed must lie in \[-2\*\*63, 2\*\*64\)"),
    ],
)
def test_bad_sampling_arguments_raise(make_gpt, kwargs, field):
    """Out-of-range or wrongly typed sampling arguments raise GPT2LabError naming the argument, when
    ``stream`` is called (before any token is asked for)."""
    kwargs = dict(max_new_tokens=3) | kwargs
    with pytest.raises(GPT2LabError, match=field):
        stream(make_gpt(), [[1, 2]], **kwargs)


def test_a_second_stream_waits_for_the_first_to_end(make_gpt):
    """One KV cache per model: a second stream started while the first is unfinished is refused (it would
    reset the cache the first one decodes from and give both wrong tokens); once the first is read to its
    end or closed, the next runs and gives the tokens it gives alone."""
    model = make_gpt()
    alone = generate(model, [[1, 2, 3]], 6, temperature=0)
    first = stream(model, [[1, 2, 3]], 6, temperature=0)
    next(first)
    with pytest.raises(GPT2LabError, match="generating already"):
        next(stream(model, [[1, 2, 3]], 6, temperature=0))
    first.close()
    assert generate(model, [[1, 2, 3]], 6, temperature=0) == alone
    first = stream(model, [[1, 2, 3]], 6, temperature=0)
    assert [t.item() for t in first] == alone[0]  # read to its end: the model is free again
    assert generate(model, [[1, 2, 3]], 6, temperature=0) == alone


def test_a_kv_cache_larger_than_memory_is_refused_before_it_is_allocated(make_gpt):
    """A rope model has no position limit: a length past the machine's memory, or past what torch can
    count, is a clear error naming the memory it would need, not a failure inside torch."""
    model = make_gpt(pos_emb="rope")
    for n in (10**12, 2**62, 2**63):
        with pytest.raises(GPT2LabError, match=r"a KV cache of 1 row\(s\) x [\d,]+ time steps needs .* GiB, more than"):
            list(stream(model, [[1, 2]], n, temperature=0))
    assert not model.generating and generate(model, [[1, 2]], 2, temperature=0)


# --- real GPT-2 weights, only where they are already in the local HF cache ------------------------------


def cached_gpt2_dir(cache_dir: str | Path | None = None) -> Path | None:
    """The local snapshot of the real GPT-2 (``openai-community/gpt2`` or legacy ``gpt2``) holding config.json
    and weights, or None. Never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    for repo in ("openai-community/gpt2", "gpt2"):
        config = try_to_load_from_cache(repo, "config.json", cache_dir=cache_dir)
        if not isinstance(config, str):  # None (unknown) or the "cached as missing" sentinel
            continue
        for weights in ("model.safetensors", "pytorch_model.bin"):
            path = try_to_load_from_cache(repo, weights, cache_dir=cache_dir)
            if isinstance(path, str) and Path(path).parent == Path(config).parent:
                return Path(config).parent
    return None


def test_cached_gpt2_dir_finds_only_complete_snapshots(tmp_path):
    """The skip condition of the real-weights test: a snapshot counts only with config.json and weights."""
    repo = tmp_path / "models--openai-community--gpt2"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    assert cached_gpt2_dir(tmp_path) is None
    (snapshot / "config.json").write_text("{}")
    assert cached_gpt2_dir(tmp_path) is None
    (snapshot / "model.safetensors").write_bytes(b"")
    assert cached_gpt2_dir(tmp_path) == snapshot


REAL_GPT2 = cached_gpt2_dir()


@pytest.mark.skipif(REAL_GPT2 is None, reason="the real GPT-2 weights are not in the local Hugging Face cache")
def test_real_gpt2_greedy_matches_transformers():
    """With the real GPT-2 weights, "The dog" continues greedily exactly as transformers continues it, and the
    prompt's logits agree to 1e-3."""
    from transformers import GPT2LMHeadModel

    model = load_model(REAL_GPT2)
    hf = GPT2LMHeadModel.from_pretrained(REAL_GPT2, local_files_only=True).eval()
    prompt = [464, 3290]  # "The dog"
    with torch.no_grad():
        ours_logits, theirs_logits = model(torch.tensor([prompt]))[0], hf(torch.tensor([prompt])).logits
    assert (ours_logits - theirs_logits).abs().max().item() <= 1e-3
    ours = generate(model, [prompt], 20, temperature=0)[0]
    assert ours == _hf_greedy(hf, prompt, 20, pad_token_id=50256)


def test_unpadded_decode_step_needs_no_mask():
    """One query over the written slots of an unpadded batch sees every slot: no mask is built. A padded
    row still gets one that hides its padding."""
    from gpt2lab.kv_cache import KVCache

    cache = KVCache(1, 2, 4, 8, None, False, torch.float32, torch.device("cpu"))
    kv = torch.randn(1, 2, 3, 4)
    cache.update(kv, kv, torch.arange(3), None, 3)
    keys, values, mask = cache.update(kv[:, :, :1], kv[:, :, :1], torch.tensor([3]), None, 4)
    assert mask is None and keys.shape == values.shape == (1, 2, 4, 4)
    _, _, mask = cache.update(kv[:, :, :1], kv[:, :, :1], torch.tensor([3]), torch.tensor([2]), 4)
    assert mask.tolist() == [[[[False, False, True, True]]]]


def test_a_prompt_written_from_the_start_is_attended_causally_without_a_mask(make_gpt, monkeypatch):
    """A prompt written from time step 0 into an unpadded cache sees exactly the slots up to its own step:
    no mask is built (attention applies it as causal, which kernels do without reading one). Steps that
    continue a prompt, or a padded batch, still get one; and the logits of a prompt written whole, or
    in two pieces, the second through the mask, equal the full forward's, grouped heads too. The model
    compares the time steps with 0, 1, ... once per forward, not in every layer (on a GPU each
    comparison waits for the device)."""
    from gpt2lab import kv_cache
    from gpt2lab.kv_cache import KVCache

    cache = KVCache(1, 2, 4, 8, None, False, torch.float32, torch.device("cpu"))
    kv = torch.randn(1, 2, 3, 4)
    t = torch.arange(3)
    assert (
        kv_cache.written_from_start(t, 3)
        and not kv_cache.written_from_start(t, 4)
        and not kv_cache.written_from_start(t + 1, 4)
    )
    keys, _, mask = cache.update(kv, kv, t, None, 3, kv_cache.written_from_start(t, 3))
    assert mask is None and keys.shape == (1, 2, 3, 4)
    t = torch.tensor([3, 4])
    _, _, mask = cache.update(kv[:, :, :2], kv[:, :, :2], t, None, 5, kv_cache.written_from_start(t, 5))
    assert mask.tolist() == [[[[True, True, True, True, False], [True] * 5]]]
    _, _, mask = cache.update(kv, kv, torch.arange(3), torch.tensor([1]), 3, True)
    assert mask is not None

    asked, causal, sdpa = [], [], F.scaled_dot_product_attention
    monkeypatch.setattr(
        gpt2lab.model, "written_from_start", lambda t, n: asked.append(n) or kv_cache.written_from_start(t, n)
    )

    def attention(*args, is_causal=False, **kwargs):
        causal.append(is_causal)
        return sdpa(*args, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", attention)
    idx = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    for variant in (dict(), dict(pos_emb="rope", n_kv_head=1, window=4, window_pattern="LG")):
        model = make_gpt(seed=3, **variant)  # the second: grouped (one kv head) global layers, causal too
        with torch.no_grad():
            full, _ = model(idx)
            model.setup_cache(2, 9)
            causal.clear()
            whole = prefill(model, idx, torch.arange(9))
            plain = [not block.attn.kv_cache.rolls for block in model.h]  # a rolling window's cache needs its mask
            assert causal == plain  # the other layers: causal, without a mask
            prefill(model, idx[:, :5], torch.arange(5))
            last = prefill(model, idx[:, 5:], torch.arange(5, 9))
        model.clear_cache()
        assert causal == plain * 2 + [False] * len(plain)
        assert asked == [9, 5, 9]  # once per forward
        asked.clear()
        torch.testing.assert_close(whole, full[:, -1], atol=1e-5, rtol=0)
        torch.testing.assert_close(last, full[:, -1], atol=1e-5, rtol=0)


COPIES = [  # (prompts, the kernel reading the copy) for a decode step of that many rows
    pytest.param(
        [[1, 2, 3], [4, 5, 6, 7]],
        "mkl_packed",
        marks=pytest.mark.skipif(not ops.packing_available(), reason="this PyTorch build has no MKL"),
    ),
    pytest.param(
        [[1, 2, 3]],
        "onednn_t",
        marks=pytest.mark.skipif(not ops.onednn_available(), reason="this PyTorch build has no oneDNN"),
    ),
    pytest.param([[1, 2, 3]], "torch_t"),
]


@pytest.mark.parametrize(("prompts", "kernel"), COPIES)
def test_decoding_from_weight_copies_gives_the_same_tokens_and_follows_the_weight(
    make_gpt, remember_kernels, monkeypatch, prompts, kernel
):
    """Where the kernel file says products of a decode step's row count are faster from a copy of the
    weight laid out for them (MKL's packed layout at two rows, the transposed one at one) and the copy
    repays its making within the steps to come, generation reads each linear layer, the tied lm_head
    included, from such a copy: the same tokens as F.linear (equal to float32 rounding), the copies
    dropped at the end, none made for a short generation or where a copy repays too late, no more than
    half the available memory holds, and a layer whose weight changed reads the weight itself."""
    config = dict(vocab_size=1024, n_embd=128, n_head=4)
    rows = len(prompts)
    kind = kernels.decode_kind(rows)  # a decode step's copies: "steps" with gpt2lab's kernels at 2+ rows
    linears = [m for m in make_gpt(**config).modules() if isinstance(m, ops.Linear)]
    us = {k: 100.0 for k in kernels.candidates(kind, rows)} | {kernel: 50.0, "pack": 300.0}  # repaid by 6
    if "avx2_f32" in us:  # gpt2lab's kernel on the weight as it is: measurably slower here, so never read instead
        us["avx2_f32"] = 110.0
    shapes = {(m.out_features, m.in_features) for m in linears}
    remember_kernels({f"{kind} {o}x{i} rows {rows}": {"kernel": kernel, "us_per_product": us} for o, i in shapes})
    slower = {"kernel": "numpy", "us_per_product": {"numpy": 200.0, "numpy_t": 200.0, "pack": 300.0}}
    remember_kernels({f"numpy {o}x{i} rows 1": slower for o, i in shapes})  # numpy's BLAS: slower here
    packed = []
    pack = ops.Linear.pack
    monkeypatch.setattr(ops.Linear, "pack", lambda self, r, k: packed.append((r, k)) or pack(self, r, k))
    backends = Backends(linear="auto", pack_min_steps=4, pack_repeated=False)  # decoding's copies only
    model = make_gpt(seed=5, backends=backends, **config)
    reference = make_gpt(seed=5, backends=Backends(linear="torch"), **config)
    assert generate(model, prompts, 8, temperature=0) == generate(reference, prompts, 8, temperature=0)
    assert packed == [(rows, kernel)] * len(linears)
    assert all(m.packed is None for m in model.modules() if isinstance(m, ops.Linear))
    packed.clear()
    generate(model, prompts, 4, temperature=0)  # 3 decode steps: fewer than pack_min_steps
    generate(model, prompts, 6, temperature=0)  # 5 decode steps: too few to repay a copy
    assert not packed
    weights = [m.weight.numel() * 4 for m in model.modules() if isinstance(m, ops.Linear)]
    monkeypatch.setattr(gpt2lab.model, "available_memory", lambda: 2 * sum(weights[:3]))  # room for three copies
    generate(model, prompts, 8, temperature=0)
    assert packed == [(rows, kernel)] * 3
    monkeypatch.setattr(gpt2lab.model, "available_memory", lambda: None)  # where the OS does not say: no limit
    layer, x = model.h[0].mlp.c_fc, torch.randn(rows, 128)
    layer.pack(rows, kernel)
    read, copy_linear = [], ops.copy_linear  # the kernels that read a copy
    monkeypatch.setattr(ops, "copy_linear", lambda *a, **k: read.append(a[2]) or copy_linear(*a, **k))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
        gelu = F.gelu(F.linear(x, layer.weight, layer.bias), approximate="tanh")
        torch.testing.assert_close(layer.gelu(x), gelu, atol=1e-5, rtol=1e-5)
        assert read == [kernel, kernel]  # the GELU read the copy too
        layer.weight.mul_(2.0)  # in place, after packing: the copy is stale
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
        assert layer.packed is None and len(read) == 2
    layer.pack(rows, kernel)
    (grad,) = torch.autograd.grad(layer(x).sum(), layer.weight)  # with grad the copy, without a backward, is not read
    torch.testing.assert_close(grad, x.sum(0).expand_as(layer.weight))
    assert len(read) == 2


@pytest.mark.skipif(not ops.numpy_blas_available(), reason="numpy has no BLAS whose threads can be set")
def test_one_row_decoding_runs_in_numpys_blas_where_its_products_measure_faster(
    make_gpt, remember_kernels, monkeypatch
):
    """Where the kernel file says that a one-row step's products, summed over its layers, run faster in
    numpy's BLAS than in torch's kernels, every linear layer reads its weight there for the call: from
    a transposed copy (``numpy_t``) where that is faster and repays its making within the steps, else
    as it is (``numpy``, also for a call too short to make copies). The tokens are F.linear's; during
    the products numpy's BLAS has torch's threads and torch one; torch has its threads back at every
    token handed out, and nothing stays packed after the call. Where torch's kernels measure faster,
    nothing runs in numpy."""
    config = dict(vocab_size=1024, n_embd=128, n_head=4)
    linears = [m for m in make_gpt(**config).modules() if isinstance(m, ops.Linear)]
    shapes = {(m.out_features, m.in_features) for m in linears}
    torch_us = {k: 100.0 for k in kernels.candidates("packed", 1)} | {"pack": 300.0}
    packed, threads = [], []
    pack, numpy_linear = ops.Linear.pack, ops.numpy_linear
    monkeypatch.setattr(ops.Linear, "pack", lambda self, r, k: packed.append(k) or pack(self, r, k))

    def counted(*args):
        threads.append((torch.get_num_threads(), [lib.num_threads for lib in ops._numpy_blas()]))
        return numpy_linear(*args)

    monkeypatch.setattr(ops, "numpy_linear", counted)
    reference = make_gpt(seed=5, backends=Backends(linear="torch"), **config)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for numpy_us, n, want in ((150.0, 40, None), (60.0, 40, "numpy_t"), (60.0, 8, "numpy")):
            us = {"numpy": numpy_us, "numpy_t": numpy_us - 20, "pack": 300.0}  # numpy_t repaid by the 15th step
            entry = {"kernel": "numpy_t", "us_per_product": us}
            remember_kernels({f"numpy {o}x{i} rows 1": entry for o, i in shapes})
            remember_kernels(
                {f"packed {o}x{i} rows 1": {"kernel": "onednn", "us_per_product": torch_us} for o, i in shapes}
            )
            backends = Backends(linear="auto", pack_min_steps=4, pack_repeated=False)
            model = make_gpt(seed=5, backends=backends, **config)  # a new table: it reads the entries afresh
            packed.clear(), threads.clear()
            tokens = []
            for token in stream(model, [SHORT], n, temperature=0, eos_id=None):
                assert torch.get_num_threads() == 2
                tokens.append(int(token[0]))
            assert [tokens] == generate(reference, [SHORT], n, temperature=0, eos_id=None)
            if want is None:  # torch's kernels: no product in numpy's BLAS
                assert not threads and not set(packed) & set(kernels.NUMPY_KERNELS)
                continue
            assert packed == [want] * len(linears)
            assert len(threads) == (n - 1) * len(linears)  # every product of every step
            assert all(t[0] == 1 and t[1] == [2] * len(t[1]) for t in threads)
            assert all(m.packed is None for m in model.modules() if isinstance(m, ops.Linear))
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("int8", [False, True])
def test_decode_steps_choose_each_products_kernel_once_per_call(make_gpt, remember_kernels, monkeypatch, int8):
    """Each linear layer (float32 or int8) chooses the kernel of the decode steps' products once per
    generation call (``GPT.plan_decoding``), not once per step: the kernel table is asked about one-row
    products as often for 3 steps as for 12, every layer runs its plan during the steps, the tokens are those of a model that
    chooses per product, and no plan outlives the call."""
    from gpt2lab.quantize import Int8Linear, quantize_int8

    config = dict(vocab_size=1024, n_embd=128, n_head=4)
    model = make_gpt(seed=3, backends=Backends(linear="auto"), **config)
    shapes = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, ops.Linear)}
    entries = {}
    for o, i in shapes:
        for kind in ("float32", "gelu", "packed", "numpy", "int8"):
            us = {k: 100.0 for k in kernels.candidates(kind, 1)} | {"pack": 300.0}
            if len(us) > 2:
                entries[f"{kind} {o}x{i} rows 1"] = {"kernel": kernels.fallback(kind, 1), "us_per_product": us}
    # one op per block saves nothing here: the int8 layers keep the table's choices (Block.plan)
    entries["int8_block 128x4 rows 1"] = {"kernel": "python", "us_per_product": {"python": 1.0, "one_op": 1.0}}
    remember_kernels(entries)
    layer_type = Int8Linear if int8 else ops.Linear
    if int8:
        model = quantize_int8(model)
    reference = copy.deepcopy(model)
    for m in reference.modules():
        if isinstance(m, layer_type):
            m.plan = lambda rows: None  # chooses per product
    asked = []
    choose = kernels.KernelTable.choose

    def counted(table, out_features, in_features, rows, **kwargs):
        if rows == 1:  # the decode steps' products (the prompt's may pack as they repeat, and stop asking)
            asked.append((out_features, in_features))
        return choose(table, out_features, in_features, rows, **kwargs)

    monkeypatch.setattr(kernels.KernelTable, "choose", counted)
    layers = [m for m in model.modules() if isinstance(m, layer_type)]
    counts = []
    for n in (4, 13):
        asked.clear()
        tokens = []
        for token in stream(model, [SHORT], n, temperature=0, eos_id=None):
            tokens.append(int(token[0]))
            if len(tokens) > 1 and (int8 or ops.onednn_available()):
                assert all(m.planned is not None for m in layers)
        counts.append(len(asked))
        assert [tokens] == generate(reference, [SHORT], n, temperature=0, eos_id=None)
        assert all(m.planned is None for m in layers)
    assert counts[0] == counts[1]


def test_stream_checks_its_arguments_when_called(make_gpt):
    """A caller (the CLI prints the prompt first) learns of bad arguments from the call, not from the
    first next()."""
    with pytest.raises(GPT2LabError, match="top_p"):
        stream(make_gpt(), [[1, 2]], 5, top_p=2.0)
    with pytest.raises(GPT2LabError, match="exceeds the context"):
        stream(make_gpt(), [[1] * 60], 6)


class _CountedLookups(weakref.WeakValueDictionary):
    """``quantize._planned_layers``, counting the lookups of ``int8_product`` (a compiled step's opaque
    int8 products)."""

    lookups = 0

    def __getitem__(self, key):
        self.lookups += 1
        return super().__getitem__(key)


@pytest.mark.slow
@pytest.mark.parametrize(
    "int8", [False, "laid out", "plain", "fbgemm"], ids=["float32", "int8-laid-out", "int8-plain", "int8-fbgemm"]
)
def test_compiled_cpu_decode_gives_the_eager_tokens(always_compiled, make_gpt, monkeypatch, int8):
    """``compile=True`` on the CPU (inductor, C++ wrapper) decodes the same greedy tokens as the eager
    step. An int8 model's compiled step runs each product on the kernel its plan chose: torch._int_mm,
    traced, with its weights laid out for inductor's kernels (AMX CPUs) and as they are; fbgemm as one
    opaque op (``quantize.int8_product``), which every product of the compiled steps calls, and which
    keeps the step out of inductor's on-disk cache (the op names layers by their id in this process)."""
    from torch._dynamo.utils import counters

    from gpt2lab import quantize
    from gpt2lab.quantize import Int8Linear, quantize_int8

    if int8 == "fbgemm" and "fbgemm" not in ops.int8_kernels():
        pytest.skip("this torch has no fbgemm")
    monkeypatch.setattr(kernels, "has_amx_int8", lambda: int8 == "laid out")
    lookups = _CountedLookups()
    monkeypatch.setattr(quantize, "_planned_layers", lookups)
    model = make_gpt(seed=4)
    if int8:
        model = quantize_int8(model)
        kernel = "fbgemm" if int8 == "fbgemm" else "int_mm"
        for layer in model.modules():
            if isinstance(layer, Int8Linear):
                layer.table = type(  # no times: no block weighs its one op against the choice (Block.plan)
                    "Fixed",
                    (),
                    {"choose": lambda self, *a, kind: kernel if kind == "int8" else "tanh", "times": lambda *a: {}},
                )()
    prompts = [SHORT, SHORT[:2]]
    eager = generate(model, prompts, 10, temperature=0, eos_id=None)
    assert lookups.lookups == 0
    counters.clear()
    compiled = generate(model, prompts, 10, temperature=0, eos_id=None, compile=True)
    model.clear_cache()
    assert compiled == eager
    products = sum(isinstance(m, Int8Linear) for m in model.modules())
    assert lookups.lookups == (products * 9 if int8 == "fbgemm" else 0)  # 9 compiled steps after the prefill
    if int8 == "fbgemm":
        assert counters["inductor"]["fxgraph_cache_miss"] == counters["inductor"]["fxgraph_cache_hit"] == 0


def test_a_calls_later_compiled_steps_skip_the_full_guards():
    """A generation call's compiled step runs dynamo's guards in full on its first call only: a change
    that the full guards would catch (an attribute the compiled code read), made after that call,
    does not compile again within the call, and the next call's first step catches it. The later
    calls, which cannot compile, skip the settings a compile reads (as ``decode._frozen`` sets them)."""
    from torch._dynamo.testing import CompileCounter

    from gpt2lab import decode

    counter, with_settings = CompileCounter(), []
    holder = torch.nn.Module()
    holder.scale = 2
    compiled = torch.compile(lambda model, token, input_pos: token * model.scale, backend=counter)

    def frozen(*args):
        with_settings.append(True)
        return compiled(*args)

    frozen.compiled_already = compiled
    token, pos = torch.ones(1, 1), torch.tensor([0])
    step = decode._GuardsCheckedOnce(frozen)
    assert step(holder, token, pos).item() == 2 and counter.frame_count == 1
    holder.scale = 3
    for _ in range(2):
        assert step(holder, token, pos).item() == 2 and counter.frame_count == 1  # guards skipped: not seen
    assert len(with_settings) == 1
    assert decode._GuardsCheckedOnce(frozen)(holder, token, pos).item() == 3  # a new call checks in full
    assert counter.frame_count == 2 and len(with_settings) == 2


@pytest.mark.slow
def test_compiled_cpu_decode_of_two_models_in_turn_decodes_each_ones_weights(always_compiled, make_gpt):
    """Two models of the same shapes compile a step each; calls that alternate between them decode
    each model's own tokens, though a call's later steps run only the guards that tell compiled
    versions apart (``decode._GuardsCheckedOnce``) and the weights are frozen into the code."""
    models = [make_gpt(seed=s) for s in (12, 13)]
    expected = [generate(copy.deepcopy(m), [SHORT], 10, temperature=0, eos_id=None) for m in models]
    assert expected[0] != expected[1]
    for i in (0, 1, 0, 1):
        assert generate(models[i], [SHORT], 10, temperature=0, eos_id=None, compile=True) == expected[i]
    for m in models:
        m.clear_cache()


@pytest.mark.slow
def test_compiled_cpu_decode_follows_the_padding_and_changed_weights(always_compiled, make_gpt, monkeypatch):
    """The compiled CPU step freezes the weights into its code, yet a second call of the same shape
    with other left padding reads that call's padding (without compiling again), and after the
    weights change in place it compiles again instead of decoding with the old ones: each time the
    tokens of the eager step, which runs on a copy so that the compiled calls follow one another as
    in a real session. A function of the user's own, compiled in the same process, keeps its compiled
    code throughout."""
    from torch._dynamo.testing import CompileCounter

    from gpt2lab import decode

    resets = []
    monkeypatch.setattr(decode, "_drop_compiled_steps", lambda drop=decode._drop_compiled_steps: resets.append(drop()))
    users = CompileCounter()
    user_function = torch.compile(lambda x: x * 2 + 1, backend=users)
    user_function(torch.ones(3))
    model = make_gpt(seed=5)
    eager_model = copy.deepcopy(model)
    first, second = [SHORT, SHORT[:2]], [SHORT[:1], SHORT]  # the same padded shape, other padding
    for prompts in (first, second):
        eager = generate(eager_model, prompts, 8, temperature=0, eos_id=None)
        assert generate(model, prompts, 8, temperature=0, eos_id=None, compile=True) == eager
    assert not resets  # new padding is not new weights
    with torch.no_grad():
        for m in (model, eager_model):
            m.h[0].mlp.c_fc.weight.mul_(-3)
    changed = generate(eager_model, second, 8, temperature=0, eos_id=None)
    assert changed != eager  # the change shows in the tokens
    assert generate(model, second, 8, temperature=0, eos_id=None, compile=True) == changed
    assert len(resets) == 1
    assert user_function(torch.ones(3)).tolist() == [3.0] * 3 and users.frame_count == 1  # not compiled again
    model.clear_cache()


CACHED_STEPS = """
import copy, json, sys, torch
from torch._dynamo.utils import counters
from gpt2lab import GPT, GPTConfig, decode, generate
decode.TIME_COMPILED_STEPS = False  # every step compiled: this counts inductor's cache hits
torch.manual_seed(int(sys.argv[1]))
model = GPT(GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=32)).eval()
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0, 0.3)
reference = copy.deepcopy(model)  # decodes eagerly, changed alongside
one, two = [[5, 17, 3]], [[5, 17, 3], [5, 17]]

def same(prompts, n):
    tokens = generate(model, prompts, n, temperature=0, eos_id=None, compile=True)
    return tokens, tokens == generate(reference, prompts, n, temperature=0, eos_id=None)

def change():
    with torch.no_grad():
        for m in (model, reference):
            m.h[0].mlp.c_fc.weight.mul_(-3)

tokens, first = same(one, 12)
checks, packing = [first], None
if sys.argv[2] == "all":  # after a change of weights, then batch 2, and both after another change
    change()
    checks += [same(one, 12)[1], same(two, 8)[1]]
    from torch._inductor.fx_passes import mkldnn_fusion  # did freezing set up MKL packing for batch 2?
    packing = mkldnn_fusion._mkldnn_weight_pack_init.cache_info().currsize == 1
    change()
    checks += [same(two, 8)[1], same(one, 12)[1]]
print(json.dumps({"tokens": tokens, "same": checks, "packing": packing, **counters["inductor"]}))
"""


@pytest.mark.slow
def test_a_compiled_one_row_step_comes_from_inductors_cache_in_a_new_process(tmp_path):
    """A float32 batch-1 compiled step is stored in inductor's on-disk cache: a new process compiling a
    model of the same shapes takes it from there, as does a process whose weights changed, each
    decoding the weights at hand (another seed, other tokens). A step on laid-out weights (batch 2) is
    neither stored nor taken from the cache: the copies its kernels read are made when it compiles,
    so a stored one would decode the old weights after a change. Compiled after the batch-1 step, it
    still gets inductor's MKL weight packing (which freezing sets up once per process); a batch-1
    step compiled after it is packed too, so it compiles in full, and still decodes the change."""
    # a CPU whose layers read one row with MKL, where the one-row step is not laid out (prepacks_weights)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "GPT2LAB_LINEAR_KERNEL": "torch"}

    def run(seed: int, batches: str) -> dict:
        args = [sys.executable, "-c", CACHED_STEPS, str(seed), batches]
        return json.loads(subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout)

    first, second = run(1, "all"), run(2, "one")
    assert first["same"] == [True] * 5 and second["same"] == [True]
    assert first["tokens"] != second["tokens"]
    hits = [{k: out.get(f"fxgraph_cache_{k}", 0) for k in ("miss", "hit", "bypass")} for out in (first, second)]
    # batch 1: stored, then found after the change; once batch 2 set MKL packing up, packed, not cached
    assert hits[0] == {"miss": 1, "hit": 1, "bypass": 1} and first["packing"]
    assert hits[1] == {"miss": 0, "hit": 1, "bypass": 0}


@pytest.mark.parametrize("kernel", ["torch", "onednn"])
def test_a_compiled_step_lays_its_weights_out_where_that_is_the_faster_kernel(
    make_gpt, remember_kernels, monkeypatch, kernel
):
    """A compiled float32 step of one row reads the frozen weights as they are (ATen's matrix-vector
    product: MKL) where the kernel table chose MKL for the model's one-row products, and lays them out
    for inductor's kernels where it chose oneDNN; two rows are always laid out. int8 steps are laid
    out, at any row count, where the CPU has AMX int8 tiles, and read the plain weights elsewhere."""
    from gpt2lab import decode
    from gpt2lab.quantize import quantize_int8

    if kernel == "onednn" and not ops.onednn_available():
        pytest.skip("oneDNN does not run on this CPU: MKL is the only one-row kernel")
    shapes = {(3 * 48, 48), (48, 48), (4 * 48, 48), (48, 4 * 48), (89, 48)}  # this model's products only
    times = {"onednn": 1.0, "torch": 1.0}
    remember_kernels({f"float32 {o}x{i} rows 1": {"kernel": kernel, "us_per_product": times} for o, i in shapes})
    model = make_gpt(vocab_size=89, n_embd=48, n_head=4)
    assert decode.prepacks_weights(model, 1) == (kernel == "onednn")
    assert decode.prepacks_weights(model, 2)
    int8 = quantize_int8(model)
    for amx in (True, False):
        monkeypatch.setattr(kernels, "has_amx_int8", lambda amx=amx: amx)
        assert decode.prepacks_weights(int8, 1) == decode.prepacks_weights(int8, 8) == amx


def test_decode_step_follows_compile_and_the_timed_verdict(make_gpt, monkeypatch):
    """A call decodes with the eager step unless it asks to compile. On the CPU a compiled step is timed
    against the eager one (``_TimedSteps``) until a verdict for that batch size and cache length is in,
    and the verdict's step runs from then on; untimed where timing is off."""
    from gpt2lab import decode

    model = make_gpt(seed=3)
    model.setup_cache(1, 16, keep=True)
    assert decode.decode_step(model, 1, compile=False) == (decode.decode_one_token, False)
    step, compiled = decode.decode_step(model, 1, compile=True)
    assert isinstance(step, decode._TimedSteps) and compiled
    verdicts = {}
    monkeypatch.setitem(decode._faster_step, model, verdicts)

    def chosen(rows: int, compile: bool) -> tuple:  # the step decode_step returns, unwrapped
        step, compiled = decode.decode_step(model, rows, compile)
        return getattr(step, "compiled", step), compiled

    for verdict, want in (
        ("eager", (decode.decode_one_token, False)),
        ("compiled", (decode.compiled_decode(model), True)),
    ):
        verdicts[(1, model.cache_len)] = verdict
        assert chosen(1, compile=True) == want
        assert chosen(1, compile=False) == (decode.decode_one_token, False)
    assert isinstance(decode.decode_step(model, 2, compile=True)[0], decode._TimedSteps)  # another batch size
    monkeypatch.setattr(decode, "TIME_COMPILED_STEPS", False)
    assert chosen(2, compile=True) == (decode.compiled_decode(model), True)
    model.clear_cache()


@pytest.mark.parametrize("slow", ["compiled", "eager", "compiled, then eager"])
def test_compile_keeps_the_faster_of_the_compiled_and_eager_cpu_steps(make_gpt, monkeypatch, slow):
    """A compiled CPU step is timed against the eager one on the call's first steps; the faster one
    decodes the rest of the call and later calls of that batch size and cache length, with the eager
    tokens either way. The eager step is kept only after EAGER_ROUNDS rounds in a row find it faster:
    one slow round of the compiled step (a burst of load) is timed again. Here the "compiled" step is
    the eager one counted, and one of the two is delayed."""
    import time

    from gpt2lab import decode

    eager_step, calls = decode.decode_one_token, {"compiled": 0, "eager": 0}
    rounds, steps = decode.EAGER_ROUNDS, decode.TIMED_STEPS

    def delayed(kind: str) -> bool:
        if slow == "compiled, then eager":  # the compiled step's first round (after compiling) only
            return calls["compiled"] <= steps + 1 if kind == "compiled" else calls["eager"] > steps
        return kind == slow

    def timed(kind: str):
        def step(*args):
            calls[kind] += 1
            if delayed(kind):
                time.sleep(0.01)
            return eager_step(*args)

        return step

    monkeypatch.setattr(decode, "compiled_decode", lambda model: timed("compiled"))
    monkeypatch.setattr(decode, "decode_one_token", timed("eager"))
    model = make_gpt(seed=3)
    want = generate(copy.deepcopy(model), [SHORT], 40, temperature=0, eos_id=None)
    calls.update(compiled=0, eager=0)
    assert generate(model, [SHORT], 40, temperature=0, eos_id=None, compile=True) == want
    fast = "compiled" if slow != "compiled" else "eager"
    timed_eager = {"compiled": rounds * steps, "eager": steps, "compiled, then eager": 2 * steps}[slow]
    assert calls["eager"] == (39 - 1 - timed_eager if fast == "eager" else timed_eager)
    assert calls["compiled"] == 39 - calls["eager"]  # the compiling step, the timed ones, then the faster
    assert decode._faster_step[model] == {(1, model.cache_len): fast}
    calls.update(compiled=0, eager=0)
    assert generate(model, [SHORT], 12, temperature=0, eos_id=None, compile=True) == [want[0][:12]]
    assert calls[fast] == sum(calls.values()) == 11  # a later call that fits the kept cache: the faster step only
    model.clear_cache()


def test_a_compiled_step_is_timed_against_the_eager_step_an_eager_call_runs(make_gpt, monkeypatch):
    """While a compiled CPU step times itself against the eager one, the call sets up what an eager call
    would (weight copies, one-op plans), and the eager turns run within numpy's BLAS threads where its
    products run there, the compiled turns outside them; once a verdict is in, a call compiled on it
    makes no copies, and plans as the call that timed it (the int8 kernels its code traced)."""
    import contextlib

    from gpt2lab import decode

    inside, turns, set_up = [], [], []

    @contextlib.contextmanager
    def blas_threads():
        inside.append(True)
        yield
        inside.pop()

    class ReadsNumpy:  # a layer packed to read numpy's BLAS
        reads_numpy = True

        def unpack(self) -> None:
            pass

    def turn(kind: str):
        def step(*args):
            turns.append((kind, bool(inside)))
            return eager_step(*args)

        return step

    eager_step = decode.decode_one_token
    monkeypatch.setattr(decode, "compiled_decode", lambda model: turn("compiled"))
    monkeypatch.setattr(decode, "decode_one_token", turn("eager"))
    monkeypatch.setattr(generation, "numpy_blas_threads", blas_threads)
    monkeypatch.setattr(gpt2lab.model.GPT, "pack_for_decoding", lambda *a: set_up.append("copies") or [ReadsNumpy()])
    monkeypatch.setattr(gpt2lab.model.GPT, "plan_decoding", lambda m, rows, eager=True: set_up.append(eager) or [])
    model = make_gpt(seed=3)
    generate(model, [SHORT], 40, temperature=0, eos_id=None, compile=True)
    assert set_up == ["copies", True]
    assert {(kind, within) for kind, within in turns} == {("compiled", False), ("eager", True)}
    verdict = decode.faster_step(model, 1)
    set_up.clear()
    generate(model, [SHORT], 12, temperature=0, eos_id=None, compile=True)
    assert set_up == (["copies", True] if verdict == "eager" else [True])
    model.clear_cache()


def test_a_kept_cache_serves_later_calls_that_fit_and_grows_by_doubling(make_gpt):
    """A kept KV cache (a compiled step's) outlives its call: later calls of its batch size that fit
    run in the very same buffers, with the tokens of a model that allocates a cache per call; a longer
    call at least doubles it (up to the learned positions), another batch size gets one of its own,
    and clear_cache frees it."""
    model = make_gpt(seed=8, block_size=256)
    fresh = copy.deepcopy(model)

    def same_tokens(prompts: list[list[int]], n: int) -> bool:
        tokens = generate(model, prompts, n, temperature=0, eos_id=None)
        return tokens == generate(fresh, prompts, n, temperature=0, eos_id=None)

    model.setup_cache(1, 60, keep=True)
    kept = model.h[0].attn.kv_cache.k
    for prompt, n in ((SHORT, 20), (SHORT * 5, 40)):  # 23 and 55 steps
        assert same_tokens([prompt], n)
        assert fresh.h[0].attn.kv_cache is None  # a cache that is not kept goes with its call
        assert (model.cache_len, model.cache_kept) == (60, True) and model.h[0].attn.kv_cache.k is kept
    assert same_tokens([SHORT * 10], 70) and model.cache_len == 120  # 100 steps: twice 60
    assert same_tokens([SHORT * 10], 130) and model.cache_len == 240  # 160 steps
    assert same_tokens([SHORT[:1], SHORT], 8) and model.cache_len == 11  # another batch size: its own
    model.clear_cache()
    assert (model.h[0].attn.kv_cache, model.cache_len, model.cache_kept) == (None, 0, False)
    model.setup_cache(1, 5, keep=True)
    model.setup_cache(1, 8)
    assert model.cache_len == 64  # growing from 5 steps: to 64 at least, not 10
    model.clear_cache()
    capped = make_gpt(seed=8, block_size=100)
    capped.setup_cache(1, 60, keep=True)
    capped.setup_cache(1, 70)
    assert capped.cache_len == 100  # not 120: learned positions end at 100
    capped.clear_cache()


@pytest.mark.slow
def test_compiled_cpu_decode_compiles_once_for_the_calls_its_kept_cache_fits(always_compiled, make_gpt):
    """Compiled calls of other lengths, and eager calls between them, run in the kept cache the first
    compiled call made, so the step compiles once, and again when a call needs more steps than the
    cache has (it doubles) or has another batch size (a cache of its own, which replaces the last).
    Each call gives the eager tokens (of a copy of the model)."""
    from torch._dynamo.utils import counters

    model = make_gpt(seed=9, block_size=256)
    eager_model = copy.deepcopy(model)
    compiled_before = counters["stats"]["unique_graphs"]
    calls = (([SHORT[:1]], 50), ([SHORT], 8), ([SHORT * 4], 30), ([SHORT * 10], 70), ([SHORT[:1], SHORT], 8))
    for prompts, n in calls:  # 51, 11, 42, 100 (a new cache of 102 steps) and 11 steps
        expected = generate(eager_model, prompts, n, temperature=0, eos_id=None)
        assert generate(model, prompts, n, temperature=0, eos_id=None, compile=True) == expected
        assert generate(model, prompts, 4, temperature=0, eos_id=None) == [row[:4] for row in expected]
    assert counters["stats"]["unique_graphs"] - compiled_before == 3
    model.clear_cache()


@pytest.mark.slow
def test_compiled_cpu_decode_of_the_variants_gives_the_eager_tokens(always_compiled, make_gpt):
    """Rotary positions, grouped-query attention and a window layer whose cache rolls, beside a global
    layer that reads the steps written: compiled, a padded batch decodes the eager tokens."""
    model = make_gpt(seed=11, pos_emb="rope", n_kv_head=2, window=6, window_pattern="LG")
    prompts = [SHORT * 2, SHORT[:2]]
    expected = generate(copy.deepcopy(model), prompts, 12, temperature=0, eos_id=None)
    assert generate(model, prompts, 12, temperature=0, eos_id=None, compile=True) == expected
    assert model.h[0].attn.kv_cache.rolls and not model.h[1].attn.kv_cache.rolls
    model.clear_cache()


@pytest.mark.slow
def test_compiled_cpu_decode_attends_over_the_steps_written_only(always_compiled, make_gpt):
    """A compiled CPU step reads as much of the KV cache as the call has written, not the whole kept
    cache: a short call in a long cache decodes the eager tokens though the steps it never writes hold
    NaN, which attention over the whole cache would carry into the logits (masked scores weigh them
    by 0, and 0 x NaN is NaN)."""
    model = make_gpt(seed=10, block_size=128)
    expected = generate(copy.deepcopy(model), [SHORT], 8, temperature=0, eos_id=None)
    model.setup_cache(1, 120, keep=True)
    for block in model.h:
        block.attn.kv_cache.k.fill_(float("nan"))
        block.attn.kv_cache.v.fill_(float("nan"))
    assert generate(model, [SHORT], 8, temperature=0, eos_id=None, compile=True) == expected
    assert model.cache_len == 120  # the call ran in the kept cache
    model.clear_cache()


@pytest.mark.slow
def test_a_compiled_step_compiles_each_kernel_template_once(always_compiled, make_gpt):
    """Inductor compiles the jinja source of its C++ matrix-kernel templates for every product it
    lowers or autotunes; while a compiled step compiles, each source is compiled once and reused, and
    the step decodes the eager tokens. Other compiles in the process get inductor's own template
    compiler back."""
    from torch._inductor.codegen.common import KernelTemplate

    from gpt2lab import decode

    memo = decode._memoized_template_compiler()
    if memo is None:
        pytest.skip("this torch's inductor compiles no jinja kernel templates")
    own = KernelTemplate.__dict__["_template_from_string"]
    compiled_templates = memo[1].__func__
    compiled_templates.cache_clear()  # none from earlier tests
    model = make_gpt(seed=12)
    prompts = [SHORT, SHORT[:2]]  # two rows: weights laid out for inductor's kernels, rendered from templates
    expected = generate(copy.deepcopy(model), prompts, 4, temperature=0, eos_id=None)
    assert generate(model, prompts, 4, temperature=0, eos_id=None, compile=True) == expected
    reuse = compiled_templates.cache_info()
    assert reuse.misses > 0 and reuse.hits > reuse.misses
    assert KernelTemplate.__dict__["_template_from_string"] is own
    model.clear_cache()


@pytest.mark.skipif(not ops.packing_available(), reason="this PyTorch build has no MKL")
def test_same_length_prompts_keep_their_packed_copies_between_calls(make_gpt, remember_kernels):
    """Prompts of one length make the same prefill products call after call: once the kernel file says a
    copy has repaid (here on the second call), each block's layers read an MKL-packed copy for that row
    count, which outlives the call (the decode steps between are counted apart); the tokens stay the
    same, and clear_cache frees the copies."""
    config = dict(vocab_size=1024, n_embd=128, n_head=4)
    entries = {}
    model = make_gpt(seed=6, backends=Backends(linear="auto"), **config)
    blocks = [m for m in model.h.modules() if isinstance(m, ops.Linear)]
    us = {"onednn": 100.0, "torch": 100.0, "mkl_packed": 50.0, "onednn_packed": 100.0, "pack": 100.0}  # repaid 2nd
    steps = {k: 200.0 for k in kernels.candidates("steps", 2)} | {"torch": 100.0, "pack": 100.0}  # never a copy
    for m in model.modules():
        if isinstance(m, ops.Linear):
            shape = f"{m.out_features}x{m.in_features}"
            entries[f"packed {shape} rows 8"] = {"kernel": "mkl_packed", "us_per_product": us}
            entries[f"steps {shape} rows 2"] = {"kernel": "torch", "us_per_product": steps}  # the decode steps
    remember_kernels(entries)
    reference = make_gpt(seed=6, backends=Backends(linear="torch"), **config)
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8]]  # 8 rows in each prefill product
    expected = generate(reference, prompts, 3, temperature=0)
    assert generate(model, prompts, 3, temperature=0) == expected
    assert all(m.packed is None for m in blocks)
    assert generate(model, prompts, 3, temperature=0) == expected
    assert all(m.packed is not None and m.packed[0] == 8 for m in blocks)
    assert generate(model, prompts, 3, temperature=0) == expected  # read from the copies
    model.clear_cache()
    assert all(m.packed is None for m in blocks)


def test_decoding_without_a_cache_for_its_rows_says_to_set_one_up(make_gpt):
    """input_pos needs setup_cache for that many rows: before it, after clear_cache, or with another batch
    size, a ValueError names the call to make (not a reshape error, nor a silently broadcast batch)."""
    model = make_gpt()
    token, pos = torch.tensor([[3]]), torch.tensor([0])
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"call model.setup_cache\(1, length\) first"):
            model(token, input_pos=pos)
        model.setup_cache(2, 16)
        with pytest.raises(ValueError, match="the cache now holds 2 row"):
            model(token, input_pos=pos)
        model.clear_cache()
        with pytest.raises(ValueError, match="setup_cache"):
            model(token, input_pos=pos)


@pytest.mark.parametrize("window", [None, 2])
def test_decoding_past_the_cache_or_with_mismatched_positions_is_a_clear_error(make_gpt, window):
    """A time step past the cache set up for it is refused, naming the length to set up, where a layer
    keeps every step (a cache of window layers only rolls, and takes it); input_pos must hold one time
    step per token."""
    model = make_gpt(**({"window": window} if window else {}))
    with torch.no_grad():
        model.setup_cache(1, 4)
        model(torch.tensor([[1, 2, 3, 4]]), input_pos=torch.arange(4))
        if window is None:
            with pytest.raises(ValueError, match=r"time step 4 is past the KV cache's 4 steps.*at least 5"):
                model(torch.tensor([[5]]), input_pos=torch.tensor([4]))
        else:
            rolled = model(torch.tensor([[5]]), input_pos=torch.tensor([4]))[0]
            full = model(torch.tensor([[1, 2, 3, 4, 5]]))[0][:, -1:]
            torch.testing.assert_close(rolled, full, atol=1e-5, rtol=0)
        model.setup_cache(1, 8)
        with pytest.raises(ValueError, match=r"one time step per token: 4 token\(s\), got input_pos of shape \(3,\)"):
            model(torch.tensor([[1, 2, 3, 4]]), input_pos=torch.arange(3))


def test_a_cache_kept_under_inference_mode_serves_generation_outside_it(make_gpt):
    """Buffers made under torch.inference_mode cannot be written outside it: the next call makes new ones."""
    model = make_gpt()
    expected = generate(model, [[1, 2, 3]], 5, temperature=0, eos_id=None)
    with torch.inference_mode():
        model.setup_cache(1, 32, keep=True)
    assert generate(model, [[1, 2, 3]], 5, temperature=0, eos_id=None) == expected
    model.clear_cache()


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(pack_min_steps="64"), "pack_min_steps must be an integer >= 0"),
        (dict(pack_min_steps=-1), "pack_min_steps must be an integer >= 0"),
        (dict(pack_repeated="no"), "pack_repeated must be True or False"),
    ],
)
def test_backends_check_their_settings(options, message):
    with pytest.raises(ValueError, match=message):
        Backends(**options)


def test_predicted_ties_go_to_the_lower_id_whatever_the_count(make_gpt, prefer_tokens):
    """next_token_probs (gpt2lab predict) lists tied tokens lower id first, so its top k is a prefix of
    its top k + 1, as top-k sampling cuts ties."""
    from gpt2lab.generation import next_token_probs

    model = prefer_tokens(make_gpt(vocab_size=512), 300, 100, 450, 40, 7)
    listed = [next_token_probs(model, [1, 2, 3], k) for k in range(1, 8)]
    for shorter, longer in itertools.pairwise(listed):
        assert longer[: len(shorter)] == shorter
    assert [i for i, _ in listed[-1][:5]] == [7, 40, 100, 300, 450]
    assert len({p for _, p in listed[-1][:5]}) == 1  # truly tied
