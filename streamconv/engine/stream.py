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

The calling thread maps and converts (``Tensor.copy_`` does the
round-to-nearest-even BF16 cast and drops the GIL); a
:class:`~streamconv.core.background.BackgroundWorker` hands the filled buffers
to the writers (CRC + write, or compare for ``verify``), which also drop the
GIL. A fixed pool of :data:`~streamconv.engine.memory.OUTPUT_BUFFERS` buffers
bounds memory; after each block its source pages are released.
"""

from __future__ import annotations

import queue

import numpy as np
import torch

from ..core.background import BackgroundWorker
from ..megatron.entries import EntryKind, OutDtype
from ..core.shapes import as_matrix
from ..sources.mapped import MappedFiles
from . import memory

_TORCH_DTYPES = {OutDtype.BF16: torch.bfloat16, OutDtype.F32: torch.float32}
_SOURCE_VIEW = {"BF16": torch.bfloat16}


class Streamer:
    """Executes stream groups into file writers with a bounded set of buffers."""

    def __init__(self, block_bytes: int, on_bytes=None, on_read=None):
        self.block = int(block_bytes)
        self.files = MappedFiles()
        self.pool: queue.Queue = queue.Queue()
        for _ in range(memory.OUTPUT_BUFFERS):
            self.pool.put(torch.empty(self.block, dtype=torch.uint8))
        self.staging = np.empty(self.block, dtype=np.uint8)
        self.worker = BackgroundWorker("streamconv-writer", maxsize=memory.OUTPUT_BUFFERS)
        self.on_bytes = on_bytes
        self.on_read = on_read
        torch.set_num_threads(1)  # one converter thread; the other core writes

    def close(self):
        self.worker.stop(cancel=self.worker.error is not None)
        try:
            self.files.close()
        except BufferError:  # a view still alive; the mapping closes with the process
            pass

    # -- entry point ---------------------------------------------------------------
    def run_group(self, group, writers: dict) -> None:
        """Stream every step of ``group`` into ``writers`` (file index -> FileWriter); others are skipped."""
        for step in group.steps:
            items = [(writers[i], e) for i, e in step if i in writers]
            if items:
                self._step(items)
        self.worker.sync()

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
            self.worker.submit(self._deliver, [w], memoryview(e.data), len(e.data))
        self._end([(w, e)])

    def _begin(self, pairs) -> None:
        self.worker.submit(_call_each, [(w.begin, e) for w, e in pairs])

    def _end(self, pairs) -> None:
        self.worker.submit(_call_each, [(w.end, e) for w, e in pairs])

    def _deliver(self, writers, data, n) -> None:
        mv = memoryview(data.numpy())[:n] if isinstance(data, torch.Tensor) else data
        for w in writers:
            w.write(mv)
            if self.on_bytes:
                self.on_bytes(n)

    def _send(self, writers, buf, n) -> None:
        self.worker.submit(self._deliver, writers, buf, n, after=lambda: self.pool.put(buf))

    def _take(self) -> torch.Tensor:
        while True:
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

    def _convert(self, view: np.ndarray, src_dtype: str, buf: torch.Tensor, out_dtype, transpose=False,
                 into=None) -> int:
        t = torch.from_numpy(view)
        if src_dtype in _SOURCE_VIEW:
            t = t.view(_SOURCE_VIEW[src_dtype])
        if transpose:
            t = t.T
        rows, cols = t.shape
        if into is not None:  # a column band of an output block already laid out in buf
            into.copy_(t)
            return 0
        n = rows * cols * out_dtype.itemsize
        buf[:n].view(_TORCH_DTYPES[out_dtype]).view(rows, cols).copy_(t)
        return n

    def _read(self, nbytes: int) -> None:
        if self.on_read:
            self.on_read(nbytes)

    # -- pages of a source tensor's rows -------------------------------------------------
    def _populate(self, src, a: int, b: int) -> None:
        for path, lo, hi in src.spans(a, b):
            self.files.populate(path, lo, hi)

    def _prefetch(self, src, a: int, b: int) -> None:
        for path, lo, hi in src.spans(a, b):
            self.files.prefetch(path, lo, hi)

    def _release(self, src, a: int, b: int) -> int:
        """Drop the pages of rows [a, b); return their bytes."""
        n = 0
        for path, lo, hi in src.spans(a, b):
            self.files.release(path, lo, hi)
            n += hi - lo
        return n

    # -- readers -----------------------------------------------------------------------
    def _columns_lockstep(self, groups) -> None:
        """Row-parallel weight: read each row block once, send its column slices to their files."""
        p0 = groups[0][0][1].pieces[0]
        src = p0.src
        row_bytes = as_matrix(src.shape)[1] * src.itemsize
        rows_per_block = max(1, self.block // max(row_bytes, 1))
        for g in groups:
            self._begin(g)
        a = p0.start
        while a < p0.stop:
            b = src.block_end(a, min(p0.stop, a + rows_per_block))
            if b < p0.stop:
                self._prefetch(src, b, min(p0.stop, b + rows_per_block))
            self._populate(src, a, b)
            block = src.read(self.files, a, b, staging=self.staging)
            for g in groups:
                e = g[0][1]
                p = e.pieces[0]
                buf = self._take()
                n = self._convert(block[:, p.col0:p.col1], src.dtype, buf, e.dtype)
                self._send([w for w, _ in g], buf, n)
            del block
            self._read(self._release(src, a, b))
            a = b
        for g in groups:
            self._end(g)

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
        row = src.read(self.files, p.start, p.start + 1, 1, p.col0, p.col1, self.staging)
        row = torch.from_numpy(np.array(row))  # one row, owned
        if src.dtype in _SOURCE_VIEW:
            row = row.view(_SOURCE_VIEW[src.dtype])
        out_row = p.ncols * out_dtype.itemsize
        left = p.repeat
        per = max(1, self.block // out_row)
        while left:
            k = min(per, left)
            buf = self._take()
            n = k * out_row
            buf[:n].view(_TORCH_DTYPES[out_dtype]).view(k, p.ncols).copy_(row.expand(k, p.ncols))
            self._send(writers, buf, n)
            left -= k
        self._release(src, p.start, p.start + 1)

    def _rows(self, p, out_dtype, writers) -> None:
        """Rows ``start:stop:step`` (columns col0:col1) in blocks."""
        src = p.src
        src_rows, full_cols = as_matrix(src.shape)
        row_bytes = full_cols * src.itemsize
        out_row = p.ncols * out_dtype.itemsize
        step = p.step
        per = max(1, min(self.block // max(row_bytes * step, 1), self.block // out_row))
        total = p.src_rows
        i = 0
        while i < total:
            j = min(total, i + per)
            if step == 1:  # end the block where the source's storage does (a slice edge), so reads stay views
                j = src.block_end(p.start + i, p.start + j) - p.start
            start = p.start + i * step
            stop = p.start + (j - 1) * step + 1
            if j < total:
                nxt = p.start + min(total, j + per) * step
                self._prefetch(src, stop, min(nxt, src_rows))
            if step == 1:
                self._populate(src, start, stop)
            view = src.read(self.files, start, stop, step, p.col0, p.col1, self.staging)
            buf = self._take()
            n = self._convert(view, src.dtype, buf, out_dtype)
            del view
            self._send(writers, buf, n)
            self._release(src, start, stop)
            self._read((j - i) * p.ncols * src.itemsize)
            i = j

    def _transposed(self, p, out_dtype, writers) -> None:
        """Output rows = source columns col0:col1 over source rows start:stop.

        Each output block (a band of output rows, all output columns) is filled
        from source row sub-blocks, each read once per output block; the pages of
        a sub-block are released before the next, so memory stays within a block
        on both sides. With a block that holds the whole transposed tensor (the
        usual case), every source byte is read exactly once.
        """
        src = p.src
        full_cols = as_matrix(src.shape)[1]
        out_rows, out_cols = p.nrows, p.ncols
        out_row = out_cols * out_dtype.itemsize
        per_out = max(1, self.block // max(out_row, 1))
        per_src = max(1, self.block // max(full_cols * src.itemsize, 1))
        j = 0
        while j < out_rows:
            k = min(out_rows, j + per_out)
            buf = self._take()
            n = (k - j) * out_row
            out = buf[:n].view(_TORCH_DTYPES[out_dtype]).view(k - j, out_cols)
            a = p.start
            while a < p.stop:
                b = src.block_end(a, min(p.stop, a + per_src))
                self._populate(src, a, b)
                view = src.read(self.files, a, b, 1, p.col0 + j, p.col0 + k, self.staging)
                self._convert(view, src.dtype, buf, out_dtype, transpose=True,
                              into=out[:, a - p.start:b - p.start])
                del view
                self._release(src, a, b)
                self._read((b - a) * (k - j) * src.itemsize)
                a = b
            self._send(writers, buf, n)
            j = k


def _call_each(calls) -> None:
    for fn, arg in calls:
        fn(arg)
