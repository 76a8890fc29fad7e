"""Index WebDataset tar shards in place: a JSON manifest of every sample's byte range.

``index_shards`` reads each shard once (a SHA-256 pass over its bytes plus a walk over its tar
headers) and writes ``wds-index.json`` beside the shards; the shards are never rewritten. The
manifest gives the dense sample-id space (shards in the given order, samples in tar order), the
dataset fingerprint the score table is bound to, and the offsets from which a sample is read
without touching its neighbours (``WdsIndex.read``).

Samples are grouped as webdataset groups them: a member ``dir/name.ext1.ext2`` belongs to key
``dir/name`` with field ``ext1.ext2`` (lower case), and consecutive members with one key form a
sample; ``__*__`` metadata members and directories are skipped. Nothing is extracted, and members
that could point outside the shard's folder (absolute paths, ``..`` components, links) are refused
at indexing time, so no later tool following the manifest can be led out of it.

This module imports neither torch nor webdataset: ``ted-stream index`` stays light.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any, Optional, Union

import numpy as np

from ..table import current_umask

MANIFEST = "wds-index.json"
FORMAT = "ted_stream/wds-index"
VERSION = 1
_BLOCK = tarfile.BLOCKSIZE  # 512: a member's own header block sits right before its data
_HASH_CHUNK = 1 << 22
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, never part of a sample
_COMPRESSED = (b"\x1f\x8b", b"\x28\xb5\x2f\xfd", b"BZh", b"\xfd7zXZ\x00")  # gzip, zstd, bzip2, xz
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # key = path up to the basename's first dot

Shards = Union[str, Sequence[str]]


class ManifestError(ValueError):
    """The shards on disk no longer match their manifest (added, removed or changed), or the
    manifest itself is unreadable."""


class CorruptSample(RuntimeError):
    """A sample's bytes on disk do not match the manifest (damaged tar header, short read)."""

    def __init__(self, shard: str, key: str, sample_id: int, problem: str):
        super().__init__(f"shard {shard}, key {key!r} (sample id {sample_id}): {problem}")
        self.shard, self.key, self.sample_id = shard, key, sample_id


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000000..000009}`` (zero-padded ranges) and ``{a,b}`` alternatives, left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        if int(hi) < int(lo):
            raise ValueError(f"brace range {{{body}}} in {pattern!r} is empty: expected low..high")
        width = len(lo) if lo.startswith("0") else 0
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        choices = body.split(",")
    return [head + c + rest for c in choices for rest in expand_braces(tail)]


def resolve_shards(shards: Shards) -> tuple[str, list[str]]:
    """(folder, shard basenames) of a brace pattern, a list of paths, or a folder of ``*.tar``.

    All shards must lie in one folder: the manifest and the score table live beside them.
    """
    if isinstance(shards, (str, os.PathLike)):
        shards = os.fspath(shards)
        if os.path.isdir(shards):
            names = sorted(n for n in os.listdir(shards) if n.endswith(".tar"))
            if not names:
                raise FileNotFoundError(f"{shards} holds no .tar shards")
            return os.path.abspath(shards), names
        paths = expand_braces(shards)
    else:
        paths = [os.fspath(p) for p in shards]
    if not paths:
        raise ValueError("no shards given: expected a brace pattern, a list of .tar paths or a folder")
    folders = {os.path.dirname(os.path.abspath(p)) for p in paths}
    if len(folders) != 1:
        raise ValueError(
            f"shards lie in {len(folders)} folders ({sorted(folders)[:3]}...): expected one "
            "folder, where the manifest and the score table live"
        )
    names = [os.path.basename(p) for p in paths]
    if len(set(names)) != len(names):
        raise ValueError(f"a shard is listed twice in {shards!r}")
    return folders.pop(), names


def _safe_member(shard: str, info: tarfile.TarInfo) -> None:
    name = info.name
    if name.startswith("/") or ".." in name.split("/") or os.path.isabs(name):
        raise ValueError(
            f"shard {shard}: member {name!r} points outside the shard's folder; expected "
            "relative paths without '..' (refusing to index it)"
        )
    if info.issym() or info.islnk():
        raise ValueError(
            f"shard {shard}: member {name!r} is a link to {info.linkname!r}; expected "
            "regular files (links are never followed)"
        )


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check_complete(path: str, end: int, samples: int) -> None:
    """ValueError unless tar's end-of-archive marker (a zero block) follows the last member: a
    copy cut at a member boundary reads as a valid, shorter tar, and would index silently."""
    with open(path, "rb") as f:
        marker = os.pread(f.fileno(), _BLOCK, end)
    if marker != bytes(_BLOCK):
        found = f"{len(marker)} bytes" if len(marker) < _BLOCK else "a non-zero block"
        raise ValueError(
            f"shard {os.path.basename(path)} is truncated or damaged: after its last readable member "
            f"(byte {end}, {samples} samples) it holds {found} where tar's end-of-archive marker (a "
            "zero block) was expected; copy or write the shard again, then index it"
        )


def index_shard(path: str) -> dict[str, Any]:
    """One shard's manifest entry: size, mtime, SHA-256, and per sample its key, byte span and
    members ``[field, data offset, data size]`` (offsets absolute in the shard)."""
    shard = os.path.basename(path)
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic.startswith(_COMPRESSED):
        raise ValueError(
            f"shard {shard} is compressed: expected an uncompressed tar (sample offsets "
            "need random access; compress the members instead, e.g. .json.gz)"
        )
    st = os.stat(path)
    keys: list[str] = []
    spans: list[list[int]] = []
    members: list[list[list[Any]]] = []
    try:
        with tarfile.open(path, mode="r:") as tar:  # seeks over data: only headers are read here
            for info in tar:
                _safe_member(shard, info)
                if not info.isreg() or _META.match(info.name):
                    continue
                m = _KEY.match(info.name)
                if m is None:
                    continue  # no extension: webdataset drops such members too
                key, field = m.group(1), m.group(2).lower()
                if not keys or keys[-1] != key:
                    keys.append(key)
                    spans.append([info.offset, info.offset_data + info.size])
                    members.append([])
                elif any(f == field for f, _, _ in members[-1]):
                    raise ValueError(f"shard {shard}: key {key!r} has two {field!r} members")
                spans[-1][1] = info.offset_data + info.size
                members[-1].append([field, info.offset_data, info.size])
            end = tar.offset  # where the next header would start: the end-of-archive marker's place
    except tarfile.TarError as e:
        raise ValueError(f"shard {shard} is not a readable tar file: {e}") from None
    _check_complete(path, end, len(keys))
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(
            f"shard {shard}: key {dup!r} appears in two places; expected each sample's members to be consecutive"
        )
    return {
        "name": shard,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sha256": _file_digest(path),
        "keys": keys,
        "spans": spans,
        "members": members,
    }


def index_shards(shards: Shards, home: Optional[str] = None) -> str:
    """Index ``shards`` (see ``resolve_shards``) and write the manifest beside them; returns its path.

    The manifest records the shards' folder, or ``home`` when they are indexed before being moved
    there (``write_shards``), so that a manifest copied to other shards is named as such."""
    folder, names = resolve_shards(shards)
    entries = [index_shard(os.path.join(folder, n)) for n in names]
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "folder": os.path.abspath(home or folder),
        "num_samples": sum(len(e["keys"]) for e in entries),
        "shards": entries,
    }
    if manifest["num_samples"] == 0:
        raise ValueError(f"the shards in {folder} hold no samples")
    path = os.path.join(folder, MANIFEST)
    fd, tmp = tempfile.mkstemp(prefix=".wds-index-", suffix=".tmp", dir=folder)
    try:  # atomic: a reader sees the old manifest or the new one, never half of one
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "w") as f:
            json.dump(manifest, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


class WdsIndex:
    """The checked manifest of a set of tar shards, with random access by sample id."""

    def __init__(self, folder: str, manifest: dict[str, Any]):
        self.folder = folder
        self.shards: list[dict[str, Any]] = manifest["shards"]
        # Compact in memory: numpy arrays instead of the JSON's nested lists (655 -> about 130
        # bytes per sample, and forked workers share the pages: no refcount writes into them).
        seen: dict[tuple[str, ...], int] = {}  # distinct field lists (in member order) -> number
        for shard in self.shards:
            members = shard.pop("members")
            if len(members) != len(shard["keys"]) or len(shard["spans"]) != len(shard["keys"]):
                raise ValueError(
                    f"shard {shard['name']}: {len(shard['keys'])} keys but {len(shard['spans'])} "
                    f"spans and {len(members)} member lists"
                )
            width = max((len(m) for m in members), default=0)
            shard["spans"] = np.asarray(shard["spans"], np.int64).reshape(-1, 2)
            shard["layout"] = np.array(
                [seen.setdefault(tuple(f for f, _, _ in m), len(seen)) for m in members], np.int32
            )
            shard["offsets"] = np.zeros((len(members), width), np.int64)
            shard["sizes"] = np.zeros((len(members), width), np.int64)
            for j, m in enumerate(members):
                shard["offsets"][j, : len(m)] = [o for _, o, _ in m]
                shard["sizes"][j, : len(m)] = [n for _, _, n in m]
        self._layouts: list[tuple[str, ...]] = sorted(seen, key=seen.__getitem__)
        counts = [len(s["keys"]) for s in self.shards]
        self.starts = [0]
        for c in counts:
            self.starts.append(self.starts[-1] + c)
        self.num_samples = self.starts[-1]
        self._shard_number = {s["name"]: i for i, s in enumerate(self.shards)}
        self._keys: dict[str, dict[str, int]] = {}  # shard name -> key -> id, see sample_id
        canon = json.dumps(
            [{"shards": [[s["name"], len(s["keys"]), s["sha256"]] for s in self.shards]}],
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
        # Same shape as fingerprint.index_fingerprint, plus each shard's content digest: a shard
        # rewritten with the same sample count is another dataset.
        self.fingerprint: dict[str, Any] = {
            "digest": hashlib.sha256(canon).hexdigest(),
            "num_streams": 1,
            "num_shards": len(self.shards),
            "num_samples": self.num_samples,
        }

    @classmethod
    def open(cls, shards: Shards, rehash: bool = False) -> WdsIndex:
        """Load the manifest beside ``shards`` and check the shards against it.

        A shard in ``shards`` but not in the manifest (added), in the manifest but missing or not
        in ``shards`` (removed), or whose size, or mtime and then content, differ (changed) raises
        ManifestError naming it. ``rehash`` checks every shard's SHA-256, not only changed mtimes.
        """
        folder, names = resolve_shards(shards)
        path = os.path.join(folder, MANIFEST)
        try:
            with open(path) as f:
                manifest = json.load(f)
        except FileNotFoundError:
            raise ManifestError(
                f"no {MANIFEST} in {folder}: index the shards first "
                f"(ted-stream index '{os.path.join(folder, names[0])}' ...)"
            ) from None
        except ValueError as e:
            raise ManifestError(f"{path} is not valid JSON ({e}); re-run ted-stream index") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise ManifestError(f"{path} is not a version-{VERSION} {FORMAT} manifest; re-run ted-stream index")
        try:
            index = cls(folder, manifest)
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"{path} is malformed ({type(e).__name__}: {e}); re-run ted-stream index") from None
        try:
            _check_shards(folder, names, manifest["shards"], path, rehash)
        except ManifestError as e:
            home = manifest.get("folder")  # absent in manifests written before it was recorded
            if home is None or home == folder:
                raise
            raise ManifestError(
                f"{path} indexes the shards in {home}, not these in {folder} (a manifest copied from "
                f"another folder? first difference: {e}); index these shards: ted-stream index {folder}"
            ) from None
        return index

    def locate(self, sample_id: int) -> tuple[int, int]:
        """(shard number, sample number within the shard) of a global sample id."""
        if not 0 <= sample_id < self.num_samples:
            raise IndexError(f"sample id {sample_id} is out of range: expected [0, {self.num_samples})")
        shard = bisect.bisect_right(self.starts, sample_id) - 1
        return shard, sample_id - self.starts[shard]

    def shard_ids(self, shard: str) -> range:
        """The sample ids of the shard named ``shard``."""
        i = self._shard_number.get(shard)
        if i is None:
            raise ManifestError(f"shard {shard} is not in the manifest of {self.folder}: re-run ted-stream index")
        return range(self.starts[i], self.starts[i + 1])

    def span(self, sample_id: int) -> tuple[str, int, int]:
        """(shard name, first byte, end byte) of the sample: its members' headers and data."""
        s, j = self.locate(sample_id)
        start, end = self.shards[s]["spans"][j]
        return self.shards[s]["name"], int(start), int(end)

    def members(self, sample_id: int) -> list[tuple[str, int, int]]:
        """``(field, data offset, data size)`` of each member of the sample, in tar order."""
        s, j = self.locate(sample_id)
        shard = self.shards[s]
        fields = self._layouts[shard["layout"][j]]
        return [(f, int(o), int(n)) for f, o, n in zip(fields, shard["offsets"][j], shard["sizes"][j])]

    def sample_id(self, shard: str, key: str) -> Optional[int]:
        """The id of ``key`` in the shard named ``shard`` (None if not indexed there). Key tables are
        built per shard on first use: a streaming worker holds only those of its own shards."""
        if shard not in self._keys:
            i = self._shard_number.get(shard)
            if i is None:
                return None
            self._keys[shard] = {k: self.starts[i] + j for j, k in enumerate(self.shards[i]["keys"])}
        return self._keys[shard].get(key)

    def read(self, sample_id: int, files: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """The raw sample ``{"__key__", "__shard__", field: bytes}``: one read of its byte span.

        ``files`` caches open file objects by shard name. The member headers inside the span are
        checked (checksum, size) so a damaged shard raises CorruptSample naming shard and key.
        """
        s, j = self.locate(sample_id)
        name, key = self.shards[s]["name"], self.shards[s]["keys"][j]
        _, start, end = self.span(sample_id)
        f = files.get(name) if files is not None else None
        if f is None:
            f = open(os.path.join(self.folder, name), "rb")
            if files is not None:
                files[name] = f
        try:
            buf = os.pread(f.fileno(), end - start, start)
        finally:
            if files is None:
                f.close()
        if len(buf) != end - start:
            raise CorruptSample(name, key, sample_id, f"short read: {len(buf)} of {end - start} bytes")
        sample: dict[str, Any] = {"__key__": key, "__shard__": name}
        for field, offset, size in self.members(sample_id):
            at = offset - start
            try:
                info = tarfile.TarInfo.frombuf(buf[at - _BLOCK : at], "utf-8", "surrogateescape")
            except tarfile.HeaderError as e:
                raise CorruptSample(name, key, sample_id, f"member {field!r}: bad tar header ({e})") from None
            if info.size != size:
                raise CorruptSample(
                    name, key, sample_id, f"member {field!r}: header says {info.size} bytes, the manifest {size}"
                )
            sample[field] = buf[at : at + size]
        return sample


def _check_shards(folder: str, names: list[str], indexed_shards: list[dict[str, Any]], path: str, rehash: bool) -> None:
    """ManifestError naming the first shard added, removed, reordered or changed since indexing."""
    indexed = [s["name"] for s in indexed_shards]
    added = [n for n in names if n not in indexed]
    removed = [n for n in indexed if n not in names or not os.path.exists(os.path.join(folder, n))]
    redo = "re-run ted-stream index (a new index starts a new score table)"
    if added:
        raise ManifestError(f"shard(s) {added} in {folder} were added after indexing ({path}); {redo}")
    if removed:
        raise ManifestError(
            f"shard(s) {removed} of {path} were removed or not given; expected all "
            f"{len(indexed)} indexed shards; {redo}"
        )
    if names != indexed:
        raise ManifestError(
            f"the shards are given in another order than indexed in {path}: sample ids "
            f"follow the indexed order {indexed[:3]}...; pass the same pattern"
        )
    for s in indexed_shards:
        st = os.stat(os.path.join(folder, s["name"]))
        why = f"{st.st_size} bytes, indexed with {s['size']}" if st.st_size != s["size"] else None
        if why is None and (rehash or st.st_mtime_ns != s["mtime_ns"]):
            # A copy (another node's cache) has a new mtime but the same bytes: only the digest decides.
            if _file_digest(os.path.join(folder, s["name"])) != s["sha256"]:
                why = f"same size, but its SHA-256 differs from the indexed {s['sha256'][:12]}"
        if why is not None:
            raise ManifestError(f"shard {s['name']} in {folder} changed after indexing ({why}); {redo}")


def write_shards(samples: Iterable[dict[str, Any]], out: str, shard_bytes: int = 1 << 28) -> int:
    """Write ``samples`` as uncompressed tar shards ``shard-000000.tar``, ... into ``out`` (absent
    or empty) and index them; returns the sample count. Each sample is one ``<key>.json`` member;
    its key is ``__key__`` if given, else its 9-digit number, and a key that is not a plain
    file-name stem is refused. Written in a temporary folder beside ``out`` and renamed into place
    at the end, so a failure never leaves half a dataset."""
    out = os.path.abspath(out)
    if os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"{out} is not empty; choose an empty folder")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=os.path.dirname(out))
    count, tar = 0, None
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide a shared dataset
        for sample in samples:
            sample = dict(sample)
            key = str(sample.pop("__key__", f"{count:09d}"))
            if not re.fullmatch(r"[^./\\\x00]+", key):
                raise ValueError(
                    f"sample {count}: __key__={key!r} is not a plain name; expected no '/', "
                    "'\\', '.' or '..' (a member must stay inside its shard's folder)"
                )
            data = json.dumps(sample, separators=(",", ":")).encode()
            if tar is None or tar.fileobj.tell() + len(data) > shard_bytes:
                if tar is not None:
                    tar.close()
                name = f"shard-{len(os.listdir(tmp)):06d}.tar"
                tar = tarfile.open(os.path.join(tmp, name), "w", format=tarfile.USTAR_FORMAT)
            info = tarfile.TarInfo(f"{key}.json")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
            count += 1
        if tar is not None:
            tar.close()
        if count == 0:
            raise ValueError("the corpus has no samples")
        index_shards(tmp, home=out)
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.rename(tmp, out)  # file mtimes survive the rename: the manifest stays valid
    except BaseException:
        if tar is not None:
            tar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return count


def prepare_shards(samples: Iterable[dict[str, Any]], out: str, shard_bytes: int = 1 << 28) -> int:
    """``write_shards`` plus an empty score table in ``out/ted`` (what ``ted-stream prepare
    --format wds`` does). Returns the sample count."""
    from ..table import FILENAME, ScoreTable

    count = write_shards(samples, out, shard_bytes)
    ScoreTable(count, WdsIndex.open(out).fingerprint).save(os.path.join(out, "ted", FILENAME))
    return count


def index_command(args: Sequence[str]) -> str:
    """``ted-stream index SHARDS...``: one folder, or tar paths and brace patterns."""
    shards: Shards = args[0] if len(args) == 1 else [p for a in args for p in expand_braces(a)]
    path = index_shards(shards)
    index = WdsIndex.open(shards)
    return (
        f"indexed {index.num_samples} samples in {len(index.shards)} shards: {path} "
        f"(fingerprint {index.fingerprint['digest'][:12]})"
    )
