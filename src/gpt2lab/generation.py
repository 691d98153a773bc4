"""Text generation with a preallocated KV cache: one prefill, then one-token decode steps
(``gpt2lab.decode``), each new token picked by ``sample``."""

from __future__ import annotations

import codecs
import contextlib
import functools
import math
import numbers
from collections.abc import Callable, Iterator, Sequence

import torch

from gpt2lab.decode import decode_step, prefill, times_against_eager
from gpt2lab.errors import GPT2LabError
from gpt2lab.model import GPT
from gpt2lab.ops import numpy_blas_threads
from gpt2lab.tokenizer import EOT

FLOAT32_TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32: a temperature below it is greedy


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V). temperature 0 is greedy (argmax), as is one too small for
    float32 (below about 1.2e-38), whose limit greedy is.

    Applied in HF's order: temperature, then top-k, then top-p. Top-k keeps exactly k tokens; among
    tokens tied at the k-th logit the lower token ids win (as a stable sort orders them), so the cut
    is reproducible. Top-p keeps the smallest set of most likely tokens whose probability reaches p
    (at least one; ties in the same order). Neither sorts the whole vocabulary where it need not: a
    sort of 50257 logits takes milliseconds on a CPU, longer than a 124M decode step (``_top_k``,
    ``_top_p``); nor does the draw take a random number per token (``draw``).
    """
    if temperature < FLOAT32_TINY:
        return greedy(logits)
    logits = logits.float()
    # shifted first, so that the largest is 0: a tiny temperature sends the others to -inf, not to inf - inf = nan
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        logits = _top_k(logits, top_k)
    if top_p is not None and top_p < 1:  # 1 keeps every token (float32 sums can reach 1 before the tail)
        logits = _top_p(logits, top_p)
    return draw(logits.softmax(dim=-1), generator)


def _top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """logits (B, V) with all but each row's k largest set to -inf: every logit above the k-th largest
    value, then those equal to it from the lowest token id on, until k (a stable descending sort's
    first k), found by ``torch.topk`` in one pass rather than a sort."""
    kth = logits.topk(k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest value of each row
    keep = logits >= kth
    if bool((keep.sum(dim=-1) > k).any()):  # ties at the cut: the lowest ids among them, until k
        above, tied = logits > kth, logits == kth
        room = k - above.sum(dim=-1, keepdim=True)
        keep = above | (tied & (tied.cumsum(dim=-1) <= room))
    return logits.masked_fill(~keep, float("-inf"))


TOP_P_CANDIDATES = 256  # the most likely tokens _top_p orders first; all of them where these fall short of p


def _top_p(logits: torch.Tensor, p: float, whole: bool | None = None) -> torch.Tensor:
    """logits (B, V) with each row's tokens outside its nucleus set to -inf (``_nucleus``). On the CPU,
    one row at a time, only the tokens at or above the ``TOP_P_CANDIDATES``-th largest logit are
    sorted where their probability reaches p (every token after them has at least that much before
    it), else the whole row; elsewhere (``whole``), all rows are sorted whole at once, as a GPU does
    quickly."""
    probs = logits.softmax(dim=-1)
    if logits.device.type != "cpu" if whole is None else whole:
        return _nucleus(logits, probs, p)[0]
    kept = torch.full_like(logits, float("-inf"))
    for row in range(logits.shape[0]):
        values, row_probs = logits[row : row + 1], probs[row : row + 1]
        if values.shape[-1] > TOP_P_CANDIDATES:  # ascending ids, with every token tied with the last candidate
            floor = values.topk(TOP_P_CANDIDATES).values[0, -1]  # (-inf after top-k: those never stay)
            ids = ((values[0] >= floor) & (values[0] > float("-inf"))).nonzero().squeeze(1)
            cut, mass = _nucleus(values[:, ids], row_probs[:, ids], p)
            if mass[0] >= p:
                kept[row, ids] = cut[0]
                continue
        kept[row] = _nucleus(values, row_probs, p)[0][0]
    return kept


def _nucleus(logits: torch.Tensor, probs: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, n) with the tokens outside each row's nucleus set to -inf: in the order of a stable
    descending sort (ties: the lower positions first), a token stays while the probability (``probs``)
    of the tokens before it is below p; and each row's probability in all (B,), summed in that order."""
    order = _descending_order(logits)
    ordered = probs.gather(-1, order)
    mass = ordered.cumsum(dim=-1)  # of each token and those before it
    drop = mass - ordered >= p  # the first token always has 0 before it
    return logits.scatter(-1, order, logits.gather(-1, order).masked_fill(drop, float("-inf"))), mass[:, -1]


RADIX_SORTED = 32768  # torch sorts a 1-D CPU int64 tensor this long or longer by radix (at::internal::GRAIN_SIZE)


def _descending_order(logits: torch.Tensor) -> torch.Tensor:
    """The order (B, n) of a stable descending sort of each row of logits (B, n): equal values in the
    order of their positions. Float32 rows on the CPU of ``RADIX_SORTED`` or more are ordered by one
    ascending sort each of distinct int64 keys, a value's bits turned into an integer that falls as the
    value rises, above its position: torch sorts those by radix, several times faster than a stable sort
    of the floats (docs/benchmarks.md, item 18). A NaN's place may differ; ``draw`` refuses NaN rows."""
    n = logits.shape[-1]
    if logits.device.type != "cpu" or logits.dtype != torch.float32 or n < RADIX_SORTED:
        return logits.sort(dim=-1, descending=True, stable=True).indices
    shift = max(1, (n - 1).bit_length())  # the bits of a position
    bits = (logits + 0.0).view(torch.int32).long()  # + 0.0: -0.0 becomes +0.0, the value it equals
    rising = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # in the floats' order, from -2**31 up
    keys = (((2**31 - 1) - rising) << shift) | torch.arange(n)  # 0 and up: the largest value first
    return torch.stack([row.sort().values for row in keys]) & ((1 << shift) - 1)  # 1-D: the radix sort


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of probs (B, V), each drawn with its probability (rows need not sum to 1):
    the first token whose running sum exceeds a uniform draw times the row's total, found by binary
    search (inverse transform sampling: one random number per row, where ``torch.multinomial`` on the
    CPU draws one per token, about 1 ms for a row of 50257). A token of probability 0 is never drawn."""
    wide = torch.float32 if probs.device.type == "mps" else torch.float64  # Apple's GPUs have no float64
    cdf = probs.cumsum(dim=-1, dtype=wide)
    total = cdf[:, -1:]
    if not all(0 < t < math.inf for (t,) in total.tolist()):  # NaN compares False
        raise GPT2LabError(
            "cannot sample: a row of next-token probabilities is NaN or all zero; the model's logits hold NaN "
            "(check its weights, or its dtype: float16 overflows)"
        )
    u = torch.rand(total.shape, dtype=wide, device=probs.device, generator=generator)
    x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # below the total, rounded or not
    return torch.searchsorted(cdf, x, right=True).squeeze(1)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The index of each row's largest logit (B,) from logits (B, V), as ``logits.argmax(-1)`` gives it:
    the first of tied largest, a NaN above every number. Float32 logits on the CPU are searched by
    numpy's argmax, whose vectorized search over a vocabulary takes a fraction of torch's time: part of
    every greedy decode step (docs/benchmarks.md, item 17)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad:
        return torch.from_numpy(logits.numpy().argmax(-1)).long()  # int64 where numpy's index is narrower
    return logits.argmax(dim=-1)


def check_sampling(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None, vocab_size: int | None = None
) -> None:
    """Refuse generation settings no model can run; ``vocab_size`` None (no model loaded yet) leaves
    top_k's upper bound to the later check."""
    _require_number("max_new_tokens", max_new_tokens, integer=True)
    _require_number("temperature", temperature)
    if top_k is not None:
        _require_number("top_k", top_k, integer=True)
    if top_p is not None:
        _require_number("top_p", top_p)
    if max_new_tokens < 0:
        raise GPT2LabError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise GPT2LabError(f"temperature must be a number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and vocab_size is None and top_k < 1:
        raise GPT2LabError(f"top_k must be at least 1, got {top_k}")
    if top_k is not None and vocab_size is not None and not 1 <= top_k <= vocab_size:
        raise GPT2LabError(f"top_k must be between 1 and the vocabulary size {vocab_size}, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise GPT2LabError(f"top_p must be in (0, 1], got {top_p}")


def _require_number(name: str, value: object, integer: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        raise GPT2LabError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")


def stream(
    model: GPT,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_id: int | None = EOT,
    compile: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every prompt (B,) at each step, until ``max_new_tokens`` or every row
    has produced ``eos_id``. Prompts are rows of token ids (``prompt_rows``) and may differ in length
    (they are left-padded). Bad arguments raise here, before the first token is asked for. A model
    serves one stream at a time (it holds one KV cache): another started before this one is read to
    its end or closed is refused.

    ``compile=True`` runs the decode step through torch.compile (``gpt2lab.decode``). Compiling takes
    a while the first time, so it pays for long or repeated generation. On the CPU the compiled step
    is then timed against the eager one on the call's first steps, the eager one as an eager call runs
    it (with its weight copies and one-op plans), and the faster decodes from there on
    (``gpt2lab.decode.decode_step``): which one that is depends on the CPU. The KV cache then stays
    on the model, and later calls of the same batch size that fit in it reuse it and the compiled
    code, whatever their lengths; a longer call at least doubles it and compiles once more
    (``GPT.setup_cache``'s ``keep``; ``model.clear_cache()`` frees it). To compile once for calls of
    up to L steps (prompt + new tokens) in rows of B, keep a cache of that size first:
    ``model.setup_cache(B, L, keep=True)``."""
    config = model.config
    prompts = prompt_rows(prompts, config.vocab_size)
    check_sampling(max_new_tokens, temperature, top_k, top_p, config.vocab_size)
    if eos_id is not None:
        _require_number("eos_id", eos_id, integer=True)
    if seed is not None:
        _require_number("seed", seed, integer=True)
        if not -(2**63) <= seed < 2**64:  # what torch.Generator takes
            raise GPT2LabError(f"seed must lie in [-2**63, 2**64), got {seed}")
    P = max(len(p) for p in prompts)
    fed = P + max(max_new_tokens - 1, 0)  # positions the model reads: the last new token is never fed back
    if config.max_positions is not None and fed > config.max_positions:
        raise GPT2LabError(
            f"prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) needs {fed} positions (the last new token "
            f"is not fed back), which exceeds the context of {config.max_positions} tokens (learned positions "
            f"end there); shorten the prompt or lower max_new_tokens (rope models have no such limit)"
        )
    device = model.wte.weight.device
    idx = torch.zeros(len(prompts), P, dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        idx[row, P - len(p) :] = torch.tensor(p, dtype=torch.long)
    pad = torch.tensor([P - len(p) for p in prompts], device=device)
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    pick = functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    return _stream(model, idx, pad, max_new_tokens, pick, eos_id, compile)


def prompt_rows(prompts: Sequence[Sequence[int]] | torch.Tensor, vocab_size: int) -> list[list[int]]:
    """``prompts`` as lists of token ids, checked: token-id sequences of any lengths (lists, tuples, 1-D
    tensors or arrays), or a (batch, tokens) integer tensor. A flat list of ids, text, an empty prompt
    or an id outside the vocabulary raises a GPT2LabError that says what to pass instead."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.dtype.is_floating_point or prompts.dtype == torch.bool:
            raise GPT2LabError(
                f"a tensor of prompts must be (batch, tokens) integer ids, got {tuple(prompts.shape)} {prompts.dtype}; "
                "for one prompt of ids use ids[None]"
            )
        prompts = prompts.tolist()
    if not isinstance(prompts, (Sequence, str, bytes)) and not hasattr(prompts, "tolist"):  # None, 5, a generator
        raise GPT2LabError(
            f"prompts is a list of prompts, each a list of token ids, or a (batch, tokens) tensor; got {type(prompts).__name__}"
        )
    if isinstance(prompts, (str, bytes)) or any(isinstance(p, (str, bytes)) for p in prompts):
        raise GPT2LabError("prompts are token ids, not text; encode the text first: [tokenizer.encode(text)]")
    if len(prompts) == 0:
        raise GPT2LabError("the list of prompts is empty; pass a list of prompts, each a list of token ids")
    rows = [p.tolist() if hasattr(p, "tolist") else p for p in prompts]  # tensors and arrays: Python ints
    if any(not isinstance(p, Sequence) for p in rows):
        raise GPT2LabError("prompts is a list of prompts, each a list of token ids; for one prompt of ids pass [ids]")
    if any(len(p) == 0 for p in rows):
        raise GPT2LabError("every prompt needs at least one token; the prompt is empty")
    for row, p in enumerate(rows):
        bad = next((t for t in p if not _is_token_id(t, vocab_size)), None)
        if bad is not None:
            where = "the prompt" if len(rows) == 1 else f"prompt {row}"
            raise GPT2LabError(f"{where} holds {bad!r}, not a token id of this model (integers 0 to {vocab_size - 1})")
    return [list(p) for p in rows]


def _is_token_id(t: object, vocab_size: int) -> bool:
    return isinstance(t, numbers.Integral) and not isinstance(t, bool) and 0 <= t < vocab_size


@torch.no_grad()
def _stream(
    model: GPT,
    idx: torch.Tensor,
    pad: torch.Tensor,
    max_new_tokens: int,
    pick: Callable[[torch.Tensor], torch.Tensor],
    eos_id: int | None,
    compile: bool,
) -> Iterator[torch.Tensor]:
    """``stream``'s loop over the left-padded prompts idx (B, P), once its arguments are checked;
    ``pick`` turns next-token logits (B, V) into tokens (B,)."""
    (B, P), device = idx.shape, idx.device
    if model.generating:  # its KV cache, and the layers' plans, belong to that call until it ends
        raise GPT2LabError(
            "this model is generating already: a stream of it has not ended (its KV cache serves one call at a "
            "time). Read that stream to its end or close it (stream.close()) first"
        )
    was_training = model.training
    model.eval()
    model.setup_cache(B, P + max_new_tokens, pad=pad, keep=compile)
    step, compiled = decode_step(model, B, compile)
    eager = not compiled or times_against_eager(step)  # steps that may run eager, as an eager call's
    packed, planned = [], []
    model.generating = True
    try:
        logits = prefill(model, idx, torch.arange(P, device=device))
        if eager:  # a compiled step reads the weights frozen into it, not copies
            packed = model.pack_for_decoding(B, max_new_tokens - 1)
        # A compiled step reads its planned int8 kernels, not the one-op plans; planned for it too, the
        # near ties they settle keep the int8 kernels of the call that timed it (as its code traced them)
        planned = model.plan_decoding(B)
        in_numpy = any(layer.reads_numpy for layer in packed)  # the eager products run in numpy's BLAS
        threads = numpy_blas_threads if in_numpy else contextlib.nullcontext
        if compiled and eager:  # the compiled step's eager turns within those threads, its own outside
            step.eager_threads = threads
            threads = contextlib.nullcontext
        done = torch.zeros(B, dtype=torch.bool, device=device)
        position = torch.tensor([P - 1], device=device)
        for t in range(P, P + max_new_tokens):
            token = pick(logits)
            if eos_id is not None:
                token = token.masked_fill(done, eos_id)
                done |= token == eos_id
            yield token
            if t == P + max_new_tokens - 1 or bool(done.all()):
                break
            position = position + 1  # time step t, a tensor of its own for each step
            with threads():  # torch's own threads are back by the time a token is yielded
                logits = step(model, token[:, None], position)
    finally:  # free this call's decode copies (those of repeated prompts stay) and the cache unless kept
        for layer in packed:
            layer.unpack()
        for layer in planned:
            layer.unplan()
        if not model.cache_kept:
            model.clear_cache(packs=False)
        model.train(was_training)
        model.generating = False


def generate(
    model: GPT, prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int, **options
) -> list[list[int]]:
    """New tokens for each prompt; a row ends with ``eos_id`` if it produced it. ``options`` are
    ``stream``'s: temperature, top_k, top_p, seed, eos_id, compile."""
    eos_id = options.get("eos_id", EOT)
    prompts = prompt_rows(prompts, model.config.vocab_size)  # checked once, and a one-pass iterable not consumed
    rows: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    for token in stream(model, prompts, max_new_tokens, **options):
        for row, tok in enumerate(token.tolist()):
            if not finished[row]:
                rows[row].append(tok)
                finished[row] = tok == eos_id
    return rows


def stream_text(
    model: GPT,
    tokenizer,
    prompt: Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    compile: bool = False,
) -> Iterator[str]:
    """The continuation of one prompt as text, piece by piece as tokens arrive, ending before
    ``<|endoftext|>``. A character split across tokens comes out whole, with the token that completes it.
    Bad arguments raise here, before anything is yielded."""
    eos_id = tokenizer.eot_token
    tokens = stream(model, [prompt], max_new_tokens, temperature, top_k, top_p, seed, eos_id=eos_id, compile=compile)
    return _text_pieces(tokenizer, tokens)


def _text_pieces(tokenizer, tokens: Iterator[torch.Tensor]) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in tokens:
        if int(token[0]) == tokenizer.eot_token:  # the end of the text, not part of it
            break
        piece = decoder.decode(tokenizer.decode_single_token_bytes(int(token[0])))
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


@torch.no_grad()
def next_token_probs(model: GPT, prompt: Sequence[int], k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely next tokens after ``prompt`` with their probabilities, best first."""
    limit = model.config.max_positions
    [prompt] = prompt_rows([prompt], model.config.vocab_size)
    if limit is not None and len(prompt) > limit:
        raise GPT2LabError(f"the text is {len(prompt)} tokens, longer than the model's context of {limit}; shorten it")
    if not k >= 1:
        raise GPT2LabError(f"the number of tokens to list must be at least 1, got {k}")
    was_training = model.training
    model.eval()
    x = model.hidden_states(torch.tensor([prompt], device=model.wte.weight.device))
    logits = model.logits(x[:, -1:])  # the last position's only
    model.train(was_training)
    probs = logits[0, -1].float().softmax(-1)
    values, ids = probs.sort(descending=True, stable=True)  # ties: the lower id first, whatever k is
    return list(zip(ids[:k].tolist(), values[:k].tolist(), strict=True))
