"""Which device this process uses, and whether a launcher started it beside other workers.

Work is not split by rank: every worker takes the plan's units by lease (shards/units.py), so
processes never talk to each other and any number may run. Under `accelerate launch` or
torchrun, LOCAL_RANK picks the GPU, and RANK/WORLD_SIZE (or --rank/--world-size) only name the
worker; WORLD_SIZE > 1, a Slurm array task or a multi-task Slurm step imply --join.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    rank: int
    world_size: int
    device: str


class DeviceError(ValueError):
    """--device names a device this machine does not have."""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def check_device(device: str) -> str:
    """The device as torch spells it, or DeviceError saying why this machine cannot use it.
    Checked before the output folder is touched, so a typo costs nothing."""
    if device == "cpu":  # every machine has one; asking torch would load it (seconds) for nothing
        return device
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise DeviceError(f"{device!r} is not a torch device (cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{device!r}: CUDA is not available on this machine (torch "
                              f"{torch.__version__}); use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"{device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"{device!r}: MPS (Apple GPU) is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise DeviceError(f"{device!r}: ddaug runs on cpu, cuda or mps")
    return str(dev)


def resolve_placement(rank: int | None, world_size: int | None, device: str | None) -> Placement:
    env_rank, env_world = _env_int("RANK"), _env_int("WORLD_SIZE")
    known_world = world_size is not None or env_world is not None
    rank = rank if rank is not None else (env_rank or 0)
    world_size = world_size if world_size is not None else (env_world or 1)
    # The rank only names the worker now (e.g. a Slurm array index): it must fit a world size
    # only where one was given.
    if world_size < 1 or rank < 0 or (known_world and rank >= world_size):
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if device is None:
        import torch

        if torch.cuda.is_available():
            local = _env_int("LOCAL_RANK") or 0
            device = f"cuda:{local % torch.cuda.device_count()}"
        else:
            device = "cpu"
    else:
        device = check_device(device)
    return Placement(rank=rank, world_size=world_size, device=device)


def launcher_joins(placement: Placement) -> bool:
    """Started as one of several workers (so it joins the others without --join)."""
    return (placement.world_size > 1 or bool(os.environ.get("SLURM_ARRAY_TASK_ID"))
            or (_env_int("SLURM_NTASKS") or 1) > 1)
