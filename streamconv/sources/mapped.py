"""Row-range reads of source tensors with positioned reads (``preadv``) into an aligned staging buffer.

A source tensor is never loaded whole: :func:`read_rows` copies the bytes of a
block of rows from the file into the stream's staging buffer and returns a view
of it (optionally a column range and a row step), which the converter then
casts into a BF16 output buffer.

Why reads and not a memory map: a mapped file that shrinks while it is being
read (a concurrent copy, a network filesystem) kills the process with SIGBUS,
which Python cannot catch. A read of bytes that are gone returns short, and
that becomes a one-line :class:`~streamconv.core.errors.InputError` naming the
file, with the save directory left resumable. The copy from the page cache
into the staging buffer costs about what faulting the mapped pages in cost, and
the staging buffer is the only source-side memory (page cache pages are not
part of the process), so the memory model counts one staging buffer — two for
per-rank input, whose reads that span slices are assembled in a buffer of
their own (:meth:`SourceFiles.scratch`).

:class:`SourceFiles` opens each input file once, read-only, and checks that it
is still the file that was planned (size, modification time, inode: the input
fingerprint). :meth:`SourceFiles.prefetch` asks the kernel to read the next
block ahead (``POSIX_FADV_WILLNEED``) so the disk works while the CPU converts.
Input pages are not dropped from the page cache after use: a block may be read
again (the gate and up halves of an interleaved ``linear_fc1``, the row blocks
of a transposed expert), and the kernel evicts clean pages as needed.

Tensors whose data offset is not a multiple of their element size (MindSpore
packs without padding, and its header length is not padded either) need no
special case: they land aligned at the start of the staging buffer.
"""

from __future__ import annotations

import mmap
import os

import numpy as np

from ..core.errors import InputError
from ..core.shapes import as_matrix

NP_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F8_E4M3": np.uint8}  # F8: raw bytes (sources/fp8.py)
_ALIGN = mmap.PAGESIZE


def aligned_buffer(nbytes: int) -> np.ndarray:
    """A uint8 buffer of ``nbytes`` starting on a page boundary (fast copies from the page cache)."""
    raw = np.empty(nbytes + _ALIGN, dtype=np.uint8)
    skip = (-raw.ctypes.data) % _ALIGN
    return raw[skip:skip + nbytes]


def file_identity(st: os.stat_result) -> tuple:
    """(size, mtime_ns, inode): what tells that a file was changed or replaced."""
    return st.st_size, st.st_mtime_ns, st.st_ino


class SourceFiles:
    """Read-only descriptors of the input files, opened on first use.

    ``expect`` maps absolute paths to :func:`file_identity` as planned; a file that
    no longer matches when it is first opened is refused (it was changed or
    replaced after its header was read, so the plan does not describe it).
    """

    def __init__(self, expect: dict | None = None):
        self._fds: dict = {}
        self.expect = dict(expect or {})
        self._scratch = None

    def scratch(self, nbytes: int) -> np.ndarray:
        """A reusable uint8 buffer of at least ``nbytes``, for reads that gather rows from several files.

        A tensor stored as slices in several files (per-rank training output) is
        assembled here: each slice's part is read into the caller's staging
        buffer (valid until the next read) and copied here at once, so this is a
        buffer of its own, never the staging buffer. A request is at most one
        staging read, so neither is this buffer (the memory model counts it).
        It is allocated on first use only, so inputs stored whole never pay for it.
        """
        if self._scratch is None or self._scratch.nbytes < nbytes:
            self._scratch = None
            self._scratch = aligned_buffer(nbytes)
        return self._scratch

    def fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as e:
                raise InputError(f"{path}: cannot open for reading ({e.strerror}); the input changed while "
                                 "being converted? rerun with --resume once it is complete") from None
            want = self.expect.get(os.path.abspath(path))
            if want is not None:
                got = file_identity(os.fstat(fd))
                if tuple(got) != tuple(want):
                    os.close(fd)
                    raise InputError(changed_message(path, want, got))
            self._fds[path] = fd
        return fd

    def read_into(self, path: str, lo: int, out: np.ndarray) -> None:
        """Fill ``out`` (a uint8 array) with the file's bytes from offset ``lo``; refuse a short read."""
        fd = self.fd(path)
        mv = memoryview(out).cast("B")
        done, n = 0, len(mv)
        while done < n:
            try:
                got = os.preadv(fd, [mv[done:]], lo + done)
            except InterruptedError:  # pragma: no cover - retried by Python itself since 3.5
                continue
            except OSError as e:
                raise InputError(f"{path}: reading bytes {lo + done}..{lo + n} failed ({e.strerror}); "
                                 "the input is unreadable; fix it and rerun with --resume") from None
            if got == 0:
                size = os.fstat(fd).st_size
                raise InputError(
                    f"{path}: ends at byte {size} but data up to byte {lo + n} was planned: the file shrank "
                    "while being converted; rerun with --resume once it is whole again (--overwrite if it was "
                    "replaced)"
                )
            done += got

    def check_unchanged(self) -> None:
        """Refuse if an input file read so far was modified or replaced since it was planned.

        Called before the files made from it are committed: a file replaced by a
        rename keeps serving the old bytes through our descriptor, and one
        rewritten in place may have served a mix; either way the output would not
        be a conversion of what the input path now holds.
        """
        for path, fd in self._fds.items():
            want = self.expect.get(os.path.abspath(path))
            if want is None:
                continue
            try:
                now = file_identity(os.stat(path))
            except OSError:
                now = (0, 0, 0)
            for got in (file_identity(os.fstat(fd)), now):
                if tuple(got) != tuple(want):
                    raise InputError(changed_message(path, want, got))

    def prefetch(self, path: str, start: int, stop: int) -> None:
        """Ask the kernel to read [start, stop) ahead (the next block, while this one converts)."""
        if stop <= start:
            return
        try:
            os.posix_fadvise(self.fd(path), start, stop - start, os.POSIX_FADV_WILLNEED)
        except (AttributeError, OSError):  # only a hint
            pass

    def close(self) -> None:
        self._scratch = None
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:  # pragma: no cover
                pass
        self._fds.clear()


def changed_message(path: str, want: tuple, got: tuple) -> str:
    """One line saying how an input file differs from when it was planned (size / mtime / inode)."""
    what = []
    if got[0] != want[0]:
        what.append(f"size {want[0]} -> {got[0]}")
    if got[1] != want[1]:
        what.append("modification time")
    if len(want) > 2 and len(got) > 2 and got[2] != want[2]:
        what.append("inode (the file was replaced)")
    return (f"{path}: changed while being converted ({', '.join(what) or 'missing'}); the files made from it "
            "are not kept: once the input is stable, rerun with --overwrite")


def row_geometry(info) -> tuple:
    """(rows, columns) of a tensor seen as a matrix; 1-D tensors are a column."""
    return as_matrix(info.shape)


def byte_span(info, start: int, stop: int) -> tuple:
    """Absolute file byte range covering rows [start, stop)."""
    _, cols = row_geometry(info)
    row_bytes = cols * info.itemsize
    return info.start + start * row_bytes, info.start + stop * row_bytes


def read_rows(files: SourceFiles, path: str, info, start: int, stop: int, step: int = 1,
              col0: int = 0, col1: int | None = None, staging: np.ndarray | None = None) -> np.ndarray:
    """Return rows ``start:stop:step`` (columns ``col0:col1``) of a tensor as a 2-D array.

    The covering bytes are read into ``staging`` (a uint8 buffer, used from its
    start, when it is large enough) or a fresh buffer; the result is a view of
    it, valid until the next read into the same buffer.
    """
    rows, cols = row_geometry(info)
    if not (0 <= start <= stop <= rows):
        raise IndexError(f"rows {start}:{stop} outside {info.name} with {rows} rows")
    dt = NP_DTYPES[info.dtype]
    n = stop - start
    if n == 0:
        return np.empty((0, (col1 if col1 is not None else cols) - col0), dtype=dt)
    lo, hi = byte_span(info, start, stop)
    nbytes = hi - lo
    if staging is not None and staging.nbytes >= nbytes:
        buf = staging[:nbytes]
    else:
        buf = aligned_buffer(nbytes)
    files.read_into(path, lo, buf)
    block = buf.view(dt).reshape(n, cols)
    if step != 1:
        block = block[::step]
    if col0 != 0 or (col1 is not None and col1 != cols):
        block = block[:, col0:col1]
    return block
