"""int8 CPU inference: close to fp32, usable through generate and the CLI, refused where it cannot work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gpt2lab import Backends, GPT2LabError, generate, kernels, native, ops
from gpt2lab.cli import main
from gpt2lab.quantize import Int8Linear, quantize_int8


def skip_unless_exact(levels: int) -> None:
    if levels > kernels.int8_weight_levels():
        pytest.skip(f"weights of {levels} levels saturate this CPU's int8 kernels (no VNNI)")


@pytest.mark.parametrize("levels", [127, 63])
def test_int8_logits_close_to_fp32(make_gpt, monkeypatch, levels):
    """Every linear layer (lm_head included) becomes int8; logits stay close to fp32's (relative to their spread),
    and the original model is left untouched; with the 7-bit weights of a CPU without VNNI too."""
    skip_unless_exact(levels)
    monkeypatch.setattr(kernels, "int8_weight_levels", lambda: levels)
    model = make_gpt(std=0.05, n_layer=2, n_embd=128, n_head=4).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize_int8(model)
    assert q.lm_head.qweight.abs().max() == levels
    assert all(isinstance(m, Int8Linear) for m in (q.lm_head, q.h[0].attn.c_attn, q.h[1].mlp.c_proj))
    assert not any(isinstance(m, ops.Linear) for m in q.modules())
    x = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, _ = model(x)
        got, _ = q(x)
    # measured on this model, 8-bit inputs per token about their centers: mean 0.016, max 0.083 of the logit std
    # with 8-bit weights per output channel, mean 0.029, max 0.131 with 7-bit ones; the same top-1 token at 97.5% of
    # positions either way
    mean_err, max_err = (got - ref).abs().mean() / ref.std(), (got - ref).abs().max() / ref.std()
    bound = 1 if levels == 127 else 2  # half the levels: twice the weight's rounding step
    assert 0 < mean_err < 0.03 * bound and max_err < 0.15 * bound, f"mean {mean_err:.3f}, max {max_err:.3f} of std"
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    with torch.no_grad():  # the loss (gpt2lab eval --int8) goes through the int8 lm_head too
        assert abs(q(x, x)[1] - model(x, x)[1]) < 0.02
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("levels", [127, 63])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_int8_kernels_agree_with_the_float_product(rows, levels):
    """Each int8 kernel that may run a product of this many rows is within 8-bit rounding of the float32
    product, bias included; the weight's int8 copy reproduces it within half a step per element."""
    skip_unless_exact(levels)
    g = torch.Generator().manual_seed(rows)
    w, b, x = torch.randn(300, 200, generator=g), torch.randn(300, generator=g), torch.randn(rows, 200, generator=g)
    qweight, scale = ops.quantize_weight(w, levels)
    assert qweight.dtype == torch.int8 and qweight.abs().max() == levels
    assert (qweight.float() * scale[:, None] - w).abs().max() <= scale.max() / 2 + 1e-6
    ref = F.linear(x, w, b)
    for kernel in ops.int8_kernels():
        y = ops.int8_linear(x, ops.pack_int8(qweight, scale, b, kernel), kernel)
        assert (y - ref).abs().max() < 0.03 * ref.abs().max(), kernel


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_qlinear_sums_exactly_what_int_mm_sums(rows):
    """oneDNN's quantized linear takes the input shifted by 128 (its zero point) and one input scale per
    call: with scale 1 and each row's own scale applied after, it returns torch._int_mm's product, rows
    of very different magnitudes included, to float32 rounding."""
    if "qlinear" not in ops.int8_kernels():
        pytest.skip("no oneDNN quantized linear in this torch build")
    g = torch.Generator().manual_seed(rows)
    w, b, x = torch.randn(300, 200, generator=g), torch.randn(300, generator=g), torch.randn(rows, 200, generator=g)
    x *= torch.logspace(-3, 3, rows)[:, None]
    qweight, scale = ops.quantize_weight(w, kernels.int8_weight_levels())
    y, ref = (ops.int8_linear(x, ops.pack_int8(qweight, scale, b, k), k) for k in ("qlinear", "int_mm"))
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_int8_products_quantize_each_row_about_its_center(rows):
    """A row that leans to one side (a GELU's output runs from -0.17 to its largest) keeps its 255 levels
    over its own range: quantized about its center, rows of 5 + noise come within 0.03 of the product of
    the float input with the dequantized weight on every kernel (0.009-0.017 here), where levels
    symmetric about zero (a step of 5.3 / 127) came 0.20-0.32 off. fbgemm's one-row product quantizes
    the row over its range and zero (fbgemm's own), the same for rows that reach both signs."""
    g = torch.Generator().manual_seed(rows)
    w, x = torch.randn(48, 64, generator=g), 5 + 0.1 * torch.randn(rows, 64, generator=g)
    qweight, scale = ops.quantize_weight(w, kernels.int8_weight_levels())
    ref = F.linear(x, qweight.float() * scale[:, None])
    for kernel in [k for k in ops.int8_kernels(rows) if not (k == "fbgemm" and rows == 1)]:
        y = ops.int8_linear(x, ops.pack_int8(qweight, scale, None, kernel), kernel)
        assert (y - ref).abs().max() < 0.03, kernel


@pytest.mark.parametrize("bias", [False, True])
def test_fbgemm_quantizes_each_row_on_its_own(bias):
    """fbgemm takes one input scale per call, so the rows of a product are first scaled to the same
    largest magnitude: a row of small values keeps its precision beside a row of large ones, as in a
    call of its own, and the bias is added once, after the rows are scaled back."""
    if "fbgemm" not in ops.int8_kernels():
        pytest.skip("no fbgemm in this torch build")
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(300, 200, generator=g), torch.randn(5, 200, generator=g)
    b = torch.randn(300, generator=g) if bias else None
    x *= torch.tensor([1e-3, 1.0, 1e3, 0.1, 10.0])[:, None]
    packed = ops.pack_int8(*ops.quantize_weight(w, kernels.int8_weight_levels()), b, "fbgemm")
    y = ops.int8_linear(x, packed, "fbgemm")
    ref, alone = F.linear(x, w, b), torch.cat([ops.int8_linear(row, packed, "fbgemm") for row in x.split(1)])
    spread = (ref - (0 if b is None else b)).abs().amax(dim=1, keepdim=True)  # each row's own product
    assert ((y - ref).abs() < 0.03 * spread).all()  # one scale for all rows: 73-100% off
    assert ((y - alone).abs() < 0.03 * spread).all()


@pytest.mark.parametrize("rows", [1, 3])
def test_fbgemm_products_skip_the_torch_function_lookup(monkeypatch, rows):
    """torch asks each argument of an op that is not a tensor for ``__torch_function__``; fbgemm's packed
    weight answers that lookup with a C++ exception thrown and caught, which cost as long as a small
    product. Its products are run without the lookup, and without torch.ops' Python search of the
    arguments for a fake TorchScript object (which only tracing passes)."""
    if "fbgemm" not in ops.int8_kernels():
        pytest.skip("no fbgemm in this torch build")
    w = torch.randn(64, 32)
    packed = ops.pack_int8(*ops.quantize_weight(w), torch.zeros(64), "fbgemm")
    prepacked = packed[0]
    x = torch.randn(rows, 32)
    expected = ops.int8_linear(x, packed, "fbgemm")
    asked, lookup = [], type(prepacked).__getattr__

    def spy(obj, name):
        asked.append(name)
        return lookup(obj, name)

    searched = []
    search = torch._ops._must_dispatch_in_python
    monkeypatch.setattr(torch._ops, "_must_dispatch_in_python", lambda *a: searched.append(1) or search(*a))
    monkeypatch.setattr(type(prepacked), "__getattr__", spy)
    assert torch.equal(ops.int8_linear(x, packed, "fbgemm"), expected)
    assert "__torch_function__" not in asked and not searched
    torch.ops.quantized.linear_dynamic(x, prepacked, False)  # the spies see both in a plain call
    assert "__torch_function__" in asked and searched


def test_int8_weights_keep_to_7_bits_where_a_kernel_lacks_vnni(monkeypatch):
    """Without AVX-512 VNNI (fbgemm has no other VNNI kernels), or with oneDNN capped below VNNI, an int8
    kernel sums pairs of 8-bit products in 16 bits, which 8-bit weights could saturate."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    for flags, levels in (({"avx2", "avx512f", "avx512_vnni"}, 127), ({"avx2", "fma"}, 63), ({"avx2", "avx_vnni"}, 63)):
        monkeypatch.setattr(kernels, "cpu_flags", lambda flags=flags: flags)
        assert kernels.int8_weight_levels() == levels, flags
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_vnni"})
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert kernels.int8_weight_levels() == 63


AVX2_INT8 = """
import torch
import torch.nn.functional as F
from gpt2lab import kernels, ops
g = torch.Generator().manual_seed(0)
w, x = torch.randn(512, 768, generator=g) * 0.02, torch.randn(5, 768, generator=g) * 3
qweight, scale = ops.quantize_weight(w, kernels.int8_weight_levels())
ref = F.linear(x, w)
errors = []
for kernel in ops.int8_kernels():
    y = ops.int8_linear(x, ops.pack_int8(qweight, scale, None, kernel), kernel)
    errors.append(float((y - ref).abs().max() / ref.abs().max()))
print(kernels.int8_weight_levels(), max(errors))
"""


def test_int8_products_stay_exact_on_onednn_without_vnni():
    """oneDNN limited to AVX2 (as on a CPU without VNNI) runs torch._int_mm and its quantized linear with
    16-bit pair sums: the 7-bit weights chosen for it keep every kernel's product within rounding (8-bit
    ones were 12% off here)."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", AVX2_INT8], env=env, capture_output=True, text=True, check=True)
    levels, err = out.stdout.split()
    assert int(levels) == 63 and float(err) < 0.03


def test_int8_kernel_is_measured_per_row_count(tmp_path):
    table = kernels.KernelTable(tmp_path / "k.json")
    for rows in (1, 8, 32):
        assert table.choose(1024, 512, rows, kind="int8") in ops.int8_kernels(rows)
        assert set(table.times(1024, 512, rows, "int8")) == set(ops.int8_kernels(rows))


def test_int8_kernels_are_measured_where_the_float32_ones_are_fixed(make_gpt, remember_kernels):
    """Backends.linear (or GPT2LAB_LINEAR_KERNEL) fixes the float32 kernel only: quantized layers still
    choose theirs by measurement (so still step as one op where gpt2lab's kernel wins)."""
    model = quantize_int8(make_gpt(backends=Backends(linear="torch")))
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert all(m.table is not None for m in layers)
    layer = layers[0]
    us = dict.fromkeys(ops.int8_kernels(1), 100.0) | {"qlinear": 10.0}
    remember_kernels(
        {f"int8 {layer.out_features}x{layer.in_features} rows 1": {"kernel": "qlinear", "us_per_product": us}}
    )
    assert layer._choose(1)[0] == "qlinear"


def test_int8_entries_timed_before_fbgemm_ran_rows_together_are_timed_again(tmp_path, monkeypatch):
    """fbgemm's products of several rows once ran one call per row: an entry timed then (no revision)
    is measured again; one of the current revision, or an edit without times, is taken as it is."""
    if len(ops.int8_kernels()) < 2:
        pytest.skip("one int8 kernel in this torch build: nothing to measure")
    monkeypatch.setattr(kernels, "measure", lambda *args, **kwargs: {k: 1e-5 for k in ops.int8_kernels()})
    slow_fbgemm = {"kernel": "int_mm", "us_per_product": {k: 1.0 for k in ops.int8_kernels()}, "evicted_mb": 0}
    entries = {
        "int8 1024x512 rows 8": slow_fbgemm,
        "int8 1024x512 rows 2": slow_fbgemm | {"revision": kernels.REVISIONS["int8"], "native": native.source_digest()},
        "int8 1024x512 rows 4": {"kernel": "int_mm"},
    }
    path = tmp_path / "k.json"
    path.write_text(json.dumps({kernels.machine_key(): entries}))
    table = kernels.KernelTable(path)
    assert table.choose(1024, 512, 8, kind="int8") == ops.int8_kernels()[0]  # all level: the fallback
    assert table.choose(1024, 512, 2, kind="int8") == table.choose(1024, 512, 4, kind="int8") == "int_mm"
    written = json.loads(path.read_text())[kernels.machine_key()]
    assert written["int8 1024x512 rows 8"]["revision"] == kernels.REVISIONS["int8"]
    assert written["int8 1024x512 rows 8"]["us_per_product"] == {k: 10.0 for k in ops.int8_kernels()}


def test_int8_generation_matches_its_own_full_forward(make_gpt):
    """The KV-cache path of the int8 model agrees with its full forward (greedy tokens are the argmaxes)."""
    q = quantize_int8(make_gpt(std=0.05).eval())
    prompt = [5, 9, 2, 7]
    [new] = generate(q, [prompt], 8, temperature=0, eos_id=None)
    seq = torch.tensor([prompt + new])
    with torch.no_grad():
        logits, _ = q(seq)
    assert logits[0, len(prompt) - 1 : -1].argmax(-1).tolist() == new


def test_int8_refuses_non_fp32(make_gpt):
    with pytest.raises(GPT2LabError, match="float32"):
        quantize_int8(make_gpt().to(torch.bfloat16))


@pytest.mark.parametrize("rows", [1, 6])
def test_int8_layers_follow_loaded_weights(make_gpt, rows):
    """Each int8 kernel's laid-out weights are made again after load_state_dict, at one row (fbgemm's
    prepacked copy, every batch-1 decode step) as at several."""
    a, b = quantize_int8(make_gpt(seed=0)), quantize_int8(make_gpt(seed=1))
    idx = torch.arange(rows)[None] % 50
    with torch.no_grad():
        a(idx), a(idx[:, :1])  # both row counts' kernels lay their weights out
        a.load_state_dict(b.state_dict())
        torch.testing.assert_close(a(idx)[0], b(idx)[0], rtol=0, atol=0)


@pytest.mark.parametrize("kernel", ["avx2", "int_mm"])
def test_an_int8_layer_refuses_an_input_of_another_width(kernel):
    """As F.linear does, on every kernel: gpt2lab's would take an input whose width pads as the weight's
    does (50 or 33 columns for 40) and return a result of the wrong rows."""
    if kernel == "avx2" and not native.available():
        pytest.skip("gpt2lab's kernels are not built here")
    layer = Int8Linear(torch.nn.Linear(40, 8), None).eval()
    layer.plan(5, kernel)
    with torch.no_grad():
        assert layer(torch.randn(5, 40)).shape == (5, 8)
        for x in (torch.randn(4, 50), torch.randn(5, 33)):
            with pytest.raises(GPT2LabError, match="takes inputs of 40 features"):
                layer(x)


def test_an_int8_layer_makes_its_channels_once_for_every_kernel():
    """The per-channel scales and weight sums (``ops.weight_channels``) are one tensor however many
    kernels the layer packs for (the lm_head's are 400 KB in GPT-2)."""
    layer = Int8Linear(torch.nn.Linear(32, 8), None)
    for kernel in ops.int8_kernels(1) + ops.int8_kernels(64):
        layer._choose(1, kernel)
    channels = {id(packed[1]) for packed in layer._packed.values()}
    assert len(layer._packed) > 1 and len(channels) == 1
    assert torch.equal(next(iter(layer._packed.values()))[1], ops.weight_channels(layer.qweight, layer.scale))


def test_an_int8_model_is_for_inference_only(make_gpt):
    """No gradients: its parameters need none, training mode refuses, and a cast to another dtype is a
    clear error rather than a mixed-dtype failure deep in a kernel."""
    q = quantize_int8(make_gpt())
    idx = torch.tensor([[1, 2, 3]])
    assert not any(p.requires_grad for p in q.parameters())
    assert q(idx)[0].grad_fn is None  # outside no_grad too: no graph is built
    with pytest.raises(GPT2LabError, match="int8 layers compute no gradients"):
        q.train()(idx[:, :1])
    with pytest.raises(GPT2LabError, match="int8 model runs in float32"):
        q.eval().to(torch.bfloat16)(idx)


def test_cli_int8(tiny_dir, capsys):
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_dir),
                "--prompt",
                "Hello",
                "--max-new-tokens",
                "5",
                "--temperature",
                "0",
                "--device",
                "cpu",
                "--int8",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("Hello")
    assert main(["predict", "--model", str(tiny_dir), "--device", "cpu", "--dtype", "bfloat16", "--int8", "Hi"]) == 2
    assert "float32" in capsys.readouterr().err


def test_a_planned_int8_layer_chooses_its_gelu_form_on_first_use_only():
    """plan(rows) chooses the product's kernel at once and the GELU's form only when the layer first
    applies one (an MLP's first product; the other layers never measure a form), then keeps it."""

    class Table:
        def __init__(self) -> None:
            self.asked: list[str] = []

        def choose(self, out_features, in_features, rows, kind="float32"):
            self.asked.append(kind)
            return "sigmoid" if kind == "tanh_gelu" else kernels.fallback(kind, rows)

    table = Table()
    layer = Int8Linear(torch.nn.Linear(64, 32), table)
    x = torch.randn(1, 64)
    layer.plan(1)
    assert table.asked == ["int8"]
    with torch.no_grad():
        want = F.gelu(layer(x), approximate="tanh")
        for _ in range(2):
            torch.testing.assert_close(layer.gelu(x), want)
    assert table.asked == ["int8", "tanh_gelu"]


@pytest.mark.parametrize("kernel", ops.int8_kernels())
@pytest.mark.parametrize("amx", [False, True])
def test_a_compiled_step_calls_the_planned_int8_kernel_as_one_op(monkeypatch, kernel, amx):
    """A plan marks its kernel for compiled steps to call as one opaque op (``int8_product``), which
    computes the planned layer's own product and passes torch's checks of a custom op (schema, fake
    tensor, dispatch); not ``torch._int_mm``, which a compiled step traces, nor any kernel where the
    CPU has AMX int8 tiles (inductor lays the weights out for its own kernels then)."""

    class Table:
        def choose(self, out_features, in_features, rows, kind="float32"):
            return kernel

    monkeypatch.setattr(kernels, "has_amx_int8", lambda: amx)
    layer = Int8Linear(torch.nn.Linear(64, 48), Table())
    x = torch.randn(3, 64)
    layer.plan(3)
    assert layer.planned.opaque == (kernel != "int_mm" and not amx)
    with torch.no_grad():
        want = layer(x)
        got = torch.ops.gpt2lab.int8_product(x, id(layer), layer.out_features)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.library.opcheck(torch.ops.gpt2lab.int8_product, (x, id(layer), layer.out_features))
