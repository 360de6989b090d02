"""Processes of a torchrun job, for the scripts that shard work by image index (sample_ddp.py,
extract_features.py). train.py leaves this to Accelerate.

Launched by torchrun (RANK, WORLD_SIZE, LOCAL_RANK in the environment), a script joins the process group:
NCCL on CUDA, gloo on the CPU. Launched as `python script.py`, it is one process and never touches
torch.distributed, so the collectives below are no-ops there and a single-GPU or CPU run needs no
rendezvous.
"""
import os
from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist


class DistributedError(RuntimeError):
    user_error = True  # config.main_guard prints it as one line and exits 2


def setup_distributed(device_flag: str) -> Tuple[int, int, torch.device]:
    """-> (rank, world size, device) from torchrun's environment; (0, 1, device) without it.

    device_flag "cuda" (or "cuda:N") picks the GPU of this process's LOCAL_RANK and makes it current;
    anything else is taken as a torch device. The process group is joined only when the world has
    more than one process.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_flag.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DistributedError(f"--device {device_flag}: no CUDA device is available; use --device cpu")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_flag)
    if world > 1:
        if device.type == "cuda":
            # device_id binds the communicator to this GPU now, instead of NCCL guessing it at the first
            # collective (and warning that a wrong guess can hang).
            dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
        else:
            dist.init_process_group("gloo", rank=rank, world_size=world)
    return rank, world, device


def _joined() -> bool:
    return dist.is_available() and dist.is_initialized()


def teardown_distributed() -> None:
    """Leave the process group, if this process joined one."""
    if _joined():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (nothing to wait for in a single process)."""
    if _joined():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not _joined():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> Optional[List[Any]]:
    """Every rank's `obj`, in rank order, as a list on rank 0; None on the other ranks."""
    if not _joined():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out
