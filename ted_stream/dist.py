"""The few collectives ted_stream needs, over torch.distributed when it is initialised."""

from __future__ import annotations

import contextlib
import os

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
    if dist.get_backend() != "nccl":
        return torch.device("cpu")
    current = torch.cuda.current_device()
    local = os.environ.get("LOCAL_RANK")
    if current != 0 or local is None:  # torch.cuda.set_device chose it (or no launcher says)
        return torch.device("cuda", current)
    # Before torch.cuda.set_device (a dataset built before the model) every rank is on cuda:0;
    # the launcher's LOCAL_RANK names this rank's GPU (one visible GPU per rank: cuda:0).
    return torch.device("cuda", int(local) % torch.cuda.device_count())


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


def record_bytes(num_samples: int) -> int:
    """Bytes one (id, score) record takes on the wire: a 32-bit id while every id fits in it
    (tables below 2**31 samples), else a 64-bit one, plus a float32 score."""
    return (4 if num_samples <= 2**31 else 8) + 4


def all_gather_records(ids: np.ndarray, values: np.ndarray, num_samples: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every rank's (ids, values), in rank order, on every rank; ids lie in [0, num_samples)."""
    dev = collective_device()
    world = dist.get_world_size()
    id_type = np.int32 if record_bytes(num_samples) == 8 else np.int64
    n = torch.tensor([len(ids)], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts) * record_bytes(num_samples)
    # One byte buffer per rank: its ids, then its scores; shorter ranks padded to the longest.
    mine = np.zeros(longest, np.uint8)
    raw = np.concatenate(
        [np.ascontiguousarray(ids, id_type).view(np.uint8), np.ascontiguousarray(values, np.float32).view(np.uint8)]
    )
    mine[: len(raw)] = raw
    gathered = [torch.empty(longest, dtype=torch.uint8, device=dev) for _ in range(world)]
    dist.all_gather(gathered, torch.from_numpy(mine).to(dev))
    out = []
    for count, g in zip(counts, gathered):
        buf = g.cpu().numpy()
        cut = count * np.dtype(id_type).itemsize
        out.append((buf[:cut].view(id_type).astype(np.int64), buf[cut : cut + 4 * count].view(np.float32).copy()))
    return out


def all_to_all(data: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The first ``counts[0]`` elements of ``data`` go to rank 0, the next ``counts[1]`` to rank 1,
    and so on; returns what every rank sent to this one, concatenated in rank order."""
    dev = collective_device()
    sent = torch.as_tensor(np.asarray(counts, np.int64), device=dev)
    got = torch.empty_like(sent)
    dist.all_to_all_single(got, sent)
    recv = torch.empty(int(got.sum().item()), dtype=torch.from_numpy(data[:0]).dtype, device=dev)
    send = torch.from_numpy(np.ascontiguousarray(data)).to(dev)
    dist.all_to_all_single(recv, send, got.tolist(), sent.tolist())
    return recv.cpu().numpy()


def gather_at(data: np.ndarray, receivers: list[int]) -> list[np.ndarray] | None:
    """Every rank's ``data`` (uint8), in rank order, on each rank of ``receivers``; None elsewhere.

    Point-to-point sends: a rank outside ``receivers`` receives nothing but every rank's size."""
    dev = collective_device()
    me, world = rank(), dist.get_world_size()
    size = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)  # also means the communicator exists before the point-to-point ops
    mine = torch.from_numpy(np.ascontiguousarray(data, np.uint8)).to(dev)
    ops = [dist.P2POp(dist.isend, mine, r) for r in receivers if r != me and len(data)]
    bufs = None
    if me in receivers:
        bufs = [
            mine if r == me else torch.empty(int(sizes[r].item()), dtype=torch.uint8, device=dev) for r in range(world)
        ]
        ops += [dist.P2POp(dist.irecv, bufs[r], r) for r in range(world) if r != me and len(bufs[r])]
    if ops:
        # NCCL's point-to-point ops run on the current CUDA device, which may not be this rank's
        # before torch.cuda.set_device (torch documents a hang): make it the collective's device.
        with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
            for request in dist.batch_isend_irecv(ops):
                request.wait()
    return None if bufs is None else [b.cpu().numpy() for b in bufs]


def all_gather_flags(flag: bool) -> list[int]:
    """The ranks whose ``flag`` is set."""
    dev = collective_device()
    mine = torch.tensor([int(flag)], dtype=torch.int64, device=dev)
    flags = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(flags, mine)
    return [r for r, f in enumerate(flags) if int(f.item())]
