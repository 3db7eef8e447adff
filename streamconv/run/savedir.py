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

Before anything is written, :func:`assess` decides what a run would do with the
directory, from the plan: write into an empty one; resume a partial run (which
finished files still check out); do nothing when it already holds exactly this
conversion (every planned file's size, structure and CRCs, and the final
files); with ``--overwrite``, which files of an earlier conversion the new one
does not replace and will remove (only files a format recognises by content as
its own); or refuse, saying why and naming the flag that would proceed. It also
checks that the filesystem has room for the bytes still to write. ``plan``
prints the same assessment.

Nothing that streamconv did not write is ever deleted.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
from dataclasses import dataclass, field

from ..core.errors import PathError, WriteError, write_error
from ..core.interrupts import deferred
from ..core.sizes import human
from ..formats import all_own_files
from ..megatron.files import ITERATION_DIR, TRACKER
from .progress import plural

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
    """Refuse unusable load/save paths before anything is read (what the directory holds is :func:`assess`'s)."""
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


def _done_name(rel: str) -> str:
    return hashlib.sha1(rel.encode()).hexdigest()[:20] + ".json"


#: free space kept in reserve beyond the bytes to write (filesystem metadata, rounding)
SPACE_MARGIN = 16 * 2**20


def space_margin(nbytes: int) -> int:
    return SPACE_MARGIN + nbytes // 1000


def free_space(path: str) -> int | None:
    """Bytes an unprivileged writer may still use on the filesystem holding ``path`` (None: unknown)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    try:
        st = os.statvfs(probe)
    except OSError:
        return None
    if not st.f_blocks:  # some network/FUSE filesystems report nothing
        return None
    return st.f_bavail * st.f_frsize


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _list(items: list, limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


@dataclass
class Assessment:
    """What a run would do with the save directory, decided before anything is written."""

    state: str = "empty"  # empty | partial | complete | other (a different conversion) | foreign
    action: str = "write"  # write | resume | overwrite | nothing | refuse
    reason: str = ""  # the refusal (action refuse), or why the directory is not this conversion
    keep: dict = field(default_factory=dict)  # relpath -> completion record of finished files a resume keeps
    damaged: list = field(default_factory=list)  # finished files whose records no longer check out
    remove: list = field(default_factory=list)  # files of an earlier conversion --overwrite removes
    unrecognised: list = field(default_factory=list)  # named like a format's files but not recognised: kept
    planned: int = 0
    to_write: int = 0  # bytes of the files still to write
    needed: int = 0  # bytes the filesystem must hold at the worst moment, margin included
    free: int | None = None  # free bytes now, plus what is removed before writing
    notes: list = field(default_factory=list)

    @property
    def space_ok(self) -> bool:
        return self.free is None or self.needed <= self.free

    def space_line(self, root: str) -> str:
        if self.action in ("nothing", "refuse"):
            return ""
        if self.free is None:
            return f"free space on {root}'s filesystem: unknown (it reports none); {human(self.needed)} needed"
        verdict = "enough" if self.space_ok else "NOT enough: convert would refuse"
        return (f"free space {human(self.free)} on {root}'s filesystem, {human(self.needed)} needed "
                f"(still to write {human(self.to_write)} + margin): {verdict}")

    def lines(self, root: str) -> list:
        """What ``plan`` says about the save directory."""
        what = {
            "write": f"{'empty' if self.state == 'empty' else 'holds no finished files to keep'}: convert writes "
                     f"{plural(self.planned, 'file')}, {human(self.to_write)}",
            "resume": f"holds an interrupted run of this conversion: convert --resume keeps {len(self.keep)} of "
                      f"{plural(self.planned, 'file')} and writes {self.planned - len(self.keep)} "
                      f"({human(self.to_write)})",
            "overwrite": f"--overwrite: convert writes {plural(self.planned, 'file')}, {human(self.to_write)}"
                         + (f", removing {plural(len(self.remove), 'file')} of an earlier conversion this one does "
                            f"not write ({_list(self.remove)})" if self.remove else ""),
            "nothing": "already holds a complete conversion of this input (verified by size/CRC): convert has "
                       "nothing to do",
            "refuse": f"convert would refuse: {self.reason}",
        }[self.action]
        out = [f"{root}: {what}"]
        space = self.space_line(root)
        if space:
            out.append(space)
        return out + list(self.notes)


def describe_save_dir(plan) -> list:
    """What ``convert`` with the plan's flags would do with its save directory, for ``plan`` (reads only)."""
    o = plan.options
    try:
        check_paths(o.load_dir, o.save_dir, o.overwrite, o.resume)
    except PathError as e:
        return [f"{o.save_dir}: convert would refuse: {e}"]
    return SaveDir.for_plan(plan).assess(explain=True).lines(o.save_dir)


class SaveDir:
    """One run's view of the save directory (see the module docstring).

    ``fingerprint``: the run's identity (``Plan.fingerprint()``); ``files``: relpath ->
    planned file; ``fmt``: the output format (its ``intact``, ``matches_plan``,
    ``own_files``); ``groups``: the plan's stream groups, in writing order;
    ``final_files``: (relpath, bytes) written last. The coordinator calls
    :meth:`check`, :meth:`open` and, after every worker has committed,
    :meth:`finish`; every worker (the coordinator included) calls
    :meth:`temp_path`, :meth:`commit` and :meth:`discard_temp` for its own files.
    """

    def __init__(self, root: str, fingerprint: dict, files: dict, fmt, options, groups=(), final_files=(),
                 sample=None):
        self.root = root
        self.sample = sample  # () -> first difference between a sample of the files and the input, or None
        self.fp = fingerprint
        self.files = files
        self.fmt = fmt
        self.intact = fmt.intact
        self.options = options
        self.groups = list(groups) or [list(files.values())]
        self.final_files = list(final_files)
        self.book = os.path.join(root, BOOKKEEPING)
        self.run_path = os.path.join(self.book, RUN_FILE)
        self.done_dir = os.path.join(self.book, DONE_DIR)
        self.done: dict = {}  # relpath -> record, of files finished and kept
        self.kept: list = []
        self.notes: list = []
        self.assessment: Assessment | None = None
        self._lock_fd = None

    @classmethod
    def for_plan(cls, plan) -> "SaveDir":
        files = {f.relpath: f for f in plan.files}

        def sample():
            from .verify import sample_mismatch  # verify imports this module

            return sample_mismatch(plan)

        return cls(plan.options.save_dir, plan.fingerprint(), files, plan.format, plan.options,
                   [g.files for g in plan.groups], plan.final_files, sample)

    # -- what a run would do -----------------------------------------------------------
    def assess(self, explain: bool = False) -> Assessment:
        """Decide, without writing, what this run does with the directory (see :class:`Assessment`).

        ``explain`` (``plan``): also work out what ``--resume`` would keep when the
        flag was not given, to say so.
        """
        o, root = self.options, self.root
        a = Assessment(planned=len(self.files))
        listing = os.listdir(root) if os.path.isdir(root) else []
        if not listing:
            if o.resume:
                a.notes.append(f"--resume: nothing to resume in {root}; converting from the start")
        elif is_partial(root):
            a.state = "partial"
            self._assess_partial(a, explain)
        else:
            self._assess_finished(a)
        if a.action in ("write", "resume", "overwrite"):
            self._assess_space(a)
        return a

    def _assess_partial(self, a: Assessment, explain: bool) -> None:
        o = self.options
        run = None
        if os.path.exists(self.run_path):
            try:
                run = self._read_run()
            except PathError as e:
                if not o.overwrite:
                    a.action, a.reason = "refuse", str(e)
                    return
        if o.overwrite:
            a.action = "overwrite"
            self._stale(a)
            return
        if run is None:  # only the leftovers of a run killed before it wrote run.json
            if o.resume:
                a.notes.append(f"--resume: the interrupted run in {self.root} had not finished any file; "
                               "converting from the start")
                return
            a.action, a.reason = "refuse", (f"--save-dir {self.root} holds the leftovers of an interrupted "
                                            "streamconv run; add --resume to finish it (or --overwrite to start over)")
            return
        problem = self._same_run_problem(run, o.resume)
        if problem:
            a.action, a.reason = "refuse", problem
            return
        if o.resume or explain:
            for rel, rec in self.read_done().items():
                f = self.files.get(rel)
                if f is not None and self.intact(os.path.join(self.root, rel), f, rec):
                    a.keep[rel] = rec
                else:
                    a.damaged.append(rel)
        if o.resume:
            a.action = "resume"
            a.notes += [f"--resume: {rel} is damaged or missing; rewriting it" for rel in a.damaged]
            return
        a.action = "refuse"
        a.reason = (f"--save-dir {self.root} holds an interrupted streamconv run; add --resume to finish it "
                    "(or --overwrite to start over)")
        if explain:
            a.reason += f"; --resume would keep {len(a.keep)} of {plural(a.planned, 'file')}"

    def _assess_finished(self, a: Assessment) -> None:
        """A non-empty directory without a partial run: this conversion already, another one, or foreign files."""
        o = self.options
        if o.overwrite:  # replaced whatever it holds: nothing to learn from reading it
            a.action = "overwrite"
            self._stale(a)
            return
        mismatch = self._complete_mismatch()
        if mismatch is None:
            a.state, a.action = "complete", "nothing"
            return
        ours = self._stale(a, check_only=True) or any(self.fmt.is_own_file(os.path.join(self.root, rel))
                                                      for rel in self.files if os.path.isfile(os.path.join(self.root, rel)))
        a.state = "other" if ours else "foreign"
        a.action = "refuse"
        if ours:
            a.reason = (f"--save-dir {self.root} holds a conversion that is not this one ({mismatch}); add "
                        "--overwrite to replace it (files streamconv did not write are kept)")
        else:
            a.reason = (f"--save-dir {self.root} is not empty and holds no streamconv output; choose an empty "
                        "directory, or add --overwrite to write the checkpoint into it (its other files are kept)")
        if o.resume:
            a.reason = f"--resume: nothing to resume (no {BOOKKEEPING}/{RUN_FILE}): " + a.reason

    def _complete_mismatch(self) -> str | None:
        """None if the directory holds exactly this conversion, else the first difference found."""
        root = self.root
        for rel, data in self.final_files:
            path = os.path.join(root, rel)
            try:
                with open(path, "rb") as fh:
                    got = fh.read(len(data) + 1)
            except OSError:
                return f"no {rel}"
            if got != data:
                return f"{rel} holds {got[:20]!r}, this conversion writes {data[:20]!r}"
        final = {rel for rel, _ in self.final_files}
        for rel in self._own_files():
            if rel not in self.files and rel not in final:
                return f"{rel} is not part of this conversion's layout"
        for rel, f in self.files.items():
            path = os.path.join(root, rel)
            if not os.path.isfile(path):
                return f"{rel} is missing"
            if _size(path) != f.size:
                return f"{rel} has {_size(path)} bytes, this conversion writes {f.size}"
        oldest = min((os.path.getmtime(os.path.join(root, rel)) for rel in self.files), default=None)
        for path, _size_, *_ in self.fp.get("input", []):
            try:
                if oldest is not None and os.path.getmtime(path) > oldest:
                    return f"the input file {path} was modified after the output was written"
            except OSError:
                continue
        for check_data in (False, True):  # every file's structure first, then the CRCs (a full read)
            for rel, f in self.files.items():
                if not self.fmt.matches_plan(os.path.join(root, rel), f, check_data=check_data):
                    return (f"{rel} differs from this conversion's file (other flags or input)" if not check_data
                            else f"{rel} is damaged (its data does not match its CRCs)")
        if self.sample is not None:
            # same names, sizes and flags can still be another checkpoint of the same model (a fine-tune)
            diff = self.sample()
            if diff:
                return f"its tensors are not this input's ({diff})"
        return None

    def _own_files(self) -> list:
        """Files under the root that some output format names as its own (any format, not just this plan's)."""
        return [rel for _, rel in all_own_files(self.root)]

    def _stale(self, a: Assessment, check_only: bool = False) -> bool:
        """Files of an earlier conversion that this one does not write: recognised ones go, others stay."""
        found = False
        final = {rel for rel, _ in self.final_files}  # rewritten at the end, not removed
        for fmt, rel in all_own_files(self.root):
            if rel in self.files or rel in final or rel in a.remove or rel in a.unrecognised:
                continue
            if fmt.is_own_file(os.path.join(self.root, rel)):
                found = True
                if not check_only:
                    a.remove.append(rel)
            elif not check_only:
                a.unrecognised.append(rel)
        if not check_only and a.unrecognised:
            a.notes.append(f"--overwrite: keeps {_list(a.unrecognised)}: named like a checkpoint file but not "
                           "recognisable as a converted one (verify will report it)")
        return found

    def _assess_space(self, a: Assessment) -> None:
        """Bytes still to write against the free space, at the worst moment of the run.

        A replaced file frees its old bytes only once its new version is renamed
        over it, and commits lag one stream group behind the writing; removed
        files and stale temp files are gone before anything is written.
        """
        root = self.root
        running = peak = prev_old = 0
        for files in self.groups:
            todo = [f for f in files if f.relpath not in a.keep]
            running += sum(f.size for f in todo)
            a.to_write += sum(f.size for f in todo)
            peak = max(peak, running)
            running -= prev_old
            prev_old = sum(_size(os.path.join(root, f.relpath)) for f in todo)
        final = sum(len(d) for _, d in self.final_files)
        a.needed = peak + final + space_margin(a.to_write)
        free = free_space(root)
        if free is not None:
            freed = sum(_size(os.path.join(root, rel)) for rel in a.remove)
            if a.state == "partial":
                for d, _, names in os.walk(root):
                    freed += sum(_size(os.path.join(d, n)) for n in names if n.endswith(TEMP_SUFFIX))
            else:
                freed += sum(_size(os.path.join(root, rel) + TEMP_SUFFIX) for rel in self.files)
            free += freed
        a.free = free

    # -- coordinator: opening --------------------------------------------------------
    def check(self, paths_checked: bool = False) -> Assessment:
        """Every refusal :meth:`open` could make, without writing anything; returns the assessment."""
        o = self.options
        if not paths_checked:
            check_paths(o.load_dir, self.root, o.overwrite, o.resume)
        refuse_if_locked(self.root)
        a = self.assess()
        if a.action == "refuse":
            raise PathError(a.reason)
        if not a.space_ok:
            raise PathError(
                f"--save-dir {self.root}: its filesystem has {human(a.free)} free but this conversion needs "
                f"{human(a.needed)} (still to write {human(a.to_write)} + margin); free space or choose "
                "another directory"
            )
        self.assessment = a
        return a

    def open(self) -> None:
        """Take the lock and prepare fresh / resume / overwrite as :meth:`check` decided.

        Not cut by an interrupt halfway (lock, cleanup, run record): a Ctrl-C waits for it.
        A failed write is the one-line :class:`WriteError`, here for every caller.
        """
        with deferred():
            try:
                self._open()
            except OSError as e:
                raise write_error(e, os.path.join(self.root, BOOKKEEPING)) from None

    def _open(self) -> None:
        a = self.assessment or self.check()
        if a.action == "nothing":  # pragma: no cover - the caller does not open a finished directory
            raise PathError(f"--save-dir {self.root} already holds this conversion; nothing to open")
        os.makedirs(self.done_dir, exist_ok=True)
        self._lock()
        self.notes += a.notes
        self._clean_temps(everywhere=a.state == "partial")
        if a.action == "resume":
            keep = set(a.keep)
            for rel in self.read_done():
                if rel not in keep:
                    self._remove_record(rel)
            for rel, rec in a.keep.items():
                self.done[rel] = rec
                self.kept.append(rel)
        else:
            self._forget_done()
        if a.action == "overwrite":
            tracker = os.path.join(self.root, TRACKER)
            if os.path.exists(tracker):
                # The old checkpoint is being replaced: it must not look complete meanwhile.
                os.remove(tracker)
                self.notes.append(f"--overwrite: removed the old {TRACKER} first; it is rewritten at the end")
            self._remove_stale(a.remove)
            if a.remove:
                self.notes.append(f"--overwrite: removed {plural(len(a.remove), 'file')} of an earlier conversion "
                                  f"that this one does not write: {_list(a.remove)}")
        write_file_atomic(self.run_path, json.dumps({"streamconv": 2, "fingerprint": self.fp}, indent=1,
                                                    default=str).encode())

    def _remove_stale(self, rels: list) -> None:
        """Delete recognised files of an earlier conversion, then the directories that held only them."""
        dirs = set()
        for rel in rels:
            os.remove(os.path.join(self.root, rel))
            d = os.path.dirname(rel)
            while d:
                dirs.add(d)
                d = os.path.dirname(d)
        for d in sorted(dirs, key=lambda x: -x.count(os.sep)):
            try:
                os.rmdir(os.path.join(self.root, d))  # only if empty
            except OSError:
                pass

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

    def _same_run_problem(self, run: dict, resume: bool = True) -> str | None:
        """Why the interrupted run recorded in ``run`` cannot be resumed by this one (None: it can)."""
        old, fp = run["fingerprint"], self.fp
        if old.get("options") != fp["options"]:
            diff = sorted(k for k in set(old.get("options", {})) | set(fp["options"])
                          if old.get("options", {}).get(k) != fp["options"].get(k))
            if not resume:
                return (f"--save-dir {self.root} holds an interrupted streamconv run of another conversion "
                        f"(different {', '.join(diff)}); rerun that command with --resume to finish it, or add "
                        "--overwrite to start this one over it")
            return (f"--resume: the interrupted run in {self.root} used different flags ({', '.join(diff)}); "
                    "rerun with the same flags, or --overwrite to start over")
        if old.get("input") != fp["input"]:
            before = {e[0]: e[1:] for e in old.get("input", []) if isinstance(e, list) and e}
            now = {e[0]: e[1:] for e in fp["input"]}
            what = "the file list"
            for path in sorted(set(before) | set(now)):
                if path not in now:
                    what = f"{path} is no longer part of it"
                elif path not in before:
                    what = f"{path} is new"
                elif before[path] != now[path]:
                    changes = [n for n, x, y in zip(("size", "modification time", "inode"), before[path], now[path])
                               if x != y] or ["identity"]
                    what = f"{path} changed ({', '.join(changes)})"
                else:
                    continue
                break
            if not resume:
                return (f"--save-dir {self.root} holds an interrupted streamconv run, but its input has changed "
                        f"since ({what}); add --overwrite to start over")
            return (f"--resume: the input changed since the interrupted run in {self.root} ({what}); "
                    "--overwrite to start over")
        return None

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
        """Every data file is in place: write the final files (the tracker last), then drop the bookkeeping.

        An interrupt waits for it: a tracker half written, or bookkeeping half removed, would mislead.
        """
        with deferred():
            try:
                self._finish(final_files)
            except OSError as e:
                raise write_error(e, self.root) from None

    def _finish(self, final_files: list) -> None:
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
