"""gpt2lab's own CPU kernels (gpt2lab.native: int8 "avx2", float32 "avx2_f32" and "avx2_f32_blocks", attention
"avx2"): exact
or within float32 rounding, traceable, measured with what their copies cost, and left out cleanly where
they cannot be built."""

from __future__ import annotations

import copy
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gpt2lab.model
from gpt2lab import Backends, GPT2LabError, generate, kernels, native, ops, pages, quantize
from gpt2lab.decode import decode_one_token, prefill
from gpt2lab.quantize import Int8Linear

needs_kernel = pytest.mark.skipif(not native.available(), reason=f"avx2 kernel: {native.unavailable_reason()}")
needs_avx512 = pytest.mark.skipif(not native.avx512(), reason="gpt2lab's avx512 attention needs an AVX-512 CPU")


def exact_product(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """What the kernel computes, by its definition: each row of x quantized to int8 about its center
    c = (max + min) / 2 with scale max((max - min) / 2, 1e-12) / 127 (float32), (x - c) / scale rounded
    half to even; the int8 sums exact in int64; then (((sum * x scale) * weight scale) + c * weight sum)
    + bias, the weight sum its int8 row's sum times its scale, each step rounded to float32."""
    lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    center = (hi + lo) / 2
    x_scale = ((hi - lo) / 2).clamp_min(1e-12) / 127
    qx = ((x - center).double() / x_scale.double()).float().round()  # float32's correctly rounded quotient
    sums = qx.long() @ qweight.long().T
    weight_sums = qweight.long().sum(1).float() * scale
    y = ((sums.float() * x_scale) * scale) + center * weight_sums
    return y if bias is None else y + bias


def path_set(request, paths: str, switch: str, wide: str):
    """Set the path ``request.param`` (one of ``native.<paths>()``) for the test by the op ``switch``,
    which turns path ``wide`` on or off, and restore it after; skip where the CPU lacks that path."""
    if not native.available() or request.param not in getattr(native, paths)():
        pytest.skip(f"this CPU has no {request.param} path")
    op = getattr(torch.ops.gpt2lab_native, switch)
    before = op(None)
    op(request.param == wide)
    yield request.param
    op(before)


@pytest.fixture(params=["avx2", "vnni"])
def int8_path(request):
    """Each way of multiplying the int8 kernel has on this CPU (``native.int8_paths``), set for the test."""
    yield from path_set(request, "int8_paths", "int8_vnni", "vnni")


@pytest.fixture(params=["avx2", "avx512"])
def float_path(request):
    """Each way the blocked float32 kernel has on this CPU (``native.float_paths``), set for the test."""
    yield from path_set(request, "float_paths", "float_avx512", "avx512")


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 7, 16])
@pytest.mark.parametrize(("out_features", "in_features"), [(64, 64), (70, 50), (3, 31), (6, 70), (300, 1000)])
@pytest.mark.parametrize("bias", [True, False])
def test_the_avx2_kernel_is_exact(rows, out_features, in_features, bias, int8_path):
    """Bit for bit what its definition gives, on each path, with widths that are not multiples of its
    32-byte chunks (an odd number of them too) nor of its 4-channel blocks, rows in groups of four and
    of one to three left over, weights of 127 levels (its pair sums never saturate) and inputs that
    span large and small magnitudes."""
    g = torch.Generator().manual_seed(rows * 1000 + out_features + in_features)
    w = torch.randn(out_features, in_features, generator=g)
    x = torch.randn(rows, in_features, generator=g) * torch.logspace(-3, 3, rows)[:, None]
    b = torch.randn(out_features, generator=g) if bias else None
    qweight, scale = ops.quantize_weight(w, 127)
    y = ops.int8_linear(x, ops.pack_int8(qweight, scale, b, "avx2"), "avx2")
    assert torch.equal(y, exact_product(x, qweight, scale, b))


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 4])  # and one more
def test_the_avx2_kernel_is_exact_at_the_largest_sums(rows, int8_path):
    """Rows of x at -127 and 127 times weights of the same signs (every byte product 127 x 127 = 16,129,
    or on the VNNI path (127 + 128) x 127 before the offset goes), 4,000 wide: sums of 64.5 million,
    exact; and a row all at -127 (its offset sum at its most negative)."""
    signs = torch.where(torch.arange(4000) % 3 == 0, -1, 1)
    qweight = (signs * 127).to(torch.int8).repeat(8, 1)
    qweight[1::2] = -127
    scale = torch.full((8,), 1.0)
    x = signs.float().repeat(rows + 1, 1)
    x[-1] = -1.0
    x[-1, 0] = 1.0  # its range: -1 to 1, so -1 is -127
    y = ops.int8_linear(x, ops.pack_int8(qweight, scale, None, "avx2"), "avx2")
    assert torch.equal(y, exact_product(x, qweight, scale, None))
    assert y[0, 0] == 4000 * 127  # x scale 1/127, weight scale 1: 4,000 products of 127 x 127


@needs_kernel
def test_the_avx2_kernel_equals_int_mm_on_seven_bit_weights():
    """Where torch._int_mm is exact on every CPU too, the two give the same bits."""
    g = torch.Generator().manual_seed(0)
    qweight, scale = ops.quantize_weight(torch.randn(96, 160, generator=g), 63)
    x, b = torch.randn(3, 160, generator=g), torch.randn(96, generator=g)
    want = ops.int8_linear(x, ops.pack_int8(qweight, scale, b, "int_mm"), "int_mm")
    assert torch.equal(ops.int8_linear(x, ops.pack_int8(qweight, scale, b, "avx2"), "avx2"), want)


@needs_kernel
@pytest.mark.parametrize("rows", [2, 17, 40])
@pytest.mark.parametrize(("out_features", "in_features"), [(64, 64), (70, 50), (3, 31), (300, 1000)])
@pytest.mark.parametrize("bias", [True, False])
def test_the_other_int8_kernels_quantize_and_scale_in_one_pass_each_to_the_same_bits(
    rows, out_features, in_features, bias, monkeypatch
):
    """fbgemm, torch._int_mm and oneDNN's products with their input's scaling or quantization and their
    output's scaling in gpt2lab.native (``normalize_rows``, ``quantize_rows``, ``scale_rows_``) give the
    aten path's bits: widths that are not multiples of the ops' 8 and 32 values per pass, a zero row,
    magnitudes from 1e-3 to 1e3."""
    g = torch.Generator().manual_seed(rows * 1000 + out_features + in_features)
    w = torch.randn(out_features, in_features, generator=g)
    x = torch.randn(rows, in_features, generator=g) * torch.logspace(-3, 3, rows)[:, None]
    x[1] = 0
    b = torch.randn(out_features, generator=g) if bias else None
    qweight, scale = ops.quantize_weight(w, kernels.int8_weight_levels())
    for kernel in [k for k in ops.int8_kernels(rows) if k != "avx2"]:  # avx2 quantizes in its product
        packed = ops.pack_int8(qweight, scale, b, kernel)
        got = ops._int8_linear_native(x, packed, kernel)
        with monkeypatch.context() as m:
            m.setattr(native, "available", lambda: False)
            want = ops.int8_linear(x, packed, kernel)
        assert torch.equal(got, want), kernel


@needs_kernel
@pytest.mark.parametrize("in_features", [1, 31, 64, 1000])
def test_the_row_ops_give_atens_values(in_features):
    """``quantize_rows`` gives ``ops.quantize_rows``' bits (rounded half to even: a row of halves), as
    int8 or shifted by 128 as uint8; ``normalize_rows`` each row about its center over its half range."""
    g = torch.Generator().manual_seed(in_features)
    x = torch.randn(5, in_features, generator=g) * torch.logspace(-3, 3, 5)[:, None] + torch.arange(5)[:, None]
    x[2] = 0
    x[3] = torch.arange(in_features) % 8 - 3.5  # halves: with -127 and 127 the extremes, the scale is 1
    x[3, 0] = 127
    if in_features > 1:
        x[3, 1] = -127
    q, x_scale, center = ops.quantize_rows(x)
    signed, got_scale, got_center = torch.ops.gpt2lab_native.quantize_rows(x, 0)
    unsigned, _, _ = torch.ops.gpt2lab_native.quantize_rows(x, 128)
    assert torch.equal(got_scale, x_scale) and torch.equal(got_center, center)
    assert torch.equal(signed, q.to(torch.int8)) and torch.equal(unsigned, (q + 128).to(torch.uint8))
    lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    half = ((hi - lo) / 2).clamp_min(1e-12)
    got, got_half, got_center = torch.ops.gpt2lab_native.normalize_rows(x)
    assert torch.equal(got_half, half) and torch.equal(got_center, center)
    assert torch.equal(got, (x - center) / half)


@needs_kernel
def test_int8_products_of_several_rows_quantize_with_the_native_ops(monkeypatch):
    """Where gpt2lab.native runs, an eager product of several rows on another kernel takes the one-pass
    ops; a compiled step traces aten's."""
    calls = []
    monkeypatch.setattr(ops, "_int8_linear_native", lambda x, packed, kernel: calls.append(kernel) or x)
    qweight, scale = ops.quantize_weight(torch.randn(8, 8), 127)
    x = torch.randn(3, 8)
    for kernel in ops.int8_kernels(3):
        ops.int8_linear(x, ops.pack_int8(qweight, scale, None, kernel), kernel)
    assert calls == [k for k in ops.int8_kernels(3) if k != "avx2"]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    ops.int8_linear(x, ops.pack_int8(qweight, scale, None, "int_mm"), "int_mm")
    assert len(calls) == len(ops.int8_kernels(3)) - ("avx2" in ops.int8_kernels(3))


@needs_kernel
def test_the_quantizing_ops_refuse_what_they_cannot_take():
    n = torch.ops.gpt2lab_native
    with pytest.raises(RuntimeError, match="offset must be 0"):
        n.quantize_rows(torch.randn(2, 8), 3)
    with pytest.raises(RuntimeError, match=r"\(rows, in\) float32"):
        n.normalize_rows(torch.randn(2, 8, 3))
    with pytest.raises(RuntimeError, match="one per row"):
        n.scale_rows_(
            torch.zeros(2, 8, dtype=torch.int32), torch.ones(3), torch.zeros(2), torch.ones(2, 8), False, None
        )
    with pytest.raises(RuntimeError, match=r"\(2, out\)"):
        n.scale_rows_(torch.zeros(2, 8), torch.ones(2), torch.zeros(2), torch.ones(2, 7), False, None)


@needs_kernel
def test_the_avx2_op_passes_torchs_custom_op_checks():
    """Schema, fake tensor (a compiled step traces it), dispatch."""
    qweight, scale = ops.quantize_weight(torch.randn(40, 70), 63)
    blocks, scale, _ = ops.pack_int8(qweight, scale, None, "avx2")
    torch.library.opcheck(torch.ops.gpt2lab_native.int8_avx2, (torch.randn(2, 70), blocks, scale, torch.randn(40)))
    torch.library.opcheck(torch.ops.gpt2lab_native.int8_avx2, (torch.randn(1, 70), blocks, scale, None))


@needs_kernel
def test_the_avx2_op_refuses_a_weight_not_laid_out_for_it():
    qweight, scale = ops.quantize_weight(torch.randn(40, 70), 63)
    with pytest.raises(RuntimeError, match="laid out as"):
        torch.ops.gpt2lab_native.int8_avx2(torch.randn(1, 70), qweight, scale, None)
    blocks, scale, _ = ops.pack_int8(qweight, scale, None, "avx2")
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.gpt2lab_native.int8_avx2(torch.randn(1, 30), blocks, scale, None)


@needs_kernel
def test_the_kernels_take_their_avx512_paths_where_torch_is_not_held_below_avx512():
    """The int8 kernel's VNNI path and the blocked float32 kernel's AVX-512 path run by default where
    the CPU has them, and not where ``ATEN_CPU_CAPABILITY`` holds torch to AVX2 (as on a CPU without
    AVX-512); neither can be turned on where the CPU lacks it."""
    code = (
        "from gpt2lab import native; import torch; native.require(); "
        "print(torch.ops.gpt2lab_native.int8_vnni(None), torch.ops.gpt2lab_native.float_avx512(None))"
    )
    runs = {}
    for capability in (None, "avx2"):
        env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
        env.update({"ATEN_CPU_CAPABILITY": capability} if capability else {})
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        runs[capability] = out.stdout.strip()
    here = f"{'vnni' in native.int8_paths()} {'avx512' in native.float_paths()}"
    assert runs == {None: here, "avx2": "False False"}
    if "vnni" not in native.int8_paths():
        with pytest.raises(RuntimeError, match="no AVX-512 VNNI"):
            torch.ops.gpt2lab_native.int8_vnni(True)
    if "avx512" not in native.float_paths():
        with pytest.raises(RuntimeError, match="no AVX-512"):
            torch.ops.gpt2lab_native.float_avx512(True)


@needs_kernel
def test_the_avx2_kernel_is_a_candidate_for_few_rows_only():
    assert "avx2" in ops.int8_kernels(1) and "avx2" in ops.int8_kernels(ops.AVX2_MAX_ROWS)
    assert "avx2" not in ops.int8_kernels(ops.AVX2_MAX_ROWS + 1)


class AlwaysAvx2:
    def choose(self, out_features, in_features, rows, kind="float32"):
        return "avx2"


@needs_kernel
def test_a_planned_avx2_layer_takes_x_with_its_leading_dimensions(monkeypatch):
    """Planned for its row count, an int8 layer hands x (..., in) to the op as it is (no reshape before
    nor view after) and gets the same bits as the op on the rows flattened; other row counts reshape."""
    layer = Int8Linear(torch.nn.Linear(50, 70), AlwaysAvx2())
    layer.plan(6)
    x = torch.randn(2, 3, 50)
    want = torch.ops.gpt2lab_native.int8_avx2(x.reshape(6, 50), *layer.planned.packed).view(2, 3, 70)
    reshapes = []
    monkeypatch.setattr(torch.Tensor, "reshape", lambda t, *a: reshapes.append(a) or t.view(*a))
    with torch.no_grad():
        got = layer(x)
        assert torch.equal(got, want) and not reshapes
        layer(x[:1])
    assert reshapes == [(-1, 50)]
    torch.library.opcheck(torch.ops.gpt2lab_native.int8_avx2, (x, *layer.planned.packed))


@needs_kernel
def test_a_compiled_step_calls_the_avx2_op_itself(monkeypatch):
    """With the avx2 kernel planned, a compiled product calls the C++ op directly, not through the
    Python of ``int8_product`` (which finds its layer by id: here the layer is not registered there)."""

    monkeypatch.setattr(kernels, "has_amx_int8", lambda: False)  # with AMX a compiled step traces _int_mm
    layer = Int8Linear(torch.nn.Linear(64, 48), AlwaysAvx2())
    layer.plan(1)
    quantize._planned_layers.pop(id(layer))
    x = torch.randn(1, 64)
    with torch.no_grad():
        want = layer(x)
        got = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(got, want)


def test_without_the_kernel_the_others_run_and_asking_for_it_says_why():
    """GPT2LAB_NATIVE=0: never built, no kernel of it a candidate, and a request for one names the reason."""
    code = (
        "import torch\n"
        "from gpt2lab import Backends, GPT2LabError, native, ops\n"
        "from gpt2lab import kernels\n"
        "assert 'avx2' not in ops.int8_kernels(1), ops.int8_kernels(1)\n"
        "assert not {'avx2_f32', 'avx2_f32_blocks'} & set(kernels.candidates('packed', 1))\n"
        "assert kernels.candidates('attention', 64) == ('products', 'sdpa')\n"
        "q, s = ops.quantize_weight(torch.randn(8, 32), 63)\n"
        "asks = [lambda: ops.pack_int8(q, s, None, 'avx2'), lambda: Backends(decode_attention='avx2')]\n"
        "asks.append(lambda: ops.copy_weight(torch.randn(8, 32), 1, 'avx2_f32_blocks'))\n"
        "for ask in asks:\n"
        "    try:\n"
        "        ask()\n"
        "    except GPT2LabError as e:\n"
        "        print(e)\n"
    )
    env = {**os.environ, native.ENV_NATIVE: "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.count("GPT2LAB_NATIVE=0") == 3 and "choose another kernel" in out.stdout


def test_a_failed_build_leaves_the_kernel_out(monkeypatch):
    def broken_build():
        raise RuntimeError("Error building extension 'gpt2lab_native'\nc++: not found")

    monkeypatch.setattr(native, "_build_and_load", broken_build)
    native.unavailable_reason.cache_clear()
    try:
        if native.unavailable_reason() is None or "x86" in native.unavailable_reason():
            pytest.skip("not an AVX2 x86 CPU: nothing is built here")
        assert native.unavailable_reason() == "could not be built: c++: not found"
        assert not native.available() and "avx2" not in ops.int8_kernels(1)
        with pytest.raises(GPT2LabError, match="could not be built"):
            native.require()
    finally:
        native.unavailable_reason.cache_clear()


@needs_kernel
@pytest.mark.parametrize(("out_features", "in_features"), [(64, 64), (70, 50), (3, 31)])
def test_blocks_interleave_four_channels_chunk_by_chunk(out_features, in_features):
    """The layout the int8 kernel reads: zero-padded to whole blocks of 4 channels and 32-byte chunks,
    then each block's rows chunk by chunk."""
    w = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8)
    padded = F.pad(w, (0, -in_features % 32, 0, -out_features % 4))
    want = padded.view(len(padded) // 4, 4, padded.shape[1] // 32, 32).transpose(1, 2)
    assert torch.equal(ops.blocks(w), want)


def assert_copy_linear_is_f_linear(x, w, b, copy, kernel: str) -> None:
    """``kernel`` on ``copy`` gives F.linear's result within float32 rounding, with and without the bias
    and with the GELU after."""
    for bias in (b, None):
        want = F.linear(x, w, bias)
        torch.testing.assert_close(ops.copy_linear(x, copy, kernel, w, bias), want, atol=1e-4, rtol=1e-5)
        got = ops.copy_linear(x, copy, kernel, w, bias, gelu=True)
        torch.testing.assert_close(got, F.gelu(want, approximate="tanh"), atol=1e-4, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 7, 8])
@pytest.mark.parametrize(
    ("out_features", "in_features"),
    [(64, 64), (70, 50), (3, 31), (50, 1000), (13, 8), (40, 1030), (13, 1500)],  # rows of up to 4 KB, and longer
)
def test_the_float32_kernel_equals_f_linear_within_rounding(rows, out_features, in_features):
    """Whole groups of 8 channels and the channels past them, widths with and without a tail past the
    8-lane chunks, with and without bias and the GELU after; the weight read as it is (no copy)."""
    g = torch.Generator().manual_seed(out_features + in_features)
    w, b = torch.randn(out_features, in_features, generator=g), torch.randn(out_features, generator=g)
    x = torch.randn(2, rows, in_features, generator=g)
    copy = ops.copy_weight(w, rows, "avx2_f32")
    assert copy.data_ptr() == w.data_ptr()
    assert_copy_linear_is_f_linear(x, w, b, copy, "avx2_f32")
    torch.library.opcheck(torch.ops.gpt2lab_native.float_avx2, (x, w, b))
    torch.library.opcheck(torch.ops.gpt2lab_native.float_avx2, (x[0, 0], w, None))


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 7, 8])
@pytest.mark.parametrize(("out_features", "in_features"), [(64, 64), (70, 50), (3, 31), (50, 1000), (16, 5), (1, 1)])
def test_the_blocked_float32_kernel_equals_f_linear_within_rounding(rows, out_features, in_features, float_path):
    """Whole blocks of 16 channels and a padded last block, widths with and without a tail past the
    rounds of 4 input positions, with and without bias and the GELU after, on the blocked copy."""
    g = torch.Generator().manual_seed(out_features + in_features)
    w, b = torch.randn(out_features, in_features, generator=g), torch.randn(out_features, generator=g)
    x = torch.randn(2, rows, in_features, generator=g)
    copy = ops.copy_weight(w, rows, "avx2_f32_blocks")
    assert_copy_linear_is_f_linear(x, w, b, copy, "avx2_f32_blocks")
    torch.library.opcheck(torch.ops.gpt2lab_native.float_blocks_avx2, (x, copy, b, out_features))
    torch.library.opcheck(torch.ops.gpt2lab_native.float_blocks_avx2, (x[0, 0], copy, None, out_features))
    torch.library.opcheck(torch.ops.gpt2lab_native.float_blocks, (w,))


@needs_kernel
@pytest.mark.parametrize("rows", [4, 8, 12, 16])
def test_the_blocked_float32_kernels_avx512_path_rounds_as_the_avx2_path_does_at_four_rows_a_pass(rows):
    """Each row's sum runs over the input positions in order on both paths, then the bias is added:
    the same bits wherever the AVX2 path takes four rows a pass (here also a padded last block)."""
    if "avx512" not in native.float_paths():
        pytest.skip("this CPU has no AVX-512")
    g = torch.Generator().manual_seed(rows)
    w, b, x = torch.randn(70, 300, generator=g), torch.randn(70, generator=g), torch.randn(rows, 300, generator=g)
    copy = ops.copy_weight(w, rows, "avx2_f32_blocks")
    before = torch.ops.gpt2lab_native.float_avx512(None)
    try:
        for bias in (b, None):
            got = {}
            for wide in (False, True):
                torch.ops.gpt2lab_native.float_avx512(wide)
                got[wide] = torch.ops.gpt2lab_native.float_blocks_avx2(x, copy, bias, 70)
            assert torch.equal(got[True], got[False])
    finally:
        torch.ops.gpt2lab_native.float_avx512(before)


@needs_kernel
@pytest.mark.parametrize(("out_features", "in_features"), [(32, 8), (70, 50), (3, 7)])
def test_the_blocked_layout_holds_16_channels_per_input_position(out_features, in_features):
    """Block j, input position k: channels 16j..16j+15 of the weight at k, zeros past the last channel."""
    w = torch.randn(out_features, in_features)
    padded = F.pad(w, (0, 0, 0, -out_features % 16))
    want = padded.view(len(padded) // 16, 16, in_features).transpose(1, 2)
    assert torch.equal(ops.copy_weight(w, 1, "avx2_f32_blocks"), want)


@needs_kernel
def test_the_blocked_op_refuses_a_weight_not_laid_out_for_it():
    w = torch.randn(40, 24)
    blocked = ops.copy_weight(w, 1, "avx2_f32_blocks")
    with pytest.raises(RuntimeError, match="laid out as"):
        torch.ops.gpt2lab_native.float_blocks_avx2(torch.randn(1, 24), w, None, 40)
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.gpt2lab_native.float_blocks_avx2(torch.randn(1, 30), blocked, None, 40)
    for out in (32, 49):  # 3 blocks of 16 hold 33 to 48 channels
        with pytest.raises(RuntimeError, match="blocks of 16"):
            torch.ops.gpt2lab_native.float_blocks_avx2(torch.randn(1, 24), blocked, None, out)
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.gpt2lab_native.float_blocks_avx2(torch.randn(1, 24), blocked, torch.randn(41), 40)


@needs_kernel
def test_the_float32_kernel_is_timed_with_the_cost_of_its_own_copy(tmp_path, monkeypatch):
    """It reads the weight itself: its "copy" is timed on its own (``pack avx2_f32``, next to nothing), not
    as the transposed copies are, and so it repays at once."""
    times = kernels.measure(256, 128, 1, kind="packed", repeat=1)
    assert {"pack", "pack avx2_f32"} <= times.keys() and times["pack avx2_f32"] < times["pack"]
    us = {k: 100e-6 for k in kernels.candidates("packed", 1)} | {"avx2_f32": 50e-6}
    monkeypatch.setattr(kernels, "measure", lambda *a, **k: us | {"pack": 1e-3, "pack avx2_f32": 5e-6})
    table = kernels.KernelTable(tmp_path / "k.json")
    assert table.choose(256, 128, 1, kind="packed") == "avx2_f32"
    assert table.pack_repays(256, 128, 1) == pytest.approx(0.1)  # 5 us to "copy", 50 us saved a product


def remember_one_row(remember_kernels, linears, us: dict, chosen, numpy_us: float = 200.0, rows: int = 1) -> None:
    """Kernel-file entries for the one-row products of ``linears`` (or the decode steps' of ``rows``): kind
    ``packed`` (``steps``) timed 100 us a product but for ``us``, its kernel ``chosen((out, in))``;
    numpy's BLAS ``numpy_us`` (slower)."""
    kind = kernels.decode_kind(rows)
    timed = {k: 100.0 for k in kernels.candidates(kind, rows)} | us
    numpy_us = {k: numpy_us for k in kernels.candidates("numpy", 1)} | {"pack": 300.0}
    for o, i in {(m.out_features, m.in_features) for m in linears}:
        entry = {"kernel": chosen((o, i)), "us_per_product": dict(timed)}
        remember_kernels({f"{kind} {o}x{i} rows {kernels.rows_bucket(rows, kind)}": entry})
        remember_kernels({f"numpy {o}x{i} rows 1": {"kernel": "numpy", "us_per_product": dict(numpy_us)}})


def recorded_packs(monkeypatch) -> list[str]:
    """The kernels ``Linear.pack`` is called with from now on, in order."""
    packed, pack = [], ops.Linear.pack
    monkeypatch.setattr(ops.Linear, "pack", lambda self, r, k: packed.append(k) or pack(self, r, k))
    return packed


@needs_kernel
@pytest.mark.parametrize("steps", [4, 40])
def test_one_row_decoding_reads_the_weights_with_it_however_short(
    make_gpt, remember_kernels, monkeypatch, steps, pack_min_steps=16
):
    """Where the table measures it faster, every float32 layer of a one-row decode reads its weight with
    gpt2lab's kernel, for fewer steps than copies need (``pack_min_steps``) too, without taking from
    the memory the copies may use: the same tokens as F.linear's, nothing packed after the call."""
    config = dict(vocab_size=1024, n_embd=128, n_head=4)
    model = make_gpt(seed=5, backends=Backends(linear="auto", pack_min_steps=pack_min_steps), **config)
    linears = [m for m in model.modules() if isinstance(m, ops.Linear)]
    remember_one_row(remember_kernels, linears, {"avx2_f32": 50.0, "pack": 300.0}, lambda shape: "avx2_f32")
    monkeypatch.setattr(gpt2lab.model, "available_memory", lambda: 0)  # no room for any copy
    packed = recorded_packs(monkeypatch)
    reference = make_gpt(seed=5, backends=Backends(linear="torch"), **config)
    tokens = generate(model, [[5, 17, 3]], steps, temperature=0, eos_id=None)
    assert packed == ["avx2_f32"] * len(linears)
    assert tokens == generate(reference, [[5, 17, 3]], steps, temperature=0, eos_id=None)
    assert all(m.packed is None for m in linears)


@needs_kernel
@pytest.mark.skipif(not kernels.candidates("numpy", 1), reason="numpy's BLAS cannot be told its threads here")
def test_a_short_decode_weighs_numpy_against_the_kernel_on_the_weight_too(make_gpt, remember_kernels, monkeypatch):
    """Fewer steps than copies need (``pack_min_steps``): numpy's BLAS (80 us a product) is faster than
    torch's kernels on the plain weight (100 us) but not than gpt2lab's kernel on it (50 us), which such
    a decode runs too: the layers read with it, not in numpy."""
    config = dict(vocab_size=1024, n_embd=128, n_head=4)
    model = make_gpt(seed=5, backends=Backends(linear="auto", pack_min_steps=16), **config)
    linears = [m for m in model.modules() if isinstance(m, ops.Linear)]
    remember_one_row(remember_kernels, linears, {"avx2_f32": 50.0, "pack": 300.0}, lambda shape: "avx2_f32", 80.0)
    packed = recorded_packs(monkeypatch)
    generate(model, [[5, 17, 3]], 8, temperature=0, eos_id=None)
    assert packed == ["avx2_f32"] * len(linears)


@needs_kernel
@pytest.mark.parametrize(("avx2_us", "one_op"), [(102.0, True), (110.0, False)])
def test_a_short_decode_reads_with_the_kernel_unless_measurably_slower(
    make_gpt, remember_kernels, monkeypatch, avx2_us, one_op
):
    """Without copies (fewer steps than ``pack_min_steps``), the layers read with gpt2lab's kernel on the
    weight as it is where it measured at most ``kernels.MARGIN`` slower than torch's kernels (102 against
    100 us): the blocks then step in one op. Where it measured 10% slower, torch's kernels run."""
    config = dict(vocab_size=1024, n_embd=128, n_head=4)
    backends = Backends(linear="auto", pack_min_steps=16, decode_attention="avx2")
    model = make_gpt(seed=5, backends=backends, **config)
    linears = [m for m in model.modules() if isinstance(m, ops.Linear)]
    remember_one_row(remember_kernels, linears, {"avx2_f32": avx2_us, "pack": 300.0}, lambda shape: "torch")
    packed = recorded_packs(monkeypatch)
    calls = one_op_steps(monkeypatch)
    generate(model, [[5, 17, 3]], 8, temperature=0, eos_id=None)
    assert packed == (["avx2_f32"] * len(linears) if one_op else [])
    assert len(calls) == (7 if one_op else 0)


@needs_kernel
def test_reading_the_weights_in_place_leaves_the_memory_to_copies(make_gpt, remember_kernels, monkeypatch):
    """Layers read by gpt2lab's kernel hold no copy: a copy that the memory has room for is still made
    for the one layer measured faster from it (here the lm_head, its own shape)."""
    config = dict(vocab_size=1024, n_embd=128, n_head=4)
    model = make_gpt(seed=5, backends=Backends(linear="auto", pack_min_steps=4), **config)
    linears = [m for m in model.modules() if isinstance(m, ops.Linear)]
    us = {"avx2_f32": 60.0, "torch_t": 50.0, "pack": 300.0}
    remember_one_row(remember_kernels, linears, us, lambda shape: "torch_t" if shape == (1024, 128) else "avx2_f32")
    monkeypatch.setattr(gpt2lab.model, "available_memory", lambda: 2 * model.lm_head.weight.numel() * 4)
    packed = recorded_packs(monkeypatch)
    generate(model, [[5, 17, 3]], 40, temperature=0, eos_id=None)
    assert packed == ["avx2_f32"] * (len(linears) - 1) + ["torch_t"]


@needs_kernel
@pytest.mark.parametrize(("steps", "want"), [(40, "torch_t"), (8, "avx2_f32")])
def test_where_a_faster_copy_does_not_repay_the_kernel_on_the_weight_reads_it(
    make_gpt, remember_kernels, monkeypatch, steps, want
):
    """The transposed copy is fastest and repays within 15 steps: a 40-step decode makes it; an 8-step
    one reads with gpt2lab's kernel, faster than both kernels on the plain weight, instead."""
    config = dict(vocab_size=1024, n_embd=128, n_head=4)
    model = make_gpt(seed=5, backends=Backends(linear="auto", pack_min_steps=4), **config)
    linears = [m for m in model.modules() if isinstance(m, ops.Linear)]
    remember_one_row(
        remember_kernels, linears, {"avx2_f32": 70.0, "torch_t": 50.0, "pack": 700.0}, lambda shape: "torch_t"
    )
    packed = recorded_packs(monkeypatch)
    generate(model, [[5, 17, 3]], steps + 1, temperature=0, eos_id=None)
    assert packed == [want] * len(linears)


@needs_kernel
def test_the_blocked_copy_repays_against_the_kernel_on_the_weight_as_it_is(tmp_path, monkeypatch):
    """The blocked copy saves 20 us a product over ``avx2_f32``, which needs no copy, and 50 us over the
    other kernels: its 700 us copy repays after 35 products, not 14."""
    us = {k: 100e-6 for k in kernels.candidates("packed", 1)} | {"avx2_f32": 70e-6, "avx2_f32_blocks": 50e-6}
    packs = {"pack": 1e-3, "pack avx2_f32": 5e-6, "pack avx2_f32_blocks": 700e-6}
    monkeypatch.setattr(kernels, "measure", lambda *a, **k: us | packs)
    table = kernels.KernelTable(tmp_path / "k.json")
    assert table.choose(256, 128, 1, kind="packed") == "avx2_f32_blocks"
    assert table.pack_repays(256, 128, 1) == pytest.approx(35)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize(("steps", "want"), [(40, "avx2_f32_blocks"), (20, "avx2_f32")])
def test_decoding_reads_the_blocked_copies_where_they_repay(make_gpt, remember_kernels, monkeypatch, steps, want, rows):
    """The blocked copies are fastest and repay within 35 steps against ``avx2_f32``: a 40-step decode
    makes them and gives F.linear's tokens; a 20-step one reads the weights as they are instead. At one
    row and at several (kind ``steps``), where each block then steps in one op."""
    config = dict(vocab_size=1024, n_embd=128, n_head=4)
    backends = Backends(linear="auto", pack_min_steps=4, decode_attention="avx2")
    model = make_gpt(seed=5, backends=backends, **config)
    linears = [m for m in model.modules() if isinstance(m, ops.Linear)]
    us = {"avx2_f32": 70.0, "avx2_f32_blocks": 50.0, "pack": 700.0}
    remember_one_row(remember_kernels, linears, us, lambda shape: "avx2_f32_blocks", rows=rows)
    packed = recorded_packs(monkeypatch)
    calls = one_op_steps(monkeypatch)
    reference = make_gpt(seed=5, backends=Backends(linear="torch"), **config)
    prompts = [[5, 17, 3], [2, 9, 4], [7, 1, 8]][:rows]
    tokens = generate(model, prompts, steps + 1, temperature=0, eos_id=None)
    assert packed == [want] * len(linears)
    assert len(calls) == steps
    assert tokens == generate(reference, prompts, steps + 1, temperature=0, eos_id=None)
    assert all(m.packed is None for m in linears)


@needs_kernel
def test_the_own_float32_kernels_are_candidates_for_decode_steps_of_few_rows():
    """A decode step of 2 to ``FEW_ROWS`` rows (kind ``steps``) weighs gpt2lab's float32 kernels too,
    before oneDNN's packed copy (a block of them steps in one op); the repeated prefill products of that
    many rows (kind ``packed``) weigh MKL's and oneDNN's packed copies only."""
    own = ("avx2_f32", "avx2_f32_blocks")
    packed = kernels.candidates("packed", 8)
    onednn = ("onednn_packed",) if ops.onednn_packing_available() else ()
    assert kernels.candidates("steps", 8) == tuple(k for k in packed if k not in onednn) + own + onednn
    assert kernels.candidates("steps", kernels.FEW_ROWS) == kernels.candidates("steps", 8)
    assert kernels.candidates("steps", 2 * kernels.FEW_ROWS) == kernels.candidates("packed", 32)
    assert not set(own) & set(kernels.candidates("packed", 8))
    assert [kernels.decode_kind(rows) for rows in (1, 2, 8)] == ["packed", "steps", "steps"]


def test_the_build_finds_ninja_in_its_package_where_path_has_none(monkeypatch):
    """torch's builder runs ``ninja`` from PATH; in a virtual environment that is not activated the
    ``ninja`` package's own binary is put first on PATH for the build, and PATH is restored after."""
    import ninja

    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    monkeypatch.setenv("PATH", "/nowhere")
    with native._ninja_on_path():
        assert os.environ["PATH"].split(os.pathsep) == [ninja.BIN_DIR, "/nowhere"]
        assert (Path(ninja.BIN_DIR) / "ninja").exists()
    assert os.environ["PATH"] == "/nowhere"


def naive_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(hs), masked) v in float64, grouped query heads reading their kv head."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = q.double() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).float()


@needs_kernel
@pytest.mark.parametrize(
    ("rows", "n_head", "n_kv_head", "keys", "hs"), [(1, 12, 12, 1, 64), (2, 8, 2, 37, 20), (3, 4, 1, 300, 64)]
)
@pytest.mark.parametrize("mask", [None, "per row", "one for all"])
def test_the_attention_kernel_reads_the_cache_where_it_lies(rows, n_head, n_kv_head, keys, hs, mask):
    """On the written part of a longer cache (its rows, heads and steps apart in memory, as
    GPT.setup_cache lays them out) with a query that is a view of the fused q/k/v product, it equals
    float64 attention to float32 rounding: grouped heads, masks per row or one for every row."""
    g = torch.Generator().manual_seed(keys)
    q = torch.randn(rows, 1, n_head + 2 * n_kv_head, hs, generator=g).transpose(1, 2)[:, :n_head]
    cache = torch.randn(2, rows, n_kv_head, 2 * keys + 3, hs, generator=g)
    k, v = cache[0, :, :, :keys], cache[1, :, :, :keys]
    m = None
    if mask == "per row":
        m = (torch.rand(rows, 1, 1, keys, generator=g) > 0.3) | (torch.arange(keys) == keys - 1)
    elif mask == "one for all":
        m = torch.arange(keys).view(1, 1, 1, keys) >= keys // 2
    got = ops.one_query_attention(q, k, v, m, n_kv_head != n_head, "avx2")
    assert got.shape == (rows, n_head, 1, hs) and got.is_contiguous()
    torch.testing.assert_close(got, naive_attention(q, k, v, m), atol=2e-6, rtol=1e-5)


@needs_kernel
def test_the_attention_op_passes_torchs_custom_op_checks_and_refuses_bad_shapes():
    q, k = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 9, 16)
    torch.library.opcheck(torch.ops.gpt2lab_native.attention_avx2, (q, k, k.clone(), None))
    torch.library.opcheck(torch.ops.gpt2lab_native.attention_avx2, (q, k, k.clone(), torch.rand(2, 1, 1, 9) > 0.5))
    with pytest.raises(RuntimeError, match="multiple of nkv"):
        torch.ops.gpt2lab_native.attention_avx2(torch.randn(2, 3, 1, 16), k, k, None)
    every_other = torch.randn(2, 2, 9, 32)[..., ::2]
    with pytest.raises(RuntimeError, match="unit stride"):
        torch.ops.gpt2lab_native.attention_avx2(q, every_other, every_other, None)
    with pytest.raises(RuntimeError, match="boolean"):
        torch.ops.gpt2lab_native.attention_avx2(q, k, k, torch.ones(2, 1, 1, 9))


@needs_kernel
def test_decoding_with_the_attention_kernel_keeps_the_tokens(make_gpt):
    """Greedy tokens of left-padded rows (the mask path) and of a sliding window's rolling cache are
    the same with gpt2lab's attention kernel as with the three small products; it is a candidate of the
    kernel table's attention kind."""
    assert "avx2" in kernels.candidates("attention", 64)
    prompts = [[3, 1, 4, 1, 5, 9], [2, 7]]
    for config in ({}, {"window": 4}):
        runs = [
            generate(
                make_gpt(seed=3, backends=Backends(decode_attention=kernel), **config),
                prompts,
                10,
                temperature=0,
                eos_id=None,
            )
            for kernel in ("products", "avx2")
        ]
        assert runs[0] == runs[1]


def fused_heads(rows, n_head, n_kv_head, T, hs, seed=0):
    """q, k and v as the model's fused product gives them: strided views of one (rows, T, heads, hs) tensor."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(rows, T, n_head + 2 * n_kv_head, hs, generator=g).transpose(1, 2)
    return qkv.split((n_head, n_kv_head, n_kv_head), dim=1)


@needs_avx512
@pytest.mark.parametrize(
    ("rows", "n_head", "n_kv_head", "T", "hs"),
    [(1, 12, 12, 256, 64), (2, 8, 2, 37, 16), (3, 4, 1, 1, 32), (1, 2, 2, 70, 80), (2, 3, 3, 33, 48)]
    + [(1, 2, 1, 65, 128), (2, 2, 2, 0, 16)],
)
def test_the_causal_kernel_equals_float64_attention(rows, n_head, n_kv_head, T, hs):
    """Every query over the keys up to its own, on strided views of the fused product: lengths not a
    whole number of its six-query and 32-key tiles, grouped and single kv heads, head sizes of one to
    eight 16-value registers, an empty prompt; the output is the (B, T, heads, hs) layout the
    projection reads, as a (B, heads, T, hs) view."""
    q, k, v = fused_heads(rows, n_head, n_kv_head, T, hs, seed=T)
    got = ops.causal_attention(q, k, v, "avx512")
    assert got.shape == (rows, n_head, T, hs) and got.transpose(1, 2).is_contiguous()
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    torch.testing.assert_close(got, naive_attention(q, k, v, causal), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(ops.causal_attention(q, k, v, "sdpa"), got, atol=2e-6, rtol=1e-5)


@needs_avx512
def test_the_causal_kernel_gives_far_smaller_scores_no_weight():
    """A key scored 2e14 below the query's other one gets the weight 0 (its exponential kept to a range
    where the reduction holds), as in float64: the output is the other key's value, not NaN."""
    q, k, v = (torch.zeros(1, 1, 2, 16) for _ in range(3))
    q[..., 0], k[0, 0, 0, 0] = 1e7, -1e7
    v.normal_(generator=torch.Generator().manual_seed(0))
    got = ops.causal_attention(q, k, v, "avx512")
    causal = torch.ones(2, 2, dtype=torch.bool).tril()
    torch.testing.assert_close(got, naive_attention(q, k, v, causal))
    assert torch.equal(got[0, 0, 1], v[0, 0, 1])


@needs_avx512
def test_the_causal_op_passes_torchs_custom_op_checks_and_refuses_bad_shapes():
    q, k, v = fused_heads(2, 4, 2, 9, 16)
    torch.library.opcheck(torch.ops.gpt2lab_native.causal_attention_avx512, (q, k, v))
    op = torch.ops.gpt2lab_native.causal_attention_avx512
    with pytest.raises(RuntimeError, match="multiple of 16"):
        op(*fused_heads(1, 2, 2, 9, 20))
    with pytest.raises(RuntimeError, match="multiple of the key heads"):
        op(torch.randn(1, 3, 9, 16), k[:1], v[:1])
    with pytest.raises(RuntimeError, match="as q is"):
        op(q, k[:, :, :5], v[:, :, :5])
    every_other = torch.randn(2, 2, 9, 32)[..., ::2]
    with pytest.raises(RuntimeError, match="contiguous"):
        op(q, every_other, every_other)
    with pytest.raises(RuntimeError, match="float32"):
        op(q.double(), k.double(), v.double())


@needs_avx512
@pytest.mark.parametrize("config", [{}, {"n_kv_head": 1, "pos_emb": "rope"}])
def test_a_model_with_the_causal_kernel_keeps_its_logits_and_tokens(make_gpt, config):
    """A forward in evaluation and generation (its prompt through the KV cache from step 0) with
    gpt2lab's causal kernel give the logits of SDPA's to float32 rounding and the same greedy tokens,
    the kernel running in both; with gradients the model attends by SDPA."""
    config = {"n_embd": 64, "n_head": 4} | config  # heads of 16
    own = make_gpt(seed=4, backends=Backends(causal_attention="avx512"), **config)
    reference = make_gpt(seed=4, backends=Backends(causal_attention="sdpa"), **config)
    idx = torch.randint(0, 97, (3, 40), generator=torch.Generator().manual_seed(0))
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]]
    with torch.no_grad():
        logits = reference(idx)[0]
    tokens = generate(reference, prompts, 12, temperature=0, eos_id=None)
    calls = []
    real = ops.causal_attention
    spy = lambda q, k, v, kernel: calls.append(kernel) or real(q, k, v, kernel)  # noqa: E731
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gpt2lab.model, "causal_attention", spy)
        with torch.no_grad():
            torch.testing.assert_close(own(idx)[0], logits, atol=1e-5, rtol=1e-5)
        assert calls and set(calls) == {"avx512"}
        calls.clear()
        assert generate(own, prompts, 12, temperature=0, eos_id=None) == tokens
        assert calls and set(calls) == {"avx512"}
        calls.clear()
        own(idx)[0].sum().backward()
        assert calls and set(calls) == {"sdpa"}


@needs_avx512
def test_window_layers_padded_prompts_and_dropout_attend_by_sdpa(make_gpt):
    """Under ``avx512`` the kernel never runs where the causal mask is not the whole story or attention
    dropout applies: a window model's forward, left-padded prompts, a prompt continued in a kept cache
    (a mask each), a training forward with attention dropout."""
    calls = []
    real = ops.causal_attention
    spy = lambda q, k, v, kernel: calls.append(kernel) or real(q, k, v, kernel)  # noqa: E731
    own = Backends(causal_attention="avx512")
    windowed = make_gpt(seed=2, backends=own, n_embd=64, n_head=4, window=4)
    plain = make_gpt(seed=2, backends=own, n_embd=64, n_head=4)
    dropped = make_gpt(seed=2, backends=own, n_embd=64, n_head=4, dropout=0.1).train()
    idx = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gpt2lab.model, "causal_attention", spy)
        with torch.no_grad():
            windowed(idx)
            dropped(idx)
        generate(plain, [[3, 1, 4], [1, 5, 9, 2, 6, 5]], 4, temperature=0, eos_id=None)
        assert calls == []
        with torch.no_grad():
            plain(idx)
        assert calls == ["avx512"] * 2  # the spy sees it where it applies


def test_torch_func_transforms_attend_by_sdpa(make_gpt):
    """Under torch.func's transforms (grad, jvp, vmap) gpt2lab's kernel, which has no rule for them, is
    not chosen, even without gradients asked of the input."""
    attn = make_gpt(n_embd=64, n_head=4, backends=Backends(causal_attention="sdpa")).h[0].attn
    attn.causal_attention = "avx512"
    chosen = []

    def f(q):
        chosen.append(attn.causal_kernel(q))
        return q.sum()

    q = torch.randn(1, 4, 8, 16)
    with torch.no_grad():
        assert attn.causal_kernel(q) == "avx512"
    torch.func.grad(f)(q)
    torch.func.jvp(f, (q,), (torch.ones_like(q),))
    torch.func.vmap(f)(q)
    assert chosen == ["sdpa"] * 3


def test_the_causal_kernel_is_chosen_as_backends_say(make_gpt, monkeypatch):
    """``auto`` asks the kernel table (kind ``causal``: the query heads of every row, head size,
    length); gradients, another dtype and head sizes not a multiple of 16 run SDPA whatever the setting;
    a setting not known, or ``avx512`` where it cannot run, is refused."""
    model = make_gpt(n_embd=64, n_head=4)
    attn = model.h[0].attn
    asked = []
    monkeypatch.setattr(attn.table, "choose", lambda *a, **kw: asked.append((a, kw)) or "avx512")
    q = torch.randn(2, 4, 10, 16)
    assert attn.causal_kernel(q) == "avx512" and asked == [((8, 16, 10), {"kind": "causal"})]
    assert attn.causal_kernel(q.double()) == "sdpa"
    assert attn.causal_kernel(q.requires_grad_()) == "sdpa"
    with torch.no_grad():
        assert attn.causal_kernel(q) == "avx512"
    assert make_gpt(n_embd=32, n_head=4).h[0].attn.causal_kernel(torch.randn(1, 4, 10, 8)) == "sdpa"
    with pytest.raises(ValueError, match="causal_attention must be one of"):
        Backends(causal_attention="flash")
    monkeypatch.setattr(native, "avx512", lambda: False)
    with pytest.raises(GPT2LabError, match="avx512 attention cannot run here"):
        Backends(causal_attention="avx512")
    assert "avx512" not in kernels.candidates("causal", 256)


@needs_avx512
def test_the_kernel_table_times_the_causal_kernel_on_the_fused_layout():
    """Kind ``causal`` times SDPA and gpt2lab's kernel on views of one fused product, without cache
    eviction (a prompt's keys were just made), and leaves the process's random numbers as they were."""
    assert kernels.candidates("causal", 64) == ("sdpa", "avx512") and not kernels.streams(8, "causal")
    state = torch.get_rng_state()
    times = kernels.measure(8, 16, 64, "causal", repeat=2)
    assert set(times) == {"sdpa", "avx512"} and all(t > 0 for t in times.values())
    assert torch.equal(torch.get_rng_state(), state)


def cache_step(rows, n_head, n_kv_head, size, now, hs=16, seed=0):
    """A KV cache of ``size`` slots holding time steps 0 .. now - 1 (rolled where ``size`` is shorter),
    the next step's query, key and value as views of a fused q/k/v product, and the step's time."""
    g = torch.Generator().manual_seed(seed)
    caches = torch.randn(2, rows, n_kv_head, size, hs, generator=g)
    times = torch.full((size,), -1, dtype=torch.long)
    for s in range(now):
        times[s % size] = s
    qkv = torch.randn(rows, 1, n_head + 2 * n_kv_head, hs, generator=g).transpose(1, 2)
    q, k, v = qkv.split((n_head, n_kv_head, n_kv_head), dim=1)
    return q, k, v, caches[0], caches[1], times, torch.tensor([now])


@needs_kernel
@pytest.mark.parametrize(
    ("rows", "n_head", "n_kv_head", "size", "now", "window", "pad"),
    [
        (1, 12, 12, 100, 64, None, None),  # GPT-2: the written slots of a longer cache
        (2, 8, 2, 16, 40, 16, None),  # a rolling window's cache, grouped heads
        (3, 4, 1, 50, 20, None, [0, 3, 5]),  # left-padded rows, one kv head
        (2, 4, 4, 8, 30, 5, [0, 27]),  # a window shorter than the cache, padding up to the step itself
    ],
)
def test_the_cache_attention_writes_the_step_and_attends_as_the_mask_says(
    rows, n_head, n_kv_head, size, now, window, pad
):
    """One op does what KVCache.update and the attention over what it returns do: the new key and value
    land in slot now % size, the slot's time is marked, and each row attends over the slots that
    kv_cache.attention_mask lets it see (written, not later, within the window, not its padding)."""
    from gpt2lab.kv_cache import attention_mask

    q, k, v, k_cache, v_cache, times, t = cache_step(rows, n_head, n_kv_head, size, now)
    pad = None if pad is None else torch.tensor(pad)
    slots = min(size, now + 1)
    want_k, want_v, want_times = k_cache.clone(), v_cache.clone(), times.clone()
    want_k[:, :, now % size], want_v[:, :, now % size], want_times[now % size] = k[:, :, 0], v[:, :, 0], now
    mask = attention_mask(t, want_times[:slots], pad, window)
    want = naive_attention(q, want_k[:, :, :slots], want_v[:, :, :slots], mask)
    got = torch.ops.gpt2lab_native.cache_attention_avx2(q, k, v, k_cache, v_cache, times, t, slots, pad, window)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v) and torch.equal(times, want_times)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


@needs_kernel
def test_the_cache_attention_op_passes_torchs_custom_op_checks_and_refuses_bad_input():
    op = torch.ops.gpt2lab_native.cache_attention_avx2
    q, k, v, k_cache, v_cache, times, t = cache_step(2, 4, 2, 12, 7)
    torch.library.opcheck(op, (q, k, v, k_cache, v_cache, times, t, 8, torch.tensor([0, 2]), 4))
    with pytest.raises(RuntimeError, match="slots must be in 1..12"):
        op(q, k, v, k_cache, v_cache, times, t, 13, None, None)
    with pytest.raises(RuntimeError, match="one int64 per row"):
        op(q, k, v, k_cache, v_cache, times, t, 8, torch.tensor([0]), None)
    with pytest.raises(RuntimeError, match="caches must be contiguous"):
        op(q, k, v, k_cache[:, :, ::2], v_cache[:, :, ::2], times[::2], t, 4, None, None)
    with pytest.raises(RuntimeError, match="one new key"):
        op(q, k_cache, v_cache, k_cache, v_cache, times, t, 8, None, None)


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 1, 768), (5, 3, 20)])
def test_add_layer_norm_is_the_add_then_the_norm(shape):
    g = torch.Generator().manual_seed(shape[-1])
    x, delta = torch.randn(shape, generator=g), torch.randn(shape, generator=g) * 3
    norm = torch.nn.LayerNorm(shape[-1])
    torch.nn.init.normal_(norm.weight, generator=g), torch.nn.init.normal_(norm.bias, generator=g)
    with torch.no_grad():
        total, normed = ops.add_layer_norm(x, delta, norm, fused=True)
        torch.library.opcheck(torch.ops.gpt2lab_native.add_layer_norm, (x, delta, norm.weight, norm.bias, 1e-5))
    assert torch.equal(total, x + delta)
    torch.testing.assert_close(normed, norm(x + delta), atol=2e-6, rtol=1e-5)


@needs_kernel
def test_the_avx2_gelu_is_gpt2s_tanh_gelu_to_a_few_roundings():
    """Against GPT-2's GELU in float64, over a sweep through the steep negative tail, random values and
    edge values: within 4e-6 relative where the GELU is not tiny (aten's tanh form loses far more to
    cancellation out there), within 1e-11 where it is; NaN stays NaN; written over its input."""
    y = torch.cat([torch.linspace(-12, 12, 240_001), torch.randn(100_000) * 3, torch.tensor([0.0, -0.0, 1e-30, 50.0])])
    y64 = y.double()
    want = y64 * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (y64 + 0.044715 * y64**3))
    got = y.clone()
    assert ops.tanh_gelu_(got, "avx2") is got
    big = want.abs() > 1e-6
    assert ((got.double() - want).abs() / want.abs())[big].max() < 4e-6
    assert (got.double() - want)[~big].abs().max() < 1e-11
    assert torch.equal(got[-4:], torch.tensor([0.0, 0.0, 5e-31, 50.0]))
    assert ops.tanh_gelu_(torch.tensor([math.nan, -1e20, 1e20]), "avx2").tolist()[1:] == pytest.approx([0.0, 1e20])
    assert ops.tanh_gelu_(torch.tensor([math.nan]), "avx2").isnan().all()


@needs_kernel
def test_the_avx2_gelu_gives_a_value_the_same_bits_wherever_it_lies():
    """The last values of an output of any length (a masked load and store) and those of a long output
    shared between threads come out as the same value does at the start of a short one."""
    values = torch.randn(21, generator=torch.Generator().manual_seed(3)) * 4
    alone = torch.stack([ops.tanh_gelu_(v.repeat(8).clone(), "avx2")[0] for v in values])
    for n in range(1, 22):
        assert torch.equal(ops.tanh_gelu_(values[:n].clone(), "avx2"), alone[:n])
    long = values.repeat(20_000)  # 420,000 values: past one thread's share
    assert torch.equal(ops.tanh_gelu_(long.clone(), "avx2"), alone.repeat(20_000))
    torch.library.opcheck(torch.ops.gpt2lab_native.gelu_avx2_, (values.clone(),))
    with pytest.raises(RuntimeError, match="contiguous float32"):
        torch.ops.gpt2lab_native.gelu_avx2_(torch.randn(4, 8)[:, ::2])


def test_add_layer_norm_takes_the_two_ops_where_it_does_not_fuse(monkeypatch):
    """Not fused (outside the KV cache, with gradients, or without gpt2lab.native): exactly x + delta
    and the module's norm, gradients flowing."""
    x, delta = torch.randn(2, 3, 8, requires_grad=True), torch.randn(2, 3, 8)
    norm = torch.nn.LayerNorm(8)
    calls = []
    monkeypatch.setattr(torch.ops.gpt2lab_native, "add_layer_norm", lambda *a: calls.append(a), raising=False)
    for fused in (False, True):  # with gradients: the two ops even where asked to fuse
        total, normed = ops.add_layer_norm(x, delta, norm, fused=fused)
        assert torch.equal(total, x + delta) and torch.equal(normed, norm(x + delta)) and normed.requires_grad
    with torch.no_grad():
        ops.add_layer_norm(x, delta, norm, fused=False)
    assert calls == []


def count_calls(monkeypatch, name: str, *names: str) -> list:
    """Record each call of ``torch.ops.gpt2lab_native.<name>`` (and of each of ``names``) from now on."""
    calls = []
    for each in (name, *names):
        op = getattr(torch.ops.gpt2lab_native, each)
        monkeypatch.setattr(torch.ops.gpt2lab_native, each, lambda *args, op=op: calls.append(args) or op(*args))
    return calls


def one_op_steps(monkeypatch) -> list:
    """Record each decode step through all the blocks in one op from now on: ``decode_blocks``, or
    ``decode_logits`` where the step goes on to the logits in the same op (their arguments alike)."""
    return count_calls(monkeypatch, "decode_blocks", "decode_logits")


@needs_kernel
def test_a_decode_step_runs_the_fused_ops_and_keeps_the_tokens(make_gpt, monkeypatch):
    """With the attention kernel avx2, each decode step's layer writes its cache and attends in one op,
    and each block adds and norms in one; the tokens equal those of the unfused ops (left padding, a
    sliding window, grouped heads)."""
    attends, norms = count_calls(monkeypatch, "cache_attention_avx2"), count_calls(monkeypatch, "add_layer_norm")
    prompts = [[3, 1, 4, 1, 5, 9], [2, 7]]
    for config in ({}, {"window": 4, "n_kv_head": 2}):  # torch's products: no block steps in one op
        model = make_gpt(seed=3, backends=Backends(decode_attention="avx2", linear="torch"), **config)
        fused = generate(model, prompts, 10, temperature=0, eos_id=None)
        assert len(attends) == 9 * 2 and len(norms) == 10 * 2  # steps (+ prompt) x layers
        attends.clear(), norms.clear()
        with monkeypatch.context() as unfused:
            unfused.setattr(gpt2lab.model, "add_layer_norm", lambda x, d, n, fused: ops.add_layer_norm(x, d, n, False))
            model = make_gpt(seed=3, backends=Backends(decode_attention="products", linear="torch"), **config)
            plain = generate(model, prompts, 10, temperature=0, eos_id=None)
        assert attends == [] and norms == []
        assert fused == plain


@needs_kernel
def test_entries_timing_the_kernels_are_timed_again_on_another_build(tmp_path, monkeypatch):
    """An entry that timed gpt2lab.native's kernels records their build; one timed on another build (or
    before builds were recorded) is timed again, one on this build is taken as it is; a process without
    the kernels takes the entry as it is too (its candidates do not include them)."""
    options = kernels.candidates("attention", 64)
    us = dict.fromkeys(options, 1.0)
    entries = {
        "attention 12x64 rows 64": {"kernel": "sdpa", "us_per_product": us, "evicted_mb": 0},
        "attention 12x64 rows 32": {"kernel": "sdpa", "us_per_product": us, "evicted_mb": 0, "native": "0" * 12},
        "attention 12x64 rows 16": {
            "kernel": "sdpa",
            "us_per_product": us,
            "evicted_mb": 0,
            "native": native.source_digest(),
        },
    }
    path = tmp_path / "k.json"
    path.write_text(json.dumps({kernels.machine_key(): entries}))
    monkeypatch.setattr(kernels, "measure", lambda *args, **kwargs: {k: 2e-6 if k == "avx2" else 1e-5 for k in options})
    table = kernels.KernelTable(path)
    assert [table.choose(12, 64, keys, kind="attention") for keys in (64, 32, 16)] == ["avx2", "avx2", "sdpa"]
    written = json.loads(path.read_text())[kernels.machine_key()]
    assert written["attention 12x64 rows 64"]["native"] == native.source_digest()
    stale = {"kernel": "sdpa", "us_per_product": us, "evicted_mb": 0, "native": "0" * 12}
    path.write_text(json.dumps({kernels.machine_key(): {"attention 12x64 rows 8": stale}}))
    monkeypatch.setattr(kernels, "candidates", lambda kind, rows: ("products", "sdpa"))
    monkeypatch.setattr(kernels, "measure", lambda *args, **kwargs: pytest.fail("timed again"))
    assert kernels.KernelTable(path).choose(12, 64, 8, kind="attention") == "sdpa"


@needs_kernel
def test_the_attention_kernel_is_asked_for_float32_on_the_cpu_only(make_gpt, monkeypatch):
    """avx2 is a float32 CPU kernel: for another dtype an explicit avx2 runs the products, and auto the
    fastest other kernel the table measured; a bfloat16 model decodes with either."""
    own = make_gpt(backends=Backends(decode_attention="avx2"))
    auto = make_gpt()
    attn = auto.h[0].attn
    monkeypatch.setattr(attn.table, "choose", lambda *a, **kw: "avx2")
    monkeypatch.setattr(attn.table, "times", lambda *a, **kw: {"products": 3.0, "sdpa": 2.0, "avx2": 1.0})
    cpu = torch.device("cpu")
    assert own.h[0].attn.one_query_kernel(1, 40, cpu, torch.bfloat16) == "products"
    assert attn.one_query_kernel(1, 40, cpu) == "avx2" and attn.one_query_kernel(1, 40, cpu, torch.bfloat16) == "sdpa"
    for model in (own, auto):
        tokens = generate(model.to(torch.bfloat16), [[3, 1, 4]], 4, temperature=0, eos_id=None)
        assert len(tokens[0]) == 4


@needs_kernel
@pytest.mark.slow
def test_a_compiled_step_with_the_attention_kernel_keeps_the_tokens(make_gpt):
    """A compiled step asked for the avx2 attention traces the cache's update and the attention op (the
    op that also writes the cache takes the written length, which a compiled CPU step traces as an
    integer known only when it runs) and decodes the tokens of the eager products."""
    prompts = [[3, 1, 4, 1, 5, 9], [2, 7]]
    eager = generate(
        make_gpt(seed=5, backends=Backends(decode_attention="products")), prompts, 8, temperature=0, eos_id=None
    )
    model = make_gpt(seed=5, backends=Backends(decode_attention="avx2"))
    assert generate(model, prompts, 8, temperature=0, eos_id=None, compile=True) == eager


class GeluFormTable:
    """Chooses the avx2 kernel for int8 products, ``form`` for the GELU, torch's kernel for the rest."""

    def __init__(self, form: str) -> None:
        self.form = form

    def choose(self, out_features, in_features, rows, kind="float32"):
        return {"tanh_gelu": self.form, "int8": "avx2"}.get(kind, "torch")

    def pack_repays(self, *shape):
        return float("inf")  # no copies of repeated products


def plan_one_op_steps(model, rows: int, kernels_by_layer, gelu_form: str = "tanh") -> list:
    """Plan ``model``'s decode steps of ``rows`` rows with each float32 layer reading a copy for
    ``kernels_by_layer(layer)`` (an int8 layer: the avx2 kernel), the GELU in ``gelu_form``, as
    generation plans them; what ``GPT.plan_decoding`` returns to unplan."""
    for m in model.modules():
        if isinstance(m, ops.Linear):
            m.table = GeluFormTable(gelu_form)
            m.pack(rows, kernels_by_layer(m))
        elif isinstance(m, Int8Linear):
            m.table = GeluFormTable(gelu_form)
    return model.plan_decoding(rows)


def steps_every_way(model, prompts: torch.Tensor, steps: int) -> None:
    """Greedy decode steps after ``prompts`` (B, P) in a planned ``model`` (its cache set up, padding
    included): each step's logits from all the blocks in one op (``decode_blocks``, or ``decode_logits``
    where ``ln_f`` and the lm_head are planned into it) asserted equal, bit for bit, to the same step with
    each block its own op (``Block.plan``) and through the Python blocks on the same kernels, ``ln_f`` and
    the lm_head called from Python (the step writes the same keys and values into the cache each way)."""
    P = prompts.shape[1]
    assert all(block.step_plan for block in model.h)
    logits = prefill(model, prompts, torch.arange(P))
    for t in range(P, P + steps):
        token, pos = logits.argmax(-1)[:, None], torch.tensor([t])
        with model.python_blocks():
            want = decode_one_token(model, token, pos)
        with model.block_ops():
            assert torch.equal(decode_one_token(model, token, pos), want)
        logits = decode_one_token(model, token, pos)
        assert torch.equal(logits, want)


def recorded_blocks(monkeypatch) -> list:
    """The arguments each block hands gpt2lab.native's ``DecodeBlocks`` (``Block.native_args``), each time a
    step builds one (``GPT._one_op_blocks``) from now on."""
    added, one_op_blocks = [], gpt2lab.model.GPT._one_op_blocks

    def gather(model, *args, **kwargs):
        before = model._blocks
        blocks = one_op_blocks(model, *args, **kwargs)
        if model._blocks is not None and model._blocks is not before:
            added.extend(block.native_args() for block in model.h)
        return blocks

    monkeypatch.setattr(gpt2lab.model.GPT, "_one_op_blocks", gather)
    return added


@needs_kernel
@pytest.mark.parametrize(("int8", "gelu_form"), [(int8, form) for form in ops.GELU_FORMS for int8 in (False, True)])
def test_a_block_decode_step_is_one_op_with_the_python_blocks_results(make_gpt, monkeypatch, int8, gelu_form):
    """Where a block's four products run gpt2lab's kernels (float32: the blocked copies and the weight as
    it is, mixed; int8: its blocks) and its attention avx2, each decode step of the block is one
    ``decode_block`` call, and where every block's are, each decode step of all the blocks is one
    ``decode_blocks`` call, with the blocks' arguments handed to it once: the logits are the Python
    blocks' bit for bit either way, in each form of the GELU."""
    model = make_gpt(seed=7, backends=Backends(decode_attention="avx2"), n_embd=64, n_head=4, vocab_size=256)
    if int8:
        model = quantize.quantize_int8(model)
    with torch.no_grad():
        model.setup_cache(1, 12)
        layer_kernel = lambda m: "avx2_f32" if m.out_features == 64 else "avx2_f32_blocks"  # noqa: E731
        plan_one_op_steps(model, 1, layer_kernel, gelu_form)
        block_calls, calls = count_calls(monkeypatch, "decode_block"), one_op_steps(monkeypatch)
        added = recorded_blocks(monkeypatch)
        steps_every_way(model, torch.tensor([[5, 3, 9, 1]]), 6)
    assert len(block_calls) == 6 * len(model.h) and len(calls) == 6
    assert len(added) == len(model.h)  # once, for all the steps
    kernels_run = {k for call in block_calls for k in call[3]}
    assert kernels_run == {k for args in added for k in args[2]} == ({2} if int8 else {0, 1})  # ops.NATIVE_PRODUCTS
    assert {call[-1] for call in block_calls} == {args[-1] for args in added} == {gelu_form}


@needs_kernel
@pytest.mark.parametrize("int8", [False, True])
def test_a_decode_step_runs_ln_f_and_the_lm_head_in_the_blocks_op_where_they_are_planned(make_gpt, monkeypatch, int8):
    """Where the lm_head's product runs gpt2lab's kernels too, each decode step goes through the blocks,
    ln_f and the lm_head in one op (``decode_logits``), the Python steps' logits bit for bit (a padded
    vocabulary's first columns). A hook on ln_f, the lm_head or an embedding is called: those steps run
    them from Python around the blocks' one op; an lm_head on another kernel does too."""
    config = dict(n_embd=64, n_head=4, vocab_size=250, padded_vocab_size=256)
    prompts = torch.tensor([[5, 3, 9, 1]])
    layer_kernel = lambda m: "avx2_f32" if m.out_features == 64 else "avx2_f32_blocks"  # noqa: E731
    for hooked in (None, "ln_f", "lm_head", "wte", "wpe"):
        model = make_gpt(seed=7, backends=Backends(decode_attention="avx2"), **config)
        model = quantize.quantize_int8(model) if int8 else model
        called = []
        if hooked:
            getattr(model, hooked).register_forward_hook(lambda *args, called=called: called.append(1))
        with torch.no_grad(), monkeypatch.context() as patch:
            model.setup_cache(1, 12)
            plan_one_op_steps(model, 1, layer_kernel)
            assert model.head_plan is not None
            to_logits, blocks = count_calls(patch, "decode_logits"), count_calls(patch, "decode_blocks")
            steps_every_way(model, prompts, 3)
        assert (len(to_logits), len(blocks)) == ((0, 3) if hooked else (3, 0))
        assert len(called) == (1 + 3 * 3 if hooked else 0)  # the prefill, then each step each way
    if not int8:
        with torch.no_grad(), monkeypatch.context() as patch:
            model.setup_cache(1, 12)
            plan_one_op_steps(model, 1, lambda m: "onednn_t" if m is model.lm_head else layer_kernel(m))
            assert model.head_plan is None
            to_logits, blocks = count_calls(patch, "decode_logits"), count_calls(patch, "decode_blocks")
            steps_every_way(model, prompts, 2)
        assert (len(to_logits), len(blocks)) == (0, 2)


class SubTensor(torch.Tensor):
    """A tensor subclass, which torch dispatches through its ``__torch_function__``."""


@pytest.mark.parametrize("op", ["decode_blocks", "decode_logits"])
def test_the_blocks_ops_skip_subclass_dispatch_on_plain_tensors(monkeypatch, op):
    """``native.on_blocks`` runs the op with tensor subclasses' ``__torch_function__`` off where x is a
    plain tensor (torch's lookup of that method on the ``DecodeBlocks`` argument raises and catches a
    C++ exception each step), and with it on where x is a subclass, whose method then sees the op."""
    enabled = []
    record = lambda blocks, x, *args: enabled.append(torch._C._is_torch_function_enabled()) or x  # noqa: E731
    monkeypatch.setattr(torch.ops.gpt2lab_native, op, record, raising=False)
    x = torch.zeros(1, 1, 4)
    assert native.on_blocks(op, None, x, 3) is x
    native.on_blocks(op, None, x.as_subclass(SubTensor), 3)
    assert enabled == [False, True]


@needs_kernel
def test_one_op_decode_steps_run_without_subclass_dispatch(make_gpt, monkeypatch):
    """A planned model's one-op decode steps (``decode_blocks``, and ``decode_logits`` with the head
    planned) call their op through ``native.on_blocks``."""
    enabled = []
    for name in ("decode_blocks", "decode_logits"):
        op = getattr(torch.ops.gpt2lab_native, name)
        wrapped = lambda *args, op=op: enabled.append(torch._C._is_torch_function_enabled()) or op(*args)  # noqa: E731
        monkeypatch.setattr(torch.ops.gpt2lab_native, name, wrapped)
    for head in ("avx2_f32", "onednn_t"):  # the lm_head in the blocks' op, or after it from Python
        model = make_gpt(seed=7, backends=Backends(decode_attention="avx2"), n_embd=64, n_head=4, vocab_size=256)
        with torch.no_grad():
            model.setup_cache(1, 12)
            plan_one_op_steps(model, 1, lambda m, head=head, lm=model.lm_head: head if m is lm else "avx2_f32")
            assert (model.head_plan is None) == (head == "onednn_t")
            steps_every_way(model, torch.tensor([[5, 3, 9, 1]]), 2)
    assert enabled == [False] * 4


@needs_kernel
def test_the_blocks_step_as_their_own_ops_under_hooks_and_keep_no_stale_caches(make_gpt, monkeypatch):
    """A hook on a block, or one on every module, is called: the blocks then step as their own ops,
    not all in one. A new KV cache (``setup_cache`` after planning) is the one the next step writes
    and reads; ``clear_cache``, and unplanning what ``plan_decoding`` planned, let go of the caches
    and copies the one op held, and a copy of the model mid-decode steps with its own."""
    model = quantize.quantize_int8(
        make_gpt(seed=3, backends=Backends(decode_attention="avx2"), n_embd=64, n_head=4, vocab_size=256)
    )
    prompt = torch.tensor([[5, 3, 9, 1]])
    block_calls, calls = count_calls(monkeypatch, "decode_block"), one_op_steps(monkeypatch)
    hooked = []
    with torch.no_grad():
        model.setup_cache(1, 12)
        plan_one_op_steps(model, 1, None)
        logits = prefill(model, prompt, torch.arange(4))
        token = logits.argmax(-1)[:, None]
        with model.python_blocks():
            want = decode_one_token(model, token, torch.tensor([4]))
        for register in (model.h[1].register_forward_hook, torch.nn.modules.module.register_module_forward_hook):
            handle = register(lambda module, args, out: hooked.append(module) if module is model.h[1] else None)
            assert torch.equal(decode_one_token(model, token, torch.tensor([4])), want)
            handle.remove()
        assert hooked == [model.h[1]] * 2 and calls == [] and len(block_calls) == 2 * len(model.h)
        assert torch.equal(decode_one_token(model, token, torch.tensor([4])), want)
        assert len(calls) == 1
        with model.block_ops():
            with model.block_ops():
                pass
            assert torch.equal(decode_one_token(model, token, torch.tensor([4])), want)
        assert len(calls) == 1  # nested: each block its own op until the outer block_ops ends

        model.setup_cache(1, 16)  # new caches, the plans kept
        assert all(block.step_plan is not None for block in model.h)
        logits = prefill(model, prompt, torch.arange(4))
        assert torch.equal(decode_one_token(model, token, torch.tensor([4])), want)
        assert len(calls) == 2
        assert all(block.attn.kv_cache.times[4] == 4 for block in model.h)  # the step wrote the new caches
        model.clear_cache()
        assert model._blocks is None

        model.setup_cache(1, 12)
        planned = plan_one_op_steps(model, 1, None)
        prefill(model, prompt, torch.arange(4))
        decode_one_token(model, token, torch.tensor([4]))
        assert model._blocks is not None
        copied = copy.deepcopy(model)  # mid-decode: copied without what C++ holds, gathered again
        torch.save(model, io.BytesIO())
        assert copied._blocks is None
        assert torch.equal(decode_one_token(copied, token, torch.tensor([4])), want)
        assert copied._blocks is not None and copied._blocks[0] != model._blocks[0]
        for m in planned:
            m.unplan()
        assert model._blocks is None


@needs_kernel
@pytest.mark.parametrize("config", [dict(n_kv_head=2), dict(window=3, n_kv_head=1)])
def test_one_op_block_steps_of_padded_rows_with_grouped_heads_and_a_window(make_gpt, monkeypatch, config):
    """Two left-padded rows, grouped or single kv heads, a rolling window's cache: the same bits as the
    Python blocks (int8, whose kernel runs several rows), each step from the tokens to the logits in one
    op (each row's position embedding after its own padding)."""
    model = quantize.quantize_int8(
        make_gpt(seed=2, backends=Backends(decode_attention="avx2"), n_embd=64, n_head=4, vocab_size=256, **config)
    )
    pad = torch.tensor([0, 3])
    with torch.no_grad():
        model.setup_cache(2, 16, pad=pad)
        plan_one_op_steps(model, 2, None)
        calls = count_calls(monkeypatch, "decode_logits")
        steps_every_way(model, torch.tensor([[5, 3, 9, 1, 7], [0, 0, 0, 2, 8]]), 9)
    assert len(calls) == 9


def one_op_int8_model(make_gpt) -> gpt2lab.model.GPT:
    """An int8 model planned for one-row steps from the tokens to the logits in one op, its cache set up
    for 12 steps."""
    model = quantize.quantize_int8(
        make_gpt(seed=4, backends=Backends(decode_attention="avx2"), n_embd=64, n_head=4, vocab_size=256)
    )
    model.setup_cache(1, 12)
    plan_one_op_steps(model, 1, None)
    return model


@needs_kernel
def test_a_decode_step_in_one_op_reads_the_embedding_tables_the_model_has_now(make_gpt, monkeypatch):
    """The one op from the tokens to the logits (``decode_logits``) looks up the token and position
    embeddings itself: tables replaced between steps (new parameters) are the ones the next step
    reads, bit for bit as the Python steps read them."""
    prompt = torch.tensor([[5, 3, 9, 1]])
    with torch.no_grad():
        model = one_op_int8_model(make_gpt)
        calls = count_calls(monkeypatch, "decode_logits")
        steps_every_way(model, prompt, 2)
        for table in (model.wte, model.wpe):
            table.weight = torch.nn.Parameter(table.weight.flip(0))
            steps_every_way(model, prompt, 2)
    assert len(calls) == 6


@needs_kernel
@pytest.mark.parametrize("norm", ["h.0.ln_1.weight", "h.1.ln_2.bias", "ln_f.weight", "ln_f.bias"])
def test_a_decode_step_reads_the_layer_norms_the_model_has_now(make_gpt, norm):
    """A LayerNorm parameter replaced between steps (a new parameter) is the one the next step reads, bit
    for bit as the Python steps read it: a one-op step planned with the old one does not run."""
    prompt = torch.tensor([[5, 3, 9, 1]])
    with torch.no_grad():
        model = one_op_int8_model(make_gpt)
        steps_every_way(model, prompt, 2)
        module, name = norm.rsplit(".", 1)
        ln = model.get_submodule(module)
        setattr(ln, name, torch.nn.Parameter(getattr(ln, name) * 2 + 0.5, requires_grad=False))
        steps_every_way(model, prompt, 2)


@needs_kernel
def test_a_steps_blocks_choose_their_attention_kernel_once_where_their_settings_agree(make_gpt, monkeypatch):
    """A one-op step through every block asks the table for the attention kernel once, not once per
    block; a choice made so serves only attentions of the same settings and key count: another
    decode_attention, head count or key count chooses for itself."""
    asked = []

    def choose(heads, head_dim, keys, kind):
        asked.append((heads, head_dim, keys))
        return "avx2" if keys <= 64 else "sdpa"

    model = make_gpt(seed=4, n_layer=3, backends=Backends(decode_attention="auto"))
    for block in model.h:
        monkeypatch.setattr(block.attn.table, "choose", choose)
    with torch.no_grad():
        model.setup_cache(1, 8)
        plan_one_op_steps(model, 1, lambda m: "avx2_f32_blocks")
        prefill(model, torch.tensor([[5, 3, 9]]), torch.arange(3))
        asked.clear()
        decode_one_token(model, torch.tensor([[4]]), torch.tensor([3]))
    assert asked == [(model.config.n_head, model.config.head_dim, 4)]

    cpu, chosen = torch.device("cpu"), {}
    assert model.h[0].attn.one_query_kernel(1, 40, cpu, chosen=chosen) == "avx2"
    fixed = make_gpt(backends=Backends(decode_attention="products")).h[0].attn
    wider = make_gpt(n_head=8, n_embd=64, backends=Backends(decode_attention="auto")).h[0].attn  # heads as wide
    fixed.table = wider.table = model.h[0].attn.table  # the same table: only the setting named differs
    assert fixed.one_query_kernel(1, 40, cpu, chosen=chosen) == "products"
    assert model.h[1].attn.one_query_kernel(1, 600, cpu, chosen=chosen) == "sdpa"
    asked.clear()
    assert wider.one_query_kernel(1, 40, cpu, chosen=chosen) == "avx2" and asked == [(8, wider.head_dim, 40)]
    measured_apart = make_gpt(backends=Backends(decode_attention="auto")).h[0].attn  # a table of its own
    assert measured_apart.table is not model.h[0].attn.table
    monkeypatch.setattr(measured_apart.table, "choose", lambda *a, **kw: "sdpa")
    assert measured_apart.one_query_kernel(1, 40, cpu, chosen=chosen) == "sdpa"


@needs_kernel
def test_a_block_steps_in_python_where_the_one_op_does_not_apply(make_gpt, monkeypatch):
    """No one-op step for a block with a product on another kernel; steps of rotary positions, of
    another attention kernel, or after a product's weight changed run the Python blocks: the logits of
    F.linear's products to float32 rounding, the changed weight read as it is now."""
    calls = count_calls(monkeypatch, "decode_block")
    blocked = lambda m: "avx2_f32_blocks"  # noqa: E731
    with torch.no_grad():
        model = make_gpt(seed=4, backends=Backends(decode_attention="avx2"))
        model.setup_cache(1, 8)
        model.h[1].mlp.c_proj.pack(1, "onednn_t")  # the plan below keeps it: not one of the native kernels
        plan_one_op_steps(model, 1, lambda m: "onednn_t" if m is model.h[1].mlp.c_proj else "avx2_f32_blocks")
        assert model.h[0].step_plan is not None and model.h[1].step_plan is None

        for config, backends in (({"pos_emb": "rope"}, {}), ({}, {"decode_attention": "products"})):
            model = make_gpt(seed=4, backends=Backends(**{"decode_attention": "avx2"} | backends), **config)
            reference = make_gpt(seed=4, backends=Backends(linear="torch"), **config)
            for m in (model, reference):
                m.setup_cache(1, 8)
            plan_one_op_steps(model, 1, blocked)
            assert all((block.step_plan is None) == ("pos_emb" in config) for block in model.h)  # GPT.plan_decoding
            for block in model.h:  # planned block by block: the step itself falls back
                block.plan(1)
            assert all(block.step_plan is not None for block in model.h)
            prompt = torch.tensor([[5, 3, 9]])
            prefill(model, prompt, torch.arange(3)), prefill(reference, prompt, torch.arange(3))
            got = decode_one_token(model, torch.tensor([[4]]), torch.tensor([3]))
            torch.testing.assert_close(got, decode_one_token(reference, torch.tensor([[4]]), torch.tensor([3])))
        assert calls == []

        model = make_gpt(seed=4, backends=Backends(decode_attention="avx2"))
        model.setup_cache(1, 8)
        plan_one_op_steps(model, 1, blocked)
        model.h[0].attn.c_proj.weight.mul_(2)  # the copies it planned with are stale now
        reference = make_gpt(seed=4, backends=Backends(linear="torch"))
        reference.h[0].attn.c_proj.weight.mul_(2)
        reference.setup_cache(1, 8)
        for m in (model, reference):
            prefill(m, prompt, torch.arange(3))
        got = decode_one_token(model, torch.tensor([[4]]), torch.tensor([3]))
        torch.testing.assert_close(got, decode_one_token(reference, torch.tensor([[4]]), torch.tensor([3])))
        assert len(calls) == len(model.h) - 1  # the block whose plan still holds
        assert model.h[0].attn.c_proj.planned is None


@needs_kernel
def test_generation_runs_one_op_block_steps_and_ends_their_plans(make_gpt, remember_kernels, monkeypatch):
    """A greedy generation whose products all read gpt2lab's kernels steps all the blocks in one op,
    gives F.linear's tokens, and leaves no plan behind, nor the blocks' arguments (copies, caches) kept
    for the op; a block's op passes torch's custom-op checks."""
    config = dict(vocab_size=1024, n_embd=128, n_head=4)
    model = make_gpt(seed=5, backends=Backends(pack_min_steps=4, decode_attention="avx2"), **config)
    linears = [m for m in model.modules() if isinstance(m, ops.Linear)]
    remember_one_row(remember_kernels, linears, {"avx2_f32_blocks": 50.0, "pack": 100.0}, lambda s: "avx2_f32_blocks")
    calls, added = one_op_steps(monkeypatch), recorded_blocks(monkeypatch)
    tokens = generate(model, [[5, 17, 3]], 9, temperature=0, eos_id=None)
    reference = make_gpt(seed=5, backends=Backends(linear="torch"), **config)
    assert tokens == generate(reference, [[5, 17, 3]], 9, temperature=0, eos_id=None)
    assert len(calls) == 8 and len(added) == len(model.h)
    assert all(block.step_plan is None for block in model.h) and model._blocks is None and model.head_plan is None
    monkeypatch.undo()  # the op itself again
    norms, eps, kernels_, weights, scales, biases, outs, n_head, k, v, times, _, window, gelu = added[0]
    idx, t = calls[0][1], calls[0][2]  # the step's token (1, 1) and time step
    with torch.no_grad():
        x = model.wte(idx) + model.wpe(t[None])  # a block's input there
    caches = [c.clone() for c in (k, v, times)]  # the caches the op writes
    args = (x, norms, eps, kernels_, weights, scales, biases, outs, n_head, *caches, t, 4, None, window, gelu)
    with torch.no_grad():  # an inference op: no gradients
        torch.library.opcheck(torch.ops.gpt2lab_native.decode_block, args)


@needs_kernel
@pytest.mark.parametrize(("saving_us", "one_op"), [(20.0, True), (5.0, False)])
def test_an_int8_block_runs_its_products_on_the_kernel_where_one_op_repays_them(
    make_gpt, remember_kernels, monkeypatch, saving_us, one_op
):
    """The table measured each int8 product fastest on gpt2lab's kernel but the MLP's second (fbgemm, 10
    us faster there). Where one op per block saves more than that a step (20 us), that product runs
    gpt2lab's kernel too and every block steps in one op; where it saves less (5 us), the table's
    choices stand and the blocks step in Python."""
    config = dict(vocab_size=1024, n_embd=64, n_head=4)
    model = quantize.quantize_int8(make_gpt(seed=6, backends=Backends(decode_attention="avx2"), **config))
    for m in model.modules():
        if isinstance(m, Int8Linear):
            slower_here = (m.out_features, m.in_features) == (64, 256)
            us = {k: 100.0 for k in ops.int8_kernels(1)} | {"avx2": 110.0 if slower_here else 90.0}
            kernel = "fbgemm" if slower_here else "avx2"
            remember_kernels(
                {f"int8 {m.out_features}x{m.in_features} rows 1": {"kernel": kernel, "us_per_product": us}}
            )
    steps = {"python": 200.0, "one_op": 200.0 - saving_us}
    remember_kernels({"int8_block 64x4 rows 1": {"kernel": "one_op", "us_per_product": steps}})
    calls, added = one_op_steps(monkeypatch), recorded_blocks(monkeypatch)
    generate(model, [[5, 17, 3]], 6, temperature=0, eos_id=None)
    assert len(calls) == (5 if one_op else 0)
    assert len(added) == (len(model.h) if one_op else 0)
    assert all(args[2] == [2, 2, 2, 2] for args in added)  # int8 avx2 (ops.NATIVE_PRODUCTS) for all four
    assert all(m.planned is None for m in model.modules() if isinstance(m, Int8Linear))


@needs_kernel
@pytest.mark.parametrize(("head_avx2_us", "one_op"), [(102.0, True), (110.0, False)])
def test_an_int8_lm_head_level_on_gpt2labs_kernel_runs_there_for_the_whole_step_in_one_op(
    make_gpt, remember_kernels, monkeypatch, head_avx2_us, one_op
):
    """The table chose fbgemm for the lm_head (100 us) and gpt2lab's kernel for every block product.
    Where gpt2lab's measured within ``kernels.MARGIN`` of fbgemm on the lm_head (102 us), the lm_head runs
    it too and each step goes from the tokens to the logits in one op (``decode_logits``), the head's
    int8 blocks in 2 MiB pages with the others'; where it measured slower (110 us) the table's choice
    stands and the head runs from Python after the blocks' one op."""
    monkeypatch.setattr(pages, "wanted", lambda: True)
    config = dict(vocab_size=2048, n_embd=384, n_head=6)  # over 2 MiB of int8 blocks
    model = quantize.quantize_int8(make_gpt(seed=6, backends=Backends(decode_attention="avx2"), **config))
    prompt = [[5, 17, 3]]
    for m in model.modules():
        if isinstance(m, Int8Linear):
            head = m is model.lm_head
            us = {k: 100.0 for k in ops.int8_kernels(1)} | {"avx2": head_avx2_us if head else 90.0}
            entries = {
                f"int8 {m.out_features}x{m.in_features} rows 1": {
                    "kernel": "fbgemm" if head else "avx2",
                    "us_per_product": us,
                }
            }
            first = ops.int8_kernels()[0]  # the prompt's products
            us = {k: 100.0 for k in ops.int8_kernels(3)} | {first: 90.0}
            entries[f"int8 {m.out_features}x{m.in_features} rows {kernels.rows_bucket(3, 'int8')}"] = {
                "kernel": first,
                "us_per_product": us,
            }
            remember_kernels(entries)
    plans, plan_head = [], gpt2lab.model.GPT._plan_head
    with monkeypatch.context() as patch:
        patch.setattr(gpt2lab.model.GPT, "_plan_head", lambda *args: plans.append(plan_head(*args)) or plans[-1])
        to_logits, blocks = count_calls(patch, "decode_logits"), count_calls(patch, "decode_blocks")
        generate(model, prompt, 6, temperature=0, eos_id=None)
    assert (len(to_logits), len(blocks)) == ((5, 0) if one_op else (0, 5))
    if one_op:  # the blocks the steps read: the head's plan made after they moved
        assert pages.in_huge_pages(plans[-1].product.weight)
    else:
        assert plans[-1] is None and "avx2" not in model.lm_head._packed


@needs_kernel
@pytest.mark.parametrize("where", ["rotary positions", "sdpa attention"])
def test_int8_products_keep_the_tables_choice_where_blocks_cannot_step_in_one_op(make_gpt, remember_kernels, where):
    """With rotary positions or an attention kernel other than gpt2lab's, no block steps in one op: one
    op's saving is not weighed, and the product the table measured faster on fbgemm stays there."""
    config = dict(vocab_size=1024, n_embd=64, n_head=4) | ({"pos_emb": "rope"} if where == "rotary positions" else {})
    attention = "avx2" if where == "rotary positions" else "sdpa"
    model = quantize.quantize_int8(make_gpt(seed=6, backends=Backends(decode_attention=attention), **config))
    for m in model.modules():
        if isinstance(m, Int8Linear):
            slower_here = (m.out_features, m.in_features) == (64, 256)
            us = {k: 100.0 for k in ops.int8_kernels(1)} | {"avx2": 110.0 if slower_here else 90.0}
            entry = {"kernel": "fbgemm" if slower_here else "avx2", "us_per_product": us}
            remember_kernels({f"int8 {m.out_features}x{m.in_features} rows 1": entry})
    remember_kernels(
        {"int8_block 64x4 rows 1": {"kernel": "one_op", "us_per_product": {"python": 200.0, "one_op": 100.0}}}
    )
    with torch.no_grad():
        model.setup_cache(1, 8)
        model.plan_decoding(1)
    assert all(block.step_plan is None for block in model.h)
    assert {block.mlp.c_proj.planned.kernel for block in model.h} == {"fbgemm"}


@needs_kernel
def test_the_saving_of_one_op_is_timed_on_int8_blocks_each_way(tmp_path, monkeypatch):
    """Kind ``int8_block`` times a decode step through int8 blocks on gpt2lab's kernels as the Python
    forward and as one op per block; the saving an int8 layer reads from its table is the difference."""
    steps = quantize.block_steps(64, 4, 3, 2, ("python", "one_op"))
    calls, added = one_op_steps(monkeypatch), recorded_blocks(monkeypatch)
    with torch.no_grad():
        steps["python"]()
        assert calls == []
        steps["one_op"]()
    assert len(calls) == 1 and len(added) == 3
    assert all(args[2] == [2, 2, 2, 2] for args in added)  # four int8 products each
    config = gpt2lab.GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=256)
    model = quantize.quantize_int8(gpt2lab.model.GPT(config, Backends(linear="torch")))
    timed = []
    measured = {"python": 300e-6, "one_op": 120e-6}
    monkeypatch.setattr(kernels, "measure", lambda *a, steps, **k: timed.append((a, steps)) or measured)
    layer = model.h[0].attn.c_attn
    layer.table = kernels.KernelTable(tmp_path / "k.json")
    assert layer.one_op_saving(4, 2) == pytest.approx(180.0)
    assert timed == [((64, 4, 2, "int8_block"), quantize.block_steps)]
