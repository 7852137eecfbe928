"""Switch ECMP hash model: CRC32 over configurable 5-tuple fields, vectorised.

Why vectorised: ECMP over random source ports and the search for a source port
that lands on a planned uplink both hash millions of tuples. CRC32 is affine
over GF(2) for messages of one length, so ``crc(m) = crc(0) ^ XOR_q T_q[m[q]]``
with one 256-entry table per byte position: the whole model is a few table
lookups per tuple, and tests check it against ``zlib.crc32`` byte for byte.

The selected member is ``crc32(message, seed) % n`` where ``message`` packs the
configured fields big-endian (IPv4 addresses 4 bytes, ports 2, protocol 1).
Leaves and spines hash differently, as real fabrics do to avoid polarisation.
A different seed alone is not enough with CRC: the start value only XORs a
constant into the result, so ``crc % 6`` would fix ``crc' % 2``. The spines
therefore hash the fields in another order (``spine_fields``, by default the
reverse), which changes the linear map, plus their own seed.
"""

from __future__ import annotations

import ipaddress
import zlib
from dataclasses import dataclass, field

import numpy as np

from trainkit.traffic.errors import TrafficError

__all__ = ["HashModel", "ROCE_PORT_MIN", "ROCE_PORT_MAX", "ROCEV2_DST_PORT"]

ROCE_PORT_MIN, ROCE_PORT_MAX = 49152, 65535
ROCEV2_DST_PORT = 4791
_WIDTH = {"src_ip": 4, "dst_ip": 4, "proto": 1, "src_port": 2, "dst_port": 2}


@dataclass(frozen=True)
class HashModel:
    """CRC32 of the chosen 5-tuple fields, modulo the number of ECMP members.

    fields: which fields, in which order, enter the hash. seed: CRC start value
    at the leaves; spine_seed: at the spines. ip_base: NIC n has address
    ip_base + n. dst_port/proto: RoCEv2 UDP.
    """

    fields: tuple[str, ...] = ("src_ip", "dst_ip", "proto", "src_port", "dst_port")
    seed: int = 0
    spine_seed: int = 0x5EED
    spine_fields: tuple[str, ...] | None = None  # default: ``fields`` reversed
    ip_base: str = "10.0.0.0"
    dst_port: int = ROCEV2_DST_PORT
    proto: int = 17
    _tables: dict = field(default_factory=dict, compare=False, repr=False, init=False)

    def __post_init__(self) -> None:
        if self.spine_fields is None:
            object.__setattr__(self, "spine_fields", tuple(reversed(self.fields)))
        for name in ("fields", "spine_fields"):
            fields = getattr(self, name)
            bad = [f for f in fields if f not in _WIDTH]
            if bad or not fields:
                raise TrafficError(f"hash.{name}", f"unknown field(s) {bad}; choose from {list(_WIDTH)}")
            if len(set(fields)) != len(fields):
                raise TrafficError(f"hash.{name}", "a field appears twice")
        try:
            ipaddress.IPv4Address(self.ip_base)
        except ValueError as exc:
            raise TrafficError("hash.ip_base", str(exc)) from None

    @property
    def steerable(self) -> bool:
        return "src_port" in self.fields

    def ip_of(self, nic: np.ndarray) -> np.ndarray:
        return (int(ipaddress.IPv4Address(self.ip_base)) + np.asarray(nic, dtype=np.int64)) & 0xFFFFFFFF

    def message(self, src_nic: int, dst_nic: int, sport: int, *, spine: bool = False) -> bytes:
        """The exact bytes hashed for one tuple (for checking against zlib)."""
        values = {
            "src_ip": int(self.ip_of(src_nic)), "dst_ip": int(self.ip_of(dst_nic)),
            "proto": self.proto, "src_port": int(sport), "dst_port": self.dst_port,
        }
        fields = self.spine_fields if spine else self.fields
        return b"".join(values[f].to_bytes(_WIDTH[f], "big") for f in fields)

    def _table(self, seed: int, fields: tuple[str, ...]) -> tuple[int, np.ndarray]:
        if (seed, fields) not in self._tables:
            length = sum(_WIDTH[f] for f in fields)
            zero = zlib.crc32(bytes(length), seed)
            tables = np.zeros((length, 256), dtype=np.uint32)
            for q in range(length):
                buf = bytearray(length)
                for v in range(256):
                    buf[q] = v
                    tables[q, v] = zlib.crc32(bytes(buf), seed) ^ zero
            self._tables[(seed, fields)] = (zero, tables)
        return self._tables[(seed, fields)]

    def crc(self, src_nic, dst_nic, sport, *, spine: bool = False) -> np.ndarray:
        """CRC32 of many tuples at once (arrays broadcast against each other)."""
        seed, fields = (self.spine_seed, self.spine_fields) if spine else (self.seed, self.fields)
        zero, tables = self._table(seed, fields)
        src, dst, sport = np.broadcast_arrays(
            np.asarray(src_nic, np.int64), np.asarray(dst_nic, np.int64), np.asarray(sport, np.int64)
        )
        values = {
            "src_ip": self.ip_of(src), "dst_ip": self.ip_of(dst), "proto": np.full(src.shape, self.proto),
            "src_port": sport, "dst_port": np.full(src.shape, self.dst_port),
        }
        out = np.full(src.shape, zero, dtype=np.uint32)
        q = 0
        for f in fields:
            width, v = _WIDTH[f], values[f].astype(np.int64)
            for byte in range(width):
                shift = 8 * (width - 1 - byte)
                out ^= tables[q, (v >> shift) & 0xFF]
                q += 1
        return out

    def select(self, src_nic, dst_nic, sport, members, *, spine: bool = False) -> np.ndarray:
        """Index of the ECMP member the switch picks: crc % members."""
        crc = self.crc(src_nic, dst_nic, sport, spine=spine)
        return (crc % np.asarray(members, dtype=np.uint32)).astype(np.int64)

    @classmethod
    def from_dict(cls, data: dict) -> "HashModel":
        known = {"fields", "spine_fields", "seed", "spine_seed", "ip_base", "dst_port", "proto"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrafficError(f"hash.{unknown[0]}", f"unknown hash field; known: {sorted(known)}")
        data = dict(data)
        for key in ("fields", "spine_fields"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)
