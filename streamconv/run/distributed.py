"""Several processes or nodes convert one checkpoint together, under ``torchrun``.

``torchrun --nnodes N --nproc-per-node P ... -m streamconv convert <flags>`` starts
N x P workers with ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` set and a
rendezvous already done; this module is what each worker runs:

1. every worker plans from the headers (cheap, deterministic) and the plans are
   compared across workers through a gloo process group: a worker that sees
   other input or flags refuses, and so do all the others;
2. the coordinator (rank 0) alone checks, locks and opens the save directory
   (resume, overwrite and refusals as in a single process) and tells the others
   which files are already finished;
3. the files still to write are dealt out by bytes (largest first, to the least
   loaded worker), and each worker streams only its own files under its own
   ``--max-memory``, committing each with its own completion record;
4. once every worker has reported, the coordinator writes the final files (the
   tracker last) — only if every worker succeeded.

A worker killed at any point leaves no tracker; torchrun's ``--max-restarts``
restarts all workers, which then resume (a restart is a resume), or a later
rerun with ``--resume`` does, redoing only unfinished files. Nothing here needs
a dependency beyond torch, which ships torchrun and gloo.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import time

from ..core.errors import Interrupted, StreamconvError
from ..core.launch import restart_count, restarted
from ..engine import memory

#: how long a worker waits for the others to join the process group
JOIN_TIMEOUT_S = float(os.environ.get("STREAMCONV_RDZV_TIMEOUT", "300"))
#: what the coordinator tells the workers when the save directory already holds this conversion
NOTHING = "nothing to do"
#: collectives after the join wait as long as the slowest worker converts (torchrun ends the job on a failure)
WORK_TIMEOUT = datetime.timedelta(days=7)


def deal(files: list, workers: int) -> list:
    """Relative paths per worker: largest file first, each to the least-loaded worker (ties: lowest rank)."""
    load = [0] * workers
    out: list = [[] for _ in range(workers)]
    for f in sorted(files, key=lambda f: (-f.size, f.relpath)):
        w = min(range(workers), key=lambda i: (load[i], i))
        out[w].append(f.relpath)
        load[w] += f.size
    return out


class _Group:
    """The gloo process group, with the one-line failures a user can act on."""

    def __init__(self, rank: int, world: int):
        import torch.distributed as dist

        self.dist, self.rank, self.world = dist, rank, world
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        try:
            # joining is the only short wait (the store); collectives wait as long as the slowest worker converts
            store, _, _ = next(dist.rendezvous("env://", rank, world,
                                               timeout=datetime.timedelta(seconds=JOIN_TIMEOUT_S)))
            # torchrun may hand a restarted group the same agent store: keys of the attempt that failed (the
            # dead workers' addresses) must not be read by this one
            store = dist.PrefixStore(f"streamconv/attempt_{restart_count()}", store)
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=WORK_TIMEOUT)
        except Exception as e:  # noqa: BLE001 - any failure to join is the same story for the user
            raise StreamconvError(
                f"worker {rank} of {world} could not reach the rendezvous at {where} within {JOIN_TIMEOUT_S:.0f} s "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check --rdzv-endpoint / "
                "MASTER_ADDR and that every node can reach it"
            ) from None
        self.work_group = None  # the default group

    def _lost(self, e: Exception) -> StreamconvError:
        err = StreamconvError(
            f"worker {self.rank} lost contact with the other workers ({type(e).__name__}); another worker failed or "
            "was killed. torchrun --max-restarts, or the same command with --resume, finishes the conversion"
        )
        err.exit_code = 3
        return err

    def gather(self, obj) -> list:
        out = [None] * self.world
        try:
            self.dist.all_gather_object(out, obj, group=self.work_group)
        except RuntimeError as e:
            raise self._lost(e) from None
        return out

    def broadcast(self, obj):
        box = [obj]
        try:
            self.dist.broadcast_object_list(box, src=0, group=self.work_group)
        except RuntimeError as e:
            raise self._lost(e) from None
        return box[0]

    def close(self) -> None:
        try:
            self.dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - shutting down after an error
            pass


def _plan_digest(plan) -> str:
    ident = {"fingerprint": plan.fingerprint(), "final": [(r, hashlib.sha256(b).hexdigest()) for r, b in plan.final_files]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def _outcome(fn):
    """Run ``fn``; return (result, None) or (None, (exit code, one-line message))."""
    try:
        return fn(), None
    except StreamconvError as e:
        return None, (e.exit_code, str(e))
    except KeyboardInterrupt:
        return None, (Interrupted.exit_code, "interrupted; rerun the same command with --resume to finish (finished "
                                             "files are kept)")


def convert_distributed(options, progress, rank: int, world: int) -> dict:
    """One worker's part of a conversion shared by ``world`` workers (see the module docstring)."""
    from ..engine.plan import build_plan
    from ..sources import prefetch
    from .convert import _nothing_to_do, run_summary, write_files
    from .savedir import SaveDir, check_paths

    t0 = time.monotonic()
    if restarted() and not options.overwrite:
        options.resume = True  # torchrun restarted us after a failure: finish that run
    coordinator = rank == 0
    group = _Group(rank, world)
    try:
        def plan_it():
            if coordinator:
                check_paths(options.load_dir, options.save_dir, options.overwrite, options.resume)
            return build_plan(options, on_source=prefetch.start if coordinator else None)

        plan, err = _outcome(plan_it)
        digests = group.gather(err if err else _plan_digest(plan))
        _stop_on(digests, "planning")
        if len(set(digests)) != 1:
            differ = [r for r, d in enumerate(digests) if d != digests[0]]
            raise StreamconvError(
                f"the {world} workers do not agree on the plan (workers {differ} differ from worker 0): give every "
                "worker the same flags and the same input, visible at the same path on every node"
            )
        sd = SaveDir.for_plan(plan)

        def open_it():
            # the coordinator decides for the job: refusals, free space, nothing to do, --overwrite removals
            a = sd.check(paths_checked=True)
            progress.announce(plan)  # quiet or not: it says what --quiet must not hide
            if a.action == "nothing":
                return NOTHING
            sd.open()
            for n in sd.notes:
                progress.note(n)
            return sorted(sd.done)

        opened, err = _outcome(open_it) if coordinator else (None, None)
        done = group.broadcast(err if err else opened)
        if isinstance(done, tuple):
            raise StreamconvError(f"the coordinator (worker 0) stopped: {done[1]}") if not coordinator \
                else _error(done)
        if done == NOTHING:  # the save directory already holds exactly this conversion
            summary = _nothing_to_do(plan, t0)
            summary.update(workers=world, coordinator=coordinator)
            return summary
        if not coordinator:
            sd.done = sd.read_done()
            if sorted(sd.done) != done:
                raise StreamconvError(
                    f"worker {rank} does not see the save directory the coordinator opened ({options.save_dir}: "
                    f"{len(sd.done)} finished files here, {len(done)} for the coordinator; first difference "
                    f"{sorted(set(sd.done) ^ set(done))[:1]}): every node needs it on a shared filesystem")
        todo = [f for f in plan.files if f.relpath not in sd.done]
        mine = set(deal(todo, world)[rank])
        written, err = _outcome(lambda: write_files(plan, sd, progress, mine))
        report = {"rank": rank, "host": socket.gethostname(), "error": err, "written": written or [],
                  "read_bytes": progress.bytes_read, "peak_rss_bytes": memory.peak_rss(),
                  "wall_seconds": round(time.monotonic() - t0, 3)}
        reports = group.gather(report)
        _stop_on([r["error"] for r in reports], "converting", reports)
        if coordinator:
            sd.finish(plan.final_files)
        # the tracker is written before anyone leaves: a worker that exits 0 means a complete checkpoint
        group.gather(True)
    finally:
        if coordinator and "sd" in locals():
            sd.unlock()
        group.close()
    per_worker = [{k: r[k] for k in ("rank", "host", "peak_rss_bytes", "read_bytes", "wall_seconds")}
                  | {"files": len(r["written"])} for r in reports]
    return run_summary(plan, time.monotonic() - t0, sum(r["read_bytes"] for r in reports),
                       [p for r in reports for p in r["written"]], sorted(set(sd.kept)) if coordinator else [],
                       plan.notes + (sd.notes if coordinator else []),
                       workers=world, per_worker=per_worker, coordinator=coordinator)


def _error(err: tuple) -> StreamconvError:
    e = StreamconvError(err[1])
    e.exit_code = err[0]
    return e


def _stop_on(results: list, stage: str, reports: list | None = None) -> None:
    """Every worker raises the first worker error (its own if it has one), so all end the same way."""
    failed = [(r, x) for r, x in enumerate(results) if isinstance(x, tuple)]
    if not failed:
        return
    rank, (code, message) = failed[0]
    e = StreamconvError(message if len(failed) == len(results) else f"worker {rank} failed while {stage}: {message}")
    e.exit_code = code
    raise e
