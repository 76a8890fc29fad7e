"""The score table beside an s3:// remote, against an S3-protocol server on the loopback (moto):
a fresh bucket (no table yet), a populated one, a fresh cache, a damaged table object."""
import gc
import logging
import os
import types

import boto3
import numpy as np
import pytest
from moto.server import ThreadedMotoServer
from streaming import StreamingDataLoader

from conftest import free_port, make_corpus
from ted_stream import TEDConfig, TEDStreamingDataset
from ted_stream.loaders.remote import is_not_found
from ted_stream.table import TableError

BATCH = 8
CFG = TEDConfig(target=0.4, warmup_epochs=1, ramp_epochs=0, explore=0.1, seed=3)
BUCKET, PREFIX = "ted-bucket", "data"
TABLE_KEY = f"{PREFIX}/ted/table.tedt"


@pytest.fixture(scope="module")
def s3_server():
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, tmp_path, monkeypatch):
    """A fresh bucket holding an MDS corpus (index and shards, no table) under ``data/``."""
    for key, value in {"S3_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=BUCKET)
    folder = make_corpus(tmp_path / "corpus", 200)
    for name in os.listdir(folder):
        if name.endswith((".json", ".mds.zstd", ".mds")):
            client.upload_file(os.path.join(folder, name), BUCKET, f"{PREFIX}/{name}")
    yield client
    for obj in client.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        client.delete_object(Bucket=BUCKET, Key=obj["Key"])
    client.delete_bucket(Bucket=BUCKET)


def dataset(cache) -> TEDStreamingDataset:
    return TEDStreamingDataset(remote=f"s3://{BUCKET}/{PREFIX}", local=str(cache), batch_size=BATCH,
                               shuffle=True, shuffle_seed=1, ted=CFG)


def epoch_ids(ds: TEDStreamingDataset, epoch: int) -> list[int]:
    ds.start_epoch(epoch)
    return [int(i) for batch in StreamingDataLoader(ds, batch_size=BATCH) for i in batch["ted_id"]]


def test_fresh_bucket_then_fresh_cache(s3, tmp_path, caplog):
    keys = lambda: {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])}
    assert TABLE_KEY not in keys()
    ds = dataset(tmp_path / "cache1")  # a fresh bucket: no table yet is not an error
    ids = epoch_ids(ds, 0)
    assert sorted(ids) == list(range(200))
    ds.record(np.array(ids), np.linspace(0.0, 1.0, len(ids)))
    with caplog.at_level(logging.WARNING):
        kept1 = epoch_ids(ds, 1)  # freezing epoch 1 saves the table, and the save uploads it
    assert not [r for r in caplog.records if "not empty" in r.getMessage()]  # no noise per upload
    assert TABLE_KEY in keys()
    assert len(kept1) == 200 - round(0.4 * 200)
    del ds
    gc.collect()
    # A second job on a fresh cache finds the table in the bucket: the same scores, the same mask.
    again = dataset(tmp_path / "cache2")
    assert again.table.scored.sum() == 200
    assert sorted(epoch_ids(again, 0)) == list(range(200))  # warm-up: every sample
    assert epoch_ids(again, 1) == kept1  # the mask frozen by the first job, not a new one
    assert sorted(os.listdir(tmp_path / "cache2" / "ted")) == [".ted-job.lock", "table.tedt"]  # no download or staging left
    del again
    gc.collect()


def test_damaged_table_object_names_its_address(s3, tmp_path):
    s3.put_object(Bucket=BUCKET, Key=TABLE_KEY, Body=b"not a table at all" * 10)
    with pytest.raises(TableError, match=rf"s3://{BUCKET}/{PREFIX}/ted/table\.tedt .*delete or replace "
                                         rf"s3://{BUCKET}/{PREFIX}/ted/table\.tedt") as err:
        dataset(tmp_path / "cache")
    assert ".remote-" not in str(err.value)  # not the deleted private download
    assert not os.path.exists(tmp_path / "cache" / "ted" / "table.tedt")


def _client_error(code):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": "x"}}, "GetObject")


@pytest.mark.parametrize("err,missing", [
    (FileNotFoundError("gone"), True),
    (_client_error("404"), True),
    (_client_error("NoSuchKey"), True),
    (_client_error("403"), False),  # no permission is not "no table": never start a new one over it
    (_client_error("NoSuchBucket"), False),
    (type("ResourceNotFoundError", (Exception,), {})("azure"), True),
    (type("ServiceError", (Exception,), {"status": 404})("oci"), True),
    (type("ServiceError", (Exception,), {"status": 500})("oci"), False),
    (type("HfHubHTTPError", (Exception,), {"response": types.SimpleNamespace(status_code=404)})("hf"), True),
    (TimeoutError("slow"), False),
])
def test_not_found_from_every_downloader(err, missing):
    assert is_not_found(err) is missing
    wrapped = RuntimeError("wrapped")
    wrapped.__cause__ = err
    assert is_not_found(wrapped) is missing
