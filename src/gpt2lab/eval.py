"""Scoring a trained model on held-out text: strided perplexity of one long text (``gpt2lab eval``),
the loss of every token of fixed rows at a given context length (``gpt2lab compare``), and bits per byte."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from gpt2lab.data import TokenData
from gpt2lab.data.batches import count_windows, iter_windows
from gpt2lab.errors import GPT2LabError
from gpt2lab.model import GPT
from gpt2lab.tokenizer import check_same_vocabulary, vocabulary_of

MAX_EXP = math.log(sys.float_info.max)  # about 709.8 nats: a larger loss has an infinite perplexity in floats


@dataclass
class Score:
    """Mean loss (nats per token) over ``tokens`` scored tokens that stand for ``bytes`` bytes of text."""

    loss: float
    tokens: int
    bytes: int | None = None

    @property
    def perplexity(self) -> float:
        return math.inf if self.loss >= MAX_EXP else math.exp(self.loss)  # past that, exp overflows; nan stays nan

    @property
    def bits_per_byte(self) -> float | None:
        """Loss in bits per byte of text: comparable across tokenizers and vocabularies."""
        return bits_per_byte(self.loss, self.tokens, self.bytes)

    def __str__(self) -> str:
        bpb = f", {self.bits_per_byte:.4f} bits per byte" if self.bytes else ""
        ppl = f"{self.perplexity:.3f}" if self.perplexity < 1e6 else f"{self.perplexity:.4g}"  # 1.234e+108, inf
        return f"loss {self.loss:.4f}, perplexity {ppl}{bpb}"


def bits_per_byte(loss: float, tokens: int, nbytes: int | None) -> float | None:
    """Nats per token -> bits per byte, given how many bytes of text the tokens stand for."""
    if not nbytes:
        return None
    return loss * tokens / nbytes / math.log(2)


@torch.no_grad()
def perplexity(
    model: GPT,
    tokens: np.ndarray | torch.Tensor | Iterable[int],
    block_size: int,
    stride: int,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[float, int]:
    """(mean loss per token, tokens scored) over one long text: windows of ``block_size`` every
    ``stride`` tokens, each token scored once with up to ``block_size - stride`` tokens of extra context."""
    model.eval()
    device = model.wte.weight.device
    tokens = np.asarray(tokens)
    nll, count = 0.0, 0
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def flush() -> None:
        nonlocal nll, count
        x, y = torch.cat([p[0] for p in pending]).to(device), torch.cat([p[1] for p in pending]).to(device)
        _, loss = model(x, y)
        n = int((y != -100).sum())
        nll, count = nll + float(loss) * n, count + n
        pending.clear()

    with tqdm(total=count_windows(len(tokens), block_size, stride), disable=not progress, unit="window") as bar:
        for x, y in iter_windows(tokens, block_size, stride):
            if pending and x.shape[1] != pending[0][0].shape[1]:  # only the last window is shorter
                flush()
            pending.append((x, y))
            bar.update()
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
    return nll / count, count


def score_path(
    model: GPT,
    tokenizer,
    path: str | Path,
    block_size: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[Score, int, int]:
    """``gpt2lab eval``: the strided perplexity of a prepared directory's val split or of a UTF-8 text
    file, and the block size and stride used (defaults: the model's block_size, which is its context or,
    for a rotary model, the length it was trained at; a stride of half the block). Returns (score,
    block_size, stride)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise GPT2LabError(f"--data {path} does not exist; give a prepared directory or a text file")
    if batch_size < 1:
        raise GPT2LabError(f"--batch-size must be at least 1, got {batch_size}")
    limit = model.config.max_positions
    block_size = model.config.block_size if block_size is None else block_size  # a rotary model's training length
    if block_size < 1 or (limit is not None and block_size > limit):
        raise GPT2LabError(
            f"--block-size must be between 1 and the model's context ({limit or 'unbounded'}), got {block_size}"
        )
    stride = max(1, block_size // 2) if stride is None else stride
    if not 1 <= stride <= block_size:
        raise GPT2LabError(f"--stride must be between 1 and the block size ({block_size}), got {stride}")
    tokens, nbytes = _read_scored_text(path, tokenizer)
    if len(tokens) < 2:
        what = f"the val split of {path}" if path.is_dir() else str(path)
        raise GPT2LabError(f"{what} has {len(tokens)} token(s); scoring needs at least 2")
    if int(np.max(tokens)) >= model.config.vocab_size:
        raise GPT2LabError(
            f"{path} holds token ids up to {int(np.max(tokens))}, outside the model's vocabulary of {model.config.vocab_size}"
        )
    loss, n = perplexity(model, tokens, block_size, stride, batch_size, progress)
    return Score(loss, n, nbytes), block_size, stride


def _read_scored_text(path: Path, tokenizer) -> tuple[np.ndarray, int | None]:
    """The tokens of a prepared directory's val split or of a text file, and the bytes of text they
    stand for (what bits per byte divides by: every token but the first is scored)."""
    if path.is_dir():
        data = TokenData(path, "val")
        check_same_vocabulary(vocabulary_of(tokenizer), data.vocabulary, "the model", f"--data {path}")
        data.verify()
        tokens = data.read(0, len(data))
        if len(tokens) and int(tokens.max()) >= tokenizer.n_vocab:
            raise GPT2LabError(
                f"{path} holds token ids up to {int(tokens.max())}, outside the model's tokenizer of "
                f"{tokenizer.n_vocab} ids; score data prepared for this model"
            )
        per_token = data.bytes_per_token
        if not per_token or not len(tokens):
            return tokens, None
        return tokens, round(per_token * len(tokens)) - _text_bytes(tokenizer, int(tokens[0]))
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GPT2LabError(
            f"{path} is not UTF-8 text (bad byte near offset {e.start}); give a text file or a prepared directory"
        ) from None
    if "\0" in text:
        raise GPT2LabError(f"{path} is a binary file, not text; give a text file or a prepared directory")
    tokens = np.asarray(tokenizer.encode_ordinary(text))
    return tokens, len(raw) - (_text_bytes(tokenizer, int(tokens[0])) if len(tokens) else 0)


def _text_bytes(tokenizer, token: int) -> int:
    """Bytes of text a token stands for (0 for the end of text, a separator: as prepare counts them)."""
    return 0 if token == tokenizer.eot_token else len(tokenizer.decode_single_token_bytes(token))


def stretches(tokens: np.ndarray, length: int, count: int) -> torch.Tensor:
    """``count`` evenly spaced stretches of ``length + 1`` tokens (inputs and their targets), int64."""
    if len(tokens) < length + 1:
        raise GPT2LabError(
            f"the text has {len(tokens)} tokens, too few for one {length}-token stretch; "
            "use more data or a shorter context"
        )
    starts = np.linspace(0, len(tokens) - length - 1, count).round().astype(np.int64)
    return torch.from_numpy(np.stack([tokens[s : s + length + 1] for s in starts]).astype(np.int64))


@torch.no_grad()
def token_losses(model: GPT, rows: torch.Tensor, length: int, batch_tokens: int = 16384) -> np.ndarray:
    """The loss of every target of ``rows`` (N, L + 1: inputs and their targets) when each row is cut into
    consecutive windows of ``length`` tokens (L a multiple of it), so a token's context starts at its
    window's start: (N, L) float32. How the loss falls (or rises) with the context a token has."""
    n, L = rows.shape[0], rows.shape[1] - 1
    if L % length:
        raise ValueError(f"rows of {L} tokens cannot be cut into windows of {length}")
    device = model.wte.weight.device
    x, y = rows[:, :-1].reshape(-1, length), rows[:, 1:].reshape(-1, length)
    per_batch = max(1, batch_tokens // length)
    out = []
    for i in range(0, len(x), per_batch):
        logits, _ = model(x[i : i + per_batch].to(device))
        target = y[i : i + per_batch].to(device)
        out.append(F.cross_entropy(logits.float().transpose(1, 2), target, reduction="none").cpu())
    return torch.cat(out).reshape(n, L).numpy()
