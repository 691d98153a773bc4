"""gpt2lab's own int8 CPU kernel (gpt2lab.native, kernel "avx2"): exact, traceable, and left out cleanly
where it cannot be built."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from gpt2lab import GPT2LabError, kernels, native, ops, quantize
from gpt2lab.quantize import Int8Linear

needs_kernel = pytest.mark.skipif(not native.available(), reason=f"avx2 kernel: {native.unavailable_reason()}")


def exact_product(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """What the kernel computes, by its definition: each row of x quantized to int8 with scale
    max|x| / 127 (float32), x / scale rounded half to even; the int8 sums exact in int64; then
    ((sum * x scale) * weight scale) + bias, each step rounded to float32."""
    x_scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
    qx = (x.double() / x_scale.double()).float().round()  # float32's correctly rounded quotient
    sums = qx.long() @ qweight.long().T
    y = (sums.float() * x_scale) * scale
    return y if bias is None else y + bias


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 5, 16])
@pytest.mark.parametrize(("out_features", "in_features"), [(64, 64), (70, 50), (3, 31), (300, 1000)])
@pytest.mark.parametrize("bias", [True, False])
def test_the_avx2_kernel_is_exact(rows, out_features, in_features, bias):
    """Bit for bit what its definition gives, with widths that are not multiples of its 32-byte chunks
    nor of its 4-channel blocks, weights of 127 levels (its pair sums never saturate) and inputs that
    span large and small magnitudes."""
    g = torch.Generator().manual_seed(rows * 1000 + out_features + in_features)
    w = torch.randn(out_features, in_features, generator=g)
    x = torch.randn(rows, in_features, generator=g) * torch.logspace(-3, 3, rows)[:, None]
    b = torch.randn(out_features, generator=g) if bias else None
    qweight, scale = ops.quantize_weight(w, 127)
    y = ops.int8_linear(x, ops.pack_int8(qweight, scale, b, "avx2"), "avx2")
    assert torch.equal(y, exact_product(x, qweight, scale, b))


@needs_kernel
def test_the_avx2_kernel_equals_int_mm_on_seven_bit_weights():
    """Where torch._int_mm is exact on every CPU too, the two give the same bits."""
    g = torch.Generator().manual_seed(0)
    qweight, scale = ops.quantize_weight(torch.randn(96, 160, generator=g), 63)
    x, b = torch.randn(3, 160, generator=g), torch.randn(96, generator=g)
    want = ops.int8_linear(x, ops.pack_int8(qweight, scale, b, "int_mm"), "int_mm")
    assert torch.equal(ops.int8_linear(x, ops.pack_int8(qweight, scale, b, "avx2"), "avx2"), want)


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
def test_the_avx2_kernel_is_a_candidate_for_few_rows_only():
    assert "avx2" in ops.int8_kernels(1) and "avx2" in ops.int8_kernels(ops.AVX2_MAX_ROWS)
    assert "avx2" not in ops.int8_kernels(ops.AVX2_MAX_ROWS + 1)


@needs_kernel
def test_a_compiled_step_calls_the_avx2_op_itself(monkeypatch):
    """With the avx2 kernel planned, a compiled product calls the C++ op directly, not through the
    Python of ``int8_product`` (which finds its layer by id: here the layer is not registered there)."""

    class Table:
        def choose(self, out_features, in_features, rows, kind="float32"):
            return "avx2"

    monkeypatch.setattr(kernels, "has_amx_int8", lambda: False)  # with AMX a compiled step traces _int_mm
    layer = Int8Linear(torch.nn.Linear(64, 48), Table())
    layer.plan(1)
    quantize._planned_layers.pop(id(layer))
    x = torch.randn(1, 64)
    with torch.no_grad():
        want = layer(x)
        got = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(got, want)


def test_without_the_kernel_the_others_run_and_asking_for_it_says_why():
    """GPT2LAB_NATIVE=0: never built, not a candidate, and a request for it names the reason."""
    code = (
        "import torch\n"
        "from gpt2lab import GPT2LabError, native, ops\n"
        "assert 'avx2' not in ops.int8_kernels(1), ops.int8_kernels(1)\n"
        "q, s = ops.quantize_weight(torch.randn(8, 32), 63)\n"
        "try:\n"
        "    ops.pack_int8(q, s, None, 'avx2')\n"
        "except GPT2LabError as e:\n"
        "    print(e)\n"
    )
    env = {**os.environ, native.ENV_NATIVE: "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "GPT2LAB_NATIVE=0" in out.stdout and "choose another int8 kernel" in out.stdout


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
