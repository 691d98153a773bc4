"""Where documents come from: files, directories and globs, JSONL records, the Python standard
library's sources (offline) and tiny-shakespeare (downloaded, verified); each as a stream of text pieces
cut where GPT-2's tokenizer would cut anyway."""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import platform
import re
import sysconfig
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from gpt2lab.errors import ConfigError, GPT2LabError

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
CORPORA = ("stdlib", "shakespeare")
# directories of the standard library that are not "the library": its test suites and installed packages
STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
PIECE_CHARS = 1 << 18  # long texts are tokenized in pieces of about this many characters
READ_BYTES = 1 << 20

# A cut at one of these positions never changes GPT-2 tokenization (encode(a + b) == encode(a) + encode(b)):
# the pre-tokenizer regex always ends a match there, and the match before it needs no lookahead past it.
# 1) after a "\n" that has non-space characters on both sides ("x\n|y"): the "\n" is a match of its own
#    (Python's \S is narrower than the tokenizer's, so what Python calls non-space is non-space there too);
# 2) before " " + letter after a letter ("x| y"; ASCII letters only): " y..." starts a new match.
# Checked at every cut on tiny-shakespeare, stdlib sources and random text in tests/test_data.py.
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)|(?<=[A-Za-z])(?= [A-Za-z])")


def _cut(text: str, limit: int) -> tuple[str, str]:
    """(head, rest) with head ending at a safe cut, at most ``limit`` characters when such a cut exists.

    Returns ("", text) when ``text`` is not longer than ``limit`` or has no safe cut at all.
    """
    if len(text) <= limit:
        return "", text
    # lookahead needs the characters just past the limit; a cut must leave a non-empty head
    window = _SAFE_CUT.finditer(text, max(1, limit - limit // 4), limit + 2)
    cut = max((m.start() for m in window if m.start() <= limit), default=None)
    if cut is None:
        cut = max((m.start() for m in _SAFE_CUT.finditer(text, 1, limit + 2) if m.start() <= limit), default=None)
    if cut is None:  # nothing safe before the limit: take the first cut after it, or keep the text whole
        m = _SAFE_CUT.search(text, limit)
        cut = m.start() if m else None
    return ("", text) if cut is None else (text[:cut], text[cut:])


def split_text(text: str, limit: int = PIECE_CHARS) -> list[str]:
    """``text`` as pieces of about ``limit`` characters whose tokens, concatenated, are those of the whole."""
    pieces = []
    while True:
        head, text = _cut(text, limit)
        if not head:
            return [*pieces, text]
        pieces.append(head)


# A source is a stream of (text, end_of_document, bytes_read) events. A text file arrives as pieces (each
# cut safely) read block by block, so a huge single-file corpus needs little memory and still tokenizes in
# parallel; a JSONL record is parsed whole, then cut the same way.
Events = Iterator[tuple[str, bool, int]]


def input_files(inputs: Sequence[str | Path], exclude: Path | None = None) -> tuple[list[Path], int]:
    """The files named by ``inputs`` (files, directories walked recursively, globs), in a fixed order, and
    how many binary files found in directories or globs were skipped.

    Directories are walked sorted, skipping hidden entries. Files found under ``exclude`` (the output
    directory, which prepare replaces) are left out, and a file named twice is read once. A file named
    explicitly is always kept: if it is not text, reading it fails with a clear error, and if it lies
    under ``exclude`` naming it is an error.
    """
    found: list[tuple[Path, bool]] = []  # (path, named explicitly)
    for spec in inputs:
        path = Path(spec)
        if path.is_file():
            found.append((path, True))
        elif path.is_dir():
            found += [(f, False) for f in _walk(path)]
        elif glob.has_magic(str(spec)):
            matches = sorted(glob.glob(str(spec), recursive=True))
            walked = [f for m in matches for f in ([Path(m)] if Path(m).is_file() else _walk(Path(m)))]
            if not walked:
                raise GPT2LabError(
                    f"--input {str(spec)!r} matches no files; check the pattern (quote it for the shell)"
                )
            found += [(f, False) for f in walked]
        elif path.exists():
            raise GPT2LabError(
                f"--input {str(spec)!r} is not a regular file (a pipe, a socket or a device); save the text to a "
                "file and give that"
            )
        else:
            raise GPT2LabError(
                f"--input {str(spec)!r} does not exist; give a file, a directory, a glob such as 'docs/**/*.txt', "
                "or a .jsonl file"
            )
    out = exclude.resolve() if exclude is not None else None
    seen = {out} if out is not None else set()
    kept, binary = [], 0
    for f, explicit in found:
        real = f.resolve()
        if explicit and out is not None and out in real.parents:
            raise GPT2LabError(
                f"--input {f} lies inside --out {exclude}, which prepare replaces (the file would be deleted); "
                "move it out first, or write the data elsewhere"
            )
        if real not in seen and seen.isdisjoint(real.parents):
            if explicit or not _looks_binary(f):
                kept.append(f)
            else:
                binary += 1
        seen.add(real)
    return kept, binary


def _looks_binary(path: Path, probe: int = 8192) -> bool:
    """A NUL byte or invalid UTF-8 in the first ``probe`` bytes (a cut multi-byte character at the end is fine)."""
    with open(path, "rb") as f:
        head = f.read(probe)
    if b"\0" in head:
        return True
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head)
    except UnicodeDecodeError:
        return True
    return False


def _walk(root: Path, suffix: str | None = None, skip: frozenset[str] = frozenset()) -> Iterator[Path]:
    """The regular files under ``root``, sorted, hidden ones left out. A directory that cannot be listed
    (no permission) is an error, not a part of the corpus silently missing; pipes, sockets and devices
    are not text files (opening a pipe would wait forever for a writer)."""
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skip)
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if not name.startswith(".") and (suffix is None or name.endswith(suffix)) and path.is_file():
                yield path


def _raise(error: OSError) -> None:
    raise error


def stdlib_files() -> list[Path]:
    """The Python standard library's own ``.py`` files (no test suites, no site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return list(_walk(root, suffix=".py", skip=STDLIB_SKIP_DIRS))


def file_events(path: Path, text_field: str) -> Events:
    if path.suffix.lower() == ".jsonl":
        yield from _jsonl_events(path, text_field)
        return
    decoder = codecs.getincrementaldecoder("utf-8")()  # strict: a binary file is an error, not garbage tokens
    buf, pending, offset = "", 0, 0
    retry_at = 0  # after a failed cut, wait for the buffer to double: a cut-free file costs linear time
    with open(path, "rb") as f:  # bytes, so "\r\n" stays as written and progress counts real bytes
        while block := f.read(READ_BYTES):
            try:
                buf += decoder.decode(block)
            except UnicodeDecodeError as e:
                raise GPT2LabError(
                    f"{path} is not UTF-8 text (bad byte near offset {offset + e.start}); "
                    "convert it to UTF-8 or leave it out of --input"
                ) from None
            offset += len(block)
            pending += len(block)
            while len(buf) > max(PIECE_CHARS, retry_at):
                head, buf = _cut(buf, PIECE_CHARS)
                if not head:
                    retry_at = 2 * len(buf)
                    break
                yield head, False, pending
                pending, retry_at = 0, 0
        try:
            buf += decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise GPT2LabError(f"{path} ends inside a UTF-8 character; convert it to UTF-8 text") from None
    yield buf, True, pending


def _jsonl_events(path: Path, text_field: str) -> Events:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                yield "", True, len(line)  # an empty document: skipped, but its bytes count as read
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise GPT2LabError(
                    f"{path}:{lineno}: not a JSON object ({e}); a .jsonl file needs one object per line, "
                    f'such as {{"{text_field}": "..."}}'
                ) from None
            if isinstance(record, dict) and text_field in record and not isinstance(record[text_field], str):
                raise GPT2LabError(
                    f"{path}:{lineno}: field {text_field!r} holds {type(record[text_field]).__name__}, not text; "
                    "each line's field must be a string (name another field with --text-field)"
                )
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                keys = ", ".join(map(repr, record)) if isinstance(record, dict) else type(record).__name__
                raise GPT2LabError(
                    f"{path}:{lineno}: no string field {text_field!r} (found: {keys}); "
                    "name the field holding the text with --text-field"
                )
            pieces = split_text(record[text_field], PIECE_CHARS)
            for i, piece in enumerate(pieces):
                yield piece, i == len(pieces) - 1, len(line) if i == 0 else 0


def text_events(text: str) -> Events:
    pieces = split_text(text, PIECE_CHARS)
    for i, piece in enumerate(pieces):
        yield piece, i == len(pieces) - 1, len(piece.encode())


def download_shakespeare() -> str:
    """tiny-shakespeare (Karpathy's char-rnn copy), verified by sha256."""
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as response:
            data = response.read()
    except (OSError, ValueError) as e:  # URLError and timeouts are OSErrors
        raise GPT2LabError(
            f"cannot download tiny-shakespeare from {SHAKESPEARE_URL} ({e}); without internet, copy that file "
            "here some other way and run: gpt2lab prepare --input path/to/input.txt --out DIR"
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise GPT2LabError(
            f"the downloaded tiny-shakespeare has sha256 {digest}, expected {SHAKESPEARE_SHA256}; "
            "retry, or use --input with a copy you trust"
        )
    return data.decode("utf-8")


@dataclass(frozen=True)
class Source:
    """What to tokenize: input paths (files, directories, globs, .jsonl) or a named corpus."""

    inputs: tuple[str | Path, ...] = ()
    corpus: str | None = None
    text_field: str = "text"  # the field holding the text in .jsonl records
    max_docs: int | None = None  # stop after this many documents (a sample)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        if bool(self.inputs) == (self.corpus is not None):
            raise ConfigError("give either input paths or a corpus name, not both and not neither")
        if self.corpus is not None and self.corpus not in CORPORA:
            raise ConfigError(f"unknown corpus {self.corpus!r}; choose one of {', '.join(CORPORA)}")
        if self.max_docs is not None and self.max_docs < 1:
            raise ConfigError(f"max_docs must be at least 1, got {self.max_docs}")

    def open(self, exclude: Path | None = None) -> tuple[Events, int, dict]:
        """The document events, the total bytes to read (for progress) and a description for meta.json.
        Resolves every input first, so a typo fails before anything is written."""
        if self.corpus == "shakespeare":
            text = download_shakespeare()
            info = {"corpus": self.corpus, "url": SHAKESPEARE_URL, "sha256": SHAKESPEARE_SHA256}
            return text_events(text), len(text.encode()), info
        if self.corpus == "stdlib":
            paths, skipped = stdlib_files(), 0
            info = {"corpus": "stdlib", "path": sysconfig.get_paths()["stdlib"], "python": platform.python_version()}
        else:
            paths, skipped = input_files(self.inputs, exclude=exclude)
            info = {"inputs": [str(i) for i in self.inputs], "text_field": self.text_field}
        if not paths:
            found = f" ({skipped} binary files skipped)" if skipped else ""
            raise GPT2LabError(f"the corpus is empty: no text files were found{found}")
        info |= {"files": len(paths), "skipped_binary_files": skipped}
        if self.max_docs is not None:
            info["max_docs"] = self.max_docs
        events = (event for f in paths for event in file_events(f, self.text_field))
        return events, sum(f.stat().st_size for f in paths), info
