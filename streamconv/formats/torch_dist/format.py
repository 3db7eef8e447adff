"""Megatron's ``torch_dist`` checkpoint behind the :class:`~streamconv.formats.base.OutputFormat` interface.

Files (FORMAT.md §7), all under ``iter_0000001/``:

* ``__<rank>_0.distcp`` — one per writing rank coordinate (Megatron's naming:
  global rank, then the writer thread), holding that rank's *main-replica*
  shards (:mod:`streamconv.megatron.sharded`) back to back, each a complete
  ``torch.save`` of the chunk (:mod:`.item`) or a ShardedObject's bytes. TP/PP/EP
  only choose how the global tensors are cut; Megatron reshards on load.
* ``common.pt``, ``.metadata`` (every key's global shape and chunk list, and where
  each item is), ``metadata.json`` — final files, written after every data file is
  committed, then the tracker last. A killed run therefore never leaves a
  ``metadata.json`` (what marks a directory as torch_dist) nor a tracker.

Everything is planned from shapes: item lengths are exact before any data is
converted, so ``.metadata`` is known at planning time and ``streamconv plan``
prints exact sizes. Item bytes are a function of the data (torch's own
serialization id), so reruns and ``--resume`` are byte-identical.

A step of a stream group is one chunk index of one entry at every rank of the
stage: the column slices of a row-parallel weight at all TP ranks are one step
(read once per row block), and so are the gate (then the up) halves of fc1.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pickle
import re
import zlib
from dataclasses import dataclass

from ...core.errors import FlagError
from ...megatron.entries import Entry, EntryKind, OutDtype
from ...megatron.files import ITERATION_DIR, TRACKER, TRACKER_BYTES
from ...megatron.parallel import Rank, stage_world
from ...megatron.pieces import slice_rows
from ...megatron.sharded import ShardedChunk, ShardedView
from ..base import FileWriter, FormatPlan, OutputFormat, PlanInput, PlannedFile, StreamGroup
from ..torch.reader import archive_matches, archive_records, crc_of, records_intact
from ..torch.state_pickle import build_tensor_pickle
from ..torch.zipwriter import fixed_records, record_plan
from .common import CHECKPOINTING_CONFIG, COMMON_FILE, METADATA_JSON_FILE, common_pt_bytes, metadata_json_bytes
from .item import ARCHIVE_PREFIX, TensorItemWriter, chunk_nbytes, item_size, object_item_bytes
from .metadata import (METADATA_FILE, PICKLE_PROTOCOL, Chunk, ObjectEntry, TensorEntry, build_metadata,
                       check_coverage)
from .reader import TorchDistFileReader, checkpoint_metadata, file_stamp

_DATA_FILE_RE = re.compile(r"__\d+_\d+\.distcp")
#: the files of a torch_dist checkpoint besides its data files (the tracker is shared with every format)
_DIR_FILES = (COMMON_FILE, METADATA_FILE, METADATA_JSON_FILE)
#: first component of every key a converted checkpoint holds (a training one adds optimizer, rng_state, ...)
_MODEL_KEY_ROOTS = ("decoder", "embedding", "output_layer", "mtp")
#: top-level keys of a converted checkpoint's common.pt (Megatron's save also has optimizer state, rng, ...)
_COMMON_KEYS = ("args", "checkpoint_version", "iteration", "num_floating_point_operations_so_far",
                "rerun_state_machine")


def data_file_name(global_rank: int) -> str:
    """Megatron's FileSystemWriterAsync names files ``__<global rank>_<writer thread>.distcp``."""
    return f"__{global_rank}_0.distcp"


def dist_args(args) -> argparse.Namespace:
    """``args`` for ``common.pt``: the legacy format's, saying what this checkpoint is and lacks.

    ``ckpt_format`` torch_dist (``--use-checkpoint-args`` takes it from here); and
    ``no_save_optim`` / ``no_save_rng``: ``load_checkpoint`` reads them from the
    checkpoint's args and then does not ask the checkpoint for optimizer or RNG
    shards, which a converted checkpoint does not have (else: missing keys).
    """
    ns = argparse.Namespace(**vars(args))
    ns.ckpt_format = "torch_dist"
    ns.no_save_optim = True
    ns.no_save_rng = True
    return ns


@dataclass(frozen=True)
class ItemPlan:
    """One stored item of a data file."""

    fqn: str  # tensor key, or a ShardedObject's unique key
    offsets: tuple | None  # the chunk's global offset; None for a byte object
    shape: tuple  # the chunk's shape (the item's tensor)
    global_shape: tuple
    dtype: str  # "bf16" / "f32"; "" for a byte object
    offset: int  # where the item starts in the file
    length: int
    data: bytes = b""  # a byte object's item


@dataclass
class FileState:
    items: list  # ItemPlan, parallel to PlannedFile.entries
    first: bool  # the plan's first data file: its reader also checks .metadata as a whole


def _item_entry(chunk: ShardedChunk, e: Entry) -> Entry:
    return Entry(f"{chunk.key} at {list(chunk.offset)}", EntryKind.TENSOR,
                 slice_rows(e.pieces, chunk.start, chunk.stop), chunk.shape, e.dtype, rule=e.rule)


class TorchDistFileWriter(FileWriter):
    """Streams one ``.distcp`` file: items in planned order, each checked against its planned extent."""

    def __init__(self, f: PlannedFile, fd: int, on_write=None):
        self.f, self.fd, self.on_write = f, fd, on_write
        self.items = f.state.items
        self.offset = 0
        self.i = 0
        self.records: list = []
        self._item = None
        self._crc = 0

    def _raw(self, data) -> None:
        """Write at the end of the file; the item writer writes here too (see _Sink)."""
        mv = memoryview(data).cast("B")
        while mv:
            n = os.write(self.fd, mv)
            mv = mv[n:]
            self.offset += n
        if self.on_write is not None:
            self.on_write(self.offset)

    class _Sink:
        """What TensorItemWriter writes to: a stream stand-in that appends through the writer."""

        def __init__(self, writer):
            self.writer = writer

        def write(self, mv):
            self.writer._raw(mv)

    def begin(self, entry) -> None:
        it = self.items[self.i]
        if entry.key != self.f.entries[self.i].key or self.offset != it.offset:  # pragma: no cover - a bug
            raise AssertionError(f"{self.f.relpath}: item {entry.key} out of order")
        self._crc = 0
        self._item = None if it.offsets is None else TensorItemWriter(self._Sink(self), it.dtype, it.shape)

    def write(self, data) -> None:
        if self._item is None:
            self._crc = zlib.crc32(data, self._crc)
            self._raw(data)
        else:
            self._item.write(data)

    def end(self, entry) -> None:
        it = self.items[self.i]
        if self._item is None:
            self.records.append([it.offset, it.length, self._crc])
        else:
            self._item.finish()
            self.records.append([it.offset, it.length, [list(r) for r in self._item.records]])
        if self.offset != it.offset + it.length:  # pragma: no cover - planner/writer disagreement is a bug
            raise AssertionError(f"{self.f.relpath}: {entry.key} took {self.offset - it.offset} bytes, "
                                 f"planned {it.length}")
        self._item = None
        self.i += 1

    def finish(self) -> dict:
        if self.i != len(self.items) or self.offset != self.f.size:  # pragma: no cover - a bug
            raise AssertionError(f"{self.f.relpath}: wrote {self.i} items / {self.offset} bytes, "
                                 f"planned {len(self.items)} / {self.f.size}")
        return {"size": self.offset, "items": self.records}


class _Planner:
    """Lays out one conversion: items per rank file, steps per stage, and the .metadata they make."""

    def __init__(self, pin: PlanInput):
        self.pin = pin
        self.view = ShardedView(pin.args, pin.sizes)
        self.world = stage_world(pin.sizes)
        self.tensors: dict = {}  # fqn -> [dtype, global shape, [Chunk]]
        self.objects: list = []  # ObjectEntry
        self._sizes: dict = {}
        self._objects: dict = {}

    def _size(self, dtype, shape) -> int:
        k = (dtype, shape)
        if k not in self._sizes:
            self._sizes[k] = item_size(dtype, shape)
        return self._sizes[k]

    def _object_bytes(self, value) -> bytes:
        if value not in self._objects:
            import torch

            obj = None if value is None else torch.tensor(list(value), dtype=torch.uint8)
            self._objects[value] = object_item_bytes(obj)
        return self._objects[value]

    def _rank_file(self, stage, rank_entries):
        """(file name, [[(item entry, ItemPlan)] per entry]) for one rank of ``stage``."""
        rank = Rank(rank_entries.coord, self.pin.sizes)
        name = data_file_name(rank.stage_index + self.world * stage.index)
        at = 0
        per_entry = []
        for e in rank_entries.entries:
            out = []
            for s in self.view.items(e, rank, stage.layers):
                if isinstance(s, ShardedChunk):
                    dtype = OutDtype(e.dtype).value
                    if dtype not in ("bf16", "f32"):  # pragma: no cover - layout invariant
                        raise AssertionError(f"{e.key}: a {dtype} tensor in a torch_dist checkpoint")
                    n = self._size(dtype, s.shape)
                    it = ItemPlan(s.key, s.offset, s.shape, s.global_shape, dtype, at, n)
                    out.append((_item_entry(s, e), it))
                    self._tensor(it, e.key, name)
                else:
                    data = self._object_bytes(s.value)
                    it = ItemPlan(s.unique_key, None, (), (), "", at, len(data), data)
                    out.append((Entry(s.unique_key, EntryKind.BYTES, (), (len(data),), OutDtype.UINT8, data), it))
                    self.objects.append(ObjectEntry(s.unique_key, name, at, len(data)))
                at += it.length
            per_entry.append(out)
        return name, per_entry

    def _tensor(self, it: ItemPlan, legacy_key: str, name: str) -> None:
        t = self.tensors.setdefault(it.fqn, [it.dtype, it.global_shape, []])
        if (t[0], t[1]) != (it.dtype, it.global_shape):  # pragma: no cover - a rule/layout bug
            raise AssertionError(f"{legacy_key}: {it.fqn} planned as {it.dtype} {list(it.global_shape)} "
                                 f"and as {t[0]} {list(t[1])}")
        t[2].append(Chunk(it.offsets, it.shape, name, it.offset, it.length))

    def stage_group(self, stage, first: bool) -> StreamGroup:
        files, per_file = [], []
        for r in stage.ranks:
            name, per_entry = self._rank_file(stage, r)
            pairs = [p for ps in per_entry for p in ps]
            if not pairs:
                continue  # a rank holding only replicas writes nothing
            state = FileState([it for _, it in pairs], first and not files)
            files.append(PlannedFile(f"{ITERATION_DIR}/{name}", [e for e, _ in pairs],
                                     sum(it.length for _, it in pairs), r.coord, state))
            per_file.append(per_entry)
        steps = []
        n_entries = len(stage.ranks[0].entries) if stage.ranks else 0
        for k in range(n_entries):
            for c in range(max((len(p[k]) for p in per_file), default=0)):
                steps.append([(i, p[k][c][0]) for i, p in enumerate(per_file) if c < len(p[k])])
        return StreamGroup(stage.index, stage.layers, files, steps)

    def metadata(self):
        tensors = [TensorEntry(fqn, dtype, shape, tuple(chunks))
                   for fqn, (dtype, shape, chunks) in self.tensors.items()]
        md = build_metadata(tensors, self.objects)
        problems = check_coverage(md)
        if problems:
            s = self.pin.sizes
            raise FlagError(f"--ckpt-format torch_dist: TP {s.tp} x PP {s.pp} x EP {s.ep} leaves the checkpoint "
                            f"incomplete ({problems[0]}); choose another parallel layout")
        return md


class TorchDistFormat(OutputFormat):
    name = "torch_dist"

    def plan(self, pin: PlanInput) -> FormatPlan:
        p = _Planner(pin)
        groups = [p.stage_group(stage, i == 0) for i, stage in enumerate(pin.stages)]
        md = p.metadata()
        final = [
            (f"{ITERATION_DIR}/{COMMON_FILE}", common_pt_bytes(dist_args(pin.args))),
            (f"{ITERATION_DIR}/{METADATA_FILE}", pickle.dumps(md, protocol=PICKLE_PROTOCOL)),
            (f"{ITERATION_DIR}/{METADATA_JSON_FILE}", metadata_json_bytes()),
            (TRACKER, TRACKER_BYTES),
        ]
        return FormatPlan(groups, final)

    def open_writer(self, f: PlannedFile, fd: int, on_write=None) -> TorchDistFileWriter:
        return TorchDistFileWriter(f, fd, on_write)

    def intact(self, path: str, f: PlannedFile, record: dict) -> bool:
        """Size, and every item's records (tensor items) or bytes (objects) against their CRCs."""
        try:
            if os.path.getsize(path) != record["size"] or record["size"] != f.size:
                return False
            if len(record["items"]) != len(f.state.items):
                return False
            with open(path, "rb") as fh:
                for it, (off, length, what) in zip(f.state.items, record["items"]):
                    if (off, length) != (it.offset, it.length):
                        return False
                    if it.offsets is None:
                        if crc_of(fh, off, length) != what:
                            return False
                        continue
                    if not records_intact(fh, archive_records(fh, off, length), what):
                        return False
            return True
        except Exception:  # noqa: BLE001 - any damage (bad zip, short file, odd record): rewrite it
            return False

    def matches_plan(self, path: str, f: PlannedFile, check_data: bool = True) -> bool:
        """The planned size; every item where planned, a tensor item with the planned records (names, sizes,
        order) and the fixed ones (``data.pkl`` with its shape and dtype, format records) byte for byte, a byte
        object equal; then (``check_data``) every record against its CRC.

        An item's serialization id and CRCs depend on the data, so the data itself
        is checked by its CRCs here; that it is this input's is the ``.metadata``
        (compared byte for byte as a final file) and the sampled tensors' business.
        """
        try:
            if os.path.getsize(path) != f.size:
                return False
            with open(path, "rb") as fh:
                for it in f.state.items:
                    if it.offsets is None:
                        fh.seek(it.offset)
                        if fh.read(it.length) != it.data:
                            return False
                        continue
                    pkl = build_tensor_pickle(it.dtype, it.shape)
                    want = record_plan(ARCHIVE_PREFIX, len(pkl), [chunk_nbytes(it.dtype, it.shape)], 40)
                    if not archive_matches(fh, archive_records(fh, it.offset, it.length), want,
                                           fixed_records(ARCHIVE_PREFIX, pkl), check_data):
                        return False
            return True
        except Exception:  # noqa: BLE001 - unreadable, truncated, another layout: not this file
            return False

    def is_own_file(self, path: str) -> bool:
        """A file of a converted (model-only, iteration 1) torch_dist checkpoint, by its content.

        ``.metadata`` must unpickle as DCP metadata (restricted) holding only
        model keys; ``common.pt`` only ``args``, ``checkpoint_version``,
        ``iteration`` 1 and Megatron's counters; ``metadata.json`` Megatron's
        torch_dist config; a ``.distcp`` file must be named in that ``.metadata``
        and end where its last item does. A training checkpoint (optimizer, RNG
        state, another iteration) fails one of these, and so does every file of
        its directory, since each also needs the ``.metadata`` and ``common.pt``
        beside it (where present) to be a converted one's.
        """
        d, name = os.path.split(path)
        try:
            if not self._converted_dir(d):
                return False
            if name == METADATA_FILE:
                return os.path.isfile(path)
            if name == COMMON_FILE:
                return os.path.isfile(path)  # checked by _converted_dir
            if name == METADATA_JSON_FILE:
                with open(path, "rb") as fh:
                    cfg = json.loads(fh.read(4096) or b"null")
                return isinstance(cfg, dict) and cfg.get("sharded_backend") == CHECKPOINTING_CONFIG["sharded_backend"]
            if _DATA_FILE_RE.fullmatch(name):
                md = checkpoint_metadata(d)
                ends = [info.offset + info.length for info in md.storage_data.values() if info.relative_path == name]
                if not ends or max(ends) != os.path.getsize(path):
                    return False
                with open(path, "rb") as fh:
                    return fh.read(4) == b"PK\x03\x04"
        except Exception:  # noqa: BLE001 - unreadable or foreign: not ours
            return False
        return False

    @staticmethod
    def _converted_dir(d: str) -> bool:
        """The directory's ``.metadata`` and ``common.pt``, where present, are a converted checkpoint's.

        Asked once per file of the directory: the answer is kept while both files are unchanged.
        """
        return _converted_dir_cached(d, tuple(file_stamp(os.path.join(d, n)) for n in (METADATA_FILE, COMMON_FILE)))

    def open_reader(self, path: str, f: PlannedFile) -> TorchDistFileReader:
        return TorchDistFileReader(path, f)

    def own_files(self, root: str) -> list:
        """The data files (``__<rank>_<thread>.distcp``) and ``common.pt``, ``.metadata``, ``metadata.json``."""
        it = os.path.join(root, ITERATION_DIR)
        if not os.path.isdir(it):
            return []
        return [f"{ITERATION_DIR}/{n}" for n in sorted(os.listdir(it))
                if (_DATA_FILE_RE.fullmatch(n) or n in _DIR_FILES) and os.path.isfile(os.path.join(it, n))]

    def read_args(self, root: str):
        from ..torch.reader import RankFileReader

        d = os.path.join(root, ITERATION_DIR)
        try:
            st = RankFileReader(os.path.join(d, COMMON_FILE)).state
            args = st["args"]
        except Exception:  # noqa: BLE001 - unreadable: verify says so
            return None, None
        try:
            keys = list(checkpoint_metadata(d).state_dict_metadata)
        except Exception:  # noqa: BLE001
            keys = []
        return args, keys


FORMAT = TorchDistFormat()


@functools.lru_cache(maxsize=4)
def _converted_dir_cached(d: str, stamps: tuple) -> bool:
    """:meth:`TorchDistFormat._converted_dir` for one state of the two files (``stamps``: None where absent)."""
    if stamps[0] is not None:
        md = checkpoint_metadata(d)
        if not md.state_dict_metadata or any(k.split(".", 1)[0] not in _MODEL_KEY_ROOTS
                                             for k in md.state_dict_metadata):
            return False
    if stamps[1] is not None:
        from ..torch.reader import RankFileReader

        st = RankFileReader(os.path.join(d, COMMON_FILE)).state
        if not (isinstance(st, dict) and {"args", "checkpoint_version", "iteration"} <= set(st)
                and set(st) <= set(_COMMON_KEYS) and st.get("iteration") == 1):
            return False
    return True
