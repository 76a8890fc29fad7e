"""A missing or damaged shard fails loud (issue 24 item 4): the epoch raises an error naming the
shard instead of ending early with exit code 0, and DataLoader workers never hang waiting for it.
Each case runs in a child process with a generous bound, so a regression to a hang fails the test
instead of stalling the suite."""
import glob
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import make_corpus

CHILD = textwrap.dedent("""
    import sys
    from streaming import StreamingDataLoader
    from ted_stream import TEDStreamingDataset
    from ted_stream.loaders.upstream import ShardError

    remote, local, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ds = TEDStreamingDataset(remote=remote, local=local, batch_size=8)
    served = 0
    try:
        for batch in StreamingDataLoader(ds, batch_size=8, num_workers=workers):
            served += len(batch["label"])
    except Exception as err:  # a worker's error reaches the main process re-raised by torch
        print("RAISED", type(err).__name__, err)
        sys.exit(3)
    print("SERVED", served)
""")


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_shard_raises_naming_it_and_never_hangs(tmp_path, damage, workers):
    remote = make_corpus(tmp_path / "remote", 2000, shard_bytes=4000)
    victim = sorted(glob.glob(os.path.join(remote, "shard.*.mds.zstd")))[3]
    if damage == "deleted":
        os.remove(victim)
    else:
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
    child = subprocess.run([sys.executable, "-c", CHILD, remote, str(tmp_path / "cache"), str(workers)],
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 3, child.stdout + child.stderr[-3000:]
    assert f"shard {victim} could not be prepared" in child.stdout + child.stderr
    assert "SERVED" not in child.stdout


def test_intact_shards_serve_every_sample(tmp_path):
    remote = make_corpus(tmp_path / "remote", 2000, shard_bytes=4000)
    child = subprocess.run([sys.executable, "-c", CHILD, remote, str(tmp_path / "cache"), "2"],
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0 and "SERVED 2000" in child.stdout, child.stderr[-3000:]


def test_a_damaged_file_in_the_local_cache_is_named(tmp_path):
    """A shard decompressed by an earlier epoch is read from its .mds file, which no hash guards:
    a truncated one raises naming the shard instead of an unnamed IndexError or decode error."""
    from ted_stream import TEDStreamingDataset
    from ted_stream.loaders.upstream import ShardError

    remote = make_corpus(tmp_path / "remote", 600, shard_bytes=4000)
    local = str(tmp_path / "cache")
    ds = TEDStreamingDataset(remote=remote, local=local, batch_size=8)
    assert len(list(ds)) == 600  # every shard now decompressed in the cache
    raw = sorted(glob.glob(os.path.join(local, "shard.*.mds")))[1]
    with open(raw, "r+b") as f:
        f.truncate(os.path.getsize(raw) // 3)
    with pytest.raises(ShardError, match=r"sample \d+ of shard .*shard\.00001\.mds\.zstd could not be read"):
        for sample_id in range(600):
            ds.get_item(sample_id)


def test_an_index_out_of_range_keeps_upstreams_error(tmp_path):
    from ted_stream import TEDStreamingDataset
    from ted_stream.loaders.upstream import ShardError

    ds = TEDStreamingDataset(local=make_corpus(tmp_path / "data", 100), batch_size=8)
    with pytest.raises(Exception) as caught:
        ds.get_item(10**6)
    assert not isinstance(caught.value, ShardError)  # not blamed on a shard
    assert caught.value.__context__ is None  # upstream's error itself, not one raised while naming a shard
