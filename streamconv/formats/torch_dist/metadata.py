"""The ``.metadata`` file of a torch Distributed Checkpoint: build it, read it safely, check it.

``.metadata`` is a pickled ``torch.distributed.checkpoint.metadata.Metadata``:
every key's global shape, dtype and chunk list (``state_dict_metadata``), and
where each chunk's item sits (``storage_data``: ``MetadataIndex(fqn, chunk
offsets)`` -> ``_StorageInfo(file, offset, length)``; a byte object's index has
no offset). It is built here from plain descriptions with torch's own classes
and pickled as torch's writer pickles it, so stock ``FileSystemReader`` and
Megatron read it. Megatron's planner also attaches ``mcore_data`` ({fqn: {}}
for every regular tensor); it is added too, for fidelity only: loading model
weights never needs it (nor ``all_local_plans``, nor ``planner_data``).

Reading: a pickle can run anything, so :func:`read_metadata` admits only the
DCP metadata classes and the few torch types they reference; anything else is
refused with an ``InputError`` before it is called.

DCP does not notice a chunk that was never written (that region loads as
garbage), so :func:`check_coverage` checks that every tensor's chunks tile its
global shape exactly once and that every chunk has its storage entry.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
from dataclasses import dataclass

from ...core.errors import InputError

#: file names inside the iteration directory
METADATA_FILE = ".metadata"
#: torch.distributed.checkpoint.filesystem.CURRENT_DCP_VERSION
DCP_VERSION = "1.0.0"
#: torch's writer uses pickle's default protocol: 4 on Python 3.8-3.13 (pinned so bytes do not drift)
PICKLE_PROTOCOL = 4


@dataclass(frozen=True)
class Chunk:
    """One stored chunk of a global tensor and where its item sits."""

    offsets: tuple  # chunk start in the global tensor, one per axis
    sizes: tuple  # chunk extent, one per axis (the item's tensor shape)
    file: str  # data file name relative to the checkpoint directory, e.g. "__0_0.distcp"
    offset: int  # byte offset of the item in that file
    length: int  # item length in bytes


@dataclass(frozen=True)
class TensorEntry:
    fqn: str  # key, e.g. "decoder.layers.self_attention.linear_qkv.weight"
    dtype: str  # "bf16" or "f32"
    shape: tuple  # global shape
    chunks: tuple  # of Chunk


@dataclass(frozen=True)
class ObjectEntry:
    """A byte object (Megatron ShardedObject) stored as one item."""

    fqn: str  # the ShardedObject unique key, see megatron.sharded.sharded_object_key()
    file: str
    offset: int
    length: int


def _torch_dtype(dtype: str):
    import torch

    table = {"bf16": torch.bfloat16, "f32": torch.float32}
    if dtype not in table:
        raise ValueError(f"dtype {dtype!r} not supported (one of {', '.join(table)})")
    return table[dtype]


def build_metadata(tensors, objects=()):
    """A torch ``Metadata`` for these tensors (in order) and byte objects.

    Shapes and chunk ranks are checked here (a mismatch is a planning bug:
    ``ValueError``); whether the chunks tile the tensors is :func:`check_coverage`'s job.
    """
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )

    sdm: dict = {}
    storage: dict = {}
    mcore: dict = {}
    for t in tensors:
        if t.fqn in sdm:
            raise ValueError(f"key {t.fqn} given twice")
        shape = tuple(int(s) for s in t.shape)
        chunks = []
        for c in t.chunks:
            if len(c.offsets) != len(shape) or len(c.sizes) != len(shape):
                raise ValueError(f"{t.fqn}: chunk {c.offsets}/{c.sizes} does not match rank of {shape}")
            off = torch.Size(int(o) for o in c.offsets)
            chunks.append(ChunkStorageMetadata(offsets=off, sizes=torch.Size(int(s) for s in c.sizes)))
            # index hint left None, as Megatron's decentralized plan leaves it
            storage[MetadataIndex(t.fqn, off)] = _StorageInfo(c.file, int(c.offset), int(c.length))
        sdm[t.fqn] = TensorStorageMetadata(
            properties=TensorProperties(dtype=_torch_dtype(t.dtype)), size=torch.Size(shape), chunks=chunks,
        )
        mcore[t.fqn] = {}
    for o in objects:
        if o.fqn in sdm:
            raise ValueError(f"key {o.fqn} given twice")
        sdm[o.fqn] = BytesStorageMetadata()
        storage[MetadataIndex(o.fqn)] = _StorageInfo(o.file, int(o.offset), int(o.length))
    md = Metadata(state_dict_metadata=sdm, planner_data=None, storage_data=storage,
                  storage_meta=StorageMeta(), version=DCP_VERSION)
    md.mcore_data = mcore
    return md


def metadata_bytes(tensors, objects=()) -> bytes:
    """The ``.metadata`` file's bytes (``pickle.dump(metadata)`` as torch's ``finish`` does)."""
    return pickle.dumps(build_metadata(tensors, objects), protocol=PICKLE_PROTOCOL)


# -- restricted reading ------------------------------------------------------

_DCP_MD = "torch.distributed.checkpoint.metadata"
_DCP_FS = "torch.distributed.checkpoint.filesystem"
_DCP_PLAN = "torch.distributed.checkpoint.planner"
_ALLOWED = {
    (_DCP_MD, "Metadata"), (_DCP_MD, "TensorStorageMetadata"), (_DCP_MD, "BytesStorageMetadata"),
    (_DCP_MD, "ChunkStorageMetadata"), (_DCP_MD, "TensorProperties"), (_DCP_MD, "_MEM_FORMAT_ENCODING"),
    (_DCP_MD, "MetadataIndex"), (_DCP_MD, "StorageMeta"),
    (_DCP_FS, "_StorageInfo"), (_DCP_FS, "_StoragePrefix"),
    # Megatron's .metadata may carry all_local_plans (its save plans): inert dataclasses/enums
    (_DCP_PLAN, "SavePlan"), (_DCP_PLAN, "WriteItem"), (_DCP_PLAN, "WriteItemType"),
    (_DCP_PLAN, "TensorWriteData"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # name -> torch.layout, a table lookup
    # stock FileSystemWriter records the checkpoint directory as a Path (pure value, no I/O)
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("pathlib._local", "PosixPath"), ("pathlib._local", "PurePosixPath"),
}
#: Megatron's SavePlan subclass; read as an inert stand-in (megatron is never imported)
_MCORE_SAVE_PLAN = ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan")


@functools.lru_cache(maxsize=None)
def _mcore_plan_standin():
    from torch.distributed.checkpoint.planner import SavePlan

    class MCoreSavePlanStandIn(SavePlan):
        """Holds the fields of a Megatron ``MCoreSavePlan`` (SavePlan + mcore_data)."""

    return MCoreSavePlanStandIn


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, f, path: str):
        super().__init__(f)
        self._path = path

    def find_class(self, module, name):
        import torch

        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) == _MCORE_SAVE_PLAN:
            return _mcore_plan_standin()
        raise InputError(
            f"{self._path}: refusing to unpickle {module}.{name}: a .metadata file may only hold torch "
            f"distributed-checkpoint metadata; this one is damaged or not safe to load (it was not "
            f"written by torch, Megatron or streamconv)")

    def persistent_load(self, pid):
        raise InputError(f"{self._path}: refusing a persistent id in .metadata; the file is not DCP metadata")


def _bad(path, what):
    return InputError(f"{path}: not valid torch distributed-checkpoint metadata ({what}); "
                      f"rewrite the checkpoint or point at the right directory")


def _validate(md, path):
    """Types only: what check_coverage and the readers rely on."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    if not isinstance(md, Metadata):
        raise _bad(path, f"top-level object is {type(md).__name__}, not Metadata")
    if not isinstance(md.state_dict_metadata, dict):
        raise _bad(path, "state_dict_metadata is not a dict")

    def ints(x):
        return isinstance(x, torch.Size) and all(isinstance(v, int) for v in x)

    for fqn, m in md.state_dict_metadata.items():
        if not isinstance(fqn, str):
            raise _bad(path, f"key {fqn!r} is not a string")
        if isinstance(m, TensorStorageMetadata):
            props = getattr(m, "properties", None)
            if not isinstance(props, TensorProperties) or not isinstance(getattr(props, "dtype", None), torch.dtype):
                raise _bad(path, f"{fqn}: tensor properties without a dtype")
            if not ints(m.size) or not isinstance(m.chunks, list):
                raise _bad(path, f"{fqn}: size or chunk list malformed")
            for c in m.chunks:
                if not isinstance(c, ChunkStorageMetadata) or not ints(c.offsets) or not ints(c.sizes):
                    raise _bad(path, f"{fqn}: a chunk is malformed")
        elif not isinstance(m, BytesStorageMetadata):
            raise _bad(path, f"{fqn}: entry is {type(m).__name__}")
    if not isinstance(md.storage_data, dict):
        raise _bad(path, "storage_data is not a dict")
    for k, v in md.storage_data.items():
        if not isinstance(k, MetadataIndex) or not isinstance(k.fqn, str) or not (k.offset is None or ints(k.offset)):
            raise _bad(path, f"storage_data key {k!r} is not a MetadataIndex")
        if not isinstance(v, _StorageInfo) or not isinstance(v.relative_path, str) \
                or not isinstance(v.offset, int) or not isinstance(v.length, int):
            raise _bad(path, f"storage_data entry for {k.fqn} is not a _StorageInfo")


def read_metadata(path: str):
    """Unpickle ``.metadata`` admitting only DCP metadata types; ``InputError`` on anything else."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e}); check the checkpoint directory") from None
    try:
        md = _RestrictedUnpickler(io.BytesIO(data), path).load()
    except InputError:
        raise
    except Exception as e:  # any malformed pickle: truncated, wrong opcodes, bad state
        raise _bad(path, f"{type(e).__name__}: {e}") from None
    _validate(md, path)
    return md


# -- coverage -------------------------------------------------------------------

_MAX_PER_KEY = 5


def _volume(sizes) -> int:
    n = 1
    for s in sizes:
        n *= s
    return n


def _file_name_ok(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def _tensor_problems(fqn, md, storage) -> list:
    from torch.distributed.checkpoint.metadata import MetadataIndex

    shape = tuple(md.size)
    nd = len(shape)
    out = []
    inside = []
    seen_offsets: dict = {}
    for c in md.chunks:
        off, size = tuple(c.offsets), tuple(c.sizes)
        desc = f"chunk at {list(off)} size {list(size)}"
        if len(off) != nd or len(size) != nd:
            out.append(f"{fqn}: {desc} does not have the tensor's rank {nd}")
            continue
        if any(o < 0 for o in off) or any(s < 0 for s in size) \
                or any(o + s > d for o, s, d in zip(off, size, shape)):
            out.append(f"{fqn}: {desc} lies outside the global shape {list(shape)}")
            continue
        if off in seen_offsets:
            out.append(f"{fqn}: two chunks start at {list(off)} (only one can have storage)")
        seen_offsets[off] = True
        if MetadataIndex(fqn, off) not in storage:
            out.append(f"{fqn}: {desc} has no storage_data entry (its bytes are nowhere)")
        if _volume(size):
            inside.append((off, tuple(o + s for o, s in zip(off, size))))
    overlaps = 0
    if nd == 0:
        overlaps = max(0, len(inside) - 1)
        if overlaps:
            out.append(f"{fqn}: {len(inside)} chunks store the same scalar")
    else:
        # sweep along the axis with the most distinct chunk starts (the layer axis of a
        # stacked tensor, the TP axis of a plain one): only chunks whose ranges on that
        # axis meet can overlap, which keeps the active set to a handful
        ax = max(range(nd), key=lambda d: len({lo[d] for lo, _ in inside}))
        inside.sort(key=lambda c: (c[0][ax], c[0]))
        active: list = []
        for lo, hi in inside:
            active = [a for a in active if a[1][ax] > lo[ax]]
            for alo, ahi in active:
                if all(alo[d] < hi[d] and lo[d] < ahi[d] for d in range(nd)):
                    overlaps += 1
                    if overlaps <= _MAX_PER_KEY:
                        out.append(f"{fqn}: chunks at {list(alo)} and {list(lo)} overlap "
                                   f"(a region is stored twice)")
            active.append((lo, hi))
        if overlaps > _MAX_PER_KEY:
            out.append(f"{fqn}: {overlaps - _MAX_PER_KEY} more overlapping chunk pairs")
    if not overlaps:
        covered = sum(_volume(tuple(h - l for l, h in zip(lo, hi))) for lo, hi in inside)
        total = _volume(shape)
        if covered != total:
            out.append(f"{fqn}: chunks cover {covered} of {total} elements of {list(shape)} "
                       f"(a region was never written; it would load as garbage)")
    return out


def check_coverage(metadata) -> list:
    """Problems (one line each) that make the checkpoint incomplete or ambiguous; [] if none.

    Every tensor's chunks must lie inside its global shape, not overlap, and
    cover it; every chunk and byte object must have a storage entry with a
    plain file name; storage entries must belong to some chunk; items in one
    file must not overlap.
    """
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex, TensorStorageMetadata

    storage = metadata.storage_data or {}
    out: list = []
    wanted = set()
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            out += _tensor_problems(fqn, md, storage)
            wanted.update(MetadataIndex(fqn, tuple(c.offsets)) for c in md.chunks)
        elif isinstance(md, BytesStorageMetadata):
            idx = MetadataIndex(fqn)
            wanted.add(idx)
            if idx not in storage:
                out.append(f"{fqn}: byte object has no storage_data entry")
    by_file: dict = {}
    for idx, info in storage.items():
        where = idx.fqn if idx.offset is None else f"{idx.fqn} chunk at {list(idx.offset)}"
        if idx not in wanted:
            out.append(f"storage_data entry for {where} matches no chunk or object in state_dict_metadata")
        if not _file_name_ok(info.relative_path):
            out.append(f"{where}: data file name {info.relative_path!r} is not a plain file name "
                       f"in the checkpoint directory")
            continue
        if info.offset < 0 or info.length <= 0:
            out.append(f"{where}: item range offset={info.offset} length={info.length} is invalid")
            continue
        by_file.setdefault(info.relative_path, []).append((info.offset, info.offset + info.length, where))
    for name, spans in sorted(by_file.items()):
        spans.sort()
        for (a0, a1, aw), (b0, _b1, bw) in zip(spans, spans[1:]):
            if b0 < a1:
                out.append(f"{name}: items of {aw} and {bw} overlap in the file (bytes {b0}..{a1})")
    return out


def check_storage_files(metadata, directory: str) -> list:
    """Problems with the data files themselves: missing, or shorter than an item's end."""
    ends: dict = {}
    for info in (metadata.storage_data or {}).values():
        if _file_name_ok(info.relative_path):
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    out = []
    for name, end in sorted(ends.items()):
        p = os.path.join(directory, name)
        try:
            size = os.stat(p).st_size
        except OSError:
            out.append(f"{p}: data file is missing")
            continue
        if size < end:
            out.append(f"{p}: data file has {size} bytes but items reach byte {end} (truncated)")
    return out
