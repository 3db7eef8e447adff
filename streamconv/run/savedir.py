"""The save directory as a transaction: complete, or clearly not, and resumable — with several writers.

While a run is in progress the save directory holds a bookkeeping directory,
:data:`BOOKKEEPING`:

* ``run.json`` — the run's identity (flags, input files with sizes and times,
  every planned file with its size), written by the *coordinator* when it opens
  the directory;
* ``lock`` — held (``flock``) by the coordinator for the whole run, so that a
  second, unrelated run into the same directory is refused instead of
  interleaving with this one;
* ``done/<id>.json`` — one completion record per finished file, written by
  whichever *worker* finished it (a worker never rewrites a shared file, so any
  number of workers can commit independently).

Data files are written as ``<name>`` + :data:`TEMP_SUFFIX` and renamed into
place only once complete and fsynced; a worker cleans up only its own temp
files. The format's final files (the tracker ``latest_checkpointed_iteration.txt``
last) are written by the coordinator after every data file is committed, and
only then is the bookkeeping removed. So:

* a run killed at any moment never leaves a tracker, and a directory with
  bookkeeping is recognisably partial;
* ``--resume`` checks ``run.json`` against the current flags and input, keeps
  finished files whose records still check out, and redoes the rest;
* after success only Megatron's layout remains.

Nothing that streamconv did not write is ever deleted.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket

from ..core.errors import PathError, WriteError
from ..megatron.files import ITERATION_DIR, TRACKER

BOOKKEEPING = ".streamconv"
RUN_FILE = "run.json"
LOCK_FILE = "lock"
DONE_DIR = "done"
TEMP_SUFFIX = ".streamconv-partial"


def _is_within(child: str, parent: str) -> bool:
    child, parent = os.path.realpath(child), os.path.realpath(parent)
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: str, data: bytes) -> None:
    tmp = path + TEMP_SUFFIX
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        mv = memoryview(data)
        while mv:
            mv = mv[os.write(fd, mv):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def _layout_dir(rel: str) -> bool:
    return rel in (".", ITERATION_DIR, BOOKKEEPING, os.path.join(BOOKKEEPING, DONE_DIR)) or \
        rel.startswith(ITERATION_DIR + os.sep)


def only_streamconv_leftovers(save_dir: str) -> bool:
    """True if ``save_dir`` holds nothing but what a run killed before writing ``run.json`` leaves.

    That is: streamconv temporary files, an empty bookkeeping directory and empty
    directories of the checkpoint layout. Such a directory is treated as a
    partial run that was interrupted at its very start.
    """
    for d, dirs, files in os.walk(save_dir):
        rel = os.path.relpath(d, save_dir)
        if not _layout_dir(rel):
            return False
        if any(not f.endswith(TEMP_SUFFIX) for f in files):
            return False
    return True


def is_partial(save_dir: str) -> bool:
    """A directory that holds an unfinished streamconv run (bookkeeping, or only its leftovers)."""
    return os.path.exists(os.path.join(save_dir, BOOKKEEPING, RUN_FILE)) or only_streamconv_leftovers(save_dir)


def refuse_if_locked(save_dir: str) -> None:
    """Refuse a save directory that another live streamconv run holds (its coordinator's ``flock``)."""
    path = os.path.join(save_dir, BOOKKEEPING, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # no lock file: no run, or one that finished
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        try:
            with open(path, encoding="utf-8") as f:
                who = json.loads(f.read() or "{}")
        except (OSError, ValueError):
            who = {}
        raise PathError(
            f"--save-dir {save_dir} is being written by another streamconv run "
            f"(pid {who.get('pid', '?')} on {who.get('host', '?')}); wait for it to end or choose another directory"
        ) from None
    finally:
        os.close(fd)


def check_paths(load_dir: str, save_dir: str | None, overwrite: bool = False, resume: bool = False) -> None:
    """Refuse unusable load/save paths before anything is read or written."""
    if not os.path.exists(load_dir):
        raise PathError(f"--load-dir {load_dir} does not exist; give the checkpoint file or directory")
    if not save_dir:
        raise PathError("--save-dir is required: the directory to write the Megatron checkpoint to")
    src_dir = load_dir if os.path.isdir(load_dir) else os.path.dirname(os.path.abspath(load_dir))
    if _is_within(save_dir, src_dir):
        raise PathError(
            f"--save-dir {save_dir} is inside --load-dir {load_dir}; choose a save directory outside the input "
            "(the input is never modified)"
        )
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise PathError(f"--save-dir {save_dir} exists and is not a directory")
    parent = os.path.dirname(os.path.abspath(save_dir))
    probe = save_dir if os.path.isdir(save_dir) else parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PathError(f"--save-dir {save_dir}: {probe} is not writable")
    if os.path.isdir(save_dir):
        refuse_if_locked(save_dir)
    if os.path.isdir(save_dir) and os.listdir(save_dir) and not overwrite:
        if not is_partial(save_dir):
            if resume:
                raise PathError(
                    f"--save-dir {save_dir} holds no partial streamconv run to resume (no {BOOKKEEPING}/{RUN_FILE}); "
                    "choose an empty directory, or --overwrite to write over it"
                )
            raise PathError(
                f"--save-dir {save_dir} is not empty and is not a partial streamconv output; choose an empty "
                "directory, or add --overwrite to replace the checkpoint files in it"
            )
        if not resume:
            raise PathError(
                f"--save-dir {save_dir} holds an interrupted streamconv run; add --resume to finish it "
                "(or --overwrite to start over)"
            )


def _done_name(rel: str) -> str:
    return hashlib.sha1(rel.encode()).hexdigest()[:20] + ".json"


class SaveDir:
    """One run's view of the save directory (see the module docstring).

    ``fingerprint``: the run's identity (``Plan.fingerprint()``); ``files``: relpath ->
    planned file; ``intact(path, file, record)``: the format's check of a finished file.
    The coordinator calls :meth:`check`, :meth:`open` and, after every worker has
    committed, :meth:`finish`; every worker (the coordinator included) calls
    :meth:`temp_path`, :meth:`commit` and :meth:`discard_temp` for its own files.
    """

    def __init__(self, root: str, fingerprint: dict, files: dict, intact, options):
        self.root = root
        self.fp = fingerprint
        self.files = files
        self.intact = intact
        self.options = options
        self.book = os.path.join(root, BOOKKEEPING)
        self.run_path = os.path.join(self.book, RUN_FILE)
        self.done_dir = os.path.join(self.book, DONE_DIR)
        self.done: dict = {}  # relpath -> record, of files finished and kept
        self.kept: list = []
        self.notes: list = []
        self.checked = False
        self._lock_fd = None

    @classmethod
    def for_plan(cls, plan) -> "SaveDir":
        files = {f.relpath: f for f in plan.files}
        return cls(plan.options.save_dir, plan.fingerprint(), files, plan.format.intact, plan.options)

    # -- coordinator: opening --------------------------------------------------------
    def check(self, paths_checked: bool = False) -> None:
        """Every refusal :meth:`open` could make, without writing anything."""
        o = self.options
        if not paths_checked:
            check_paths(o.load_dir, self.root, o.overwrite, o.resume)
        refuse_if_locked(self.root)
        if os.path.exists(self.run_path) and o.resume and not o.overwrite:
            self._check_same_run(self._read_run())
        self.checked = True

    def open(self) -> None:
        """Take the lock and prepare fresh / resume / overwrite after :meth:`check`."""
        if not self.checked:
            self.check()
        o = self.options
        previous = None
        if os.path.exists(self.run_path):
            try:
                previous = self._read_run()
            except PathError:
                if not o.overwrite:
                    raise
        os.makedirs(self.done_dir, exist_ok=True)
        self._lock()
        if previous is None and os.path.isdir(self.root) and only_streamconv_leftovers(self.root):
            self._clean_temps(everywhere=True)  # killed before its run.json
        if o.resume and previous is None:
            self.notes.append(f"--resume: nothing to resume in {self.root}; converting from the start")
        self._clean_temps(everywhere=previous is not None)
        if previous is not None and o.resume and not o.overwrite:
            self._keep_intact()
        else:
            self._forget_done()
        if o.overwrite:
            tracker = os.path.join(self.root, TRACKER)
            if os.path.exists(tracker):
                # The old checkpoint is being replaced: it must not look complete meanwhile.
                os.remove(tracker)
                self.notes.append(f"--overwrite: removed the old {TRACKER} first; it is rewritten at the end")
        write_file_atomic(self.run_path, json.dumps({"streamconv": 2, "fingerprint": self.fp}, indent=1,
                                                    default=str).encode())

    def _lock_info(self) -> str:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname()})

    def _lock(self) -> None:
        path = os.path.join(self.book, LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            refuse_if_locked(self.root)
            raise PathError(f"--save-dir {self.root} is being written by another streamconv run") from None
        os.ftruncate(fd, 0)
        os.write(fd, self._lock_info().encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _read_run(self) -> dict:
        try:
            with open(self.run_path, "r", encoding="utf-8") as f:
                m = json.load(f)
            if not isinstance(m, dict) or "fingerprint" not in m:
                raise ValueError("not a streamconv run record")
            return m
        except (OSError, ValueError) as e:
            raise PathError(f"{self.run_path}: unreadable ({e}); --overwrite starts over") from None

    def _check_same_run(self, run: dict) -> None:
        old, fp = run["fingerprint"], self.fp
        if old.get("options") != fp["options"]:
            diff = sorted(k for k in set(old.get("options", {})) | set(fp["options"])
                          if old.get("options", {}).get(k) != fp["options"].get(k))
            raise PathError(
                f"--resume: the interrupted run in {self.root} used different flags ({', '.join(diff)}); "
                "rerun with the same flags, or --overwrite to start over"
            )
        if old.get("input") != fp["input"]:
            raise PathError(
                f"--resume: the input files changed since the interrupted run in {self.root} "
                "(size, time or file list); --overwrite to start over"
            )

    def read_done(self) -> dict:
        """relpath -> completion record of every file some worker committed."""
        out = {}
        try:
            names = sorted(os.listdir(self.done_dir))
        except OSError:
            return out
        for n in names:
            if not n.endswith(".json"):
                continue
            try:
                with open(os.path.join(self.done_dir, n), "r", encoding="utf-8") as f:
                    rec = json.load(f)
                out[rec["file"]] = rec["record"]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a record cut short by a kill: that file is redone
        return out

    def _keep_intact(self) -> None:
        for rel, rec in self.read_done().items():
            path = os.path.join(self.root, rel)
            f = self.files.get(rel)
            if f is not None and self.intact(path, f, rec):
                self.done[rel] = rec
                self.kept.append(rel)
            else:
                self.notes.append(f"--resume: {rel} is damaged or missing; rewriting it")
                self._remove_record(rel)

    def _forget_done(self) -> None:
        for n in os.listdir(self.done_dir):
            os.remove(os.path.join(self.done_dir, n))

    def _remove_record(self, rel: str) -> None:
        try:
            os.remove(os.path.join(self.done_dir, _done_name(rel)))
        except OSError:
            pass

    def _clean_temps(self, everywhere: bool) -> None:
        """Remove temp files of the planned files (``everywhere``: every streamconv temp file in the dir)."""
        if everywhere:
            for d, _, names in os.walk(self.root):
                for n in names:
                    if n.endswith(TEMP_SUFFIX):
                        os.remove(os.path.join(d, n))
            return
        for rel in self.files:
            self.discard_temp(rel)

    # -- workers -------------------------------------------------------------------
    def temp_path(self, rel: str) -> str:
        path = os.path.join(self.root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path + TEMP_SUFFIX

    def commit(self, rel: str, fd: int, record: dict) -> None:
        """fsync the finished temp file, rename it into place, write its completion record."""
        os.fsync(fd)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # written data need not stay cached
        except (AttributeError, OSError):  # pragma: no cover
            pass
        os.close(fd)
        path = os.path.join(self.root, rel)
        os.replace(path + TEMP_SUFFIX, path)
        fsync_dir(os.path.dirname(path))
        write_file_atomic(os.path.join(self.done_dir, _done_name(rel)),
                          json.dumps({"file": rel, "record": record}).encode())
        self.done[rel] = record

    def discard_temp(self, rel: str) -> None:
        tmp = os.path.join(self.root, rel) + TEMP_SUFFIX
        try:
            os.remove(tmp)
        except OSError:
            pass

    # -- coordinator: finishing -------------------------------------------------------
    def finish(self, final_files: list) -> None:
        """Every data file is in place: write the final files (the tracker last), then drop the bookkeeping."""
        done = self.read_done()
        missing = [rel for rel in self.files if rel not in done]
        if missing:  # pragma: no cover - guarded by the caller
            raise WriteError(f"cannot finish: {missing[0]} was not written")
        it = os.path.join(self.root, ITERATION_DIR)
        if os.path.isdir(it):
            fsync_dir(it)
        for rel, data in final_files:
            path = os.path.join(self.root, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_file_atomic(path, data)
        shutil.rmtree(self.book)
        self.unlock()
        fsync_dir(self.root)
