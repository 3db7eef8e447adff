"""Read a ``torch.save`` rank file's structure without loading its tensors.

``verify`` and tests need the keys, shapes, storage records and ``args`` of a
rank file that may be tens of GB. This parses the zip directory and unpickles
``data.pkl`` with a restricted unpickler that turns tensors into
:class:`TensorRecord` descriptions (storage record, shape, stride, dtype) and
refuses any class outside the handful a Megatron checkpoint may contain, so a
hostile file cannot run code. Works on files written by ``torch.save`` too.
"""

from __future__ import annotations

import argparse
import collections
import io
import math
import pickle
import struct
import zipfile
from dataclasses import dataclass

_STORAGE_DTYPES = {
    "BFloat16Storage": ("bf16", 2), "ByteStorage": ("uint8", 1), "FloatStorage": ("f32", 4),
    "HalfStorage": ("f16", 2), "LongStorage": ("i64", 8), "IntStorage": ("i32", 4),
}


@dataclass(frozen=True)
class StorageRecord:
    key: str
    dtype: str
    itemsize: int
    numel: int


@dataclass(frozen=True)
class TensorRecord:
    storage: StorageRecord
    offset: int
    shape: tuple
    stride: tuple

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def contiguous(self) -> bool:
        acc, want = 1, []
        for s in reversed(self.shape):
            want.append(acc)
            acc *= s
        return tuple(reversed(want)) == tuple(self.stride) or self.numel == 0


class _StorageType:
    def __init__(self, name):
        self.name = name


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return TensorRecord(storage, offset, tuple(size), tuple(stride))


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("argparse", "Namespace"):
            return argparse.Namespace
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"unexpected class {module}.{name} in data.pkl")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, stype, key, _loc, numel = pid
        if not isinstance(stype, _StorageType):
            raise pickle.UnpicklingError(f"unexpected storage type {stype!r}")
        dtype, itemsize = _STORAGE_DTYPES[stype.name]
        return StorageRecord(str(key), dtype, itemsize, int(numel))


def zip_records(path: str) -> dict:
    """Record name -> (data offset, size, crc) for every record of a zip archive, in order."""
    records = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for i in z.infolist():
            f.seek(i.header_offset)
            hdr = f.read(30)
            if len(hdr) < 30 or hdr[:4] != b"PK\x03\x04":
                raise zipfile.BadZipFile(f"bad local header for {i.filename}")
            n, e = struct.unpack("<HH", hdr[26:30])
            records[i.filename] = (i.header_offset + 30 + n + e, i.file_size, i.CRC)
    if not records:
        raise zipfile.BadZipFile("empty archive")
    return records


class RankFileReader:
    """Structure of one rank file: ``state`` (with TensorRecords) and record data offsets."""

    def __init__(self, path: str):
        self.path = path
        self.records = zip_records(path)
        first = next(iter(self.records))
        self.prefix = first.split("/", 1)[0]
        with zipfile.ZipFile(path) as z:
            self.state = _Unpickler(io.BytesIO(z.read(f"{self.prefix}/data.pkl"))).load()

    def record(self, storage_key: str) -> tuple:
        """(data offset, size, crc) of the storage record ``storage_key``."""
        return self.records[f"{self.prefix}/data/{storage_key}"]
