"""A model weight in the input.

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

from dataclasses import dataclass

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
