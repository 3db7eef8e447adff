"""Page-rounded ``madvise`` on a memory map: the one place that rounds byte ranges to pages.

``verify`` maps the output files it compares and releases the ranges it has
compared. Advice applies to whole pages, so
a byte range is widened to the pages that cover it (clipped to the mapping).
All advice is a hint: where the kernel does not know it, nothing but speed changes.
"""

from __future__ import annotations

import mmap

PAGE = mmap.PAGESIZE


def page_span(start: int, stop: int, length: int) -> tuple:
    """The page-aligned [a, b) covering [start, stop), clipped to ``length``."""
    a = (start // PAGE) * PAGE
    b = min(length, -(-stop // PAGE) * PAGE)
    return a, b


def advise(m: mmap.mmap, advice: int, start: int, stop: int) -> None:
    """``m.madvise(advice)`` over the pages covering [start, stop); raises OSError if unsupported."""
    if m is None or stop <= start:
        return
    a, b = page_span(start, stop, len(m))
    if b > a:
        m.madvise(advice, a, b - a)


def release(m: mmap.mmap, start: int, stop: int) -> None:
    """Drop this process's pages of [start, stop); the kernel keeps them in the page cache."""
    advise(m, mmap.MADV_DONTNEED, start, stop)
