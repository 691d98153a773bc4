"""`gpt2lab demo` end to end on a tiny budget: it prepares the offline corpus in a compact vocabulary,
states its plan, trains, samples, reports bits per byte, and prints next commands that run as printed;
the compact vocabulary follows the model through generate, eval and export."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from gpt2lab.cli import main
from gpt2lab.tokenizer import CompactTokenizer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
TINY = ["--model.n_layer=1", "--model.n_embd=32", "--model.n_head=2", "--run.steps=4", "--run.eval_every=2",
        "--run.eval_batches=2", "--run.ckpt_every=2", "--data.batch_size=2", "--data.block_size=64", "--run.progress=false",
        "--optim.warmup_steps=1"]  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "out"
    return out, _run_demo(out)


def _run_demo(out: Path) -> str:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["demo", "--out", str(out), *TINY]) == 0
    return buffer.getvalue()


def test_demo_states_its_plan_and_reports_bits_per_byte(demo):
    out, printed = demo
    assert "parameters, 4 steps of 2 x 64 tokens" in printed and "min on this machine" in printed
    assert "bits per byte of text" in printed
    val = [line for line in printed.splitlines() if line.startswith("val loss")][0]
    assert val.split()[2].count(".") == 1 and len(val.split()[2].split(".")[1]) == 3  # rounded
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "val_bpb" in records[-1] and "bpb" in records[-1]
    assert (out / "run" / "vocabulary.json").is_file()
    assert "import os\n\n\ndef" in printed  # the prompt, then the sample


def test_next_commands_run_as_printed(demo, capsys):
    out, printed = demo
    commands = [line.split("#")[0].strip() for line in printed.split("next (each runs as printed):")[1].splitlines()]
    commands = [c for c in commands if c]
    assert len(commands) == 6
    for command in commands[:4]:  # generate, predict, eval, export (train repeats the demo's length)
        argv = _arguments(command)
        if argv[0] == "generate":
            argv += ["--max-new-tokens", "5"]
        assert main(argv) == 0, command
    assert "bits per byte" in capsys.readouterr().out
    exported = out / "hf"
    assert (exported / "vocabulary.json").is_file() and not (exported / "vocab.json").exists()
    assert isinstance(CompactTokenizer.from_file(exported / "vocabulary.json"), CompactTokenizer)
    assert (
        main(["generate", "--model", str(out / "run" / "ckpt-00000004"), "--prompt", "def f(", "--max-new-tokens", "3"])
        == 0
    )
    train = _arguments(commands[4])
    assert train[:2] == ["train", "--config"] and Path(train[2]).is_file()
    # the suggested run differs from the demo's in one setting: the demo is rotary, the suggestion learned
    assert 'pos_emb = "rope"' in Path(train[2]).read_text() and "--model.pos_emb=learned" in train


def _arguments(command: str) -> list[str]:
    """A printed command's arguments after the program (``gpt2lab``, a path to it, or python -m gpt2lab)."""
    words = shlex.split(command)
    start = next(i for i, w in enumerate(words) if w in ("generate", "predict", "eval", "export", "train", "compare"))
    assert words[start - 1].endswith("gpt2lab"), command
    return words[start:]
