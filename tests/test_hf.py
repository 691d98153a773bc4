"""HF GPT-2 checkpoint I/O: logits parity with transformers, old-style .bin files, and round trips."""

from __future__ import annotations

import json

import pytest
import torch

from gpt2lab import GPT, GPTConfig
from gpt2lab.load import load_model, save_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-4  # fp32 parity with transformers' GPT2LMHeadModel (max abs logit difference)


def _tokens(vocab_size: int, T: int, seed: int = 0, B: int = 2) -> torch.Tensor:
    return torch.randint(0, vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def _hf_logits(hf_model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(idx).logits


def _logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)[0]


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("which", ["hf_124m", "hf_small"])
def test_logits_match_transformers(which, fmt, request):
    """GPT.from_pretrained of an HF safetensors dir, or of an old-style .bin (no prefix, mask buffers),
    gives transformers' logits to 1e-4 (124M defaults, and a small non-default config at full context)."""
    ckpt = request.getfixturevalue(which)
    cfg = ckpt.model.config
    model = load_model(ckpt.safetensors_dir if fmt == "safetensors" else ckpt.bin_dir).eval()
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == (cfg.n_layer, cfg.n_head, cfg.n_embd)
    assert (model.config.block_size, model.config.vocab_size) == (cfg.n_positions, cfg.vocab_size)
    assert all(p.is_contiguous() for p in model.parameters())  # Conv1D weights transposed into (out, in) copies
    T = 24 if which == "hf_124m" else cfg.n_positions
    idx = _tokens(cfg.vocab_size, T)
    ref = _hf_logits(ckpt.model, idx)
    ours = _logits(model, idx)
    assert ours.shape == ref.shape
    assert ref.std() > 0.1, "reference logits are nearly constant; the comparison would prove little"
    assert (ours - ref).abs().max().item() <= ATOL


@pytest.mark.parametrize("which", [pytest.param("hf_124m", marks=pytest.mark.slow), "hf_small"])
def test_save_pretrained_round_trips_through_transformers(which, request, tmp_path):
    """Our save_pretrained writes a dir that transformers loads with the exact original weights (so identical
    logits), and that our from_pretrained reloads bit for bit."""
    from transformers import GPT2LMHeadModel

    ckpt = request.getfixturevalue(which)
    model = load_model(ckpt.safetensors_dir).eval()
    save_pretrained(model, tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ref_sd, got_sd = ckpt.model.state_dict(), hf.state_dict()
    assert set(got_sd) == set(ref_sd)
    for key, tensor in ref_sd.items():
        assert torch.equal(got_sd[key], tensor), key
    idx = _tokens(ckpt.model.config.vocab_size, 16, seed=1)
    assert torch.equal(_hf_logits(hf, idx), _hf_logits(ckpt.model, idx))
    reloaded = load_model(tmp_path).eval()
    assert torch.equal(_logits(reloaded, idx), _logits(model, idx))


@pytest.mark.parametrize("which", [pytest.param("hf_124m", marks=pytest.mark.slow), "hf_small"])
def test_loss_and_gradients_match_transformers(which, request):
    """The training loss (given targets, with ignored positions) and every weight's gradient equal
    transformers' loss and gradients for the same labels (Conv1D gradients transposed)."""
    import copy

    from gpt2lab.hf import CONV1D

    ckpt = request.getfixturevalue(which)
    hf = copy.deepcopy(ckpt.model).train()
    for module in hf.modules():  # dropout off in both: same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model = load_model(ckpt.safetensors_dir).train()
    idx = _tokens(ckpt.model.config.vocab_size, 33, seed=2)
    labels = idx.clone()
    labels[0, 5:9] = -100
    hf_loss = hf(input_ids=idx, labels=labels).loss  # transformers shifts the labels itself
    logits, loss = model(idx[:, :-1], labels[:, 1:])
    assert logits is None
    torch.testing.assert_close(loss, hf_loss, rtol=1e-5, atol=1e-5)
    hf_loss.backward()
    loss.backward()
    hf_grads = {n.removeprefix("transformer."): p.grad for n, p in hf.named_parameters()}
    for name, p in model.named_parameters():
        want = hf_grads[name]
        want = want.t() if CONV1D.match(name) else want
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


VARIANTS = {
    "rope": dict(pos_emb="rope", rope_theta=500.0),
    "gqa": dict(n_kv_head=2),
    "mqa_rope": dict(n_kv_head=1, pos_emb="rope"),
    "window": dict(window=3, window_pattern="LG"),
    "all": dict(pos_emb="rope", n_kv_head=2, window=5, window_pattern="LLG", n_layer=3),
    "padded_vocab_gqa": dict(padded_vocab_size=128, n_kv_head=2),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_round_trip_is_exact(variant, make_gpt, tmp_path):
    """A variant model survives save_pretrained -> from_pretrained with its config and bitwise-equal logits."""
    model = make_gpt(seed=11, **VARIANTS[variant])
    save_pretrained(model, tmp_path)
    reloaded = load_model(tmp_path).eval()
    assert reloaded.config == model.config
    idx = _tokens(model.config.vocab_size, 20, seed=2)
    assert torch.equal(_logits(reloaded, idx), _logits(model, idx))


def test_padded_plain_gpt2_saves_as_transformers_gpt2(make_gpt, tmp_path):
    """A plain GPT-2 trained with a padded vocabulary exports the real 97 rows (loadable by transformers) bit
    for bit, and keeps its logits: to float32 rounding, since a 97-row lm_head product may sum in another
    order than a 128-row one (it does with AVX2 kernels)."""
    from transformers import GPT2LMHeadModel

    model = make_gpt(seed=5, padded_vocab_size=128)
    save_pretrained(model, tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert hf.transformer.wte.weight.shape == (97, 32)
    reloaded = load_model(tmp_path).eval()
    assert torch.equal(reloaded.wte.weight, model.wte.weight[:97])
    tied = ("wte.weight", "lm_head.weight")
    assert all(torch.equal(p, model.state_dict()[k]) for k, p in reloaded.state_dict().items() if k not in tied)
    idx = _tokens(97, 12, seed=4)
    torch.testing.assert_close(_logits(reloaded, idx), _logits(model, idx), rtol=0, atol=1e-5)
    assert (_hf_logits(hf, idx) - _logits(model, idx)).abs().max().item() <= ATOL


def test_an_export_saved_again_by_transformers_loads_with_its_changes(make_gpt, tmp_path):
    """transformers keeps our config block when it saves a model again but changes only its own fields:
    a vocabulary resized there (tokens added for a fine-tune) loads with its new size, HF's logits."""
    from transformers import GPT2LMHeadModel

    save_pretrained(make_gpt(seed=5, dropout=0.1), tmp_path / "ours")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "ours")
    hf.resize_token_embeddings(105)
    hf.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["gpt2lab"]["vocab_size"] == 97  # stale
    reloaded = load_model(tmp_path / "again").eval()
    assert (reloaded.config.vocab_size, reloaded.config.dropout) == (105, 0.1)
    idx = _tokens(105, 12, seed=4)
    assert (_hf_logits(hf.eval(), idx) - _logits(reloaded, idx)).abs().max().item() <= ATOL


def test_variant_config_is_not_labelled_gpt2(make_gpt, tmp_path):
    """A variant dir does not claim to be a plain GPT-2 (transformers would load it with wrong semantics)."""
    save_pretrained(make_gpt(n_kv_head=2), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] != "gpt2"
    assert GPTConfig.from_dict(cfg["gpt2lab"]).n_kv_head == 2
