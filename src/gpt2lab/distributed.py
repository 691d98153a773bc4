"""Process groups and model wrapping for data-parallel training (DDP or FSDP2), launched by torchrun.

The model code knows nothing of this module. ``wrap`` follows torchtitan's order: (compile, done by
the caller) then FSDP2 ``fully_shard`` on every transformer block, then on the root. The root group
holds wte, wpe, ln_f and lm_head; wte and lm_head are one tied Parameter, so sharding them with the
root keeps the tie (a separate group for lm_head would all-gather the same tensor twice and break it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2lab import files
from gpt2lab.device import resolve_device
from gpt2lab.errors import ConfigError, GPT2LabError

T = TypeVar("T")


@dataclass
class DistEnv:
    """Where this process sits: its rank among ``world_size`` and the device it computes on."""

    strategy: str
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False  # True when init() created the process group (and shutdown() destroys it)
    control: object | None = None  # a gloo group for CPU messages beside NCCL (None: the default group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.strategy != "single"


def _env_int(name: str, default: int) -> int:
    """A count torchrun sets in the environment (``default`` where it is unset)."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise ConfigError(f"the environment variable {name}={os.environ[name]!r} is not a count; torchrun sets it")
    return number


def init(strategy: str, device: str = "auto") -> DistEnv:
    """Join the torchrun process group (gloo on CPU, NCCL on CUDA) for ddp/fsdp; nothing for single.

    torchrun sets RANK, LOCAL_RANK, WORLD_SIZE and the rendezvous address, on one machine
    (``--standalone``) or many (``--nnodes=N --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT``).
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if strategy == "single":
        if world_size > 1:
            raise ConfigError(
                f"torchrun started {world_size} processes but run.strategy is single; "
                "pass --run.strategy=ddp or --run.strategy=fsdp"
            )
        return DistEnv(strategy, 0, 0, 1, resolve_device(device))
    if "RANK" not in os.environ:
        raise ConfigError(
            f"run.strategy={strategy} needs the torchrun launcher, e.g. "
            f"torchrun --standalone --nproc_per_node=2 -m gpt2lab train --run.strategy={strategy} ..."
        )
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        if dev.index is None:  # plain "cuda": one GPU per process, by local rank
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        if dev.type == "cuda":  # binding the device up front lets NCCL set up eagerly, on the right GPU
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    control = dist.new_group(backend="gloo") if dev.type == "cuda" else None
    return DistEnv(strategy, rank, local_rank, world_size, dev, owns_group=owns, control=control)


def shutdown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, env: DistEnv) -> nn.Module:
    """The model as the strategy trains it: itself (single), DDP, or FSDP2-sharded in place (fsdp).

    Every rank must hold identical weights before the call: DDP broadcasts rank 0's anyway, while
    fully_shard keeps each rank's own slice of its local copy.
    """
    if env.strategy == "ddp":
        return DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if env.strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        try:  # public since torch 2.6; imported here because it takes seconds
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            from torch.distributed._composable.fsdp import fully_shard

        mesh = init_device_mesh(env.device.type, (env.world_size,))
        for block in model.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying GPT (DDP keeps it as ``.module``; FSDP2 shards the module in place)."""
    return model.module if isinstance(model, DDP) else model


@contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Forward + backward inside this either reduce gradients across ranks (``enabled``) or only
    accumulate them locally: all micro-steps but the last skip the communication."""
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(enabled)
        yield
    elif isinstance(model, DDP) and not enabled:
        with model.no_sync():
            yield
    else:
        yield


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The element-wise sum over ranks (in place); a no-op in a single process."""
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, env: DistEnv) -> bool:
    """Whether ``flag`` is set on any rank: one number summed over the ranks on the CPU (over gloo, beside
    NCCL), so that it costs microseconds and never waits for the device. Collective."""
    if not env.distributed:
        return flag
    total = torch.tensor([float(flag)])
    dist.all_reduce(total, group=env.control)
    return bool(total.item())


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def on_every_rank(env: DistEnv, fn: Callable[[], T], error: type[GPT2LabError] = GPT2LabError) -> T | None:
    """Run ``fn`` on every rank and return what it returned there; where it fails on any rank with a
    user-facing error (a GPT2LabError, or an OSError on a named path), raise it as ``error`` on all of
    them, so that no rank waits forever in a later collective for one that gave up. Collective."""
    message = result = None
    try:
        result = fn()
    except GPT2LabError as e:
        message = str(e)
    except OSError as e:
        if e.filename is None:
            raise
        message = files.os_error_message(e)
    messages = [m for m in all_gather_object(message, env) if m]
    if messages:
        raise error(messages[0])
    return result


def all_gather_object(obj, env: DistEnv) -> list:
    """Every rank's ``obj`` (picklable), in rank order."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (FSDP2 gradient norms are DTensors); plain tensors pass through."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
