"""The ``.data/serialization_id`` record exactly as PyTorch's zip writer computes it.

Why: a torch Distributed Checkpoint item is ``torch.save(chunk)``. If our item
carries the same 40-digit id that torch would write, the item is byte-for-byte
``torch.save(chunk)``: deterministic (a rerun or ``--resume`` rewrites identical
bytes), content-addressed (same chunk, same bytes), and checkable against
torch itself with no id copied over from torch's output.

PyTorch (``caffe2/serialize/inline_container.cc``, ``writeSerializationId``)
builds the id from two 64-bit numbers, each printed as 20 zero-padded digits:

1. ``c10::hash_combine`` folded over ``std::hash<std::string>`` of every record
   name written so far (names without the archive prefix), in the iteration
   order of the ``std::unordered_set`` that holds them. The wheels are built
   against libstdc++, so that is libstdc++'s ``_Hash_bytes`` (seed 0xc70f6907)
   and its hashtable's bucket order.
2. ``c10::hash_combine`` folded over the CRC-32 of every data descriptor the
   writer emitted, in write order. The writer spots descriptors by looking at
   the first four bytes of each write of 8+ bytes, so a record whose *data*
   starts with the descriptor signature ``PK\\x07\\x08`` also contributes its
   bytes 4..8 (a quirk reproduced here; a test covers it). Empty records have
   no descriptor.

Only archives of up to 13 records (up to 8 storages) are modelled: that is the
first bucket-array size libstdc++ picks, and an item or ``common.pt`` has at
most 7 records. Larger archives raise ``ValueError`` rather than produce a
wrong id.
"""

from __future__ import annotations

import struct

_M64 = (1 << 64) - 1
_MUL = ((0xC6A4A793 << 32) + 0x5BD1E995) & _M64
_SEED = 0xC70F6907
DESCRIPTOR_SIGNATURE = b"PK\x07\x08"
_FIRST_BUCKETS = 13  # libstdc++ _Prime_rehash_policy: first allocation is 13 buckets


def _shift_mix(v: int) -> int:
    return v ^ (v >> 47)


def std_string_hash(data: bytes) -> int:
    """libstdc++ ``std::hash<std::string>`` on a 64-bit platform."""
    n = len(data)
    aligned = n & ~7
    h = (_SEED ^ (n * _MUL)) & _M64
    for i in range(0, aligned, 8):
        word = struct.unpack_from("<Q", data, i)[0]
        h ^= (_shift_mix((word * _MUL) & _M64) * _MUL) & _M64
        h = (h * _MUL) & _M64
    if n & 7:
        h ^= int.from_bytes(data[aligned:], "little")
        h = (h * _MUL) & _M64
    h = (_shift_mix(h) * _MUL) & _M64
    return _shift_mix(h)


def hash_combine(seed: int, value: int) -> int:
    """``c10::hash_combine`` on 64-bit ``size_t``."""
    return (seed ^ ((value + 0x9E3779B9 + ((seed << 6) & _M64) + (seed >> 2)) & _M64)) & _M64


def _set_iteration_order(names: list) -> list:
    """Order in which a ``std::unordered_set<std::string>`` filled with ``names`` iterates.

    libstdc++ keeps all nodes on one singly linked list; a node whose bucket is
    empty goes to the very front, otherwise to the front of its bucket's run.
    The table goes from 1 to 13 buckets on the first insert (and the list is
    empty then, so that rehash reorders nothing); it would grow again at the
    14th element, which is outside what is modelled.
    """
    if len(names) > _FIRST_BUCKETS:
        raise ValueError(f"serialization id modelled for up to {_FIRST_BUCKETS} records, not {len(names)}")
    codes = {n: std_string_hash(n.encode()) % _FIRST_BUCKETS for n in names}
    order: list = []
    for n in names:
        b = codes[n]
        at = next((i for i, m in enumerate(order) if codes[m] == b), 0)
        order.insert(at, n)
    return order


def descriptor_values(records) -> list:
    """The 32-bit values torch's write hook folds, from ``(size, crc, head)`` per record.

    ``records`` in write order; ``head`` is the first 8 bytes of the record's data
    (fewer if the record is shorter).
    """
    out = []
    for size, crc, head in records:
        if size >= 8 and head[:4] == DESCRIPTOR_SIGNATURE:
            out.append(int.from_bytes(head[4:8], "little"))
        if size:
            out.append(crc)
    return out


def serialization_id(record_names: list, descriptor_crcs: list) -> str:
    """40-digit id torch writes, from the record names (no prefix) and :func:`descriptor_values`."""
    names_hash = 0
    for n in _set_iteration_order(list(dict.fromkeys(record_names))):
        names_hash = hash_combine(names_hash, std_string_hash(n.encode()))
    crc_hash = 0
    for c in descriptor_crcs:
        crc_hash = hash_combine(crc_hash, c)
    return f"{names_hash:020d}{crc_hash:020d}"
