"""The tally of what the input holds besides model weights, reported once in the summary.

Optimizer state, step counters, dropout placeholders, router statistics, converter
artifacts, skipped files and other entries set aside: a user sees what was left
out and why, and both input layouts (merged files, per-rank output) count into it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .schemes.base import EntryClass

#: the weightless entry kinds :class:`Skipped` counts, each to its field (artifacts are listed by name)
_COUNTERS = {EntryClass.OPTIMIZER: "optimizer", EntryClass.STEP: "steps", EntryClass.PLACEHOLDER: "placeholders",
             EntryClass.BUFFER: "buffers"}


@dataclass
class Skipped:
    """Entries and files that carry no model weights, reported once in the summary."""

    optimizer: int = 0
    optimizer_bytes: int = 0
    steps: int = 0
    placeholders: int = 0
    buffers: int = 0
    artifacts: list = field(default_factory=list)  # names
    files: list = field(default_factory=list)  # (path, reason)
    other: list = field(default_factory=list)  # (what, [names]): other entries set aside, named in the notes

    def set_aside(self, kind: EntryClass, name: str) -> bool:
        """Count entry ``name`` if its kind carries no weights; False for any other kind.

        One place for both input layouts: a merged checkpoint counts each entry as it is
        read, per-rank output each distinct name once (optimizer bytes stay the caller's).
        """
        if kind is EntryClass.ARTIFACT:
            self.artifacts.append(name)
            return True
        attr = _COUNTERS.get(kind)
        if attr is None:
            return False
        setattr(self, attr, getattr(self, attr) + 1)
        return True

    def lines(self) -> list:
        out = []
        if self.optimizer:
            out.append(
                f"skipped {self.optimizer} optimizer-state tensors "
                f"({self.optimizer_bytes / 2**20:.1f} MiB: adam/moment/accu_grads)"
            )
        if self.steps:
            out.append(f"skipped {self.steps} step/loss-scale entries (global_step, learning_rate, ...)")
        if self.placeholders:
            out.append(f"skipped {self.placeholders} placeholder entries without weights (dropout, rotary inv_freq)")
        if self.buffers:
            out.append(f"skipped {self.buffers} MoE router runtime buffers (expert_load / fi_accu: statistics, "
                       "not weights)")
        for name in self.artifacts:
            out.append(f"skipped {name}: no model has it (mindformers' convert_weight writes it by mistake)")
        for path, reason in self.files:
            out.append(f"skipped file {path}: {reason}")
        for what, names in self.other:
            shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
            out.append(f"skipped {what}: {shown}")
        return out
