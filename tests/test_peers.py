"""Directories written by save_pretrained (and so by convert and export) convert with the CPU peers'
own converters as they are: the files those converters read are there, and CTranslate2's converted
model gives our logits. Skipped where the peers are not installed (they are the optional bench extra).
And bench/peers.py reports a peer that fails to convert with the converter's own words."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


def test_save_pretrained_has_what_peer_converters_read(tiny_dir):
    """CTranslate2 reads vocab.json and merges.txt beside the weights; llama.cpp's GPT-2 converter reads
    n_ctx from config.json, which transformers' own save_pretrained no longer writes."""
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["n_ctx"] == config["n_positions"] == 32
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["model_type"] == "gpt2"
    assert (tiny_dir / "vocab.json").is_file() and (tiny_dir / "merges.txt").is_file()


def test_ctranslate2_converts_a_saved_directory(tiny_dir, tmp_path):
    ctranslate2 = pytest.importorskip("ctranslate2")
    pytest.importorskip("transformers")
    from gpt2lab import load_model

    out = tmp_path / "ct2"
    ctranslate2.converters.TransformersConverter(str(tiny_dir)).convert(str(out))
    generator = ctranslate2.Generator(str(out), device="cpu", intra_threads=1)
    ids = torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_model(tiny_dir)(ids)[0]
    theirs = torch.from_numpy(np.asarray(generator.forward_batch(ids.tolist())))
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_a_peer_that_cannot_convert_says_why_instead_of_a_dropped_pipe(tiny_dir, tmp_path):
    """bench/peers.py loads each peer in a child process; a converter that fails there (llama.cpp's, run
    outside its source tree) reaches the parent as the converter's own words and what to pass instead."""
    convert = tmp_path / "convert_hf_to_gguf.py"
    convert.write_text("import sys\nsys.exit(\"ModuleNotFoundError: No module named 'conversion'\")\n")
    bench = Path(__file__).parents[1] / "bench"
    script = (
        f"import sys; sys.path.insert(0, {str(bench)!r}); import peers\n"
        "from pathlib import Path\n"
        "try:\n"
        f"    peers.EngineProcess('llama.cpp', Path({str(tiny_dir)!r}), 1, Path({str(convert)!r}))\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    said = done.stdout
    assert "llama.cpp could not be loaded" in said and "exited with status 1 converting to f32" in said
    assert "No module named 'conversion'" in said and "llama.cpp's source tree" in said
