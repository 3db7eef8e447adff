"""The stream: source rows -> BF16 blocks -> rank files, one block at a time.

For one PP stage, all of its TP rank files are open together and advance key by
key in lockstep, so the source is read front to back once: a row-parallel
weight (linear_proj, linear_fc2) is read one row block at a time and each
block's column slices go to every rank; any other tensor is read rank by rank,
piece by piece (see :mod:`streamconv.mapping`). The calling thread maps and
converts (``Tensor.copy_`` does the round-to-nearest-even BF16 cast and drops
the GIL); a worker thread hands the filled buffers to the sinks (CRC + write,
or compare for ``verify``), which also drop the GIL. A fixed pool of
:data:`~streamconv.memory.OUTPUT_BUFFERS` buffers bounds memory; after each
block its source pages are released from the process.
"""

from __future__ import annotations

import queue
import threading

import numpy as np
import torch

from . import memory
from .lazy import MappedFiles, byte_span, read_rows, row_geometry

_STOP = object()


class Sink:
    """Receives one rank file's storages in order (subclassed by the writer and by verify)."""

    def begin(self, entry) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def data(self, mv: memoryview) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def end(self, entry) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class _Worker:
    """Runs sink calls in order on its own thread; remembers the first error."""

    def __init__(self, pool: queue.Queue, on_bytes):
        self.q: queue.Queue = queue.Queue(maxsize=memory.OUTPUT_BUFFERS)
        self.pool = pool
        self.on_bytes = on_bytes
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="streamconv-writer", daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            item = self.q.get()
            if item is _STOP:
                return
            op, sink, arg, buf, n = item
            try:
                if self.error is None:
                    if op == "begin":
                        sink.begin(arg)
                    elif op == "data":
                        mv = memoryview(buf.numpy())[:n] if isinstance(buf, torch.Tensor) else memoryview(buf)
                        sink.data(mv)
                        if self.on_bytes:
                            self.on_bytes(n)
                    elif op == "end":
                        sink.end(arg)
                    elif op == "sync":
                        arg.set()
            except BaseException as e:  # noqa: BLE001 - handed to the converter thread
                self.error = e
            finally:
                if op == "sync" and self.error is not None:
                    arg.set()
                if isinstance(buf, torch.Tensor):
                    self.pool.put(buf)

    def put(self, item):
        if self.error is not None:
            raise self.error
        self.q.put(item)

    def sync(self):
        ev = threading.Event()
        self.q.put(("sync", None, ev, None, 0))
        ev.wait()
        if self.error is not None:
            raise self.error

    def stop(self):
        self.q.put(_STOP)
        self.thread.join()


class Streamer:
    """Executes stages of a plan into per-rank sinks with a bounded set of buffers."""

    def __init__(self, block_bytes: int, on_bytes=None, on_read=None):
        self.block = int(block_bytes)
        self.files = MappedFiles()
        self.pool: queue.Queue = queue.Queue()
        for _ in range(memory.OUTPUT_BUFFERS):
            self.pool.put(torch.empty(self.block, dtype=torch.uint8))
        self.staging = np.empty(self.block, dtype=np.uint8)
        self.worker = _Worker(self.pool, on_bytes)
        self.on_read = on_read
        torch.set_num_threads(1)  # one converter thread; the other core writes

    def close(self):
        self.worker.stop()
        try:
            self.files.close()
        except BufferError:  # a view still alive; the mapping closes with the process
            pass

    # -- entry points -----------------------------------------------------------
    def run_stage(self, rank_files: list, sinks: list) -> None:
        """Stream every storage of ``rank_files`` (same key list) into ``sinks`` (one per rank)."""
        n_entries = len(rank_files[0].entries)
        for k in range(n_entries):
            ents = [rf.entries[k] for rf in rank_files]
            kind = ents[0].kind
            if kind == "none":
                continue
            if kind == "bytes":
                for e, s in zip(ents, sinks):
                    self.worker.put(("begin", s, e, None, 0))
                    if e.data:
                        self.worker.put(("data", s, None, e.data, len(e.data)))
                    self.worker.put(("end", s, e, None, 0))
                continue
            if self._lockstep(ents):
                self._columns_lockstep(ents, sinks)
            else:
                for e, s in zip(ents, sinks):
                    self.worker.put(("begin", s, e, None, 0))
                    for p in e.pieces:
                        self._piece(p, s)
                    self.worker.put(("end", s, e, None, 0))
        self.worker.sync()

    # -- helpers -------------------------------------------------------------------
    def _take(self) -> torch.Tensor:
        while True:
            try:
                return self.pool.get(timeout=0.5)
            except queue.Empty:
                if self.worker.error is not None:
                    raise self.worker.error

    @staticmethod
    def _lockstep(ents) -> bool:
        if len(ents) < 2 or any(len(e.pieces) != 1 for e in ents):
            return False
        p0 = ents[0].pieces[0]
        return all(
            e.pieces[0].src is p0.src and e.pieces[0].start == p0.start and e.pieces[0].stop == p0.stop
            and e.pieces[0].step == 1 and e.pieces[0].repeat == 1 and p0.step == 1
            for e in ents
        ) and len({e.pieces[0].col0 for e in ents}) == len(ents)

    def _convert(self, view: np.ndarray, src_dtype: str, buf: torch.Tensor) -> int:
        rows, cols = view.shape
        n = rows * cols * 2
        out = buf[:n].view(torch.bfloat16).view(rows, cols)
        t = torch.from_numpy(view)
        if src_dtype == "BF16":
            t = t.view(torch.bfloat16)
        out.copy_(t)
        return n

    def _columns_lockstep(self, ents, sinks) -> None:
        """Row-parallel weight: read each row block once, send its column slice to every rank."""
        p0 = ents[0].pieces[0]
        info, path = p0.src.info, p0.src.path
        _, full_cols = row_geometry(info)
        row_bytes = full_cols * info.itemsize
        rows_per_block = max(1, self.block // max(row_bytes, 1))
        for e, s in zip(ents, sinks):
            self.worker.put(("begin", s, e, None, 0))
        a = p0.start
        while a < p0.stop:
            b = min(p0.stop, a + rows_per_block)
            if b < p0.stop:
                self.files.prefetch(path, *byte_span(info, b, min(p0.stop, b + rows_per_block)))
            self.files.populate(path, *byte_span(info, a, b))
            block = read_rows(self.files, path, info, a, b, staging=self.staging)
            for e, s in zip(ents, sinks):
                p = e.pieces[0]
                buf = self._take()
                n = self._convert(block[:, p.col0:p.col1], info.dtype, buf)
                self.worker.put(("data", s, None, buf, n))
            del block
            lo, hi = byte_span(info, a, b)
            self.files.release(path, lo, hi)
            if self.on_read:
                self.on_read(hi - lo)
            a = b
        for e, s in zip(ents, sinks):
            self.worker.put(("end", s, e, None, 0))

    def _piece(self, p, sink) -> None:
        info, path = p.src.info, p.src.path
        _, full_cols = row_geometry(info)
        row_bytes = full_cols * info.itemsize
        out_row = p.ncols * 2
        if p.repeat > 1:
            row = read_rows(self.files, path, info, p.start, p.start + 1, 1, p.col0, p.col1, self.staging)
            row = torch.from_numpy(np.array(row))  # one row, owned
            if info.dtype == "BF16":
                row = row.view(torch.bfloat16)
            left = p.repeat
            per = max(1, self.block // out_row)
            while left:
                k = min(per, left)
                buf = self._take()
                n = k * out_row
                buf[:n].view(torch.bfloat16).view(k, p.ncols).copy_(row.expand(k, p.ncols))
                self.worker.put(("data", sink, None, buf, n))
                left -= k
            lo, hi = byte_span(info, p.start, p.start + 1)
            self.files.release(path, lo, hi)
            return
        step = p.step
        per = max(1, min(self.block // max(row_bytes * step, 1), self.block // out_row))
        total = p.src_rows
        i = 0
        while i < total:
            j = min(total, i + per)
            start = p.start + i * step
            stop = p.start + (j - 1) * step + 1
            if j < total:
                nxt = p.start + min(total, j + per) * step
                self.files.prefetch(path, *byte_span(info, stop, min(nxt, info.shape[0] if info.shape else 1)))
            if step == 1:
                self.files.populate(path, *byte_span(info, start, stop))
            view = read_rows(self.files, path, info, start, stop, step, p.col0, p.col1, self.staging)
            buf = self._take()
            n = self._convert(view, info.dtype, buf)
            del view
            self.worker.put(("data", sink, None, buf, n))
            lo, hi = byte_span(info, start, stop)
            self.files.release(path, lo, hi)
            if self.on_read:
                self.on_read((j - i) * p.ncols * info.itemsize)
            i = j
