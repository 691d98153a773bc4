"""Helpers for the training tests, and the entry point of their subprocesses.

As a script it runs the gpt2lab CLI (``python tests/dist_worker.py train ...``, also under torchrun),
with faults injected from the environment, the way a crash would hit a real run:

- ``KILL_AT_COMMIT=N``: SIGKILL the process that is about to declare checkpoint N complete, after
  all its files are written (the worst moment: everything on disk, nothing committed).
- ``KILL_AT_STEP=N``: SIGKILL rank 0 when it starts step N (0-based), i.e. mid-run, after earlier
  checkpoints and metrics were written.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np

from gpt2lab.data import write_token_dir
from gpt2lab.train_config import TrainConfig

# The first 200,000 bytes of tiny-shakespeare (public domain): fixed text for the data and training tests.
SHAKESPEARE = Path(__file__).resolve().parent / "data" / "tinyshakespeare-200k.txt"
# A model small enough that a step takes milliseconds: byte-level tokens (vocabulary 256).
TINY_MODEL = {
    "model.preset": "debug",
    "model.vocab_size": 256,
    "model.n_layer": 2,
    "model.n_head": 2,
    "model.n_embd": 32,
    "model.block_size": 64,
}


def byte_corpus(directory: Path, n_train: int = 100_000, n_val: int = 10_000) -> Path:
    """tiny-shakespeare as bytes (token id = byte value)."""
    data = np.frombuffer(SHAKESPEARE.read_bytes()[: n_train + n_val], dtype=np.uint8)
    return write_token_dir(directory, {"train": data[:n_train], "val": data[n_train:]}, vocab_size=256)


def overrides(settings: dict) -> list[str]:
    return [f"--{key}={value}" for key, value in settings.items()]


def metrics(out_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(out_dir: Path) -> list[float]:
    return [r["loss"] for r in metrics(out_dir)]


def settings(data_dir: Path, out_dir: Path, model: dict = TINY_MODEL, **extra) -> dict:
    """A tiny byte-level run: 10 steps of 8 x 32 tokens, every step logged; ``a__b=v`` sets ``a.b``."""
    return (
        model
        | {
            "data.dir": data_dir,
            "data.block_size": 32,
            "data.batch_size": 8,
            "optim.lr": 3e-3,
            "optim.warmup_steps": 2,
            "run.steps": 10,
            "run.eval_every": 5,
            "run.eval_batches": 2,
            "run.ckpt_every": 3,
            "run.log_every": 1,
            "run.seed": 0,
            "run.progress": False,
            "run.out_dir": out_dir,
        }
        | {k.replace("__", "."): v for k, v in extra.items()}
    )


def config(data_dir: Path, out_dir: Path, model: dict = TINY_MODEL, **extra) -> TrainConfig:
    return TrainConfig.load(None, overrides(settings(data_dir, out_dir, model, **extra)))


def trajectory(out_dir: Path) -> list[tuple]:
    """What a resumed run must reproduce exactly: every logged step's loss, lr, grad norm and val loss."""
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"], r.get("val_loss")) for r in metrics(out_dir)]


def masked_targets(get):
    """``Batches.get`` with the targets after every token divisible by 3 ignored (-100): micro-batches then
    score different numbers of targets, the same ones however the global batch is split."""

    def masked(self, step: int, micro_step: int = 0):
        x, y = get(self, step, micro_step)
        return x, y.masked_fill(x % 3 == 0, -100)

    return masked


def _install_faults() -> None:
    from gpt2lab import checkpoint, data

    commit_step = os.environ.get("KILL_AT_COMMIT")
    if commit_step is not None:
        commit = checkpoint._commit

        def killing_commit(tmp: Path, final: Path) -> None:
            if final.name == f"ckpt-{int(commit_step):08d}":
                os.kill(os.getpid(), signal.SIGKILL)
            commit(tmp, final)

        checkpoint._commit = killing_commit

    if os.environ.get("MASK_TARGETS"):
        data.Batches.get = masked_targets(data.Batches.get)

    kill_step = os.environ.get("KILL_AT_STEP")
    if kill_step is not None and os.environ.get("RANK", "0") == "0":
        get = data.Batches.get

        def killing_get(self, step: int, micro_step: int = 0):
            if step == int(kill_step):
                os.kill(os.getpid(), signal.SIGKILL)
            return get(self, step, micro_step)

        data.Batches.get = killing_get


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    _install_faults()
    from gpt2lab.cli import main

    sys.exit(main(sys.argv[1:]))
