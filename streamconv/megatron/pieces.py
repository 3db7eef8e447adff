"""A :class:`Piece`: one rectangle of a source tensor, the unit the stream reads.

An output tensor is the row-wise concatenation of pieces. A piece is rows
``range(start, stop, step)`` and columns ``[col0, col1)`` of a source tensor
seen as a matrix (dim 0 x the rest), each output row repeated ``repeat`` times
(vocab padding), and optionally transposed (mindformers stores MoE experts as
[in, out]; Megatron wants [out, in]). Pieces describe reads, never data: the
planner builds millions of them from headers alone.

:class:`Ref` is how rules address a source tensor: a matrix view that may be a
block of the tensor's rows (one expert of a stacked tensor) and may be
transposed, in whose *logical* coordinates a rule selects rows and columns.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.shapes import as_matrix
from ..sources.tensor import SourceTensor


@dataclass(frozen=True)
class Piece:
    src: SourceTensor
    start: int
    stop: int
    step: int = 1
    col0: int = 0
    col1: int | None = None
    repeat: int = 1
    transpose: bool = False

    @property
    def src_rows(self) -> int:
        return len(range(self.start, self.stop, self.step))

    @property
    def src_cols(self) -> int:
        cols = as_matrix(self.src.shape)[1]
        return (self.col1 if self.col1 is not None else cols) - self.col0

    @property
    def nrows(self) -> int:
        """Output rows."""
        return (self.src_cols if self.transpose else self.src_rows) * self.repeat

    @property
    def ncols(self) -> int:
        """Output columns."""
        return self.src_rows if self.transpose else self.src_cols

    @property
    def source_bytes(self) -> int:
        return self.src_rows * self.src_cols * self.src.stored_itemsize


def merge(pieces: list) -> list:
    """Join pieces that continue each other (same source, contiguous rows), for fewer reads."""
    out: list = []
    for p in pieces:
        q = out[-1] if out else None
        if (
            q is not None and q.src is p.src and q.step == 1 and p.step == 1 and q.repeat == 1
            and p.repeat == 1 and q.stop == p.start and q.col0 == p.col0 and q.col1 == p.col1
            and not q.transpose and not p.transpose
        ):
            out[-1] = Piece(q.src, q.start, p.stop, 1, q.col0, q.col1)
        else:
            out.append(p)
    return out


@dataclass(frozen=True)
class Ref:
    """``src`` seen as a matrix: source rows [row0, row0 + rows), transposed if ``transposed``."""

    src: SourceTensor
    row0: int = 0
    rows: int | None = None
    transposed: bool = False

    @property
    def _src_rows(self) -> int:
        return as_matrix(self.src.shape)[0] if self.rows is None else self.rows

    @property
    def shape(self) -> tuple:
        """Logical (rows, columns)."""
        r, c = self._src_rows, as_matrix(self.src.shape)[1]
        return (c, r) if self.transposed else (r, c)

    def select(self, start: int, stop: int, step: int = 1, col0: int = 0, col1: int | None = None,
               repeat: int = 1) -> Piece:
        """Logical rows ``start:stop:step`` and columns ``col0:col1`` as a piece of the source."""
        if not self.transposed:
            return Piece(self.src, self.row0 + start, self.row0 + stop, step, col0, col1, repeat)
        if step != 1:
            raise ValueError(f"{self.src.canonical}: a row step on a transposed view is not supported")
        c1 = self._src_rows if col1 is None else col1
        return Piece(self.src, self.row0 + col0, self.row0 + c1, 1, start, stop, repeat, transpose=True)


def slice_rows(pieces, start: int, stop: int) -> tuple:
    """The pieces making output rows ``[start, stop)`` of the tensor ``pieces`` make.

    Why: a format may store one rank's tensor as several chunks (torch_dist keeps
    the gate and up halves of a gated fc1 apart); each chunk is read as its own
    pieces. A whole-tensor slice returns the pieces unchanged, so identical reads
    stay identical (the stream reads a recipe once for every file wanting it).
    """
    pieces = tuple(pieces)
    if start == 0 and stop == sum(p.nrows for p in pieces):
        return pieces
    out = []
    at = 0
    for p in pieces:
        lo, hi = max(start - at, 0), min(stop - at, p.nrows)
        at += p.nrows
        if lo >= hi:
            continue
        if lo == 0 and hi == p.nrows:
            out.append(p)
        elif p.transpose:  # output rows are source columns
            c0 = p.col0 + lo
            out.append(Piece(p.src, p.start, p.stop, p.step, c0, p.col0 + hi, p.repeat, True))
        elif p.repeat > 1:
            if p.src_rows != 1:  # pragma: no cover - rules repeat single rows only (vocab padding)
                raise ValueError(f"{p.src.canonical}: cannot slice a repeated multi-row piece")
            out.append(Piece(p.src, p.start, p.stop, p.step, p.col0, p.col1, hi - lo))
        else:
            a = p.start + lo * p.step
            out.append(Piece(p.src, a, p.start + (hi - 1) * p.step + 1, p.step, p.col0, p.col1))
    return tuple(out)
