"""Memory-mapped row-range reads of source tensors.

A source tensor is never loaded whole. :class:`MappedFiles` maps each input file
read-only once; :func:`read_rows` returns a *view* of a block of rows (optionally a
column range and a row step) straight from the mapping, which the converter then
copies into a BF16 output buffer. Mapped pages count towards the resident set
(and towards a container's memory limit), so after a block is consumed the
caller hands its byte range back to :meth:`MappedFiles.release`, which drops the
pages from this process with ``MADV_DONTNEED`` (the kernel keeps them cached).
:meth:`MappedFiles.prefetch` asks the kernel to read the next block ahead
(``MADV_WILLNEED``) so the disk works while the CPU converts.

Tensors whose data offset is not a multiple of their element size (MindSpore
packs without padding, and its header length is not padded either) are read in
place on x86-64/AArch64, whose loads tolerate misalignment, and copied through an
aligned staging buffer elsewhere (or when ``STREAMCONV_STAGE_UNALIGNED`` is set).
"""

from __future__ import annotations

import mmap
import os
import platform
import warnings

import numpy as np

from ..core.errors import InputError
from ..core.pages import MADV_POPULATE_READ, advise, release
from ..core.shapes import as_matrix

NP_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}

#: x86-64 and AArch64 load unaligned floats correctly (torch's copy kernels use unaligned
#: vector loads), so misaligned tensors are read in place there; elsewhere they are staged.
UNALIGNED_OK = platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64") and not os.environ.get(
    "STREAMCONV_STAGE_UNALIGNED"
)

warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


class MappedFiles:
    """Read-only mappings of the input files, opened on first use."""

    def __init__(self):
        self._maps: dict = {}
        self._populate_ok = True
        self._scratch = None

    def scratch(self, nbytes: int) -> np.ndarray:
        """A reusable uint8 buffer of at least ``nbytes``, for reads that gather rows from several files.

        A tensor stored as slices in several files (per-rank training output) is
        assembled here, one stream block at a time; keeping one buffer avoids
        mapping and faulting in fresh memory for every block. It is allocated on
        first use only, so inputs stored whole never pay for it.
        """
        if self._scratch is None or self._scratch.nbytes < nbytes:
            self._scratch = None
            self._scratch = np.empty(nbytes, dtype=np.uint8)
        return self._scratch

    def get(self, path: str) -> mmap.mmap:
        m = self._maps.get(path)
        if m is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise InputError(f"{path}: cannot open for reading ({e.strerror})") from None
            try:
                size = os.fstat(fd).st_size
                m = mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size else None
            finally:
                os.close(fd)
            self._maps[path] = m
        return m

    def release(self, path: str, start: int, stop: int) -> None:
        """Drop this process's pages of [start, stop) (whole pages inside it and at its edges)."""
        release(self._maps.get(path), start, stop)

    def populate(self, path: str, start: int, stop: int) -> None:
        """Map [start, stop) in one system call (falls back to ordinary page faults)."""
        if not self._populate_ok:
            return
        try:
            advise(self.get(path), MADV_POPULATE_READ, start, stop)
        except OSError:
            self._populate_ok = False

    def prefetch(self, path: str, start: int, stop: int) -> None:
        """Ask the kernel to read [start, stop) ahead (the next block, while this one converts)."""
        advise(self.get(path), mmap.MADV_WILLNEED, start, stop)

    def close(self) -> None:
        self._scratch = None
        for m in self._maps.values():
            if m is not None:
                m.close()
        self._maps.clear()


def row_geometry(info) -> tuple:
    """(rows, columns) of a tensor seen as a matrix; 1-D tensors are a column."""
    return as_matrix(info.shape)


def byte_span(info, start: int, stop: int) -> tuple:
    """Absolute file byte range covering rows [start, stop)."""
    _, cols = row_geometry(info)
    row_bytes = cols * info.itemsize
    return info.start + start * row_bytes, info.start + stop * row_bytes


def read_rows(files: MappedFiles, path: str, info, start: int, stop: int, step: int = 1,
              col0: int = 0, col1: int | None = None, staging: np.ndarray | None = None) -> np.ndarray:
    """Return rows ``start:stop:step`` (columns ``col0:col1``) of a tensor as a 2-D array.

    The result is a view into the mapping unless the tensor is misaligned, in which
    case the covering bytes are first copied into ``staging`` (a uint8 buffer of at
    least that size) or a fresh buffer.
    """
    rows, cols = row_geometry(info)
    if not (0 <= start <= stop <= rows):
        raise IndexError(f"rows {start}:{stop} outside {info.name} with {rows} rows")
    m = files.get(path)
    dt = NP_DTYPES[info.dtype]
    itemsize = info.itemsize
    n = stop - start
    if n == 0:
        return np.empty((0, (col1 if col1 is not None else cols) - col0), dtype=dt)
    lo, hi = byte_span(info, start, stop)
    if lo % itemsize == 0 or UNALIGNED_OK:
        block = np.frombuffer(m, dtype=dt, count=n * cols, offset=lo).reshape(n, cols)
    else:
        nbytes = hi - lo
        if staging is not None and staging.nbytes >= nbytes:
            buf = staging[:nbytes]
        else:
            buf = np.empty(nbytes, dtype=np.uint8)
        buf[:] = np.frombuffer(m, dtype=np.uint8, count=nbytes, offset=lo)
        block = buf.view(dt).reshape(n, cols)
    if step != 1:
        block = block[::step]
    if col0 != 0 or (col1 is not None and col1 != cols):
        block = block[:, col0:col1]
    return block
