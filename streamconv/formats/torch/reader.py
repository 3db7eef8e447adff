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
import os
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass

from ...core.shapes import contiguous_strides, numel
from ...megatron.entries import EntryKind
from ..base import FileReader

_READ_CHUNK = 16 * 2**20  # CRC checks read this much at a time

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
        return numel(self.shape)

    @property
    def contiguous(self) -> bool:
        return contiguous_strides(self.shape) == tuple(self.stride) or self.numel == 0


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


class _Window(io.RawIOBase):
    """Bytes ``[start, start + length)`` of an open file as a seekable stream (what zipfile needs)."""

    def __init__(self, fh, start: int, length: int):
        super().__init__()
        self.fh, self.start, self.length, self.pos = fh, start, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, offset, whence=os.SEEK_SET):
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def read(self, n=-1):
        left = max(0, self.length - self.pos)
        n = left if n is None or n < 0 else min(n, left)
        self.fh.seek(self.start + self.pos)
        data = self.fh.read(n)
        self.pos += len(data)
        return data

    def readinto(self, b):
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


def archive_records(fh, start: int, length: int) -> dict:
    """Record name -> (absolute data offset, size, crc) of the zip archive in ``[start, start + length)`` of ``fh``
    (a whole rank file, or one item of a torch_dist file), every local header checked to lie inside it."""
    out = {}
    with zipfile.ZipFile(_Window(fh, start, length)) as z:
        for i in z.infolist():
            if i.header_offset + 30 > length:
                raise zipfile.BadZipFile(f"local header of {i.filename} outside the item")
            fh.seek(start + i.header_offset)
            hdr = fh.read(30)
            if len(hdr) < 30 or hdr[:4] != b"PK\x03\x04":
                raise zipfile.BadZipFile(f"bad local header for {i.filename}")
            n, e = struct.unpack("<HH", hdr[26:30])
            data = i.header_offset + 30 + n + e
            if data + i.file_size > length:
                raise zipfile.BadZipFile(f"record {i.filename} runs past the item's end")
            out[i.filename] = (start + data, i.file_size, i.CRC)
    if not out:
        raise zipfile.BadZipFile("empty archive")
    return out


def zip_records(path: str) -> dict:
    """Record name -> (data offset, size, crc) for every record of a zip archive file, in order."""
    with open(path, "rb") as fh:
        return archive_records(fh, 0, os.fstat(fh.fileno()).st_size)


def crc_of(fh, start: int, size: int) -> int | None:
    """CRC-32 of ``size`` bytes at ``start``, read a chunk at a time; None if the file ends first."""
    fh.seek(start)
    crc, left = 0, size
    while left:
        chunk = fh.read(min(left, _READ_CHUNK))
        if not chunk:
            return None
        crc = zlib.crc32(chunk, crc)
        left -= len(chunk)
    return crc


def records_intact(fh, records: dict, recorded: list | None = None) -> bool:
    """Every record's data has the CRC its zip directory states; with ``recorded`` (the ``[name, size, crc]``
    list kept when the archive was finished), the directory must also still say exactly that."""
    if recorded is not None and [[n, size, crc] for n, (_, size, crc) in records.items()] != recorded:
        return False
    return all(crc_of(fh, start, size) == crc for start, size, crc in records.values())


def archive_matches(fh, records: dict, want: list, fixed: dict, check_data: bool = True) -> bool:
    """An archive as planned: its record names and sizes in order (``want``: (name, size) pairs), the ``fixed``
    records (name -> bytes) byte for byte, then (``check_data``) every record against its CRC.

    Shared by both formats' "is this the planned file" check: a rank file is one
    such archive, a torch_dist data file one per tensor item.
    """
    if [(n, size) for n, (_, size, _) in records.items()] != [(n, size) for n, size in want]:
        return False
    for name, data in fixed.items():
        start, size, _ = records[name]
        fh.seek(start)
        if fh.read(size) != data:
            return False
    return records_intact(fh, records) if check_data else True


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


TOP_LEVEL = ("args", "checkpoint_version", "iteration", "model", "num_floating_point_operations_so_far")


def _same(a, b) -> bool:
    return type(a) is type(b) and a == b


class TorchFileReader(FileReader):
    """A finished rank file for verify: its structure against the plan, and where each storage is."""

    def __init__(self, path: str):
        self.r = RankFileReader(path)
        self.path = path

    def check(self, f, args_expected, report) -> None:
        rel, reader = f.relpath, self.r
        st = reader.state
        if not isinstance(st, dict):
            report.add(rel, "top level is not a dict")
            return
        for k in TOP_LEVEL:
            if k not in st:
                report.add(rel, f"top-level key {k!r} missing")
        extra = set(st) - set(TOP_LEVEL) - {"rerun_state_machine"}
        if extra:
            report.add(rel, f"unexpected top-level keys {sorted(extra)}")
        for k, v in (("checkpoint_version", 3.0), ("iteration", 1), ("num_floating_point_operations_so_far", 0)):
            if k in st and not _same(st[k], v):
                report.add(rel, f"{k} is {st[k]!r}, expected {v!r}")
        args = st.get("args")
        if args is not None:
            got = vars(args)
            for k, v in vars(args_expected).items():
                if k not in got:
                    report.add(rel, f"args.{k} missing (expected {v!r})")
                elif not _same(got[k], v):
                    report.add(rel, f"args.{k} is {got[k]!r}, expected {v!r}")
        model = st.get("model")
        if not isinstance(model, dict):
            report.add(rel, "model is not a dict")
            return
        want_keys = [e.key for e in f.entries]
        if list(model.keys()) != want_keys:
            missing = [k for k in want_keys if k not in model]
            unexpected = [k for k in model if k not in want_keys]
            if missing:
                report.add(rel, f"missing keys: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
            if unexpected:
                report.add(rel, f"unexpected keys: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
            if not missing and not unexpected:
                report.add(rel, "keys are in a different order than Megatron's")
        for e in f.entries:
            v = model.get(e.key, "<missing>")
            if isinstance(v, str):
                continue
            if e.kind is EntryKind.NONE:
                if v is not None:
                    report.add(rel, f"{e.key}: expected None")
                continue
            if not isinstance(v, TensorRecord):
                report.add(rel, f"{e.key}: expected a tensor, found {type(v).__name__}")
                continue
            if v.storage.dtype != e.dtype:
                report.add(rel, f"{e.key}: dtype {v.storage.dtype}, expected {e.dtype.value}")
            if v.shape != tuple(e.shape):
                report.add(rel, f"{e.key}: shape {list(v.shape)}, expected {list(e.shape)}")
            if not v.contiguous:
                report.add(rel, f"{e.key}: not contiguous")
            try:
                off, size, _ = reader.record(v.storage.key)
                if (v.offset + v.numel) * v.storage.itemsize > size:
                    report.add(rel, f"{e.key}: storage record too small")
            except KeyError:
                report.add(rel, f"{e.key}: storage record data/{v.storage.key} missing")
                continue
            if e.kind is EntryKind.BYTES:
                with open(reader.path, "rb") as fh:
                    fh.seek(off + v.offset)
                    if fh.read(len(e.data)) != e.data or v.numel != len(e.data):
                        report.add(rel, f"{e.key}: value differs from Megatron's _extra_state")

    def locate(self, entry):
        model = self.r.state.get("model") if isinstance(self.r.state, dict) else None
        rec = model.get(entry.key) if isinstance(model, dict) else None
        if not isinstance(rec, TensorRecord):
            return None
        try:
            off, size, _ = self.r.record(rec.storage.key)
        except KeyError:
            return None
        start = off + rec.offset * rec.storage.itemsize
        return start, off + size - start
