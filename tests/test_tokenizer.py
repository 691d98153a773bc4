"""The offline GPT-2 tokenizer equals transformers' GPT-2 tokenizer, and checkpoint dirs can bring their own."""

from __future__ import annotations

import json
import shutil

import pytest

from gpt2lab import load_tokenizer
from gpt2lab.errors import CheckpointError
from gpt2lab.tokenizer import EOT, CompactTokenizer, bundled_files

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [
    "Hello, world! The dog ran.",
    "  leading spaces, trailing spaces   ",
    "whitespace   runs\t\ttabs\n\n\nnewlines \n \r\n end",
    "naïve café – “quotes” — Ελληνικά, русский, 日本語のテキスト, 한국어, עברית",
    "emoji 👍🏽 🎉 family 👨‍👩‍👧 flags 🇫🇷",
    "def f(x):\n    return x ** 2  # comment\n\nclass A:\n\tpass\n",
    "<|endoftext|>a document<|endoftext|>The next one",
    "I'm, you're, he's, we'll, they've, don't, I'd, can't, IT'S, y'all",
    "numbers 3.14159 1,000,000 2024-01-01 0x1F 123456789 007",
    'url https://example.com/a?b=c&d=e <b>html</b> {"json": [1, 2]}',
    "\u00a0no-break space, zero\u200bwidth, combining e\u0301",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "",
]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """transformers' GPT2TokenizerFast built offline from the bundled files under HF's names."""
    from transformers import GPT2TokenizerFast

    directory = tmp_path_factory.mktemp("hf_tok")
    encoder_json, vocab_bpe = bundled_files()
    shutil.copyfile(encoder_json, directory / "vocab.json")
    shutil.copyfile(vocab_bpe, directory / "merges.txt")
    tok = GPT2TokenizerFast.from_pretrained(directory)
    assert len(tok) == 50257 and len(tok.get_vocab()) == 50257, "HF tokenizer built with an empty vocabulary"
    assert tok.convert_tokens_to_ids("<|endoftext|>") == EOT
    return tok


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_matches_transformers(hf_tokenizer, text):
    """Our ids equal HF's GPT-2 tokenizer on varied text, and both decode back to the text."""
    tok = load_tokenizer()
    ids = tok.encode(text, allowed_special="all")
    assert ids == hf_tokenizer(text)["input_ids"]
    assert tok.decode(ids) == text
    assert hf_tokenizer.decode(ids) == text


def test_all_texts_at_once_and_special_token(hf_tokenizer):
    """The concatenation of all texts matches too, and <|endoftext|> is the single token 50256."""
    tok = load_tokenizer()
    text = "<|endoftext|>".join(TEXTS)
    ids = tok.encode(text, allowed_special="all")
    assert ids == hf_tokenizer(text)["input_ids"]
    assert ids.count(EOT) == len(TEXTS) - 1 + sum(t.count("<|endoftext|>") for t in TEXTS)
    assert tok.n_vocab == 50257 and tok.eot_token == EOT


def test_checkpoint_dir_files_are_used(tmp_path):
    """load_tokenizer(dir) builds from the dir's vocab.json/merges.txt: with the last merge removed, the
    merged token no longer exists and <|endoftext|> moves to id 50255."""
    encoder_json, vocab_bpe = bundled_files()
    encoder = json.loads(encoder_json.read_text(encoding="utf-8"))
    last = max((i, t) for t, i in encoder.items() if t != "<|endoftext|>")[1]  # token 50255, the last merge
    merges = vocab_bpe.read_text(encoding="utf-8").rstrip("\n").split("\n")
    assert "".join(merges[-1].split()) == last
    (tmp_path / "merges.txt").write_text("\n".join(merges[:-1]) + "\n", encoding="utf-8")
    del encoder[last]
    encoder["<|endoftext|>"] = 50255
    (tmp_path / "vocab.json").write_text(json.dumps(encoder), encoding="utf-8")

    bundled, custom = load_tokenizer(), load_tokenizer(tmp_path)
    text = bundled.decode([50255])
    assert bundled.encode(text) == [50255]
    assert len(custom.encode(text)) > 1
    assert custom.decode(custom.encode(text)) == text
    assert custom.encode("<|endoftext|>", allowed_special="all") == [50255]
    assert custom.n_vocab == 50256


def test_a_bpe_laid_out_otherwise_than_gpt2s_is_refused_as_such(tmp_path):
    """A BPE trained with the tokenizers library puts <|endoftext|> first and its byte alphabet in another
    order: refused with what gpt2lab reads, not called damaged alone."""
    encoder = json.loads(bundled_files()[0].read_text(encoding="utf-8"))
    alphabet = sorted(t for t, i in encoder.items() if i < 256)
    (tmp_path / "vocab.json").write_text(json.dumps({"<|endoftext|>": 0} | {t: i + 1 for i, t in enumerate(alphabet)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(CheckpointError, match="laid out as GPT-2's own .* laid out otherwise"):
        load_tokenizer(tmp_path)


def test_dir_without_tokenizer_files_uses_bundled(tmp_path):
    """A model dir without vocab.json/merges.txt falls back to the bundled GPT-2 files."""
    (tmp_path / "vocab.json").write_text("{}")  # only one of the two files: not a tokenizer
    tok = load_tokenizer(tmp_path)
    assert tok.encode("Hello world") == [15496, 995]


def test_a_tokenizer_json_alone_must_be_gpt2s(tmp_path):
    """transformers 5 saves tokenizer.json only: GPT-2's loads as GPT-2's; another one is an error naming
    the command that writes its vocab.json/merges.txt, after which the directory's own BPE loads."""
    from tokenizers import Tokenizer
    from transformers import GPT2TokenizerFast

    encoder_json, vocab_bpe = bundled_files()
    gpt2, custom = tmp_path / "gpt2", tmp_path / "custom"
    for directory, merges in ((gpt2, None), (custom, 300)):
        files = tmp_path / f"{directory.name}-files"
        files.mkdir()
        encoder = json.loads(encoder_json.read_text(encoding="utf-8"))
        lines = vocab_bpe.read_text(encoding="utf-8").split("\n")
        if merges is not None:  # GPT-2's first merges only
            encoder = {t: i for t, i in encoder.items() if i < 256 + merges} | {"<|endoftext|>": 256 + merges}
            lines = lines[: 1 + merges] + [""]
        (files / "vocab.json").write_text(json.dumps(encoder), encoding="utf-8")
        (files / "merges.txt").write_text("\n".join(lines), encoding="utf-8")
        GPT2TokenizerFast.from_pretrained(files).save_pretrained(directory)
        assert not (directory / "vocab.json").exists()

    assert load_tokenizer(gpt2).encode("Hello world") == [15496, 995]
    with pytest.raises(CheckpointError, match="tokenizer other than GPT-2's") as refused:
        load_tokenizer(custom)
    assert "Tokenizer.from_file" in str(refused.value)
    Tokenizer.from_file(str(custom / "tokenizer.json")).model.save(str(custom))  # the command it names
    mine = load_tokenizer(custom)
    assert mine.n_vocab == 257 + 300 and mine.encode("Hello world") != [15496, 995]
    assert mine.decode(mine.encode(TEXTS[3])) == TEXTS[3]


@pytest.mark.parametrize("size", [257, 1024])
def test_compact_tokenizer_round_trips_any_text(size):
    """A compact vocabulary spells what it does not keep as bytes: every text survives encode/decode,
    special token, emoji and invalid surrogate-free Unicode included."""
    base = load_tokenizer()
    kept = [EOT, *range(200, 200 + size - 257)]
    tok = CompactTokenizer(kept)
    texts = ["def main():\n    return 0\n", "naïve café 😀 — 中文", "a<|endoftext|>b", "", " " * 9]
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and all(0 <= i < tok.n_vocab for i in ids)
        assert tok.decode_bytes(tok.from_gpt2(base.encode(text, allowed_special="all"))) == text.encode()
    assert tok.encode("<|endoftext|>") == [tok.eot_token] and tok.eot_token == 256
    found = []  # GPT-2's tokens of the texts: one id each where kept (256 + its place), else its bytes
    for text in texts:
        want = []
        for t in base.encode_ordinary(text):
            want += [256 + kept.index(t)] if t in kept else list(base.decode_single_token_bytes(t))
            found.append(t in kept)
        assert tok.encode_ordinary(text) == want
    assert not all(found) and any(found) == (size > 257)  # tokens spelled, and kept where there is room


def test_compact_tokenizer_file_round_trip(tmp_path):
    tok = CompactTokenizer([EOT, 11, 13])
    tok.to_file(tmp_path / "vocabulary.json")
    again = load_tokenizer(tmp_path)
    assert again.kept == tok.kept and again.encode("a, b.") == tok.encode("a, b.")


@pytest.mark.parametrize("kept", ["5", "[50256, null]", '["50256"]', "[50256, true]"])
def test_a_malformed_compact_vocabulary_is_an_error_naming_the_file(tmp_path, kept):
    (tmp_path / "vocabulary.json").write_text(f'{{"kind": "gpt2-bytes", "kept_gpt2_ids": {kept}}}')
    with pytest.raises(CheckpointError, match=r"vocabulary\.json is malformed .*copy it again"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(("vocab", "merges"), [('{"a": 0}', "#version: 0.2\na b\n"), ("", "a b\n")])
def test_tokenizer_files_that_are_not_gpt2_bpe_are_an_error_saying_so(tmp_path, vocab, merges):
    (tmp_path / "vocab.json").write_text(vocab)
    (tmp_path / "merges.txt").write_text(merges)
    with pytest.raises(
        CheckpointError, match="laid out otherwise .* or damaged; use such a BPE, or copy the files again"
    ):
        load_tokenizer(tmp_path)


def test_a_checkpoint_directory_finds_its_runs_vocabulary_and_a_missing_one_is_an_error(tmp_path):
    """ckpt-N inside a run directory gets the run's compact vocabulary, as load_model finds the run's
    model; a directory that does not exist is an error, not GPT-2's tokenizer in its place."""
    from gpt2lab.checkpoint import CHECKPOINT_JSON
    from gpt2lab.errors import CheckpointError

    tok = CompactTokenizer([EOT, 11, 13])
    tok.to_file(tmp_path / "vocabulary.json")
    ckpt = tmp_path / "ckpt-00000010"
    ckpt.mkdir()
    (ckpt / CHECKPOINT_JSON).write_text("{}")
    assert load_tokenizer(ckpt).kept == tok.kept
    other = tmp_path / "elsewhere" / "ckpt-00000010"  # a checkpoint-like name is not enough: no checkpoint.json
    other.mkdir(parents=True)
    (tmp_path / "elsewhere" / "vocabulary.json").write_text((tmp_path / "vocabulary.json").read_text())
    assert load_tokenizer(other).encode("Hello world") == [15496, 995]
    with pytest.raises(CheckpointError, match="is not a directory"):
        load_tokenizer(tmp_path / "missing")
