"""The interface every output format implements, and the plan objects it exchanges with the engine.

The engine hands a format the resolved entries of every rank of every pipeline
stage (:class:`RankEntries`); the format answers with :class:`PlannedFile` s
(path, the entries in file order, exact size, its private header state),
grouped into :class:`StreamGroup` s — files the stream fills together, one
*step* at a time, so that a source block read once can feed every file that
needs it — and the small *final files* the coordinator writes after every data
file is committed (the tracker last: it is what makes a checkpoint complete).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field


@dataclass
class RankEntries:
    """One rank's state dict: its coordinate and its resolved entries in Megatron's order."""

    coord: object  # megatron.parallel.RankCoord
    entries: list


@dataclass
class StagePlan:
    """A pipeline stage as the engine sees it: which source layers, and every rank's entries."""

    index: int
    layers: range
    ranks: list  # RankEntries


@dataclass
class PlanInput:
    """Everything a format needs to lay out its files."""

    stages: list  # StagePlan
    sizes: object  # megatron.parallel.ParallelSizes
    args: object  # argparse.Namespace for Megatron
    seed: list  # what identifies the output (its args) for deterministic file ids


@dataclass
class PlannedFile:
    relpath: str
    entries: list  # megatron.entries.Entry, in file order
    size: int  # exact bytes
    coord: object = None
    state: object = None  # format-private: what its writer needs

    @property
    def data_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def source_bytes(self) -> int:
        return sum(e.source_bytes for e in self.entries)


@dataclass
class StreamGroup:
    """Files written together; ``steps[k]`` lists (file index, entry) pairs produced in step k."""

    index: int
    layers: range
    files: list
    steps: list = field(default_factory=list)


@dataclass
class FormatPlan:
    groups: list  # StreamGroup
    final_files: list  # (relpath, bytes), written in order after every data file; the last marks completion

    @property
    def files(self) -> list:
        return [f for g in self.groups for f in g.files]


class FileWriter(ABC):
    """Receives one file's entries in order: ``begin(entry)``, ``write(bytes)`` ..., ``end(entry)``."""

    offset: int = 0

    @abstractmethod
    def begin(self, entry) -> None: ...

    @abstractmethod
    def write(self, data) -> None: ...

    @abstractmethod
    def end(self, entry) -> None: ...

    @abstractmethod
    def finish(self) -> dict:
        """Write what follows the data; return the completion record :meth:`OutputFormat.intact` checks."""


class FileReader(ABC):
    """A finished file opened for verify."""

    @abstractmethod
    def check(self, f: PlannedFile, args, report) -> None:
        """Report (``report.add(where, what)``) every structural difference from the plan."""

    @abstractmethod
    def locate(self, entry) -> tuple | None:
        """(file offset, bytes) of ``entry``'s stored data, or None if it cannot be found."""


class OutputFormat(ABC):
    name = ""

    @abstractmethod
    def plan(self, pin: PlanInput) -> FormatPlan: ...

    @abstractmethod
    def open_writer(self, f: PlannedFile, fd: int, on_write=None) -> FileWriter: ...

    @abstractmethod
    def intact(self, path: str, f: PlannedFile, record: dict) -> bool:
        """Whether the finished file at ``path`` still is what its completion ``record`` says."""

    @abstractmethod
    def open_reader(self, path: str, f: PlannedFile) -> FileReader: ...

    @abstractmethod
    def own_files(self, root: str) -> list:
        """Relative paths under ``root`` that look like this format's files, by name and place.

        Verify reports those the plan does not expect; ``--overwrite`` removes those
        that :meth:`is_own_file` also recognises by content.
        """

    def is_own_file(self, path: str) -> bool:
        """Whether the file at ``path`` is, by its content, a file of this format as a conversion writes it.

        ``--overwrite`` deletes a file the new plan does not write (e.g. a rank of
        another TP/PP layout) only when this says yes, so the default is no: a
        format that cannot tell keeps everything it does not rewrite.
        """
        return False

    def matches_plan(self, path: str, f: PlannedFile, check_data: bool = True) -> bool:
        """Whether the file at ``path`` is exactly the planned file ``f``, intact.

        Structure, sizes and every byte the plan determines must match;
        ``check_data`` also checks the stored data's own checksums (reading the
        whole file). A save directory whose files all match, with the final files
        in place, already holds this conversion: rerunning it does nothing. The
        default, no, makes a rerun refuse and ask for ``--overwrite``.
        """
        return False

    @abstractmethod
    def read_args(self, root: str):
        """(args Namespace, model keys) stored in the checkpoint at ``root``, for verify."""
