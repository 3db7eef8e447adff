"""What a person watching a long conversion sees: notes up front, progress, a summary line.

Everything goes to stderr except the final summary block and the verify verdict,
so stdout stays clean for scripts. Progress is a redrawn bar on a terminal and,
when stderr is a file or a pipe (a log, CI), a plain line per stage and per
tenth of the bytes, so logs hold no carriage-return redraws.

``quiet`` silences progress and chatter, but never a note that states an
assumption which can make the output wrong (a note starting with
:data:`ASSUMED`, such as the fused-weight layouts), nor one that says which
files of the user's directory ``--overwrite`` removed: those are printed
whatever the flags. ``silent`` (the library's default, whose caller gets every
note in the returned summary) prints nothing at all.
"""

from __future__ import annotations

import sys
import threading
import time

from ..core.sizes import human

#: notes that begin with this state an assumption the output depends on; --quiet never hides them
ASSUMED = "ASSUMED"


#: notes that say what was deleted from the user's directory; --quiet never hides them either
REMOVED = "--overwrite: removed"


def always_shown(note: str) -> bool:
    """An assumption the output depends on, or a deletion the user must hear about."""
    return note.startswith((ASSUMED, REMOVED))


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def rate(nbytes: int, seconds: float) -> str:
    """A throughput in the unit that shows it (``1.23 GB/s``, ``85 MB/s``), or "" when there is none."""
    if nbytes <= 0 or seconds <= 0:
        return ""
    r = nbytes / seconds
    if r >= 1e9:
        return f"{r / 1e9:.2f} GB/s"
    if r >= 1e6:
        return f"{r / 1e6:.0f} MB/s"
    return f"{r / 1e3:.0f} kB/s"


class Progress:
    #: off a terminal, a line each time this fraction of the bytes is written
    LINE_EVERY = 0.10

    def __init__(self, quiet: bool = False, stream=None, tty: bool | None = None, silent: bool = False):
        self.quiet = quiet or silent
        self.silent = silent
        self.stream = stream or sys.stderr
        if tty is None:
            try:
                tty = self.stream.isatty()
            except (AttributeError, ValueError):
                tty = False
        self.tty = tty
        self.bar = None
        self.bytes_read = 0
        self.total = 0
        self.done_bytes = 0
        self.next_line = 0.0
        self.t0 = time.monotonic()
        self._lock = threading.Lock()

    def note(self, text: str) -> None:
        if self.silent:
            return
        if not self.quiet or always_shown(text):
            print(f"streamconv: {text}", file=self.stream, flush=True)

    def announce(self, plan) -> None:
        """Say loudly, before any work, what was assumed and what will be skipped."""
        c = plan.config
        if not self.quiet:
            self.note(
                f"{plan.source.load_path}: {c.num_layers} layers, hidden {c.hidden_size}, "
                f"{len(plan.source.tensors)} weights ({human(plan.source.total_bytes)}) -> TP {plan.sizes.tp} x "
                f"PP {plan.sizes.pp} in {plan.options.save_dir}; memory budget {human(plan.budget)}, "
                f"predicted peak {human(plan.predicted_peak)}"
            )
        for n in plan.notes:
            self.note(n)

    def start(self, total: int) -> None:
        self.total, self.done_bytes, self.t0 = total, 0, time.monotonic()
        self.next_line = self.LINE_EVERY
        if self.quiet or not self.tty:
            return
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is a dependency
            return
        self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                        desc="converting", file=self.stream, dynamic_ncols=True, mininterval=0.5)

    def stage(self, stage, files) -> None:
        if self.bar is not None:
            self.bar.set_description(f"stage {stage.index}")
        elif not self.quiet:
            size = sum(f.size for f in files)
            self.note(f"stage {stage.index}: writing {plural(len(files), 'file')} ({human(size)})")

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)
            return
        if self.quiet or not self.total:
            return
        with self._lock:  # called from the writer thread
            self.done_bytes += n
            frac = self.done_bytes / self.total
            if frac + 1e-12 < self.next_line:
                return
            while self.next_line <= frac + 1e-12:
                self.next_line += self.LINE_EVERY
        took = time.monotonic() - self.t0
        speed = rate(self.done_bytes, took)
        self.note(f"{min(100, int(round(frac * 100)))}% ({human(self.done_bytes)} of {human(self.total)}) "
                  f"in {took:.0f} s" + (f", {speed}" if speed else ""))

    def read(self, n: int) -> None:
        self.bytes_read += n

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def done(self, s: dict) -> None:
        if self.quiet:
            return
        out = sys.stdout
        if s.get("nothing_to_do"):
            print(f"streamconv: {s['save_dir']} already holds a complete conversion of this input "
                  "(verified by size/CRC); nothing to do", file=out, flush=True)
            return
        wall = s["wall_seconds"] or 1e-9
        files = len(s["files_written"])
        kept = f" ({len(s['files_kept'])} kept from the interrupted run)" if s["files_kept"] else ""
        took = f"{wall:.1f}" if wall >= 10 else f"{wall:.2f}"
        speed = rate(s["read_bytes"], wall)
        print(
            f"streamconv: done in {took} s: read {human(s['read_bytes'])}" + (f" ({speed})" if speed else "")
            + f", wrote {plural(files, 'rank file')}{kept} to {s['save_dir']}; "
            f"peak RSS {human(s['peak_rss_bytes'])} of {human(s['budget_bytes'])} budget",
            file=out, flush=True,
        )
        for w in s.get("per_worker", ()):
            print(f"streamconv:   worker {w['rank']} on {w['host']}: {w['files']} files, read "
                  f"{human(w['read_bytes'])} in {w['wall_seconds']:.1f} s, peak RSS {human(w['peak_rss_bytes'])}",
                  file=sys.stdout, flush=True)
        if s.get("notes"):
            # the run's surprises in one block: assumed layouts, skipped entries, vocab padding
            print("streamconv: notes:", file=out)
            for n in s["notes"]:
                print(f"  - {n}", file=out)
            out.flush()

    def verified(self, report) -> None:
        """verify's findings: every mismatch (always), then the one-line verdict (unless quiet)."""
        if self.silent:
            return
        for line in report.lines():
            print(line, file=sys.stdout)
        if not self.quiet:
            print(f"streamconv: verify: {report.verdict()}", file=sys.stdout)
        sys.stdout.flush()
