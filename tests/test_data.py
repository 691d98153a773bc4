"""The data pipeline: prepare (corpus -> shards) and the readers (TokenData, Batches, val_batches, iter_windows)."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import sys
import urllib.error
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_worker import SHAKESPEARE

from gpt2lab import files
from gpt2lab.cli import main
from gpt2lab.data import (
    Batches,
    Source,
    TokenData,
    iter_windows,
    prepare,
    read_meta,
    sources,
    split_text,
    stdlib_files,
    val_batches,
    write_token_dir,
)
from gpt2lab.data import format as data_format
from gpt2lab.data.batches import count_windows
from gpt2lab.data.prepare import MIN_VAL_TOKENS, _init_worker, _is_val
from gpt2lab.errors import GPT2LabError
from gpt2lab.tokenizer import EOT, load_tokenizer


@pytest.fixture(scope="module")
def enc():
    return load_tokenizer()


def split_tokens(out: Path, split: str) -> np.ndarray:
    d = TokenData(out, split)
    return d.read(0, len(d))


def documents(tokens: np.ndarray, enc) -> list[str]:
    """Decode a split's stream back into its documents (each ends with EOT)."""
    ends = np.flatnonzero(tokens == EOT)
    assert len(ends) and ends[-1] == len(tokens) - 1, "a split must end with <|endoftext|>"
    return [enc.decode(part[:-1].tolist()) for part in np.split(tokens, ends + 1)[:-1]]


def all_documents(out: Path, enc, val_fraction: float) -> list[str]:
    """The documents of a prepared directory in corpus order, merging the splits by the val rule."""
    train, val = (iter(documents(split_tokens(out, s), enc)) for s in ("train", "val"))
    meta = json.loads((out / "meta.json").read_text())
    n = sum(meta["splits"][s]["documents"] for s in ("train", "val"))
    frac = Fraction(val_fraction).limit_denominator(1_000_000)
    held_out = [_is_val(i, frac) for i in range(n)]
    if not any(held_out):  # too few documents for the rule: prepare holds out the last one
        held_out[-1] = True
    return [next(val) if v else next(train) for v in held_out]


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A small directory corpus: nested files, an empty file, a hidden directory that must be skipped."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "b.txt").write_text("Second document.\r\nWith a CRLF line.\n")
    (root / "a.txt").write_text("First document: Hello, world!\n")
    (root / "empty.txt").write_text("")
    (root / "sub" / "c.md").write_text("Third, nested. It mentions <|endoftext|> literally.")
    (root / ".git" / "objects").write_bytes(b"\x00\xff binary")
    return root


CORPUS_DOCS = [
    "First document: Hello, world!\n",
    "Second document.\r\nWith a CRLF line.\n",
    "Third, nested. It mentions <|endoftext|> literally.",
]


# --- exact tokenization -------------------------------------------------------------------------


def test_split_text_pieces_tokenize_like_the_whole(enc):
    rnd = random.Random(0)
    texts = [
        SHAKESPEARE.read_text()[:200_000],
        *(p.read_text() for p in stdlib_files()[:40]),
        "".join(rnd.choice("ab \n\n  \t\r.,'s1é😀X") for _ in range(50_000)),
        # CJK, combining marks, and characters whose "space-ness" differs between Python and the tokenizer
        "".join(rnd.choice("中文。\n\n 　e\u0301\x1c\x85\u2028\u200b\u180e'7") for _ in range(50_000)),
    ]
    n_cuts = 0
    for text in texts:
        whole = enc.encode_ordinary(text)
        cuts = [0] + [m.start() for m in sources._SAFE_CUT.finditer(text) if m.start() > 0] + [len(text)]
        n_cuts += len(cuts) - 2
        every = [text[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]  # cut at every safe place at once
        assert [t for p in every for t in enc.encode_ordinary(p)] == whole
        pieces = split_text(text, limit=500)
        assert "".join(pieces) == text
        assert [t for p in pieces for t in enc.encode_ordinary(p)] == whole
    assert n_cuts > 50_000
    assert max(len(p) for p in split_text(texts[0], limit=500)) <= 500


def test_split_text_without_safe_cut_keeps_text_whole():
    assert split_text("x" * 100, limit=10) == ["x" * 100]


# --- prepare: round trips and input forms ---------------------------------------------------------


def test_round_trip_shakespeare_several_shards(tmp_path, enc):
    out = tmp_path / "tok"
    summary = prepare(out, Source([SHAKESPEARE]), shard_tokens=20_000, workers=2, progress=False)
    text = SHAKESPEARE.read_text()
    expected = enc.encode_ordinary(text) + [EOT]
    got = np.concatenate([split_tokens(out, "train"), split_tokens(out, "val")])
    assert got.tolist() == expected
    # one document: val is its last 1% of tokens, topped up to MIN_VAL_TOKENS
    assert summary.tokens["val"] == max(round(0.01 * len(expected)), MIN_VAL_TOKENS)
    meta = json.loads((out / "meta.json").read_text())
    n_train = len(expected) - summary.tokens["val"]
    sizes = [s["tokens"] for s in meta["splits"]["train"]["shards"]]
    assert sizes == [20_000] * (n_train // 20_000) + [n_train % 20_000]
    for split in ("train", "val"):
        for shard in meta["splits"][split]["shards"]:
            assert hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
    assert meta["bytes"] == SHAKESPEARE.stat().st_size == summary.bytes_read
    # bytes of text per split: exactly the file's, split where the tokens are
    assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] == len(text.encode())
    assert meta["splits"]["val"]["bytes"] == len(enc.decode_bytes(expected[n_train:-1]))


def test_streamed_pieces_are_exact(tmp_path, enc, monkeypatch):
    """Small read blocks and pieces: a file and a JSONL record are cut many times, tokens unchanged."""
    monkeypatch.setattr(sources, "PIECE_CHARS", 3000)
    monkeypatch.setattr(sources, "READ_BYTES", 1000)
    text = SHAKESPEARE.read_text()[:100_000]
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": text}) + "\n")
    (tmp_path / "c.txt").write_text("x" * 20_000 + "\n" + text[:5000])  # no cut in the first 20k characters
    out = tmp_path / "tok"
    prepare(
        out, Source([tmp_path / n for n in ("a.txt", "b.jsonl", "c.txt")]), val_fraction=0.5, workers=2, progress=False
    )
    assert all_documents(out, enc, 0.5) == [text, text, "x" * 20_000 + "\n" + text[:5000]]
    expected = [enc.encode_ordinary(t) + [EOT] for t in (text, text, "x" * 20_000 + "\n" + text[:5000])]
    got = [split_tokens(out, "train"), split_tokens(out, "val")]
    assert got[0].tolist() == expected[0] + expected[2] and got[1].tolist() == expected[1]


@pytest.mark.parametrize("form", ["dir", "glob", "files"])
def test_input_forms(tmp_path, corpus, enc, form):
    inputs = {
        "dir": [corpus],
        "glob": [str(corpus / "**" / "*.*")],
        "files": [corpus / "a.txt", corpus / "b.txt", corpus / "sub" / "c.md", corpus / "a.txt"],
    }[form]
    out = tmp_path / "tok"
    summary = prepare(out, Source(inputs), val_fraction=0.5, workers=1, progress=False)
    assert all_documents(out, enc, 0.5) == CORPUS_DOCS
    assert summary.documents == {"train": 2, "val": 1}
    # a literal "<|endoftext|>" is text: the only EOTs are the separators
    assert sum(int((split_tokens(out, s) == EOT).sum()) for s in ("train", "val")) == 3


def test_jsonl_input_and_text_field(tmp_path, enc):
    src = tmp_path / "docs.jsonl"
    rows = [{"body": "one", "id": 1}, {"body": "two\nlines"}, {"body": ""}, {"body": "three <|endoftext|>"}]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    out = tmp_path / "tok"
    summary = prepare(out, Source([src], text_field="body"), val_fraction=0.5, workers=1, progress=False)
    assert all_documents(out, enc, 0.5) == ["one", "two\nlines", "three <|endoftext|>"]
    assert summary.documents == {"train": 2, "val": 1}


def test_stdlib_corpus_subset(tmp_path, enc):
    files = stdlib_files()
    assert len(files) > 300 and files == stdlib_files()
    for f in files:
        assert f.suffix == ".py"
        assert not set(f.parts) & {"test", "tests", "idle_test", "site-packages"}, f
    out = tmp_path / "tok"
    summary = prepare(out, Source(corpus="stdlib", max_docs=12), workers=2, progress=False)
    expected = [t for f in files if (t := f.read_text(encoding="utf-8"))][:12]
    assert all_documents(out, enc, 0.01) == expected
    assert summary.documents == {"train": 11, "val": 1}  # fewer than 100 documents: the last one is val
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"]["corpus"] == "stdlib" and meta["source"]["max_docs"] == 12


def test_val_split_spreads_documents(tmp_path, enc):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(40)))
    out = tmp_path / "tok"
    summary = prepare(out, Source([src]), val_fraction=0.1, workers=1, progress=False)
    assert documents(split_tokens(out, "val"), enc) == [f"document {i}" for i in (9, 19, 29, 39)]
    assert summary.documents == {"train": 36, "val": 4}


def test_deterministic_across_runs_and_workers(tmp_path, corpus):
    inputs = [SHAKESPEARE, corpus]
    outs = []
    for i, workers in enumerate([1, 2, 2]):
        out = tmp_path / f"tok{i}"
        prepare(out, Source(inputs), shard_tokens=20_000, workers=workers, progress=False)
        outs.append(tree(out))
    assert outs[0] == outs[1] == outs[2]
    assert len(outs[0]) > 4


def test_token_ids_past_uint16_are_refused_not_wrapped(tmp_path):
    """Shards hold uint16 ids: a vocabulary past 65536 tokens would wrap ids 65536 and up silently."""
    with pytest.raises(GPT2LabError, match="vocab_size 70001 does not fit the shards' uint16 ids"):
        write_token_dir(tmp_path / "big", {"train": np.array([70000, 1]), "val": np.array([3, 4])}, 70001)
    assert not (tmp_path / "big").exists()
    write_token_dir(tmp_path / "top", {"train": np.array([65535, 1]), "val": np.array([3, 4])}, 65536)
    assert TokenData(tmp_path / "top", "train").read(0, 2).tolist() == [65535, 1]


def test_no_temp_files_left_and_rerun_replaces(tmp_path, corpus):
    out = tmp_path / "tok"
    prepare(out, Source([corpus / "a.txt"]), workers=1, progress=False)
    prepare(out, Source([corpus]), workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "tok"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert json.loads((out / "meta.json").read_text())["source"]["files"] == 4  # empty.txt is read, then skipped
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)  # a normal directory, not mkdtemp's private one


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_crash_leaves_previous_directory_intact(tmp_path, corpus, monkeypatch, exc):
    out = tmp_path / "tok"
    prepare(out, Source([corpus]), shard_tokens=5, workers=1, progress=False)
    before = tree(out)
    calls = []
    write = data_format.ShardWriter.write

    def failing_write(self, ids):
        calls.append(1)
        if len(calls) == 2:
            write(self, ids[: len(ids) // 2])  # a half-written shard, then the crash
            raise exc
        write(self, ids)

    monkeypatch.setattr(data_format.ShardWriter, "write", failing_write)
    with pytest.raises(type(exc)):
        prepare(out, Source([corpus]), shard_tokens=5, workers=1, progress=False)
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "tok"]
    # into a fresh directory: nothing at all appears
    with pytest.raises(type(exc)):
        calls.clear()
        prepare(tmp_path / "new", Source([corpus]), shard_tokens=5, workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "tok"]


def test_a_killed_prepare_leaves_nothing_and_a_later_one_clears_what_a_dead_one_left(tmp_path, corpus):
    """SIGTERM (kill, timeout) stops prepare as Ctrl-C does: its workers end, its partial output goes, and
    the previous version stays. Partial output of a prepare killed harder (kill -9) is deleted by the next
    prepare of the same directory, once the process that wrote it is gone; a live one's is left alone."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "tok"
    prepare(out, Source([corpus]), workers=1, progress=False)
    before = tree(out)
    big = tmp_path / "big.txt"
    big.write_text(SHAKESPEARE.read_text() * 100)  # 20 MB: seconds of tokenizing
    argv = [sys.executable, "-m", "gpt2lab", "prepare", "--input", str(big), "--out", str(out), "--workers", "2"]
    run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".tok.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130 and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt", "corpus", "tok"] and tree(out) == before
    dead, live = tmp_path / ".tok.tmp-999999999-0a1b2c3d", tmp_path / f".tok.tmp-{os.getpid()}-0a1b2c3d"
    for left in (dead, live):
        left.mkdir()
        (left / "train_000000.bin").write_bytes(b"\0\0")
    prepare(out, Source([corpus]), workers=1, progress=False)
    assert not dead.exists() and live.exists()


def test_an_interrupt_between_the_two_renames_puts_the_previous_version_back(tmp_path, corpus, monkeypatch):
    """Replacing a prepared directory moves the previous version aside, then the new one in: an
    interrupt between the two renames puts the previous version back under its name."""
    out = tmp_path / "tok"
    prepare(out, Source([corpus]), workers=1, progress=False)
    before, replace, interrupted = tree(out), os.replace, []

    def interrupt_once(src, dst):
        if Path(dst) == out and Path(src).name.startswith(".tok.tmp-") and not interrupted:
            interrupted.append(src)
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(files.os, "replace", interrupt_once)
    with pytest.raises(KeyboardInterrupt):
        prepare(out, Source([corpus]), shard_tokens=5, workers=1, progress=False)
    assert interrupted and tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "tok"]


def test_a_previous_version_a_killed_replacement_left_is_put_back_or_deleted(tmp_path, corpus):
    """A prepare killed between the two renames leaves no directory at --out and the previous version
    beside it: the next look puts it back; once a newer version is in place, it is deleted. A live
    process's is left alone."""
    import shutil

    out = tmp_path / "tok"
    prepare(out, Source([corpus]), workers=1, progress=False)
    before = tree(out)
    dead, live = tmp_path / ".tok.old-999999999", tmp_path / f".tok.old-{os.getppid()}"
    os.replace(out, dead)
    files.restore_abandoned(out)
    assert tree(out) == before and not dead.exists()
    shutil.copytree(out, dead)
    shutil.copytree(out, live)
    prepare(out, Source([corpus]), shard_tokens=5, workers=1, progress=False)
    assert not dead.exists() and live.exists() and tree(out) != before


def _death_signal() -> int:
    """prctl(PR_GET_PDEATHSIG) of the calling process."""
    import ctypes

    value = ctypes.c_int()
    ctypes.CDLL(None).prctl(2, ctypes.byref(value))
    return value.value


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl: Linux")
def test_prepare_workers_end_with_the_thread_that_forked_them():
    """A worker the pool's own thread forks while an interrupt tears the pool down outlived prepare,
    waiting forever on a queue lock (and holding its standard streams open): every worker asks Linux
    for SIGKILL when its forking thread ends."""
    import multiprocessing
    import signal

    with multiprocessing.Pool(1, initializer=_init_worker, initargs=(os.getpid(),)) as pool:
        assert pool.apply(_death_signal) == signal.SIGKILL


def test_output_directory_is_never_read(tmp_path, corpus):
    out = corpus / "tok"
    prepare(out, Source([corpus]), workers=1, progress=False)
    summary = prepare(out, Source([corpus]), workers=1, progress=False)  # tok/*.bin inside the input is skipped
    assert summary.documents["train"] + summary.documents["val"] == 3


def test_a_file_named_inside_the_output_is_an_error_and_kept(tmp_path, corpus):
    """prepare replaces --out: a file inside it named as an input would be deleted unread, so naming one is
    refused, and the prepared directory is left as it was."""
    out = tmp_path / "tok"
    prepare(out, Source([corpus]), workers=1, progress=False)
    before = tree(out)
    with pytest.raises(GPT2LabError, match="lies inside --out"):
        prepare(out, Source([out / "meta.json", corpus]), workers=1, progress=False)
    assert tree(out) == before


def test_a_prepared_directory_holding_other_files_is_not_replaced(tmp_path, corpus):
    """Preparing a directory again replaces it whole: where it holds more than its meta.json and shards
    (a training run's checkpoints, a note), that is refused, naming them, and nothing is deleted."""
    out = tmp_path / "tok"
    prepare(out, Source([corpus]), shard_tokens=5, workers=1, progress=False)
    (out / "ckpt-00000001").mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    before = tree(out)
    with pytest.raises(GPT2LabError, match=r"also holds ckpt-00000001, metrics\.jsonl, which .* move them out"):
        prepare(out, Source([corpus]), workers=1, progress=False)
    assert tree(out) == before and (out / "ckpt-00000001").is_dir()


def test_a_previous_version_that_cannot_be_deleted_is_a_warning(tmp_path, corpus, monkeypatch):
    """Once the new directory is in place the run has succeeded: where the previous version cannot be
    deleted (a read-only directory), the summary warns where it was left instead of failing."""
    out = tmp_path / "tok"
    prepare(out, Source([corpus / "a.txt"]), workers=1, progress=False)
    rmtree = files.shutil.rmtree

    def refusing(path, *args, **kwargs):
        if ".old-" in Path(path).name:
            raise PermissionError(13, "Permission denied", str(path))
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(files.shutil, "rmtree", refusing)
    summary = prepare(out, Source([corpus]), workers=1, progress=False)
    assert read_meta(out)["source"]["files"] == 4  # the new version
    left = [p for p in tmp_path.iterdir() if ".old-" in p.name]
    assert len(left) == 1 and summary.warnings[-1] == (
        f"{out} is written, but its previous version could not be deleted (Permission denied): delete {left[0]}"
    )


def test_an_output_that_is_a_link_is_written_where_it_points(tmp_path, corpus):
    """--out naming a symbolic link to a prepared directory replaces that directory; the link stays a link."""
    real, link = tmp_path / "real", tmp_path / "link"
    prepare(real, Source([corpus / "a.txt"]), workers=1, progress=False)
    link.symlink_to(real, target_is_directory=True)
    summary = prepare(link, Source([corpus]), workers=1, progress=False)
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert summary.documents["train"] + summary.documents["val"] == 3
    assert read_meta(real)["splits"] == read_meta(link)["splits"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "link", "real"]


# --- prepare: errors ------------------------------------------------------------------------------


def test_prepare_errors(tmp_path, corpus):
    out = tmp_path / "tok"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("")
    with pytest.raises(GPT2LabError, match="empty"):
        prepare(out, Source([tmp_path / "empty"]), workers=1, progress=False)
    with pytest.raises(GPT2LabError, match="empty"):
        prepare(out, Source([tmp_path / "empty" / "x.txt"]), workers=1, progress=False)
    with pytest.raises(GPT2LabError, match="does not exist"):
        prepare(out, Source([tmp_path / "nope.txt"]), progress=False)
    with pytest.raises(GPT2LabError, match="matches no files"):
        prepare(out, Source([str(tmp_path / "*.nothing")]), progress=False)
    (tmp_path / "bin.txt").write_bytes(b"ok\xff\xfe")
    with pytest.raises(GPT2LabError, match="not UTF-8"):
        prepare(out, Source([tmp_path / "bin.txt"]), workers=1, progress=False)
    with pytest.raises(GPT2LabError, match="not a prepared data directory"):
        prepare(corpus, Source([tmp_path / "bin.txt"]), progress=False)
    with pytest.raises(GPT2LabError, match="val_fraction"):
        prepare(out, Source([corpus]), val_fraction=0, progress=False)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bad_jsonl_names_the_line(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"text": oops}\n')
    with pytest.raises(GPT2LabError, match=r"docs\.jsonl:4: not a JSON object"):
        prepare(tmp_path / "tok", Source([src]), workers=1, progress=False)
    src.write_text('{"text": "fine"}\n{"text": 5}\n')
    with pytest.raises(GPT2LabError, match=r"docs\.jsonl:2: field 'text' holds int, not text; .* --text-field"):
        prepare(tmp_path / "tok", Source([src]), workers=1, progress=False)
    src.write_text('{"text": "fine"}\n{"content": "x"}\n')
    with pytest.raises(GPT2LabError, match=r"docs\.jsonl:2: no string field 'text' \(found: 'content'\).*--text-field"):
        prepare(tmp_path / "tok", Source([src]), workers=1, progress=False)


def test_shakespeare_download_verified_or_clear_error(tmp_path, monkeypatch, enc):
    def offline(url, timeout):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(sources.urllib.request, "urlopen", offline)
    with pytest.raises(GPT2LabError, match="--input"):
        prepare(tmp_path / "tok", Source(corpus="shakespeare"), progress=False)

    payload = SHAKESPEARE.read_bytes()  # a slice of the real file: its own digest stands in for the real one's
    monkeypatch.setattr(sources, "SHAKESPEARE_SHA256", hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(sources.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(payload))
    summary = prepare(tmp_path / "tok", Source(corpus="shakespeare"), workers=1, progress=False)
    assert summary.tokens["train"] + summary.tokens["val"] == len(enc.encode_ordinary(payload.decode())) + 1

    monkeypatch.setattr(sources.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(payload + b"!"))
    with pytest.raises(GPT2LabError, match="sha256"):
        prepare(tmp_path / "tok2", Source(corpus="shakespeare"), progress=False)


def test_cli_prepare(tmp_path, corpus, capsys):
    assert main(["prepare", "--input", str(corpus), "--out", str(tmp_path / "tok"), "--workers", "1"]) == 0
    assert "3 documents (2 train, 1 val)" in capsys.readouterr().out
    assert main(["prepare", "--input", str(corpus / "a.txt"), "--out", str(tmp_path / "one"), "--workers", "1"]) == 0
    assert "1 document (" in capsys.readouterr().out
    assert main(["prepare", "--input", str(tmp_path / "missing"), "--out", str(tmp_path / "tok")]) == 2
    assert "error: --input" in capsys.readouterr().err


# --- readers --------------------------------------------------------------------------------------


@pytest.fixture
def counting(tmp_path) -> Path:
    """A prepared directory whose train stream is 0, 1, 2, ... in shards of 700 (so shift checks are exact)."""
    splits = {"train": np.arange(5000), "val": np.arange(300)}
    return write_token_dir(tmp_path / "counting", splits, vocab_size=5000, shard_tokens=700)


def test_token_data_reads_across_shards(counting):
    d = TokenData(counting, "train")
    assert len(d) == 5000
    assert d.read(690, 30).tolist() == list(range(690, 720))


def test_token_data_errors(tmp_path, counting):
    with pytest.raises(GPT2LabError, match="does not exist.*gpt2lab prepare"):
        TokenData(tmp_path / "nope", "train")
    with pytest.raises(GPT2LabError, match="no meta.json.*gpt2lab prepare"):
        TokenData(tmp_path, "train")
    with pytest.raises(GPT2LabError, match="300 tokens, fewer than block_size \\+ 1 = 301"):
        TokenData(counting, "val", block_size=300)
    TokenData(counting, "val", block_size=299)
    (counting / "train_000001.bin").write_bytes(b"\x00\x00")
    with pytest.raises(GPT2LabError, match="train_000001.bin has 2 bytes instead of"):
        TokenData(counting, "train")
    (counting / "train_000001.bin").unlink()
    with pytest.raises(GPT2LabError, match="shard .*train_000001.bin is missing; prepare the directory again"):
        TokenData(counting, "train")


def test_batches_shapes_and_shift(counting):
    x, y = Batches(TokenData(counting, "train"), batch_size=4, block_size=64).get(3)
    assert x.shape == y.shape == (4, 64) and x.dtype == y.dtype == torch.int64
    torch.testing.assert_close(y, x + 1)  # the stream counts up, so the next token is x + 1 everywhere


def test_batches_deterministic_and_split_invariant(counting):
    d = TokenData(counting, "train")
    single = Batches(d, batch_size=8, block_size=16, seed=7)
    x, _ = single.get(5)
    torch.testing.assert_close(Batches(d, 8, 16, seed=7).get(5)[0], x)  # a fresh object: no hidden state
    assert not torch.equal(single.get(6)[0], x) and not torch.equal(Batches(d, 8, 16, seed=8).get(5)[0], x)
    parts = [Batches(d, 2, 16, grad_accum=2, rank=r, world_size=2, seed=7).get(5, m)[0] for m in (0, 1) for r in (0, 1)]
    starts = [p[:, 0].tolist() for p in parts]
    assert all(set(a).isdisjoint(b) for i, a in enumerate(starts) for b in starts[i + 1 :])
    torch.testing.assert_close(torch.cat(parts), x)  # the same global batch, in block order
    with pytest.raises(ValueError):
        single.get(5, micro_step=1)
    with pytest.raises(GPT2LabError):
        Batches(TokenData(counting, "val"), 2, 300)


def test_val_batches_fixed_and_sharded(counting):
    d = TokenData(counting, "val")
    full = val_batches(d, batch_size=2, block_size=32, n_batches=4)
    again = val_batches(d, 2, 32, 4)
    assert len(full) == 4 and all(torch.equal(a[0], b[0]) for a, b in zip(full, again, strict=True))
    assert full[0][0][0, 0] == 0 and full[-1][1][-1, -1] == 299  # spans the whole split
    ranks = [val_batches(d, 2, 32, 4, rank=r, world_size=2) for r in (0, 1)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(ranks[0] + ranks[1], full[0::2] + full[1::2], strict=True))
    with pytest.raises(GPT2LabError, match="multiple of world_size"):
        val_batches(d, 2, 32, 3, rank=0, world_size=2)


@pytest.mark.parametrize(("n", "block", "stride"), [(10, 4, 2), (100, 16, 16), (101, 16, 5), (7, 16, 8), (50, 8, 1)])
def test_iter_windows_scores_every_token_once(n, block, stride):
    tokens = np.arange(1000, 1000 + n)
    scored = []
    prev_begin = -1
    for x, y in iter_windows(tokens, block, stride):
        assert x.shape == y.shape and x.shape[0] == 1 and x.shape[1] <= block
        begin = int(x[0, 0]) - 1000
        assert begin > prev_begin
        prev_begin = begin
        kept = y[y != -100]
        torch.testing.assert_close(kept, x[y != -100] + 1)  # y is x shifted by one where it counts
        scored += kept.tolist()
    assert scored == list(range(1001, 1000 + n))  # every token after the first, once, in order
    with pytest.raises(GPT2LabError):
        list(iter_windows([1], block, 1))


def test_empty_shard_is_skipped(tmp_path):
    """A hand-made directory may list an empty shard: it is read as zero tokens, not a crash."""
    import json

    import numpy as np

    from gpt2lab.data import TokenData

    np.arange(100, dtype="<u2").tofile(tmp_path / "train_000000.bin")
    (tmp_path / "train_000001.bin").write_bytes(b"")
    shards = [{"file": "train_000000.bin", "tokens": 100}, {"file": "train_000001.bin", "tokens": 0}]
    meta = {"splits": {"train": {"shards": shards, "tokens": 100}, "val": {"shards": [], "tokens": 0}}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    data = TokenData(tmp_path, "train", block_size=8)
    assert len(data) == 100 and data.read(95, 5).tolist() == [95, 96, 97, 98, 99]


def test_binary_files_in_a_directory_are_skipped_and_counted(tmp_path, corpus, capsys):
    """`prepare --input docs/` skips what is not text (images, archives) and says how many; a binary
    file named explicitly is still an error."""
    (corpus / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" + bytes(range(256)))
    (corpus / "sub" / "data.bin").write_bytes(b"\xff\xfe\xfd" * 100)
    summary = prepare(tmp_path / "tok", Source([corpus]), workers=1, progress=False)
    assert summary.skipped_binary_files == 2 and "skipped 2 binary files" in str(summary)
    assert summary.documents["train"] + summary.documents["val"] == 3
    assert main(["prepare", "--input", str(corpus / "logo.png"), "--out", str(tmp_path / "x")]) == 2
    assert "not UTF-8" in capsys.readouterr().err


def test_pipes_in_a_directory_are_skipped_and_one_named_is_refused(tmp_path, corpus, capsys):
    """A named pipe under --input is not text (opening it would wait forever for a writer): a directory's
    is skipped, one named explicitly (or /dev/stdin) is a clear error."""
    from gpt2lab.data.sources import _walk

    os.mkfifo(corpus / "sub" / "queue.txt")
    assert corpus / "sub" / "queue.txt" not in list(_walk(corpus))  # the walk opens nothing
    summary = prepare(tmp_path / "tok", Source([corpus]), workers=1, progress=False)
    assert summary.documents["train"] + summary.documents["val"] == 3
    assert main(["prepare", "--input", str(corpus / "sub" / "queue.txt"), "--out", str(tmp_path / "x")]) == 2
    assert "is not a regular file (a pipe, a socket or a device)" in capsys.readouterr().err


def test_a_directory_that_cannot_be_listed_is_an_error_not_a_smaller_corpus(tmp_path, corpus, capsys, monkeypatch):
    """A subdirectory the user may not read would leave its files out of the corpus without a word: it is
    an error naming it (as root, chmod does not stop a listing, so the refusal is simulated)."""
    scandir, denied = os.scandir, corpus / "sub"

    def refuse(path="."):
        if Path(path) == denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    assert main(["prepare", "--input", str(corpus), "--out", str(tmp_path / "tok")]) == 2
    assert f"error: Permission denied: {denied}; check that the path exists" in capsys.readouterr().err
    assert not (tmp_path / "tok").exists()


def test_val_split_is_always_usable(tmp_path, enc):
    """A corpus whose held-out documents are a few tokens gets whole documents from the end of train until
    val has MIN_VAL_TOKENS; a corpus too small for that keeps its split and is warned about."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(120):  # every 100th document (0.01) is val: one tiny one
        text = "x = 1\n" if i == 99 else SHAKESPEARE.read_text()[i * 1500 : (i + 1) * 1500]
        (docs / f"{i:03d}.txt").write_text(text)
    summary = prepare(tmp_path / "tok", Source([docs]), workers=1, progress=False)
    assert summary.tokens["val"] >= MIN_VAL_TOKENS and not summary.warnings
    val = documents(split_tokens(tmp_path / "tok", "val"), enc)
    assert val[0] == "x = 1\n" and all(d in [p.read_text() for p in docs.iterdir()] for d in val)  # whole documents
    small = tmp_path / "small"
    small.mkdir()
    (small / "a.txt").write_text("one short document\n")
    (small / "b.txt").write_text("and another\n")
    summary = prepare(tmp_path / "tok2", Source([small]), workers=1, progress=False)
    assert summary.tokens["val"] > 0 and "the corpus is small" in summary.warnings[0]


def test_window_count_matches_the_windows():
    """The eval progress bar's total is the number of windows iter_windows yields (no bar stuck at n-1)."""
    rng = random.Random(0)
    for _ in range(300):
        n, block = rng.randint(2, 400), rng.randint(1, 64)
        stride = rng.randint(1, block)
        assert count_windows(n, block, stride) == sum(1 for _ in iter_windows(list(range(n)), block, stride))
