"""The legacy torch format behind the :class:`~streamconv.formats.base.OutputFormat` interface.

Files: ``iter_0000001/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt`` for every
rank that writes (:func:`~streamconv.megatron.parallel.stage_ranks`), named as
Megatron's ``get_checkpoint_name`` names them, each the ``torch.save`` archive of
``{args, checkpoint_version, iteration, model, ...}``; the tracker is the only
final file. A file's pickle and exact size are known from shapes alone; its
completion record is the list of zip records with their CRCs, which is also how
a kept file is checked on ``--resume``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile

from ...megatron.entries import EntryKind
from ...megatron.files import ITERATION_DIR, TRACKER, TRACKER_BYTES
from ..base import FileWriter, FormatPlan, OutputFormat, PlanInput, PlannedFile, StreamGroup
from .reader import TOP_LEVEL, RankFileReader, TorchFileReader, archive_matches, archive_records, records_intact
from .state_pickle import build_pickle
from .zipwriter import TorchZipWriter, archive_size, fixed_records, record_plan

RANK_FILE = "model_optim_rng.pt"
ARCHIVE_PREFIX = "model_optim_rng"
_RANK_DIR_RE = re.compile(r"mp_rank_\d{2}(_\d{3})?(_\d{3})?")


def rank_dir(coord, sizes) -> str:
    """Megatron's ``get_checkpoint_name``: mp_rank_TT, + _PPP with PP > 1, + _EEE with EP > 1."""
    d = f"mp_rank_{coord.tp:02d}" if sizes.pp == 1 else f"mp_rank_{coord.tp:02d}_{coord.pp:03d}"
    if sizes.ep > 1:
        d += f"_{coord.ep:03d}"
    return d


def rank_relpath(coord, sizes) -> str:
    return f"{ITERATION_DIR}/{rank_dir(coord, sizes)}/{RANK_FILE}"


def serialization_id(seed: str) -> str:
    """torch.save writes a 40-digit id; ours is derived from the plan so reruns are byte-identical."""
    digits = str(int(hashlib.sha256(seed.encode()).hexdigest(), 16))
    return digits[:40].rjust(40, "0")


class TorchFileWriter(FileWriter):
    """One rank file's storages, appended to its zip as they stream by."""

    def __init__(self, f: PlannedFile, fd: int, on_write=None):
        self.f = f
        pickle_bytes, self.sid = f.state
        self.zip = TorchZipWriter(fd, ARCHIVE_PREFIX, pickle_bytes, on_write=on_write)

    @property
    def offset(self) -> int:
        return self.zip.offset

    def begin(self, entry) -> None:
        self.zip.begin_storage(entry.nbytes)

    def write(self, data) -> None:
        self.zip.write(data)

    def end(self, entry) -> None:
        self.zip.end_storage()

    def finish(self) -> dict:
        records = self.zip.finish(self.sid)
        if self.zip.offset != self.f.size:  # pragma: no cover - planner/writer disagreement is a bug
            raise AssertionError(f"{self.f.relpath}: wrote {self.zip.offset} bytes, planned {self.f.size}")
        return {"size": self.zip.offset, "records": [[n, s, c] for n, s, c in records]}


class TorchFormat(OutputFormat):
    name = "torch"

    def plan(self, pin: PlanInput) -> FormatPlan:
        groups = []
        for stage in pin.stages:
            files = [self._file(r.coord, r.entries, pin) for r in stage.ranks]
            # Every rank file of a stage has the same key list: step k is key k of every file.
            steps = [[(i, f.entries[k]) for i, f in enumerate(files) if f.entries[k].has_data]
                     for k in range(len(files[0].entries))]
            groups.append(StreamGroup(stage.index, stage.layers, files, [s for s in steps if s]))
        return FormatPlan(groups, [(TRACKER, TRACKER_BYTES)])

    def _file(self, coord, entries: list, pin: PlanInput) -> PlannedFile:
        model_entries, storage_sizes = [], []
        for e in entries:
            if e.kind is EntryKind.NONE:
                model_entries.append((e.key, None))
                continue
            model_entries.append((e.key, e.dtype, e.shape, str(len(storage_sizes))))
            storage_sizes.append(e.nbytes)
        pkl = build_pickle(pin.args, model_entries)
        relpath = rank_relpath(coord, pin.sizes)
        # a function of what the file holds (keys, shapes, args), not of how the input was stored or named
        sid = serialization_id(json.dumps([relpath, *pin.seed, hashlib.sha256(pkl).hexdigest()], sort_keys=True,
                                          default=str))
        size = archive_size(ARCHIVE_PREFIX, len(pkl), storage_sizes, len(sid))
        return PlannedFile(relpath, entries, size, coord, (pkl, sid))

    def open_writer(self, f: PlannedFile, fd: int, on_write=None) -> TorchFileWriter:
        return TorchFileWriter(f, fd, on_write)

    def intact(self, path: str, f: PlannedFile, record: dict) -> bool:
        """Size and every zip record's CRC must match what was recorded when the file was finished."""
        try:
            if os.path.getsize(path) != record["size"]:
                return False
            with open(path, "rb") as fh:
                return records_intact(fh, archive_records(fh, 0, record["size"]), record["records"])
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile):
            return False

    def matches_plan(self, path: str, f: PlannedFile, check_data: bool = True) -> bool:
        """The planned size, zip records (names, sizes, order), pickle and serialization id; then every CRC.

        The pickle holds ``args`` and every key with its dtype and shape, and the
        serialization id is derived from the flags, the input file names and sizes
        and the file's path; the CRCs show that the stored data is what was written.
        """
        try:
            if os.path.getsize(path) != f.size:
                return False
            pkl, sid = f.state
            sizes = [e.nbytes for e in f.entries if e.kind is not EntryKind.NONE]
            with open(path, "rb") as fh:
                return archive_matches(fh, archive_records(fh, 0, f.size),
                                       record_plan(ARCHIVE_PREFIX, len(pkl), sizes, len(sid)),
                                       fixed_records(ARCHIVE_PREFIX, pkl, sid.encode()), check_data)
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile):
            return False

    def is_own_file(self, path: str) -> bool:
        """A ``torch.save`` archive holding only a converted model: ``args``, ``model``, iteration 1.

        That is what streamconv (and Megatron's own converter, whose files streamconv
        reproduces) writes. A training checkpoint (optimizer, RNG state, another
        iteration) or anything the restricted reader cannot parse is not.
        """
        try:
            st = RankFileReader(path).state
        except Exception:  # noqa: BLE001 - unreadable or foreign: not ours
            return False
        return (isinstance(st, dict) and {"args", "model", "checkpoint_version", "iteration"} <= set(st)
                and set(st) <= set(TOP_LEVEL) | {"rerun_state_machine"}
                and st.get("iteration") == 1 and isinstance(st.get("model"), dict))

    def open_reader(self, path: str, f: PlannedFile) -> TorchFileReader:
        return TorchFileReader(path)

    def own_files(self, root: str) -> list:
        out = []
        it = os.path.join(root, ITERATION_DIR)
        if os.path.isdir(it):
            for d in sorted(os.listdir(it)):
                if _RANK_DIR_RE.fullmatch(d) and os.path.isfile(os.path.join(it, d, RANK_FILE)):
                    out.append(f"{ITERATION_DIR}/{d}/{RANK_FILE}")
        return out

    def read_args(self, root: str):
        for rel in self.own_files(root):
            try:
                st = RankFileReader(os.path.join(root, rel)).state
                return st["args"], list(st["model"].keys())
            except Exception:  # noqa: BLE001 - try the next rank file
                continue
        return None, None


FORMAT = TorchFormat()
