"""A model weight in the input, and the tally of what was skipped.

:class:`SourceTensor` is the unit every later stage refers to: its canonical
name, where its bytes are (file, header entry) and which naming scheme it came
from. It is immutable and hashable, so mapping rules and the stream can use it
as an identity (two pieces that read the same tensor's same rows are the same
read).

It is also how the stream reads: :meth:`SourceTensor.read` returns a block of
rows (read into the caller's staging buffer) and :meth:`SourceTensor.spans`
the file byte ranges behind them (to prefetch them and count bytes read). A tensor stored differently — cut into
slices over several files, as per-rank training output is — is another class
with the same members (``shape``, ``dtype``, ``itemsize``, ``read``,
``spans``, ``block_end``), and nothing downstream changes. ``block_end`` lets
such a tensor end a stream block (and each read) at a storage boundary, so that
a read comes from one slice file rather than being assembled from two.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .header import TensorInfo


@dataclass(frozen=True)
class SourceTensor:
    canonical: str
    name: str  # name as stored in the file
    path: str
    info: TensorInfo
    scheme: str = ""

    @property
    def shape(self) -> tuple:
        return self.info.shape

    @property
    def dtype(self) -> str:
        return self.info.dtype

    @property
    def itemsize(self) -> int:
        return self.info.itemsize

    @property
    def stored_itemsize(self) -> int:
        """Bytes per element on disk (what reading costs); ``itemsize`` is per element as read() returns it."""
        return self.info.itemsize

    @property
    def nbytes(self) -> int:
        return self.info.nbytes

    def spans(self, start: int, stop: int) -> list:
        """[(path, lo, hi)]: the absolute file byte ranges holding rows [start, stop)."""
        from .mapped import byte_span

        return [(self.path, *byte_span(self.info, start, stop))]

    def block_end(self, start: int, stop: int) -> int:
        """Where a block of rows from ``start`` should end, at most ``stop``: here, ``stop`` (one file holds all)."""
        return stop

    def read(self, files, start: int, stop: int, step: int = 1, col0: int = 0, col1=None, staging=None):
        """Rows ``start:stop:step``, columns ``col0:col1`` as a 2-D numpy array (a view of ``staging``)."""
        from .mapped import read_rows

        return read_rows(files, self.path, self.info, start, stop, step, col0, col1, staging)


@dataclass
class Skipped:
    """Entries and files that carry no model weights, reported once in the summary."""

    optimizer: int = 0
    optimizer_bytes: int = 0
    steps: int = 0
    placeholders: int = 0
    buffers: int = 0
    artifacts: list = field(default_factory=list)  # names
    files: list = field(default_factory=list)  # (path, reason)
    other: list = field(default_factory=list)  # (what, [names]): other entries set aside, named in the notes

    #: the entry kinds (``EntryClass`` values) counted here, each to its field
    _COUNTED = {"optimizer": "optimizer", "step": "steps", "placeholder": "placeholders", "buffer": "buffers"}

    def set_aside(self, kind, name: str) -> bool:
        """Count entry ``name`` if its kind (an ``EntryClass``) carries no weights; False for any other kind.

        One place for both input layouts: a merged checkpoint counts each entry as it is
        read, per-rank output each distinct name once (optimizer bytes stay the caller's).
        """
        if kind.value == "artifact":
            self.artifacts.append(name)
            return True
        attr = self._COUNTED.get(kind.value)
        if attr is None:
            return False
        setattr(self, attr, getattr(self, attr) + 1)
        return True

    def lines(self) -> list:
        out = []
        if self.optimizer:
            out.append(
                f"skipped {self.optimizer} optimizer-state tensors "
                f"({self.optimizer_bytes / 2**20:.1f} MiB: adam/moment/accu_grads)"
            )
        if self.steps:
            out.append(f"skipped {self.steps} step/loss-scale entries (global_step, learning_rate, ...)")
        if self.placeholders:
            out.append(f"skipped {self.placeholders} placeholder entries without weights (dropout, rotary inv_freq)")
        if self.buffers:
            out.append(f"skipped {self.buffers} MoE router runtime buffers (expert_load / fi_accu: statistics, "
                       "not weights)")
        for name in self.artifacts:
            out.append(f"skipped {name}: no model has it (mindformers' convert_weight writes it by mistake)")
        for path, reason in self.files:
            out.append(f"skipped file {path}: {reason}")
        for what, names in self.other:
            shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
            out.append(f"skipped {what}: {shown}")
        return out
