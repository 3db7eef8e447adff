"""The save directory as a transaction: complete, or clearly not, and resumable.

While a run is in progress the save directory holds a bookkeeping file,
:data:`MANIFEST` (what is being written, for which flags and input, and which
rank files are finished with their record CRCs). Rank files are written as
``model_optim_rng.pt`` + :data:`TEMP_SUFFIX` and renamed into place only once
complete and fsynced; the tracker ``latest_checkpointed_iteration.txt`` is
written last, after every rank file is in place, and only then is the manifest
removed. So:

* a run killed at any moment never leaves a tracker, and a directory with a
  manifest is recognisably partial;
* ``--resume`` checks the manifest against the current flags and input, keeps
  finished rank files whose CRCs still check out, and redoes the rest;
* after success only Megatron's layout remains.

Nothing that streamconv did not write is ever deleted.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib

from .errors import PathError, WriteError
from .plan import ITERATION_DIR, TRACKER, Plan
from .rankfile_reader import zip_records

MANIFEST = ".streamconv-partial.json"
TEMP_SUFFIX = ".streamconv-partial"
_READ_CHUNK = 16 * 2**20


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


def only_streamconv_leftovers(save_dir: str) -> bool:
    """True if ``save_dir`` holds nothing but what a run killed before its first manifest leaves.

    That is: streamconv temporary files (the manifest's own temp file included) and
    empty directories of the checkpoint layout. Such a directory is treated as a
    partial run that was interrupted at its very start.
    """
    for d, dirs, files in os.walk(save_dir):
        rel = os.path.relpath(d, save_dir)
        if rel != "." and not (rel == ITERATION_DIR or rel.startswith(ITERATION_DIR + os.sep + "mp_rank_")):
            return False
        if any(not f.endswith(TEMP_SUFFIX) for f in files):
            return False
    return True


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
    if os.path.isdir(save_dir) and os.listdir(save_dir) and not overwrite:
        partial = os.path.exists(os.path.join(save_dir, MANIFEST)) or only_streamconv_leftovers(save_dir)
        if not partial:
            if resume:
                raise PathError(
                    f"--save-dir {save_dir} holds no partial streamconv run to resume (no {MANIFEST}); "
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


class SaveDir:
    """Owns the save directory for one run (see module docstring)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.root = plan.options.save_dir
        self.manifest_path = os.path.join(self.root, MANIFEST)
        self.done: dict = {}
        self.kept: list = []
        self.notes: list = []
        self.checked = False

    # -- opening ----------------------------------------------------------
    def check(self, paths_checked: bool = False) -> None:
        """Every refusal :meth:`open` could make, without writing anything.

        ``paths_checked``: :func:`check_paths` already ran for these options (``convert``
        calls it before reading any header, to refuse fast).
        """
        o = self.plan.options
        if not paths_checked:
            check_paths(o.load_dir, self.root, o.overwrite, o.resume)
        if os.path.exists(self.manifest_path) and o.resume and not o.overwrite:
            self._check_same_run(self._read_manifest(), self.plan.fingerprint())
        self.checked = True

    def open(self) -> None:
        """Prepare fresh / resume / overwrite after :meth:`check`; the first write is the manifest."""
        if not self.checked:
            self.check()
        o = self.plan.options
        manifest = None
        if os.path.exists(self.manifest_path):
            try:
                manifest = self._read_manifest()
            except PathError:
                if not o.overwrite:
                    raise
                self._clean_leftovers()  # an unreadable manifest of ours: start over, as asked
        elif os.path.isdir(self.root) and only_streamconv_leftovers(self.root):
            self._clean_leftovers()  # killed before its first manifest
        if o.resume and manifest is None:
            self.notes.append(f"--resume: nothing to resume in {self.root}; converting from the start")
        os.makedirs(self.root, exist_ok=True)
        if manifest is not None:
            self._clean_temps(manifest)
            if o.resume and not o.overwrite:
                self._keep_intact(manifest)
        if o.overwrite:
            tracker = os.path.join(self.root, TRACKER)
            if os.path.exists(tracker):
                # The old checkpoint is being replaced: it must not look complete meanwhile.
                os.remove(tracker)
                self.notes.append(f"--overwrite: removed the old {TRACKER} first; it is rewritten at the end")
        self._write_manifest()

    def _read_manifest(self) -> dict:
        try:
            with open(self.manifest_path, "r", encoding="utf-8") as f:
                m = json.load(f)
            if not isinstance(m, dict) or "fingerprint" not in m:
                raise ValueError("not a streamconv manifest")
            return m
        except (OSError, ValueError) as e:
            raise PathError(
                f"{self.manifest_path}: unreadable ({e}); --overwrite starts over"
            ) from None

    def _check_same_run(self, manifest: dict, fp: dict) -> None:
        old = manifest["fingerprint"]
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

    def _clean_leftovers(self) -> None:
        """Remove the temp files of a run killed before it wrote its manifest."""
        for d, _, files in os.walk(self.root):
            for f in files:
                if f.endswith(TEMP_SUFFIX):
                    os.remove(os.path.join(d, f))

    def _clean_temps(self, manifest: dict) -> None:
        for rel in manifest["fingerprint"].get("files", {}):
            tmp = os.path.join(self.root, rel) + TEMP_SUFFIX
            if os.path.exists(tmp):
                os.remove(tmp)
        for name in (TRACKER, MANIFEST):
            tmp = os.path.join(self.root, name) + TEMP_SUFFIX
            if os.path.exists(tmp):
                os.remove(tmp)

    def _keep_intact(self, manifest: dict) -> None:
        planned = {f.relpath for f in self.plan.files}
        for rel, rec in manifest.get("done", {}).items():
            path = os.path.join(self.root, rel)
            if rel in planned and self._intact(path, rec):
                self.done[rel] = rec
                self.kept.append(rel)
            else:
                self.notes.append(f"--resume: {rel} is damaged or missing; rewriting it")

    @staticmethod
    def _intact(path: str, rec: dict) -> bool:
        """Size and every record's CRC must match what was recorded when the file was finished."""
        try:
            if os.path.getsize(path) != rec["size"]:
                return False
            records = zip_records(path)
            if [[n, size, crc] for n, (_, size, crc) in records.items()] != rec["records"]:
                return False
            with open(path, "rb") as f:
                for offset, size, want in records.values():
                    f.seek(offset)
                    crc, left = 0, size
                    while left:
                        chunk = f.read(min(left, _READ_CHUNK))
                        if not chunk:
                            return False
                        crc = zlib.crc32(chunk, crc)
                        left -= len(chunk)
                    if crc != want:
                        return False
            return True
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            return False

    # -- bookkeeping -----------------------------------------------------------
    def _write_manifest(self) -> None:
        data = json.dumps({"streamconv": 1, "fingerprint": self.plan.fingerprint(), "done": self.done},
                          indent=1, default=str).encode()
        write_file_atomic(self.manifest_path, data)

    def temp_path(self, rel: str) -> str:
        path = os.path.join(self.root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path + TEMP_SUFFIX

    def commit_file(self, rel: str, records: list, fd: int) -> None:
        """fsync the finished temp file, rename it into place, record it in the manifest."""
        os.fsync(fd)
        size = os.fstat(fd).st_size
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # written data need not stay cached
        except (AttributeError, OSError):  # pragma: no cover
            pass
        os.close(fd)
        path = os.path.join(self.root, rel)
        os.replace(path + TEMP_SUFFIX, path)
        fsync_dir(os.path.dirname(path))
        self.done[rel] = {"size": size, "records": [[n, s, c] for n, s, c in records]}
        self._write_manifest()

    def discard_temp(self, rel: str) -> None:
        tmp = os.path.join(self.root, rel) + TEMP_SUFFIX
        try:
            os.remove(tmp)
        except OSError:
            pass

    def finish(self) -> None:
        """Every rank file is in place: write the tracker last, then drop the manifest."""
        missing = [f.relpath for f in self.plan.files if f.relpath not in self.done]
        if missing:  # pragma: no cover - guarded by the caller
            raise WriteError(f"cannot finish: {missing[0]} was not written")
        fsync_dir(os.path.join(self.root, ITERATION_DIR))
        write_file_atomic(os.path.join(self.root, TRACKER), b"1")
        os.remove(self.manifest_path)
        fsync_dir(self.root)
