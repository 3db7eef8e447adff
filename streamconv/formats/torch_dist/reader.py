"""Read a torch_dist checkpoint back without trusting it: items located through ``.metadata``.

``verify`` and ``--resume`` need to know where each stored chunk's bytes are
and whether the file still holds what was written. A ``.distcp`` file has no
directory of its own: ``.metadata`` (read only through the restricted
unpickler of :mod:`.metadata`) says which item of which file holds a chunk,
and each tensor item is a small zip archive (``torch.save`` of the chunk)
whose central directory gives its records; its ``data.pkl`` is read with the
torch reader's restricted unpickler, which yields shapes and storage records,
never objects.
"""

from __future__ import annotations

import functools
import io
import os
import pickle

from ..base import FileReader
from ..torch.reader import TensorRecord, _Unpickler, archive_records
from .metadata import METADATA_FILE, check_coverage, check_storage_files, read_metadata

class TensorItemView:
    """A stored tensor item: its records and the tensor its ``data.pkl`` describes."""

    def __init__(self, fh, start: int, length: int):
        self.records = archive_records(fh, start, length)
        first = next(iter(self.records))
        self.prefix = first.split("/", 1)[0]
        off, size, _ = self.records[f"{self.prefix}/data.pkl"]
        fh.seek(off)
        self.tensor = _Unpickler(io.BytesIO(fh.read(size))).load()
        if not isinstance(self.tensor, TensorRecord):
            raise pickle.UnpicklingError(f"item holds a {type(self.tensor).__name__}, not one tensor")

    def data_span(self) -> tuple:
        """(absolute offset, bytes) of the tensor's data in its storage record."""
        t = self.tensor
        off, size, _ = self.records[f"{self.prefix}/data/{t.storage.key}"]
        start = off + t.offset * t.storage.itemsize
        return start, off + size - start


def file_stamp(path: str) -> tuple | None:
    """(size, mtime_ns, inode) of ``path``, None if it is absent: a cache key that changes when the file does."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


@functools.lru_cache(maxsize=2)
def _metadata_cached(path: str, stamp: tuple):
    return read_metadata(path)


def checkpoint_metadata(directory: str):
    """The directory's ``.metadata`` (restricted unpickling; cached while the file is unchanged)."""
    path = os.path.join(directory, METADATA_FILE)
    stamp = file_stamp(path)
    return read_metadata(path) if stamp is None else _metadata_cached(path, stamp)  # absent: the one-line error


class TorchDistFileReader(FileReader):
    """A finished ``.distcp`` file for verify, located through the checkpoint's ``.metadata``."""

    def __init__(self, path: str, f):
        from torch.distributed.checkpoint.metadata import MetadataIndex

        self.path = path
        self.name = os.path.basename(path)
        self.dir = os.path.dirname(path)
        self.md = checkpoint_metadata(self.dir)
        self._index = MetadataIndex
        self.items = {e.key: it for e, it in zip(f.entries, f.state.items)}
        self._views: dict = {}

    def _info(self, it):
        return self.md.storage_data.get(self._index(it.fqn, it.offsets) if it.offsets is not None
                                        else self._index(it.fqn))

    def _view(self, it):
        k = (it.fqn, it.offsets)
        if k not in self._views:
            info = self._info(it)
            with open(self.path, "rb") as fh:
                self._views[k] = TensorItemView(fh, info.offset, info.length)
        return self._views[k]

    def check(self, f, args_expected, report) -> None:
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

        rel = f.relpath
        size = os.path.getsize(self.path)
        if size != f.size:
            report.add(rel, f"{size} bytes, expected {f.size}")
        if f.state.first:
            for p in check_coverage(self.md) + check_storage_files(self.md, self.dir):
                report.add(METADATA_FILE, p)
        planned = set()
        for e, it in zip(f.entries, f.state.items):
            where = e.key
            planned.add((it.fqn, it.offsets))
            info = self._info(it)
            if info is None:
                report.add(rel, f"{where}: not in .metadata (Megatron cannot find it)")
                continue
            if info.relative_path != self.name:
                report.add(rel, f"{where}: .metadata points to {info.relative_path!r}")
                continue
            if (info.offset, info.length) != (it.offset, it.length):
                report.add(rel, f"{where}: stored at bytes {info.offset}+{info.length}, expected "
                                f"{it.offset}+{it.length}")
            md = self.md.state_dict_metadata.get(it.fqn)
            if it.offsets is None:
                if not isinstance(md, BytesStorageMetadata):
                    report.add(rel, f"{where}: .metadata does not list it as a byte object")
                if info.offset + info.length <= size:
                    with open(self.path, "rb") as fh:
                        fh.seek(info.offset)
                        if fh.read(info.length) != it.data:
                            report.add(rel, f"{where}: value differs from Megatron's _extra_state")
                continue
            if not isinstance(md, TensorStorageMetadata):
                report.add(rel, f"{where}: .metadata does not list {it.fqn} as a tensor")
                continue
            if tuple(md.size) != tuple(it.global_shape):
                report.add(rel, f"{where}: global shape {list(md.size)}, expected {list(it.global_shape)}")
            if str(md.properties.dtype) != {"bf16": "torch.bfloat16", "f32": "torch.float32"}[it.dtype]:
                report.add(rel, f"{where}: dtype {md.properties.dtype}, expected {it.dtype}")
            if not any(tuple(c.offsets) == it.offsets and tuple(c.sizes) == it.shape for c in md.chunks):
                report.add(rel, f"{where}: no chunk of size {list(it.shape)} there in .metadata")
            try:
                t = self._view(it).tensor
            except Exception as x:  # noqa: BLE001 - any damage is a finding
                report.add(rel, f"{where}: item unreadable ({type(x).__name__}: {x})")
                continue
            if t.shape != tuple(it.shape):
                report.add(rel, f"{where}: item holds shape {list(t.shape)}, expected {list(it.shape)}")
            if t.storage.dtype != it.dtype:
                report.add(rel, f"{where}: item holds {t.storage.dtype}, expected {it.dtype}")
            if not t.contiguous:
                report.add(rel, f"{where}: item tensor is not contiguous")
        for idx, info in self.md.storage_data.items():
            if info.relative_path == self.name:
                key = (idx.fqn, None if idx.offset is None else tuple(idx.offset))
                if key not in planned:
                    report.add(rel, f"unexpected item {idx.fqn}"
                                    + ("" if idx.offset is None else f" at {list(idx.offset)}"))

    def locate(self, entry):
        it = self.items.get(entry.key)
        info = self._info(it) if it is not None else None
        if info is None or info.relative_path != self.name:
            return None
        if it.offsets is None:
            return info.offset, info.length
        try:
            return self._view(it).data_span()
        except Exception:  # noqa: BLE001 - reported by check()
            return None
