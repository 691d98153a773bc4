"""The oneDNN linear layer: same results and gradients as F.linear, F.linear wherever it must be."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gpt2lab.model
from gpt2lab import Backends, ops

needs_onednn = pytest.mark.skipif(ops._onednn is None, reason="this PyTorch build has no oneDNN")


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 64), (3, 1, 64), (2, 17, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_f_linear(shape, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    w = torch.randn(96, 64, generator=g, requires_grad=True)
    b = torch.randn(96, generator=g, requires_grad=True) if bias else None
    assert ops.use_onednn(x, w)  # the path under test is the oneDNN one
    y = ops.linear(x, w, b)
    ref = F.linear(x, w, b)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn(ref.shape, generator=g)
    got = torch.autograd.grad(y, [x, w] + ([b] if bias else []), dy)
    want = torch.autograd.grad(ref, [x, w] + ([b] if bias else []), dy)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_no_grad_and_frozen_weight():
    x, w = torch.randn(4, 8), torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(ops.linear(x, w), F.linear(x, w))
    x.requires_grad_()
    (gx,) = torch.autograd.grad(ops.linear(x, w).sum(), x)  # weight frozen: only the input's gradient
    torch.testing.assert_close(gx, w.sum(0).expand(4, 8))


def test_falls_back_to_f_linear_where_it_must():
    x, w = torch.randn(4, 8), torch.randn(5, 8)
    assert not ops.use_onednn(x.bfloat16(), w.bfloat16())
    assert not ops.use_onednn(x.double(), w.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not ops.use_onednn(x, w)
        assert ops.linear(x, w).dtype == torch.bfloat16  # autocast applies, as to F.linear
    assert torch.equal(ops.linear(x.double(), w.double()), F.linear(x.double(), w.double()))


def test_linear_module_is_an_nn_linear():
    torch.manual_seed(0)
    ours, plain = ops.Linear(8, 5), nn.Linear(8, 5)
    plain.load_state_dict(ours.state_dict())
    assert isinstance(ours, nn.Linear) and ours.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(3, 8)
    torch.testing.assert_close(ours(x), plain(x))


def _assert_same_loss_and_grads(loss, ref, x, w, scale: float = 1.0):
    """loss equals ref, and (scale x loss)'s gradients of x and w equal (scale x ref)'s; returns ours."""
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    gx, gw = torch.autograd.grad(scale * loss, [x, w])
    want_x, want_w = torch.autograd.grad(scale * ref, [x, w])
    torch.testing.assert_close(gx, want_x, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, want_w, rtol=1e-5, atol=1e-7)
    return gx, gw


@pytest.mark.parametrize("scale", [1.0, 2.5])  # a loss's own gradient (handed back as made), a scaled one
@pytest.mark.parametrize("chunk_elems", [97 * 5, 97 * 64, 2**24])  # 5 rows a chunk, 64, all at once
def test_linear_cross_entropy_matches_f_cross_entropy(chunk_elems, scale):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(97, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 97, (37,), generator=g)
    targets[[0, 5, 6, 30]] = -100  # ignored rows: no loss, no gradient
    loss = ops.linear_cross_entropy(x, w, targets, chunk_elems=chunk_elems)
    gx, _ = _assert_same_loss_and_grads(loss, F.cross_entropy(x @ w.t(), targets, ignore_index=-100), x, w, scale)
    assert gx[[0, 5, 6, 30]].abs().max() == 0


def test_linear_cross_entropy_scores_the_first_vocab_rows():
    """``vocab`` leaves the weight's padding rows out of the softmax; they get an exact zero gradient,
    the scored rows the same gradient as the unpadded product."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 8, generator=g, requires_grad=True)
    w = torch.randn(16, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (9,), generator=g)
    loss = ops.linear_cross_entropy(x, w, targets, vocab=11, chunk_elems=11 * 4)
    _, gw = _assert_same_loss_and_grads(loss, F.cross_entropy(x @ w[:11].t(), targets), x, w)
    assert gw.shape == (16, 8) and gw[11:].abs().max() == 0


def test_linear_cross_entropy_without_grad():
    x, w, targets = torch.randn(6, 8), torch.randn(11, 8), torch.tensor([1, 2, 3, -100, 4, 10])
    with torch.no_grad():
        loss = ops.linear_cross_entropy(x, w.requires_grad_(), targets, chunk_elems=22)
    torch.testing.assert_close(loss, F.cross_entropy(x @ w.t(), targets).detach())
    assert loss.grad_fn is None


@needs_onednn
@pytest.mark.parametrize("padded", [False, True])
def test_model_loss_paths_agree(make_gpt, padded, monkeypatch):
    """GPT.forward's CPU loss (chunked, oneDNN) and its loss over full logits (every other device, or the
    torch linear kernel) give the same loss and gradients, with a padded vocabulary too (its extra rows
    are never predicted)."""
    idx = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    targets = idx.roll(-1, dims=1)
    targets[:, -1] = -100
    chunked, linear_cross_entropy = [], gpt2lab.model.linear_cross_entropy
    monkeypatch.setattr(
        gpt2lab.model, "linear_cross_entropy", lambda *a, **k: chunked.append(1) or linear_cross_entropy(*a, **k)
    )
    results = []
    for kernel in ("onednn", "torch"):
        model = make_gpt(seed=4, backends=Backends(linear=kernel), **({"padded_vocab_size": 128} if padded else {}))
        model.train()
        logits, loss = model(idx, targets)
        loss.backward()
        assert logits is None and len(chunked) == 1  # the chunked loss for oneDNN's model only
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 64), (2, 17, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_gelu_matches_gelu_of_the_product(shape, bias, monkeypatch):
    """oneDNN's product with the tanh-GELU fused in equals F.gelu of F.linear to float32 rounding, and a
    layer fuses it only where no gradient is needed (the backward needs the product before the GELU)."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(*shape, generator=g), torch.randn(96, 64, generator=g) / 8
    b = torch.randn(96, generator=g) if bias else None
    ref = F.gelu(F.linear(x, w, b), approximate="tanh")
    for kernel in ("onednn_gelu", "onednn", "torch"):
        torch.testing.assert_close(ops.linear_gelu(x, w, b, kernel), ref, rtol=1e-5, atol=1e-5)
    layer = ops.Linear(64, 96, bias=bias, kernel="onednn")
    with torch.no_grad():
        layer.weight.copy_(w)
        if bias:
            layer.bias.copy_(b)
    fused = []
    real = ops.linear_gelu
    monkeypatch.setattr(ops, "linear_gelu", lambda *args: fused.append(args[3]) or real(*args))
    with torch.no_grad():
        torch.testing.assert_close(layer.gelu(x), ref, rtol=1e-5, atol=1e-5)
    assert fused == ["onednn_gelu"]
    y = layer.gelu(x.requires_grad_())  # training: the product, then F.gelu, with their gradients
    assert fused == ["onednn_gelu"] and y.requires_grad
    (gx,) = torch.autograd.grad(y.sum(), x)
    xr = x.detach().requires_grad_()
    (want,) = torch.autograd.grad(F.gelu(F.linear(xr, w, b), approximate="tanh").sum(), xr)
    torch.testing.assert_close(gx, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not ops.packing_available(), reason="this PyTorch build has no MKL")
def test_repeated_products_read_a_packed_copy_once_it_repays():
    """Under pack_repeated a layer packs its weight on the product that the table says repays the copy
    (here the third of one row count since the weight or the copy changed); one-row products never
    count, products with grad never pack, and a changed weight drops its copy and starts counting again.
    Every result equals F.linear (or the GELU of it) to float32 rounding."""

    class Table:  # a measured table's answers: MKL's plain kernel, and a copy repaid by the third product
        def choose(self, out_features, in_features, rows, kind="float32"):
            return "sigmoid" if kind == "tanh_gelu" else "torch"

        def pack_repays(self, out_features, in_features, rows):
            return 3

    torch.manual_seed(0)
    layer = ops.Linear(64, 32, kernel="auto", table=Table(), pack_repeated=True)
    x1, x4, x8 = torch.randn(1, 64), torch.randn(4, 64), torch.randn(2, 4, 64)

    def check(x, gelu=False):
        y = layer.gelu(x) if gelu else layer(x)
        expected = F.linear(x, layer.weight, layer.bias)
        torch.testing.assert_close(y, F.gelu(expected, approximate="tanh") if gelu else expected)

    for _ in range(5):
        check(x8)  # with grad: never counted
    assert layer.packed is None
    with torch.no_grad():
        for x in (x8, x1, x4, x8, x1):  # other row counts in between: each row count is counted apart
            check(x)
        assert layer.packed is None
        check(x8, gelu=True)  # the third product of 8 rows: it makes the copy and reads it
        assert layer.packed[0] == 8
        for _ in range(2):
            check(x4)  # the product of 4 rows before the copy does not count towards the next
            check(x8)
        assert layer.packed[0] == 8  # the copy stays until another row count repays its own
        check(x4)
        assert layer.packed[0] == 4
        layer.weight.mul_(2.0)  # in place: the copy is stale, and counting starts again
        for _ in range(2):
            check(x4)
            assert layer.packed is None
        check(x4)
        assert layer.packed[0] == 4
    clone = copy.deepcopy(layer)  # a copy (or a pickle) of a packed layer leaves the packed copy behind
    assert layer.packed is not None and clone.packed is None
    with torch.no_grad():
        torch.testing.assert_close(clone(x4), layer(x4))
    plain = ops.Linear(64, 32, kernel="auto", table=Table())  # pack_repeated off: never
    with torch.no_grad():
        for _ in range(5):
            plain(x8)
    assert plain.packed is None

    class FusedTable(Table):  # where the GELU fused into oneDNN's call is the fastest, products never pack
        def choose(self, out_features, in_features, rows, kind="float32"):
            return "onednn_gelu" if kind == "gelu" else super().choose(out_features, in_features, rows, kind)

    if ops.onednn_available():
        layer = ops.Linear(64, 32, kernel="auto", table=FusedTable(), pack_repeated=True)
        with torch.no_grad():
            for _ in range(5):
                check(x8, gelu=True)
        assert layer.packed is None


@needs_onednn
@pytest.mark.skipif(not ops.packing_available(), reason="this PyTorch build has no MKL")
def test_an_optimizer_step_makes_the_packed_copy_stale():
    """A fused AdamW step (what training uses) changes the weight without counting it in the weight's
    version counter; the packed copy must still not be read after it."""
    torch.manual_seed(0)
    layer = ops.Linear(64, 64)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
    x = torch.randn(8, 64)
    layer.pack(8)
    version = layer.weight._version
    layer(x).sum().backward()
    optimizer.step()
    assert layer.weight._version == version  # the hole the optimizer hook closes
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert layer.packed is None


class CountingTable:
    """A table that always answers ``kernel`` (``onednn_gelu`` for the GELU with its product, the sigmoid
    form for the GELU on its own) and counts its questions."""

    def __init__(self, kernel: str = "torch") -> None:
        self.kernel, self.asked = kernel, 0

    def choose(self, out_features, in_features, rows, kind="float32"):
        self.asked += 1
        return {"gelu": "onednn_gelu", "tanh_gelu": "sigmoid"}.get(kind, self.kernel)

    def pack_repays(self, out_features, in_features, rows):
        return 3


@needs_onednn
@pytest.mark.parametrize("kernel", ["torch", "onednn", "torch_t"])
def test_a_planned_layer_chooses_its_kernel_once_and_still_follows_its_weight(kernel):
    """After plan(rows), products of that many rows without grad run the kernel (and copy) chosen then,
    the GELU's on its first use, without asking the table again: the same results as unplanned. Other
    row counts, products with grad, a weight changed in place or replaced, unplan, pack and unpack all
    go back to choosing per product, and the results follow the weight."""
    torch.manual_seed(0)
    table = CountingTable("torch" if kernel == "torch_t" else kernel)
    layer = ops.Linear(64, 32, kernel="auto", table=table)
    if kernel == "torch_t":
        layer.pack(1, kernel)  # the transposed copy, which the plan reads
    x, x4 = torch.randn(1, 1, 64), torch.randn(4, 64)

    def check(x, gelu=False):
        y = layer.gelu(x) if gelu else layer(x)
        expected = F.linear(x, layer.weight, layer.bias)
        torch.testing.assert_close(y, F.gelu(expected, approximate="tanh") if gelu else expected)
        return y

    layer.plan(1)
    assert layer.planned is not None
    with torch.no_grad():
        asked = table.asked
        for _ in range(3):
            check(x)
        check(x, gelu=True)  # the GELU's kernel and form: chosen on first use, then kept
        asked_gelu = table.asked
        check(x, gelu=True)
        assert table.asked == asked_gelu <= asked + 2
        check(x4)  # another row count: chosen per product
        assert table.asked > asked_gelu
        layer.weight.mul_(2.0)  # in place: the plan (and any copy) is dropped, the product follows
        check(x)
        assert layer.planned is None
        layer.plan(1)
        layer.weight = nn.Parameter(torch.randn(32, 64))  # replaced: the plan is not read
        check(x)
        assert layer.planned is None
        if kernel == "torch_t":
            layer.pack(1, kernel)  # a copy of the new weight, which the plan reads
        layer.plan(1)
        asked = table.asked
    y = check(x)  # with grad (the weight's): never the plan (a copy has no backward), chosen per product
    assert table.asked > asked
    (grad,) = torch.autograd.grad(y.sum(), layer.weight)
    torch.testing.assert_close(grad, x.reshape(1, 64).expand_as(layer.weight))
    for drop in (layer.unplan, lambda: layer.pack(1, "torch_t"), layer.unpack):
        layer.plan(1)
        drop()
        assert layer.planned is None
    assert copy.deepcopy(layer).planned is None  # a copy of the layer plans for itself


def test_products_that_still_count_towards_a_copy_are_not_planned():
    """Under pack_repeated, products of two rows or more count towards a packed copy (see above); a plan
    would stop the count, so there is none for them until the copy exists, and one-row products plan."""
    layer = ops.Linear(64, 32, kernel="auto", table=CountingTable(), pack_repeated=True)
    layer.plan(8)
    assert layer.planned is None
    layer.plan(1)
    assert (layer.planned is not None) == ops.onednn_available()
    if ops.packing_available():
        layer.pack(8)
        layer.plan(8)
        assert layer.planned is not None
    fixed = ops.Linear(64, 32, kernel="torch")  # F.linear whatever the rows: nothing to choose
    fixed.plan(1)
    assert fixed.planned is None


needs_numpy_blas = pytest.mark.skipif(
    not ops.numpy_blas_available(), reason="numpy has no BLAS whose threads can be set"
)


@needs_numpy_blas
@pytest.mark.parametrize("kernel", ["numpy", "numpy_t"])
@pytest.mark.parametrize("bias", [True, False])
def test_one_row_products_in_numpys_blas_match_f_linear(kernel, bias):
    """A one-row product in numpy's BLAS, on the weight as it is (``numpy``) or on its transposed copy
    (``numpy_t``), equals F.linear to float32 rounding, its GELU too, and keeps the input's leading shape."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 1, 64, generator=g), torch.randn(96, 64, generator=g)
    b = torch.randn(96, generator=g) if bias else None
    copy = ops.copy_weight(w, 1, kernel)
    assert (copy.data_ptr() == w.data_ptr()) == (kernel == "numpy")  # only numpy_t copies
    with torch.no_grad(), ops.numpy_blas_threads():
        y = ops.copy_linear(x, copy, kernel, w, b)
        gelu = ops.copy_linear(x, copy, kernel, w, b, gelu=True)
    assert y.shape == (1, 1, 96)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gelu, F.gelu(F.linear(x, w, b), approximate="tanh"), rtol=1e-5, atol=1e-5)


@needs_numpy_blas
def test_numpys_blas_takes_torchs_threads_while_torch_runs_on_one():
    """Within ``numpy_blas_threads`` numpy's BLAS runs on as many threads as torch had, and torch on one,
    so the two pools never compete for the cores; both settings come back after, an error included."""
    previous = torch.get_num_threads()
    blas = ops._numpy_blas()
    before = [lib.num_threads for lib in blas]
    try:
        torch.set_num_threads(2)
        for lib in blas:
            lib.set_num_threads(3)
        with pytest.raises(RuntimeError, match="inside"), ops.numpy_blas_threads():
            assert torch.get_num_threads() == 1
            assert [lib.num_threads for lib in blas] == [2] * len(blas)
            raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
        assert [lib.num_threads for lib in blas] == [3] * len(blas)
    finally:
        torch.set_num_threads(previous)
        for lib, n in zip(blas, before, strict=True):
            lib.set_num_threads(n)
