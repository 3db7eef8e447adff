"""The memory model: what the process costs at rest, and how big a stream block may be.

Peak resident memory of a conversion is the interpreter with its libraries (the
*floor*, measured, not guessed) plus the stream's working set: the output
buffers in flight between the converter and the writer, each one *block* of
``block_bytes``, and the staging buffer source rows are read into (``preadv``,
one cache-sized :data:`READ_CHUNK` at a time, or one row if a row is larger;
the page cache is not part of the process). An input whose weights are
assembled from per-rank slices adds one more staging-sized buffer: the
assembly buffer a read that spans several slices is gathered into (each slice's
part is read into the staging buffer and copied there at once, so it is never
larger than one staging read). So the block size follows from the budget:
``block = (budget - floor - margin - reads) / OUTPUT_BUFFERS``. The same
formula gives the prediction ``streamconv plan`` prints and the smallest
budget that works.
"""

from __future__ import annotations

import psutil

from ..core.errors import FlagError
from ..core.sizes import human

#: output buffers in the queue + one being filled + one being written
OUTPUT_BUFFERS = 4
#: source bytes read and cast at a time: small enough that the cast reads them from the CPU cache
READ_CHUNK = 2 * 2**20
#: per-rank input: + the buffer a read is assembled in from several slices (SourceFiles.scratch)
ASSEMBLY_BUFFERS = 1
#: threads, allocator slack, progress bar, plan objects
MARGIN = 48 * 2**20
#: the floor is measured anew by each process and varies by a fraction of a MiB
FLOOR_JITTER = 8 * 2**20
#: blocks larger than this do not make the stream faster
MAX_BLOCK = 64 * 2**20
DEFAULT_HEADROOM = 512 * 2**20


def current_rss() -> int:
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """High-water mark of this process's resident set (VmHWM), file-backed pages included."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - non-Linux
        pass
    return current_rss()  # pragma: no cover


def floor_bytes() -> int:
    """Resident memory of this process now: interpreter, torch, numpy, streamconv."""
    return current_rss()


def default_budget(largest_layer_source_bytes: int) -> int:
    """Without --max-memory: about one transformer layer (1.25 x its source bytes + 0.5 GiB)."""
    return int(1.25 * largest_layer_source_bytes) + DEFAULT_HEADROOM


def staging_bytes(max_row: int) -> int:
    """The staging buffer: a read chunk, or the largest source row if that is larger."""
    return max(READ_CHUNK, max_row)


def read_buffers_bytes(max_row: int, assembled: bool = False) -> int:
    """Source-side memory: the staging buffer, and as much again to assemble reads from slices."""
    return (1 + (ASSEMBLY_BUFFERS if assembled else 0)) * staging_bytes(max_row)


def plan_blocks(budget: int, floor: int, min_block: int, largest_tensor: int, explicit: bool,
                assembled: bool = False) -> tuple:
    """Return (block_bytes, predicted_peak) for ``budget``; refuse a budget below the floor.

    ``min_block`` is the largest source row (a block holds at least one row).
    ``assembled``: the input has weights stored as slices in several files
    (per-rank output), whose reads need an assembly buffer.
    """
    reads = read_buffers_bytes(min_block, assembled)
    min_block = max(min_block, 64 * 1024)
    smallest = floor + MARGIN + reads + OUTPUT_BUFFERS * min_block
    if budget < smallest:
        if explicit:
            raise FlagError(
                f"--max-memory {human(budget)} is below what this process needs "
                f"({human(floor)} for Python and its libraries + working blocks); "
                f"the smallest budget that works is {-(-(smallest + FLOOR_JITTER) // 2**20)}MiB"
            )
        budget = smallest
    block = (budget - floor - MARGIN - reads) // OUTPUT_BUFFERS
    block = min(block, MAX_BLOCK, max(largest_tensor, min_block))
    block = max(block, min_block)
    block -= block % 4096 if block > 4096 else 0
    predicted = floor + MARGIN + reads + OUTPUT_BUFFERS * block
    return block, predicted
