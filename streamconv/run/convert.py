"""``convert``: plan from headers, then stream every pipeline stage into its files.

This is the library entry point the CLI wraps. It returns the run's summary (a
dict of figures, also written by ``--json-summary``). All refusals happen in
:func:`~streamconv.engine.plan.build_plan` and :meth:`SaveDir.check` before
anything is written; faults while writing become :class:`WriteError` with the
save directory left resumable.

The work splits in two roles, so that several processes can share it: the
*coordinator* opens the save directory and, once every file is committed,
writes the final files (:func:`convert`); a *worker* writes the files assigned
to it (:func:`write_files`). In a single process the one process is both.
"""

from __future__ import annotations

import os
import time

from ..core.background import BackgroundWorker
from ..core.errors import Interrupted, VerifyMismatch, write_error
from ..core.interrupts import InterruptGuard, checkpoint, deferred
from ..core.launch import torchrun_world
from ..core.options import ConvertOptions
from ..engine import memory
from ..engine.plan import Plan, build_plan
from .progress import Progress, plural
from .savedir import SaveDir, check_paths
from .writeback import WritebackPacer


class _Committer:
    """Makes finished files durable (fsync, rename, completion record) on a background thread.

    Waiting for the disk at the end of each pipeline stage would stall the
    stream for as long as the kernel needs to write out the stage; doing it here
    lets the next stage convert meanwhile.
    """

    def __init__(self, sd: SaveDir):
        self.sd = sd
        self.worker = BackgroundWorker("streamconv-commit")
        self.committed: list = []
        self.pending: dict = {}  # relpath -> fd submitted, not yet committed

    def _commit(self, f, fd, record) -> None:
        try:
            self.sd.commit(f.relpath, fd, record)
        except OSError as e:
            raise write_error(e, self.sd.temp_path(f.relpath)) from None
        self.pending.pop(f.relpath, None)
        self.committed.append(f.relpath)

    def submit(self, f, fd, record) -> None:
        self.pending[f.relpath] = fd
        self.worker.submit(self._commit, f, fd, record)

    def drain(self) -> None:
        self.worker.stop()
        err = self.worker.take_error()
        if err is not None:
            raise err

    def abandon(self) -> list:
        """Stop after the file being committed; return the fds never committed."""
        self.worker.stop(cancel=True)
        return list(self.pending.values())


def write_files(plan: Plan, sd: SaveDir, progress: Progress, mine=None) -> list:
    """Write every file of ``plan`` that is not finished (and, with ``mine``, is in it); return their paths.

    On any failure every temporary file this call may have started is removed;
    committed files stay (``--resume`` keeps them).
    """
    with deferred():  # interrupts are taken once per block, where no thread hand-over is half done
        return _write_files(plan, sd, progress, mine)


def _write_files(plan: Plan, sd: SaveDir, progress: Progress, mine=None) -> list:
    from ..engine.stream import Streamer  # imports torch

    fmt = plan.format
    todo_files = [f for f in plan.files if f.relpath not in sd.done and (mine is None or f.relpath in mine)]
    progress.start(sum(f.data_bytes for f in todo_files))
    streamer = Streamer(plan.block_bytes, on_bytes=progress.update, on_read=progress.read,
                        expect=plan.input_identity())
    committer = _Committer(sd)
    current: list = []
    finished = False
    try:
        for group in plan.groups:
            checkpoint()
            todo = {i: f for i, f in enumerate(group.files)
                    if f.relpath not in sd.done and (mine is None or f.relpath in mine)}
            if not todo:
                continue
            progress.stage(group, list(todo.values()))
            current = []
            writers = {}
            for i, f in todo.items():
                path = sd.temp_path(f.relpath)
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    current.append((f, fd))
                    writers[i] = fmt.open_writer(f, fd, on_write=WritebackPacer(fd).advance)
                except OSError as e:
                    raise write_error(e, path) from None
            try:
                streamer.run_group(group, writers)
                for i, f in todo.items():
                    record = writers[i].finish()
                    committer.submit(f, current[0][1], record)
                    current.pop(0)
            except OSError as e:
                f = current[0][0] if current else None
                raise write_error(e, sd.temp_path(f.relpath) if f else plan.options.save_dir) from None
        committer.drain()
        finished = True
    finally:
        leftovers = [fd for _, fd in current]
        if not finished:
            leftovers += committer.abandon()
        for fd in leftovers:
            try:
                os.close(fd)
            except OSError:
                pass
        if not finished:
            # Every temporary file of this call goes, including one whose creation an
            # interrupt cut short before it was tracked; committed files stay.
            for f in todo_files:
                if f.relpath not in sd.done:
                    sd.discard_temp(f.relpath)
        streamer.close(cancel=not finished)
        progress.close()
    return list(committer.committed)


def execute(plan: Plan, progress: Progress, sd: SaveDir | None = None) -> dict:
    """Coordinator and only worker: write every file of ``plan`` not already finished; return the figures."""
    t0 = time.monotonic()
    sd = sd or SaveDir.for_plan(plan)
    finished = False
    try:
        sd.open()
        for n in sd.notes:
            progress.note(n)
        kept = list(sd.kept)
        written = write_files(plan, sd, progress)
        sd.finish(plan.final_files)
        finished = True
    except KeyboardInterrupt:
        raise Interrupted(_interrupted_message(plan, sd, finished)) from None
    finally:
        sd.unlock()
    return run_summary(plan, time.monotonic() - t0, progress.bytes_read, written, kept, plan.notes + sd.notes)


def run_summary(plan: Plan, wall: float, read_bytes: int, written: list, kept: list, notes: list, **extra) -> dict:
    """The figures of a run, as printed and as ``--json-summary`` writes them (``extra`` adds or replaces keys)."""
    done = set(written)
    out = {
        "wall_seconds": round(wall, 3),
        "read_bytes": read_bytes,
        "written_bytes": sum(f.size for f in plan.files if f.relpath in done),
        "input_bytes": plan.source.total_bytes,
        "output_bytes": plan.write_bytes,
        "read_gb_per_s": round(read_bytes / wall / 1e9, 3) if wall else None,
        "peak_rss_bytes": memory.peak_rss(),
        "budget_bytes": plan.budget,
        "predicted_peak_bytes": plan.predicted_peak,
        "block_bytes": plan.block_bytes,
        "files_written": written,
        "files_kept": kept,
        "save_dir": plan.options.save_dir,
        "notes": notes,
    }
    out.update(extra)
    return out


def _interrupted_message(plan: Plan, sd: SaveDir, finished: bool) -> str:
    save = plan.options.save_dir
    if finished:
        return f"interrupted after the conversion completed; {save} holds the complete checkpoint"
    # counted from the completion records on disk: exactly the files --resume will check and keep
    done = [rel for rel in sd.read_done() if rel in sd.files and os.path.isfile(os.path.join(save, rel))]
    n = len(plan.files)
    return (f"interrupted; {len(done)} of {n} {_files(n)} finished in {save}; rerun the same command with "
            "--resume to finish")


def _files(n: int) -> str:
    return "rank file is" if n == 1 else "rank files are"


def _nothing_to_do(plan: Plan, t0: float) -> dict:
    """The summary of a run whose save directory already holds exactly this conversion."""
    return run_summary(plan, time.monotonic() - t0, 0, [], [f.relpath for f in plan.files], plan.notes,
                   read_gb_per_s=None, nothing_to_do=True)


def convert(options: ConvertOptions, progress: Progress | None = None) -> dict:
    """Convert ``options.load_dir`` into a Megatron-LM checkpoint in ``options.save_dir``.

    Returns the summary dict. Raises :class:`~streamconv.core.errors.StreamconvError`
    subclasses with one-line messages on bad input, flags, paths or write faults.
    """
    from .distributed import convert_distributed

    progress = progress or Progress(silent=True)
    world = torchrun_world()
    if world is not None:  # started by torchrun: one worker of several
        rank, size = world
        if rank != 0:
            progress.quiet = True  # the coordinator speaks for the job
        with InterruptGuard():
            summary = convert_distributed(options, progress, rank, size)
        if rank == 0:
            progress.done(summary)
        return summary
    t0 = time.monotonic()
    with InterruptGuard():
        try:
            check_paths(options.load_dir, options.save_dir, options.overwrite, options.resume)
            from ..sources import prefetch

            plan = build_plan(options, on_source=prefetch.start)
            sd = SaveDir.for_plan(plan)
            a = sd.check(paths_checked=True)  # every refusal (and the free space), before anything is announced
            progress.announce(plan)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted before anything was written to {options.save_dir}") from None
        if a.action == "nothing":
            summary = _nothing_to_do(plan, t0)
        else:
            summary = execute(plan, progress, sd)
        progress.done(summary)
        if options.verify:
            from .verify import verify_plan

            try:
                report = verify_plan(plan, progress=progress)
            except KeyboardInterrupt:
                raise Interrupted(f"interrupted while verifying; the conversion in {options.save_dir} is "
                                  "complete (run 'streamconv verify' to check it)") from None
            summary["verify"] = report.as_dict()
            progress.verified(report)
            if not report.ok:
                where, what = report.problems[0]
                raise VerifyMismatch(
                    f"{options.save_dir} does not match a conversion of {options.load_dir}: "
                    f"{plural(len(report.problems), 'problem')} (listed above; the first: {where}: {what})"
                )
    summary["peak_rss_bytes"] = memory.peak_rss()
    return summary
