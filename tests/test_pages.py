"""Weights in 2 MiB pages for CPU decoding (gpt2lab.pages, Backends.huge_pages): the copies hold the
same values where the pages were asked for, generation moves the weights there once and gives the
same tokens, and the model trains and saves as before."""

from __future__ import annotations

import gc
import itertools
import sys

import pytest
import torch

import gpt2lab.model
from gpt2lab import Backends, decode, generate, kernels, native, ops, pages, stream
from gpt2lab.load import load_model, save_pretrained
from gpt2lab.quantize import Int8Linear, quantize_int8

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="2 MiB pages are asked for on Linux")
MiB = 2**20
needs_kernel = pytest.mark.skipif(not native.available(), reason=f"avx2 kernel: {native.unavailable_reason()}")


def vma_flags(address: int) -> dict[str, str]:
    """The fields /proc/self/smaps gives for the mapping (VMA) that holds ``address``."""
    fields, inside = {}, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:  # a mapping's first line: start-end perms ...
                start, end = (int(a, 16) for a in head.split("-"))
                if inside:
                    break
                inside = start <= address < end
            elif inside:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
    return fields


def test_copies_hold_the_same_values_from_the_start_of_a_2mib_page_each_on_a_cache_line():
    tensors = [torch.randn(3, 5), torch.randint(-128, 127, (1001,), dtype=torch.int8), torch.randn(700, 1024)]
    with torch.inference_mode():  # as a generation may run: the copies are ordinary tensors all the same
        copies = pages.huge_copies(tensors)
    assert copies[0].data_ptr() % pages.HUGE_PAGE == 0
    for t, c in zip(tensors, copies, strict=True):
        assert c.dtype == t.dtype and c.shape == t.shape and c.is_contiguous() and torch.equal(c, t)
        assert c.data_ptr() % pages.ALIGN == 0 and not c.is_inference()
        assert pages.in_huge_pages(c) and pages.in_huge_pages(c[1:]) and not pages.in_huge_pages(t)
    gaps = [b.data_ptr() - (a.data_ptr() + a.nbytes) for a, b in itertools.pairwise(copies)]
    assert min(gaps) >= 0  # one after another, none overlapping
    assert copies[0].untyped_storage().nbytes() == pages.nbytes(tensors) == 64 + 1024 + 700 * 1024 * 4


def test_the_mapping_lives_as_long_as_a_view_of_a_copy():
    t = torch.arange(3 * MiB // 4, dtype=torch.float32)
    view = pages.huge_copies([torch.zeros(4), t])[1][-5:]
    address = view.untyped_storage().data_ptr()
    gc.collect()
    assert torch.equal(view, t[-5:]) and pages.in_huge_pages(view)
    del view
    gc.collect()
    assert address not in pages._mappings


@pytest.mark.skipif(not pages.wanted(), reason="transparent huge pages are not in madvise mode here")
def test_only_the_whole_2mib_pages_the_copies_fill_are_advised():
    """The pages the copies fill wholly may be 2 MiB pages (THPeligible); the last part-filled one stays
    in 4 KiB pages, so a copy takes no more memory than the tensor."""
    (copy,) = pages.huge_copies([torch.ones(5 * MiB // 2, dtype=torch.uint8)])
    start = copy.data_ptr()
    whole, tail = vma_flags(start), vma_flags(start + 2 * MiB + 1)
    if "THPeligible" not in whole:
        pytest.skip("this kernel's smaps does not say which mappings may have huge pages")
    assert whole["THPeligible"] == "1" and tail["THPeligible"] == "0"


@pytest.mark.parametrize(
    ("mode", "wanted"),
    [
        ("always [madvise] never", True),
        ("[always] madvise never", False),
        ("always madvise [never]", False),
        (None, False),
    ],
)
def test_2mib_pages_are_wanted_where_linux_gives_them_on_request_only(monkeypatch, tmp_path, mode, wanted):
    """In mode ``always`` torch's own memory has them already; in ``never`` nothing does."""
    path = tmp_path / "enabled"
    if mode is not None:
        path.write_text(mode + "\n")
    monkeypatch.setattr(pages, "THP_MODE", path)
    pages.wanted.cache_clear()
    try:
        assert pages.wanted() is wanted
    finally:
        pages.wanted.cache_clear()


def test_only_plain_tensors_move():
    """A weight of another tensor type (a DTensor's shard under FSDP) stays where it is."""

    class Other(torch.Tensor):
        pass

    plain, other = (torch.nn.Parameter(t) for t in (torch.ones(MiB), torch.ones(MiB).as_subclass(Other)))
    gpt2lab.model._weights_to_huge_pages([plain, other])
    assert pages.in_huge_pages(plain) and not pages.in_huge_pages(other) and type(other.data) is Other


def test_huge_pages_is_a_switch():
    with pytest.raises(ValueError, match="huge_pages must be True or False"):
        Backends(huge_pages="yes")


# Weights of 2 MiB or more: the MLP's (384 x 1536 x 4 bytes) and the tied embedding (2048 x 384 x 4).
CONFIG = dict(vocab_size=2048, n_embd=384, n_head=6, n_layer=2, block_size=64)


@pytest.mark.parametrize("huge_pages", [True, False])
def test_generation_moves_the_weights_of_2mib_or_more_once_and_keeps_the_tokens(
    make_gpt, monkeypatch, tmp_path, huge_pages
):
    """The Parameters stay the same objects (the tied head and embedding one), only their memory moves;
    the tokens are those of a model that keeps them where they were; it trains and saves as before."""
    monkeypatch.setattr(pages, "wanted", lambda: True)
    fixed = dict(linear="torch", decode_attention="products")  # no kernels measured
    model = make_gpt(seed=3, backends=Backends(huge_pages=huge_pages, **fixed), **CONFIG)
    reference = make_gpt(seed=3, backends=Backends(huge_pages=False, **fixed), **CONFIG)
    before = {name: p for name, p in model.named_parameters()}
    with torch.inference_mode():
        tokens = generate(model, [[5, 17, 3]], 6, temperature=0, eos_id=None)
    assert tokens == generate(reference, [[5, 17, 3]], 6, temperature=0, eos_id=None)
    assert dict(model.named_parameters()) == before and model.lm_head.weight is model.wte.weight
    moved = {name for name, p in model.named_parameters() if pages.in_huge_pages(p)}
    big = {name for name, p in model.named_parameters() if p.dim() == 2 and p.nbytes >= 2 * MiB}
    assert moved == (big if huge_pages else set()) and "wte.weight" in big
    ptrs = {name: p.data_ptr() for name, p in model.named_parameters()}
    generate(model, [[5, 17, 3]], 6, temperature=0, eos_id=None)
    assert ptrs == {name: p.data_ptr() for name, p in model.named_parameters()}  # moved once

    save_pretrained(model, tmp_path / "moved")
    save_pretrained(reference, tmp_path / "plain")
    files = [tmp_path / d / "model.safetensors" for d in ("moved", "plain")]
    assert files[0].stat().st_size == files[1].stat().st_size
    saved, held = load_model(tmp_path / "moved").state_dict(), model.state_dict()
    assert saved.keys() == held.keys() and all(torch.equal(saved[k], held[k]) for k in held)

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, CONFIG["vocab_size"], (2, 8))
    _, loss = model(x, targets=x)
    loss.backward()
    optimizer.step()
    assert all(pages.in_huge_pages(p) for name, p in model.named_parameters() if name in moved)
    assert not torch.equal(model.wte.weight, reference.wte.weight)  # trained in place, where it lies


def test_a_compiled_step_freezes_the_weights_where_eager_steps_read_them(make_gpt, monkeypatch):
    """Setting up a compiled CPU step moves the weights into 2 MiB pages first, as an eager call would:
    an eager call after it moves nothing, so the weights the step froze stay where it froze them and
    its compiled code is not dropped (``gpt2lab.decode.compiled_decode``)."""
    monkeypatch.setattr(pages, "wanted", lambda: True)
    model = make_gpt(seed=3, backends=Backends(linear="torch", decode_attention="products"), **CONFIG)
    dropped = []
    monkeypatch.setattr(decode, "_drop_compiled_steps", lambda: dropped.append(1))
    with torch.no_grad():
        model.setup_cache(1, 8, keep=True)
        decode.compiled_decode(model)
        frozen = decode.frozen_weights_key(model)
        assert pages.in_huge_pages(model.wte.weight)
        model.pack_for_decoding(1, 100)  # an eager call's set-up
        assert decode.frozen_weights_key(model) == frozen
        decode.compiled_decode(model)
    assert dropped == []


@needs_kernel
@pytest.mark.parametrize("huge_pages", [True, False])
def test_int8_decoding_reads_its_blocks_from_one_mapping_and_keeps_the_tokens(
    make_gpt, remember_kernels, monkeypatch, huge_pages
):
    """The blocks gpt2lab's int8 kernel reads (no module's state) all move into one mapping of 2 MiB
    pages, in the step's order, and stay there for the next generations."""
    monkeypatch.setattr(pages, "wanted", lambda: True)
    model = quantize_int8(
        make_gpt(seed=4, backends=Backends(huge_pages=huge_pages, decode_attention="products"), **CONFIG)
    )
    reference = quantize_int8(
        make_gpt(seed=4, backends=Backends(huge_pages=False, decode_attention="products"), **CONFIG)
    )
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    prompt = [[5, 17, 3]]
    for o, i in {(m.out_features, m.in_features) for m in layers}:  # no kernels measured: the steps' avx2
        for rows, kernel in ((1, "avx2"), (len(prompt[0]), ops.int8_kernels()[0])):
            us = {k: 100.0 for k in ops.int8_kernels(rows)} | {kernel: 90.0}
            entry = {"kernel": kernel, "us_per_product": us}
            remember_kernels({f"int8 {o}x{i} rows {kernels.rows_bucket(rows, 'int8')}": entry})
            form = {"kernel": ops.GELU_FORMS[0], "us_per_product": dict.fromkeys(ops.GELU_FORMS, 1.0)}
            remember_kernels({f"tanh_gelu {o}x{i} rows {kernels.rows_bucket(rows, 'tanh_gelu')}": form})
    tokens = generate(model, prompt, 6, temperature=0, eos_id=None)
    assert tokens == generate(reference, prompt, 6, temperature=0, eos_id=None)
    blocks = [m._packed["avx2"][0] for m in layers]
    storages = {b.untyped_storage().data_ptr() for b in blocks}
    if huge_pages:
        assert len(storages) == 1 and all(pages.in_huge_pages(b) for b in blocks)
        assert [b.data_ptr() for b in blocks] == sorted(b.data_ptr() for b in blocks)
    else:
        assert not any(pages.in_huge_pages(b) for b in blocks)
    assert generate(model, prompt, 6, temperature=0, eos_id=None) == tokens
    assert [m._packed["avx2"][0].data_ptr() for m in layers] == [b.data_ptr() for b in blocks]


@needs_kernel
@pytest.mark.parametrize("kernel", ["avx2_f32_blocks", "torch_t"])
def test_the_copies_decoding_reads_lie_in_2mib_pages_while_it_reads_them(
    make_gpt, remember_kernels, monkeypatch, kernel
):
    """A copy of a weight made for the decode steps (gpt2lab's blocked layout, a transposed copy) moves
    into 2 MiB pages as it is made, where it fills one: the layers read it there, the same tokens."""
    monkeypatch.setattr(pages, "wanted", lambda: True)
    model = make_gpt(seed=3, backends=Backends(pack_min_steps=2, decode_attention="products"), **CONFIG)
    linears = [m for m in model.modules() if isinstance(m, ops.Linear)]
    for o, i in {(m.out_features, m.in_features) for m in linears}:
        us = dict.fromkeys(kernels.candidates("packed", 1), 100.0) | {kernel: 10.0, "pack": 20.0}
        remember_kernels({f"packed {o}x{i} rows 1": {"kernel": kernel, "us_per_product": us}})
        numpy_us = dict.fromkeys(kernels.candidates("numpy", 1), 500.0) | {"pack": 300.0}
        remember_kernels({f"numpy {o}x{i} rows 1": {"kernel": "numpy", "us_per_product": numpy_us}})
    reference = make_gpt(seed=3, backends=Backends(linear="torch", huge_pages=False), **CONFIG)
    want = generate(reference, [[5, 17, 3]], 6, temperature=0, eos_id=None)
    tokens, held = [], []
    for token in stream(model, [[5, 17, 3]], 6, temperature=0, eos_id=None):
        tokens.append(token.item())
        held.append([m.packed and (m.packed[3], m.packed[2]) for m in linears])
    assert tokens == want[0]
    copies = held[1]  # while the steps read them: each layer's, by the kernel asked for
    assert None not in copies and {k for k, _ in copies} == {kernel}
    assert [c.is_contiguous() for _, c in copies] == [kernel == "avx2_f32_blocks"] * len(copies)
    huge = [c.nbytes >= 2 * MiB for _, c in copies]
    assert [pages.in_huge_pages(c) for _, c in copies] == huge and any(huge) and not all(huge)
