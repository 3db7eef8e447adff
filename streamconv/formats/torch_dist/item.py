"""One stored item of a torch Distributed Checkpoint, written as a stream.

torch's ``FileSystemWriter`` (and Megatron's ``FileSystemWriterAsync``, which
calls torch's ``_write_item``) stores each tensor chunk by running
``torch.save(chunk, stream)`` at the current end of a ``.distcp`` file and
recording ``(file, offset, length)``; the reader slices those bytes out and
``torch.load``s them (``weights_only=True``), then narrows. So an item is a
complete ``torch.save`` archive of ONE bare contiguous tensor whose shape is
the chunk's shape in the global tensor's rank (a layer of a stacked
``[L, ...]`` tensor is a ``[1, ...]`` chunk). Because torch writes into a
stream, the archive's records are named ``archive/...`` and its zip offsets
(and 64-byte alignment) count from the item's first byte, not the file's.

:class:`TensorItemWriter` writes those bytes with the chunk's data streamed
in pieces (the chunk never has to exist in memory as one tensor), and finishes
the item with the serialization id torch would compute, so the item is
byte-for-byte ``torch.save(chunk)``. :func:`item_size` gives the exact length
from dtype and shape alone, so file offsets can be planned before any data is
converted.

Megatron stores a ``ShardedObject`` (e.g. ``_extra_state``) as a byte item:
``torch.save([obj])`` of the list of local objects with that unique key (one
per key, since only main replicas are saved); :func:`object_item_bytes`.
"""

from __future__ import annotations

import io
import zlib

from ..torch.state_pickle import build_tensor_pickle
from ..torch.zipwriter import HEAD_RECORDS, VERSION_RECORD, TorchZipWriter, archive_size
from .torch_sid import descriptor_values, serialization_id

#: torch.save into a stream (not a path) names the archive "archive"
ARCHIVE_PREFIX = "archive"
#: dtypes an item can hold (streamconv names -> element size)
DTYPES = ("bf16", "f32")


_ITEMSIZE = {"bf16": 2, "f32": 4}


def _check(dtype: str, shape) -> tuple:
    if dtype not in DTYPES:
        raise ValueError(f"item dtype {dtype!r} not supported (one of {', '.join(DTYPES)})")
    shape = tuple(shape)
    if not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ValueError(f"item shape {shape!r} must be non-negative ints")
    return shape


def chunk_nbytes(dtype: str, shape) -> int:
    """Bytes of the chunk's raw data (C order, little-endian)."""
    n = _ITEMSIZE[dtype]
    for s in _check(dtype, shape):
        n *= s
    return n


def item_size(dtype: str, shape) -> int:
    """Exact length of the item :class:`TensorItemWriter` (and torch.save) writes."""
    shape = _check(dtype, shape)
    return archive_size(ARCHIVE_PREFIX, len(build_tensor_pickle(dtype, shape)), [chunk_nbytes(dtype, shape)])


def finish_like_torch(writer: TorchZipWriter, pickle_bytes: bytes, storage_heads: list) -> None:
    """Write the trailing records with the serialization id torch.save would write.

    ``storage_heads``: the first 8 bytes of each storage record's data, in order
    (torch's id depends on them in one corner case; see torch_sid).
    """
    prefix = writer.prefix + "/"
    heads = {f"{prefix}data.pkl": pickle_bytes[:8]}
    heads.update({f"{prefix}{name}": data[:8] for name, data in HEAD_RECORDS})
    heads.update({f"{prefix}data/{i}": bytes(h) for i, h in enumerate(storage_heads)})
    names, records = [], []
    for raw_name, _start, size, crc in writer.entries:
        name = raw_name.decode()
        names.append(name[len(prefix):])
        records.append((size, crc, heads[name]))
    # finish() writes the version record next, then the id
    vname, vdata = VERSION_RECORD
    names.append(vname)
    records.append((len(vdata), zlib.crc32(vdata), vdata[:8]))
    writer.finish(serialization_id(names, descriptor_values(records)))


class TensorItemWriter:
    """Stream one tensor item onto ``out`` at its current position.

    ``out``: an OS file descriptor (or a buffered binary stream) positioned where
    the item starts; the item's offset in the file is that position. Then call
    :meth:`write` with the chunk's raw bytes (C order, little-endian, any number
    of pieces of any size) and :meth:`finish`, which returns the item's length
    (== :func:`item_size`). Writing more or fewer bytes than the chunk holds
    raises ``ValueError``.

    The pickle records C-contiguous strides (a size-1 axis gets the product of
    the later sizes), as ``torch.save`` of a freshly made or cloned chunk does;
    Megatron's chunks (``param.view(1, ...)``) have the same. Only a view saved
    as-is could record another stride on a size-1 axis, which loading ignores.
    """

    def __init__(self, out, dtype: str, shape, on_write=None):
        self.shape = _check(dtype, shape)
        self.dtype = dtype
        self.nbytes = chunk_nbytes(dtype, self.shape)
        self._pickle = build_tensor_pickle(dtype, self.shape)
        self._head = bytearray()
        self._w = TorchZipWriter(out, ARCHIVE_PREFIX, self._pickle, on_write=on_write)
        self._w.begin_storage(self.nbytes)

    @property
    def written(self) -> int:
        """Bytes of the item written so far."""
        return self._w.offset

    def write(self, data) -> None:
        mv = memoryview(data).cast("B")
        if len(self._head) < 8:
            self._head += mv[: 8 - len(self._head)]
        self._w.write(mv)

    def finish(self) -> int:
        self._w.end_storage()
        finish_like_torch(self._w, self._pickle, [self._head])
        return self._w.offset

    @property
    def records(self) -> list:
        """(record name, size, crc) of every record of the finished item, in write order."""
        return [(name.decode(), size, crc) for name, _start, size, crc in self._w.entries]


def object_item_bytes(obj) -> bytes:
    """Byte item Megatron writes for a ShardedObject whose local data is ``obj``.

    Megatron's ``_mcore_to_torch_sharded_object`` does
    ``torch.save([sh_obj.data for sh_obj in sh_objs], BytesIO())``; with only main
    replicas saved there is one object per unique key. torch itself is used here
    (the objects are tiny and arbitrary), so the bytes are torch's by definition.
    Loading: DCP ``torch.load(..., weights_only=False)``s them back into the list.
    """
    import torch

    buf = io.BytesIO()
    torch.save([obj], buf)
    return buf.getvalue()
