"""A full parameter read straight from its per-rank slices: the composite source tensor.

:class:`CompositeTensor` has the members the stream uses of a
:class:`~streamconv.sources.tensor.SourceTensor` (``shape``, ``dtype``,
``itemsize``, ``nbytes``, ``spans``, ``read``; ``canonical``/``name``/``path``
for messages), so a per-rank checkpoint converts through the same planner and
stream as a merged one, and no merged copy is ever written.

The stream sees every tensor as a matrix (dim 0 x the rest, flattened) and asks
for rows ``start:stop:step`` and columns ``col0:col1``. A slice is an N-D box of
the full tensor (any dimension may be split), so:

* a request that lies inside one slice's rows and columns is that slice's rows,
  read into the caller's staging buffer like any tensor (no second copy): the
  usual case for a column-parallel weight (split on dim 0) read in row blocks,
  since :meth:`CompositeTensor.block_end` lets the stream end its blocks (and
  its reads) at slice edges;
* otherwise the rows are assembled into one reusable buffer
  (:meth:`SourceFiles.scratch <streamconv.sources.mapped.SourceFiles.scratch>`):
  each overlapping slice's part is read into the staging buffer — which the next
  read overwrites — and copied into the assembly buffer at once, a contiguous
  column band for 2-D slices (and any box whose flattened columns are one run),
  an index gather for the rest. A part never exceeds the request's rows over
  the full width, which is what the stream sizes its staging buffer for, and the
  assembly buffer never exceeds the request, so the memory model counts one more
  staging-sized buffer for such an input.

:meth:`CompositeTensor.spans` lists the byte ranges of every slice file holding
rows of the request, so the stream prefetches the bytes of each slice per block
exactly as for a single file.

Both classes are frozen dataclasses with tuple fields: rules and the stream use
source tensors as identities (hashable, equal when they describe the same bytes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ...core.shapes import as_matrix, numel
from ..header import DTYPE_SIZES, TensorInfo
from ..mapped import NP_DTYPES, byte_span, read_rows


@dataclass(frozen=True)
class Slice:
    """One rank file's entry ``info`` (in ``path``) holding ``box`` of the full tensor ``full_shape``."""

    rank: int
    path: str
    info: TensorInfo
    box: tuple  # ((start, stop), ...) per dimension, full-tensor coordinates
    full_shape: tuple
    # derived, in matrix coordinates of the full tensor (filled by __post_init__)
    row0: int = field(init=False)
    row1: int = field(init=False)
    col_run: tuple | None = field(init=False)  # (c0, c1) when the box's flat columns are one run

    def __post_init__(self):
        box = self.box or ((0, 1),)  # a scalar is one row of one column
        object.__setattr__(self, "row0", box[0][0])
        object.__setattr__(self, "row1", box[0][1])
        object.__setattr__(self, "col_run", _flat_run(self.box[1:], self.full_shape[1:]))

    def flat_columns(self) -> np.ndarray:
        """Full-tensor flat column of each of this slice's columns (row-major over its trailing box)."""
        trailing, full = self.box[1:], self.full_shape[1:]
        grids = np.meshgrid(*[np.arange(a, b, dtype=np.int64) for a, b in trailing], indexing="ij")
        return np.ravel_multi_index(tuple(g.reshape(-1) for g in grids), full).astype(np.int64)


def _flat_run(trailing_box: tuple, trailing_full: tuple):
    """(c0, c1) if the trailing box's elements are one contiguous run of flattened columns, else None.

    Row-major, the box is one run exactly when the count of its elements equals
    the distance from its first to its last flat index, plus one; its own
    row-major order is then the full tensor's order over that run.
    """
    if not trailing_box:
        return (0, 1)
    count = numel(b - a for a, b in trailing_box)
    if count == 0:
        return (0, 0)
    first = last = 0
    for (a, b), size in zip(trailing_box, trailing_full):
        first = first * size + a
        last = last * size + (b - 1)
    return (first, last + 1) if last - first + 1 == count else None


@dataclass(frozen=True)
class CompositeTensor:
    """A full parameter of a per-rank checkpoint, read from the slices that tile it."""

    canonical: str
    name: str  # parameter name in the rank files
    path: str  # the checkpoint directory (for messages: the tensor is in no single file)
    full_shape: tuple
    dtype: str
    slices: tuple  # Slice, ordered by box (row-major); they tile the full tensor exactly
    scheme: str = ""

    @property
    def shape(self) -> tuple:
        return self.full_shape

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def stored_itemsize(self) -> int:
        return self.itemsize

    @property
    def nbytes(self) -> int:
        return numel(self.full_shape) * self.itemsize

    # -- the stream's members -------------------------------------------------------
    def _row_slices(self, start: int, stop: int):
        for s in self.slices:
            if s.row0 < stop and start < s.row1:
                yield s

    @cached_property
    def _row_edges(self) -> tuple:
        return tuple(sorted({s.row0 for s in self.slices} | {s.row1 for s in self.slices}))

    def block_end(self, start: int, stop: int) -> int:
        """The first slice edge after ``start`` and before ``stop``, else ``stop``.

        The stream ends its row blocks there, so a block of a tensor split on
        dim 0 comes from one slice and is read as a view, not assembled.
        """
        for e in self._row_edges:
            if start < e < stop:
                return e
        return stop

    def spans(self, start: int, stop: int) -> list:
        """[(path, lo, hi)]: the byte ranges of every slice file holding rows [start, stop)."""
        out = []
        for s in self._row_slices(start, stop):
            lo, hi = byte_span(s.info, max(start, s.row0) - s.row0, min(stop, s.row1) - s.row0)
            out.append((s.path, lo, hi))
        return out

    def read(self, files, start: int, stop: int, step: int = 1, col0: int = 0, col1=None, staging=None):
        """Rows ``start:stop:step``, columns ``col0:col1`` as a 2-D array: a view of ``staging`` when one slice
        holds them, else of the assembly buffer (either is valid until the next read)."""
        rows, cols = as_matrix(self.full_shape)
        col1 = cols if col1 is None else col1
        if not (0 <= start <= stop <= rows) or not (0 <= col0 <= col1 <= cols) or step < 1:
            raise IndexError(f"rows {start}:{stop}:{step}, columns {col0}:{col1} outside {self.name} "
                             f"({rows} x {cols})")
        n = len(range(start, stop, step))
        if n == 0 or col1 == col0:
            return np.empty((n, col1 - col0), dtype=NP_DTYPES[self.dtype])
        last = start + (n - 1) * step
        for s in self.slices:  # fast path: one slice holds the whole request
            run = s.col_run
            if s.row0 <= start and last < s.row1 and run is not None and run[0] <= col0 and col1 <= run[1]:
                return read_rows(files, s.path, s.info, start - s.row0, last + 1 - s.row0, step,
                                 col0 - run[0], col1 - run[0], staging)
        width = col1 - col0
        nbytes = n * width * self.itemsize
        out = files.scratch(nbytes)[:nbytes].view(NP_DTYPES[self.dtype]).reshape(n, width)
        for s in self._row_slices(start, last + 1):
            # the request's rows inside this slice: first..last on the request's step grid
            first = start + -(-(max(start, s.row0) - start) // step) * step
            if first >= s.row1 or first > last:
                continue
            end = min(last, start + (s.row1 - 1 - start) // step * step)
            k = (end - first) // step + 1
            o0 = (first - start) // step
            run = s.col_run
            if run is not None:
                a, b = max(col0, run[0]), min(col1, run[1])
                if a >= b:
                    continue
                part = read_rows(files, s.path, s.info, first - s.row0, end + 1 - s.row0, step,
                                 a - run[0], b - run[0], staging)
                out[o0:o0 + k, a - col0:b - col0] = part
            else:
                flat = s.flat_columns()
                mask = (flat >= col0) & (flat < col1)
                if not mask.any():
                    continue
                part = read_rows(files, s.path, s.info, first - s.row0, end + 1 - s.row0, step, 0, None, staging)
                block = out[o0:o0 + k]
                block[:, flat[mask] - col0] = part[:, mask]
            del part
        return out


def composite(canonical: str, full, checkpoint_dir: str, scheme: str = "") -> CompositeTensor:
    """The :class:`CompositeTensor` of an assembled :class:`~.assemble.FullTensor`."""
    slices = tuple(Slice(p.rank, p.path, p.info, p.box, full.shape) for p in full.pieces)
    return CompositeTensor(canonical, full.name, checkpoint_dir, full.shape, full.dtype, slices, scheme)
