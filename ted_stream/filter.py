"""Static sample filters: a keep-list of sample ids, or a predicate over a sample's columns.

A predicate is evaluated once over the whole dataset and its result cached beside the score
table, in a file named after the dataset fingerprint and the predicate's identity (its code,
constants, defaults, captured values and the globals it reads), so a changed predicate or dataset
never reuses a stale result.
"""

from __future__ import annotations

import hashlib
import os
import types
import uuid
import zlib
from collections.abc import Callable
from typing import Any, Union, cast

import numpy as np
from tqdm import tqdm

from .mask import pack, unpack

SampleFilter = Union[Callable[[dict[str, Any]], Any], "np.ndarray", list, tuple, range]


def keep_from_ids(ids: Any, num_samples: int) -> np.ndarray:
    """bool[num_samples] that is True at each of ``ids`` (global sample ids)."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or (len(ids) and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(
            f"sample_filter keep-list has shape {ids.shape} and dtype {ids.dtype}: "
            "expected a 1-D array of integer sample ids"
        )
    if len(ids) and (ids.min() < 0 or ids.max() >= num_samples):
        raise ValueError(
            f"sample_filter keep-list holds ids in [{ids.min()}, {ids.max()}]: expected ids in [0, {num_samples})"
        )
    keep = np.zeros(num_samples, bool)
    keep[ids] = True
    return keep


def predicate_identity(fn: Callable[..., Any]) -> str:
    """A stable digest of what ``fn`` computes: the same function gives the same digest in every
    process and run; editing its code, constants, defaults, captured values or the values of the
    globals it reads (helper functions included) changes it."""
    if getattr(fn, "__code__", None) is None:
        raise ValueError(
            f"sample_filter={fn!r} has no __code__: expected a function or a lambda (wrap a callable object in one)"
        )
    h = hashlib.sha256()
    _hash_function(h, cast(types.FunctionType, fn), set())  # anything with __code__ is hashed as one
    return h.hexdigest()


def _hash_function(h: Any, fn: types.FunctionType, seen: set[int]) -> None:
    seen.add(id(fn))
    h.update(f"{fn.__module__}.{fn.__qualname__}".encode())
    names = _hash_code(h, fn.__code__)
    h.update(repr(fn.__defaults__).encode() + repr(fn.__kwdefaults__).encode())
    for cell in fn.__closure__ or ():
        h.update(repr(cell.cell_contents).encode())
    for name in sorted(names & fn.__globals__.keys()):
        value = fn.__globals__[name]
        if isinstance(value, types.FunctionType):
            if id(value) not in seen:
                _hash_function(h, value, seen)
        elif not isinstance(value, types.ModuleType):  # a module is its name, already hashed
            h.update(f"{name}={value!r}".encode())


def _hash_code(h: Any, code: types.CodeType) -> set[str]:
    """Hash ``code`` and its nested functions' code; return every global name they read."""
    h.update(code.co_code + repr(code.co_names).encode())
    names = set(code.co_names)
    for const in code.co_consts:  # nested functions: their code, not their address
        if isinstance(const, types.CodeType):
            names |= _hash_code(h, const)
        else:
            h.update(repr(const).encode())
    return names


def evaluate(
    fn: Callable[[dict[str, Any]], Any], num_samples: int, read: Callable[[int], dict[str, Any]]
) -> np.ndarray:
    """bool[num_samples]: ``fn`` applied to every sample, with a progress bar."""
    keep = np.zeros(num_samples, bool)
    for i in tqdm(range(num_samples), desc="sample_filter", unit="sample"):
        keep[i] = bool(fn(read(i)))
    return keep


def cache_path(folder: str, dataset_digest: str, identity: str) -> str:
    key = hashlib.sha256(f"{dataset_digest}:{identity}".encode()).hexdigest()[:16]
    return os.path.join(folder, f"filter-{key}.bits")


def load_cached(path: str, num_samples: int) -> np.ndarray | None:
    """The cached keep bits, or None when absent or damaged (then it is recomputed)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    bits, crc = raw[:-4], raw[-4:]
    if len(bits) != (num_samples + 7) // 8 or zlib.crc32(bits).to_bytes(4, "little") != crc:
        return None
    return unpack(np.frombuffer(bits, np.uint8), num_samples)


def save_cached(path: str, keep: np.ndarray) -> None:
    """Write atomically (temporary file, rename): readers see the old file or the whole new one."""
    bits = pack(keep).tobytes()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # uuid, not pid: pids repeat across containers sharing the folder; open(), not mkstemp: the
    # file mode follows the umask
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        f.write(bits + zlib.crc32(bits).to_bytes(4, "little"))
    os.replace(tmp, path)
