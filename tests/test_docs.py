"""docs/architecture.md: its cost tables are what the code computes now, and its conventions are stated."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from gpt2lab import GPT
from gpt2lab.config import PRESETS, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
sys.path.insert(0, str(ROOT / "tools"))
from costs import BEGIN, END, main, param_count, replace_tables, tables  # noqa: E402


def test_tables_in_the_doc_are_up_to_date():
    doc = DOC.read_text()
    block = doc[doc.index(BEGIN) + len(BEGIN) : doc.index(END)].strip()
    assert block == tables(), "regenerate them: python tools/costs.py --write docs/architecture.md"


def test_doc_states_the_conventions():
    doc = DOC.read_text()
    for convention in (
        "i - W < j <= i",
        "h // (n_head / n_kv_head)",
        "rotate-half",
        "rope_theta",
        "rolling cache of exactly W slots per local layer",
    ):
        assert convention in doc


def test_param_count_matches_a_built_model():
    assert param_count(GPTConfig.from_name("gpt2")) == 124_439_808  # HF GPT2LMHeadModel's count
    config = GPTConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, vocab_size=100, pos_emb="rope")
    assert param_count(config) == GPT(config).num_params()


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("variant", [{}, {"pos_emb": "rope"}, {"n_kv_head": 1}, {"padded_vocab_size": 50304}])
def test_config_param_formula_matches_the_model(preset, variant):
    """GPTConfig.num_params (arithmetic, used to refuse models too big for memory) counts what GPT builds."""
    config = GPTConfig.from_name(preset, **variant)
    assert config.num_params() == param_count(config)


@pytest.mark.parametrize("context", [3, 8, 21])  # shorter than, equal to and past the window
def test_kv_cache_bytes_match_the_allocated_buffers(context):
    config = GPTConfig(n_layer=5, n_head=4, n_kv_head=2, n_embd=32, vocab_size=100, window=8, window_pattern="LLG")
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        model = GPT(config).to(dtype)
        model.setup_cache(1, context)
        allocated = sum(b.attn.kv_cache.k.nbytes + b.attn.kv_cache.v.nbytes for b in model.h)
        assert config.kv_cache_bytes(context, size) == allocated
        model.clear_cache()


def test_write_replaces_only_the_marked_block(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n\n{BEGIN}\nstale\n{END}\n\noutro\n")
    assert main(["--write", str(doc)]) == 0
    assert doc.read_text() == f"intro\n\n{BEGIN}\n{tables()}\n{END}\n\noutro\n"
    with pytest.raises(ValueError, match="no <!-- costs:begin -->"):
        replace_tables("no markers here", "x")
