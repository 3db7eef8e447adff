"""Write a ``torch.save``-compatible zip archive one record at a time.

``torch.load`` reads a zip of *stored* (uncompressed) records under one prefix:
``data.pkl``, one ``data/<key>`` record per storage, and a few small metadata
records (FORMAT.md §5). This writer produces the same container that
``torch.save`` (PyTorch's miniz-based ``PyTorchFileWriter``) produces: the same
record order for the metadata, 64-byte aligned record data padded with an
``FB`` extra field, data descriptors after each record (so nothing is ever
rewritten), ZIP64 fields where a size or offset passes 4 GiB, and a ZIP64 end
record. Because each storage record is streamed, a 100 GB rank file never has
to exist in memory, and because the pickle does not depend on the data it is
written first, exactly where ``torch.save`` puts it.

:func:`archive_size` computes the exact file size from the record list alone,
which is how ``streamconv plan`` reports rank-file sizes without writing.
"""

from __future__ import annotations

import os
import struct
import zlib

ALIGN = 64
_U32 = 0xFFFFFFFF
_FLAGS = 0x0808  # bit 3: sizes in data descriptor; bit 11: UTF-8 names
_FLAGS_EMPTY = 0x0800  # torch writes empty records without a data descriptor


def _flags(size: int) -> int:
    return _FLAGS if size else _FLAGS_EMPTY


def _descriptor_len(offset: int, size: int) -> int:
    if not size:
        return 0
    return 24 if _zip64_local(offset, size) else 16

#: metadata records torch.save writes after data.pkl, before the storages
HEAD_RECORDS = ((".format_version", b"1"), (".storage_alignment", b"64"), ("byteorder", b"little"))
VERSION_RECORD = ("version", b"3\n")
SERIALIZATION_ID = ".data/serialization_id"


def _local_header(name: bytes, offset: int, size: int) -> bytes:
    z64 = b""
    if size >= _U32:
        # written before the data, as miniz does: the compressed size is still 0 here
        # (the data descriptor and the central directory carry the real one)
        z64 += struct.pack("<QQ", size, 0)
    if offset >= _U32:
        # PyTorch's writer also records the header offset locally once past 4 GiB
        z64 += struct.pack("<Q", offset)
    extra = struct.pack("<HH", 1, len(z64)) + z64 if z64 else b""
    base = 30 + len(name) + len(extra)
    pad = (-(offset + base + 4)) % ALIGN
    extra += struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # "FB" padding field
    hdr = struct.pack("<IHHHHHIIIHH", 0x04034B50, 0, _flags(size), 0, 0, 0, 0, 0, 0, len(name), len(extra))
    return hdr + name + extra


def _descriptor(crc: int, size: int, zip64: bool) -> bytes:
    if not size:
        return b""
    if zip64:
        return struct.pack("<IIQQ", 0x08074B50, crc, size, size)
    return struct.pack("<IIII", 0x08074B50, crc, size, size)


def _zip64_local(offset: int, size: int) -> bool:
    return size >= _U32 or offset >= _U32


def _central_entry(name: bytes, offset: int, size: int, crc: int) -> bytes:
    extra = b""
    usize = csize = size
    off = offset
    if size >= _U32:
        extra += struct.pack("<QQ", size, size)
        usize = csize = _U32
    if offset >= _U32:
        extra += struct.pack("<Q", offset)
        off = _U32
    if extra:
        extra = struct.pack("<HH", 1, len(extra)) + extra
    hdr = struct.pack(
        "<IHHHHHHIIIHHHHHII", 0x02014B50, 0, 0, _flags(size), 0, 0, 0, crc, csize, usize,
        len(name), len(extra), 0, 0, 0, 0, off,
    )
    return hdr + name + extra


def _end_records(n: int, cd_offset: int, cd_size: int) -> bytes:
    eocd64_offset = cd_offset + cd_size
    rec = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 0x2D, 0, 0, n, n, cd_size, cd_offset)
    loc = struct.pack("<IIQI", 0x07064B50, 0, eocd64_offset, 1)
    eocd = struct.pack(
        "<IHHHHIIH", 0x06054B50, 0, 0, min(n, 0xFFFF), min(n, 0xFFFF),
        min(cd_size, _U32), cd_offset if cd_offset < _U32 else _U32, 0,
    )
    return rec + loc + eocd


def archive_size(prefix: str, pickle_size: int, storage_sizes: list, serialization_id_len: int = 40) -> int:
    """Exact size of the archive :class:`TorchZipWriter` writes for these records."""
    names = record_plan(prefix, pickle_size, storage_sizes, serialization_id_len)
    offset = 0
    cd = 0
    for name, size in names:
        n = name.encode()
        cd += len(_central_entry(n, offset, size, 0))
        offset += len(_local_header(n, offset, size)) + size + _descriptor_len(offset, size)
    return offset + cd + 56 + 20 + 22


def record_plan(prefix, pickle_size, storage_sizes, sid_len):
    """(record name, size) of every record, in the order :class:`TorchZipWriter` writes them."""
    names = [(f"{prefix}/data.pkl", pickle_size)]
    names += [(f"{prefix}/{n}", len(d)) for n, d in HEAD_RECORDS]
    names += [(f"{prefix}/data/{i}", s) for i, s in enumerate(storage_sizes)]
    names += [(f"{prefix}/{VERSION_RECORD[0]}", len(VERSION_RECORD[1])), (f"{prefix}/{SERIALIZATION_ID}", sid_len)]
    return names


def fixed_records(prefix, pickle_bytes: bytes, sid: bytes | None = None) -> dict:
    """Record name -> bytes of the records the plan fixes: the pickle, the format records and, where it is known
    before the data (a rank file's, not a torch_dist item's), the serialization id."""
    out = {f"{prefix}/data.pkl": pickle_bytes, f"{prefix}/{VERSION_RECORD[0]}": VERSION_RECORD[1]}
    out.update({f"{prefix}/{n}": d for n, d in HEAD_RECORDS})
    if sid is not None:
        out[f"{prefix}/{SERIALIZATION_ID}"] = sid
    return out


class TorchZipWriter:
    """Append-only writer for one archive on an open file descriptor.

    Usage: ``w = TorchZipWriter(fd, prefix, pickle_bytes)``, then for every storage
    in order ``w.begin_storage(nbytes)``, any number of ``w.write(chunk)``,
    ``w.end_storage()``; finally ``w.finish(serialization_id)``. The caller owns the
    descriptor (and its fsync/rename). CRCs are computed as bytes pass.
    """

    def __init__(self, fd, prefix: str, pickle_bytes: bytes, on_write=None):
        # ``fd``: an OS file descriptor, or a buffered binary stream (anything with a
        # ``write`` that takes all it is given, e.g. ``io.BytesIO``) for small archives
        # built in memory
        self.fd = fd
        self.prefix = prefix
        self.on_write = on_write  # called with the file offset after each write
        self.offset = 0
        self.entries: list = []  # (name bytes, offset, size, crc)
        self._open = None  # [name, offset, expected size, written, crc]
        self._storage_index = 0
        self._add(f"{prefix}/data.pkl", pickle_bytes)
        for name, data in HEAD_RECORDS:
            self._add(f"{prefix}/{name}", data)

    # -- low level -------------------------------------------------------
    def _raw(self, data) -> None:
        mv = memoryview(data).cast("B")
        if isinstance(self.fd, int):
            while mv:
                n = os.write(self.fd, mv)
                mv = mv[n:]
                self.offset += n
        else:
            self.fd.write(mv)
            self.offset += len(mv)
        if self.on_write is not None:
            self.on_write(self.offset)

    def _begin(self, name: str, size: int) -> None:
        assert self._open is None, "record still open"
        n = name.encode()
        start = self.offset
        self._raw(_local_header(n, start, size))
        self._open = [n, start, size, 0, 0]

    def write(self, data) -> None:
        """Append bytes to the open record (any buffer: bytes, memoryview, numpy)."""
        rec = self._open
        mv = memoryview(data).cast("B")
        if rec[3] + len(mv) > rec[2]:
            raise ValueError(f"record {rec[0].decode()} overflows its planned {rec[2]} bytes")
        rec[4] = zlib.crc32(mv, rec[4])
        self._raw(mv)
        rec[3] += len(mv)

    def _end(self) -> None:
        n, start, size, written, crc = self._open
        if written != size:
            raise ValueError(f"record {n.decode()} got {written} of its planned {size} bytes")
        self._raw(_descriptor(crc, size, _zip64_local(start, size)))
        self.entries.append((n, start, size, crc))
        self._open = None

    def _add(self, name: str, data: bytes) -> None:
        self._begin(name, len(data))
        self.write(data)
        self._end()

    # -- storages ----------------------------------------------------------
    def begin_storage(self, nbytes: int) -> None:
        self._begin(f"{self.prefix}/data/{self._storage_index}", nbytes)
        self._storage_index += 1

    def end_storage(self) -> None:
        self._end()

    def finish(self, serialization_id: str) -> list:
        """Write the trailing records and the central directory; return the record CRCs."""
        self._add(f"{self.prefix}/{VERSION_RECORD[0]}", VERSION_RECORD[1])
        self._add(f"{self.prefix}/{SERIALIZATION_ID}", serialization_id.encode())
        cd_offset = self.offset
        for n, start, size, crc in self.entries:
            self._raw(_central_entry(n, start, size, crc))
        cd_size = self.offset - cd_offset
        self._raw(_end_records(len(self.entries), cd_offset, cd_size))
        return [(n.decode(), size, crc) for n, _, size, crc in self.entries]
