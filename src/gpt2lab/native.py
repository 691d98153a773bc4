"""gpt2lab's own C++ CPU kernels for the few rows of a decode step on AVX2 CPUs: int8 and float32
products, and the attention of one query per head over the KV cache.

At one row fbgemm's int8 product, and oneDNN's and MKL's float32 ones on the weight as it is, read
their weights well below the rate memory gives on the AVX2 EPYCs (docs/benchmarks.md, item 15).
``csrc/avx2.cpp`` streams the weights: the int8 kernel ``avx2`` (on a weight laid out for it by
``gpt2lab.ops.pack_int8``, with a software prefetch ahead; AVX2's byte products, or where the CPU has
AVX-512 VNNI its dot product of 64 bytes an instruction, up to four rows of x at a time: ``int8_paths``),
and the float32 one-row kernels (kind ``packed`` of ``gpt2lab.kernels``): ``avx2_f32`` on the weight
as it is (rows of up to 4 KB one after another, longer ones eight at once with a prefetch ahead in
each), and ``avx2_f32_blocks`` on a copy in blocks of 16 output channels, one stream per thread
(``gpt2lab.ops.copy_weight``; where the CPU has AVX-512, three rows of x or more up to eight at a
time: ``float_paths``). Its attention
kernel, ``avx2`` of ``gpt2lab.ops.one_query_attention`` (kind ``attention``), reads the cache where it
lies, in one pass per query; on AVX-512 CPUs a whole prompt's causal attention has one too, ``avx512``
of ``gpt2lab.ops.causal_attention`` (kind ``causal``): tiles of six queries by 32 keys up to the
diagonal, written in the layout the projection after it reads. Each is one more candidate of the kernel table, chosen only where it measures faster.
Fewer, larger operations in a decode step: where its attention runs ``avx2``, one op writes the step's
keys and values into the cache and attends (``cache_attention_avx2``, ``KVCache.attend_one``), and
through the KV cache each block's residual add and the LayerNorm after it are one op
(``add_layer_norm``, ``ops.add_layer_norm``), and an MLP's tanh-GELU can run in AVX2 with an
exponential of its own (``gelu_avx2_``, the form ``avx2`` of ``ops.tanh_gelu_``); where all of a
block's products run these kernels, its whole eager decode step is one op (``decode_block``,
``model.Block.plan``), and where every block's do, a step through all the blocks is one op
(``decode_blocks``, on a ``DecodeBlocks`` that holds each block's arguments of ``decode_block`` from
step to step: ``model.GPT._blocks_in_one_op``), and where the lm_head's product runs one of these
kernels too, the whole step from the new tokens' embeddings through ``ln_f`` and the lm_head to the
logits (``decode_logits``, the head set by ``DecodeBlocks.set_head``: ``model.GPT.head_plan``, and the
embedding tables by ``DecodeBlocks.set_embeddings``: ``model.GPT._logits_in_one_op``). For the other int8 kernels (products of many rows),
each row's quantization (``quantize_rows``, or for fbgemm ``normalize_rows``) and the output's
scaling (``scale_rows_``) are one pass each
(``ops.int8_linear``). They are built with torch's C++ extension builder the first time a process on
an AVX2 CPU needs them (about 10-20 seconds; the built library is kept under torch's extension
directory, ``TORCH_EXTENSIONS_DIR``, and reused), and loaded as the ops
``torch.ops.gpt2lab_native.int8_avx2``, ``float_avx2``, ``float_blocks_avx2``, ``attention_avx2``,
``cache_attention_avx2``, ``causal_attention_avx512``, ``add_layer_norm``, ``gelu_avx2_``, ``decode_block``, ``decode_blocks``, ``decode_logits``,
``quantize_rows``, ``normalize_rows``, ``scale_rows_``, ``blocks``, ``float_blocks``, ``int8_vnni`` and ``float_avx512``,
with the class ``torch.classes.gpt2lab_native.DecodeBlocks``. Where they cannot be built (no
C++ compiler, not x86 with AVX2, or ``GPT2LAB_NATIVE=0``) they are left out of the candidates and
``unavailable_reason`` says why.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from gpt2lab.errors import GPT2LabError

SOURCE = Path(__file__).with_name("csrc") / "avx2.cpp"
ENV_NATIVE = "GPT2LAB_NATIVE"  # "0": never build or load the kernels
# no contraction of a*b+c into an FMA: the epilogue rounds as gpt2lab.ops.int8_linear's other paths do
CFLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp"]


def available() -> bool:
    """Whether gpt2lab's kernels (``torch.ops.gpt2lab_native``) can run here (built and loaded on first call)."""
    return unavailable_reason() is None


def avx512() -> bool:
    """Whether gpt2lab's AVX-512 kernels (``causal_attention_avx512``) can run here: its kernels load,
    and torch's own run AVX-512 (the CPU has it, and ``ATEN_CPU_CAPABILITY`` does not hold them below)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512") and available()  # no build elsewhere


def require() -> None:
    """Load the kernels, or raise a ``GPT2LabError`` saying why they cannot run here."""
    reason = unavailable_reason()
    if reason is not None:
        raise GPT2LabError(f"gpt2lab's avx2 kernels are not available: {reason}; choose another kernel")


@functools.cache
def unavailable_reason() -> str | None:
    """Why the kernels cannot run here, or None once they are loaded (building them if needed)."""
    if os.environ.get(ENV_NATIVE, "1") == "0":
        return f"{ENV_NATIVE}=0"
    capability = torch.backends.cpu.get_cpu_capability()  # what torch's own kernels use here
    if platform.machine().lower() not in ("x86_64", "amd64") or not capability.startswith(("AVX2", "AVX512")):
        return f"needs an x86 CPU with AVX2 (this one: {platform.machine()}, {capability})"
    try:
        _build_and_load()
    except Exception as error:  # a missing compiler or a failed build: the other kernels still run
        last_line = str(error).strip().splitlines()[-1:] or [type(error).__name__]
        return f"could not be built: {last_line[0]}"
    return None


def build_directory() -> Path:
    """Where the library is built and kept: one directory per torch version and source."""
    from torch.utils import cpp_extension

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
    return root / f"gpt2lab-{torch.__version__}-{source_digest()}"


@functools.cache
def source_digest() -> str:
    """What the built kernels are made of, in 12 hex digits: their source and compiler flags. The kernel
    table times them again where an entry was timed on another build (``gpt2lab.kernels``)."""
    return hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:12]


def _build_and_load() -> None:
    from torch.utils import cpp_extension  # imported here: it takes a while and most runs never need it

    if _loaded():
        return
    directory = build_directory()
    name = "gpt2lab_native"
    if not (directory / f"{name}.so").exists():
        print("gpt2lab: building its CPU kernels (once per torch version, about 10-20 s)", file=sys.stderr)
    directory.mkdir(parents=True, exist_ok=True)
    with _ninja_on_path():
        cpp_extension.load(
            name,
            [str(SOURCE)],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            is_python_module=False,
        )
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):  # torch held to AVX2: so are they
        torch.ops.gpt2lab_native.int8_vnni(False)
        torch.ops.gpt2lab_native.float_avx512(False)
    # their outputs' shapes, for tracing: a compiled decode step calls the ops themselves
    torch.library.register_fake("gpt2lab_native::int8_avx2")(
        lambda x, weight, channels, bias: x.new_empty(*x.shape[:-1], channels.shape[1])
    )
    torch.library.register_fake("gpt2lab_native::float_avx2")(
        lambda x, weight, bias: x.new_empty(*x.shape[:-1], weight.shape[0])
    )
    torch.library.register_fake("gpt2lab_native::float_blocks_avx2")(
        lambda x, weight, bias, out: x.new_empty(*x.shape[:-1], out)
    )
    torch.library.register_fake("gpt2lab_native::float_blocks")(
        lambda weight: weight.new_empty(-(-weight.shape[0] // 16), weight.shape[1], 16)
    )
    torch.library.register_fake("gpt2lab_native::attention_avx2")(lambda q, k, v, mask: q.new_empty(q.shape))
    torch.library.register_fake("gpt2lab_native::cache_attention_avx2")(
        lambda q, k, v, k_cache, v_cache, times, t, slots, pad, window: q.new_empty(q.shape)
    )
    torch.library.register_fake("gpt2lab_native::causal_attention_avx512")(
        lambda q, k, v: q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3]).transpose(1, 2)
    )
    torch.library.register_fake("gpt2lab_native::add_layer_norm")(
        lambda x, delta, weight, bias, eps: (x.new_empty(x.shape), x.new_empty(x.shape))
    )
    torch.library.register_fake("gpt2lab_native::decode_block")(lambda x, *args: x.new_empty(x.shape))
    torch.library.register_fake("gpt2lab_native::gelu_avx2_")(lambda y: None)


def int8_paths() -> tuple[str, ...]:
    """How the int8 kernel ``avx2`` can multiply on this CPU: by AVX2's byte products (``avx2``), and
    where the CPU has AVX-512 VNNI by its dot product of 64 bytes an instruction (``vnni``: the weight
    offset by 128 to unsigned, the offset taken back from the exact sums). Both give the same sums.
    ``vnni`` runs where the CPU has it and torch's own kernels are not held below AVX-512
    (``ATEN_CPU_CAPABILITY``); ``torch.ops.gpt2lab_native.int8_vnni(enable)`` sets it, and says which
    runs with ``None``."""
    return _paths("int8_vnni", "vnni")


def float_paths() -> tuple[str, ...]:
    """How the blocked float32 kernel ``float_blocks_avx2`` can multiply three or more rows on this CPU:
    four rows a pass in AVX2 (``avx2``), and where the CPU has AVX-512 up to eight in one pass over the
    weight, a block's line in one register (``avx512``). Where the AVX2 path takes four rows a pass
    (in products of multiples of four rows) both give the same bits. ``avx512`` runs where the CPU has
    it and torch's own kernels are not held below AVX-512; ``torch.ops.gpt2lab_native.float_avx512(enable)``
    sets it, and says which runs with ``None``."""
    return _paths("float_avx512", "avx512")


def on_blocks(op: str, blocks: torch.ScriptObject, x: torch.Tensor, *args) -> torch.Tensor:
    """``torch.ops.gpt2lab_native.<op>`` (``decode_blocks`` or ``decode_logits``) on a ``DecodeBlocks``,
    x and the rest of its arguments; where x is a plain tensor, with tensor subclasses'
    ``__torch_function__`` off for the call (torch function modes still see it). Before an op runs,
    torch looks that method up on each argument not a tensor, and on a ``torch.ScriptObject`` the
    lookup fails by raising and catching a C++ exception: 50-100 us of a decode step, run right after
    the step's weights have streamed through the caches (docs/benchmarks.md, item 15)."""
    call = getattr(torch.ops.gpt2lab_native, op)
    if type(x) is not torch.Tensor:  # a subclass's __torch_function__ sees the op as before
        return call(blocks, x, *args)
    with torch._C.DisableTorchFunctionSubclass():
        return call(blocks, x, *args)


def _paths(switch: str, wide: str) -> tuple[str, ...]:
    """``avx2``, and ``wide`` after it where the op ``torch.ops.gpt2lab_native.<switch>``, which turns
    that path on and off, can turn it on on this CPU (tried, then set back as it was)."""
    require()
    op = getattr(torch.ops.gpt2lab_native, switch)
    before = op(None)
    try:
        op(True)
    except RuntimeError:  # the CPU lacks it
        return ("avx2",)
    op(before)
    return ("avx2", wide)


def _loaded() -> bool:
    try:
        torch.ops.gpt2lab_native.float_avx2  # noqa: B018 (the lookup is the question)
    except (AttributeError, RuntimeError):
        return False
    return True


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch's builder runs ``ninja`` from PATH; the ``ninja`` package's own binary is used where PATH has
    none (a virtual environment that is not activated)."""
    if shutil.which("ninja"):
        yield
        return
    import ninja

    previous = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, previous]) if previous else ninja.BIN_DIR
    try:
        yield
    finally:
        os.environ["PATH"] = previous
