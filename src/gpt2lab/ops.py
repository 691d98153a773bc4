"""The linear layer's CPU kernels, a decode step's attention kernels, and the chunked linear +
cross-entropy loss.

On x86 CPUs a float32 product can run in two libraries that ship inside every x86 PyTorch build:
MKL's sgemm (what ``F.linear`` calls) and oneDNN's inner product, which takes the same row-major
weight. Which is faster depends on the CPU, the shape and the row count (``python bench/linear.py``),
so each ``Linear`` is built with a kernel: ``torch`` (always ``F.linear``), ``onednn``, or ``auto``
(the faster of the two for this product on this machine, measured once: ``gpt2lab.kernels``). The
backward products (grad @ W, grad^T @ x) always run in MKL, the faster of the two for them.

A product without gradients may also read a copy of a layer's weight laid out for it (``Linear.pack``,
``copy_weight``, ``copy_linear``): MKL's packed layout, made for one row count of two or more, or at
one row the weight transposed in memory, which oneDNN streams faster on some CPUs. Generation makes
such copies for its decode steps, and a layer for products of a row count that keeps repeating,
where they measure faster and repay their making. Without gradients,
an MLP's first product may take its tanh-GELU inside the same oneDNN call (``Linear.gelu``,
``linear_gelu``), where that measures faster, and the GELU on its own may run in its sigmoid form
(``tanh_gelu_``), where that does.

A one-row product without gradients (a decode step's) may also run in numpy's BLAS, OpenBLAS in
numpy's wheels, whose matrix-vector kernel streams the weight faster than oneDNN's or MKL's on some
CPUs: ``numpy`` on the weight as it is, ``numpy_t`` on its transposed copy. Its threads are not
torch's, so the two pools must not run at once (``numpy_blas_threads``): a decode step either runs
all its products there, with torch's own ops on one thread, or none (``GPT.pack_for_decoding``).

The results equal ``F.linear`` to float32 rounding (only the summation order differs). Anything else
(CUDA, half precision, autocast, ``torch.compile``, a build without oneDNN) takes ``F.linear``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import platform
import threading
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from gpt2lab import native

_onednn = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
_mkl_pack = getattr(torch.ops.mkl, "_mkl_reorder_linear_weight", None) if torch.backends.mkl.is_available() else None
# oneDNN's own layout of a float32 weight for its inner product (an opaque oneDNN tensor), which a plain
# weight is reordered into on every call
_onednn_pack = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None) if _onednn is not None else None
LINEAR_KERNELS = ("auto", "onednn", "torch")
READS_THE_WEIGHT = ("numpy", "avx2_f32")  # copy kernels whose copy is the weight itself (copy_weight)
# copy kernels whose copy is a plain float32 tensor of its own: contiguous, or the transpose of one
PLAIN_COPIES = ("onednn_t", "torch_t", "numpy_t", "avx2_f32_blocks")
NUMPY_KERNELS = ("numpy", "numpy_t")  # one-row products in numpy's BLAS: the weight, its transposed copy
GELU_FORMS = ("tanh", "sigmoid", "avx2")  # how tanh_gelu_ computes the activation ("avx2": gpt2lab.native)
# the kernels whose planned products gpt2lab.native's decode_block runs, by their index there: float32
# on the weight as it is, on its blocked copy, and int8 on its blocks (gpt2lab.quantize)
NATIVE_PRODUCTS = ("avx2_f32", "avx2_f32_blocks", "avx2")
GELU_BLOCK = 2**20  # elements the sigmoid form works on at a time: its passes over them stay in cache


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's float32 linear kernel."""
    return _onednn is not None


def packing_available() -> bool:
    """Whether this torch build has MKL's packed sgemm (``Linear.pack``)."""
    return _mkl_pack is not None


def onednn_packing_available() -> bool:
    """Whether this torch build lays a float32 weight out in oneDNN's own layout (``copy_weight``'s
    ``onednn_packed``)."""
    return _onednn_pack is not None


def pack_weight(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """MKL's packed copy of a float32 weight (out, in) for products of ``rows`` rows. MKL reserves 1.6-5x
    the weight's size for it, but writes (and so makes resident) about the weight's size."""
    return _mkl_pack(weight.detach(), rows)


def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, rows: int, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` read from ``packed = pack_weight(weight, rows)``: MKL's packed sgemm
    where x has ``rows`` rows, its plain sgemm on ``weight`` otherwise; no gradient."""
    return torch.ops.mkl._mkl_linear(x, packed, weight, bias, rows)


def copy_weight(weight: torch.Tensor, rows: int, kernel: str) -> torch.Tensor:
    """The copy of a float32 weight (out, in) that ``kernel`` reads in products of ``rows`` rows:
    ``mkl_packed``, MKL's packed layout (``pack_weight``); ``onednn_packed``, oneDNN's own layout for
    its inner product of that many rows (an opaque oneDNN tensor: a plain weight is reordered into it
    on every call, 3-7% of a product of 2,048 rows on the family-26 EPYC); ``onednn_t``, ``torch_t`` or ``numpy_t``,
    the weight transposed in memory ((in, out)-contiguous, seen as (out, in)); ``numpy``, no copy
    (the weight itself, which numpy's BLAS reads as it is); ``avx2_f32``, no copy either (gpt2lab's own
    kernel reads the weight as it is: ``gpt2lab.native``); ``avx2_f32_blocks``, the weight in blocks of
    16 output channels, each one stream of their values at one input position after another, as gpt2lab's
    own blocked kernel reads it."""
    if kernel == "mkl_packed":
        return pack_weight(weight, rows)
    if kernel == "onednn_packed":
        return _onednn_pack(weight.detach(), rows)
    if kernel in ("avx2_f32", "avx2_f32_blocks"):
        native.require()
    if kernel == "avx2_f32_blocks":
        return torch.ops.gpt2lab_native.float_blocks(weight.detach())
    if kernel in READS_THE_WEIGHT:
        return weight.detach()
    return weight.detach().t().contiguous().t()


def blocks(qweight: torch.Tensor) -> torch.Tensor:
    """An int8 weight (out, in) as gpt2lab's own int8 kernel reads it (``gpt2lab.native``): (out / 4,
    in / 32, 4, 32), zero-padded to whole blocks and chunks, so that each block of 4 output channels is
    one stream of their rows' 32-byte chunks in turn."""
    native.require()
    return torch.ops.gpt2lab_native.blocks(qweight)


def float_avx2(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` by gpt2lab's own float32 kernel (``gpt2lab.native``), for few rows
    without gradients."""
    return torch.ops.gpt2lab_native.float_avx2(x, weight, bias)


def float_blocks_avx2(x: torch.Tensor, blocked: torch.Tensor, out: int, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` by gpt2lab's own float32 kernel on ``blocked``, the weight's copy
    (``copy_weight``'s ``avx2_f32_blocks``) with ``out`` output channels, for few rows without gradients."""
    return torch.ops.gpt2lab_native.float_blocks_avx2(x, blocked, bias, out)


def numpy_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for one row x (..., in) in numpy's BLAS, on the (out, in) weight
    in whichever layout it has (row-major, or a transposed copy's view: BLAS reads either without
    copying); no gradient. Run it within ``numpy_blas_threads``."""
    row = x.detach().reshape(-1).numpy()
    y = torch.from_numpy(weight.detach().numpy() @ row)
    if bias is not None:
        y.add_(bias.detach())
    return y.view(*x.shape[:-1], weight.shape[0])


@functools.cache
def _numpy_blas() -> tuple:
    """threadpoolctl's controllers of the BLAS libraries numpy has loaded (OpenBLAS in its wheels)."""
    import numpy  # noqa: F401  (loads its BLAS, which the controller finds among the process's libraries)
    from threadpoolctl import ThreadpoolController

    return tuple(ThreadpoolController().select(user_api="blas").lib_controllers)


def numpy_blas_available() -> bool:
    """Whether numpy has a BLAS whose threads can be set (``numpy`` kernels are candidates then)."""
    return bool(_numpy_blas())


@contextlib.contextmanager
def numpy_blas_threads() -> Iterator[None]:
    """While products run in numpy's BLAS (``numpy_linear``): its threads as many as torch's intra-op
    threads, and torch's own ops on one thread, so that neither pool spins on a core the other needs
    (with torch's threads left at two, a 124M decode step on numpy's products took five times as
    long). Both are restored after."""
    threads = torch.get_num_threads()
    blas = _numpy_blas()
    before = [lib.num_threads for lib in blas]
    for lib in blas:
        lib.set_num_threads(threads)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        for lib, n in zip(blas, before, strict=True):
            lib.set_num_threads(n)


_optimizer_steps = 0  # optimizer steps taken in this process (``_count_optimizer_step``)


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


# Fused optimizers (AdamW(fused=True), what gpt2lab trains with) change the weights without counting
# the change in their version counter, so any optimizer step also makes every copy stale.
register_optimizer_step_post_hook(_count_optimizer_step)


def weight_key(weight: torch.Tensor) -> tuple[int, int, int]:
    """What tells whether a copy made from ``weight`` still matches it: its storage, its count of in-place
    changes (``load_state_dict``, an unfused optimizer) and the optimizer steps taken in this process."""
    return weight.data_ptr(), weight._version, _optimizer_steps


def use_onednn(x: torch.Tensor, weight: torch.Tensor, kernel: str = "auto") -> bool:
    """Whether ``linear`` may run oneDNN for this input: not when ``kernel`` is ``torch``, else for
    float32 on the CPU, outside autocast and compile."""
    return (
        kernel != "torch"
        and _onednn is not None
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b with the forward in oneDNN and the backward in MKL (x is 2-D here)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_w = grad.t() @ x if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, kernel: str = "auto"
) -> torch.Tensor:
    """``F.linear``, through oneDNN where ``use_onednn`` says so, or numpy's BLAS for kernel ``numpy``
    (one row without gradients only: ``numpy_linear``)."""
    if kernel == "numpy":
        return numpy_linear(x, weight, bias)
    if not use_onednn(x, weight, kernel):
        return F.linear(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])
    if needs_grad(x, weight, bias):
        y = _OneDNNLinear.apply(x2, weight, bias)
    else:
        y = _onednn(x2, weight, bias, "none", [], "")
    return y.view(*x.shape[:-1], weight.shape[0])


def tanh_gelu_(y: torch.Tensor, form: str = "tanh") -> torch.Tensor:
    """``F.gelu(y, approximate="tanh")``, GPT-2's GELU 0.5 y (1 + tanh(u)) with u = sqrt(2 / pi) (y +
    0.044715 y^3), written over y (a contiguous product output the caller owns, without gradients):
    a new output of hundreds of rows costs its page faults again on every call. The form ``sigmoid``
    computes the same function as y sigmoid(2u) (equal to float32 rounding), in five passes of cheap
    operations over blocks of ``GELU_BLOCK`` elements, which stay in cache: aten's tanh is several
    times slower than its sigmoid on some CPUs. The form ``avx2`` computes y sigmoid(2u) in one pass,
    eight values at a time, with an exponential of its own (``gpt2lab.native``'s ``gelu_avx2_``; within
    a few float32 roundings of the others): aten's take microseconds of fixed cost for the 3,072 values
    of a decode step's row. Which form is faster is measured (kind ``tanh_gelu`` in ``gpt2lab.kernels``)."""
    if form == "tanh":
        return torch.ops.aten.gelu_(y, approximate="tanh")
    if form == "avx2":
        native.require()
        torch.ops.gpt2lab_native.gelu_avx2_(y)
        return y
    if form != "sigmoid":
        raise ValueError(f"GELU form must be one of {GELU_FORMS}, got {form!r}")
    n = y.shape[-1]
    ys = y.view(-1, n)
    rows = max(1, GELU_BLOCK // n)
    u = gelu_scratch(min(rows, len(ys)) * n, y).view(-1, n)  # one block's sigmoid(2u)
    two_c = 2 * math.sqrt(2 / math.pi)
    for start in range(0, len(ys), rows):
        block = ys[start : start + rows]
        t = u[: len(block)]
        torch.addcmul(block, torch.square(block, out=t), block, value=0.044715, out=t)  # y + 0.044715 y^3
        block.mul_(t.mul_(two_c).sigmoid_())
    return y


_scratch = threading.local()  # each thread's working blocks for tanh_gelu_'s sigmoid form


def gelu_scratch(numel: int, like: torch.Tensor) -> torch.Tensor:
    """A tensor of ``numel`` elements of ``like``'s dtype and device to work in, the same memory on each
    call from this thread (another thread has its own): a block allocated afresh (megabytes, past
    malloc's threshold for mapping new pages) costs its page faults again on every call, a few times
    the time of the pass that first writes it (docs/benchmarks.md, item 14). Its values are left over."""
    blocks = _scratch.__dict__.setdefault("blocks", {})
    key = (like.dtype, like.device)
    block = blocks.get(key)
    if block is None or block.numel() < numel:
        block = blocks[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return block[:numel]


def gelu_form(table, out_features: int, in_features: int, rows: int) -> str:
    """The form of ``tanh_gelu_`` over the (rows, out) output of an (out, in) layer: the one ``table`` (a
    ``gpt2lab.kernels.KernelTable``) measured faster, kind ``tanh_gelu``; ``tanh`` without a table."""
    if table is None:
        return "tanh"
    return table.choose(out_features, in_features, rows, kind="tanh_gelu")


def linear_gelu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, kernel: str = "auto", form: str = "tanh"
) -> torch.Tensor:
    """``F.gelu(linear(x, weight, bias, kernel), approximate="tanh")``, the GELU in ``form``
    (``tanh_gelu_``). The kernel ``onednn_gelu`` makes it one oneDNN call that applies the GELU to each
    block of the output while the block is still in cache, instead of a second pass over the whole
    output; it has no gradient (inference only)."""
    if kernel != "onednn_gelu":
        return tanh_gelu_(linear(x, weight, bias, kernel), form)
    y = _onednn(x.reshape(-1, x.shape[-1]), weight, bias, "gelu", [], "tanh")
    return y.view(*x.shape[:-1], weight.shape[0])


def copy_linear(
    x: torch.Tensor,
    copy: torch.Tensor,
    kernel: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gelu: bool = False,
    form: str = "tanh",
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (its tanh-GELU with ``gelu``, in ``form``: ``tanh_gelu_``) read from
    ``copy = copy_weight(weight, rows, kernel)`` by ``kernel``; no gradient. oneDNN takes the GELU into
    its call."""
    if kernel == "mkl_packed":  # these three: the GELU after the product
        y = packed_linear(x, copy, x.numel() // x.shape[-1], weight, bias)
    elif kernel == "avx2_f32":
        y = float_avx2(x, copy, bias)
    elif kernel == "avx2_f32_blocks":
        y = float_blocks_avx2(x, copy, weight.shape[0], bias)
    else:
        plain = kernel.removesuffix("_t").removesuffix("_packed")  # oneDNN reads its own layout as a weight
        if gelu:
            return linear_gelu(x, copy, bias, "onednn_gelu" if plain == "onednn" else plain, form)
        return linear(x, copy, bias, plain)
    return tanh_gelu_(y, form) if gelu else y


def needs_grad(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether autograd records a product of these tensors."""
    return torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )


def _product(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kernel: str,
    copy: torch.Tensor | None,
    gelu: bool = False,
    form: str = "tanh",
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The product x -> F.linear(x, weight, bias) (its tanh-GELU with ``gelu``, in ``form``:
    ``tanh_gelu_``) by ``kernel``, reading ``copy`` (``copy_weight``'s) where not None."""
    if copy is not None:
        return lambda x: copy_linear(x, copy, kernel, weight, bias, gelu, form)
    if gelu:
        return lambda x: linear_gelu(x, weight, bias, kernel, form)
    return lambda x: linear(x, weight, bias, kernel)


@dataclasses.dataclass(frozen=True, slots=True)
class NativeProduct:
    """A layer's planned product as gpt2lab.native's ``decode_block`` runs it: its kernel (the index of
    its name in ``NATIVE_PRODUCTS``), the weight as that kernel reads it, the int8 weight's channels
    (``weight_channels``; None in float32), the bias, the output's width, and where the product takes
    the tanh-GELU after it, the GELU's form (``tanh_gelu_``)."""

    kernel: int
    weight: torch.Tensor
    scale: torch.Tensor | None
    bias: torch.Tensor | None
    out_features: int
    gelu_form: str | None


@dataclasses.dataclass(slots=True)
class _Plan:
    """``Linear.plan``'s choice for inputs of ``numel`` elements: the tensors it was made for, the
    weight's ``weight_key`` then, and the product with and without the GELU (that one made on first use)."""

    numel: int
    weight: torch.Tensor
    bias: torch.Tensor | None
    key: tuple
    calls: dict[bool, Callable[[torch.Tensor], torch.Tensor]]


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) whose forward is ``linear`` above with the
    layer's ``kernel`` (one of LINEAR_KERNELS); ``auto`` asks ``table`` (a ``gpt2lab.kernels.KernelTable``)
    for each product's kernel, or takes oneDNN where it runs when there is no table.

    ``pack(rows, kernel)`` adds a kernel for products of exactly ``rows`` rows without gradients, which
    reads a copy of the weight laid out for it (``copy_weight``; ``unpack`` drops it): MKL's packed
    sgemm, oneDNN's product on its own layout of the weight, or at one row oneDNN or MKL on the
    transposed weight. Generation packs for its decode steps; with ``pack_repeated`` (and ``auto``) a
    layer also makes the copy the table chose for products of one row count (two or more, kind
    ``packed``) once they have repeated as often as the table measures it takes to repay it
    (``KernelTable.pack_repays``): evaluation batches, same-length prompts. One copy at a time."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        kernel: str = "auto",
        table=None,
        pack_repeated: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, bias)
        if kernel not in LINEAR_KERNELS:
            raise ValueError(f"linear kernel must be one of {LINEAR_KERNELS}, got {kernel!r}")
        self.kernel, self.table, self.pack_repeated = kernel, table, pack_repeated
        self.packed: tuple[int, tuple, torch.Tensor, str] | None = None  # rows, weight_key, copy, kernel
        self._counted: tuple = (None, {})  # weight version, {rows: products} since it or the copy changed
        self.planned: _Plan | None = None

    def __getstate__(self) -> dict:
        """What copy.deepcopy and pickle keep: not the weight's copy (MKL's and oneDNN's packed ones are
        tensors with no storage to copy) nor the counts towards one; a copy of the layer makes its own."""
        return self.__dict__ | {"packed": None, "_counted": (None, {}), "planned": None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        planned = self._planned(x)
        if planned is not None:
            return planned(x)
        if not use_onednn(x, self.weight, self.kernel):
            return linear(x, self.weight, self.bias, self.kernel)
        return _product(self.weight, self.bias, *self._choose(x.numel() // self.in_features))(x)

    def gelu(self, x: torch.Tensor) -> torch.Tensor:
        """``F.gelu(self(x), approximate="tanh")`` (an MLP's first product and its activation). Without
        gradients: the weight's copy where there is one for this many rows, else the kernel the table
        measures the fastest with the GELU (kind ``gelu``), which may be one oneDNN call with the GELU
        fused in (``linear_gelu``); a fixed ``onednn`` kernel always fuses. A GELU on its own takes the
        form measured faster for its shape (``ops.gelu_form``). Where the fused call is the
        fastest, repeated products make no MKL copy: the GELU's own pass over the output, which fusing
        saves, costs more than packing saves (c_fc of 124M at 256 and 2,048 rows on the Xeon); they
        make oneDNN's own layout where kind ``packed`` chose it, which the fused call reads."""
        planned = self._planned(x, gelu=True)
        if planned is not None:
            return planned(x)
        if use_onednn(x, self.weight, self.kernel) and not needs_grad(x, self.weight, self.bias):
            return self._gelu_product(x.numel() // self.in_features)(x)
        return F.gelu(self(x), approximate="tanh")

    def _gelu_product(self, rows: int, count: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
        """The product of ``rows`` rows and its GELU, as ``gelu`` runs them without gradients."""
        kernel, copy = self._choose(rows, gelu=True, count=count)
        return _product(self.weight, self.bias, kernel, copy, gelu=True, form=self._gelu_form(rows))

    def _gelu_form(self, rows: int) -> str:
        table = self.table if self.kernel == "auto" else None  # a fixed kernel measures nothing
        return gelu_form(table, self.out_features, self.in_features, rows)

    def _choose(self, rows: int, gelu: bool = False, count: bool = True) -> tuple[str, torch.Tensor | None]:
        """The kernel of a CPU float32 product of ``rows`` rows (with the GELU: ``gelu``) and the copy
        of the weight it reads (None: the weight itself), outside autocast and compile. ``count``:
        whether the product counts towards a copy under ``pack_repeated`` (``_reads_packed``)."""
        if gelu:
            kernel = "onednn_gelu" if self.kernel == "onednn" else self.kernel_for(rows, kind="gelu")
        if self._reads_packed(rows, count=count, fused=gelu and kernel == "onednn_gelu"):
            return self.packed[3], self.packed[2]
        return (kernel if gelu else self.kernel_for(rows)), None

    def kernel_for(self, rows: int, kind: str = "float32") -> str:
        """The kernel of a ``kind`` CPU product of ``rows`` rows (``gpt2lab.kernels.candidates``): ``auto``
        asks the table (if any)."""
        if self.kernel == "auto" and self.table is not None:
            return self.table.choose(self.out_features, self.in_features, rows, kind=kind)
        return self.kernel

    def pack(self, rows: int, kernel: str = "mkl_packed") -> None:
        """Keep the copy of the weight that ``kernel`` (``kernels.COPY_KERNELS``) reads for products of
        ``rows`` rows (about the weight's memory again), read instead of the weight by such products on
        the CPU without grad until ``unpack``; not once the weight is replaced or changed. Results
        equal ``F.linear``'s to float32 rounding."""
        w = self.weight
        self.packed = (rows, weight_key(w), copy_weight(w, rows, kernel), kernel)
        self.planned = None  # it may have chosen the previous copy
        self._counted = (None, {})  # a new copy: the next must repay itself from here

    def replace_copy(self, copy: torch.Tensor) -> None:
        """Read ``copy``, equal to the copy ``pack`` made, instead of it (``GPT.pack_for_decoding``
        moves copies into 2 MiB pages)."""
        rows, key, _, kernel = self.packed
        self.packed = (rows, key, copy, kernel)
        self.planned = None  # it may have chosen the previous copy

    def unpack(self) -> None:
        self.packed = self.planned = None

    def plan(self, rows: int) -> None:
        """Choose once the kernel (and copy) of this layer's CPU products of ``rows`` rows without
        gradients, and run them so until ``unplan``, ``pack`` or ``unpack``, or the weight changes or is
        replaced: the same choice as each product would make (``_choose``), without making it again
        per call. A decode step is dozens of products, and choosing costs about as much Python as a
        small product takes (architecture.md, "Kernels on the CPU"). Where products of ``rows`` rows
        still count towards a copy (``pack_repeated``, two rows or more, no copy yet), nothing is
        planned."""
        self.planned = None
        w = self.weight
        if not use_onednn(w, w, self.kernel):  # a CPU float32 weight and a kernel of the layer's own
            return
        if self.pack_repeated and rows >= 2 and not (self.packed is not None and self.packed[0] == rows):
            return
        with torch.no_grad():
            call = _product(w, self.bias, *self._choose(rows, count=False))
        self.planned = _Plan(rows * self.in_features, w, self.bias, weight_key(w), {False: call})

    def unplan(self) -> None:
        self.planned = None

    def _planned(self, x: torch.Tensor, gelu: bool = False) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The planned product for x (``plan``), or None where there is no plan for it: another row
        count, gradients on, autocast or compile, or a weight changed (the plan is dropped) or replaced
        since. The plan with the GELU is chosen on its first use. (``self.weight`` would be looked up
        through ``nn.Module.__getattr__``, slower than the rest of these checks together.)"""
        plan = self.planned
        if (
            plan is None
            or x.numel() != plan.numel
            or torch.is_grad_enabled()
            or torch.is_autocast_enabled("cpu")
            or torch.compiler.is_compiling()
            or not self.plan_holds()
        ):
            return None
        call = plan.calls.get(gelu)
        if call is None:
            call = plan.calls[gelu] = self._gelu_product(plan.numel // self.in_features, count=False)
        return call

    def plan_holds(self) -> bool:
        """Whether there is a plan (``plan``) and it still holds: the weight and bias it was made for are
        the layer's, unchanged (else it is dropped)."""
        plan = self.planned
        if plan is None:
            return False
        params = self._parameters
        if (
            params["weight"] is not plan.weight
            or params["bias"] is not plan.bias
            or weight_key(plan.weight) != plan.key
        ):
            self.planned = None
            return False
        return True

    def native_cost(self, rows: int) -> float | None:
        """None: a float32 layer is not planned again on gpt2lab's kernels for a block's one op
        (``model.Block.plan``); it takes them on near ties as generation lays out its weight
        (``model.GPT.pack_for_decoding``)."""
        return None

    def native_product(self, rows: int, gelu: bool = False) -> NativeProduct | None:
        """This layer's planned product of ``rows`` rows (with ``gelu``, and its GELU) as gpt2lab.native's
        ``decode_block`` runs it, or None where there is no such plan (``plan``) or it runs another kernel."""
        plan = self.planned
        if plan is None or plan.numel != rows * self.in_features or not self.plan_holds():
            return None
        with torch.no_grad():  # the choice a planned product makes: without gradients
            kernel, copy = self._choose(rows, gelu=gelu, count=False)
        if kernel not in NATIVE_PRODUCTS or copy is None:
            return None
        form = self._gelu_form(rows) if gelu else None
        return NativeProduct(NATIVE_PRODUCTS.index(kernel), copy, None, self.bias, self.out_features, form)

    @property
    def reads_numpy(self) -> bool:
        """Whether its packed products run in numpy's BLAS (``numpy_blas_threads`` around them)."""
        return self.packed is not None and self.packed[3] in NUMPY_KERNELS

    def _reads_packed(self, rows: int, count: bool = True, fused: bool = False) -> bool:
        """Whether a CPU product of ``rows`` rows reads the weight's copy: without grad, one made for this
        many rows from the weight as it is now (a stale copy is dropped). Under ``pack_repeated`` the
        copy is made here once enough products of this row count (two or more) have come since the
        weight or the copy last changed to repay it (``count`` False: this product is not counted).
        ``fused``: the product runs with its GELU fused into oneDNN's call, beside which no MKL copy
        paid (``gelu``); it counts towards oneDNN's own layout only, which the fused call reads."""
        if self.packed is not None and self.packed[1] != weight_key(self.weight):
            self.packed = None
        if torch.is_grad_enabled():
            return False
        if self.packed is not None and self.packed[0] == rows:
            return True
        if not (count and self.pack_repeated) or rows < 2 or self.kernel != "auto" or self.table is None:
            return False
        shape = (self.out_features, self.in_features, rows)
        copy = self.table.choose(*shape, kind="packed")
        if fused and copy != "onednn_packed":
            return False
        version = weight_key(self.weight)
        if self._counted[0] != version or len(self._counted[1]) > 64:  # a new weight, or prompts of every length
            self._counted = (version, {})
        counts = self._counted[1]
        counts[rows] = counts.get(rows, 0) + 1
        if counts[rows] < self.table.pack_repays(*shape):
            return False
        self.pack(rows, copy)  # repaid: the copy kernel chosen
        return True


# oneDNN's quantized linear: its int8 weight laid out once, and the product (x86 builds with oneDNN)
_qlinear = (
    (torch.ops.onednn.qlinear_prepack, torch.ops.onednn.qlinear_pointwise)
    if torch.backends.mkldnn.is_available()
    and platform.machine().lower() in ("x86_64", "amd64")
    and hasattr(torch.ops.onednn, "qlinear_pointwise")
    else None
)


AVX2_MAX_ROWS = 16  # gpt2lab's own kernel (native) is a candidate up to this many rows: it reads for few


def int8_kernels(rows: int | None = None) -> tuple[str, ...]:
    """The int8 kernels this torch build has for products of ``rows`` rows (None: of any), the fallback
    first. Each quantizes the input per row (one scale per token). fbgemm's dynamic linear quantizes
    its whole input with one scale, so the rows are first scaled to the same largest magnitude and the
    products scaled back; ``torch._int_mm`` runs signed 8-bit inputs; ``qlinear``, oneDNN's quantized
    linear, runs unsigned ones (the signed values shifted by 128, its zero point), the form its int8
    kernels take natively, with or without VNNI (x86 only); ``avx2``, gpt2lab's own (``gpt2lab.native``;
    x86 with AVX2, up to ``AVX2_MAX_ROWS`` rows), reads a weight laid out for it in one stream. Which is
    fastest depends on the CPU and the row count (docs/benchmarks.md): the choice is measured."""
    fbgemm = ("fbgemm",) if "fbgemm" in torch.backends.quantized.supported_engines else ()
    qlinear = ("qlinear",) if _qlinear is not None else ()
    few = rows is None or rows <= AVX2_MAX_ROWS
    return (*fbgemm, "int_mm", *qlinear, *(("avx2",) if few and native.available() else ()))


def quantize_weight(weight: torch.Tensor, levels: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scale per output channel): symmetric, the largest magnitude of each row
    of ``weight`` (out, in) maps to ``levels`` (127; 63 where the kernels lack VNNI:
    ``gpt2lab.kernels.int8_weight_levels``)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / levels
    return (w / scale[:, None]).round_().clamp_(-levels, levels).to(torch.int8), scale


def pack_int8(
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    kernel: str,
    channels: torch.Tensor | None = None,
):
    """The weight in the form ``int8_linear``'s ``kernel`` reads, made once per layer and kernel, with
    its channels (``weight_channels``: made here where not given; a layer that packs for several
    kernels passes its own, made once)."""
    bias = None if bias is None else bias.detach().float()
    channels = weight_channels(qweight, scale) if channels is None else channels
    if kernel == "fbgemm":  # the bias packed in (one op fewer at one row), and kept for int8_linear's rows
        zero = torch.zeros(len(scale), dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensors are deprecated; fbgemm's packing takes only them
            warnings.simplefilter("ignore", UserWarning)
            q = torch._make_per_channel_quantized_tensor(qweight, scale.double(), zero, 0)
        return torch.ops.quantized.linear_prepack(q, bias), channels, bias
    if kernel == "qlinear":  # oneDNN's own layout (a wrong one crashes the product): made here only
        return _qlinear[0](qweight, None), channels, torch.zeros(len(scale), dtype=torch.long), bias
    if kernel == "avx2":  # blocks of 4 output channels, their rows interleaved in 32-byte chunks
        return blocks(qweight), channels, bias
    return qweight.t(), channels, bias  # (in, out) view: _int_mm's B


def weight_channels(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(2, out) float32: each output channel's scale, and the sum of its dequantized weights (the sum
    of its int8 row, exact, times its scale), by which ``int8_linear`` multiplies each input row's center."""
    return torch.stack([scale.float(), qweight.sum(1, dtype=torch.int32).float() * scale.float()])


def row_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of x (rows, in): its center (the midpoint of its smallest and largest values) and its
    half range (at least 1e-12), (rows, 1) each."""
    lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    return (hi + lo) / 2, ((hi - lo) / 2).clamp_min_(1e-12)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row of x (rows, in) quantized to 8 bits about its center, its half range mapping to 127
    (``row_range``): (q, scales, centers), q the rounded (x - center) / scale within 127 as float32,
    scales and centers (rows, 1). About the center, the 255 levels span each row's own range, however
    lopsided (a GELU's output runs from -0.17 to its largest: symmetric levels would leave about half
    unused)."""
    center, half = row_range(x)
    scale = half.div_(127)
    return torch.div(x - center, scale).round_().clamp_(-127, 127), scale, center


def int8_linear(x: torch.Tensor, packed, kernel: str) -> torch.Tensor:
    """x (rows, in) float32 (``avx2``: (..., in), its leading dimensions kept) times an int8 weight
    packed by ``pack_int8``, plus its bias: each input row quantized to 8 bits about its center
    (``quantize_rows``), int32 accumulation, float32 out, the center times the weight's sums added back
    (((sum * row scale) * channel scale) + row center * channel sum) + bias. Exact in int32 where the
    kernel has VNNI, or the weight keeps within 63 (``quantize_weight``'s levels)."""
    if kernel == "fbgemm" and len(x) == 1:  # fbgemm quantizes the row over its range and zero itself
        return fbgemm_linear(x, packed[0])
    if kernel == "avx2":  # quantizes x itself, as below
        return torch.ops.gpt2lab_native.int8_avx2(x, *packed)
    if not torch.compiler.is_compiling() and native.available():  # compiled: traced in aten
        return _int8_linear_native(x, packed, kernel)
    if kernel == "fbgemm":  # one input scale per call: every row first centered and scaled to [-1, 1]
        prepacked, channels, bias = packed
        center, half = row_range(x)
        y = fbgemm_linear((x - center) / half, prepacked)  # bias included: scale the rest
        return _fbgemm_rows(y, half, center, channels, bias)
    qx, x_scale, center = quantize_rows(x)
    if kernel == "qlinear":  # input scale 1, output scale 1: the int32 sums times the weight's scales
        qweight, channels, zero, bias = packed
        qx = qx.add_(128).to(torch.uint8)
        y = _qlinear[1](qx, 1.0, 128, qweight, channels[0], zero, None, 1.0, 0, torch.float32, "none", [], "")
        y = y.mul_(x_scale)
    else:
        qweight_t, channels, bias = packed
        y = torch._int_mm(qx.to(torch.int8), qweight_t).float().mul_(x_scale).mul_(channels[0])
    y = y.add_(center * channels[1])
    return y if bias is None else y.add_(bias)


def _fbgemm_rows(y: torch.Tensor, half: torch.Tensor, center: torch.Tensor, channels, bias) -> torch.Tensor:
    """fbgemm's product y of the centered, scaled rows (bias included) scaled back: bias + half (y -
    bias), plus each row's center times the weight's sums."""
    y = y.mul_(half) if bias is None else torch.lerp(bias, y, half, out=y)
    return y.add_(center * channels[1])


def _int8_linear_native(x: torch.Tensor, packed, kernel: str) -> torch.Tensor:
    """``int8_linear`` of ``fbgemm``, ``int_mm`` and ``qlinear`` with the input's scaling or
    quantization, and the output's scaling, each one pass of gpt2lab.native (``normalize_rows``,
    ``quantize_rows``, ``scale_rows_``, the last in the product's own memory) instead of up to seven
    aten ops each with a new tensor, whose page faults cost more than the passes at hundreds of rows:
    the same values."""
    native_ops = torch.ops.gpt2lab_native
    if kernel == "fbgemm":
        prepacked, channels, bias = packed
        x_norm, half, center = native_ops.normalize_rows(x)
        return _fbgemm_rows(fbgemm_linear(x_norm, prepacked), half, center, channels, bias)
    qx, x_scale, center = native_ops.quantize_rows(x, 128 if kernel == "qlinear" else 0)
    if kernel == "qlinear":
        qweight, channels, zero, bias = packed
        y = _qlinear[1](qx, 1.0, 128, qweight, channels[0], zero, None, 1.0, 0, torch.float32, "none", [], "")
        return native_ops.scale_rows_(y, x_scale, center, channels, True, bias)
    qweight_t, channels, bias = packed
    return native_ops.scale_rows_(torch._int_mm(qx, qweight_t), x_scale, center, channels, False, bias)


def fbgemm_linear(x: torch.Tensor, prepacked) -> torch.Tensor:
    """fbgemm's dynamic int8 linear of x (rows, in) with its packed weight (``pack_int8``; bias
    included). Before an op runs, torch asks each argument that is not a tensor for
    ``__torch_function__``; the packed weight is a TorchScript object, and its lookup of a missing
    attribute throws and catches a C++ exception, which takes as long as a small product
    (docs/benchmarks.md, item 7). No argument here overrides torch's functions, so that check is off
    around the call, which goes to the op's C++ function itself (``_linear_dynamic``)."""
    with torch._C.DisableTorchFunctionSubclass():
        return _linear_dynamic()(x, prepacked, False)


@functools.cache
def _linear_dynamic() -> Callable:
    """fbgemm's dynamic linear as the C++ function of its one overload: torch.ops' Python wrapper of an
    op that takes a TorchScript object first looks through every argument for a fake one (for
    tracing), which no call here passes (docs/benchmarks.md, item 7)."""
    op = torch.ops.quantized.linear_dynamic.default
    return getattr(op, "_op", op)


# how a decode step's one query per row attends: the fallback first; ``avx2`` where gpt2lab.native runs
ONE_QUERY_KERNELS = ("products", "sdpa", "avx2")


def one_query_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    enable_gqa: bool,
    kernel: str = "products",
) -> torch.Tensor:
    """SDPA for one query per row (a decode step): q (B, nh, 1, hs), k and v (B, nkv, S, hs), a boolean
    mask broadcastable to (B, 1, 1, S) or None; (B, nh, 1, hs) out. ``kernel``: ``products``, three
    small products (``q @ k^T``, softmax, ``@ v``) with each kv head's group of queries (h // group, as
    SDPA's enable_gqa) as one block of rows, so grouped heads need no copies of k and v; or ``sdpa``,
    ``F.scaled_dot_product_attention`` itself, whose CPU flash kernel opens a parallel region and
    allocates buffers on every call; or ``avx2``, gpt2lab's own (``gpt2lab.native``), one pass of each
    query over its keys and values where they lie in the cache, on one thread for a short cache. Which
    is faster depends on the CPU and the key count (docs/benchmarks.md): ``Backends.decode_attention``
    measures it (kind ``attention`` of gpt2lab.kernels). A compiled CPU step runs ``reduction``, sums
    of elementwise products that inductor fuses."""
    if kernel == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=enable_gqa)
    if kernel == "avx2":  # grouped heads read their kv head, as enable_gqa
        return torch.ops.gpt2lab_native.attention_avx2(q, k, v, attn_mask)
    B, nh, _, hs = q.shape
    nkv, S = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(hs)
    if kernel == "reduction":  # for a compiler to fuse: eager, every product would be made
        qg = q.view(B, nkv, nh // nkv, 1, hs)  # (B, nkv, group, 1, hs)
        att = (k[:, :, None] * qg).sum(-1) * scale  # (B, nkv, group, S)
        if attn_mask is not None:
            att = att.masked_fill(~attn_mask, float("-inf"))  # (B, 1, 1, S) over (B, nkv, group, S)
        y = (att.softmax(dim=-1)[..., None] * v[:, :, None]).sum(3)  # (B, nkv, group, hs)
        return y.view(B, nh, 1, hs)
    q = q.reshape(B * nkv, nh // nkv, hs)  # (B * nkv, group, hs)
    k, v = k.reshape(B * nkv, S, hs), v.reshape(B * nkv, S, hs)  # views of the cache
    # the scale in the product: baddbmm's alpha (beta=0 ignores its first term, left unset)
    att = torch.baddbmm(q.new_empty(()), q, k.transpose(1, 2), beta=0, alpha=scale)  # (B * nkv, group, S)
    if attn_mask is not None:
        att = att.view(B, nkv, -1, S).masked_fill(~attn_mask, float("-inf")).view(B * nkv, -1, S)
    return torch.bmm(att.softmax(dim=-1), v).view(B, nh, 1, hs)  # (B, nh, 1, hs)


# how a whole prompt's causal attention runs without gradients: the fallback first; ``avx512`` where
# gpt2lab.native runs on an AVX-512 CPU
CAUSAL_KERNELS = ("sdpa", "avx512")


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str = "sdpa") -> torch.Tensor:
    """Causal SDPA of a whole prompt without gradients: q (B, nh, T, hs), k and v (B, nkv, T, hs), nh a
    multiple of nkv (grouped queries); (B, nh, T, hs) out. ``kernel``: ``sdpa``,
    ``F.scaled_dot_product_attention`` itself, whose CPU flash kernel computes whole blocks of scores
    about the diagonal, in products of its own; or ``avx512``, gpt2lab's own (``gpt2lab.native``; float32,
    head size a multiple of 16): tiles of six queries by 32 keys up to the diagonal, each query's
    softmax exact over its own keys, its output returned as a view of (B, T, nh, hs), the layout the
    projection after it reads. ``Backends.causal_attention`` measures which is faster (kind ``causal``
    of gpt2lab.kernels)."""
    if kernel == "avx512":
        return torch.ops.gpt2lab_native.causal_attention_avx512(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


def add_layer_norm(
    x: torch.Tensor, delta: torch.Tensor, norm: nn.LayerNorm, fused: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x + delta`` and ``norm`` of it: a pre-norm block's residual add and the LayerNorm after it.
    ``fused`` (a forward through the KV cache), on the CPU in float32 without gradients and outside
    compile (inductor fuses them itself), where ``gpt2lab.native`` runs: one pass of its
    ``add_layer_norm``, equal to the two to float32 rounding. A decode step is dozens of small
    operations, each several times slower than its arithmetic right after a product has streamed
    megabytes of weights through the caches (``python bench/decode_step.py``): one fewer a block."""
    if (
        fused
        and x.device.type == "cpu"
        and x.dtype == delta.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and norm.weight is not None
        and norm.bias is not None
        and native.available()
    ):
        return torch.ops.gpt2lab_native.add_layer_norm(x, delta, norm.weight, norm.bias, norm.eps)
    x = x + delta
    return x, norm(x)


CHUNK_ELEMS = 2**24  # logits a chunk of linear_cross_entropy holds


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits x W[:vocab]^T against targets, a chunk of rows at a time, gradients
    included.

    Each chunk's logits are made, turned in place into their gradient (softmax minus one-hot, over
    the count of scored rows) and multiplied back into the gradients of x and W before the next chunk,
    so the (rows, vocab) logits never exist whole: at 4 x 256 tokens and GPT-2's 50,257 tokens that is
    four 206 MB tensors (logits, log-softmax and their gradients) a step that are never allocated.
    The weight's gradient is made once, whole (rows past ``vocab`` zero), and handed back as it is when
    the loss's gradient is 1: each fresh wte-sized tensor costs its page faults (50 ms at 124M here).
    """

    @staticmethod
    def forward(ctx, x, weight, targets, vocab: int, chunk: int, need_grad: bool, kernel: str) -> torch.Tensor:
        scored = targets != -100
        count = scored.sum()
        w = weight[:vocab]
        grad_x = grad_w = None
        if need_grad:
            grad_x, grad_w = torch.empty_like(x), torch.empty_like(weight)
            grad_w[vocab:] = 0  # padding rows: never scored
        total = x.new_zeros((), dtype=torch.float32)
        for start in range(0, x.shape[0], chunk):
            rows = slice(start, start + chunk)
            xc, tc, sc = x[rows], targets[rows].clamp_min(0), scored[rows]
            logits = linear(xc, w, kernel=kernel).float()
            target = logits.gather(1, tc[:, None]).squeeze(1)
            peak = logits.amax(dim=-1, keepdim=True)
            exp = logits.sub_(peak).exp_()  # in place: the logits are not needed again
            norm = exp.sum(dim=-1, keepdim=True)
            total += ((peak + norm.log()).squeeze(1) - target).mul_(sc).sum()  # logsumexp - target logit
            if need_grad:  # d loss / d logits = (softmax - one-hot) / count; ignored rows get none
                weight_of_row = (sc / count)[:, None]
                grad = exp.mul_(weight_of_row / norm)
                grad[torch.arange(len(tc), device=x.device), tc] -= weight_of_row.squeeze(1)
                grad = grad.to(x.dtype)
                torch.mm(grad, w, out=grad_x[rows])
                if start == 0:
                    torch.mm(grad.t(), xc, out=grad_w[:vocab])
                else:
                    grad_w[:vocab].addmm_(grad.t(), xc)
        ctx.save_for_backward(grad_x, grad_w)
        return total / count

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x, grad_w = ctx.saved_tensors
        if grad.item() != 1.0:  # a scaled loss; else the saved gradients are the answer
            grad_x, grad_w = grad_x * grad, grad_w * grad
        return grad_x, grad_w, None, None, None, None, None


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab: int | None = None,
    chunk_elems: int = CHUNK_ELEMS,
    kernel: str = "auto",
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(x, weight[:vocab]), targets, ignore_index=-100)`` for x (N, C), weight
    (V, C), targets (N,), computed ``chunk_rows(vocab, chunk_elems)`` rows at a time without the (N, vocab)
    logits. ``vocab`` (default: every row) leaves out padding rows of the weight, which get zero gradient."""
    vocab = weight.shape[0] if vocab is None else vocab
    need_grad = needs_grad(x, weight, None)
    return _LinearCrossEntropy.apply(x, weight, targets, vocab, chunk_rows(vocab, chunk_elems), need_grad, kernel)


def chunk_rows(vocab: int, chunk_elems: int = CHUNK_ELEMS) -> int:
    """How many rows ``linear_cross_entropy`` scores at a time: ``chunk_elems`` logits' worth."""
    return max(1, chunk_elems // vocab)
