"""8-bit linear layers for CPU inference.

A decode step at batch 1 reads every weight once per token, so it is bound by memory bandwidth; int8
weights read a quarter of float32's bytes. Each weight row (output channel) gets its own float32 scale
(its largest magnitude maps to 127, or to 63 on a CPU whose int8 kernels lack VNNI, where larger
weights could saturate their 16-bit sums: ``kernels.int8_weight_levels``); each input row (token) is
quantized on the fly about its own center with its own scale (``ops.quantize_rows``); products
accumulate in int32 and come out in float32, plus the center times the weight's sums and the float32
bias. Which int8 kernel runs a product (fbgemm, ``torch._int_mm``, oneDNN's quantized
linear, which uses AMX or VNNI where the CPU has them, or gpt2lab's own for few rows on AVX2 CPUs,
``gpt2lab.native``: ``ops.int8_kernels``) is measured per shape
and row count like the float32 ones (``gpt2lab.kernels``). The embedding table stays float32 (a
lookup reads one row); the tied lm_head gets its own int8 copy. The logit error and the top-1
agreement with float32 are measured in bench/peers.py and checked in tests/test_quantize.py.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from gpt2lab import kernels, ops
from gpt2lab.config import GPTConfig
from gpt2lab.errors import GPT2LabError
from gpt2lab.model import GPT, Backends


@dataclasses.dataclass(slots=True)
class _Plan:
    """``Int8Linear.plan``'s choice for products of ``rows`` rows: the kernel, the weights as it reads
    them, whether a compiled step calls that kernel as one opaque op (``int8_product``) rather than
    tracing ``torch._int_mm``, and the GELU's form (``ops.gelu_form``), chosen on the plan's first GELU."""

    rows: int
    kernel: str
    packed: object
    opaque: bool
    gelu_form: str | None = None


# The int8 layers with a plan, by id: what a compiled step's int8_product reads its kernel from.
_planned_layers: weakref.WeakValueDictionary[int, Int8Linear] = weakref.WeakValueDictionary()


def _int8_product(x: torch.Tensor, layer: int, out_features: int) -> torch.Tensor:
    return _planned_layers[layer].product(x)


# torch.ops.gpt2lab.int8_product(x, layer, out_features): x (rows, in) times the weight of the planned
# int8 layer whose id is ``layer``, on its kernel (``Int8Linear.product``), as one op that a compiled
# step calls as it is. fbgemm's and oneDNN's packed weights are made by calls that dynamo cannot trace
# (they take no fake tensors), so a compiled step could otherwise run only ``torch._int_mm``, which
# takes 6-46x fbgemm's time on a CPU without VNNI (docs/benchmarks.md). Defined with torch.library's
# Library rather than with its custom_op, whose wrapper adds several times this one's cost per call.
_ops = torch.library.Library("gpt2lab", "DEF")  # the op lives as long as this object
_ops.define("int8_product(Tensor x, int layer, int out_features) -> Tensor")
_ops.impl("int8_product", _int8_product, "CPU")


@torch.library.register_fake("gpt2lab::int8_product")
def _(x: torch.Tensor, layer: int, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


class Int8Linear(nn.Module):
    """An inference-only ``ops.Linear`` with an int8 weight and a float32 scale per output channel;
    the kernel of each product comes from ``table`` (a ``kernels.KernelTable``; None: the fallback).
    ``levels``: the weight's largest magnitude (None: what this CPU's kernels sum exactly)."""

    def __init__(self, linear: nn.Linear, table: kernels.KernelTable | None, levels: int | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        qweight, scale = ops.quantize_weight(linear.weight, levels or kernels.int8_weight_levels())
        self.register_buffer("qweight", qweight)  # (out, in) int8
        self.register_buffer("scale", scale)  # (out,)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.table = table
        self._packed: dict[str, object] = {}  # kernel -> the weights as it reads them, made on first use
        self._channels: torch.Tensor | None = None  # ops.weight_channels, made once for every kernel's packing
        self.planned: _Plan | None = None
        self.register_load_state_dict_post_hook(_drop_packed)  # laid out again from the loaded weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            raise GPT2LabError("int8 layers compute no gradients; train the float32 model and quantize it after")
        if self.scale.dtype != torch.float32:
            raise GPT2LabError("an int8 model runs in float32 (its scales and biases); do not cast it with .to(dtype)")
        if x.shape[-1] != self.in_features:  # gpt2lab's kernel would take any width padding as the weight's does
            raise GPT2LabError(f"this int8 layer takes inputs of {self.in_features} features, got {tuple(x.shape)}")
        if self._runs_avx2_as_it_is(x):  # the op keeps x's leading dimensions: no reshapes around it
            return ops.int8_linear(x, self.planned.packed, "avx2")
        x2 = x.reshape(-1, self.in_features).float()
        y = self._compiled_product(x2) if torch.compiler.is_compiling() else self.product(x2)
        return y.view(*x.shape[:-1], self.out_features)

    def _runs_avx2_as_it_is(self, x: torch.Tensor) -> bool:
        """Whether x (..., in) goes to the planned ``avx2`` kernel as it is: float32, the planned rows, eager."""
        planned = self.planned
        return (
            planned is not None
            and planned.kernel == "avx2"
            and planned.rows * self.in_features == x.numel()
            and x.dtype == torch.float32
            and not torch.compiler.is_compiling()
        )

    def product(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 (rows, in) times the weight, plus the bias, on the planned kernel (``plan``) or the one
        the table chooses for that many rows."""
        planned = self.planned
        if planned is not None and planned.rows == x2.shape[0]:
            kernel, packed = planned.kernel, planned.packed
        else:
            kernel, packed = self._choose(x2.shape[0])
        return ops.int8_linear(x2, packed, kernel)

    def _compiled_product(self, x2: torch.Tensor) -> torch.Tensor:
        """``product`` as a compiled step runs it: the planned kernel as one opaque op where the plan
        says so (``int8_product``; gpt2lab's own ``avx2`` kernel is a C++ op the step calls directly);
        else ``torch._int_mm``, traced, whose weight
        inductor reads as a constant and, where the CPU has AMX int8 tiles, lays out for its own kernels."""
        planned = self.planned
        if planned is not None and planned.rows == x2.shape[0] and planned.opaque:
            if planned.kernel == "avx2":  # a C++ op with a fake of its own: called as it is, no Python between
                return ops.int8_linear(x2, planned.packed, "avx2")
            return torch.ops.gpt2lab.int8_product(x2, id(self), self.out_features)
        return ops.int8_linear(x2, ops.pack_int8(self.qweight, self.scale, self.bias, "int_mm"), "int_mm")

    def gelu(self, x: torch.Tensor) -> torch.Tensor:
        """``F.gelu(self(x), approximate="tanh")`` (an MLP's first product and its activation), the GELU in
        the form the table measures faster for this output (``ops.tanh_gelu_``, kind ``tanh_gelu``)."""
        y = self(x)
        if torch.compiler.is_compiling():  # inductor writes its own fused GELU
            return F.gelu(y, approximate="tanh")
        return ops.tanh_gelu_(y, self._gelu_form(y.numel() // self.out_features))

    def _gelu_form(self, rows: int) -> str:
        planned = self.planned
        if planned is None or planned.rows != rows:
            return ops.gelu_form(self.table, self.out_features, self.in_features, rows)
        if planned.gelu_form is None:  # chosen on the plan's first GELU, then kept
            planned.gelu_form = ops.gelu_form(self.table, self.out_features, self.in_features, rows)
        return planned.gelu_form

    def _choose(self, rows: int, kernel: str | None = None) -> tuple[str, object]:
        """The kernel of a product of ``rows`` rows (``kernel``, or the table's choice) and the weight as it
        reads it (made on first use)."""
        if kernel is None and self.table is None:
            kernel = kernels.fallback("int8", rows)
        elif kernel is None:
            kernel = self.table.choose(self.out_features, self.in_features, rows, kind="int8")
        if kernel not in self._packed:
            if self._channels is None:
                self._channels = ops.weight_channels(self.qweight, self.scale)
            self._packed[kernel] = ops.pack_int8(self.qweight, self.scale, self.bias, kernel, self._channels)
        return kernel, self._packed[kernel]

    def plan(self, rows: int, kernel: str | None = None) -> None:
        """Choose once the kernel of products of ``rows`` rows (``kernel``, or the table's choice; and on
        its first use the GELU's form), until ``unplan`` or new weights are loaded, instead of at every
        product (``ops.Linear.plan``). A compiled step runs the planned kernel too, as one opaque op,
        unless it is ``torch._int_mm`` or the step lays int8 weights out for inductor's AMX kernels
        (``kernels.has_amx_int8``)."""
        kernel, packed = self._choose(rows, kernel)
        self.planned = _Plan(rows, kernel, packed, opaque=kernel != "int_mm" and not kernels.has_amx_int8())
        _planned_layers[id(self)] = self

    def unplan(self) -> None:
        self.planned = None

    def planned_blocks(self) -> torch.Tensor | None:
        """The int8 blocks that its planned products read on gpt2lab's own kernel (``avx2``), else None."""
        planned = self.planned
        return planned.packed[0] if planned is not None and planned.kernel == "avx2" else None

    def replace_planned_blocks(self, blocks: torch.Tensor) -> None:
        """Have its plan, and the plans after it, read ``blocks``, a copy of ``planned_blocks``
        (``GPT.plan_decoding`` moves them into 2 MiB pages)."""
        packed = (blocks, *self.planned.packed[1:])
        self._packed["avx2"] = self.planned.packed = packed

    def plan_holds(self) -> bool:
        """Whether there is a plan (``plan``): loading new weights drops it."""
        return self.planned is not None

    def native_cost(self, rows: int) -> float | None:
        """The microseconds a planned product of ``rows`` rows would lose on gpt2lab's own kernel
        (``avx2``) against the planned one, as the table measured the two (0 where it is planned there
        already; ``Block.plan`` weighs it); None where that kernel does not run such products or was not
        timed."""
        planned = self.planned
        if planned is None or planned.rows != rows:
            return None
        if planned.kernel == "avx2":
            return 0.0
        if self.table is None or "avx2" not in ops.int8_kernels(rows):  # AVX2, few rows
            return None
        us = self.table.times(self.out_features, self.in_features, rows, "int8")
        if not {"avx2", planned.kernel} <= us.keys():
            return None
        return us["avx2"] - us[planned.kernel]

    def native_tie(self, rows: int) -> bool:
        """Whether gpt2lab's own kernel (``avx2``) measured at most ``kernels.MARGIN`` slower than the
        planned kernel for products of ``rows`` rows (True where it is planned there): a tie in the
        table's own terms, which the planned kernel won by coming first among the candidates
        (``GPT._plan_head`` weighs it)."""
        cost = self.native_cost(rows)
        if cost is None or cost == 0.0:
            return cost == 0.0
        us = self.table.times(self.out_features, self.in_features, rows, "int8")
        return cost <= kernels.MARGIN * us[self.planned.kernel]

    def one_op_saving(self, n_head: int, rows: int) -> float:
        """The microseconds an int8 block of this layer's input width and ``n_head`` heads saves per
        decode step of ``rows`` rows as one op (``Block.plan``), as the table measured it (kind
        ``int8_block``, on ``block_steps``); 0 without a table."""
        return 0.0 if self.table is None else self.table.one_op_saving(self.in_features, n_head, rows, block_steps)

    def native_product(self, rows: int, gelu: bool = False) -> ops.NativeProduct | None:
        """The planned product of ``rows`` rows (with ``gelu``, and its GELU) as gpt2lab.native's
        ``decode_block`` runs it, or None where there is no such plan or it runs another kernel."""
        planned = self.planned
        if planned is None or planned.rows != rows or planned.kernel not in ops.NATIVE_PRODUCTS:
            return None
        blocks, channels, bias = planned.packed
        form = self._gelu_form(rows) if gelu else None
        return ops.NativeProduct(
            ops.NATIVE_PRODUCTS.index(planned.kernel), blocks, channels, bias, self.out_features, form
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _drop_packed(layer: Int8Linear, incompatible_keys) -> None:
    layer._packed.clear()
    layer._channels = None
    layer.unplan()


BLOCK_KEYS = 32  # the keys each step of block_steps attends over


def block_steps(n_embd: int, n_head: int, layers: int, rows: int, options: tuple[str, ...]) -> dict:
    """Functions that each run one decode step of ``rows`` rows through a model of ``layers`` int8 blocks
    of width ``n_embd`` and ``n_head`` heads (GPT-2's form, its initial random weights, a tiny
    vocabulary), every product and the attention on gpt2lab's own kernels, by option: ``python``, the
    blocks' Python forward; ``one_op``, the blocks in one op (``Block.plan``,
    ``GPT._blocks_in_one_op``). What the kernel table times for kind ``int8_block``."""
    config = GPTConfig(vocab_size=64, block_size=2 * BLOCK_KEYS, n_layer=layers, n_head=n_head, n_embd=n_embd)
    model = quantize_int8(GPT(config, Backends(linear="torch", decode_attention="avx2")))
    model.setup_cache(rows, 2 * BLOCK_KEYS)
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m.plan(rows, "avx2")
    for block in model.h:  # its products planned on gpt2lab's kernel: one op
        block.plan(rows)
    token, pos = torch.zeros(rows, 1, dtype=torch.long), torch.tensor([BLOCK_KEYS])

    def step(one_op: bool) -> None:
        with contextlib.nullcontext() if one_op else model.python_blocks():
            model.hidden_states(token, pos)

    return {k: functools.partial(step, k == "one_op") for k in options}


def quantize_int8(model: GPT) -> GPT:
    """An inference copy of ``model`` (float32, CPU, no gradients) whose linear layers, the lm_head
    included, run in int8; the original is left as it is."""
    if model.wte.weight.device.type != "cpu" or model.wte.weight.dtype != torch.float32:
        raise GPT2LabError("int8 quantization is for float32 models on the CPU; load with --device cpu --dtype float32")
    levels = kernels.int8_weight_levels()
    table = model.lm_head.table if isinstance(model.lm_head, ops.Linear) else None
    table = table or kernels.KernelTable()  # float32 kernels fixed (Backends.linear): int8 still measures its own
    quantized = copy.deepcopy(model).requires_grad_(False)  # for inference: no autograd graph
    for module in list(quantized.modules()):
        for name, child in module.named_children():
            if isinstance(child, ops.Linear):
                setattr(module, name, Int8Linear(child, table, levels))
    return quantized.eval()
