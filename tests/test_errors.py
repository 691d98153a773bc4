"""Bad input through the CLI: each is one line on stderr naming the problem, a non-zero exit, no
traceback, nothing on stdout, and every file that existed before left as it was."""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_worker import TINY_MODEL, byte_corpus, overrides, settings
from safetensors.torch import load_file, save_file

from gpt2lab import files
from gpt2lab.cli import main
from gpt2lab.data import TokenData, write_token_dir
from gpt2lab.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def _assert_one_line_error(capsys, argv: list[str], *phrases: str) -> str:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc != 0
    assert out == "", f"output before the error: {out!r}"
    assert "Traceback" not in err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for phrase in phrases:
        assert phrase in err, err
    return err


# --- model directories -----------------------------------------------------------------------------


def _model(tiny_dir: Path, tmp: Path, edit=None, config=None) -> Path:
    d = tmp / "model"
    shutil.copytree(tiny_dir, d)
    if config is not None:
        cfg = json.loads((d / "config.json").read_text())
        config(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
    if edit is not None:
        edit(d)
    return d


HF_NAMES = {"n_layer": "n_layer", "n_head": "n_head", "n_embd": "n_embd", "layer_norm_epsilon": "layer_norm_epsilon"}


def _set(key, value):
    """An edit of config.json's field ``key``: ours, and HF's of the same meaning, which a GPT-2's
    config takes over ours."""

    def change(cfg):
        cfg["gpt2lab"][key] = value
        if key in HF_NAMES:
            cfg[HF_NAMES[key]] = value

    return change


def _hf_style(key, value):
    def change(cfg):
        del cfg["gpt2lab"]
        cfg[key] = value

    return change


def _empty_weights(d: Path) -> None:
    (d / "model.safetensors").write_bytes(b"")


def _bad_index(d: Path) -> None:
    (d / "model.safetensors").rename(d / "model-00001.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["not", "a", "map"]}))


def _whole_number_weights(d: Path) -> None:
    weights = load_file(d / "model.safetensors")
    name = next(k for k in weights if k.endswith("wte.weight"))
    weights[name] = weights[name].round().long()
    save_file(weights, d / "model.safetensors")


def _junk_bin(data: bytes):
    def edit(d: Path) -> None:
        (d / "model.safetensors").unlink()
        (d / "pytorch_model.bin").write_bytes(data)

    return edit


MODEL_CASES = {
    "dropout not a number": (dict(config=_set("dropout", "high")), ["dropout must be a number"]),
    "rope_theta not a number": (dict(config=_set("rope_theta", "big")), ["rope_theta must be a number"]),
    "padded_vocab_size not a number": (dict(config=_set("padded_vocab_size", "x")), ["padded_vocab_size"]),
    "layer_norm_epsilon not a number": (dict(config=_set("layer_norm_epsilon", [1])), ["layer_norm_epsilon"]),
    "layer_norm_epsilon negative": (dict(config=_set("layer_norm_epsilon", -1)), ["layer_norm_epsilon", "positive"]),
    "window_pattern a number": (dict(config=_set("window_pattern", 5)), ["window_pattern must be a string"]),
    "config a list": (dict(config=lambda cfg: cfg.clear()), []),  # replaced below by a real list
    "n_embd a float": (dict(config=_hf_style("n_embd", 1e9)), ["n_embd must be a positive integer"]),
    "n_layer absurd": (dict(config=_set("n_layer", 100_000)), ["n_layer=100000", "the weights hold 2 layers"]),
    "n_embd absurd": (dict(config=_set("n_embd", 1_200_000)), ["more than this machine's memory", "n_embd"]),
    "empty weights file": (dict(edit=_empty_weights), ["model.safetensors", "truncated or corrupt"]),
    "malformed safetensors index": (dict(edit=_bad_index), ["model.safetensors.index.json", "malformed"]),
    "whole-number weights": (dict(edit=_whole_number_weights), ["wte.weight holds torch.int64 values"]),
    # not pickles: the weights-only unpickler trips over them in different ways, none of them "code"
    **{
        f"pytorch_model.bin holding {name}": (
            dict(edit=_junk_bin(data)),
            ["truncated or not a PyTorch tensor file", "download or export the model again"],
        )
        for name, data in [
            ("text", b"hello world"),
            ("3 bytes", b"abc"),
            ("JSON", b"{}"),
            ("random bytes", bytes(range(256)) * 8),
        ]
    },
}


@pytest.mark.parametrize("case", MODEL_CASES)
def test_bad_model_directory(case, tiny_dir, tmp_path, capsys):
    kwargs, phrases = MODEL_CASES[case]
    d = _model(tiny_dir, tmp_path, **kwargs)
    if case == "config a list":
        (d / "config.json").write_text("[1, 2]")
        phrases = ["config.json", "JSON object"]
    before = _tree(tmp_path)
    started = time.perf_counter()
    _assert_one_line_error(capsys, ["predict", "Hello", "--model", str(d), "--device", "cpu"], *phrases)
    assert time.perf_counter() - started < 30  # refused before anything is built, however absurd
    assert _tree(tmp_path) == before


# --- training checkpoints --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bytes_dir(tmp_path_factory) -> Path:
    return byte_corpus(tmp_path_factory.mktemp("bytes") / "data", n_train=20_000, n_val=4_000)


@pytest.fixture(scope="module")
def trained(bytes_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "out"
    args = overrides(settings(bytes_dir, out, run__steps=2, run__eval_every=0, run__ckpt_every=0))
    assert main(["train", *args]) == 0
    return out


COMPACT = {"kind": "gpt2-bytes", "kept_gpt2_ids": [*range(1000, 1043), 50256]}  # 300 ids: bytes, then 44 tokens


def test_a_model_trained_on_compact_data_predicts_its_vocabulary(bytes_dir, tmp_path, capsys):
    """From scratch on ids of a compact vocabulary, model.vocab_size defaults to its size (the preset's
    50,257 outputs would be scored in training and cut away by eval, so their losses would differ);
    another size is refused before anything is written."""
    splits = {split: (d := TokenData(bytes_dir, split)).read(0, len(d)) for split in ("train", "val")}
    data = write_token_dir(tmp_path / "compact", splits, vocab_size=300, vocabulary=COMPACT)
    model = {k: v for k, v in TINY_MODEL.items() if k != "model.vocab_size"}
    out = tmp_path / "run"
    assert main(["train", *overrides(settings(data, out, model=model, run__steps=2, run__eval_every=0))]) == 0
    assert json.loads((out / "ckpt-00000002" / "checkpoint.json").read_text())["model_config"]["vocab_size"] == 300
    capsys.readouterr()
    wrong = tmp_path / "wrong"
    argv = ["train", *overrides(settings(data, wrong, model={**model, "model.vocab_size": 512}, run__steps=2))]
    _assert_one_line_error(capsys, argv, "compact vocabulary of 300, but model.vocab_size is 512", "set it to 300")
    assert not any(wrong.glob("ckpt-*"))


@pytest.mark.parametrize("vocabulary", [COMPACT, {"kind": "gpt2-bytes", "kept_gpt2_ids": [*range(2000, 2043), 50256]}])
@pytest.mark.parametrize("command", ["resume", "fine-tune", "eval"])
def test_data_in_another_vocabulary_is_refused(command, vocabulary, trained, bytes_dir, tmp_path, capsys):
    """The same ids in a compact vocabulary stand for other tokens: resuming a run on them, fine-tuning a
    model on them or scoring it on them is refused, before anything is written; a run trained on compact
    data refuses another compact vocabulary of the same size."""
    splits = {split: (d := TokenData(bytes_dir, split)).read(0, len(d)) for split in ("train", "val")}
    data = write_token_dir(tmp_path / "compact", splits, vocab_size=300, vocabulary=vocabulary)
    model = trained
    if vocabulary is not COMPACT:  # a run in COMPACT's vocabulary, given data in another one
        model = tmp_path / "compact-run"
        base = write_token_dir(tmp_path / "compact-base", splits, vocab_size=300, vocabulary=COMPACT)
        args = settings(base, model, model={**TINY_MODEL, "model.vocab_size": 300}, run__steps=2, run__eval_every=0)
        assert main(["train", *overrides(args)]) == 0
        capsys.readouterr()
    out = model if command == "resume" else tmp_path / "new-run"
    argv = {
        "resume": [
            "train",
            *overrides(settings(data, out, model={**TINY_MODEL, "model.vocab_size": 300}, run__steps=4)),
        ],
        "fine-tune": ["train", *overrides(settings(data, out, model={"model.init": model}, run__steps=2))],
        "eval": ["eval", "--model", str(model), "--data", str(data), "--block-size", "32"],
    }[command]
    before = _tree(model)
    theirs = "another compact vocabulary of 300 ids" if vocabulary is not COMPACT else "a compact vocabulary of 300 ids"
    ours = "GPT-2's token ids" if vocabulary is COMPACT else "a compact vocabulary of 300 ids"
    _assert_one_line_error(capsys, argv, f"reads {ours}, but", f"holds {theirs}", "stand for other tokens")
    assert _tree(model) == before
    assert not (tmp_path / "new-run" / "vocabulary.json").exists()


def _checkpoint_copy(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    return out / "ckpt-00000002"


def _edit_meta(ckpt: Path, change) -> None:
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    change(meta)
    (ckpt / "checkpoint.json").write_text(json.dumps(meta))


def _sharded(ckpt: Path) -> None:
    """The same weights as an FSDP-format checkpoint (torch.distributed.checkpoint shards)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    state = torch.load(ckpt / "model.pt", weights_only=True)
    with warnings.catch_warnings():  # "no process group": one process writing shards is the point
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": state}, checkpoint_id=ckpt / "state", no_dist=True)
    (ckpt / "model.pt").unlink()
    _edit_meta(ckpt, lambda m: m.update(format="dcp"))


def _corrupt_shard(ckpt: Path) -> None:
    _sharded(ckpt)
    shard = next(p for p in (ckpt / "state").iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:100])


def _no_metadata(ckpt: Path) -> None:
    _sharded(ckpt)
    (ckpt / "state" / ".metadata").unlink()


CHECKPOINT_CASES = {
    "metadata without model_config": (lambda c: _edit_meta(c, lambda m: m.pop("model_config")), ["model_config"]),
    "train_config with a section that is not a table": (
        lambda c: _edit_meta(c, lambda m: m["train_config"].update(optim=5)),
        ["checkpoint.json is damaged (missing or malformed train_config)"],
    ),
    "metadata with absurd n_layer": (
        lambda c: _edit_meta(c, lambda m: m["model_config"].update(n_layer=100_000)),
        ["n_layer=100000", "the weights hold 2 layers"],
    ),
    "checkpoint.json not JSON": (
        lambda c: (c / "checkpoint.json").write_text("{"),
        ["cannot read", "checkpoint.json", "the checkpoint is damaged: delete", "ckpt-00000002 to resume from"],
    ),
    "truncated model.pt": (
        lambda c: (c / "model.pt").write_bytes((c / "model.pt").read_bytes()[:200]),
        ["model.pt: it is truncated", "the checkpoint is damaged: delete"],
    ),
    "junk model.pt": (
        lambda c: (c / "model.pt").write_bytes(b"junk"),
        ["model.pt: it is truncated or not a PyTorch tensor file", "the checkpoint is damaged: delete"],
    ),
    "corrupt FSDP shard": (_corrupt_shard, ["sharded checkpoint", "damaged"]),
    "FSDP checkpoint without .metadata": (_no_metadata, ["sharded checkpoint", "damaged"]),
    "wrong-shape weights": (
        lambda c: torch.save(
            {k: v[:1] if k == "wpe.weight" else v for k, v in torch.load(c / "model.pt").items()}, c / "model.pt"
        ),
        ["does not hold the model", "wpe.weight", "(1, 32)"],
    ),
}


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_bad_checkpoint(case, trained, tmp_path, capsys):
    damage, phrases = CHECKPOINT_CASES[case]
    ckpt = _checkpoint_copy(trained, tmp_path)
    damage(ckpt)
    before = _tree(tmp_path)
    _assert_one_line_error(capsys, ["generate", "--prompt", "hi", "--model", str(ckpt), "--device", "cpu"], *phrases)
    assert _tree(tmp_path) == before


RESUME_CASES = {
    "model.pt of another model": (lambda c: torch.save({"x": torch.zeros(1)}, c / "model.pt"), "model.pt"),
    "optim.pt of another optimizer": (
        lambda c: torch.save({"state": {}, "param_groups": []}, c / "optim.pt"),
        "optim.pt",
    ),
    "rng.pt without its ranks": (lambda c: torch.save({"other": torch.zeros(1)}, c / "rng.pt"), "rng.pt"),
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_a_checkpoint_file_that_reads_but_holds_something_else_refuses_a_resume(
    case, trained, bytes_dir, tmp_path, capsys
):
    """Resuming from a checkpoint whose file is a readable tensors file of something else (another model's
    weights, another optimizer's state, no per-rank RNG states) is a one-line error naming the file and
    what to do, not load_state_dict's traceback."""
    damage, name = RESUME_CASES[case]
    ckpt = _checkpoint_copy(trained, tmp_path)
    damage(ckpt)
    argv = ["train", *overrides(settings(bytes_dir, ckpt.parent, run__steps=3, run__eval_every=0, run__ckpt_every=0))]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert f"{name} does not hold what its checkpoint.json describes" in err
    assert "the checkpoint is damaged: delete" in err


@pytest.mark.parametrize("name", ["checkpoint.json", "model.pt"])
def test_a_checkpoint_file_this_user_may_not_read_is_not_called_damaged(name, trained, tmp_path, capsys, monkeypatch):
    """Permission denied says so, with the path: deleting the checkpoint, the fix for a damaged one, would
    throw away a good one (as root, chmod 000 does not stop a read, so the refusal is simulated)."""
    ckpt = _checkpoint_copy(trained, tmp_path)
    denied = ckpt / name
    read_text, load = Path.read_text, torch.load

    def refuse(path) -> None:
        if Path(path) == denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: refuse(self) or read_text(self, *a, **k))
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: refuse(f) or load(f, *a, **k))
    argv = ["generate", "--prompt", "hi", "--model", str(ckpt), "--device", "cpu"]
    err = _assert_one_line_error(capsys, argv, f"Permission denied: {denied}", "that you may read")
    assert "damaged" not in err


# --- commands and their options --------------------------------------------------------------------


def _out_of_range(tmp: Path) -> list[str]:
    data = write_token_dir(tmp / "data", {"train": np.full(2000, 255), "val": np.full(500, 255)}, 256)
    shard = data / "train_000000.bin"
    shard.write_bytes(np.full(2000, 60_000, dtype="<u2").tobytes())  # same size, ids past the vocabulary
    return ["train", *overrides(settings(data, tmp / "out"))]


def _changed_shard(tmp: Path) -> list[str]:
    data = write_token_dir(tmp / "data", {"train": np.arange(2000) % 200, "val": np.arange(500) % 200}, 256)
    shard = data / "train_000000.bin"
    shard.write_bytes(((np.arange(2000) + 1) % 200).astype("<u2").tobytes())  # valid ids, other tokens
    return ["train", *overrides(settings(data, tmp / "out"))]


def _bad_token_count(tmp: Path) -> list[str]:
    data = write_token_dir(tmp / "data", {"train": np.arange(2000) % 200, "val": np.arange(500) % 200}, 256)
    meta = json.loads((data / "meta.json").read_text())
    meta["splits"]["train"]["shards"][0]["tokens"] = "many"
    (data / "meta.json").write_text(json.dumps(meta))
    return ["train", *overrides(settings(data, tmp / "out"))]


def _vocab_past_uint16(tmp: Path) -> list[str]:
    data = byte_corpus(tmp / "data", 5_000, 2_000)
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps(meta | {"vocab_size": 70_000}))
    return ["train", *overrides(settings(data, tmp / "out"))]


def _gpt2_data_small_vocab(tmp: Path) -> list[str]:
    data = write_token_dir(tmp / "data", {"train": np.arange(3000) * 16, "val": np.arange(600) * 16}, 50257)
    return ["train", *overrides(settings(data, tmp / "out", model__vocab_size=100))]


def _train_with(**extra):
    return lambda tmp: ["train", *overrides(settings(byte_corpus(tmp / "data", 5_000, 2_000), tmp / "out", **extra))]


def _text(tmp: Path, content: bytes = b"some text to score, long enough for a few tokens\n" * 20) -> Path:
    path = tmp / "text.txt"
    path.write_bytes(content)
    return path


COMMAND_CASES = {
    "config is a folder": (lambda tmp: ["train", "--config", str(tmp)], ["is a directory"]),
    "config not UTF-8": (
        lambda tmp: ["train", "--config", str(_text(tmp, b"[run]\nsteps = 1 # \xff\xfe\n"))],
        ["not UTF-8"],
    ),
    "grad_clip nan": (_train_with(optim__grad_clip="nan"), ["optim.grad_clip must be a finite number"]),
    "data.dir is a file": (lambda tmp: ["train", f"--data.dir={_text(tmp)}"], ["is a file"]),
    "shard ids past the vocabulary": (_out_of_range, ["token id 60000", "outside the vocabulary"]),
    "shard changed after preparation": (_changed_shard, ["sha256"]),
    "token count not a number": (_bad_token_count, ["meta.json is malformed"]),
    "vocab_size past uint16 ids": (_vocab_past_uint16, ["meta.json is malformed", "vocab_size 70000", "1..65536"]),
    "vocab_size below the data's": (_gpt2_data_small_vocab, ["model.vocab_size to at least 50257"]),
    "batch beyond any memory": (_train_with(data__batch_size=10**20), ["cannot fit in this machine's memory"]),
    "seed beyond torch's": (_train_with(run__seed=2**64), ["run.seed must be below 2**62"]),
    "device meta": (_train_with(run__device="meta"), ["device 'meta' holds no data"]),
}


@pytest.mark.parametrize("case", COMMAND_CASES)
def test_bad_command_input(case, tmp_path, capsys):
    make, phrases = COMMAND_CASES[case]
    argv = make(tmp_path)
    before = _tree(tmp_path)
    _assert_one_line_error(capsys, argv, *phrases)
    assert _tree(tmp_path) == before


INFERENCE_CASES = {
    "temperature nan": (["generate", "--prompt", "hi", "--temperature", "nan"], ["temperature"]),
    "top -1": (["predict", "hi", "--top", "-1"], ["--top must be at least 1"]),
    "top 0": (["predict", "hi", "--top", "0"], ["--top must be at least 1"]),
    "eval stride 0": (["eval", "--data", "TEXT", "--stride", "0"], ["--stride"]),
    "eval block size 0": (["eval", "--data", "TEXT", "--block-size", "0"], ["--block-size"]),
    "eval of a binary file": (["eval", "--data", "BINARY"], ["not UTF-8 text"]),
    "export over a file": (["export", "--out", "TEXT"], ["is an existing file"]),
    "device meta": (["predict", "hi", "--device", "meta"], ["device 'meta' holds no data"]),
    "eval on device meta": (["eval", "--data", "TEXT", "--device", "meta"], ["device 'meta' holds no data"]),
    "device mps": (["predict", "hi", "--device", "mps"], ["device 'mps' is not usable here", "'MPS' backend)"]),
}


@pytest.mark.parametrize("case", INFERENCE_CASES)
def test_bad_inference_option(case, tiny_dir, tmp_path, capsys):
    argv, phrases = INFERENCE_CASES[case]
    text, binary = _text(tmp_path), tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    argv = [{"TEXT": str(text), "BINARY": str(binary)}.get(a, a) for a in argv]
    before = _tree(tmp_path)
    _assert_one_line_error(
        capsys,
        [*argv, "--model", str(tiny_dir)]
        + (["--device", "cpu"] if argv[0] != "export" and "--device" not in argv else []),
        *phrases,
    )
    assert _tree(tmp_path) == before


OUTPUT_UNDER_A_FILE = {
    "prepare": lambda tmp, model, file: ["prepare", "--input", str(_text(tmp)), "--out", str(file / "data")],
    "train": lambda tmp, model, file: [
        "train",
        *overrides(settings(byte_corpus(tmp / "data", 5_000, 2_000), file / "out")),
    ],
    "export": lambda tmp, model, file: ["export", "--model", str(model), "--out", str(file / "hf" / "gpt2")],
    "compare": lambda tmp, model, file: ["compare", "--quick", "--out", str(file / "report")],
}


@pytest.mark.parametrize("command", OUTPUT_UNDER_A_FILE)
def test_an_output_under_a_file_is_a_clean_error(command, tiny_dir, tmp_path, capsys):
    """The OS refuses to make the output directory; the message names the file in the way, not the
    bare "File exists" / "Not a directory" of the failed mkdir."""
    file = tmp_path / "notes.txt"
    file.write_text("not a directory\n")
    argv = OUTPUT_UNDER_A_FILE[command](tmp_path, tiny_dir, file)
    before = _tree(tmp_path)
    _assert_one_line_error(capsys, argv, f"{file} is a file where a directory is needed", "choose another location")
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("name", [".tmp-k0tpucr5", ".tok.tmp-4242-04dea333", ".meta.json.tmp-4242"])
def test_a_refused_temporary_name_is_reported_as_the_directory_it_goes_in(name, tmp_path):
    """Outputs are written under a temporary name beside them, then renamed: where the OS refuses that
    name, the message names the directory the user can act on, not a name they never gave."""
    error = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "ro" / name))
    assert files.os_error_message(error) == (
        f"Permission denied: cannot write in {tmp_path / 'ro'}; check that it exists and that you may write there"
    )


def test_an_export_over_a_directory_named_like_a_model_file_replaces_nothing(tiny_dir, tmp_path, capsys):
    """Export replaces its files one by one: what would stop it part-way is refused before the first."""
    out = tmp_path / "hf"
    (out / "config.json").mkdir(parents=True)
    (out / "model.safetensors").write_text("a previous model's weights\n")
    before = _tree(tmp_path)
    argv = ["export", "--model", str(tiny_dir), "--out", str(out)]
    _assert_one_line_error(capsys, argv, f"{out / 'config.json'} is a directory where a model file goes", "move it")
    assert _tree(tmp_path) == before


@pytest.mark.parametrize(
    ("option", "phrase"),
    [
        (["--max-new-tokens", "-3"], "max_new_tokens must be >= 0"),
        (["--temperature", "-1"], "temperature must be a number >= 0"),
        (["--top-k", "0"], "top_k must be at least 1"),
        (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    ],
)
def test_bad_generation_settings_fail_before_the_model_loads(option, phrase, tmp_path, capsys):
    """A model that does not exist (a hub name would be a download) is never reached."""
    argv = ["generate", "--prompt", "hi", "--model", str(tmp_path / "missing"), *option]
    _assert_one_line_error(capsys, argv, phrase)


def test_malicious_pickle_message_never_suggests_turning_the_protection_off(tiny_dir, tmp_path, capsys):
    d = _model(tiny_dir, tmp_path)
    (d / "model.safetensors").unlink()
    torch.save({"wte.weight": torch.zeros(3), "x": _Unsafe()}, d / "pytorch_model.bin")
    err = _assert_one_line_error(capsys, ["predict", "hi", "--model", str(d)], "carries Python code")
    assert "weights_only" not in err


class _Unsafe:
    pass


class _Runs:
    def __reduce__(self):
        return (print, ("this ran",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_raw_pickle_that_runs_code_is_refused(protocol, tiny_dir, tmp_path, capsys):
    """As code where torch's safe loader names what it would import (protocol 2); protocol 4 frames it
    reads not at all, which the error says."""
    import pickle

    d = _model(tiny_dir, tmp_path)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"x": _Runs()}, protocol=protocol))
    phrase = "carries Python code" if protocol == 2 else "torch's safe loader cannot read it: Unsupported operand"
    _assert_one_line_error(capsys, ["predict", "hi", "--model", str(d)], phrase)


def test_scoring_ids_past_the_models_tokenizer_is_a_clean_error(tiny_dir, tmp_path, capsys):
    """A model with its own, smaller BPE, scored on data prepared with GPT-2's: the ids are refused as
    such, not a KeyError from decoding the first one."""
    d = _model(tiny_dir, tmp_path)
    merges = (d / "merges.txt").read_text(encoding="utf-8").split("\n")
    vocab = {t: i for t, i in json.loads((d / "vocab.json").read_text(encoding="utf-8")).items() if i < 300}
    (d / "vocab.json").write_text(json.dumps(vocab | {"<|endoftext|>": 300}), encoding="utf-8")
    (d / "merges.txt").write_text("\n".join(merges[:45]) + "\n", encoding="utf-8")
    data = write_token_dir(tmp_path / "data", {"train": np.arange(2000) % 50000, "val": np.full(500, 40000)}, 50257)
    _assert_one_line_error(
        capsys, ["eval", "--model", str(d), "--data", str(data), "--device", "cpu"], "holds token ids up to 40000"
    )


@pytest.mark.parametrize(
    "failure",
    [
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 TB"
        ),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        MemoryError(),
    ],
    ids=["cpu", "cuda", "python"],
)
def test_running_out_of_memory_is_a_one_line_error(failure, tiny_dir, monkeypatch, capsys):
    """An allocation that fails (a huge --max-new-tokens, batch or model) is one line that says so and what to
    lower; any other RuntimeError still raises, with its traceback."""

    def stream_failing_with(error):
        def stream(*args, **kwargs):
            raise error

        return stream

    argv = ["generate", "--prompt", "hi", "--model", str(tiny_dir), "--device", "cpu", "--num-samples", "2"]
    monkeypatch.setattr("gpt2lab.generation.stream", stream_failing_with(failure))
    _assert_one_line_error(capsys, argv, "out of memory", "--max-new-tokens")
    monkeypatch.setattr("gpt2lab.generation.stream", stream_failing_with(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        main(argv)


def test_a_streamed_generation_that_fails_leaves_its_text_on_a_line_of_its_own(tiny_dir, monkeypatch, capsys):
    """Streaming (one sample): a first step that runs out of memory prints no prompt before the error, and
    one that fails later ends the text's line, so the error on stderr starts a line of its own."""
    argv = ["generate", "--prompt", "hi", "--model", str(tiny_dir), "--device", "cpu", "--max-new-tokens", "4"]

    def stream_failing_after(n):
        def stream(*args, **kwargs):
            yield from (torch.tensor([ord("a")]) for _ in range(n))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

        return stream

    monkeypatch.setattr("gpt2lab.generation.stream", stream_failing_after(0))
    _assert_one_line_error(capsys, argv, "out of memory")
    monkeypatch.setattr("gpt2lab.generation.stream", stream_failing_after(2))
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out.startswith("hi") and out.endswith("\n") and out.count("\n") == 1, out
    assert err.startswith("error: out of memory"), err


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_exported_weights_follow_the_umask(umask, mode, tiny_dir, tmp_path, capsys):
    before = os.umask(umask)
    try:
        assert main(["export", "--model", str(tiny_dir), "--out", str(tmp_path / "hf")]) == 0
    finally:
        os.umask(before)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {mode}, modes  # as every new file
    sd = load_file(tmp_path / "hf" / "model.safetensors")
    save_file(sd, tmp_path / "again.safetensors")  # the file itself loads and re-saves


@pytest.mark.parametrize("value", ["abc", "-2"])
def test_a_malformed_world_size_is_a_one_line_error(value, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", value)
    _assert_one_line_error(capsys, _train_with()(tmp_path), f"WORLD_SIZE={value!r} is not a count")


def test_a_malformed_rank_names_the_variable(monkeypatch):
    """(Checked on distributed.init: the CLI ends a process that has RANK set without returning.)"""
    from gpt2lab import distributed

    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ConfigError, match="RANK='x' is not a count"):
        distributed.init("ddp", "cpu")


@pytest.mark.parametrize("rank", ["0", "1"])
def test_under_torchrun_rank_0_prints_at_once_and_another_rank_after_a_pause(rank, monkeypatch, capsys):
    """Rank 0 prints its error at once; another rank waits first (torchrun ends it there when rank 0 failed
    too, so the error shows once) and still prints an error of its own. 'interrupted' shows once."""
    from gpt2lab import cli

    slept = []
    monkeypatch.setattr(cli.time, "sleep", slept.append)
    monkeypatch.setattr(cli.signal, "signal", lambda *args: None)  # this process keeps its handlers
    monkeypatch.setenv("RANK", rank)
    cli._print_error("a bad setting")
    assert capsys.readouterr().err == "error: a bad setting\n"
    assert slept == ([] if rank == "0" else [cli.RANK_ERROR_DELAY_S])

    def interrupted(args):
        raise KeyboardInterrupt

    assert cli._run(argparse.Namespace(func=interrupted)) == 130
    assert ("interrupted" in capsys.readouterr().err) == (rank == "0")
