"""Keep the kernel writing our output as we go, instead of all at the end.

A conversion writes tens of GB. Left alone, the kernel lets dirty pages pile up
to its ``dirty_ratio`` and then either stalls the writer or leaves gigabytes for
the final ``fsync`` — time on the critical path that ``cp`` never pays for.
:class:`WritebackPacer` starts asynchronous writeback of each completed chunk
(``sync_file_range(SYNC_FILE_RANGE_WRITE)``) and later drops the written pages
from the page cache (``POSIX_FADV_DONTNEED``), so the output neither crowds out
the input's cached pages nor counts against a container's memory for long.
Both calls are hints: where they are unavailable, nothing changes but speed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

CHUNK = 64 * 2**20
DROP_LAG = 4 * CHUNK
_SYNC_FILE_RANGE_WRITE = 2

try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    _sync_file_range = _libc.sync_file_range
    _sync_file_range.argtypes = (ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint)
    _sync_file_range.restype = ctypes.c_int
except (OSError, AttributeError):  # pragma: no cover - non-Linux
    _sync_file_range = None


class WritebackPacer:
    def __init__(self, fd: int):
        self.fd = fd
        self.started = 0  # bytes handed to writeback
        self.dropped = 0  # bytes dropped from the cache

    def advance(self, offset: int) -> None:
        """Called with the file's current size after each write."""
        if offset - self.started < CHUNK:
            return
        if _sync_file_range is not None:
            _sync_file_range(self.fd, self.started, offset - self.started, _SYNC_FILE_RANGE_WRITE)
        self.started = offset
        upto = self.started - DROP_LAG
        if upto - self.dropped >= CHUNK:
            try:
                os.posix_fadvise(self.fd, self.dropped, upto - self.dropped, os.POSIX_FADV_DONTNEED)
            except (AttributeError, OSError):  # pragma: no cover
                pass
            self.dropped = upto
