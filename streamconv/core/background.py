"""A thread that runs queued calls in order and remembers the first error.

Both halves of the pipeline need one: the stream hands converted buffers to a
writer thread (so converting and writing overlap), and the run hands finished
files to a committer thread (so fsync and rename overlap with the next stage).
In both, an error on the thread must surface on the caller's next call, and
after an error nothing more may be done. :class:`BackgroundWorker` is that
thread; ``after`` lets a caller release resources (a buffer back to its pool)
whether or not the call ran.
"""

from __future__ import annotations

import queue
import threading

from .interrupts import checkpoint

_STOP = object()


class BackgroundWorker:
    def __init__(self, name: str, maxsize: int = 0):
        self.q: queue.Queue = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None
        self.cancelled = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is _STOP:
                return
            fn, args, after = item
            try:
                if self.error is None and not self.cancelled:
                    fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the caller by check()
                self.error = e
            finally:
                if after is not None:
                    after()

    def submit(self, fn, *args, after=None) -> None:
        """Queue ``fn(*args)``; raise the first earlier error instead of queueing after one."""
        self.check()
        while True:  # a full queue waits for the thread, but an interrupt is still taken
            try:
                self.q.put((fn, args, after), timeout=0.5)
                return
            except queue.Full:
                checkpoint()
                self.check()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def take_error(self) -> BaseException | None:
        err, self.error = self.error, None
        return err

    def sync(self) -> None:
        """Wait until everything queued so far has run; raise its first error."""
        done = threading.Event()
        self.submit(done.set, after=done.set)  # ``after`` sets it even when an error skips the call
        while not done.wait(0.5):
            checkpoint()
        self.check()

    def stop(self, cancel: bool = False) -> None:
        """Finish queued work (or skip it, ``cancel``) and end the thread."""
        self.cancelled = cancel
        self.q.put(_STOP)
        self.thread.join()
