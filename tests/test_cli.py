"""The CLI: `predict` and `generate` on a tiny saved model, and clean one-line errors for bad input."""

from __future__ import annotations

import json
import os
import shutil
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt2lab import generate, load_tokenizer
from gpt2lab.cli import main
from gpt2lab.load import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([*argv, "--device", "cpu"])
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_clean_error(rc: int, out: str, err: str, *phrases: str) -> None:
    assert rc != 0
    assert "Traceback" not in out + err
    assert out == "", f"output before the error: {out!r}"
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for phrase in phrases:
        assert phrase in err


# --- happy paths -----------------------------------------------------------------------------------


def test_predict_lists_the_models_top_tokens(capsys, tiny_dir):
    """`predict` prints the --top most likely next tokens, best first, with the model's probabilities."""
    rc, out, err = _run(capsys, "predict", "Hello, my name is", "--top", "3", "--model", str(tiny_dir))
    assert rc == 0, err
    rows = [line.split(maxsplit=3) for line in out.splitlines()[1:]]
    assert len(rows) == 3
    ids = load_tokenizer().encode("Hello, my name is")
    with torch.no_grad():
        probs = load_model(tiny_dir)(torch.tensor([ids]))[0][0, -1].softmax(-1)
    top = probs.topk(3)
    assert [int(r[1]) for r in rows] == top.indices.tolist()
    assert [float(r[2]) for r in rows] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_output_piped_into_a_reader_that_stops_ends_quietly(tiny_dir, tmp_path):
    """``gpt2lab predict ... | head -n 1``: the reader closes the pipe after a line, the next write fails
    with EPIPE, and the command stops as Unix tools do (128 + SIGPIPE), with no traceback."""
    import signal
    import subprocess
    import sys

    argv = [sys.executable, "-m", "gpt2lab", "predict", "Hello", "--top", "5000", "--model", str(tiny_dir)]
    env = os.environ | {"GPT2LAB_KERNEL_CACHE": str(tmp_path / "kernels.json")}
    run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert run.stdout.readline()  # the first line; 5,000 of them fill the pipe and more
    run.stdout.close()
    err = run.stderr.read().decode()
    assert run.wait(timeout=120) == 128 + signal.SIGPIPE and "Traceback" not in err and "Error" not in err, err


def test_a_second_ctrl_c_inside_a_checkpoint_write_is_an_interrupt(capsys):
    """torch.save wraps a KeyboardInterrupt raised inside its write in a RuntimeError of its own: still the
    user's interrupt (exit 130, "interrupted"), not a traceback."""
    from gpt2lab.cli import _run as run

    def save_interrupted(args) -> None:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3712 vs 3606") from None

    args = mock.Mock(func=save_interrupted)
    assert run(args) == 130
    assert capsys.readouterr().err == "\ninterrupted\n"


def test_generate_greedy_is_the_library_continuation(capsys, tiny_dir):
    """`generate --temperature 0` prints the prompt then gpt2lab.generate's greedy tokens, the same every run."""
    args = ("generate", "--prompt", "Hello world", "--max-new-tokens", "8", "--temperature", "0")
    rc, out, err = _run(capsys, *args, "--model", str(tiny_dir))
    assert rc == 0, err
    tok = load_tokenizer()
    new = generate(load_model(tiny_dir), [tok.encode("Hello world")], 8, temperature=0)[0]
    assert out == "Hello world" + tok.decode(new) + "\n"
    assert _run(capsys, *args, "--model", str(tiny_dir))[1] == out


def test_samples_end_before_the_end_of_text(capsys, tmp_path, make_gpt, prefer_tokens):
    """A sample that produces <|endoftext|> prints the text before it, one sample or several."""
    from gpt2lab.load import save_pretrained
    from gpt2lab.tokenizer import EOT

    model = make_gpt(seed=7, vocab_size=50257, block_size=32, n_layer=2, n_head=2, n_embd=32)
    save_pretrained(prefer_tokens(model, EOT), tmp_path)
    args = ("generate", "--prompt", "Hi", "--max-new-tokens", "3", "--temperature", "0", "--model", str(tmp_path))
    assert _run(capsys, *args)[1] == "Hi\n"
    assert _run(capsys, *args, "--num-samples", "2")[1] == "--- sample 1 ---\nHi\n--- sample 2 ---\nHi\n"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")  # the caches turned off below
def test_generate_compile_prints_the_eager_text(always_compiled, capsys, tiny_dir):
    """`generate --compile` prints the same greedy text as the eager step and nothing else on stdout;
    stderr says that it compiles, and inductor's autotuning tables stay out of it (its caches are off,
    so the products are autotuned here)."""
    import torch.compiler

    args = ("generate", "--prompt", "Hello world", "--max-new-tokens", "6", "--temperature", "0")
    rc, eager, err = _run(capsys, *args, "--model", str(tiny_dir))
    assert rc == 0, err
    with torch.compiler.config.patch(force_disable_caches=True):
        rc, compiled, err = _run(capsys, *args, "--model", str(tiny_dir), "--compile")
    assert rc == 0, err
    assert compiled == eager
    assert "compiling the decode step" in err and "AUTOTUNE" not in err and "Autotune" not in err


def test_generate_seed_is_reproducible(capsys, tiny_dir):
    """`generate --seed` repeats its sample exactly; a different seed gives a different sample."""
    args = ("generate", "--prompt", "Once upon a time", "--max-new-tokens", "12", "--model", str(tiny_dir))
    first = _run(capsys, *args, "--seed", "1")
    assert first[0] == 0 and first[1].startswith("Once upon a time")
    assert _run(capsys, *args, "--seed", "1") == first
    assert _run(capsys, *args, "--seed", "2")[1] != first[1]


def test_generate_num_samples(capsys, tiny_dir):
    """`generate --num-samples 2` prints two labelled samples, each starting with the prompt."""
    rc, out, err = _run(
        capsys, "generate", "--prompt", "Hi", "--max-new-tokens", "5", "--num-samples", "2", "--seed", "0",
        "--model", str(tiny_dir),
    )  # fmt: skip
    assert rc == 0, err
    assert out.count("--- sample") == 2 and out.count("\nHi") == 2


# --- bad checkpoints -------------------------------------------------------------------------------


class NotATensor:
    """A custom class: loading it needs arbitrary unpickling."""


class WritesMarker:
    """Unpickling this runs code that creates a file: the marker proves whether it ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('unpickled')",)


def _copy(tiny_dir, tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(tiny_dir, directory)
    return directory


def _edit_weights(directory, fn) -> None:
    sd = load_file(directory / "model.safetensors")
    fn(sd)
    save_file(sd, directory / "model.safetensors", metadata={"format": "pt"})


def _bin_dir(directory, obj) -> None:
    (directory / "model.safetensors").unlink()
    torch.save(obj, directory / "pytorch_model.bin")


def _missing(tiny_dir, tmp_path):
    return tmp_path / "no-such-model", ["neither an existing directory"]


def _file(tiny_dir, tmp_path):
    return _copy(tiny_dir, tmp_path) / "model.safetensors", ["is a file"]


def _empty_dir(tiny_dir, tmp_path):
    return tmp_path, ["no config.json"]


def _no_weights(tiny_dir, tmp_path):
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    return tmp_path, ["has no weights", "model.safetensors"]


def _bad_json(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    (d / "config.json").write_text('{"n_layer": 2,')
    return d, ["not valid JSON"]


def _bad_config_value(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_head"] = 3  # HF's field, which a GPT-2's config takes over ours
    (d / "config.json").write_text(json.dumps(cfg))
    return d, ["config.json", "n_head"]


def _truncated(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    return d, ["model.safetensors", "truncated or corrupt"]


def _garbage(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    (d / "model.safetensors").write_bytes(b"this is not a safetensors file" * 10)
    return d, ["model.safetensors", "truncated or corrupt"]


def _wrong_shape(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_positions"] = cfg["n_ctx"] = cfg["gpt2lab"]["block_size"] = 48
    (d / "config.json").write_text(json.dumps(cfg))
    return d, ["wpe.weight", "(32, 32)", "(48, 32)"]


def _missing_key(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    _edit_weights(d, lambda sd: sd.pop("transformer.h.1.mlp.c_fc.bias"))
    return d, ["missing keys", "h.1.mlp.c_fc.bias"]


def _unknown_key(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    _edit_weights(d, lambda sd: sd.update({"transformer.h.0.attn.rotary.inv_freq": torch.ones(8)}))
    return d, ["unknown keys", "h.0.attn.rotary.inv_freq"]


def _unsafe_class(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    _bin_dir(d, {"wte.weight": torch.zeros(3), "extra": NotATensor()})
    return d, ["refused", "pytorch_model.bin", "carries Python code"]


def _truncated_bin(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    _bin_dir(d, load_file(d / "model.safetensors"))
    data = (d / "pytorch_model.bin").read_bytes()
    (d / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    return d, ["pytorch_model.bin", "truncated"]


def _bin_not_state_dict(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    _bin_dir(d, [torch.zeros(3)])
    return d, ["not a state dict"]


BAD_MODELS = [
    _missing,
    _file,
    _empty_dir,
    _no_weights,
    _bad_json,
    _bad_config_value,
    _truncated,
    _garbage,
    _wrong_shape,
    _missing_key,
    _unknown_key,
    _unsafe_class,
    _truncated_bin,
    _bin_not_state_dict,
]


@pytest.mark.parametrize("make_bad", BAD_MODELS, ids=[f.__name__.strip("_") for f in BAD_MODELS])
@pytest.mark.parametrize("command", ["predict", "generate"])
def test_bad_model_is_a_clean_error(capsys, tiny_dir, tmp_path, make_bad, command):
    """Every broken model path or checkpoint exits non-zero with a one-line message naming the problem."""
    path, phrases = make_bad(tiny_dir, tmp_path)
    text = ["Hello"] if command == "predict" else ["--prompt", "Hello", "--max-new-tokens", "2"]
    _assert_clean_error(*_run(capsys, command, *text, "--model", str(path)), *phrases)


def test_pickle_payload_is_never_run(capsys, tiny_dir, tmp_path):
    """A .bin whose unpickling would run code is refused before any of it runs (no marker file appears);
    the same file unpickled without weights_only does run it, so the marker is a live probe."""
    d = _copy(tiny_dir, tmp_path)
    marker = tmp_path / "marker"
    _bin_dir(d, {"wte.weight": torch.zeros(3), "payload": WritesMarker(str(marker))})
    _assert_clean_error(
        *_run(capsys, "predict", "Hello", "--model", str(d)), "refused", "carries Python code", "is not loaded"
    )
    assert not marker.exists()
    torch.load(d / "pytorch_model.bin", weights_only=False)
    assert marker.read_text() == "unpickled"


# --- bad prompts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["predict", "generate"])
def test_empty_prompt(capsys, tiny_dir, command):
    """An empty prompt is refused with a hint instead of crashing the model."""
    text = [""] if command == "predict" else ["--prompt", ""]
    _assert_clean_error(*_run(capsys, command, *text, "--model", str(tiny_dir)), "prompt is empty")


def test_predict_prompt_longer_than_context(capsys, tiny_dir):
    """`predict` with 40 tokens on a 32-position model names both lengths."""
    text = " word" * 40
    assert len(load_tokenizer().encode(text)) == 40
    _assert_clean_error(*_run(capsys, "predict", text, "--model", str(tiny_dir)), "40 tokens", "context of 32")


def test_generate_prompt_plus_new_tokens_beyond_context(capsys, tiny_dir):
    """`generate` with a 20-token prompt and 20 new tokens on a 32-position model is refused; 13 fit (the
    last new token is never fed back)."""
    args = ("generate", "--prompt", " word" * 20, "--temperature", "0", "--model", str(tiny_dir))
    _assert_clean_error(*_run(capsys, *args, "--max-new-tokens", "20"), "exceeds the context of 32")
    rc, _, err = _run(capsys, *args, "--max-new-tokens", "13")
    assert rc == 0, err


def test_help_and_usage_errors_do_not_load_torch():
    """`gpt2lab --help`, a subcommand's --help and a mistyped option answer at once: the package imports
    torch only when a command runs or a library name (gpt2lab.GPT, ...) is first used."""
    import subprocess
    import sys

    probe = (
        "import sys, contextlib, io\n"
        "from gpt2lab.cli import main\n"
        "for argv in (['--help'], ['generate', '--help'], ['train', '--help'], ['compare', '--help'], ['generate', '--bogus']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "print('torch' in sys.modules)\n"
        "import gpt2lab\n"
        "print(gpt2lab.generate.__module__, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "gpt2lab.generation", "True"]


def test_help_texts_say_what_exists(capsys):
    """Top-level help lists only real commands; compare's usage line names every option; train's help
    agrees with the docs on the vocabulary padding."""
    for argv in (["--help"], ["compare", "--help"], ["train", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
    top, compare, train = capsys.readouterr().out.split("usage: ")[1:4]
    assert "benchmark" not in top
    usage = compare.split("\n\n")[0]
    for option in ("--config", "--variants", "--seeds", "--data", "--steps", "--out", "--quick", "--no-progress"):
        assert option in usage, option
    assert "world sizes up to 128" in " ".join(train.split())


def test_importing_gpt2lab_first_lets_openblas_threads_soon_sleep():
    """Imported before numpy, gpt2lab asks numpy's OpenBLAS threads to look for work for 2^20 cycles,
    not a tenth of a second, before they sleep (the command line and the benchmarks import it first); a
    value the user set is kept, and a process that loaded numpy before keeps OpenBLAS's default."""
    import subprocess
    import sys

    probe = "import os, sys\n{}import gpt2lab\nprint(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))\n"

    def timeout(first: str = "", **env: str) -> str:
        environ = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"} | env
        run = subprocess.run([sys.executable, "-c", probe.format(first)], capture_output=True, text=True, env=environ)
        return run.stdout.strip()

    assert timeout() == "20"
    assert timeout(OPENBLAS_THREAD_TIMEOUT="28") == "28"
    assert timeout("import numpy\n") == "None"  # too late to matter


def test_openmp_threads_sleep_only_where_the_cpu_is_busy_and_the_user_chose_nothing():
    """The command line lets torch's OpenMP threads spin (the runtime's default) on an idle CPU and asks
    them to sleep where other programs keep half a CPU busy; a policy the user set is left alone, and
    once torch is loaded (as here) nothing changes. The decision is made before torch loads."""
    import subprocess
    import sys

    from gpt2lab.cli import BUSY_CPUS, openmp_wait_policy

    def decided(environ, load, torch_loaded=False):
        environ = dict(environ)
        with mock.patch.dict(sys.modules):  # restored on exit
            if not torch_loaded:
                del sys.modules["torch"]
            openmp_wait_policy(environ, busy=lambda: load)
        return environ

    assert decided({}, 0.0) == {}
    assert decided({}, BUSY_CPUS - 0.01) == {}
    assert decided({}, BUSY_CPUS) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert decided({}, None) == {}  # load unknown (not Linux): the runtime's default
    assert decided({"OMP_WAIT_POLICY": "ACTIVE"}, 2.0) == {"OMP_WAIT_POLICY": "ACTIVE"}
    assert decided({"GOMP_SPINCOUNT": "1000"}, 2.0) == {"GOMP_SPINCOUNT": "1000"}
    assert decided({}, 2.0, torch_loaded=True) == {}  # too late to matter
    # the real measurement, in a fresh process: a number of CPUs between 0 and the CPUs it may use
    probe = "import os\nfrom gpt2lab.cli import cpu_busy\nprint(cpu_busy(0.05), len(os.sched_getaffinity(0)))\n"
    load, cpus = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.split()
    assert 0 <= float(load) <= int(cpus)


def test_an_unknown_option_shows_its_commands_usage(capsys):
    """A mistyped option after a command is reported with that command's usage, not the top level's."""
    with pytest.raises(SystemExit) as exit:
        main(["eval", "--data", "x", "--max-windows", "2"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: gpt2lab eval "), err
    assert "gpt2lab eval: error: unrecognized arguments: --max-windows 2" in err
