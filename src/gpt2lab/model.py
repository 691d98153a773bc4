"""GPT-2 and its variants (rotary positions, grouped-query and sliding-window attention).

Exact GPT-2 when the config is a GPT-2 preset: pre-LayerNorm blocks, tanh-GELU, LayerNorm eps 1e-5,
attention scale 1/sqrt(head_dim), final ln_f, lm_head tied to wte. Module names follow HF's GPT-2 so
checkpoint keys map one to one (only the Conv1D transposes differ; see gpt2lab.hf).
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gpt2lab import kernels, native, pages
from gpt2lab.config import GPTConfig
from gpt2lab.device import available_memory, memory_of
from gpt2lab.errors import CheckpointError, GPT2LabError
from gpt2lab.kv_cache import KVCache, written_from_start
from gpt2lab.ops import (
    CAUSAL_KERNELS,
    LINEAR_KERNELS,
    ONE_QUERY_KERNELS,
    PLAIN_COPIES,
    READS_THE_WEIGHT,
    Linear,
    NativeProduct,
    add_layer_norm,
    causal_attention,
    chunk_rows,
    linear_cross_entropy,
    one_query_attention,
    use_onednn,
)
from gpt2lab.rope import Rotary, apply_rotary

try:  # FlexAttention (torch >= 2.5): a fused kernel that skips the blocks a sliding window masks out
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:
    BlockMask = create_block_mask = flex_attention = None

ATTENTION_KERNELS = ("auto", "sdpa", "flex")
DECODE_ATTENTION_KERNELS = ("auto", *ONE_QUERY_KERNELS)
CAUSAL_ATTENTION_KERNELS = ("auto", *CAUSAL_KERNELS)
MIN_GROWN_CACHE = 64  # time steps a kept KV cache grows to at least (GPT.kept_cache_len)
_BLOCK_KEY = re.compile(r"^(?:transformer\.)?h\.(\d+)\.")


@dataclass(frozen=True)
class Backends:
    """Kernel choices, fixed when a model is built. They change speed, never results beyond rounding.

    ``attention``: how window layers of a full forward (training, evaluation) attend: ``sdpa`` with a
    boolean mask, ``flex`` (FlexAttention, which skips the blocks the window masks out), or ``auto``
    (flex where ``flex_applies``, else sdpa). ``linear``: the CPU float32 kernel of every linear layer:
    ``onednn``, ``torch`` (MKL through F.linear), or ``auto``: the faster of the two for each product's
    shape and row count on this CPU, measured the first time and remembered (gpt2lab.kernels, which also
    names the environment variables that override it); with ``auto``, a one-row decode step runs all its
    products in numpy's BLAS where that measures faster (``GPT.pack_for_decoding``). ``pack_min_steps``:
    CPU decoding of at least this many steps reads each linear layer's weight from a copy laid out for
    the step's row count (MKL's or oneDNN's packed layout; at one row, the transposed one) where the table measures
    that faster and the copy repays its making within the steps (``GPT.pack_for_decoding``; 0 = never).
    ``pack_repeated``: a layer whose CPU products without grad keep one row count (evaluation batches,
    same-length prompts, forwards of one shape) reads a packed copy (MKL's or oneDNN's layout, as the
    table chose) once they have repeated often
    enough to repay it, as measured (``gpt2lab.ops.Linear``); the copies hold about the weights' memory
    again until ``GPT.clear_cache``. ``decode_attention``: how an eager decode step's one query per row
    attends over the KV cache (``gpt2lab.ops.one_query_attention``): ``products`` (three small
    products), ``sdpa``, ``avx2`` (gpt2lab's own float32 CPU kernel, ``gpt2lab.native``; elsewhere the
    products), or ``auto``: on the CPU the fastest of those that run here for the step's query heads
    and key count on this machine, measured the first time and remembered with the linear kernels
    (kind ``attention``), else ``products``. A compiled CPU step traces another form under ``auto``, ``reduction``
    (``CausalSelfAttention.one_query_kernel``). ``causal_attention``: how the causal attention of a
    whole sequence without gradients attends on the CPU in float32 (a forward without gradients or
    attention dropout, unpadded prompts written into the KV cache from their start; not window layers):
    ``sdpa``, ``avx512`` (gpt2lab's own kernel on AVX-512 CPUs, ``gpt2lab.ops.causal_attention``), or
    ``auto``: the faster of those that run here for the call's query heads, head size and length on
    this machine, measured the first time and remembered (kind ``causal``); with gradients or attention
    dropout, in other dtypes and devices, with head sizes not a multiple of 16, in compiled graphs and
    under torch.func's transforms ``sdpa`` runs. ``huge_pages``: where Linux gives 2 MiB pages
    only to memory that asks (transparent huge pages in ``madvise`` mode, ``gpt2lab.pages``), CPU
    decoding moves the linear layers' float32 weights (each of 2 MiB or more; the Parameters stay,
    their ``data`` moves) and the int8 blocks gpt2lab's own int8 kernel reads into such memory, once,
    before the first decode steps that read them, and makes its copies of the weights there
    (``GPT.pack_for_decoding``, ``GPT.plan_decoding``).
    """

    attention: str = "auto"
    linear: str = "auto"
    pack_min_steps: int = 64
    pack_repeated: bool = True
    decode_attention: str = "auto"
    causal_attention: str = "auto"
    huge_pages: bool = True

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention kernel must be one of {ATTENTION_KERNELS}, got {self.attention!r}")
        if self.linear not in LINEAR_KERNELS:
            raise ValueError(f"linear kernel must be one of {LINEAR_KERNELS}, got {self.linear!r}")
        steps = self.pack_min_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"pack_min_steps must be an integer >= 0 (0 = never), got {steps!r}")
        if not isinstance(self.pack_repeated, bool):
            raise ValueError(f"pack_repeated must be True or False, got {self.pack_repeated!r}")
        if not isinstance(self.huge_pages, bool):
            raise ValueError(f"huge_pages must be True or False, got {self.huge_pages!r}")
        if self.decode_attention not in DECODE_ATTENTION_KERNELS:
            raise ValueError(
                f"decode_attention must be one of {DECODE_ATTENTION_KERNELS}, got {self.decode_attention!r}"
            )
        if self.decode_attention == "avx2":
            native.require()  # says why where it cannot run
        if self.causal_attention not in CAUSAL_ATTENTION_KERNELS:
            raise ValueError(
                f"causal_attention must be one of {CAUSAL_ATTENTION_KERNELS}, got {self.causal_attention!r}"
            )
        if self.causal_attention == "avx512" and not native.avx512():
            capability = torch.backends.cpu.get_cpu_capability()
            reason = native.unavailable_reason() or f"torch's CPU kernels run {capability} here, not AVX-512"
            raise GPT2LabError(
                f"gpt2lab's avx512 attention cannot run here ({reason}); choose causal_attention='auto' or 'sdpa'"
            )


def flex_applies(device: torch.device, config: GPTConfig) -> bool:
    """Whether ``auto`` picks FlexAttention for window layers of a full forward on ``device``.

    CUDA only: flex has no CPU backward, so CPU keeps SDPA with a boolean mask. Flex has no attention
    dropout, and older releases' kernels need a power-of-two head_dim of at least 16, so those keep SDPA too.
    """
    hs = config.head_dim
    return (
        flex_attention is not None
        and device.type == "cuda"
        and config.dropout == 0.0
        and hs >= 16
        and hs & (hs - 1) == 0
    )


@functools.cache
def flex_kernel(device_type: str):
    """FlexAttention for a device type: compiled on CUDA (compiling takes seconds, once per process);
    elsewhere the eager reference, which materializes all the scores (forward only on the CPU)."""
    return torch.compile(flex_attention) if device_type == "cuda" else flex_attention


def window_block_mask(T: int, window: int, device: torch.device) -> BlockMask:
    """Flex block mask of the sliding window: query q sees keys kv with q - window < kv <= q."""

    def mask_mod(b, h, q, kv):
        return (kv <= q) & (q - kv < window)

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)


def _writable_here(t: torch.Tensor) -> bool:
    """Whether buffer ``t`` can be written in place now: one made under torch.inference_mode cannot be
    outside it (setup_cache then makes new buffers)."""
    return not t.is_inference() or torch.is_inference_mode_enabled()


def _filled(input_pos: torch.Tensor, cache_len: int) -> int | torch.SymInt | None:
    """The KV-cache slots written once a step at time steps ``input_pos`` is done: decoding attends over
    those only. A compiled CPU step traces it as an integer known only when the step runs, where
    dynamo captures such integers (``capture_scalar_outputs``, which ``gpt2lab.decode._frozen`` turns on),
    so one compiled step serves every length. Any other compiled step (a GPU's, or one compiled without
    that capture) gets None and attends over the whole cache: static shapes, as a CUDA graph needs,
    and no ``item()`` to break the graph."""
    if not torch.compiler.is_compiling():
        return int(input_pos[-1]) + 1
    if input_pos.device.type != "cpu" or not torch._dynamo.config.capture_scalar_outputs:
        return None
    filled = input_pos[-1].item() + 1
    torch._check(filled >= 1)  # what the compiler cannot know of a traced integer that slices the cache
    torch._check(filled <= cache_len)
    return filled


class CausalSelfAttention(nn.Module):
    def __init__(
        self,
        config: GPTConfig,
        layer: int,
        make_linear: Callable[..., Linear],
        decode_attention: str,
        table: kernels.KernelTable,
        causal_attention: str = "sdpa",
    ) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.heads = (config.n_head, config.n_kv_head, config.n_kv_head)  # of q, k and v, side by side
        self.c_attn = make_linear(config.n_embd, sum(self.heads) * config.head_dim)  # fused q, k, v
        self.c_proj = make_linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        self.window = config.layer_window(layer)
        self.gqa = config.n_kv_head != config.n_head
        self.decode_attention, self.table = decode_attention, table  # Backends.decode_attention, its table
        self.causal_attention = causal_attention  # Backends.causal_attention
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        window_mask: torch.Tensor | None,
        step: tuple[torch.Tensor, torch.Tensor | None, int | None, bool] | None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        heads = self.c_attn(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh + 2 nkv, T, hs)
        q, k, v = heads.split(self.heads, dim=1)  # (B, nh, T, hs), (B, nkv, T, hs), (B, nkv, T, hs)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if step is not None:  # inference with the KV cache: (time steps (T,), left padding (B,), filled, from start)
            kernel = self.one_query_kernel(B, self.kv_cache.slots(step[2]), x.device, q.dtype) if T == 1 else None
            if kernel == "avx2" and not torch.compiler.is_compiling():  # the cache's write and the attention in one op
                y = self.kv_cache.attend_one(q, k, v, *step[:3])
            else:
                k, v, mask = self.kv_cache.update(k, v, *step)  # mask None: causal
                if T == 1:
                    y = one_query_attention(q, k, v, attn_mask=mask, enable_gqa=self.gqa, kernel=kernel)
                elif mask is None and k.shape[2] == T:  # a prompt from time step 0: causal
                    y = causal_attention(q, k, v, self.causal_kernel(q))
                else:
                    y = F.scaled_dot_product_attention(
                        q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.gqa
                    )
        elif self.window is None and not (self.training and self.dropout > 0):
            y = causal_attention(q, k, v, self.causal_kernel(q))
        elif self.window is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout, enable_gqa=self.gqa)
        elif isinstance(window_mask, torch.Tensor):
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=window_mask, dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.gqa
            )
        else:  # a flex BlockMask: GPT._window_mask chose FlexAttention for this device
            y = flex_kernel(x.device.type)(q, k, v, block_mask=window_mask, enable_gqa=self.gqa)
        y = self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))  # heads side by side
        return self.resid_dropout(y) if self.training else y  # (eval: the identity, not called)

    def causal_kernel(self, q: torch.Tensor) -> str:
        """The kernel of a whole sequence's causal attention of q (B, nh, T, hs)
        (``Backends.causal_attention``): ``sdpa`` where gpt2lab's own cannot run it (gradients, another
        dtype or device, a head size not a multiple of 16, a compiled graph, torch.func's transforms),
        else the one chosen: under
        ``auto`` the one the kernel table measures faster for this many query heads of this size and
        length on this CPU."""
        own_runs = (
            q.device.type == "cpu"
            and q.dtype == torch.float32
            and self.head_dim % 16 == 0
            and not (torch.is_grad_enabled() and q.requires_grad)
            and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active()  # vmap, grad, jvp: no rule of its own
        )
        if not own_runs:
            return "sdpa"
        if self.causal_attention != "auto":
            return self.causal_attention
        B, nh, T, hs = q.shape
        return self.table.choose(B * nh, hs, T, kind="causal")

    def one_query_kernel(
        self, rows: int, keys: int, device: torch.device, dtype: torch.dtype = torch.float32, chosen: dict | None = None
    ) -> str:
        """The kernel of a decode step's attention of ``rows`` rows over ``keys`` keys of ``dtype``
        (``Backends.decode_attention``): under ``auto``, on the CPU, the one the kernel table measures
        faster for this many query heads (every row's) of this size and keys on this CPU; in a compiled
        CPU step, whose graph cannot follow a choice that changes with the key count, ``reduction``,
        which inductor fuses into loops of its own; elsewhere ``products``. ``avx2`` is a float32 CPU
        kernel: elsewhere and for other dtypes an explicit one runs the products, ``auto`` the fastest
        of the others the table measured. ``chosen``: the choices made already, by this attention or
        others with the same settings (filled in here), so that a step's blocks choose once."""
        if chosen is not None:  # what the choice depends on: it serves every attention with these settings
            key = (rows, keys, device, dtype, self.decode_attention, self.table, self.n_head, self.head_dim)
            if key not in chosen:
                chosen[key] = self.one_query_kernel(rows, keys, device, dtype)
            return chosen[key]
        own_runs = device.type == "cpu" and dtype == torch.float32
        if self.decode_attention == "avx2" and not own_runs:
            return "products"
        if self.decode_attention != "auto":
            return self.decode_attention
        if device.type != "cpu":
            return "products"
        if torch.compiler.is_compiling():
            return "reduction"
        shape = (rows * self.n_head, self.head_dim, keys)
        kernel = self.table.choose(*shape, kind="attention")
        if kernel == "avx2" and not own_runs:
            us = self.table.times(*shape, "attention")
            kernel = min((k for k in ONE_QUERY_KERNELS if k != "avx2" and k in us), key=us.get, default="products")
        return kernel


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, make_linear: Callable[..., Linear]) -> None:
        super().__init__()
        self.c_fc = make_linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = make_linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_proj(self.c_fc.gelu(x))  # the layer's product and tanh-GELU: fused where that is faster
        return self.dropout(h) if self.training else h


@dataclass(frozen=True, eq=False)
class _StepPlan:
    """``Block.plan``'s: the block's layers and their plans then, and the arguments of
    gpt2lab.native's ``decode_block`` that do not change from step to step."""

    rows: int
    attn: CausalSelfAttention  # whose KV cache the steps write and whose kernel choice they check
    layers: tuple[nn.Module, ...]
    plans: tuple[object, ...]
    norms: list[torch.Tensor]
    eps: float
    products: tuple[list, ...]  # kernels, weights, scales, biases, output widths
    gelu_form: str

    def holds(self, block: Block) -> bool:
        """Whether ``block`` still has the layers' plans and the LayerNorm parameters planned with."""
        ln_1, ln_2 = block.ln_1, block.ln_2
        return (
            all(
                now is then
                for now, then in zip((ln_1.weight, ln_1.bias, ln_2.weight, ln_2.bias), self.norms, strict=True)
            )
            and ln_1.eps == ln_2.eps == self.eps
            and all(m.planned is p and m.plan_holds() for m, p in zip(self.layers, self.plans, strict=True))
        )


@dataclass(frozen=True, eq=False)
class _HeadPlan:
    """``GPT.plan_decoding``'s: the model's last LayerNorm and its lm_head's planned product of ``rows``
    rows, as gpt2lab.native's ``decode_logits`` runs them after the blocks' one op."""

    rows: int
    plan: object  # the lm_head's plan then
    norm: list[torch.Tensor]
    eps: float
    product: NativeProduct

    def holds(self, model: GPT, rows: int) -> bool:
        """Whether ``model`` still has the lm_head's plan and the ``ln_f`` parameters planned with."""
        head, ln = model.lm_head, model.ln_f
        return (
            rows == self.rows
            and ln.weight is self.norm[0]
            and ln.bias is self.norm[1]
            and ln.eps == self.eps
            and head.planned is self.plan
            and head.plan_holds()
        )


class Block(nn.Module):
    def __init__(
        self,
        config: GPTConfig,
        layer: int,
        make_linear: Callable[..., Linear],
        make_attention: Callable[..., CausalSelfAttention],
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = make_attention(config, layer, make_linear)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config, make_linear)
        self.step_plan: _StepPlan | None = None

    def forward(self, x, rope, window_mask, step) -> torch.Tensor:
        # (a compiled step traces the Python forward: inductor fuses it itself)
        if step is not None and not torch.compiler.is_compiling() and self.step_plan is not None and rope is None:
            y = self._one_op_step(x, step)
            if y is not None:
                return y
        x, h = add_layer_norm(x, self.attn(self.ln_1(x), rope, window_mask, step), self.ln_2, fused=step is not None)
        return x + self.mlp(h)  # h: ln_2 of the new x

    def plan(self, rows: int) -> None:
        """Once each of the block's products of ``rows`` rows is planned (``GPT.plan_decoding``), run
        its eager decode steps of ``rows`` rows as one op where they can: gpt2lab.native's
        ``decode_block``, the same operations as ``forward`` in the same order on the same kernels (so
        the same results), without the Python between them, whose cost grows several times right
        after a product has streamed megabytes of weights through the caches (docs/benchmarks.md).
        That is where all four products run gpt2lab's own kernels (``ops.NATIVE_PRODUCTS``), the
        layer norms have their weights and biases, and, checked at each step, there are no rotary
        positions, the attention runs ``avx2`` for the step's key count, the model is in eval mode
        without gradients, and the plans still hold; where every block's step is one op so, the
        model's step runs all of them in one (``GPT._blocks_in_one_op``). Forward hooks of the
        block's submodules are not called by those steps.

        Where some products were planned on other kernels, they are planned again on gpt2lab's where
        the time the table measured them to lose there, summed (``native_cost``), is less than one op
        per step saves, as measured (``KernelTable.one_op_saving``): a near tie between two int8
        kernels should not cost a block its one op. Not where the attention cannot run ``avx2``
        (``Backends.decode_attention``). Float32 layers settle their near ties when generation lays
        out their weights (``GPT.pack_for_decoding``)."""
        self.step_plan = None
        attn, mlp = self.attn, self.mlp
        layers = (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)
        products = [m.native_product(rows, gelu=m is mlp.c_fc) for m in layers]
        if None in products and self._one_op_repays(layers, rows):
            for m, product in zip(layers, products, strict=True):
                if product is None:
                    m.plan(rows, "avx2")
            products = [m.native_product(rows, gelu=m is mlp.c_fc) for m in layers]
        norms = [self.ln_1.weight, self.ln_1.bias, self.ln_2.weight, self.ln_2.bias]
        if None in products or any(t is None for t in norms) or self.ln_1.eps != self.ln_2.eps:
            return
        columns = ("kernel", "weight", "scale", "bias", "out_features")
        self.step_plan = _StepPlan(
            rows,
            attn,
            layers,
            tuple(m.planned for m in layers),
            norms,
            self.ln_1.eps,
            tuple([getattr(p, c) for p in products] for c in columns),
            products[2].gelu_form,
        )

    def _one_op_repays(self, layers: tuple[nn.Module, ...], rows: int) -> bool:
        """Whether running all of ``layers``' planned products of ``rows`` rows on gpt2lab's kernels loses
        less time than one op per step saves, as the kernel table measured them."""
        if self.attn.decode_attention not in ("auto", "avx2"):  # the one op attends with avx2 only
            return False
        costs = [m.native_cost(rows) for m in layers]
        return None not in costs and sum(costs) < layers[0].one_op_saving(self.attn.n_head, rows)

    def unplan(self) -> None:
        self.step_plan = None

    def one_op_slots(
        self, rows: int, tokens: int, device: torch.device, dtype: torch.dtype, step: tuple, chosen: dict | None = None
    ) -> int | None:
        """The slots of its KV cache that a one-op decode step (``plan``) of ``tokens`` tokens in each of
        ``rows`` rows of hidden states of ``dtype`` attends over, or None where such a step does not
        apply: no plan, not one new token per planned row, gradients or training, a plan that no longer
        holds, or an attention that would not run ``avx2`` here (``chosen``: as
        ``CausalSelfAttention.one_query_kernel``'s)."""
        plan = self.step_plan
        if plan is None or tokens != 1 or plan.rows != rows or self.training or torch.is_grad_enabled():
            return None
        if not plan.holds(self):
            return None
        attn = plan.attn
        slots = _kv_cache(attn).slots(step[2])
        return slots if attn.one_query_kernel(rows, slots, device, dtype, chosen) == "avx2" else None

    def _one_op_step(self, x: torch.Tensor, step: tuple) -> torch.Tensor | None:
        """``forward``'s decode step as the one op ``plan`` set up, or None where it does not apply."""
        slots = self.one_op_slots(x.shape[0], x.shape[1], x.device, x.dtype, step)
        if slots is None:
            return None
        *fixed, _, window, gelu_form = self.native_args()  # (whether the cache rolls: slots says it)
        return torch.ops.gpt2lab_native.decode_block(x, *fixed, step[0], slots, step[1], window, gelu_form)

    def native_args(self) -> tuple:
        """Its plan's arguments of gpt2lab.native's ``DecodeBlocks.add``: those of ``decode_block`` that do
        not change from step to step, its KV cache's (whether it rolls, for the slots of each step)."""
        plan = self.step_plan
        attn, cache = plan.attn, plan.attn.kv_cache
        return (
            plan.norms,
            plan.eps,
            *plan.products,
            attn.n_head,
            cache.k,
            cache.v,
            cache.times,
            cache.rolls,
            cache.window,
            plan.gelu_form,
        )


def _kv_cache(attn: CausalSelfAttention) -> KVCache | None:
    """``attn.kv_cache``, read without nn.Module's ``__getattr__`` (about 1 us a call, and a one-op
    decode step's checks read it twice per block at every step)."""
    return attn._modules.get("kv_cache")


def _hooked(*modules: nn.Module) -> bool:
    """Whether any of ``modules`` has forward hooks (a step that skips their calls would skip them)."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _global_hooks() -> bool:
    """Whether forward hooks are registered for every module (``nn.modules.module.register_module_forward_hook``
    and its pre-hook): a step that skips the blocks' calls would skip them."""
    module = nn.modules.module
    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


def _weights_to_huge_pages(weights: list[nn.Parameter]) -> None:
    """Move each float32 weight of at least one 2 MiB page's bytes into a mapping of its own in 2 MiB
    pages (``gpt2lab.pages``), unless it lies in one already: the Parameter stays the same object, its
    ``data`` the same values in other memory. A mapping of its own: a state dict saves each weight on
    its own."""
    for w in weights:  # a plain tensor's: not a shard of a distributed one (a DTensor)
        if type(w.data) is torch.Tensor and w.nbytes >= pages.HUGE_PAGE and not pages.in_huge_pages(w):
            w.data = pages.huge_copies([w.detach()])[0]


def _copy_to_huge_pages(layer: Linear) -> None:
    """Move the copy of its weight that ``layer`` reads (``Linear.pack``'s, a plain tensor:
    ``ops.PLAIN_COPIES``) into a mapping of its own in 2 MiB pages, where it fills one at least."""
    copy = layer.packed[2]
    memory = copy if copy.is_contiguous() else copy.t()  # a transposed copy: its (in, out) memory
    if memory.nbytes >= pages.HUGE_PAGE:
        moved = pages.huge_copies([memory])[0]
        layer.replace_copy(moved if memory is copy else moved.t())


def _blocks_to_huge_pages(layers: list[nn.Module]) -> bool:
    """Move the int8 blocks that the planned ``layers`` read (``Int8Linear.planned_blocks``) into one
    mapping in 2 MiB pages (``gpt2lab.pages``), in the layers' order (a decode step's), unless they lie
    in such pages already or fill less than one; whether any moved. The blocks are no module's state:
    one mapping holds them all."""
    held = [(m, m.planned_blocks()) for m in layers if callable(getattr(m, "planned_blocks", None))]
    held = [(m, w) for m, w in held if w is not None and not pages.in_huge_pages(w)]
    if pages.nbytes([w for _, w in held]) < pages.HUGE_PAGE:
        return False
    for (m, _), copy in zip(held, pages.huge_copies([w for _, w in held]), strict=True):
        m.replace_planned_blocks(copy)
    return True


def _faster_in_numpy(layers: list[Linear], rows: int, steps: int, copies: bool, in_place: bool) -> bool:
    """Whether ``steps`` decode steps of ``rows`` rows run the products of ``layers`` faster in numpy's
    BLAS than in torch's and gpt2lab's kernels, as their kernel table measured each product (kinds
    ``numpy`` and ``packed``): the sum over the layers of the fastest kernel each kind may run, a
    kernel that reads a copy only with ``copies`` and where the copy repays itself within the steps,
    one whose "copy" is the weight itself (``ops.READS_THE_WEIGHT``) with ``in_place``; numpy's by
    ``kernels.MARGIN`` at least. False where numpy has no BLAS that can be told its threads, or a
    time is missing (an edited entry)."""
    if not layers or not kernels.candidates("numpy", rows):
        return False
    totals = {"numpy": 0.0, "packed": 0.0}
    for m in layers:
        shape = (m.out_features, m.in_features, rows)
        for kind in totals:
            repaid = copies and m.table.pack_repays(*shape, kind) <= steps
            us = m.table.times(*shape, kind)
            options = [
                k
                for k in kernels.candidates(kind, rows)
                if repaid or k not in kernels.COPY_KERNELS or (in_place and k in READS_THE_WEIGHT)
            ]
            if not all(k in us for k in options):
                return False
            totals[kind] += min(us[k] for k in options)
    return totals["numpy"] < (1 - kernels.MARGIN) * totals["packed"]


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, backends: Backends | None = None) -> None:
        super().__init__()
        self.config = config
        self.backends = backends = backends or Backends()
        kernel, table = kernels.resolve(backends.linear)  # one table: every layer's measured choices
        make_linear = functools.partial(Linear, kernel=kernel, table=table, pack_repeated=backends.pack_repeated)
        attention_table = table if table is not None else kernels.KernelTable()  # linear kernels fixed: its own
        make_attention = functools.partial(
            CausalSelfAttention,
            decode_attention=backends.decode_attention,
            causal_attention=backends.causal_attention,
            table=attention_table,
        )
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        # Exactly one position scheme: a learned table (GPT-2) or rotary tables (no parameters).
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos_emb == "learned" else None
        rope = config.pos_emb == "rope"
        self.rotary = (
            Rotary(config.head_dim, config.rope_theta, config.block_size, config.rope_interpolation) if rope else None
        )
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config, i, make_linear, make_attention) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = make_linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.register_buffer("cache_pad", torch.zeros(0, dtype=torch.long), persistent=False)
        self.cache_padded = False
        self.cache_len = 0  # time steps the KV cache holds
        self.cache_end = 0  # time steps the generation call that set it up needs (at most cache_len)
        self.cache_kept = False  # whether the KV cache outlives its generation call (setup_cache's keep)
        self.generating = False  # whether a generation call holds the KV cache (generation.stream, until it ends)
        self._window_masks: dict[tuple[int, torch.device], torch.Tensor | BlockMask] = {}
        self._blocks: tuple | None = None  # _one_op_blocks': (what it was gathered from, DecodeBlocks, tables)
        self.head_plan: _HeadPlan | None = None  # plan_decoding's: ln_f and the lm_head in the blocks' one op
        self._blocks_together = True  # whether planned blocks step all in one op (block_ops: each its own)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: scale residual projections by depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, vocab_size) for tokens idx (B, T); or, given ``targets`` (B, T; -100 = ignore),
        the mean cross-entropy against them instead (logits None: the loss never needs them whole).

        Without ``input_pos`` the sequence starts at position 0 and no cache is used (training, full
        evaluation). With ``input_pos`` (T,), the time steps of idx, keys and values go through the
        KV cache prepared by ``setup_cache``; rows are left-padded by ``cache_pad`` steps.
        """
        step = self._cache_step(idx, input_pos)
        if targets is None and step is not None and self.rotary is None:  # a decode step: one op where it can
            logits = self._logits_in_one_op(idx, step)
            if logits is not None:
                return logits, None
        x = self._through_blocks(*self._embedded(idx, step))
        if targets is None:
            return self.logits(x), None
        return None, self.loss(x, targets)

    def hidden_states(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """The final hidden states (B, T, n_embd), after ``ln_f``, of tokens idx (B, T); ``input_pos`` as
        in ``forward``. Generation calls this and ``logits`` itself, on the last position only."""
        return self._through_blocks(*self._embedded(idx, self._cache_step(idx, input_pos)))

    def _embedded(self, idx: torch.Tensor, step: tuple | None) -> tuple:
        """``hidden_states``' first part: the embeddings x of tokens idx (B, T), the rotary positions
        (None without them), the window mask of a full forward (None without a window) and the KV-cache
        step (``_cache_step``'s; None outside the cache, from position 0)."""
        T = idx.shape[1]
        if step is None:
            pos = torch.arange(T, device=idx.device)[None]  # (1, T)
            if self.config.max_positions is not None and self.config.max_positions < T:
                raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        else:
            pos = step[0][None]  # (1, T): every row's positions
            if step[1] is not None:
                pos = (pos - step[1][:, None]).clamp_min(0)  # (B, T): each row's own, after its left padding
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(pos)
        rope = None
        if self.rotary is not None:
            if self.rotary.cos.shape[0] < T:
                self.rotary.build(T)
            rope = self.rotary(pos)
        window_mask = self._window_mask(T, idx.device) if step is None and self.config.window else None
        if self.training:
            x = self.drop(x)
        return x, rope, window_mask, step

    def _cache_step(self, idx: torch.Tensor, input_pos: torch.Tensor | None) -> tuple | None:
        """The KV-cache step of tokens idx (B, T) at time steps ``input_pos`` (T,): (time steps, left
        padding (None where no row is padded), slots written, written from the start); None without
        ``input_pos`` (no cache)."""
        if input_pos is None:
            return None
        B = idx.shape[0]
        if self.cache_len == 0 or len(self.cache_pad) != B:
            raise ValueError(
                f"decoding {B} row(s) with input_pos needs a KV cache set up for them: call "
                f"model.setup_cache({B}, length) first (the cache now holds {len(self.cache_pad)} row(s) of "
                f"{self.cache_len} steps)"
            )
        if not torch.compiler.is_compiling() and input_pos.shape != (idx.shape[1],):
            raise ValueError(
                f"input_pos must hold one time step per token: {idx.shape[1]} token(s), got input_pos of "
                f"shape {tuple(input_pos.shape)}"
            )
        filled = _filled(input_pos, self.cache_len)
        if isinstance(filled, int) and filled > self.cache_len and any(b.attn.window is None for b in self.h):
            raise ValueError(
                f"time step {filled - 1} is past the KV cache's {self.cache_len} steps: call "
                f"model.setup_cache({B}, length) with a length of at least {filled}"
            )
        return input_pos, self.cache_pad if self.cache_padded else None, filled, written_from_start(input_pos, filled)

    def _through_blocks(self, x: torch.Tensor, rope, window_mask, step) -> torch.Tensor:
        """``hidden_states``' second part: the embeddings x through the blocks and ``ln_f``."""
        stepped = self._blocks_in_one_op(x, step) if step is not None and rope is None else None
        if stepped is not None:
            x = stepped
        else:
            for block in self.h:
                x = block(x, rope, window_mask, step)
        return self.ln_f(x)

    def _blocks_in_one_op(self, x: torch.Tensor, step: tuple) -> torch.Tensor | None:
        """``hidden_states``' eager decode step of x (B, T, C) through every block in one op,
        gpt2lab.native's ``decode_blocks``: each block's ``decode_block`` in turn with the arguments its
        plan fixed (``Block.plan``), none of the Python a block's own step runs around it. None where the
        blocks would not step as one op (``_one_op_blocks``): they step one by one then, as within
        ``block_ops``."""
        blocks = self._one_op_blocks(x.shape[0], x.shape[1], x.device, x.dtype, step, logits=False)
        if blocks is None:
            return None
        return native.on_blocks("decode_blocks", blocks, x, step[0], step[2], step[1])

    def _logits_in_one_op(self, idx: torch.Tensor, step: tuple) -> torch.Tensor | None:
        """``forward``'s eager decode step from tokens idx (B, T) to their next-token logits in one op,
        ``decode_logits``: the token and position embeddings, the blocks as ``decode_blocks`` runs them,
        then ``ln_f`` and the lm_head as planned (``head_plan``). None where the blocks would not step as
        one op, that plan does not hold for idx's rows, or the embeddings, ``ln_f`` or the lm_head have
        hooks (``_one_op_blocks``): ``forward`` runs them from Python then."""
        if _hooked(self.wte, self.wpe, self.ln_f, self.lm_head):
            return None
        table = self.wte.weight
        blocks = self._one_op_blocks(idx.shape[0], idx.shape[1], table.device, table.dtype, step, logits=True)
        if blocks is None:
            return None
        return native.on_blocks("decode_logits", blocks, idx, step[0], step[2], step[1])

    def _one_op_blocks(
        self, rows: int, tokens: int, device: torch.device, dtype: torch.dtype, step: tuple, logits: bool
    ) -> torch.ScriptObject | None:
        """The blocks' arguments for a one-op eager decode step of ``tokens`` tokens in each of ``rows``
        rows of hidden states of ``dtype``: gpt2lab.native's ``DecodeBlocks``, with the embedding tables
        and, where planned (``head_plan``), ``ln_f`` and the lm_head's product. None where some block
        would not step as one op (``Block.one_op_slots``) or any block has hooks, or, for ``logits``,
        where the head's plan does not hold for ``rows`` rows (checked before the blocks). They are kept
        (``_blocks``) while the blocks' plans and KV caches, the head's plan and the embedding tables
        stay."""
        if not self._blocks_together or torch.compiler.is_compiling() or _global_hooks():
            return None
        head = self.head_plan
        if logits and (head is None or not head.holds(self, rows)):
            return None
        chosen: dict[tuple, str] = {}  # the blocks' attention kernels, chosen once for blocks alike
        key = []  # what the kept arguments were gathered from: objects equal only to themselves, and ids
        for block in self.h:
            if block._forward_hooks or block._forward_pre_hooks:
                return None
            if block.one_op_slots(rows, tokens, device, dtype, step, chosen) is None:
                return None
            plan = block.step_plan
            key += (plan, _kv_cache(plan.attn))
        tables = (self.wte.weight, self.wpe.weight) if self.wpe is not None else ()
        key += (head, *map(id, tables))  # the tables' ids, unique while kept (with the arguments) below
        kept = self._blocks
        if kept is None or kept[0] != key:
            blocks = torch.classes.gpt2lab_native.DecodeBlocks()
            for block in self.h:
                blocks.add(*block.native_args())
            if head is not None:
                p = head.product
                blocks.set_head(
                    head.norm, head.eps, p.kernel, p.weight, p.scale, p.bias, p.out_features, self.config.vocab_size
                )
            if tables:
                blocks.set_embeddings(*tables)
            self._blocks = kept = (key, blocks, tables)
        return kept[1]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, vocab_size) of hidden states x (B, T, n_embd)."""
        logits = self.lm_head(x)
        vocab = self.config.vocab_size  # a padded vocabulary's rows are never predicted
        return logits if logits.shape[-1] == vocab else logits[..., :vocab]

    def loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the logits of hidden states x (B, T, n_embd) against targets (B, T;
        -100 = ignore). On the CPU a chunk of tokens at a time, without ever holding the full logits."""
        vocab, head = self.config.vocab_size, self.lm_head
        if isinstance(head, Linear) and use_onednn(x, head.weight, head.kernel):
            flat_x, flat_y = x.view(-1, x.size(-1)), targets.reshape(-1)
            kernel = head.kernel_for(min(len(flat_x), chunk_rows(vocab)))  # each chunk's product
            return linear_cross_entropy(flat_x, head.weight, flat_y, vocab, kernel=kernel)
        logits = self.lm_head(x).float()
        # A padded vocabulary's columns get probability 0, as if sliced off. Filling them with -inf
        # instead of slicing keeps each row's length a multiple of 64, so the fused cross-entropy kernels
        # that torch.compile writes for a GPU read whole vectors; eager, it writes only those columns.
        logits[..., vocab:] = float("-inf")
        return F.cross_entropy(logits.flatten(0, -2), targets.reshape(-1), ignore_index=-100)

    def _window_mask(self, T: int, device: torch.device) -> torch.Tensor | BlockMask:
        """The sliding-window causal mask for T tokens, built once per (length, device): a flex
        BlockMask where the attention backend chooses FlexAttention, else a boolean (T, T) mask for SDPA."""
        key = (T, device)
        if key in self._window_masks:
            return self._window_masks[key]
        attention = self.backends.attention
        if attention == "flex" or (attention == "auto" and flex_applies(device, self.config)):
            self._window_masks[key] = window_block_mask(T, self.config.window, device)
        else:
            i = torch.arange(T, device=device)
            d = i[:, None] - i[None, :]  # query - key
            self._window_masks[key] = (d >= 0) & (d < self.config.window)
        return self._window_masks[key]

    # --- inference cache -------------------------------------------------------------------------

    def setup_cache(
        self,
        batch_size: int,
        max_seq_len: int,
        pad: torch.Tensor | None = None,
        keep: bool = False,
    ) -> None:
        """Allocate each layer's KV cache for ``max_seq_len`` time steps (a window layer keeps only its
        window), in the weights' dtype and on their device. ``pad`` (B,) is each row's left padding, so
        prompts of different lengths share a batch.

        ``keep``: the cache is to outlive this generation call, as a compiled decode step's must (its
        code is tied to these very buffers: new ones compile it again). A kept cache, until
        ``clear_cache``, serves every later call of its batch size that fits in it, eager or compiled,
        so calls of other lengths reuse it instead of compiling again, and grows by doubling when one
        does not fit (``kept_cache_len``)."""
        p = self.wte.weight
        dtype = p.dtype
        kept = keep or self.cache_kept
        steps = self.kept_cache_len(batch_size, max_seq_len) if kept else max_seq_len
        self._check_cache_fits(batch_size, steps, dtype)
        self.cache_end, self.cache_kept, max_seq_len = max_seq_len, kept, steps
        for block in self.h:
            attn = block.attn
            size = max_seq_len if attn.window is None else min(attn.window, max_seq_len)
            shape = (batch_size, attn.n_kv_head, size, attn.head_dim)
            old = attn.kv_cache
            if (
                old is not None
                and _writable_here(old.k)
                and (old.k.shape, old.k.dtype, old.k.device, old.rolls) == (shape, dtype, p.device, size < max_seq_len)
            ):
                old.reset()  # same buffers again: a compiled decode step keeps its graph
            else:
                attn.kv_cache = KVCache(
                    batch_size, attn.n_kv_head, attn.head_dim, size, attn.window, size < max_seq_len, dtype, p.device
                )
        pad = pad.to(p.device) if pad is not None else torch.zeros(batch_size, dtype=torch.long, device=p.device)
        if self.cache_pad.shape == pad.shape and _writable_here(self.cache_pad):
            self.cache_pad.copy_(pad)
        else:
            self.cache_pad = pad
        self.cache_padded = bool(pad.any())  # without padding, a decode step needs no attention mask
        self.cache_len = max_seq_len
        if self.rotary is not None and self.rotary.cos.shape[0] < max_seq_len:
            self.rotary.build(max_seq_len)

    def _check_cache_fits(self, batch_size: int, steps: int, dtype: torch.dtype) -> None:
        """Refuse, before torch is asked for them, KV caches (and rotary tables) of ``batch_size`` rows and
        ``steps`` time steps larger than the memory of the model's device: sizes past what torch can count
        would not even fail as out of memory."""
        need = batch_size * self.config.kv_cache_bytes(steps, torch.empty((), dtype=dtype).element_size())
        if self.rotary is not None:
            need += 2 * steps * self.rotary.head_dim * 4  # cos and sin, float32
        have, where = memory_of(self.wte.weight.device)
        if need > have:
            raise GPT2LabError(
                f"a KV cache of {batch_size} row(s) x {steps:,} time steps needs {need / 2**30:,.1f} GiB, more than "
                f"{where} ({have / 2**30:,.1f} GiB); generate fewer tokens or use fewer rows"
            )

    def kept_cache_len(self, batch_size: int, max_seq_len: int) -> int:
        """The time steps of a kept KV cache (``setup_cache``'s ``keep``) that a call of ``batch_size``
        rows and ``max_seq_len`` steps runs in: the present cache's if it fits; if a call of its batch
        size needs more, at least twice as many and at least ``MIN_GROWN_CACHE`` (at most the learned
        positions, which ``max_seq_len`` never exceeds); else (no cache, or another batch size) just
        what the call needs. Repeated calls of one shape attend over no more than they need, and a
        session whose calls grow compiles its step for a few cache lengths only (at most 6 up to
        GPT-2's 1,024 positions, within dynamo's limit of 8 compiles per function). A shorter call in
        a longer cache reads only the steps written, except a compiled step off the CPU, which
        attends over the whole cache (static shapes, ``_filled``)."""
        cache = self.h[0].attn.kv_cache if len(self.h) else None
        if cache is None or cache.k.shape[0] != batch_size:
            return max_seq_len
        if max_seq_len <= self.cache_len:
            return self.cache_len
        limit = self.config.max_positions
        grown = max(2 * self.cache_len, MIN_GROWN_CACHE)
        grown = grown if limit is None else min(grown, limit)
        return max(grown, max_seq_len)

    def pack_for_decoding(self, rows: int, steps: int) -> list[Linear]:
        """Before ``steps`` CPU decode steps of ``rows`` rows each, set up how the linear layers of an
        ``auto`` kernel read their weights. At one row, where the kernel table measures the step's
        products faster in numpy's BLAS than in torch's and gpt2lab's kernels (kind ``numpy`` against
        ``packed`` in gpt2lab.kernels, summed over the layers, each kind's copies counted where they would
        be made), every layer reads its weight there (``Linear.pack``
        with ``numpy``, or ``numpy_t`` on a transposed copy), and the steps must run within
        ``ops.numpy_blas_threads``. Otherwise, for at least ``backends.pack_min_steps`` steps, a layer
        reads a copy of its weight laid out for products of that many rows (MKL's or oneDNN's packed
        layout, at one row the transposed one, and up to ``kernels.FEW_ROWS`` rows gpt2lab's blocked one) where the
        table measures that faster (kind ``packed`` at one row, ``steps`` at more). A copy is
        made only where the saving repays making it within ``steps`` (``KernelTable.pack_repays``); the
        copies hold about as much memory again as the weights they copy, and together never more than
        half the memory the OS has available (``gpt2lab.device.available_memory``). A layer
        that reads no copy reads with gpt2lab's own kernel on the weight as it is (``avx2_f32``: no
        copy) for any number of steps (unless ``pack_min_steps`` is 0) wherever the table measures it
        at most ``kernels.MARGIN`` slower than the other kernels on the weight (``KernelTable.in_place``):
        a block whose four products run gpt2lab's kernels steps in one op (``Block.plan``), which saves
        more than that. The logits change by float32 rounding only. Under ``backends.huge_pages`` the weights
        move into 2 MiB pages first (``_weights_to_huge_pages``), and each copy made after it is made
        (``_copy_to_huge_pages``). Returns the layers packed
        (generation unpacks them when it ends)."""
        p = self.wte.weight
        if p.device.type != "cpu" or p.dtype != torch.float32:
            return []
        huge = self.weights_to_huge_pages()
        layers = [m for m in self.modules() if isinstance(m, Linear) and m.kernel == "auto" and m.table is not None]
        min_steps = self.backends.pack_min_steps
        copies = bool(min_steps) and steps >= min_steps
        own = kernels.decode_kind(rows)  # the kind with gpt2lab's kernels among its candidates
        kind = "numpy" if _faster_in_numpy(layers, rows, steps, copies, in_place=bool(min_steps)) else own
        if kind == own and not min_steps:
            return []
        spare = available_memory()
        budget = spare // 2 if spare is not None else math.inf
        packed = []
        for m in layers:
            shape = (m.out_features, m.in_features, rows)
            kernel = m.table.choose(*shape, kind=kind)
            in_place = kernel in READS_THE_WEIGHT  # its "copy" is the weight: no memory, nothing to repay
            size = m.weight.numel() * m.weight.element_size()
            repaid = in_place or (copies and m.table.pack_repays(*shape, kind) <= steps and size <= budget)
            if kind == own and not (kernel in kernels.COPY_KERNELS and repaid):
                # gpt2lab's kernel on the weight as it is, unless measurably slower (kernels.MARGIN) than
                # the others on it: a block whose products all run gpt2lab's kernels steps in one op
                kernel = m.table.in_place(*shape, kind, slower=kernels.MARGIN)
                in_place = repaid = kernel is not None
            if kernel in kernels.COPY_KERNELS and repaid:
                m.pack(rows, kernel)
                budget -= 0 if in_place else size
                if huge and kernel in PLAIN_COPIES:
                    _copy_to_huge_pages(m)
            elif kind == "numpy":
                m.pack(rows, "numpy")  # the weight as it is
            else:
                continue
            packed.append(m)
        return packed

    def weights_to_huge_pages(self) -> bool:
        """Where decoding reads from 2 MiB pages (``_huge_pages``), move the float32 CPU weights of the
        linear layers there (``_weights_to_huge_pages``; those there already stay), and say so. Eager
        steps read them there (``pack_for_decoding``), and a compiled step freezes them where they lie
        (``gpt2lab.decode.compiled_decode``), so that an eager call after it moves nothing and the
        compiled step need not compile again."""
        p = self.wte.weight
        if p.device.type != "cpu" or p.dtype != torch.float32 or not self._huge_pages():
            return False
        _weights_to_huge_pages([m.weight for m in self.modules() if isinstance(m, Linear)])
        return True

    def _huge_pages(self) -> bool:
        """Whether decoding moves what its steps read into 2 MiB pages: ``backends.huge_pages``, where
        Linux gives such pages only to memory that asks (``pages.wanted``)."""
        return self.backends.huge_pages and pages.wanted()

    def plan_decoding(self, rows: int) -> list[nn.Module]:
        """Before CPU decode steps of ``rows`` rows, have each linear layer choose once the kernel (and
        copy, ``pack_for_decoding``'s) of its products of that many rows (``Linear.plan``; an int8
        layer's, ``Int8Linear.plan``), instead of at every product; then, without rotary positions, each
        block whose products all run gpt2lab's own kernels steps in one op in eager steps (``Block.plan``;
        a compiled step runs its own code), and so, after them, do ``ln_f`` and the lm_head
        (``_plan_head``). Under ``backends.huge_pages`` the int8 blocks the planned products
        read, those planned again for the one op included, move into 2 MiB pages
        (``_blocks_to_huge_pages``). Returns the modules planned, for
        ``unplan`` when the steps end (the model too, for what its blocks' one op keeps: ``unplan``)."""
        planned = [m for m in self.modules() if callable(getattr(m, "plan", None)) and not isinstance(m, Block)]
        for m in planned:
            m.plan(rows)
        one_op = self.rotary is None  # a block steps with rotary positions in Python
        if one_op:
            self._plan_one_op_steps(rows)
        if self._huge_pages() and _blocks_to_huge_pages(planned) and one_op:
            self._plan_one_op_steps(rows)  # again: their plans read the blocks where they lie now
        return [*planned, *self.h, self] if one_op else planned

    def _plan_one_op_steps(self, rows: int) -> None:
        """Once its products are planned, each block runs them as planned, as one op where it can
        (``Block.plan``, which may plan some again on gpt2lab's kernels), and so do ``ln_f`` and the
        lm_head (``_plan_head``)."""
        for block in self.h:
            block.plan(rows)
        self.head_plan = self._plan_head(rows)

    def _plan_head(self, rows: int) -> _HeadPlan | None:
        """``ln_f`` and the lm_head's planned product of ``rows`` rows for the model's one-op decode steps
        (``_logits_in_one_op``), where the lm_head runs one of gpt2lab's own kernels and
        ``ln_f`` has its weight and bias; else None. Where every block steps in one op and an int8
        lm_head was planned on another kernel that gpt2lab's measured level with (``native_tie``), it is
        planned again on gpt2lab's: a near tie should not keep the whole step from being one op
        (docs/benchmarks.md, item 15)."""
        head = self.lm_head
        product = head.native_product(rows) if callable(getattr(head, "native_product", None)) else None
        if (
            product is None
            and callable(getattr(head, "native_tie", None))
            and all(block.step_plan is not None for block in self.h)
            and head.native_tie(rows)
        ):
            head.plan(rows, "avx2")
            product = head.native_product(rows)
        norm = [self.ln_f.weight, self.ln_f.bias]
        if product is None or any(t is None for t in norm):
            return None
        return _HeadPlan(rows, self.lm_head.planned, norm, self.ln_f.eps, product)

    def unplan(self) -> None:
        """Drop what the blocks' one-op steps kept (``_one_op_blocks``): their weights' copies and KV
        caches are not held past the blocks' plans; nor the head's plan (``head_plan``)."""
        self._blocks = None
        self.head_plan = None

    def __getstate__(self) -> dict:
        """What a copy or a pickle of the model holds: not the blocks' arguments kept in C++ for their
        one-op steps (``_blocks``, which cannot be copied), gathered again by the next step that needs them."""
        return super().__getstate__() | {"_blocks": None}

    @contextlib.contextmanager
    def block_ops(self) -> Iterator[None]:
        """Within it, each planned block's eager decode steps run its own op (``Block.plan``) rather
        than all the blocks in one (``_blocks_in_one_op``; the same kernels, the same results)."""
        together, self._blocks_together = self._blocks_together, False
        try:
            yield
        finally:
            self._blocks_together = together

    @contextlib.contextmanager
    def python_blocks(self) -> Iterator[None]:
        """Within it, every block's eager decode steps run its Python forward rather than its one op
        (``Block.plan``; the same kernels, the same results); the blocks' plans are back after it."""
        plans = [block.step_plan for block in self.h]
        for block in self.h:
            block.step_plan = None
        try:
            yield
        finally:
            for block, plan in zip(self.h, plans, strict=True):
                block.step_plan = plan

    def clear_cache(self, packs: bool = True, kv: bool = True) -> None:
        """Free what generation keeps between its steps: with ``kv``, the KV caches (kept or not) and the
        rows' padding; with ``packs``, every copy of a weight (``Linear.pack``), those of repeated
        products included."""
        if packs:
            for m in self.modules():
                if isinstance(m, Linear):
                    m.unpack()
        if not kv:
            return
        self._blocks = None  # holds the caches
        for block in self.h:
            block.attn.kv_cache = None
        self.cache_len = self.cache_end = 0
        self.cache_kept = False
        self.cache_pad = torch.zeros(0, dtype=torch.long, device=self.cache_pad.device)
        self.cache_padded = False

    # --- construction helpers --------------------------------------------------------------------

    def num_params(self, exclude_positions: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # the tied lm_head is counted once
        if exclude_positions and self.wpe is not None:
            n -= self.wpe.weight.numel()
        return n

    @staticmethod
    def layers_in(keys) -> int:
        """How many transformer blocks a state dict's keys (``h.N.…``, HF prefix or not) hold: a cheap
        check of a config against its weights before any module is built."""
        indices = {int(m.group(1)) for k in keys if (m := _BLOCK_KEY.match(k))}
        return max(indices) + 1 if indices else 0

    @classmethod
    def check_state_dict(cls, state_dict: dict[str, torch.Tensor], config: GPTConfig) -> None:
        """Raise CheckpointError unless ``state_dict`` holds exactly the tensors of a GPT of ``config``,
        names, shapes and floating-point weights. The layer count is compared first, before any module
        is built."""
        layers = cls.layers_in(state_dict)
        if layers != config.n_layer:
            raise CheckpointError(f"the config says n_layer={config.n_layer} but the weights hold {layers} layers")
        with torch.device("meta"):
            expected = cls(config).state_dict()
        missing = sorted(k for k in expected if state_dict.get(k) is None)
        unknown = sorted(set(state_dict) - set(expected))
        if missing or unknown:
            found = [f"missing keys {_few(missing)}"] * bool(missing) + [f"unknown keys {_few(unknown)}"] * bool(
                unknown
            )
            raise CheckpointError("the weights do not match the config: " + "; ".join(found))
        for key, ref in expected.items():
            if state_dict[key].shape != ref.shape:
                raise CheckpointError(
                    f"tensor {key} has shape {tuple(state_dict[key].shape)} but the config needs {tuple(ref.shape)}"
                )
            if ref.is_floating_point() and not state_dict[key].is_floating_point():
                raise CheckpointError(
                    f"tensor {key} holds {state_dict[key].dtype} values, not floating-point weights; the file "
                    "is not a GPT-2 checkpoint of this kind (write it again from the model's float weights)"
                )

    @classmethod
    def from_state_dict(
        cls, config: GPTConfig, state_dict: dict[str, torch.Tensor], device="cpu", backends: Backends | None = None
    ) -> GPT:
        """Build on the meta device (no init cost, no double memory) and adopt the given tensors, checked."""
        cls.check_state_dict(state_dict, config)
        with torch.device("meta"):
            model = cls(config, backends)
        model.load_state_dict(state_dict, strict=True, assign=True)
        model.lm_head.weight = model.wte.weight
        device = torch.device(device)
        if model.rotary is not None:  # non-persistent buffers are still on meta: make them real
            model.rotary.build(config.block_size, device)
        model.cache_pad = torch.zeros(0, dtype=torch.long, device=device)
        return model.to(device)


def _few(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")
