import gc
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _clean_shm():
    """Streaming keeps epoch state in /dev/shm; a test must neither see nor leave any."""
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    yield
    gc.collect()
    clean_stale_shared_memory()


def make_corpus(folder, n, shard_bytes=2000):
    """A real MDS dataset of ``n`` samples split into several zstd shards, with an empty table."""
    from ted_stream.prepare import write_mds

    write_mds(({"text": f"sample number {i}", "label": i % 5} for i in range(n)), str(folder),
              size_limit=shard_bytes)
    return str(folder)


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path / "data", 600)
