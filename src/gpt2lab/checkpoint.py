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

import errno
import json
import os
import pickle
import random
import re
import shutil
import struct
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gpt2lab import files
from gpt2lab.config import GPTConfig
from gpt2lab.device import check_fits
from gpt2lab.distributed import DistEnv, all_gather_object, barrier, on_every_rank, unwrap
from gpt2lab.errors import CheckpointError, ConfigError, first_line
from gpt2lab.model import GPT, Backends

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


def trained_length(path: str | Path) -> int | None:
    """The sequence length a training run trained at (its ``data.block_size``), for its out_dir or one of its
    checkpoint directories; None for any other path (a model directory records no such length)."""
    path = Path(path).expanduser()
    if not path.is_dir() or not is_training_dir(path):
        return None
    length = read_meta(find(path))["train_config"].get("data", {}).get("block_size")
    return length if isinstance(length, int) and length > 0 else None


_META_KEYS = {"step": int, "format": str, "world_size": int, "model_config": dict, "train_config": dict}


def read_meta(ckpt: Path) -> dict:
    """The checked checkpoint.json of a checkpoint directory."""
    path = ckpt / CHECKPOINT_JSON
    try:
        meta = json.loads(path.read_text())
    except PermissionError:  # the file may be fine: the CLI names the path and the permission
        raise
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path} ({e}); {_damaged(ckpt)}") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(f"{ckpt} has checkpoint format version {version!r}, not {FORMAT_VERSION}")
    bad = [k for k, kind in _META_KEYS.items() if not isinstance(meta.get(k), kind)]
    if "train_config" not in bad and not all(isinstance(v, dict) for v in meta["train_config"].values()):
        bad.append("train_config")  # its sections are tables
    if bad or meta["format"] not in ("full", "dcp"):
        what = f"missing or malformed {', '.join(bad)}" if bad else f"unknown format {meta['format']!r}"
        raise CheckpointError(f"{path} is damaged ({what}); resume from another checkpoint or start a new run")
    return meta


TRAINING_FIELDS = ("dropout", "rope_interpolation")  # how the model trains, not its architecture


def check_model_config(ckpt: Path, config: GPTConfig) -> None:
    """Raise CheckpointError, naming the differing fields, unless ``ckpt`` holds a model of ``config``'s
    architecture (its dropout and rope interpolation may change between runs)."""
    saved = read_meta(ckpt)["model_config"]
    wanted = config.to_dict()
    diff = [k for k in wanted if saved.get(k) != wanted[k] and k not in TRAINING_FIELDS]
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
    rng = all_gather_object(rng_state(env.device), env)
    try:
        on_every_rank(env, lambda: _write(tmp, fmt, model, optimizer, env, rng, step, meta), CheckpointError)
    except BaseException:
        if env.is_main:  # nothing half-written may stay behind taking space
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if env.is_main:
        _commit(tmp, final)
        _prune(out_dir, keep_last)
    barrier(env)
    return final


def _write(tmp: Path, fmt: str, model, optimizer, env: DistEnv, rng: list, step: int, meta: dict) -> None:
    """This rank's part of a checkpoint: its shards (dcp), or everything (rank 0 of a full checkpoint)."""
    if fmt == "dcp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        need = _state_bytes(model_sd, optim_sd)
        try:
            with files.disk_space(tmp / "state", need):
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / "state")
        except CheckpointException as e:  # a BaseException, raised on every rank together
            failures = _failures(e)
            if any(isinstance(f, OSError) and f.errno in (errno.ENOSPC, errno.EDQUOT) for f in failures):
                raise files.DiskFullError(files.full_message(tmp / "state", need)) from None
            raise CheckpointError(
                f"cannot write the sharded checkpoint {tmp / 'state'} ({first_line(failures[0])})"
            ) from None
    elif env.is_main:
        model_sd = unwrap(model).state_dict()
        optim_sd = optimizer.state_dict()
        need = _state_bytes(model_sd, optim_sd)
        _save_tensors(model_sd, tmp / "model.pt", need)
        _save_tensors(optim_sd, tmp / "optim.pt", need)
    if env.is_main:
        _save_tensors({"ranks": rng}, tmp / "rng.pt")
        record = {"format_version": FORMAT_VERSION, "step": step, "format": fmt, "world_size": env.world_size}
        files.write_json(tmp / CHECKPOINT_JSON, record | meta)
        files.fsync_dir(tmp)


def _state_bytes(*state_dicts: dict) -> int:
    """Bytes of the tensors in (nested) state dicts: what a checkpoint needs on disk, about."""

    def size(obj) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(size(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(size(v) for v in obj)
        return 0

    return sum(size(sd) for sd in state_dicts)


def check_resumable(ckpt: Path, strategy: str) -> dict:
    """``ckpt``'s metadata, where a run of ``strategy`` can resume from it (FSDP's sharded checkpoints and
    the full ones of single/ddp do not resume into each other)."""
    meta = read_meta(ckpt)
    if meta["format"] != checkpoint_format(strategy):
        saved_by = "run.strategy=fsdp" if meta["format"] == "dcp" else "run.strategy=single or ddp"
        raise CheckpointError(
            f"{ckpt} was written with {saved_by} and cannot resume under run.strategy={strategy}; resume with "
            f"the same kind of strategy, or export it (gpt2lab export) and fine-tune from it with model.init=DIR"
        )
    return meta


def load(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv) -> dict:
    """Restore model, optimizer and this rank's RNG state from ``ckpt`` (collective); returns its metadata."""
    meta = check_resumable(ckpt, env.strategy)
    fmt = meta["format"]
    if fmt == "dcp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        try:
            dcp.load(state, checkpoint_id=ckpt / "state")
        except CheckpointException as e:  # a BaseException, raised on every rank together
            raise _damaged_shards(ckpt / "state", e) from None
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        _restore(ckpt / "model.pt", unwrap(model).load_state_dict)
        _restore(ckpt / "optim.pt", optimizer.load_state_dict)

    def restore_rng(state: dict) -> None:
        ranks = state["ranks"]
        if len(ranks) == env.world_size:  # with another world size the per-rank streams cannot carry over
            set_rng_state(ranks[env.rank], env.device)

    _restore(ckpt / "rng.pt", restore_rng)
    return meta


def _restore(path: Path, into: Callable):
    """``into`` what the tensors file ``path`` holds; a file that reads but holds something else than
    its checkpoint.json describes (another model's weights, another optimizer's state) is damaged."""
    state = load_tensors(path)
    try:
        return into(state)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(
            f"{path} does not hold what its checkpoint.json describes ({first_line(e)}); {_damaged(path.parent)}"
        ) from None


def load_model(path: str | Path, device: str | torch.device = "cpu", backends: Backends | None = None) -> GPT:
    """The model of a checkpoint (or of the newest one in an out_dir), in one process, any format."""
    ckpt = find(path)
    meta = read_meta(ckpt)
    try:
        config = GPTConfig.from_dict(meta["model_config"])
    except ConfigError as e:
        raise CheckpointError(f"{ckpt / CHECKPOINT_JSON}: {e}") from None
    check_fits(config)
    damaged = f"{ckpt} does not hold the model its {CHECKPOINT_JSON} describes"
    if meta["format"] == "full":
        state_dict = load_tensors(ckpt / "model.pt")
        if not isinstance(state_dict, dict):
            raise CheckpointError(f"{damaged}: model.pt is not a state dict")
    else:
        layers = GPT.layers_in(_dcp_keys(ckpt / "state"))
        if layers != config.n_layer:  # before building anything to read the shards into
            raise CheckpointError(f"{damaged}: its n_layer is {config.n_layer} but the weights hold {layers} layers")
        state_dict = _load_dcp_model(ckpt / "state", config)
    try:
        return GPT.from_state_dict(config, state_dict, device=device, backends=backends)
    except CheckpointError as e:
        raise CheckpointError(f"{damaged}: {e}") from None


def _dcp_keys(path: Path) -> list[str]:
    """The model tensors' names in a sharded checkpoint, from its metadata alone."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        names = FileSystemReader(path).read_metadata().state_dict_metadata
    except Exception as e:
        raise CheckpointError(
            f"cannot read the sharded checkpoint {path} ({first_line(e)}); it is incomplete or damaged: resume "
            "from another checkpoint"
        ) from None
    return [k.removeprefix("model.") for k in names if k.startswith("model.")]


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
    except (CheckpointException, Exception) as e:  # CheckpointException is a BaseException
        raise _damaged_shards(path, e) from None
    return state_dict


def _damaged_shards(path: Path, e: BaseException) -> CheckpointError:
    """A sharded checkpoint that DCP cannot read, with the first failure (of the first rank that had one)."""
    return CheckpointError(
        f"cannot read the sharded checkpoint {path} ({first_line(_failures(e)[0])}); it is incomplete or damaged: "
        "resume from another checkpoint"
    )


def _failures(e: BaseException) -> list[BaseException]:
    """What failed: each rank's exception of a DCP CheckpointException, or ``e`` itself."""
    failures = getattr(e, "failures", None)  # a CheckpointException's: rank -> (exception, traceback)
    return [exc for exc, _ in failures.values()] if failures else [e]


# --- RNG -----------------------------------------------------------------------------------------


def rng_state(device: torch.device) -> dict:
    """This process's RNG states as tensors and numbers (safe to load with weights_only=True); on a GPU
    ``device``'s own generator's (not the current device's: a single process may train on cuda:1)."""
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
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], state["numpy_has_gauss"], state["numpy_gauss"]))
    random.setstate((state["python_version"], tuple(state["python_state"].tolist()), state["python_gauss"]))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


# --- files ---------------------------------------------------------------------------------------


def _save_tensors(obj, path: Path, need_bytes: int | None = None) -> None:
    files.write_atomic(path, lambda f: torch.save(obj, f), need_bytes)


def load_tensors(path: Path):
    """What a tensors-only file holds, unpickled safely (``weights_only``): a file that would need
    arbitrary unpickling carries code and is refused."""
    try:
        with warnings.catch_warnings():  # the error below says what a pickle of another protocol gets
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"cannot read {path}: it is missing") from None
    except PermissionError:  # the file may be fine: the CLI names the path and the permission
        raise
    except (pickle.UnpicklingError, KeyError, IndexError) as e:  # KeyError, IndexError: the unpickler on junk
        operand = re.search(r"Unsupported operand \d+", str(e))  # an instruction torch's safe loader lacks
        if isinstance(e, pickle.UnpicklingError) and operand is None:  # what it refused to import: code
            raise CheckpointError(
                f"refused to load {path}: it carries Python code (not plain tensors), so it is not loaded"
            ) from None
        detail = (
            "its pickled data does not parse"
            if operand is None
            else f"torch's safe loader cannot read it: {operand[0]}"
        )
    except (OSError, RuntimeError, EOFError, ValueError, struct.error) as e:  # struct.error: a junk header
        detail = first_line(e)
    raise CheckpointError(
        f"cannot read {path}: it is truncated or not a PyTorch tensor file ({detail}); {_damaged(path.parent)}"
    )


def _damaged(directory: Path) -> str:
    """What to do about a file that cannot be read in ``directory``: a training checkpoint's can be
    deleted (a run resumes from the newest complete one left), a model's written again."""
    if (directory / CHECKPOINT_JSON).is_file():
        return f"the checkpoint is damaged: delete {directory} to resume from the one before it, or name another"
    return "download or export the model again"


def _commit(tmp: Path, final: Path) -> None:
    """Declare a fully written checkpoint complete: one atomic rename."""
    if (tmp / "state").is_dir():  # the shards' names (DCP flushes the files, not their directory)
        files.fsync_dir(tmp / "state")
    if final.exists():  # the same step saved again (a rerun after a crash right after this rename)
        files.remove_dir(final)
    os.rename(tmp, final)
    files.fsync_dir(final.parent)


def _prune(out_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints, and debris of killed runs."""
    for old in complete_checkpoints(out_dir)[:-keep_last]:
        files.remove_dir(old)
    for debris in out_dir.glob(".trash-*"):
        shutil.rmtree(debris, ignore_errors=True)
    for stale in out_dir.glob(".tmp-ckpt-*"):
        shutil.rmtree(stale, ignore_errors=True)
