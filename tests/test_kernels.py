"""The measured choice of linear kernel: measured once per product and row bucket, remembered per CPU in
a file, overridable (explicit kernel, environment, edited file), and exact whichever kernel runs."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gpt2lab import GPT, Backends, GPTConfig, kernels, native, ops
from gpt2lab.errors import ConfigError
from gpt2lab.quantize import quantize_int8

pytestmark = [
    pytest.mark.skipif(not ops.onednn_available(), reason="this PyTorch build has no oneDNN"),
    pytest.mark.usefixtures("one_thread"),
]


def test_rows_buckets():
    assert [kernels.rows_bucket(r) for r in (1, 2, 3, 4, 5, 8, 9, 200, 256, 257, 4096)] == [
        1, 2, 4, 4, 8, 8, 16, 256, 256, 256, 256,
    ]  # fmt: skip
    assert [kernels.rows_bucket(r, "int8") for r in (1, 200, 257, 1024, 1025, 2048, 4096)] == [
        1, 256, 512, 1024, 2048, 2048, 2048,
    ]  # fmt: skip


def test_int8_products_of_many_rows_time_only_the_kernels_close_at_half_the_rows(tmp_path, monkeypatch):
    """Past 256 rows an int8 product is measured per bucket up to 2,048 rows, the kernels that took more
    than PRUNE times the fastest's time at half the rows left out (measured there first, in turn)."""
    options = ("fbgemm", "int_mm", "qlinear")
    monkeypatch.setattr(kernels, "candidates", lambda kind, rows: options)
    timed = []

    def measure(out_features, in_features, rows, kind, options=None, **kwargs):
        timed.append((rows, options))
        slow = {256: 3.0, 512: 1.5}.get(rows, 9.0)  # int_mm: 3x at 256 rows, then 1.5x (never timed)
        times = {"fbgemm": 1e-3, "int_mm": slow * 1e-3, "qlinear": 0.9e-3 if rows == 2048 else 1.1e-3}
        return {k: times[k] for k in options}

    monkeypatch.setattr(kernels, "measure", measure)
    table = kernels.KernelTable(tmp_path / "k.json")
    assert table.choose(768, 768, 256, kind="int8") == "fbgemm"
    assert table.choose(768, 768, 2000, kind="int8") == "qlinear"
    assert timed == [(256, options)] + [(rows, ("fbgemm", "qlinear")) for rows in (512, 1024, 2048)]
    assert table.choose(768, 768, 5000, kind="int8") == "qlinear" and len(timed) == 4  # 2,048 rows' choice


def test_attention_is_measured_per_keys_bucket_on_streamed_caches(monkeypatch):
    """A decode step's attention (kind "attention": query heads x head size, rows = keys) chooses between
    the three small products and SDPA, per power-of-two bucket of keys up to MAX_KEYS_BUCKET, each timed
    call after a read that evicts the caches, whatever the key count (the step's weights streamed
    through them since the last step read its KV cache), over as many layers' caches as stream."""
    own = ("avx2",) if native.available() else ()
    assert kernels.candidates("attention", 300) == ("products", "sdpa", *own)
    assert ops.ONE_QUERY_KERNELS == ("products", "sdpa", "avx2")
    assert [kernels.rows_bucket(r, "attention") for r in (1, 3, 300, 1024, 4096, 9000)] == [1, 4, 512, 1024, 4096, 4096]
    monkeypatch.setattr(kernels, "eviction_bytes", lambda: 2**20)
    before = []
    real = kernels.alternated
    monkeypatch.setattr(
        kernels, "alternated", lambda fns, rounds, **kw: before.append(kw["before"]) or real(fns, rounds, **kw)
    )
    read = []
    real_attention = ops.one_query_attention
    monkeypatch.setattr(ops, "one_query_attention", lambda q, k, *a: read.append(k) or real_attention(q, k, *a))
    times = kernels.measure(4, 16, 512, kind="attention", repeat=2)
    assert set(times) == {"products", "sdpa", *own} and all(t > 0 for t in times.values())
    assert before[0].__self__.numel() * 4 == 2**20  # evicted before each timed call at 512 keys too
    # the keys as a step reads them: the written part of a longer cache, its heads apart
    assert all(k.shape == (1, 4, 512, 16) and k.stride(1) > 512 * 16 for k in read)


@pytest.mark.parametrize("chosen", ["products", "sdpa"])
def test_decode_steps_attend_with_the_kernel_measured_faster(make_gpt, remember_kernels, monkeypatch, chosen):
    """Under Backends(decode_attention="auto") each eager decode step attends with the kernel the table
    chose for its rows' query heads, head size and keys; an explicit choice is run without asking the
    table. The tokens are the same either way."""
    from gpt2lab import model as model_module
    from gpt2lab.generation import generate

    remember_kernels({f"attention 4x8 rows {keys}": {"kernel": chosen, "us_per_product": {}} for keys in (8, 16)})
    ran = []
    real = model_module.one_query_attention
    monkeypatch.setattr(
        model_module, "one_query_attention", lambda *a, **kw: ran.append(kw["kernel"]) or real(*a, **kw)
    )
    prompt = [[3, 1, 4, 1, 5, 9]]
    auto = make_gpt(seed=2, backends=Backends(decode_attention="auto"))
    tokens = generate(auto, prompt, 8, eos_id=None)
    assert ran == [chosen] * 2 * 7  # 2 layers, 7 steps of 7 to 13 keys: buckets 8 and 16
    ran.clear()
    monkeypatch.setattr(kernels, "measure", lambda *a, **kw: pytest.fail("an explicit kernel asks no table"))
    other = "sdpa" if chosen == "products" else "products"
    fixed = make_gpt(seed=2, backends=Backends(decode_attention=other))
    assert generate(fixed, prompt, 8, eos_id=None) == tokens
    assert ran == [other] * 2 * 7
    with pytest.raises(ValueError, match="decode_attention must be one of"):
        Backends(decode_attention="flash")


def test_a_compiled_cpu_step_attends_by_sums_of_products_under_auto(make_gpt, monkeypatch):
    """Under auto a compiled CPU step's attention is the ``reduction`` form, which inductor fuses into
    loops of its own (one graph serves every key count, so it cannot follow the table); a compiled
    step elsewhere runs the products, and an explicit choice holds everywhere."""
    attn = make_gpt().h[0].attn
    fixed = make_gpt(backends=Backends(decode_attention="sdpa")).h[0].attn
    monkeypatch.setattr(kernels, "measure", lambda *a, **kw: pytest.fail("a compiled step asks no table"))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert attn.one_query_kernel(1, 40, cpu) == "reduction" and attn.one_query_kernel(1, 40, gpu) == "products"
    assert fixed.one_query_kernel(1, 40, cpu) == fixed.one_query_kernel(1, 40, gpu) == "sdpa"
    if native.available():  # gpt2lab's own kernel runs on the CPU only
        own = make_gpt(backends=Backends(decode_attention="avx2")).h[0].attn
        assert own.one_query_kernel(1, 40, cpu) == "avx2" and own.one_query_kernel(1, 40, gpu) == "products"


def test_machines_sharing_a_model_name_are_told_apart(monkeypatch):
    """A virtual machine may name two CPU generations alike; their measurements must not be shared."""

    def cpuinfo(family):
        return f"processor\t: 0\ncpu family\t: {family}\nmodel\t\t: 17\nmodel name\t: AMD EPYC\nflags\t\t: fma\n"

    keys = []
    for family in (25, 26):
        monkeypatch.setattr(kernels, "_cpuinfo_text", lambda family=family: cpuinfo(family))
        keys.append(kernels.machine_key())
        assert kernels.cpu_model().startswith(f"AMD EPYC (family {family} model 17, ")
        assert kernels.cpu_flags() == {"fma"}
    assert keys[0] != keys[1]


def test_measured_once_then_remembered_and_overridable(tmp_path):
    path = tmp_path / "k.json"
    table = kernels.KernelTable(path)
    chosen = table.choose(512, 256, 3)
    assert chosen in kernels.FLOAT32_KERNELS
    [(machine, entries)] = json.loads(path.read_text()).items()
    assert machine == kernels.machine_key()
    entry = entries["float32 512x256 rows 4"]  # 3 rows fall in the bucket of 4
    assert entry["kernel"] == chosen and set(entry["us_per_product"]) == set(kernels.FLOAT32_KERNELS)
    assert table.choose(512, 256, 4) == chosen  # same bucket: nothing measured again
    assert json.loads(path.read_text())[machine] == entries
    # a hand-edited file wins over what was measured, in a new table (process)
    other = "torch" if chosen == "onednn" else "onednn"
    entries["float32 512x256 rows 4"]["kernel"] = other
    path.write_text(json.dumps({machine: entries}))
    assert kernels.KernelTable(path).choose(512, 256, 4) == other


def test_entries_of_a_kind_no_longer_measured_are_dropped(tmp_path, monkeypatch):
    """A kernel file written by an older version may hold entries of a kind no longer measured: a table
    neither reads them nor writes them back, and keeps other machines' entries as they are."""
    path = tmp_path / "k.json"
    old = {"head 1024x64 rows 1": {"kernel": "torch_t"}, "float32 64x64 rows 1": {"kernel": "torch"}}
    path.write_text(json.dumps({kernels.machine_key(): old, "another machine": old}))
    monkeypatch.setattr(kernels, "measure", lambda *args, **kwargs: {k: 1e-5 for k in kernels.candidates("float32", 2)})
    table = kernels.KernelTable(path)
    assert table.choose(64, 64, 1) == "torch" and "head 1024x64 rows 1" not in table._entries()
    table.choose(64, 64, 2)  # measured: the file is written again
    data = json.loads(path.read_text())
    assert set(data[kernels.machine_key()]) == {"float32 64x64 rows 1", "float32 64x64 rows 2"}
    assert data["another machine"] == old


def test_small_products_are_measured_on_a_bounded_number_of_copies(tmp_path, monkeypatch):
    """A small model's decode step is made of small products, where the kernels' fixed cost per call
    decides: they are measured like the others, on at most MAX_COPIES copies of the weight."""
    made = []
    runner = kernels._runner
    monkeypatch.setattr(kernels, "_runner", lambda *args: made.append(args[4]) or runner(*args))
    table = kernels.KernelTable(tmp_path / "k.json")
    chosen = table.choose(16, 32, 1)
    [entries] = json.loads((tmp_path / "k.json").read_text()).values()
    assert entries["float32 16x32 rows 1"]["kernel"] == chosen
    assert made == [kernels.MAX_COPIES] * len(kernels.FLOAT32_KERNELS)
    table.choose(768, 768, 1)  # 28 weights of 2.4 MB stream from memory, fewer than the cap
    assert made[-1] == kernels.STREAM_BYTES // (4 * 768 * 768) < kernels.MAX_COPIES


def test_unwritable_cache_keeps_the_choice_in_memory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    table = kernels.KernelTable(blocker / "k.json")  # its directory cannot be made: a file is in the way
    assert table.choose(512, 256, 1) in kernels.FLOAT32_KERNELS


def test_environment_overrides_auto_only(monkeypatch):
    monkeypatch.setenv(kernels.ENV_KERNEL, "torch")
    assert kernels.resolve("auto") == ("torch", None)
    assert kernels.resolve("onednn") == ("onednn", None)
    model = GPT(GPTConfig(vocab_size=97, block_size=16, n_layer=1, n_head=2, n_embd=32))
    assert model.lm_head.kernel == "torch" and model.h[0].mlp.c_fc.table is None
    monkeypatch.setenv(kernels.ENV_KERNEL, "fastest")
    with pytest.raises(ConfigError, match=kernels.ENV_KERNEL):  # a one-line error from the CLI
        kernels.resolve("auto")


@pytest.mark.parametrize("bad", ["10", None, -1.0, float("nan"), True], ids=["text", "null", "negative", "nan", "bool"])
def test_an_entry_with_an_unreadable_time_is_measured_again(tmp_path, monkeypatch, bad):
    """A hand edit that leaves a time that is not a number >= 0 makes the entry measured again, not a
    TypeError (or a copy made at once) in the decode step; an edit without any times is taken as it is."""
    options = ("onednn", "torch", "mkl_packed")
    monkeypatch.setattr(kernels, "candidates", lambda kind, rows: options)
    monkeypatch.setattr(
        kernels, "measure", lambda *args, **kwargs: {"onednn": 1e-4, "torch": 8e-5, "mkl_packed": 4e-5, "pack": 4e-4}
    )
    path = tmp_path / "k.json"
    edited = {
        "kernel": "mkl_packed",
        "us_per_product": {"onednn": 100.0, "torch": 80.0, "mkl_packed": 1.0, "pack": bad},
    }
    path.write_text(json.dumps({kernels.machine_key(): {"packed 768x768 rows 256": edited}}))
    assert kernels.KernelTable(path).pack_repays(768, 768, 256) == pytest.approx(10)
    path.write_text(json.dumps({kernels.machine_key(): {"packed 768x768 rows 256": {"kernel": "torch"}}}))
    assert kernels.KernelTable(path).pack_repays(768, 768, 256) == math.inf  # copies turned off by hand
    assert json.loads(path.read_text())[kernels.machine_key()]["packed 768x768 rows 256"] == {"kernel": "torch"}


def test_a_cache_path_that_is_no_regular_file_is_never_replaced(tmp_path, monkeypatch):
    """GPT2LAB_KERNEL_CACHE=/dev/null (or any non-file) keeps the choices in memory; a link to a file
    has its target written, and stays a link."""
    monkeypatch.setattr(kernels, "measure", lambda *args, **kwargs: {k: 1e-5 for k in kernels.candidates("float32", 2)})
    null = tmp_path / "null"  # through a link: a table that replaced what it names would replace the link
    null.symlink_to(os.devnull)
    assert kernels.KernelTable(null).choose(64, 64, 2) in kernels.FLOAT32_KERNELS
    assert null.is_symlink() and Path(os.devnull).is_char_device()
    target, link = tmp_path / "real.json", tmp_path / "link.json"
    target.write_text("{}")
    link.symlink_to(target)
    kernels.KernelTable(link).choose(64, 64, 2)
    assert link.is_symlink() and "float32 64x64 rows 2" in json.loads(target.read_text())[kernels.machine_key()]


def test_an_edited_entry_with_null_times_reads_as_one_without_times(tmp_path, monkeypatch):
    """``"us_per_product": null`` is an edit without times, as a missing field is: taken as it is, no
    copy repays and none is in place (not a TypeError in the decode step)."""
    monkeypatch.setattr(kernels, "measure", lambda *args, **kwargs: pytest.fail("an edited entry is not measured"))
    path = tmp_path / "k.json"
    edited = {"kernel": "torch", "us_per_product": None}
    path.write_text(json.dumps({kernels.machine_key(): {"packed 768x768 rows 256": edited}}))
    table = kernels.KernelTable(path)
    assert table.pack_repays(768, 768, 256) == math.inf and table.in_place(768, 768, 256) is None


def test_a_cache_path_that_cannot_be_resolved_keeps_the_choice_in_memory(tmp_path, monkeypatch):
    """A loop of links (or a directory this user may not enter) is a cache that cannot be read or
    written: the choice is measured and kept in memory, as for a read-only one."""
    monkeypatch.setattr(kernels, "measure", lambda *args, **kwargs: {k: 1e-5 for k in kernels.candidates("float32", 2)})
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.symlink_to(b)
    b.symlink_to(a)
    table = kernels.KernelTable(a)
    assert table.choose(64, 64, 2) in kernels.FLOAT32_KERNELS and "float32 64x64 rows 2" in table._entries()


def test_a_table_reads_the_entries_of_the_thread_count_it_runs_at(tmp_path):
    """Choices are remembered per thread count: a table that changes thread count reads that count's."""
    path = tmp_path / "k.json"
    threads = torch.get_num_threads()
    keys = {}
    for n, kernel in ((1, "onednn"), (2, "torch")):
        torch.set_num_threads(n)
        keys[kernels.machine_key()] = {
            "float32 64x64 rows 1": {"kernel": kernel},
            "float32 96x64 rows 1": {"kernel": kernel},
        }
    path.write_text(json.dumps(keys))
    table = kernels.KernelTable(path)
    try:
        torch.set_num_threads(1)
        assert table.choose(96, 64, 1) == "onednn"
        torch.set_num_threads(2)
        assert table.choose(64, 64, 1) == "torch"
    finally:
        torch.set_num_threads(threads)


def test_auto_model_matches_fixed_kernels(make_gpt, kernel_cache):
    """Every layer of an auto model shares one table; its logits equal those of the fixed kernels to float32
    rounding, with products large enough to be measured (recorded in the session's kernel file). (Without
    pack_repeated: where the table measures an MKL-packed copy repaid by one product, the first product
    of a row count reads that copy and never asks for its float32 kernel.)"""
    config = dict(vocab_size=1024, n_embd=128, n_head=4)
    auto = make_gpt(seed=3, backends=Backends(linear="auto", pack_repeated=False), **config)
    tables = {id(m.table) for m in auto.modules() if isinstance(m, ops.Linear)}
    assert len(tables) == 1 and auto.lm_head.table is not None
    idx = torch.randint(0, 1024, (2, 9))
    with torch.no_grad():
        got = auto(idx)[0]
        for kernel in ("onednn", "torch"):
            fixed = make_gpt(seed=3, backends=Backends(linear=kernel), **config)
            torch.testing.assert_close(got, fixed(idx)[0], atol=1e-5, rtol=1e-5)
    entries = json.loads(kernel_cache.read_text())[kernels.machine_key()]
    assert "float32 1024x128 rows 32" in entries  # the lm_head at 18 rows


def test_measure_is_quick_and_honest():
    times = kernels.measure(768, 768, 1, repeat=2)
    assert set(times) == set(kernels.FLOAT32_KERNELS) and all(0 < t < 1 for t in times.values())
    x, w = torch.randn(3, 64), torch.randn(80, 64)
    torch.testing.assert_close(ops.linear(x, w, kernel="onednn"), F.linear(x, w))


@pytest.mark.parametrize("chosen", ["torch", "onednn"])
def test_chunked_loss_runs_the_kernel_measured_for_its_chunk(make_gpt, remember_kernels, monkeypatch, chosen):
    """The training loss scores the lm_head a chunk of rows at a time (ops.linear_cross_entropy): the
    kernel of that product is the table's for the chunk's row count, and the loss is the same either way."""
    import gpt2lab.model

    config = dict(vocab_size=1024, n_embd=128, n_head=4)
    remember_kernels({"float32 1024x128 rows 32": {"kernel": chosen, "us_per_product": {}}})
    kernels_used = []

    def recorded(*args, kernel, **kwargs):
        kernels_used.append(kernel)
        return ops.linear_cross_entropy(*args, kernel=kernel, **kwargs)

    monkeypatch.setattr(gpt2lab.model, "linear_cross_entropy", recorded)
    model = make_gpt(seed=4, backends=Backends(linear="auto"), **config)
    idx = torch.randint(0, 1024, (2, 9))  # 18 rows: the bucket of 32
    loss = model(idx, idx)[1]
    assert kernels_used == [chosen]
    logits = make_gpt(seed=4, backends=Backends(linear="torch"), **config)(idx)[0]
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 1024), idx.view(-1)), atol=1e-5, rtol=1e-5)


def test_each_later_candidate_must_beat_the_choice_so_far(tmp_path, monkeypatch):
    """A kernel listed later replaces the choice so far only when MARGIN faster: MKL's packed layout is
    chosen for a decode step's products only where it beats both float32 kernels."""
    packed, steps = kernels.candidates("packed", 8), kernels.candidates("steps", 8)
    assert "mkl_packed" in packed or not ops.packing_available()
    assert packed[-1] == steps[-1] == "onednn_packed" or not ops.onednn_packing_available()  # gpt2lab's first
    one_row = kernels.candidates("packed", 1)  # there MKL's packed layout did not pay; a transposed one may
    assert "mkl_packed" not in one_row and {"onednn_t", "torch_t"} <= set(one_row)
    for times, expected in [
        ({"onednn": 100.0, "torch": 80.0, "mkl_packed": 79.0}, "torch"),  # packed within 3% of torch
        ({"onednn": 100.0, "torch": 80.0, "mkl_packed": 60.0}, "mkl_packed"),
        ({"onednn": 100.0, "torch": 98.0, "mkl_packed": 99.0}, "onednn"),  # neither 3% faster than oneDNN
    ]:
        monkeypatch.setattr(kernels, "candidates", lambda kind, rows, t=times: tuple(t))
        monkeypatch.setattr(kernels, "measure", lambda *args, t=times, **kwargs: t)
        assert kernels.KernelTable(tmp_path / f"{expected}.json").choose(768, 768, 8, kind="packed") == expected


@pytest.mark.skipif(not ops.packing_available(), reason="this PyTorch build has no MKL")
def test_packed_kernel_is_measured_on_the_rows_it_was_packed_for():
    times = kernels.measure(768, 768, 4, kind="packed", repeat=2)
    own = {"onednn_packed", "pack onednn_packed"} if ops.onednn_packing_available() else set()
    assert set(times) == {"onednn", "torch", "mkl_packed", "pack"} | own and all(0 < t < 1 for t in times.values())


@pytest.mark.skipif(not ops.onednn_packing_available(), reason="this PyTorch build has no oneDNN")
def test_onednn_reads_a_weight_laid_out_in_its_own_layout(make_gpt, remember_kernels):
    """``onednn_packed``: oneDNN's product (and with its GELU fused in) on the weight reordered once
    into its own layout equals the product on the weight as it is; a layer whose repeated products the
    table says that copy repays reads it (kind ``packed``, measured up to 2,048 rows), an MLP's first
    product too where its GELU is fused into oneDNN's call (kind ``gelu``), with the same logits."""
    x, w, b = torch.randn(2, 20, 64), torch.randn(96, 64) * 0.1, torch.randn(96)
    copy = ops.copy_weight(w, 40, "onednn_packed")
    torch.testing.assert_close(ops.copy_linear(x, copy, "onednn_packed", w, b), F.linear(x, w, b))
    gelu = ops.copy_linear(x, copy, "onednn_packed", w, b, gelu=True)
    torch.testing.assert_close(gelu, F.gelu(F.linear(x, w, b), approximate="tanh"), atol=1e-5, rtol=1e-5)
    assert kernels.rows_bucket(2048, "packed") == 2048 and kernels.rows_bucket(2048, "float32") == 256
    config = dict(vocab_size=256, n_embd=64, n_head=4)
    model = make_gpt(seed=3, backends=Backends(linear="auto"), **config)
    reference = make_gpt(seed=3, backends=Backends(linear="torch"), **config)
    us = {"onednn": 100.0, "torch": 200.0, "mkl_packed": 200.0, "onednn_packed": 50.0, "pack": 100.0}
    layers = [m for m in model.modules() if isinstance(m, ops.Linear)]
    entries = {
        f"packed {m.out_features}x{m.in_features} rows {rows}": {"kernel": "onednn_packed", "us_per_product": us}
        for m in layers
        for rows in (256, 512)  # 256: what 512 prunes its candidates by
    }
    fused = {"kernel": "onednn_gelu", "us_per_product": {"onednn": 100.0, "torch": 200.0, "onednn_gelu": 50.0}}
    remember_kernels(
        entries | {f"gelu {b.mlp.c_fc.out_features}x{b.mlp.c_fc.in_features} rows 256": fused for b in model.h}
    )
    idx = torch.randint(0, 256, (10, 40), generator=torch.Generator().manual_seed(0))  # 400 rows: bucket 512
    with torch.no_grad():
        expected = reference(idx)[0]
        for _ in range(3):
            torch.testing.assert_close(model(idx)[0], expected, atol=1e-4, rtol=1e-4)
    assert all(m.packed is not None and m.packed[3] == "onednn_packed" for m in layers)


@pytest.mark.skipif(not ops.packing_available(), reason="this PyTorch build has no MKL")
def test_a_fused_gelu_product_makes_no_mkl_copy(make_gpt, remember_kernels):
    """Beside oneDNN's call with the GELU fused in (kind ``gelu``) an MKL-packed copy did not pay: where
    kind ``packed`` chose that copy, repeated products of an MLP's first layer make none, and the other
    layers do."""
    config = dict(vocab_size=256, n_embd=64, n_head=4)
    model = make_gpt(seed=3, backends=Backends(linear="auto"), **config)
    us = {"onednn": 100.0, "torch": 200.0, "mkl_packed": 50.0, "onednn_packed": 100.0, "pack": 100.0}
    layers = [m for m in model.modules() if isinstance(m, ops.Linear)]
    entries = {
        f"packed {m.out_features}x{m.in_features} rows 256": {"kernel": "mkl_packed", "us_per_product": us}
        for m in layers
    }
    fused = {"kernel": "onednn_gelu", "us_per_product": {"onednn": 100.0, "torch": 200.0, "onednn_gelu": 50.0}}
    remember_kernels(
        entries | {f"gelu {b.mlp.c_fc.out_features}x{b.mlp.c_fc.in_features} rows 256": fused for b in model.h}
    )
    idx = torch.randint(0, 256, (5, 40), generator=torch.Generator().manual_seed(0))  # 200 rows: bucket 256
    with torch.no_grad():
        for _ in range(3):
            model(idx)
    firsts = {b.mlp.c_fc for b in model.h}
    assert all(m.packed is None for m in firsts)
    assert all(m.packed is not None and m.packed[3] == "mkl_packed" for m in layers if m not in firsts)


def test_a_transposed_copy_is_measured_at_one_row_with_the_time_of_making_it():
    times = kernels.measure(768, 512, 1, kind="packed", repeat=2)
    own = {kernels.pack_key(k) for k in kernels.candidates("packed", 1) if k in kernels.OWN_COPIES}
    assert set(times) == set(kernels.candidates("packed", 1)) | {"pack"} | own
    assert all(0 < t < 1 for t in times.values())
    x, w = torch.randn(1, 512), torch.randn(768, 512) * 0.05
    for kernel in ("onednn_t", "torch_t"):
        copy = ops.copy_weight(w, 1, kernel)
        assert copy.shape == w.shape and copy.stride() == (1, 768)
        torch.testing.assert_close(ops.copy_linear(x, copy, kernel, w, None), F.linear(x, w), atol=1e-5, rtol=1e-5)


def test_copies_are_timed_into_fresh_memory_as_a_model_makes_them(monkeypatch):
    """Each timed copy is kept until all are timed and freed memory is handed back before it, so no copy
    reuses pages that one before it, or an earlier measurement, touched (reused pages are several times
    cheaper on some machines than the new ones a model's copies take)."""
    made: list[weakref.ref] = []
    events: list[str] = []

    def copy(weight, rows, kernel):
        assert all(ref() is not None for ref in made), "a timed copy was freed before the others were timed"
        events.append("copy")
        out = weight.clone()
        made.append(weakref.ref(out))
        return out

    monkeypatch.setattr(ops, "copy_weight", copy)
    monkeypatch.setattr(kernels, "_release_freed_memory", lambda: events.append("release"))
    kernels._copy_times(64, 32, 1, {"pack": "onednn_t", "pack avx2_f32_blocks": "avx2_f32_blocks"}, lambda: None)
    assert events == ["release", "copy"] * 6


def test_a_wide_weights_copy_is_timed_on_a_slice_standing_for_the_whole(monkeypatch):
    shapes = []

    def copy(weight, rows, kernel):
        shapes.append(tuple(weight.shape))
        time.sleep(0.01)
        return weight.clone()

    monkeypatch.setattr(ops, "copy_weight", copy)
    monkeypatch.setattr(kernels, "MAX_OUT", 100)
    times = kernels._copy_times(1000, 32, 1, {"pack": "onednn_t"}, lambda: None)
    assert shapes == [(100, 32)] * 3
    assert 0.1 <= times["pack"] < 0.5  # ten slices' time


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_freed_memory_is_handed_back_where_the_c_library_can():
    assert kernels._malloc_trim() is not None
    kernels._release_freed_memory()


@pytest.mark.parametrize("error", [AttributeError, OSError, TypeError])
def test_a_c_library_without_malloc_trim_releases_nothing(monkeypatch, error):
    def missing(name):
        raise error(name)

    monkeypatch.setattr(kernels.ctypes, "CDLL", missing)
    kernels._malloc_trim.cache_clear()
    try:
        assert kernels._malloc_trim() is None
        kernels._release_freed_memory()
    finally:
        kernels._malloc_trim.cache_clear()


def test_a_wide_weight_is_measured_whole_at_a_few_rows(monkeypatch):
    """At a few rows the whole wide weight streams, as in a decode step (a kernel's split between threads
    sets its read rate); at many rows MAX_OUT outputs of it stand for the whole."""
    widths = []
    real = kernels._runner
    monkeypatch.setattr(kernels, "MAX_OUT", 256)
    monkeypatch.setattr(
        kernels, "_runner", lambda kind, kernel, n, *rest: widths.append(n) or real(kind, kernel, n, *rest)
    )
    kernels.measure(1000, 64, 2, repeat=1)
    kernels.measure(1000, 64, kernels.FEW_ROWS * 2, repeat=1)
    n = len(kernels.candidates("float32", 2))
    assert widths == [1000] * n + [256] * n


def test_pack_repays_weighs_the_copys_time_against_each_products_saving(tmp_path, monkeypatch):
    """A packed copy repays after (its making) / (the time each product saves against the faster float32
    kernel) products; never where the packed kernel is not chosen. A remembered entry without the copy's
    time (written before it was measured) is measured again."""
    options = ("onednn", "torch", "mkl_packed")
    monkeypatch.setattr(kernels, "candidates", lambda kind, rows: options)
    for times, repays in [
        ({"onednn": 100e-6, "torch": 80e-6, "mkl_packed": 60e-6, "pack": 200e-6}, 10),
        ({"onednn": 100e-6, "torch": 80e-6, "mkl_packed": 79e-6, "pack": 1e-6}, math.inf),  # not chosen
    ]:
        monkeypatch.setattr(kernels, "measure", lambda *args, t=times, **kwargs: t)
        assert kernels.KernelTable(tmp_path / f"{repays}.json").pack_repays(768, 768, 256) == pytest.approx(repays)
    old = tmp_path / "old.json"
    entry = {"kernel": "mkl_packed", "us_per_product": {"onednn": 100.0, "torch": 80.0, "mkl_packed": 60.0}}
    old.write_text(json.dumps({kernels.machine_key(): {"packed 768x768 rows 256": entry}}))
    measured = {"onednn": 1e-4, "torch": 8e-5, "mkl_packed": 4e-5, "pack": 4e-4}
    monkeypatch.setattr(kernels, "measure", lambda *args, **kwargs: measured)
    assert kernels.KernelTable(old).pack_repays(768, 768, 256) == pytest.approx(10)
    remembered = json.loads(old.read_text())[kernels.machine_key()]["packed 768x768 rows 256"]
    assert remembered["us_per_product"]["pack"] == 400


@pytest.mark.parametrize("chosen", ["onednn_gelu", "torch"])
def test_mlp_fuses_its_gelu_where_measured_faster(make_gpt, remember_kernels, monkeypatch, chosen):
    """Without grad an auto model's MLP runs its first product and GELU with the kernel the table (kind
    "gelu") measured the fastest for the row count: one oneDNN call with the GELU fused in only where
    that won; the logits are the same either way."""
    assert kernels.candidates("gelu", 4) == kernels.FLOAT32_KERNELS + ("onednn_gelu",)
    numpy = kernels.NUMPY_KERNELS if ops.numpy_blas_available() else ()
    assert kernels.candidates("numpy", 1) == numpy and kernels.candidates("numpy", 2) == ()  # one row only
    config = dict(vocab_size=1024, n_embd=128, n_head=4)
    remember_kernels({"gelu 512x128 rows 32": {"kernel": chosen, "us_per_product": {}}})
    fused = []
    real = ops.linear_gelu
    monkeypatch.setattr(ops, "linear_gelu", lambda *args: fused.append(args[3]) or real(*args))
    model = make_gpt(seed=5, backends=Backends(linear="auto"), **config)
    fixed = make_gpt(seed=5, backends=Backends(linear="torch"), **config)
    idx = torch.randint(0, 1024, (2, 9))  # 18 rows: the bucket of 32
    with torch.no_grad():
        got, want = model(idx)[0], fixed(idx)[0]
    assert fused == [chosen] * model.config.n_layer  # each MLP runs the kernel measured with its GELU
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    model(idx, idx)[1].backward()  # training never fuses: its backward needs the product before the GELU
    assert len(fused) == model.config.n_layer


def test_gelu_kind_times_the_product_and_its_activation():
    times = kernels.measure(512, 128, 32, kind="gelu", repeat=2)
    assert set(times) == {"onednn", "torch", "onednn_gelu"} and all(0 < t < 1 for t in times.values())


def test_the_sigmoid_form_of_the_gelu_is_gpt2s_tanh_gelu(monkeypatch):
    """tanh_gelu_'s sigmoid form, y sigmoid(2u), equals 0.5 y (1 + tanh u) to float32 rounding, for
    outputs of any leading shape, worked on a block of rows at a time; either form writes over the
    output it is given; an unknown form is an error."""
    y = torch.linspace(-12, 12, 5 * 7 * 96).view(5, 7, 96)
    want = F.gelu(y, approximate="tanh")
    monkeypatch.setattr(ops, "GELU_BLOCK", 3 * 96)  # 35 rows in blocks of 3, the last of 2
    for form in kernels.candidates("tanh_gelu", 1):  # "avx2" where gpt2lab.native runs
        out = y.clone()
        assert ops.tanh_gelu_(out, form) is out
        torch.testing.assert_close(out, want)
    with pytest.raises(ValueError, match="GELU form"):
        ops.tanh_gelu_(y, "erf")


def test_the_sigmoid_form_works_in_memory_kept_per_thread():
    """The sigmoid form's working block is the same memory on every call from one thread (a fresh one of
    megabytes costs its page faults again each time), grows when a call needs more, and is another
    thread's own in another thread."""
    y = torch.linspace(-4, 4, 64 * 96).view(64, 96)
    first = ops.gelu_scratch(64 * 96, y).fill_(math.nan)
    ops.tanh_gelu_(y.clone(), "sigmoid")
    assert first.isfinite().all()  # the form worked in this very memory
    assert ops.gelu_scratch(64 * 96, y).data_ptr() == first.data_ptr()
    assert ops.gelu_scratch(10, y).data_ptr() == first.data_ptr()
    assert ops.gelu_scratch(64 * 96 + 1, y).numel() == 64 * 96 + 1
    assert ops.gelu_scratch(10, y.double()).dtype == torch.float64
    other = []
    thread = threading.Thread(target=lambda: other.append(ops.gelu_scratch(64 * 96, y).data_ptr()))
    thread.start()
    thread.join()
    assert other[0] != ops.gelu_scratch(64 * 96, y).data_ptr()


def test_the_gelu_kinds_product_is_timed_with_the_gelu_form_measured_faster(tmp_path, monkeypatch):
    """Kind tanh_gelu times each form of the GELU over an output of the product's shape (with no cache
    eviction: its input was just made); kind gelu then times the unfused kernels with the faster form."""
    times = kernels.measure(512, 128, 32, kind="tanh_gelu", repeat=2)
    assert set(times) == set(kernels.candidates("tanh_gelu", 32)) and all(0 < t < 1 for t in times.values())
    assert kernels.evicted_before(1, "tanh_gelu") == 0
    forms = {}

    def measured(
        out, inp, rows, kind="float32", repeat=5, evict_bytes=None, gelu_form="tanh", options=None, steps=None
    ):
        forms[kind] = gelu_form
        return {k: 1e-4 if k == "sigmoid" else 2e-4 for k in kernels.candidates(kind, rows)}

    monkeypatch.setattr(kernels, "measure", measured)
    table = kernels.KernelTable(tmp_path / "kernels.json")
    assert table.choose(512, 128, 32, kind="gelu") == kernels.fallback("gelu", 32)
    assert forms == {"tanh_gelu": "tanh", "gelu": "sigmoid"}
    assert table.choose(512, 128, 32, kind="tanh_gelu") == "sigmoid"


@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
def test_mlps_apply_their_gelu_in_the_form_measured_faster(make_gpt, remember_kernels, monkeypatch, int8):
    """Without grad an auto model's MLPs, float32 or int8, apply a GELU on its own in the form the table
    (kind tanh_gelu) measured the faster for the output; the logits are the same either way."""
    config = dict(vocab_size=1024, n_embd=128, n_head=4)
    remember_kernels(
        {
            "gelu 512x128 rows 32": {"kernel": "torch", "us_per_product": {}},
            "tanh_gelu 512x128 rows 32": {"kernel": "sigmoid", "us_per_product": {}},
        }
    )
    forms = []
    real = ops.tanh_gelu_
    monkeypatch.setattr(ops, "tanh_gelu_", lambda y, form="tanh": forms.append(form) or real(y, form))
    model = make_gpt(seed=5, backends=Backends(linear="auto"), **config)
    model = quantize_int8(model) if int8 else model
    idx = torch.randint(0, 1024, (2, 9))  # 18 rows: the bucket of 32
    with torch.no_grad():
        got = model(idx)[0]
        assert forms == ["sigmoid"] * model.config.n_layer
        monkeypatch.setattr(ops, "tanh_gelu_", lambda y, form="tanh": real(y, "tanh"))
        want = model(idx)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_measurement_holds_for_one_wait_policy_and_library_instruction_cap(monkeypatch):
    """Choices measured with OpenMP's threads spinning, or with MKL and oneDNN free to use every instruction,
    are not reused where they sleep or are held to fewer (ATEN_CPU_CAPABILITY shows in the CPU model)."""
    for name in ("OMP_WAIT_POLICY", *kernels.LIBRARY_ISA_CAPS):
        monkeypatch.delenv(name, raising=False)
    keys = {kernels.machine_key()}
    for name, value in (
        ("OMP_WAIT_POLICY", "PASSIVE"),
        ("MKL_ENABLE_INSTRUCTIONS", "AVX2"),
        ("ONEDNN_MAX_CPU_ISA", "AVX2"),
    ):
        monkeypatch.setenv(name, value)
        keys.add(kernels.machine_key())
    assert len(keys) == 4
    assert kernels.machine_key().endswith("MKL_ENABLE_INSTRUCTIONS=AVX2 | ONEDNN_MAX_CPU_ISA=AVX2")


AVX2_ONLY = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "OPENBLAS_CORETYPE": "Haswell",
}
PARITY_TESTS = ["tests/test_hf.py", "tests/test_ops.py", "tests/test_quantize.py", "tests/test_generate.py"]


def test_the_parity_tests_pass_with_avx2_kernels_only():
    """Every x86 CPU gpt2lab runs on has AVX2; not every one has AVX-512, VNNI or AMX. With torch, oneDNN
    and MKL held to AVX2, as on such a CPU, the parity tests (transformers' logits, the float32 and int8
    kernels, KV-cache decoding) pass too, with kernel choices measured for that CPU."""
    root = Path(__file__).parents[1]
    env = {**os.environ, **AVX2_ONLY}
    env.pop(kernels.ENV_CACHE, None)  # the inner session keeps a kernel file of its own
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", *PARITY_TESTS]
    run = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout.splitlines()[-1]


def test_the_last_level_cache_is_read_from_sysfs(tmp_path, monkeypatch):
    for index, size in enumerate(["48K", "64K", "2048K", "491520K"]):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    (tmp_path / "index4").mkdir()  # an entry without a size is passed over
    monkeypatch.setattr(kernels, "CPU_CACHES", tmp_path)
    assert kernels.last_level_cache() == 491520 * 2**10
    monkeypatch.setattr(kernels, "available_memory", lambda: 2**40)
    assert kernels.eviction_bytes() == int(kernels.EVICT_FACTOR * 491520 * 2**10)
    monkeypatch.setattr(kernels, "available_memory", lambda: 2**30)
    assert kernels.eviction_bytes() == 2**30 // 8  # never more than an eighth of the memory available
    monkeypatch.setattr(kernels, "CPU_CACHES", tmp_path / "absent")
    assert kernels.last_level_cache() is None and kernels.eviction_bytes() == 0


def test_alternated_runs_before_untimed_ahead_of_every_timed_call():
    calls = []

    def before():
        calls.append("before")
        time.sleep(0.05)

    times = kernels.alternated({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 2, before=before)
    assert calls == ["a", "b"] + ["before", "a", "before", "b"] * 2  # the warm-up calls come first, bare
    assert all(t < 0.05 for ts in times.values() for t in ts)


def test_few_row_products_are_timed_with_the_cache_evicted_before_each_call(monkeypatch):
    """A decode step's weights, read once per step, outgrow the last-level cache; a kernel timed on
    weights it read in its last call would be timed partly from a cache (a Xeon's 480 MB L3 held most of
    a kernel's 64 MB), so every timed product of few rows follows a read of more than the cache holds."""
    reads = []
    monkeypatch.setattr(kernels, "eviction_bytes", lambda: 3 * 2**20)
    real = kernels._evictor
    monkeypatch.setattr(kernels, "_evictor", lambda n: reads.append(n) or real(n))
    counted = []
    monkeypatch.setattr(
        kernels, "alternated", lambda fns, rounds, **kw: counted.append(kw["before"]) or {k: [1.0] for k in fns}
    )
    kernels.measure(256, 64, 1, repeat=2)
    kernels.measure(256, 64, kernels.FEW_ROWS * 2, repeat=2)
    assert reads == [3 * 2**20, 0]
    evict, none = counted
    assert evict.__self__.numel() * 4 == 3 * 2**20  # reads a buffer of that size
    assert none() is None


def test_an_entry_of_few_rows_measured_without_the_eviction_is_measured_again(tmp_path, monkeypatch):
    options = ("onednn", "torch")
    monkeypatch.setattr(kernels, "candidates", lambda kind, rows: options)
    told = []  # the bytes each measurement was told to read between its timed calls
    monkeypatch.setattr(
        kernels,
        "measure",
        lambda *args, **kwargs: told.append(kwargs["evict_bytes"]) or {"onednn": 2e-4, "torch": 1e-4},
    )
    monkeypatch.setattr(kernels, "eviction_bytes", lambda: 7 * 2**20)
    path = tmp_path / "k.json"
    old = {"kernel": "onednn", "us_per_product": {"onednn": 100.0, "torch": 200.0}}
    many = dict(old)
    path.write_text(
        json.dumps({kernels.machine_key(): {"float32 768x768 rows 1": old, "float32 768x768 rows 256": many}})
    )
    table = kernels.KernelTable(path)
    assert table.choose(768, 768, 1) == "torch" and table.choose(768, 768, 256) == "onednn"
    saved = json.loads(path.read_text())[kernels.machine_key()]
    assert saved["float32 768x768 rows 1"]["evicted_mb"] == 7 and "evicted_mb" not in saved["float32 768x768 rows 256"]
    assert kernels.KernelTable(path).choose(768, 768, 1) == "torch"  # now complete: read, not measured
    assert told == [7 * 2**20]  # the entry records what the measurement read
