"""Ctrl-C and SIGTERM end a run once, however many arrive.

The first interrupt raises :class:`KeyboardInterrupt` where the main thread is;
the run then cleans up (stops its threads, removes its temporary files, closes
its bookkeeping) and reports one line. A second Ctrl-C pressed while that
cleanup runs must not cut it short — with Python's default handler it would
raise inside a ``finally`` block, leave temporary files behind, and at exit
surface in an ``atexit`` handler (torch registers some) as a traceback. So
while :class:`InterruptGuard` is active, every interrupt after the first is
ignored, and :func:`deferred` marks a section that an interrupt must not cut
at an arbitrary point: inside it the interrupt is only noted, and raised at
the next :func:`checkpoint` (or when the section ends).

Why sections: an exception raised asynchronously inside ``threading``'s
condition code (between ``Condition.notify`` releasing a waiter and removing
it from the waiter list) leaves a stale waiter behind, and a later notify then
wakes nobody — the run hangs while joining its writer thread. So the
conversion's streaming, which hands work to threads through queues all the
time, runs in a deferred section and checks for the interrupt once per block;
so do writing the tracker and removing the bookkeeping.

SIGXFSZ (the file-size limit) is ignored as well, so that a write past
``ulimit -f`` fails with EFBIG and becomes a clean write error instead of
killing the process.
"""

from __future__ import annotations

import contextlib
import signal
import threading

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _State:
    depth = 0
    interrupted = False  # the first interrupt has been raised
    deferring = 0  # inside deferred() sections
    pending = False  # an interrupt arrived during a deferred section
    saved: dict = {}
    keep = False


def _handler(signum, frame):
    if _State.interrupted:
        return  # the shutdown of the first interrupt is under way; nothing more to do
    if _State.deferring:
        _State.pending = True
        return
    _State.interrupted = True
    raise KeyboardInterrupt


class InterruptGuard:
    """Install the one-interrupt handlers for the duration of a ``with`` block (re-entrant).

    ``keep_after_interrupt``: once interrupted, ignore SIGINT and SIGTERM from the
    end of the outermost block on, so that later signals cannot cut the
    process's exit short (the command line's choice; a library caller gets its
    own handlers back). ``SIG_IGN`` rather than our handler: when the
    interpreter finalises it resets Python-level handlers to the default
    action, which would let a late signal kill the process.
    """

    def __init__(self, keep_after_interrupt: bool = False):
        self.keep = keep_after_interrupt
        self.active = False

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers belong to the main thread
        self.active = True
        if _State.depth == 0:
            _State.interrupted = _State.pending = False
            _State.deferring = 0
            _State.keep = self.keep
            _State.saved = {}
            for sig in _SIGNALS:
                _State.saved[sig] = signal.signal(sig, _handler)
            try:
                _State.saved[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            except (AttributeError, OSError, ValueError):  # pragma: no cover - no SIGXFSZ here
                pass
        _State.depth += 1
        return self

    def __exit__(self, *exc):
        if not self.active:
            return False
        _State.depth -= 1
        if _State.depth == 0:
            ignore = _State.keep and _State.interrupted
            for sig, old in _State.saved.items():
                signal.signal(sig, signal.SIG_IGN if ignore and sig in _SIGNALS else old)
        return False


def checkpoint() -> None:
    """Raise here the interrupt that arrived during a deferred section (a point where that is safe)."""
    if _State.pending and not _State.interrupted:
        _State.pending = False
        _State.interrupted = True
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred():
    """A section an interrupt must not cut: one arriving inside is raised when the section ends."""
    _State.deferring += 1
    try:
        yield
    finally:  # the section's own failure, if any, is what the caller sees: checkpoint() is not reached then
        _State.deferring -= 1
    if not _State.deferring:
        checkpoint()
