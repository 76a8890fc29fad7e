"""EpochMask: the frozen selection of one epoch, and the only code that touches packed bits.

A mask is a keep bit per sample and, where the policy reweights, a boost bit per sample: kept
samples with the boost bit weigh ``boost_weight``, the other kept samples ``base_weight``. Bits
are packed little-endian (sample i is bit i % 8 of byte i // 8), one bit per sample per epoch,
the same bytes in the table file and on the network.
"""

from __future__ import annotations

import functools
import struct
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
from numpy.typing import NDArray

# Network record after the bit arrays: boost weight, base weight, requested count (-1: none).
_TAIL = struct.Struct("<ddq")


def pack(flags: NDArray[np.bool_]) -> NDArray[np.uint8]:
    """Booleans -> packed little-order bits."""
    return np.packbits(np.asarray(flags, dtype=bool), bitorder="little")


def unpack(bits: NDArray[np.uint8], count: int) -> NDArray[np.bool_]:
    """Packed little-order bits -> ``count`` booleans."""
    return np.unpackbits(np.asarray(bits, dtype=np.uint8), bitorder="little", count=count).astype(bool)


@dataclass(frozen=True)
class EpochMask:
    """The frozen selection of one epoch: packed keep bits, optional boost bits and two weights."""

    epoch: int
    keep: NDArray[np.uint8]  # uint8[ceil(n/8)]
    boost: Optional[NDArray[np.uint8]]  # uint8[ceil(n/8)] or None: kept samples weighing boost_weight
    boost_weight: float
    num_samples: int
    requested: Optional[int] = None  # samples the schedule asked to prune (None: not recorded)
    base_weight: float = 1.0  # weight of the kept samples without a boost bit

    @classmethod
    def from_bools(
        cls,
        epoch: int,
        keep: NDArray[np.bool_],
        boost: Optional[NDArray[np.bool_]] = None,
        boost_weight: float = 1.0,
        requested: Optional[int] = None,
        base_weight: float = 1.0,
    ) -> EpochMask:
        return cls(
            epoch,
            pack(keep),
            None if boost is None else pack(boost),
            float(boost_weight),
            len(keep),
            requested,
            float(base_weight),
        )

    @classmethod
    def everything(cls, epoch: int, num_samples: int, requested: Optional[int] = None) -> EpochMask:
        """Every sample kept at weight 1."""
        return cls.from_bools(epoch, np.ones(num_samples, dtype=bool), requested=requested)

    @property
    def kept(self) -> int:
        return int(np.count_nonzero(self.bools()))

    @property
    def reweights(self) -> bool:
        """Whether any kept sample weighs other than 1."""
        return self.base_weight != 1.0 or self.boost is not None

    @property
    def crc(self) -> int:
        crc = zlib.crc32(self.keep.tobytes())
        return zlib.crc32(self.boost.tobytes(), crc) if self.boost is not None else crc

    def bools(self) -> NDArray[np.bool_]:
        """The keep bits as one boolean per sample."""
        return unpack(self.keep, self.num_samples)

    def boost_bools(self) -> Optional[NDArray[np.bool_]]:
        return None if self.boost is None else unpack(self.boost, self.num_samples)

    def keeps(self, ids: NDArray[np.integer]) -> NDArray[np.bool_]:
        """Whether each of ``ids`` is kept, without unpacking the whole mask."""
        return _bits_at(self.keep, ids)

    def weights(self, ids: NDArray[np.integer]) -> NDArray[np.float32]:
        """Loss weight of each of ``ids`` (as kept samples)."""
        w = np.full(len(np.asarray(ids)), self.base_weight, dtype=np.float32)
        if self.boost is not None:
            w[_bits_at(self.boost, ids)] = self.boost_weight
        return w

    def weight_of(self, sample_id: int) -> float:
        """``weights([sample_id])[0]`` without numpy's per-call cost: the loaders call it once per
        sample, in plain Python over the boost bits as bytes (the same float32-rounded values)."""
        boost, weight, base = self._scalar_view
        sample_id = int(sample_id)
        return weight if boost is not None and (boost[sample_id >> 3] >> (sample_id & 7)) & 1 else base

    @functools.cached_property
    def _scalar_view(self) -> tuple[Optional[bytes], float, float]:
        return (
            None if self.boost is None else self.boost.tobytes(),
            float(np.float32(self.boost_weight)),
            float(np.float32(self.base_weight)),
        )

    def restrict(self, ids: NDArray[np.integer]) -> EpochMask:
        """This mask on ``ids`` only, renumbered 0..len(ids)-1 (what a policy sees of a subset)."""
        boost = self.boost_bools()
        return EpochMask.from_bools(
            self.epoch,
            self.bools()[ids],
            None if boost is None else boost[ids],
            self.boost_weight,
            self.requested,
            self.base_weight,
        )

    def expand(self, ids: NDArray[np.integer], num_samples: int) -> EpochMask:
        """The inverse of ``restrict``: this mask of a subset placed at ``ids`` among
        ``num_samples`` samples; samples outside ``ids`` are dropped."""
        keep = np.zeros(num_samples, dtype=bool)
        keep[ids] = self.bools()
        boost = None
        if self.boost is not None:
            boost = np.zeros(num_samples, dtype=bool)
            boost[ids] = self.boost_bools()
        return EpochMask.from_bools(self.epoch, keep, boost, self.boost_weight, self.requested, self.base_weight)

    def to_bytes(self) -> NDArray[np.uint8]:
        """keep bits | boost bits (if any) | weights and requested count."""
        tail = _TAIL.pack(self.boost_weight, self.base_weight, -1 if self.requested is None else self.requested)
        boost = self.boost if self.boost is not None else np.empty(0, np.uint8)
        return np.concatenate([self.keep, boost, np.frombuffer(tail, np.uint8)])

    @classmethod
    def from_bytes(cls, epoch: int, data: NDArray[np.uint8], num_samples: int) -> EpochMask:
        nbits = (num_samples + 7) // 8
        if len(data) not in (nbits + _TAIL.size, 2 * nbits + _TAIL.size):
            raise ValueError(
                f"a mask record of {len(data)} bytes does not fit {num_samples} samples: "
                f"expected {nbits + _TAIL.size} or {2 * nbits + _TAIL.size}"
            )
        weight, base, requested = _TAIL.unpack(bytes(data[-_TAIL.size :]))
        boost = data[nbits : -_TAIL.size]
        return cls(
            epoch,
            np.array(data[:nbits]),
            np.array(boost) if len(boost) else None,
            weight,
            num_samples,
            None if requested < 0 else requested,
            base,
        )


def _bits_at(bits: NDArray[np.uint8], ids: NDArray[np.integer]) -> NDArray[np.bool_]:
    ids = np.asarray(ids, dtype=np.int64)
    return ((bits[ids >> 3] >> (ids & 7).astype(np.uint8)) & 1).astype(bool)
