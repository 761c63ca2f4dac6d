"""Multi-process training helpers: torchrun initialisation, rank queries, collectives, DDP wrapping, seeding.

Every helper works in a plain single process (world size 1, no process group): collectives return
their input, `barrier` does nothing. Under `torchrun` (env vars `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
`MASTER_ADDR`, `MASTER_PORT`) `init_distributed` joins the process group: nccl on CUDA, gloo on CPU.
"""
from __future__ import annotations

import gc
import os
import random
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from semiseg.errors import ConfigError, SemisegError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def select_device(device: str) -> torch.device:
    """The device of this process for `train.device` auto | cpu | cuda | cuda:N.

    Under torchrun, "auto"/"cuda" use GPU `LOCAL_RANK`; in a plain process, "auto" is cuda:0 when
    a GPU is available and the CPU otherwise.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    if not device.startswith("cuda"):
        raise ConfigError(f"train.device={device!r}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"train.device={device!r} but no CUDA GPU is available (use train.device=cpu)")
    index = int(device.split(":", 1)[1]) if ":" in device else local_rank
    if index >= torch.cuda.device_count():
        raise ConfigError(f"train.device: GPU {index} requested but only {torch.cuda.device_count()} visible")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def limit_cpu_threads(device: torch.device, num_workers: int) -> None:
    """On the CPU, leave one core per data-loader worker and share the rest among local ranks.

    Oversubscribed OpenMP threads spin against the workers: on 2 cores with 2 workers, a tiny
    Mask2Former step took 5.6 s with 2 intra-op threads and 0.3 s with 1. `OMP_NUM_THREADS`
    set by the user (or torchrun), or a lower thread count already set in this process, wins.
    """
    if device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(min(torch.get_num_threads(), max(1, cores // local_ranks - num_workers)))


def init_distributed(device: torch.device, timeout_minutes: int = 30) -> bool:
    """Join the torchrun process group; True if this call created it (then `destroy_distributed` it).

    A no-op (False) without `WORLD_SIZE` > 1 or when a group already exists.
    """
    if is_distributed() or int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    timeout = timedelta(minutes=timeout_minutes)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None:
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout, **kwargs)
        return True
    # Under torchrun every restart gets its own key space in the rendezvous store: the keys of the
    # killed attempt's group (its peers' addresses) are still there, and gloo would wait for them.
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"semiseg/attempt{restart}/", store),
                            rank=rank, world_size=world_size, timeout=timeout, **kwargs)
    return True


def destroy_distributed() -> None:
    """Leave the process group. Call it once the models wrapped by `wrap_ddp` are out of scope.

    A DDP model kept alive by a reference cycle also keeps its gloo/nccl group alive: freed at
    interpreter shutdown, gloo's threads abort the process ("terminate called without an active
    exception", SIGABRT) after training succeeded. Collecting the cycles first frees it here.
    """
    if is_distributed():
        gc.collect()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """`[obj of rank 0, obj of rank 1, ...]` on every rank (`[obj]` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def reduce_dict(values: dict[str, torch.Tensor], average: bool = True) -> dict[str, torch.Tensor]:
    """Sum (or average) scalar tensors over ranks; every rank gets the result. Keys must match."""
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    stacked = torch.stack([values[k].detach().float().reshape(()) for k in keys])
    dist.all_reduce(stacked)
    if average:
        stacked /= get_world_size()
    return dict(zip(keys, stacked))


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """True only if `flag` is true on every rank (so all ranks take the same branch)."""
    if not is_distributed():
        return flag
    t = torch.tensor([0 if flag else 1], device=device)
    dist.all_reduce(t)
    return int(t.item()) == 0


def wrap_ddp(model: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel around `model` when a process group exists, else `model` itself."""
    if not is_distributed() or not any(p.requires_grad for p in model.parameters()):
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside a DDP (or torch.compile) wrapper; the model itself otherwise."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def collective(make):
    """`make()` on every rank, re-raising rank 0's user error on all ranks (so none waits forever)."""
    error, result = None, None
    try:
        result = make()
    except SemisegError as e:
        error = e
    first = broadcast_object(None if error is None else (type(error), str(error)))
    if first is not None:
        raise first[0](first[1]) from None
    if error is not None:
        raise error
    barrier()
    return result


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices); `deterministic` also picks deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
