"""The few collectives ted_stream needs, over torch.distributed when it is initialised."""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def barrier() -> None:
    if active():
        dist.barrier()


def collective_device() -> torch.device:
    """Where a collective's tensors must live: NCCL moves only CUDA tensors (this rank's device);
    gloo and the other CPU backends move CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_bytes(data: np.ndarray | None, src: int = 0) -> np.ndarray:
    """Broadcast a uint8 array from ``src``; other ranks pass None."""
    dev = collective_device()
    size = torch.tensor([0 if data is None else len(data)], dtype=torch.int64, device=dev)
    dist.broadcast(size, src)
    buf = torch.empty(int(size.item()), dtype=torch.uint8, device=dev)
    if rank() == src:
        buf.copy_(torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8)))
    dist.broadcast(buf, src)
    return buf.cpu().numpy()


def all_gather_records(ids: np.ndarray, values: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every rank's (ids, values), in rank order, on every rank."""
    dev = collective_device()
    world = dist.get_world_size()
    n = torch.tensor([len(ids)], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    packed = torch.zeros(2, longest, dtype=torch.float64, device=dev)
    # float64 holds every sample id below 2**53 exactly, and every float32 score.
    packed[0, : len(ids)] = torch.from_numpy(ids.astype(np.float64))
    packed[1, : len(ids)] = torch.from_numpy(values.astype(np.float64))
    gathered = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed)
    out = []
    for size, g in zip(sizes, gathered):
        g = g[:, : int(size.item())].cpu().numpy()
        out.append((g[0].astype(np.int64), g[1].astype(np.float32)))
    return out
