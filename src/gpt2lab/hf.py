"""The only module that knows HF's GPT-2 file layout: read and write ``config.json`` + weights.

HF GPT-2 stores ``c_attn``, ``attn.c_proj``, ``mlp.c_fc`` and ``mlp.c_proj`` weights as Conv1D,
shape (in, out); our nn.Linear holds (out, in), so exactly these four are transposed both ways.
Keys may carry a ``transformer.`` prefix; old files carry ``attn.bias``/``attn.masked_bias`` buffers
(a causal mask, not a parameter), which are ignored. Every other unknown or missing key is an error.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt2lab.config import GPTConfig
from gpt2lab.errors import CheckpointError, ConfigError
from gpt2lab.model import GPT
from gpt2lab.tokenizer import bundled_files

HUB_REPOS = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
CONV1D = re.compile(r"^h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
IGNORED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def load_pretrained(name_or_path: str | Path, device: str | torch.device = "cpu", offline: bool = False) -> GPT:
    """A GPT from an HF GPT-2 directory, a gpt2lab directory, a training out_dir (its newest complete
    checkpoint) or checkpoint directory, or a hub name (cache first, then online)."""
    directory = resolve(name_or_path, offline=offline)
    from gpt2lab import checkpoint  # imported here: it pulls in torch.distributed

    if checkpoint.is_training_dir(directory):
        return checkpoint.load_model(directory, device=device)
    config = read_config(directory)
    state_dict = from_hf_state_dict(read_weights(directory), config)
    return GPT.from_state_dict(config, state_dict, device=device)


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
    return Path(_download(repo, offline))


def _download(repo: str, offline: bool) -> str:
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "*.safetensors", "model.safetensors.index.json", "vocab.json", "merges.txt"]
    try:
        return snapshot_download(repo, allow_patterns=patterns, local_files_only=True)
    except Exception:
        if offline:
            raise CheckpointError(f"model {repo!r} is not in the local Hugging Face cache") from None
    try:
        return snapshot_download(repo, allow_patterns=patterns)
    except Exception as e:
        raise CheckpointError(
            f"model {repo!r} is not in the local Hugging Face cache and could not be downloaded "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Connect to the internet once "
            f"(or set HF_HOME to a cache that has it), or pass a local directory with config.json and weights."
        ) from None


def read_config(directory: Path) -> GPTConfig:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no config.json; is it a model directory (HF format or gpt2lab)?")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-export the checkpoint") from None
    try:
        if "gpt2lab" in cfg:
            return GPTConfig.from_dict(cfg["gpt2lab"])
        return _config_from_hf(cfg)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _config_from_hf(cfg: dict) -> GPTConfig:
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise ConfigError(f"model_type is {cfg['model_type']!r}; only GPT-2 checkpoints (model_type 'gpt2') load")
    if cfg.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConfigError(f"activation_function {cfg['activation_function']!r} is not GPT-2's tanh GELU (gelu_new)")
    n_embd = cfg.get("n_embd", 768)
    if cfg.get("n_inner") not in (None, 4 * n_embd):
        raise ConfigError(f"n_inner={cfg['n_inner']} is not 4 * n_embd; only GPT-2's MLP width is supported")
    if cfg.get("scale_attn_by_inverse_layer_idx") or not cfg.get("scale_attn_weights", True):
        raise ConfigError("attention scaling differs from GPT-2's 1/sqrt(head_dim); not supported")
    return GPTConfig(
        vocab_size=cfg.get("vocab_size", 50257),
        block_size=cfg.get("n_positions", 1024),
        n_layer=cfg.get("n_layer", 12),
        n_head=cfg.get("n_head", 12),
        n_embd=n_embd,
        layer_norm_epsilon=cfg.get("layer_norm_epsilon", 1e-5),
    )


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, read safely (safetensors, or weights-only unpickling)."""
    if (directory / "model.safetensors").is_file():
        return _load_safetensors(directory / "model.safetensors")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in _load_safetensors(directory / shard).items()}
    if (directory / "pytorch_model.bin").is_file():
        return _load_bin(directory / "pytorch_model.bin")
    raise CheckpointError(f"{directory} has no weights: expected one of {', '.join(WEIGHT_FILES)}")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"weight file {path} is missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"cannot read {path}: it is truncated or corrupt ({e}); download or export it again"
        ) from None


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {path}: it needs arbitrary unpickling, which can run code "
            f"({str(e).splitlines()[0]}). Only plain tensor files load; convert it to safetensors with a tool you trust."
        ) from None
    except Exception as e:  # truncated zip, not a torch file, ...
        raise CheckpointError(f"cannot read {path}: it is truncated or not a PyTorch weights file ({e})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    return obj


def from_hf_state_dict(sd: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """HF GPT-2 tensors -> our state dict: strip the prefix, drop mask buffers, transpose Conv1D, check all."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        key = key.removeprefix("transformer.")
        if IGNORED.match(key):
            continue
        # a contiguous (out, in) copy: a transposed view would leave every matmul on a strided weight
        out[key] = tensor.t().contiguous() if CONV1D.match(key) else tensor
    with torch.device("meta"):
        expected = GPT(config).state_dict()
    lm_head = out.pop("lm_head.weight", None)
    if lm_head is not None and "wte.weight" in out and not torch.equal(lm_head, out["wte.weight"]):
        raise CheckpointError("lm_head.weight differs from wte.weight; GPT-2 ties them, untied heads are not supported")
    out["lm_head.weight"] = out.get("wte.weight")
    missing = sorted(k for k in expected if k not in out or out[k] is None)
    unknown = sorted(set(out) - set(expected))
    if missing or unknown:
        raise CheckpointError(
            "checkpoint does not match its config: "
            + (f"missing keys {_few(missing)}" if missing else "")
            + ("; " if missing and unknown else "")
            + (f"unknown keys {_few(unknown)}" if unknown else "")
        )
    for key, ref in expected.items():
        if out[key].shape != ref.shape:
            raise CheckpointError(
                f"tensor {key} has shape {tuple(out[key].shape)} but the config needs {tuple(ref.shape)}; "
                "the weights and config.json come from different models"
            )
    return out


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights in HF GPT-2 layout: ``transformer.`` prefix, Conv1D transposed, tied lm_head omitted."""
    out = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        tensor = tensor.detach()
        if key == "wte.weight":
            tensor = tensor[: model.config.vocab_size] if _is_plain_gpt2(model.config) else tensor
        out[f"transformer.{key}"] = (tensor.t() if CONV1D.match(key) else tensor).contiguous().cpu()
    return out


def hf_config(config: GPTConfig) -> dict:
    """config.json for a model: HF's GPT-2 fields, plus our full config under ``gpt2lab``."""
    plain = _is_plain_gpt2(config)
    ours = config.to_dict() | ({"padded_vocab_size": None} if plain else {})
    return {
        "architectures": ["GPT2LMHeadModel"] if plain else ["GPT2LabVariant"],
        "model_type": "gpt2" if plain else "gpt2lab",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": True,
        "gpt2lab": ours,
    }


def _is_plain_gpt2(config: GPTConfig) -> bool:
    """Whether transformers' GPT2LMHeadModel can hold this config (no variant switched on)."""
    return config.pos_emb == "learned" and config.n_kv_head == config.n_head and config.window is None


def save_pretrained(model: GPT, directory: str | Path) -> None:
    """Write config.json, model.safetensors and the tokenizer files; files appear complete or not at all."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    encoder_json, vocab_bpe = bundled_files()
    with tempfile.TemporaryDirectory(dir=directory, prefix=".tmp-") as tmp:
        tmp = Path(tmp)
        save_file(to_hf_state_dict(model), tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(model.config), indent=2) + "\n")
        shutil.copyfile(encoder_json, tmp / "vocab.json")
        shutil.copyfile(vocab_bpe, tmp / "merges.txt")
        for name in ("model.safetensors", "config.json", "vocab.json", "merges.txt"):
            os.replace(tmp / name, directory / name)


def _few(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")
