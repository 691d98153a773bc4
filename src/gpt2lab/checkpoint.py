"""Training checkpoints: atomic save, resume from the newest complete one, load for inference.

A training ``out_dir`` holds::

    train_config.json          the run's TrainConfig, written when the run starts
    metrics.jsonl              one JSON record per logged step
    ckpt-00000100/             a complete checkpoint (step 100)
        model.pt, optim.pt     format "full" (single, ddp): tensors-only dicts, loaded with weights_only=True
        state/                 format "dcp" (fsdp): torch.distributed.checkpoint shards of model + optimizer
        rng.pt                 every rank's torch/cuda/numpy/python RNG state
        checkpoint.json        step, format, world size, model config, train config; written last
    .tmp-ckpt-00000200/        a checkpoint being written

A checkpoint is written into ``.tmp-ckpt-N``, every file is fsynced, and only then is the directory
renamed to ``ckpt-N``. A rename is atomic, so every ``ckpt-N`` directory is complete, whatever killed the
process and when; leftover ``.tmp-`` directories are ignored and deleted by the next save. The data
position needs no saving: batches are a pure function of (seed, step).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gpt2lab.config import GPTConfig
from gpt2lab.distributed import DistEnv, all_gather_object, barrier, unwrap
from gpt2lab.errors import CheckpointError
from gpt2lab.model import GPT

CHECKPOINT_JSON = "checkpoint.json"
TRAIN_CONFIG_JSON = "train_config.json"
FORMAT_VERSION = 1
_COMPLETE = re.compile(r"^ckpt-(\d+)$")


def checkpoint_format(strategy: str) -> str:
    """FSDP shards are saved as shards (no rank ever holds the whole model); the rest as one full file."""
    return "dcp" if strategy == "fsdp" else "full"


# --- finding checkpoints -------------------------------------------------------------------------


def complete_checkpoints(out_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a training out_dir, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for path in out_dir.iterdir():
        m = _COMPLETE.match(path.name)
        if m and (path / CHECKPOINT_JSON).is_file():
            found.append((int(m.group(1)), path))
    return [path for _, path in sorted(found)]


def latest(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of ``out_dir``, or None."""
    found = complete_checkpoints(out_dir)
    return found[-1] if found else None


def is_training_dir(path: str | Path) -> bool:
    """Whether ``path`` is a training out_dir or one checkpoint directory in it."""
    path = Path(path)
    return (path / CHECKPOINT_JSON).is_file() or (path / TRAIN_CONFIG_JSON).is_file()


def find(path: str | Path) -> Path:
    """The checkpoint a path names: the directory itself, or the newest complete one of an out_dir."""
    path = Path(path)
    if (path / CHECKPOINT_JSON).is_file():
        return path
    newest = latest(path)
    if newest is None:
        raise CheckpointError(
            f"{path} has no complete checkpoint yet (a run saves one every run.ckpt_every steps and at its end)"
        )
    return newest


def read_meta(ckpt: Path) -> dict:
    try:
        meta = json.loads((ckpt / CHECKPOINT_JSON).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {ckpt / CHECKPOINT_JSON} ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{ckpt} has checkpoint format version {meta.get('format_version')!r}, not {FORMAT_VERSION}"
        )
    return meta


def check_model_config(ckpt: Path, config: GPTConfig) -> None:
    """Raise CheckpointError, naming the differing fields, unless ``ckpt`` holds a model of ``config``."""
    saved = read_meta(ckpt)["model_config"]
    wanted = config.to_dict()
    diff = [k for k in wanted if saved.get(k) != wanted[k]]
    if diff:
        raise CheckpointError(
            f"{ckpt} holds a different model: "
            + ", ".join(f"{k}={saved.get(k)!r} there but {wanted[k]!r} in this config" for k in diff)
            + ". Use a new run.out_dir for a new model, or set the model config back to resume this run"
        )


# --- save and resume -----------------------------------------------------------------------------


def save(
    out_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    env: DistEnv,
    meta: dict,
    keep_last: int,
) -> Path:
    """Checkpoint after ``step`` optimizer steps (collective: every rank calls it) and keep the last
    ``keep_last`` complete ones. ``meta`` (model and train config) goes into checkpoint.json."""
    final, tmp = out_dir / f"ckpt-{step:08d}", out_dir / f".tmp-ckpt-{step:08d}"
    fmt = checkpoint_format(env.strategy)
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing this step
        tmp.mkdir(parents=True)
    barrier(env)
    rng = all_gather_object(rng_state(), env)
    if fmt == "dcp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / "state")
    elif env.is_main:
        _save_tensors(unwrap(model).state_dict(), tmp / "model.pt")
        _save_tensors(optimizer.state_dict(), tmp / "optim.pt")
    if env.is_main:
        _save_tensors({"ranks": rng}, tmp / "rng.pt")
        record = {"format_version": FORMAT_VERSION, "step": step, "format": fmt, "world_size": env.world_size}
        _write_json(tmp / CHECKPOINT_JSON, record | meta)
        _fsync(tmp)
    barrier(env)  # every rank's shards are on disk before the checkpoint is declared complete
    if env.is_main:
        _commit(tmp, final)
        _prune(out_dir, keep_last)
    barrier(env)
    return final


def load(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv) -> dict:
    """Restore model, optimizer and this rank's RNG state from ``ckpt`` (collective); returns its metadata."""
    meta = read_meta(ckpt)
    fmt = checkpoint_format(env.strategy)
    if meta["format"] != fmt:
        saved_by = "run.strategy=fsdp" if meta["format"] == "dcp" else "run.strategy=single or ddp"
        raise CheckpointError(
            f"{ckpt} was written with {saved_by} and cannot resume under run.strategy={env.strategy}; resume with "
            f"the same kind of strategy, or export it (gpt2lab export) and fine-tune from it with model.init=DIR"
        )
    if fmt == "dcp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=ckpt / "state")
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        unwrap(model).load_state_dict(_load_tensors(ckpt / "model.pt"))
        optimizer.load_state_dict(_load_tensors(ckpt / "optim.pt"))
    ranks = _load_tensors(ckpt / "rng.pt")["ranks"]
    if len(ranks) == env.world_size:  # with another world size the per-rank streams cannot carry over
        set_rng_state(ranks[env.rank])
    return meta


def load_model(path: str | Path, device: str | torch.device = "cpu") -> GPT:
    """The model of a checkpoint (or of the newest one in an out_dir), in one process, any format."""
    ckpt = find(path)
    meta = read_meta(ckpt)
    config = GPTConfig.from_dict(meta["model_config"])
    if meta["format"] == "full":
        state_dict = _load_tensors(ckpt / "model.pt")
    else:
        state_dict = _load_dcp_model(ckpt / "state", config)
    return GPT.from_state_dict(config, state_dict, device=device)


def _load_dcp_model(path: Path, config: GPTConfig) -> dict[str, torch.Tensor]:
    """Reassemble the full model weights from FSDP shards, without a process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    with torch.device("meta"):
        shapes = GPT(config).state_dict()
    state_dict = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in shapes.items()}
    state_dict["lm_head.weight"] = state_dict["wte.weight"]  # tied: one tensor
    try:
        with warnings.catch_warnings():  # DCP warns that no process group exists, which is the point here
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": state_dict}, checkpoint_id=path, no_dist=True)
    except (CheckpointException, OSError, RuntimeError) as e:  # CheckpointException is a BaseException
        raise CheckpointError(f"cannot read the sharded checkpoint {path}: {e}") from None
    return state_dict


# --- RNG -----------------------------------------------------------------------------------------


def rng_state() -> dict:
    """This process's RNG states as tensors and numbers (safe to load with weights_only=True)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "python_version": py_state[0],
        "python_state": torch.tensor(py_state[1], dtype=torch.int64),
        "python_gauss": py_state[2],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], state["numpy_has_gauss"], state["numpy_gauss"]))
    random.setstate((state["python_version"], tuple(state["python_state"].tolist()), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --- files ---------------------------------------------------------------------------------------


def _save_tensors(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _load_tensors(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refused to load {path}: it needs arbitrary unpickling ({e})") from None
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"cannot read {path}: it is missing or corrupt ({e})") from None


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync(directory: Path) -> None:
    """Flush a directory's entries (the names of new files and renames) to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, final: Path) -> None:
    """Declare a fully written checkpoint complete: one atomic rename."""
    if final.exists():  # the same step saved again (a rerun after a crash right after this rename)
        _remove(final)
    os.rename(tmp, final)
    _fsync(final.parent)


def _prune(out_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints, and debris of killed runs."""
    for old in complete_checkpoints(out_dir)[:-keep_last]:
        _remove(old)
    for debris in out_dir.glob(".trash-*"):
        shutil.rmtree(debris, ignore_errors=True)
    for stale in out_dir.glob(".tmp-ckpt-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _remove(ckpt: Path) -> None:
    """Rename first, then delete: a half-deleted directory must never look like a complete checkpoint."""
    trash = ckpt.with_name(f".trash-{ckpt.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(ckpt, trash)
    shutil.rmtree(trash)
