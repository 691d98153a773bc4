"""The GPU benchmark script runs end to end on CPU with tiny shapes (--dry-run), so it is known to work
before a GPU is lent for it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).parents[1] / "bench"


@pytest.mark.slow
def test_gpu_bench_dry_run(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu.py"), "--dry-run", "--json", str(out), "--train", "gpt2:16,gpt2:16:sliced"]
        + ["--profile"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "FAILED" not in proc.stdout, proc.stdout
    results = json.loads(out.read_text())
    masked, sliced = results["train"]  # the dry run trains one tiny model per kind of loss asked for
    assert (masked["loss"], sliced["loss"]) == ("masked", "sliced")
    for train in (masked, sliced):
        assert train["tokens_per_s"] > 0 and train["model_tflops"] > 0
        assert train["profile"]["ms_per_step_by_kind"]["matmul"] > 0
    inference = results["inference"]
    for key in (
        "hf_prefill_tok_s",
        "ours_prefill_tok_s",
        "hf_decode_tok_s",
        "ours_decode_tok_s",
        "ours_compiled_decode_tok_s",
    ):
        assert inference[key] > 0, key


def test_the_gpu_inference_rows_give_both_libraries_the_same_work(monkeypatch):
    """Prefill: the last position's logits on both sides (transformers' head over one position, as
    gpt2lab's prefill computes it); decode: N new tokens, the prefill's and N - 1 steps, as transformers'
    generate makes them."""
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu

    steps, heads = [], []
    counted = lambda model, token, pos: steps.append(1) or gpu.decode_one_token(model, token, pos)  # noqa: E731
    monkeypatch.setattr(gpu, "compiled_decode", lambda model: counted)
    head = torch.nn.Linear.forward
    monkeypatch.setattr(torch.nn.Linear, "forward", lambda self, x: heads.append(x.shape[1]) or head(self, x))
    inference = gpu.inference_vs_hf(torch.device("cpu"), dry=True)
    assert len(steps) == 2 * (16 - 1)  # the compiled decode, one warm-up and one timed call of 16 tokens
    assert set(heads) == {1} and inference["hf_prefill_tok_s"] > 0  # every lm_head product: one position


@pytest.mark.parametrize(
    "script, args, phrase",
    [
        ("cpu.py", ["--threads", "0"], "--threads: must be at least 1"),
        ("cpu.py", ["--only", "forward,bogus"], "--only: choose from forward,train,"),
        ("linear.py", ["--repeat", "0"], "--repeat: must be at least 1"),
        ("decode_step.py", ["--rounds", "x"], "--rounds: 'x' is not an integer"),
        ("pages.py", ["--rounds", "0"], "--rounds: must be at least 1"),
        ("peers.py", ["--preset", "bogus"], "--preset must be one of gpt2,"),
        ("peers.py", ["--decode", "float32:0:128"], "'float32:0:128' is not WEIGHTS:BATCH:NEW_TOKENS"),
        ("peers.py", ["--decode", "int8:1:1009"], "at most 1008 new tokens after the 16-token prompt"),
        ("gpu.py", ["--train", "gpt2:x"], "'gpt2:x' is not PRESET:BATCH or PRESET:BATCH:sliced"),
        ("gpu.py", ["--train", "gpt9:16"], "unknown preset 'gpt9'"),
    ],
)
def test_bench_scripts_refuse_bad_options_before_any_work(script, args, phrase):
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=120, cwd=BENCH
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert phrase in proc.stderr.splitlines()[-1], proc.stderr


@pytest.mark.parametrize(
    "wanted",
    [pytest.param(True, marks=pytest.mark.skipif(sys.platform != "linux", reason="2 MiB pages: Linux")), False],
)
def test_the_read_probe_reads_from_the_pages_the_decode_steps_read_from(monkeypatch, wanted):
    """The memory read ceiling (common.read_probe) is timed on a matrix in 2 MiB pages wherever the
    decode steps move their weights into such pages: from 4 KiB pages it reads slower than the steps."""
    from gpt2lab import pages

    monkeypatch.syspath_prepend(str(BENCH))
    import common

    monkeypatch.setattr(pages, "wanted", lambda: wanted)
    matrix = common.read_matrix(4 * 2**20)
    assert matrix.shape == (256, 4096) and matrix.dtype == torch.float32 and bool((matrix == 1).all())
    assert pages.in_huge_pages(matrix) is wanted
