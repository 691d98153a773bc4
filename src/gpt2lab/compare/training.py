"""What the comparison's training jobs share: paired initial weights, a run of ``gpt2lab.train.train`` that
starts from them, and reading a run back.

Pairing: seed s draws the initial weights once, in the baseline's shape (learned positions, every key/value
head, full attention); every variant of that seed copies each tensor whose name and shape match, and a
grouped-query variant takes the first n_kv_head key/value heads. So two variants of one seed differ only
by their architecture (and train on the same batches), and comparisons are paired by seed.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from gpt2lab import checkpoint, files
from gpt2lab.compare.pool import JOB_JSON
from gpt2lab.config import GPTConfig
from gpt2lab.data import read_meta
from gpt2lab.errors import CheckpointError
from gpt2lab.load import save_pretrained
from gpt2lab.model import GPT
from gpt2lab.tokenizer import tokenizer_of_vocabulary
from gpt2lab.train import METRICS, TrainData, train
from gpt2lab.train_config import TrainConfig

INIT = "init"  # the paired initial weights, a model directory inside the run directory while it trains


def baseline_shape(config: GPTConfig) -> GPTConfig:
    """The shape a seed's initial weights are drawn in: ``config`` with learned positions, every key/value
    head and full attention (its vocabulary, width, depth and block size)."""
    return dataclasses.replace(
        config, pos_emb="learned", n_kv_head=config.n_head, window=None, window_pattern="L", rope_interpolation=1.0
    )


def paired_state_dict(config: GPTConfig, seed: int) -> dict[str, torch.Tensor]:
    """Initial weights of a model of ``config`` for ``seed``: the baseline shape's, drawn with ``seed``, copied
    where names and shapes match; the key and value rows of ``c_attn`` keep the first n_kv_head heads."""
    torch.manual_seed(seed)
    base = GPT(baseline_shape(config)).state_dict()
    with torch.device("meta"):
        wanted = GPT(config).state_dict()
    C, kv = config.n_embd, config.n_kv_head * config.head_dim
    out = {}
    for key, like in wanted.items():
        tensor = base[key]
        if tensor.shape != like.shape:  # c_attn of fewer kv heads: (C + 2 C) rows -> (C + 2 kv)
            q, k, v = tensor.split((C, C, C), dim=0)
            tensor = torch.cat((q, k[:kv], v[:kv]), dim=0)
        out[key] = tensor.clone()
    out["lm_head.weight"] = out["wte.weight"]
    return out


def write_init(config: dict, seed: int, directory: Path, vocabulary: dict | None = None) -> None:
    """The paired initial weights of ``config`` (a GPTConfig dict) as a model directory, its ids those of
    ``vocabulary`` (a prepared directory's, ``TokenData.vocabulary``; None: GPT-2's)."""
    cfg = GPTConfig.from_dict(config)
    model = GPT.from_state_dict(cfg, paired_state_dict(cfg, seed))
    save_pretrained(model, directory, tokenizer_of_vocabulary(vocabulary))


def train_paired(cfg: TrainConfig, init: dict | None, data: TrainData | Callable | None = None) -> list[dict]:
    """Train ``cfg`` (resuming if its out_dir holds a checkpoint) from the paired initial weights ``init``
    (``{"config": GPTConfig dict, "seed": s}``, written to out_dir/init for the run: ``cfg.model.init`` must
    name that directory), or from ``cfg.model.init`` as it is when ``init`` is None. Returns metrics.jsonl."""
    out_dir = Path(cfg.run.out_dir)
    if init is not None:
        vocabulary = read_meta(Path(cfg.data.dir)).get("vocabulary") if data is None else None
        write_init(init["config"], init["seed"], out_dir / INIT, vocabulary)
    train(cfg, data)
    if init is not None:
        shutil.rmtree(out_dir / INIT, ignore_errors=True)  # reproducible from the seed: not worth the disk
    return files.read_jsonl(out_dir / METRICS)[0]


def run_config(base: TrainConfig, out_dir: Path, init: Path, model: dict | None = None, **changes) -> TrainConfig:
    """``base``'s training for one run in ``out_dir`` that starts from the model directory ``init``: ``model``
    holds the fine-tuning fields it changes (e.g. rope_interpolation), ``changes`` maps a section to new
    values, e.g. ``run={"steps": 10}``. The run shows no progress bar of its own (the comparison has one)."""
    values = base.to_dict()
    values["model"] = {"init": str(init), **(model or {})}
    for section, new in changes.items():
        values[section] = values[section] | new
    values["run"] |= {"out_dir": str(out_dir), "progress": False}
    return TrainConfig.from_dict(values)


def load_trained(run_dir: Path, device: str | torch.device = "cpu") -> GPT:
    """The final model of a training run, in eval mode. A run whose job finished but whose checkpoints
    are gone (the output's .gitignore leaves them out of a commit) is an error that says how to train it
    again."""
    try:
        return checkpoint.load_model(run_dir, device=device).eval()
    except CheckpointError:
        if checkpoint.latest(run_dir) is not None or not (run_dir / JOB_JSON).is_file():
            raise
        raise CheckpointError(
            f"{run_dir} finished before, but its checkpoints are gone (they are left out of commits), and a job "
            f"reads its model: delete {run_dir / JOB_JSON} to train it again"
        ) from None


def val_curve(records: list[dict], key: str = "val_loss") -> list[list[float]]:
    """[step, value] of every evaluation record of a run's metrics."""
    return [[r["step"], r[key]] for r in records if key in r]
