"""The stream: source rows -> converted blocks -> file writers, one block at a time.

A :class:`~streamconv.formats.base.StreamGroup` is a set of files filled
together, step by step; each step gives every file at most one entry. Within a
step the entries are grouped by *recipe* (identical pieces and dtype): a recipe
is read once and its blocks go to every file that wants it (a norm on every TP
rank, attention weights in every EP file). When every recipe of a step reads
the same source rows in different column ranges (a row-parallel weight split
over TP), each row block is read once and its column slices go to their files
(*lockstep*). Any other piece is read in row blocks; a transposed piece (an
expert stored [in, out]) is produced in output-row blocks, each filled from
source row sub-blocks, so neither side ever holds more than a block.

The calling thread reads (``preadv`` into one aligned staging block) and
converts (``Tensor.copy_`` does the round-to-nearest-even BF16 cast and drops
the GIL); a
:class:`~streamconv.core.background.BackgroundWorker` hands the filled buffers
to the writers (CRC + write, or compare for ``verify``), which also drop the
GIL. A fixed pool of :data:`~streamconv.engine.memory.OUTPUT_BUFFERS` buffers
bounds memory. While a block converts, the kernel is asked to read the next
one ahead.
"""

from __future__ import annotations

import queue

import numpy as np
import torch

from ..core.background import BackgroundWorker
from ..core.interrupts import checkpoint
from ..megatron.entries import EntryKind, OutDtype
from ..core.shapes import as_matrix
from ..sources.mapped import SourceFiles, aligned_buffer
from . import memory

_TORCH_DTYPES = {OutDtype.BF16: torch.bfloat16, OutDtype.F32: torch.float32}
_ALIGN = 64  # offset of each file's slice in a shared lockstep buffer
_SOURCE_VIEW = {"BF16": torch.bfloat16}


class Streamer:
    """Executes stream groups into file writers with a bounded set of buffers."""

    def __init__(self, block_bytes: int, on_bytes=None, on_read=None, expect: dict | None = None):
        self.block = int(block_bytes)
        self.files = SourceFiles(expect)  # expect: input path -> (size, mtime_ns, inode) as planned
        self.pool: queue.Queue = queue.Queue()
        for _ in range(memory.OUTPUT_BUFFERS):
            self.pool.put(torch.empty(self.block, dtype=torch.uint8))
        self.staging = aligned_buffer(memory.READ_CHUNK)
        self.worker = BackgroundWorker("streamconv-writer", maxsize=memory.OUTPUT_BUFFERS)
        self.on_bytes = on_bytes
        self.on_read = on_read
        # one converter thread, the other core writes; a library caller gets its thread count back in close()
        self._torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def close(self, cancel: bool = False):
        """End the writer thread: after its queued work, or (``cancel``, or after an error) skipping it."""
        self.worker.stop(cancel=cancel or self.worker.error is not None)
        self.files.close()
        torch.set_num_threads(self._torch_threads)

    # -- entry point ---------------------------------------------------------------
    def run_group(self, group, writers: dict) -> None:
        """Stream every step of ``group`` into ``writers`` (file index -> FileWriter); others are skipped."""
        for step in group.steps:
            items = [(writers[i], e) for i, e in step if i in writers]
            if items:
                self._step(items)
        self.worker.sync()
        self.files.check_unchanged()  # the group's files are committed next: they must be of this input

    # -- a step ----------------------------------------------------------------------
    def _step(self, items: list) -> None:
        recipes: dict = {}
        for w, e in items:
            if e.kind is EntryKind.BYTES:
                self._fixed(w, e)
                continue
            recipes.setdefault((e.pieces, e.dtype), []).append((w, e))
        groups = list(recipes.values())
        if len(groups) > 1 and self._lockstep([g[0][1] for g in groups]):
            self._columns_lockstep(groups)
            return
        for g in groups:
            self._begin(g)
            for p in g[0][1].pieces:
                self._piece(p, g[0][1].dtype, [w for w, _ in g])
            self._end(g)

    def _fixed(self, w, e) -> None:
        self._begin([(w, e)])
        if e.data:
            self.worker.submit(self._deliver_parts, [([w], 0, len(e.data))], e.data)
        self._end([(w, e)])

    def _begin(self, pairs) -> None:
        self.worker.submit(_call_each, [(w.begin, e) for w, e in pairs])

    def _end(self, pairs) -> None:
        self.worker.submit(_call_each, [(w.end, e) for w, e in pairs])

    def _send(self, writers, buf, n) -> None:
        self.worker.submit(self._deliver_parts, [(writers, 0, n)], buf, after=lambda: self.pool.put(buf))

    def _take(self) -> torch.Tensor:
        """A free output buffer; also where an interrupt is taken (once per block, see core.interrupts)."""
        while True:
            checkpoint()
            try:
                return self.pool.get(timeout=0.5)
            except queue.Empty:
                self.worker.check()

    @staticmethod
    def _lockstep(entries) -> bool:
        """Every entry is one plain piece of the same source rows (columns differ)."""
        if any(len(e.pieces) != 1 for e in entries):
            return False
        p0 = entries[0].pieces[0]
        return all(
            e.pieces[0].src is p0.src and e.pieces[0].start == p0.start and e.pieces[0].stop == p0.stop
            and e.pieces[0].step == 1 and e.pieces[0].repeat == 1 and not e.pieces[0].transpose
            for e in entries
        )

    def _staging_for(self, nbytes: int) -> np.ndarray:
        """The staging buffer, grown once if a single source row is larger than a read chunk."""
        if self.staging.nbytes < nbytes:
            self.staging = aligned_buffer(nbytes)
        return self.staging

    def _source(self, src, a: int, b: int, step: int = 1, col0: int = 0, col1=None) -> torch.Tensor:
        """Rows a:b:step (columns col0:col1) of ``src`` read into the staging buffer, as a torch view."""
        need = (b - a) * as_matrix(src.shape)[1] * src.itemsize  # read_rows reads every row of [a, b)
        t = torch.from_numpy(src.read(self.files, a, b, step, col0, col1, self._staging_for(need)))
        return t.view(_SOURCE_VIEW[src.dtype]) if src.dtype in _SOURCE_VIEW else t

    def _fill(self, src, start: int, step: int, nrows: int, col0: int, col1, out: torch.Tensor) -> None:
        """out[i] = source row start + i*step (columns col0:col1), read and cast one cache-sized chunk at a time.

        Reading a chunk and casting it right away keeps the copy in the CPU cache:
        the cast reads what ``preadv`` has just written instead of a whole block
        from memory.
        """
        row_bytes = as_matrix(src.shape)[1] * src.itemsize
        per = max(1, memory.READ_CHUNK // max(row_bytes * step, 1))
        i = 0
        while i < nrows:
            j = min(nrows, i + per)
            if step == 1:  # a chunk inside one slice is read directly, not assembled
                j = src.block_end(start + i, start + j) - start
            a = start + i * step
            out[i:j].copy_(self._source(src, a, a + (j - i - 1) * step + 1, step, col0, col1))
            i = j

    @staticmethod
    def _out_view(buf: torch.Tensor, offset: int, rows: int, cols: int, out_dtype) -> torch.Tensor:
        n = rows * cols * out_dtype.itemsize
        return buf[offset:offset + n].view(_TORCH_DTYPES[out_dtype]).view(rows, cols)

    def _read(self, nbytes: int) -> None:
        if self.on_read:
            self.on_read(nbytes)

    def _prefetch(self, src, a: int, b: int) -> None:
        """Ask the kernel for the file bytes of rows [a, b) (the next block, while this one converts)."""
        for path, lo, hi in src.spans(a, b):
            self.files.prefetch(path, lo, hi)

    # -- readers -----------------------------------------------------------------------
    def _columns_lockstep(self, groups) -> None:
        """Row-parallel weight: read each row once, cast its column slices into one buffer, send each slice.

        Every group's slice of a row block sits in the same output buffer (at its
        own offset), so however many files share the weight, one buffer and one
        read of the source rows serve them all.
        """
        p0 = groups[0][0][1].pieces[0]
        src = p0.src
        row_bytes = as_matrix(src.shape)[1] * src.itemsize
        out_row = sum(g[0][1].pieces[0].ncols * g[0][1].dtype.itemsize for g in groups)
        rows_per_block = max(1, (self.block - _ALIGN * len(groups)) // max(out_row, 1))
        per_chunk = max(1, memory.READ_CHUNK // max(row_bytes, 1))
        for g in groups:
            self._begin(g)
        a = p0.start
        while a < p0.stop:
            b = src.block_end(a, min(p0.stop, a + rows_per_block))
            if b < p0.stop:
                self._prefetch(src, b, min(p0.stop, b + rows_per_block))
            buf = self._take()
            parts, outs, off = [], [], 0
            for g in groups:
                e = g[0][1]
                p = e.pieces[0]
                out = self._out_view(buf, off, b - a, p.ncols, e.dtype)
                n = out.numel() * e.dtype.itemsize
                outs.append((out, p.col0, p.col1))
                parts.append(([w for w, _ in g], off, n))
                off += -(-n // _ALIGN) * _ALIGN
            i = a
            while i < b:
                k = src.block_end(i, min(b, i + per_chunk))
                t = self._source(src, i, k)
                for out, c0, c1 in outs:
                    out[i - a:k - a].copy_(t[:, c0:c1])
                i = k
            self.worker.submit(self._deliver_parts, parts, buf, after=lambda buf=buf: self.pool.put(buf))
            self._read((b - a) * as_matrix(src.shape)[1] * src.stored_itemsize)
            a = b
        for g in groups:
            self._end(g)

    def _deliver_parts(self, parts, buf) -> None:
        """Writer thread: each (writers, offset, length) part of ``buf`` (an output buffer, or fixed bytes)."""
        mv = memoryview(buf.numpy() if isinstance(buf, torch.Tensor) else buf)
        for writers, off, n in parts:
            for w in writers:
                w.write(mv[off:off + n])
                if self.on_bytes:
                    self.on_bytes(n)

    def _piece(self, p, out_dtype, writers) -> None:
        if p.transpose:
            self._transposed(p, out_dtype, writers)
        elif p.repeat > 1:
            self._repeated(p, out_dtype, writers)
        else:
            self._rows(p, out_dtype, writers)

    def _repeated(self, p, out_dtype, writers) -> None:
        """One source row repeated (vocab padding)."""
        src = p.src
        row = self._source(src, p.start, p.start + 1, 1, p.col0, p.col1).clone()  # one row, owned
        out_row = p.ncols * out_dtype.itemsize
        left = p.repeat
        per = max(1, self.block // out_row)
        while left:
            k = min(per, left)
            buf = self._take()
            self._out_view(buf, 0, k, p.ncols, out_dtype).copy_(row.expand(k, p.ncols))
            self._send(writers, buf, k * out_row)
            left -= k

    def _rows(self, p, out_dtype, writers) -> None:
        """Rows ``start:stop:step`` (columns col0:col1), one output block at a time."""
        src = p.src
        src_rows = as_matrix(src.shape)[0]
        out_row = p.ncols * out_dtype.itemsize
        step = p.step
        per = max(1, self.block // out_row)
        total = p.src_rows
        i = 0
        while i < total:
            j = min(total, i + per)
            if step == 1:  # end the block where the source's storage does (a slice edge): no assembly
                j = src.block_end(p.start + i, p.start + j) - p.start
            if j < total:
                first = p.start + j * step
                self._prefetch(src, first, min(p.start + (min(total, j + per) - 1) * step + 1, src_rows))
            buf = self._take()
            self._fill(src, p.start + i * step, step, j - i, p.col0, p.col1,
                       self._out_view(buf, 0, j - i, p.ncols, out_dtype))
            self._send(writers, buf, (j - i) * out_row)
            self._read((j - i) * p.ncols * src.stored_itemsize)
            i = j

    def _transposed(self, p, out_dtype, writers) -> None:
        """Output rows = source columns col0:col1 over source rows start:stop.

        Each output block (a band of output rows, all output columns) is filled
        from source row chunks, each read once per output block into the staging
        buffer, so memory stays within a block. With a block that holds the whole
        transposed tensor (the usual case), every source byte is read exactly once.
        """
        src = p.src
        full_cols = as_matrix(src.shape)[1]
        out_rows, out_cols = p.nrows, p.ncols
        out_row = out_cols * out_dtype.itemsize
        per_out = max(1, self.block // max(out_row, 1))
        per_src = max(1, memory.READ_CHUNK // max(full_cols * src.itemsize, 1))
        j = 0
        while j < out_rows:
            k = min(out_rows, j + per_out)
            buf = self._take()
            out = self._out_view(buf, 0, k - j, out_cols, out_dtype)
            a = p.start
            while a < p.stop:
                b = src.block_end(a, min(p.stop, a + per_src))
                out[:, a - p.start:b - p.start].copy_(self._source(src, a, b, 1, p.col0 + j, p.col0 + k).T)
                self._read((b - a) * (k - j) * src.stored_itemsize)
                a = b
            self._send(writers, buf, (k - j) * out_row)
            j = k


def _call_each(calls) -> None:
    for fn, arg in calls:
        fn(arg)
