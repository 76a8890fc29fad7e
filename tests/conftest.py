import gc
import os
import socket

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _unlink_streaming_shm_under(bases: set[str]) -> None:
    """Unlink the streaming shared memory of every dataset whose local dir lies under ``bases``.

    Streaming names its segments ``<prefix>_<what>`` and writes each prefix's local dirs into
    ``<prefix>_locals``; only the tests' own prefixes go, so streaming jobs running next to the
    suite keep theirs (upstream's clean_stale_shared_memory would unlink those too). The segment is
    searched for the path bytes rather than parsed, so no private streaming API is needed."""
    shm = "/dev/shm"
    names = os.listdir(shm)
    needles = [b.encode() + b"/" for b in bases]
    for name in names:
        if not name.endswith("_locals") or not name[:6].isdigit():
            continue
        try:
            with open(os.path.join(shm, name), "rb") as f:
                data = f.read()
        except OSError:
            continue
        if any(n in data for n in needles):
            for other in names:
                if other.startswith(name[:7]):
                    try:
                        os.unlink(os.path.join(shm, other))
                    except FileNotFoundError:
                        pass


@pytest.fixture(autouse=True)
def _clean_shm(tmp_path_factory):
    """Streaming keeps epoch state in /dev/shm; a test must neither see nor leave any."""
    base = str(tmp_path_factory.getbasetemp())
    bases = {base, os.path.realpath(base)}
    _unlink_streaming_shm_under(bases)
    yield
    gc.collect()
    _unlink_streaming_shm_under(bases)


def free_port() -> int:
    """A TCP port free on this machine now, for a test's torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_corpus(folder, n, shard_bytes=2000):
    """A real MDS dataset of ``n`` samples split into several zstd shards, with an empty table."""
    from ted_stream.prepare import write_mds

    write_mds(({"text": f"sample number {i}", "label": i % 5} for i in range(n)), str(folder),
              size_limit=shard_bytes)
    return str(folder)


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path / "data", 600)
