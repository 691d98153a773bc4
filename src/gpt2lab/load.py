"""Model directories: what ``--model`` names -> a GPT, and a GPT -> an HF-format directory.

``--model`` may name an HF GPT-2 directory (``config.json`` + ``model.safetensors``, a sharded
safetensors index or ``pytorch_model.bin``), a directory gpt2lab wrote (``save_pretrained``, ``convert``,
``export``), a training out_dir (its newest complete checkpoint) or one checkpoint directory, or a
hub name (``gpt2``, ``gpt2-medium``, ..., or ``owner/name``: the local Hugging Face cache first, then a
download). Weights are read safely: safetensors, or tensors-only unpickling.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt2lab import checkpoint, files
from gpt2lab.config import GPTConfig
from gpt2lab.data.format import META
from gpt2lab.device import check_fits, inference_dtype, resolve_device
from gpt2lab.errors import CheckpointError, ConfigError, first_line
from gpt2lab.hf import config_from_json, from_hf_state_dict, hf_config, to_hf_state_dict
from gpt2lab.model import GPT, Backends
from gpt2lab.quantize import Int8Linear, quantize_int8
from gpt2lab.tokenizer import EOT, VOCABULARY_JSON, CompactTokenizer, bpe_files, bundled_files, load_tokenizer

HUB_REPOS = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TOKENIZER_FILES = ("vocab.json", "merges.txt", VOCABULARY_JSON)
# what transformers reads beside a model before (tokenizer.json) or besides (generation_config.json's end of
# text) the files save_pretrained writes: a replaced model's would describe it, not the new one
OTHER_MODEL_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
)


def load_model(
    name_or_path: str | Path,
    device: str | torch.device = "cpu",
    offline: bool = False,
    backends: Backends | None = None,
) -> GPT:
    """A GPT from anything ``--model`` accepts (see the module docstring), on ``device``."""
    device = resolve_device(str(device))  # checked: a device this build has, never meta
    directory = resolve(name_or_path, offline=offline)
    if checkpoint.is_training_dir(directory):
        return checkpoint.load_model(directory, device=device, backends=backends)
    config = read_config(directory)
    check_fits(config)
    state_dict = from_hf_state_dict(read_weights(directory), config)
    try:
        return GPT.from_state_dict(config, state_dict, device=device, backends=backends)
    except CheckpointError as e:
        raise CheckpointError(f"{directory}: {e}; the weights and config.json come from different models") from None


def load_for_inference(name_or_path: str | Path, device: str = "auto", dtype: str = "auto", int8: bool = False):
    """(model in eval mode, its tokenizer) for predicting and generating: the device resolved (``auto``:
    CUDA when available), the weights cast to ``dtype`` (``auto``: bfloat16 on a GPU, float32 elsewhere),
    and the linear layers made int8 if asked (CPU, float32). Token ids past the tokenizer's vocabulary (a
    model whose embeddings were resized for tokens added elsewhere) are never predicted."""
    dev = resolve_device(device)
    model = load_model(name_or_path, device=dev).to(inference_dtype(dev, dtype)).eval()
    tokenizer = tokenizer_of(name_or_path)
    if tokenizer.n_vocab < model.config.vocab_size:  # embeddings resized for tokens this tokenizer lacks
        model.config.vocab_size = tokenizer.n_vocab  # ids it cannot decode become padding rows, never predicted
    if int8:
        model = quantize_int8(model)
    return model, tokenizer


def tokenizer_of(name_or_path: str | Path):
    """The tokenizer a model was trained with: GPT-2's, or the one recorded beside it
    (``tokenizer.load_tokenizer``); ``name_or_path`` as ``load_model`` takes it."""
    return load_tokenizer(resolve(name_or_path))


def load_for_rewrite(name_or_path: str | Path, out: str | Path) -> tuple[GPT, Path]:
    """The model named by ``name_or_path`` and the directory ``out`` to write a new version of it to,
    checked first: never the model's own directory, never an existing file."""
    source, target = resolve(name_or_path), Path(out).expanduser()
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"--out {target} is an existing file; name a directory to write the model into")
    if target.exists() and target.resolve() == source.resolve():
        raise CheckpointError(f"--out {target} is the model's own directory; write the new model elsewhere")
    return load_model(source), target


def resolve(name_or_path: str | Path, offline: bool = False) -> Path:
    """A local directory holding the model: the path itself, or the hub snapshot of a model name
    (from the local cache, else downloaded unless ``offline``)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the directory that holds config.json and the weights")
        return path
    name = str(name_or_path)
    repo = HUB_REPOS.get(name, name if re.fullmatch(r"[\w.-]+/[\w.-]+", name) else None)
    if repo is None:
        raise CheckpointError(
            f"{name!r} is neither an existing directory nor a known model name; "
            f"use a path, one of {sorted(HUB_REPOS)}, or an HF repo id like owner/name"
        )
    try:
        return Path(_download(repo, offline))
    except CheckpointError as e:
        if name in HUB_REPOS:
            raise
        raise CheckpointError(f"there is no directory {path}, and {e}") from None  # a mistyped path, most likely


def _download(repo: str, offline: bool) -> str:
    """The local snapshot of hub model ``repo``: from the cache if it holds the weights, else downloaded
    (safetensors, or pytorch_model.bin for a repo that has no safetensors)."""
    from huggingface_hub import snapshot_download

    patterns = [
        "config.json",
        "*.safetensors",
        "model.safetensors.index.json",
        "vocab.json",
        "merges.txt",
        "tokenizer.json",
    ]
    try:
        cached = snapshot_download(repo, allow_patterns=patterns, local_files_only=True)
        if _has_weights(Path(cached)):
            return cached
        missing = "is in the local Hugging Face cache without its weights"  # e.g. tokenizer files only
    except Exception:
        missing = "is not in the local Hugging Face cache"
    if offline:
        raise CheckpointError(f"model {repo!r} {missing}; download it once online, or pass a local directory")
    try:
        snapshot = snapshot_download(repo, allow_patterns=patterns)
        if not _has_weights(Path(snapshot)):
            snapshot = snapshot_download(repo, allow_patterns=[*patterns, "pytorch_model.bin"])
        return snapshot
    except Exception as e:
        raise CheckpointError(
            f"model {repo!r} {missing} and could not be downloaded "
            f"({type(e).__name__}: {first_line(e)}). Connect to the internet once "
            f"(or set HF_HOME to a cache that has it), or pass a local directory with config.json and weights."
        ) from None


def _has_weights(directory: Path) -> bool:
    return any((directory / name).is_file() for name in WEIGHT_FILES)


def read_config(directory: Path) -> GPTConfig:
    """The GPTConfig of a model directory's config.json (HF's fields, or ours under ``gpt2lab``)."""
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no config.json; is it a model directory (HF format or gpt2lab)?")
    try:
        return config_from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-export the checkpoint") from None
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, read safely (safetensors, or weights-only unpickling)."""
    if (directory / "model.safetensors").is_file():
        return _load_safetensors(directory / "model.safetensors")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return {k: v for shard in _index_shards(index) for k, v in _load_safetensors(directory / shard).items()}
    if (directory / "pytorch_model.bin").is_file():
        return _load_bin(directory / "pytorch_model.bin")
    raise CheckpointError(f"{directory} has no weights: expected one of {', '.join(WEIGHT_FILES)}")


def _index_shards(index: Path) -> list[str]:
    """The shard files a safetensors index names, checked."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
        if not shards or not all(isinstance(s, str) and "/" not in s for s in shards):
            raise ValueError("its weight_map names no shard files, or names files outside the directory")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index} is malformed ({e}); download or export the model again") from None
    return shards


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"weight file {path} is missing; download or export the model again")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"cannot read {path}: it is truncated or corrupt ({e}); download or export it again"
        ) from None


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    obj = checkpoint.load_tensors(path)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors; download or export the model again")
    return obj


def save_pretrained(model: GPT, directory: str | Path, tokenizer=None) -> int:
    """Write config.json, model.safetensors and the tokenizer files (vocab.json, merges.txt: what
    transformers, CTranslate2's and llama.cpp's converters read, GPT-2's unless ``tokenizer`` is a
    directory's own BPE; or vocabulary.json for a model trained in a compact vocabulary); files appear
    complete or not at all, and a previous model's tokenizer files of the other kind are removed.
    Returns the number of weights written (a plain GPT-2's without its vocabulary padding)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} is a file; name a directory to write the model into")
    if checkpoint.is_training_dir(directory):
        raise CheckpointError(
            f"{directory} is a training run's directory, which its checkpoints would be mixed with; "
            "write the model to a directory of its own"
        )
    if (directory / META).is_file():
        raise CheckpointError(
            f"{directory} is a prepared data directory ({META} and token shards); write the model to a directory "
            "of its own"
        )
    if any(isinstance(m, Int8Linear) for m in model.modules()):
        raise CheckpointError(
            "an int8 model cannot be saved: its weights are rounded to 8 bits and no format here holds them; "
            "save the float32 model and quantize it after loading (--int8, or gpt2lab.quantize.quantize_int8)"
        )
    tokenizer_files = _tokenizer_files(tokenizer)
    names = ["model.safetensors", "config.json", *tokenizer_files]
    in_the_way = [directory / name for name in names if (directory / name).is_dir()]
    if in_the_way:  # checked before any file is replaced: the directory never holds half a new model
        raise CheckpointError(
            f"{in_the_way[0]} is a directory where a model file goes; move it or choose another directory"
        )
    eos_id = EOT if tokenizer is None else tokenizer.eot_token
    replaces_a_model = (directory / "config.json").is_file()  # its tokenizer files are that model's
    directory.mkdir(parents=True, exist_ok=True)
    state_dict = to_hf_state_dict(model)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".tmp-") as tmp:
        tmp = Path(tmp)
        need = sum(t.numel() * t.element_size() for t in state_dict.values())
        with files.disk_space(directory, need):
            save_file(state_dict, tmp / "model.safetensors", metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(hf_config(model.config, eos_id), indent=2) + "\n")
            for name, data in tokenizer_files.items():
                (tmp / name).write_bytes(data)
        mode = 0o666 & ~_umask()  # as any new file: safetensors' own files are readable by their owner only
        for name in names:
            os.chmod(tmp / name, mode)
            os.replace(tmp / name, directory / name)
        stale = {*TOKENIZER_FILES, *OTHER_MODEL_FILES} - set(names) if replaces_a_model else set()
        for name in sorted(stale):  # the replaced model's tokenizer and generation settings
            (directory / name).unlink(missing_ok=True)
    files.fsync_dir(directory)
    return sum(t.numel() for t in state_dict.values())


def _tokenizer_files(tokenizer) -> dict[str, bytes]:
    """The tokenizer files of a model directory (name -> contents): GPT-2's vocab.json + merges.txt, the
    ones a directory's own BPE was read from, or vocabulary.json for a compact vocabulary."""
    if isinstance(tokenizer, CompactTokenizer):
        return {VOCABULARY_JSON: tokenizer.to_json().encode()}
    name = getattr(tokenizer, "name", None)
    if tokenizer is None or name == "gpt2":
        return {hf: path.read_bytes() for hf, path in zip(("vocab.json", "merges.txt"), bundled_files(), strict=True)}
    own = bpe_files(tokenizer)
    if own is None:
        shown = tokenizer if name is None else name
        raise CheckpointError(f"cannot write the files of tokenizer {shown!r}: pass one gpt2lab.load_tokenizer read")
    return own


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
