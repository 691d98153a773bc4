"""The decode steps generation runs: the prompt's prefill, one eager step per new token, and that
step compiled (``compiled_decode``). On the CPU a compiled step is frozen and autotuned for the model
at hand, and timed against the eager step on a call's first steps (``decode_step``): which of the two
is faster depends on the CPU."""

from __future__ import annotations

import contextlib
import functools
import inspect
import statistics
import time
import warnings
import weakref
from collections.abc import Callable, Iterator

import torch

from gpt2lab import kernels
from gpt2lab.kv_cache import KVCache
from gpt2lab.model import GPT
from gpt2lab.ops import Linear, weight_key
from gpt2lab.quantize import Int8Linear


def prefill(model: GPT, idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """Run the whole prompt through the model, filling the cache; logits of the last position (B, V),
    the only ones computed (the lm_head of every prompt position would be a third of a 124M prefill)."""
    x = model.hidden_states(idx, input_pos)
    return model.logits(x[:, -1:])[:, -1]


def decode_one_token(model: GPT, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """One step: token (B, 1) at time ``input_pos`` (1,) -> next-token logits (B, V)."""
    logits, _ = model(token, input_pos=input_pos)
    return logits[:, -1]


def decode_step(model: GPT, rows: int, compile: bool) -> tuple[Callable, bool]:
    """The step that decodes ``rows`` rows in ``model``'s KV cache (as set up for the call), and whether
    it is compiled. Without ``compile``: ``decode_one_token``. With it: the compiled step
    (``compiled_decode``); on the CPU, one not yet timed in this process for this batch size and cache
    length times itself against the eager step on its first steps (``_TimedSteps``), and where the
    eager step was found faster, that one runs instead (``faster_step``)."""
    faster = faster_step(model, rows) if compile else None
    if not compile or faster == "eager":
        return decode_one_token, False
    step = _GuardsCheckedOnce(compiled_decode(model))
    if faster is None and model.wte.weight.device.type == "cpu" and TIME_COMPILED_STEPS:
        step = _TimedSteps(model, rows, step)
    return step, True


class _GuardsCheckedOnce:
    """The compiled step for one generation call: its first call runs dynamo's guards in full (and
    compiles where none of the step's compiled code fits), its later calls only the guards that tell
    the compiled versions apart (``torch.compiler.set_stance``'s ``skip_guard_eval_unsafe``). The full
    guards walk every module of the model, a few hundred microseconds a step. Nothing they check
    changes within a call (the model and its modules, its cache, the shapes), and dynamo tries first
    the version that ran last. Those later calls, which cannot compile, skip the settings a compile
    reads (``_frozen``'s). A torch without that stance checks every call in full."""

    def __init__(self, compiled: Callable) -> None:
        self.compiled, self.checked = compiled, False
        self.compiled_already = getattr(compiled, "compiled_already", compiled)  # for calls that cannot compile

    def __call__(self, model: GPT, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        if self.checked and _can_skip_guards():
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return self.compiled_already(model, token, input_pos)
        logits = self.compiled(model, token, input_pos)
        self.checked = True
        return logits


@functools.cache
def _can_skip_guards() -> bool:
    return "skip_guard_eval_unsafe" in inspect.signature(torch.compiler.set_stance).parameters


# Which decode step ran faster, "compiled" or "eager", per model and (batch size, KV cache length),
# as _TimedSteps measured it in this process.
_faster_step: weakref.WeakKeyDictionary[GPT, dict[tuple[int, int], str]] = weakref.WeakKeyDictionary()
TIME_COMPILED_STEPS = True  # False: a compiled CPU step is kept without timing it against the eager one
TIMED_STEPS = 8  # decode steps of each kind _TimedSteps times, alternately; their medians are compared
STEP_MARGIN = 0.03  # the eager step is kept only if this much faster than the compiled one
EAGER_ROUNDS = 2  # rounds of TIMED_STEPS, one after another, that must all find the eager step faster


def faster_step(model: GPT, rows: int) -> str | None:
    """Which decode step ``compile=True`` runs on the CPU for ``rows`` rows in ``model``'s kept KV
    cache: "compiled" or "eager", as timed in this process (``_TimedSteps``); None until timed."""
    return _faster_step.get(model, {}).get((rows, model.cache_len))


def times_against_eager(step: Callable) -> bool:
    """Whether ``step`` (``decode_step``'s) is a compiled step still to time itself against the eager
    one (``_TimedSteps``): a call then sets up what eager steps read as an eager call does (weight
    copies, one-op plans), so that the eager step it is timed against is the one an eager call runs."""
    return isinstance(step, _TimedSteps)


class _TimedSteps:
    """A compiled CPU decode step that, after the call that compiles it, times itself against the
    eager step (``TIMED_STEPS`` each, alternately, on the call's own tokens) and then runs the faster.
    Which is faster depends on the CPU and on how the step's weights are laid out
    (``prepacks_weights``): on the AMD EPYC of docs/benchmarks.md an int8 step on laid-out weights ran
    at a fifth of the eager step's speed. The eager step is kept only if ``EAGER_ROUNDS`` rounds in a
    row find it faster (a round that finds the compiled one faster decides): a burst of other load on
    a shared machine can mislead one round, and keeping the eager step wrongly costs the most. The
    verdict holds for later calls of the same batch size and cache length in this process
    (``_faster_step``). The eager step timed is the one an eager call runs: the call sets up its weight
    copies and one-op plans (``GPT.pack_for_decoding``, ``GPT.plan_decoding``; ``times_against_eager``),
    which a compiled step does not read, and its turns run within ``eager_threads`` (numpy's BLAS
    threads where its products run there). Both steps write the same KV cache, so a call may switch
    between them."""

    def __init__(self, model: GPT, rows: int, compiled: Callable) -> None:
        self.key, self.compiled = (rows, model.cache_len), compiled
        self.times: dict[str, list[float]] = {"compiled": [], "eager": []}
        self.compiled_once = False
        self.rounds = 0  # rounds timed so far that found the eager step faster
        self.verdict: str | None = None
        self.eager_threads: Callable = contextlib.nullcontext  # set by the call (numpy_blas_threads)

    def __call__(self, model: GPT, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        if not self.compiled_once:  # the call that compiles: not timed
            self.compiled_once = True
            return self.compiled(model, token, input_pos)
        if self.verdict is not None:
            return self._step(self.verdict, model, token, input_pos)
        kind = "eager" if len(self.times["eager"]) < len(self.times["compiled"]) else "compiled"
        start = time.perf_counter()
        logits = self._step(kind, model, token, input_pos)
        self.times[kind].append(time.perf_counter() - start)
        if len(self.times["eager"]) == TIMED_STEPS:
            eager, compiled = (statistics.median(self.times[k]) for k in ("eager", "compiled"))
            self.times = {"compiled": [], "eager": []}
            eager_faster = eager < (1 - STEP_MARGIN) * compiled
            self.rounds += eager_faster
            if eager_faster and self.rounds < EAGER_ROUNDS:
                return logits  # time another round before keeping the eager step
            self.verdict = "eager" if eager_faster else "compiled"
            _faster_step.setdefault(model, {})[self.key] = self.verdict
        return logits

    def _step(self, kind: str, model: GPT, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        if kind == "compiled":
            return self.compiled(model, token, input_pos)
        with self.eager_threads():
            return decode_one_token(model, token, input_pos)


_compiled: dict[str, Callable] = {}
CPU_COMPILE = {
    "cpp_wrapper": True,
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP,ATEN",
    "autotune_num_choices_displayed": 0,  # else inductor prints its timings to stderr
    "max_autotune_report_choices_stats": False,  # and its choices
}
# frozen_weights_key of each model at its last compiled CPU step. (A model's compiled code goes with
# it: dynamo drops code whose guarded parameters are freed, so a new model never reads another's.)
_frozen_weights: weakref.WeakKeyDictionary[GPT, tuple] = weakref.WeakKeyDictionary()


def compiled_decode(model: GPT) -> Callable:
    """``decode_one_token`` compiled once per device type, for ``model``. Compiling removes most of the
    per-kernel launch cost a decode step is made of: on a GPU as CUDA graphs; on the CPU with
    inductor's C++ wrapper (the step's dozens of kernels are called from C++, not Python), its weights
    frozen into the compiled code as constants, and its products autotuned: inductor times its own C++
    matrix kernels against ATen's for each product and keeps the faster (``freezing``, ``max_autotune``;
    ``prepacks_weights`` says where its kernels read the weights laid out anew). Frozen weights do not
    follow later changes, so when ``model``'s weights changed since its last compiled CPU step, the
    compiled decode steps are dropped and compile again on their next call (``_drop_compiled_steps``).
    The weights move first to where eager steps read them (``GPT.weights_to_huge_pages``)."""
    device = model.wte.weight.device
    if device.type not in _compiled:
        if device.type == "cuda":
            step = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
        elif device.type == "cpu":
            step = _frozen(torch.compile(decode_one_token, fullgraph=True, options=CPU_COMPILE))
        else:
            step = torch.compile(decode_one_token, fullgraph=True)
        _compiled[device.type] = step
    if device.type == "cpu":
        model.weights_to_huge_pages()  # where eager steps read them: an eager call moves none later
        weights = frozen_weights_key(model)
        if _frozen_weights.get(model, weights) != weights:
            _drop_compiled_steps()
        _frozen_weights[model] = weights
    return _compiled[device.type]


def _drop_compiled_steps() -> None:
    """Make the compiled decode steps compile again on their next call: dynamo's code for
    ``decode_one_token`` is dropped, and the other functions the process compiled keep theirs. A torch
    without dynamo's ``reset_code`` drops every compiled function (``torch.compiler.reset``)."""
    eval_frame = getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None)
    reset_code = getattr(eval_frame, "reset_code", None)
    if reset_code is None:
        torch.compiler.reset()
    else:
        reset_code(decode_one_token.__code__)


def _frozen(step: Callable) -> Callable:
    """``step`` traced and compiled with inductor's freezing on (read when dynamo traces, so it wraps
    every call; it applies without gradients only, which generation runs under), with the written
    length of the KV cache read as an integer traced from the time step (dynamo's
    ``capture_scalar_outputs``: ``gpt2lab.model._filled``), so the step attends over the steps written
    only, with the weights laid out for inductor's own matrix kernels only where that pays
    (``prepacks_weights``), and with each of those kernels' templates compiled once
    (``_templates_compiled_once``). A step on laid-out weights stays out of inductor's on-disk cache
    (``fx_graph_cache``): its kernels read copies of the weights made as it compiles, so a stored one,
    found again by shapes, would decode the weights it was compiled with. So does a step that calls
    int8 layers by their id in this process (``calls_layers_by_id``). Autotuning's own
    deprecation warning (inductor calls ``Tensor.storage()``) is kept out of the output."""

    @functools.wraps(step)
    def run(model: GPT, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        layouts = _laid_out.setdefault(model, {})
        rows = token.shape[0]
        if rows not in layouts:  # asked once: it reads every layer's kernel choice
            layouts[rows] = prepacks_weights(model, rows)
        prepack = layouts[rows]
        if prepack:
            _let_freezing_pack_weights()
        cacheable = not prepack and not calls_layers_by_id(model)
        options = {"freezing": True, "cpp.weight_prepack": prepack, "fx_graph_cache": cacheable}
        traced_length = torch._dynamo.config.patch(capture_scalar_outputs=True)  # the cache's length: model._filled
        with (
            torch._inductor.config.patch(options),
            traced_length,
            _templates_compiled_once(),
            warnings.catch_warnings(),
        ):
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)
            return step(model, token, input_pos)

    run.compiled_already = step  # without the settings only compiling reads (80 us a call to enter)
    return run


@functools.cache
def _memoized_template_compiler() -> tuple[type, staticmethod] | None:
    """Inductor's kernel-template class and its jinja compiler memoized by source; None where this
    torch's inductor has no such compiler."""
    try:
        from torch._inductor.codegen.common import KernelTemplate
    except ImportError:
        return None
    compile_source = KernelTemplate.__dict__.get("_template_from_string")
    if not isinstance(compile_source, staticmethod):
        return None
    return KernelTemplate, staticmethod(functools.lru_cache(maxsize=None)(compile_source.__func__))


@contextlib.contextmanager
def _templates_compiled_once() -> Iterator[None]:
    """While a compiled step compiles, each jinja template of inductor's C++ matrix kernels is compiled
    once per source. Inductor compiles a template's source afresh for every product it lowers or
    autotunes: about a thousand times for 124M's laid-out one-row step, from 32 sources, 12-15% of
    the compile (docs/architecture.md). A compiled template depends on its source only,
    so one serves them all. Other compiles in the process are left as they are."""
    memo = _memoized_template_compiler()
    if memo is None:
        yield
        return
    cls, memoized = memo
    original = cls.__dict__["_template_from_string"]
    cls._template_from_string = memoized
    try:
        yield
    finally:
        cls._template_from_string = original


# prepacks_weights of each model, per row count, as _frozen's steps asked it.
_laid_out: weakref.WeakKeyDictionary[GPT, dict[int, bool]] = weakref.WeakKeyDictionary()


def _let_freezing_pack_weights() -> None:
    """Make the next frozen compile set inductor's freezing passes up again. They are set up once per
    process, and pack weights with MKL only if ``cpp.weight_prepack`` was on the first time; after a
    first compile with it off (a float32 step of one row), a laid-out step would read no MKL-packed
    weights, and batch-8 float32 decoding ran 22% slower. Setting up again is cheap and adds only what
    is missing (each part is set up once). A torch without this setup function is left as it is."""
    from torch._inductor.fx_passes import freezing_patterns

    clear = getattr(freezing_patterns.lazy_init, "cache_clear", None)
    if clear is not None:
        clear()


def prepacks_weights(model: GPT, rows: int) -> bool:
    """Whether a compiled CPU step of ``rows`` rows lays its frozen weights out for inductor's own
    matrix kernels (``cpp.weight_prepack``), which are up to twice as fast as ATen's on the plain
    weight for float32 products of two rows or more. At one float32 row it depends on the CPU
    (``mkl_reads_one_row_faster``): where MKL's matrix-vector product, what ATen runs on the plain
    weights, is the one-row kernel the table measured faster, the step reads the frozen weights as
    they are; the laid-out step would cost more: copies of the weights, and MKL-packed ones in its
    graph, which inductor's on-disk cache cannot store. Without them a later process, or a compile
    after the weights changed, takes the compiled step from that cache in seconds. int8 products are
    laid out where the CPU has AMX int8 tiles (``amx_int8``): on the Xeon of docs/benchmarks.md the
    laid-out int8 step took 5.7 ms against 11.6 ms on the plain weights, while on the AMD EPYC there
    (AVX-512 VNNI, no AMX) it decoded 39-40 tokens/s against 261 (one row) and 716 (eight rows) on
    the plain weights with ATen's ``_int_mm`` running the products. (On the plain weights each int8
    layer runs its planned kernel: ``Int8Linear._compiled_product``.) ``quantize_int8`` converts every
    linear layer, the lm_head included, so the lm_head tells which products a model has."""
    head = model.lm_head
    if isinstance(head, Int8Linear):
        return kernels.has_amx_int8()
    if rows > 1 or not (isinstance(head, torch.nn.Linear) and head.weight.dtype == torch.float32):
        return True
    return not mkl_reads_one_row_faster(model)


def mkl_reads_one_row_faster(model: GPT) -> bool:
    """Whether most of ``model``'s float32 weight bytes are read by MKL (``F.linear``) at one row, as
    each layer's kernel choice says (``ops.Linear.kernel_for``: the kernel table measures it on this
    machine the first time). On the Xeon of docs/benchmarks.md it is, and a compiled one-row step on
    the plain weights is level with the laid-out one; on the AMD EPYC there MKL's one-row product
    takes about twice oneDNN's time, and the compiled step on the plain weights ran at two thirds of
    the eager step's speed."""
    mkl = onednn = 0
    for layer in model.modules():
        if isinstance(layer, Linear):
            if layer.kernel_for(1) == "torch":
                mkl += layer.weight.numel()
            else:
                onednn += layer.weight.numel()
    return mkl >= onednn


def calls_layers_by_id(model: GPT) -> bool:
    """Whether a compiled step of ``model`` calls int8 layers' planned kernels as one opaque op each
    (``quantize.int8_product``), which names its layer by its id in this process: a step stored in
    inductor's on-disk cache would name layers of a process that is gone."""
    return any(isinstance(m, Int8Linear) and m.planned is not None and m.planned.opaque for m in model.modules())


def frozen_weights_key(model: GPT) -> tuple:
    """What a compiled CPU step froze of ``model``: every parameter and buffer but the ones each call
    rewrites (the KV caches' and the rows' padding, ``cache_pad``, which the step reads afresh), each as
    ``ops.weight_key`` (storage, in-place changes, optimizer steps)."""
    rewritten = {id(t) for m in model.modules() if isinstance(m, KVCache) for t in m.buffers()}
    rewritten.add(id(model.cache_pad))
    buffers = (t for t in model.buffers() if id(t) not in rewritten)
    return tuple(weight_key(t) for t in buffers) + tuple(weight_key(p) for p in model.parameters())
