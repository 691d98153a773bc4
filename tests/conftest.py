"""Shared fixtures: HF reference checkpoints (built once per session) and tiny gpt2lab models."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from gpt2lab import GPT, Backends, GPTConfig, kernels, native
from gpt2lab.load import save_pretrained


@pytest.fixture(scope="session", autouse=True)
def kernel_cache(tmp_path_factory):
    """The file of measured linear kernels (Backends(linear="auto")) lives in a temporary directory
    during the tests, through its documented environment variable: tests never write the user's cache."""
    previous = os.environ.get(kernels.ENV_CACHE)
    path = tmp_path_factory.mktemp("kernels") / "linear-kernels.json"
    os.environ[kernels.ENV_CACHE] = str(path)
    yield path
    if previous is None:
        del os.environ[kernels.ENV_CACHE]
    else:
        os.environ[kernels.ENV_CACHE] = previous


@pytest.fixture
def remember_kernels(kernel_cache):
    """Write entries ({name: entry}) into the session's kernel file for this machine, as if measured, so
    a test pins the kernel choices it relies on."""

    def remember(entries: dict[str, dict]) -> None:
        for name, entry in entries.items():  # written as a measurement writes them (evicted_mb: few rows)
            entry.setdefault("evicted_mb", 0)
            kind = name.split(" ", 1)[0]
            us = entry.get("us_per_product", {})
            if "pack" in us:  # a copy with a time of its own (kernels.OWN_COPIES) costs the same as the others
                entry["us_per_product"] = {kernels.pack_key(k): us["pack"] for k in us} | us
            if kind in kernels.REVISIONS:
                entry.setdefault("revision", kernels.REVISIONS[kind])
            if any(k in kernels.NATIVE_KERNELS for k in us):  # timed on the kernels as built now
                entry.setdefault("native", native.source_digest())
        data = json.loads(kernel_cache.read_text()) if kernel_cache.exists() else {}
        data.setdefault(kernels.machine_key(), {}).update(entries)
        kernel_cache.write_text(json.dumps(data))

    return remember


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Overwrite every parameter with N(0, std) (LayerNorm weights with 1 + N(0, std)), so that biases and
    LayerNorm parameters are non-trivial: a loader that dropped or swapped any of them changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, std, generator=g)
            if re.search(r"ln(_\d|_f)\.weight$", name):
                p.add_(1.0)


def old_style_state_dict(hf_model, mask_dtype: torch.dtype = torch.uint8) -> dict[str, torch.Tensor]:
    """An original-OpenAI-style GPT-2 state dict from an HF model: no ``transformer.`` prefix, no
    lm_head, and the ``attn.bias`` (causal mask) / ``attn.masked_bias`` buffers of old files."""
    n = hf_model.config.n_positions
    sd = {}
    for key, tensor in hf_model.state_dict().items():
        if key.startswith("lm_head."):
            continue
        sd[key.removeprefix("transformer.")] = tensor
    for layer in range(hf_model.config.n_layer):
        sd[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=mask_dtype)).view(1, 1, n, n)
        sd[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    return sd


@dataclass
class HFCheckpoint:
    """A transformers GPT2LMHeadModel and the same weights as an HF safetensors dir and an old .bin dir."""

    model: torch.nn.Module
    safetensors_dir: Path
    bin_dir: Path


def _hf_checkpoint(root: Path, config_kwargs: dict, seed: int, std: float, mask_dtype: torch.dtype) -> HFCheckpoint:
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):  # skip HF's weight init (seconds for 124M): every tensor is drawn below
        model = GPT2LMHeadModel(GPT2Config(**config_kwargs))
    model = model.to_empty(device="cpu").eval()
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    randomize_(model, seed, std=std)
    st_dir, bin_dir = root / "safetensors", root / "bin"
    model.save_pretrained(st_dir)
    assert (st_dir / "model.safetensors").is_file()
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((st_dir / "config.json").read_text())
    torch.save(old_style_state_dict(model, mask_dtype), bin_dir / "pytorch_model.bin")
    return HFCheckpoint(model, st_dir, bin_dir)


@pytest.fixture(scope="session")
def hf_124m(tmp_path_factory) -> HFCheckpoint:
    """Random-weight GPT-2 124M (GPT2Config() defaults; std 0.02 like GPT-2's init, biases included)."""
    return _hf_checkpoint(tmp_path_factory.mktemp("hf124m"), {}, seed=124, std=0.02, mask_dtype=torch.uint8)


SMALL_HF = dict(n_layer=3, n_head=4, n_embd=64, n_positions=96, vocab_size=500, bos_token_id=None, eos_token_id=None)


@pytest.fixture(scope="session")
def hf_small(tmp_path_factory) -> HFCheckpoint:
    """A small non-default GPT-2 (3 layers, 4 heads, 64 wide, 96 positions, 500 tokens, no bos/eos id),
    all weights random."""
    return _hf_checkpoint(tmp_path_factory.mktemp("hfsmall"), SMALL_HF, seed=3, std=0.2, mask_dtype=torch.bool)


@pytest.fixture(scope="session")
def make_gpt():
    """Factory: a tiny eval-mode GPT with fully random weights (biases and LayerNorms included)."""

    def make(seed: int = 0, std: float = 0.2, backends: Backends | None = None, **overrides) -> GPT:
        kwargs = dict(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=32) | overrides
        torch.manual_seed(seed)
        model = GPT(GPTConfig(**kwargs), backends).eval()
        randomize_(model, seed, std=std)
        return model

    return make


@pytest.fixture(scope="session")
def prefer_tokens():
    """Factory: make a model predict the given ids, tied, whatever its input: ln_f's weight zeroed makes every
    final hidden state its bias, and each id's row of the tied head is set to point along it."""

    def prefer(model: GPT, *ids: int) -> GPT:
        with torch.no_grad():
            model.ln_f.weight.zero_()
            for i in ids:
                model.wte.weight[i] = model.ln_f.bias * 10
        return model

    return prefer


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, make_gpt) -> Path:
    """A tiny plain GPT-2 (full 50257 vocabulary, 32 positions) saved with save_pretrained."""
    directory = tmp_path_factory.mktemp("tiny") / "model"
    save_pretrained(make_gpt(seed=7, vocab_size=50257, block_size=32, n_layer=2, n_head=2, n_embd=32), directory)
    return directory


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one intra-op thread: these tests are tiny ops, and on a shared 2-core machine
    a second spinning OpenMP thread makes them many times slower. The previous setting is restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def always_compiled(monkeypatch):
    """Compiled CPU steps decode every step, not timed against the eager step (which could be kept)."""
    from gpt2lab import decode

    monkeypatch.setattr(decode, "TIME_COMPILED_STEPS", False)
