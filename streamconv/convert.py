"""``convert``: plan from headers, then stream every PP stage into its rank files.

This is the library entry point the CLI wraps. It returns the run's summary (a
dict of figures, also written by ``--json-summary``). All refusals happen in
:func:`~streamconv.plan.build_plan` and :meth:`SaveDir.open` before anything
is written; faults while writing become :class:`WriteError` with the save
directory left resumable.
"""

from __future__ import annotations

import errno
import os
import signal
import time

from . import memory
from .errors import Interrupted, StreamconvError, WriteError
from .options import ConvertOptions
from .plan import ARCHIVE_PREFIX, Plan, build_plan
from .progress import Progress
from .savedir import SaveDir, check_paths
from .torchzip import TorchZipWriter
from .writeback import WritebackPacer


class _WriterSink:
    """Stream sink that appends each storage to a rank file's zip writer."""

    def __init__(self, writer: TorchZipWriter):
        self.w = writer

    def begin(self, entry):
        self.w.begin_storage(entry.nbytes)

    def data(self, mv):
        self.w.write(mv)

    def end(self, entry):
        self.w.end_storage()


def _write_error(e: OSError, path: str) -> WriteError:
    if e.errno == errno.ENOSPC:
        what = "the disk is full"
        todo = "free space"
    elif e.errno == errno.EFBIG:
        what = "the file-size limit was reached (ulimit -f)"
        todo = "raise the limit"
    elif e.errno == errno.EDQUOT:
        what = "the disk quota is exhausted"
        todo = "free quota"
    else:
        what = e.strerror or str(e)
        todo = "fix the cause"
    return WriteError(
        f"writing {path} failed: {what}; {todo} and rerun the same command with --resume "
        "(finished rank files are kept)"
    )


class _Signals:
    """SIGTERM behaves like Ctrl-C; SIGXFSZ must not kill us (the write then fails with EFBIG)."""

    def __enter__(self):
        self.old = {}
        for sig, handler in ((signal.SIGTERM, self._term), (signal.SIGXFSZ, signal.SIG_IGN)):
            try:
                self.old[sig] = signal.signal(sig, handler)
            except (ValueError, OSError):  # not the main thread
                pass
        return self

    @staticmethod
    def _term(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        for sig, h in self.old.items():
            signal.signal(sig, h)
        return False


class _Committer:
    """Makes finished rank files durable (fsync, rename, manifest) on a background thread.

    Waiting for the disk at the end of each PP stage would stall the stream for
    as long as the kernel needs to write out the stage; doing it here lets the
    next stage convert meanwhile. Order is kept, and the tracker is only written
    after :meth:`drain`.
    """

    def __init__(self, sd: SaveDir):
        import queue
        import threading

        self.sd = sd
        self.q: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.abort = False
        self.committed: list = []
        self.pending: list = []  # (rf, fd) submitted, not yet committed
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="streamconv-commit", daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            rf, fd, records = item
            if self.error is None and not self.abort:
                try:
                    self.sd.commit_file(rf.relpath, records, fd)
                    with self.lock:
                        self.committed.append(rf.relpath)
                        self.pending = [p for p in self.pending if p[0] is not rf]
                except OSError as e:
                    self.error = _write_error(e, self.sd.temp_path(rf.relpath))
                except BaseException as e:  # noqa: BLE001 - reported by check()
                    self.error = e

    def submit(self, rf, fd, records) -> None:
        self.check()
        with self.lock:
            self.pending.append((rf, fd))
        self.q.put((rf, fd, records))

    def check(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise err

    def drain(self) -> None:
        self.q.put(None)
        self.thread.join()
        self.check()

    def abandon(self) -> list:
        """Stop after the file being committed; return the (rf, fd) never committed."""
        self.abort = True
        self.q.put(None)
        self.thread.join()
        return list(self.pending)


def execute(plan: Plan, progress: Progress, sd: SaveDir | None = None) -> dict:
    """Write every rank file of ``plan`` not already finished; return the figures."""
    from .stream import Streamer  # imports torch

    t0 = time.monotonic()
    sd = sd or SaveDir(plan)
    try:
        sd.open()
    except OSError as e:
        raise _write_error(e, os.path.join(plan.options.save_dir, ".streamconv-partial.json")) from None
    for n in sd.notes:
        progress.note(n)
    written, kept = [], list(sd.kept)
    todo_bytes = sum(f.data_bytes for f in plan.files if f.relpath not in sd.done)
    progress.start(todo_bytes)
    streamer = Streamer(plan.block_bytes, on_bytes=progress.update, on_read=progress.read)
    committer = _Committer(sd)
    current: list = []
    finished = False
    try:
        for stage in plan.stages:
            todo = [f for f in stage.files if f.relpath not in sd.done]
            if not todo:
                continue
            progress.stage(stage, todo)
            current = []
            for rf in todo:
                path = sd.temp_path(rf.relpath)
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    w = TorchZipWriter(fd, ARCHIVE_PREFIX, rf.pickle, on_write=WritebackPacer(fd).advance)
                except OSError as e:
                    raise _write_error(e, path) from None
                current.append((rf, fd, w))
            try:
                streamer.run_stage([c[0] for c in current], [_WriterSink(c[2]) for c in current])
                while current:
                    rf, fd, w = current[0]
                    records = w.finish(rf.serialization_id)
                    if w.offset != rf.size:  # pragma: no cover - planner/writer disagreement is a bug
                        raise AssertionError(f"{rf.relpath}: wrote {w.offset} bytes, planned {rf.size}")
                    committer.submit(rf, fd, records)
                    current.pop(0)
            except OSError as e:
                rf = next((c[0] for c in current), None)
                where = sd.temp_path(rf.relpath) if rf else plan.options.save_dir
                raise _write_error(e, where) from None
        try:
            committer.drain()
            written = list(committer.committed)
            sd.finish()
            finished = True
        except OSError as e:
            raise _write_error(e, plan.options.save_dir) from None
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted; {len(committer.committed) + len(kept)} of {len(plan.files)} rank files are finished in "
            f"{plan.options.save_dir}; rerun the same command with --resume to finish"
        ) from None
    finally:
        leftovers = [(rf, fd) for rf, fd, _ in current]
        if not finished:
            leftovers += committer.abandon()
        for rf, fd in leftovers:
            try:
                os.close(fd)
            except OSError:
                pass
        if not finished:
            # Every temporary file of this run goes, including one whose creation an
            # interrupt cut short before it was tracked; finished rank files stay.
            for rf in plan.files:
                sd.discard_temp(rf.relpath)
        streamer.close()
        progress.close()
    wall = time.monotonic() - t0
    return {
        "wall_seconds": round(wall, 3),
        "read_bytes": progress.bytes_read,
        "written_bytes": sum(f.size for f in plan.files if f.relpath in written),
        "input_bytes": plan.source.total_bytes,
        "output_bytes": plan.write_bytes,
        "read_gb_per_s": round(progress.bytes_read / wall / 1e9, 3) if wall else None,
        "peak_rss_bytes": memory.peak_rss(),
        "budget_bytes": plan.budget,
        "predicted_peak_bytes": plan.predicted_peak,
        "block_bytes": plan.block_bytes,
        "files_written": written,
        "files_kept": kept,
        "save_dir": plan.options.save_dir,
        "notes": plan.notes + sd.notes,
    }


def convert(options: ConvertOptions, progress: Progress | None = None) -> dict:
    """Convert ``options.load_dir`` into a Megatron-LM checkpoint in ``options.save_dir``.

    Returns the summary dict. Raises :class:`~streamconv.errors.StreamconvError`
    subclasses with one-line messages on bad input, flags, paths or write faults.
    """
    progress = progress or Progress(quiet=True)
    with _Signals():
        check_paths(options.load_dir, options.save_dir, options.overwrite, options.resume)
        from . import prefetch

        plan = build_plan(options, on_source=prefetch.start)
        sd = SaveDir(plan)
        sd.check(paths_checked=True)  # resume refusals, before anything is announced
        progress.announce(plan)
        summary = execute(plan, progress, sd)
        if options.verify:
            from .verify import verify_plan

            report = verify_plan(plan, progress=progress)
            summary["verify"] = report.as_dict()
            if not report.ok:
                raise StreamconvError(
                    f"verify found {len(report.problems)} problem(s) in {options.save_dir} right after converting; "
                    "this is a streamconv bug, please report it"
                )
    summary["peak_rss_bytes"] = memory.peak_rss()
    progress.done(summary)
    return summary

