"""The score table's durable copy beside a dataset's remote (s3://, gs://, a shared folder...).

Streaming's downloaders do not agree on how a missing object looks: the local one raises
``FileNotFoundError``, S3's a botocore ``ClientError`` with code 404, Azure's a
``ResourceNotFoundError``, OCI's a ``ServiceError`` with status 404, Hugging Face's an HTTP error
whose response says 404. A missing table is the normal state of a fresh bucket, so every one of
them must read as "no table yet", and nothing else may.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any, Optional
from urllib.parse import urlparse

from streaming.base.storage import CloudDownloader, CloudUploader
from streaming.base.storage.upload import UPLOADERS

from ..table import FILENAME, MOVE_ASIDE, ScoreTable, TableError

logger = logging.getLogger(__name__)

_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}


def table_home(streams: Any, digest: str) -> tuple[str, Optional[str]]:
    """(local folder, durable remote folder or None) of the default table of ``streams``.

    The table lives beside the first stream's ``index.json``: ``ted/`` for one stream,
    ``ted/mix-<fingerprint>/`` for a mixture (sample ids span every stream, so a mixture needs
    its own table, and the fingerprint tells mixtures apart). With a ``remote``, the local copy
    sits in streaming's cache, which may vanish: the remote folder is the durable home. A remote
    that streaming can read but not write (sftp://) keeps the table in the local cache only.
    """
    first = streams[0]
    sub = "ted" if len(streams) == 1 else os.path.join("ted", f"mix-{digest[:16]}")
    local = os.path.join(first.local, first.split or "", sub)
    if first.remote is None:
        return local, None
    scheme = urlparse(first.remote).scheme
    if scheme not in UPLOADERS:
        logger.warning(
            "remote=%r: streaming cannot upload to %s://, so the score table is kept in the "
            "local cache only (%s); pass table_dir=<a folder on shared storage> to keep it "
            "where every node and a later run can find it",
            first.remote,
            scheme,
            local,
        )
        return local, None
    return local, os.path.join(first.remote, first.split or "", sub)


def is_not_found(err: BaseException) -> bool:
    """Whether ``err`` (or an error it was raised from) says the remote object does not exist.

    A permission error (403) is not "not found": a table we cannot read must not be replaced by
    a new empty one."""
    seen = set()
    e: Optional[BaseException] = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, FileNotFoundError):
            return True
        response = getattr(e, "response", None)
        if isinstance(response, dict):  # botocore ClientError
            if str(response.get("Error", {}).get("Code")) in _NOT_FOUND_CODES:
                return True
        elif getattr(response, "status_code", None) == 404:  # requests/httpx (Hugging Face)
            return True
        if getattr(e, "status", None) == 404 or getattr(e, "status_code", None) == 404:  # OCI, Azure
            return True
        if type(e).__name__ in ("ResourceNotFoundError", "EntryNotFoundError", "RemoteEntryNotFoundError"):
            return True
        e = e.__cause__ or e.__context__
    return False


def download_table(remote_dir: str, path: str, fingerprint: dict[str, Any], timeout: float, tag: str) -> bool:
    """Install the table at ``remote_dir`` as ``path``; False if the remote holds none yet.

    A private download (``tag`` tells this rank's apart), then an atomic rename: every rank of a
    node installs the same bytes, and no rank ever reads a half-written file."""
    remote = os.path.join(remote_dir, FILENAME)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".remote-{tag}.tedt")
    try:
        try:
            CloudDownloader.direct_download(remote, tmp, timeout)
        except Exception as err:
            if is_not_found(err):
                return False  # a new table: the first save uploads it
            raise RuntimeError(
                f"could not read the score table at {remote}: {err}; check the address "
                "and this job's credentials and permissions for it"
            ) from err
        try:
            ScoreTable.load(tmp, fingerprint)  # refuse a damaged or foreign table before installing it
        except TableError as err:
            # The message names our private download, which is gone: name the object instead.
            why = str(err).replace(tmp, remote).replace(MOVE_ASIDE, "")
            raise TableError(
                f"{why.rstrip(': ')}. Fix it at its remote address: delete or replace {remote} "
                "(a new table starts if none is there), or pass table_dir= to keep this "
                "run's table elsewhere"
            ) from None
        os.replace(tmp, path)
        return True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def upload_table(path: str, remote_dir: str) -> None:
    """Upload the table file ``path`` to ``remote_dir`` (replacing the object there)."""
    # Streaming's uploaders move files out of a folder of their own: stage a hard link (no copy)
    # in a fresh folder, made before the uploader looks, so it finds the folder empty and quiet.
    staging = tempfile.mkdtemp(prefix=".upload-", dir=os.path.dirname(path))
    try:
        uploader = CloudUploader.get((staging, remote_dir), exist_ok=False)
        os.link(path, os.path.join(staging, FILENAME))
        uploader.upload_file(FILENAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
