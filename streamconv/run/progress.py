"""What a person watching a long conversion sees: notes up front, a byte bar, a summary line.

All output goes to stderr except the final summary block, so stdout stays clean
for scripts. ``quiet`` silences everything but errors.
"""

from __future__ import annotations

import sys

from ..core.sizes import human


class Progress:
    def __init__(self, quiet: bool = False, stream=None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.bar = None
        self.bytes_read = 0

    def note(self, text: str) -> None:
        if not self.quiet:
            print(f"streamconv: {text}", file=self.stream, flush=True)

    def announce(self, plan) -> None:
        """Say loudly, before any work, what was assumed and what will be skipped."""
        if self.quiet:
            return
        c = plan.config
        self.note(
            f"{plan.source.load_path}: {c.num_layers} layers, hidden {c.hidden_size}, "
            f"{len(plan.source.tensors)} weights ({human(plan.source.total_bytes)}) -> TP {plan.sizes.tp} x PP {plan.sizes.pp} "
            f"in {plan.options.save_dir}; memory budget {human(plan.budget)}, predicted peak {human(plan.predicted_peak)}"
        )
        for n in plan.notes:
            self.note(n)

    def start(self, total: int) -> None:
        if self.quiet:
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

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def read(self, n: int) -> None:
        self.bytes_read += n

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def done(self, s: dict) -> None:
        if self.quiet:
            return
        wall = s["wall_seconds"] or 1e-9
        files = len(s["files_written"])
        kept = f" ({len(s['files_kept'])} kept from the interrupted run)" if s["files_kept"] else ""
        took = f"{wall:.1f}" if wall >= 10 else f"{wall:.2f}"
        print(
            f"streamconv: done in {took} s: read {human(s['read_bytes'])} "
            f"({s['read_bytes'] / wall / 1e9:.2f} GB/s), wrote {files} rank files{kept} to {s['save_dir']}; "
            f"peak RSS {human(s['peak_rss_bytes'])} of {human(s['budget_bytes'])} budget",
            file=sys.stdout, flush=True,
        )
        for w in s.get("per_worker", ()):
            print(f"streamconv:   worker {w['rank']} on {w['host']}: {w['files']} files, read "
                  f"{human(w['read_bytes'])} in {w['wall_seconds']:.1f} s, peak RSS {human(w['peak_rss_bytes'])}",
                  file=sys.stdout, flush=True)
        if s.get("notes"):
            # the run's surprises in one block: assumed layouts, skipped entries, vocab padding
            print("streamconv: notes:", file=sys.stdout)
            for n in s["notes"]:
                print(f"  - {n}", file=sys.stdout)
            sys.stdout.flush()
