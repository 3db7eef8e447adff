"""``verify``: recompute every output tensor from the source and compare bytes.

The model configuration comes from the output's own ``args``; the plan is
rebuilt from the source headers exactly as ``convert`` would build it, and the
same stream (same memory budget) feeds a comparing writer instead of a real
one. Besides tensor bytes it checks the layout (final files such as the
tracker, the set of data files, no leftovers) and, through the format's
reader, every file's structure (top-level values, keys and order, fixed values,
``args``). Every mismatch is reported by file and key.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field

import numpy as np

from ..core.errors import InputError, PathError
from ..core.interrupts import deferred
from ..core.options import ConvertOptions, TransformerImpl
from ..core.pages import release
from ..engine import memory
from ..engine.plan import Plan, build_plan
from ..formats import FORMATS, all_own_files, get_format
from ..formats.base import FileWriter, StreamGroup
from ..megatron.args import OPTIONS_IN_ARGS
from ..megatron.entries import EntryKind
from ..megatron.files import ITERATION_DIR
from ..core.sizes import human
from .progress import Progress, plural
from .savedir import BOOKKEEPING, TEMP_SUFFIX


@dataclass
class VerifyReport:
    problems: list = field(default_factory=list)  # (where, what)
    files_checked: int = 0
    tensors_checked: int = 0
    bytes_compared: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, where: str, what: str) -> None:
        self.problems.append((where, what))

    def lines(self) -> list:
        """One line per mismatch, by file and key."""
        return [f"MISMATCH {where}: {what}" for where, what in self.problems]

    def verdict(self) -> str:
        """What was compared, and the outcome, in one line."""
        what = (f"{plural(self.files_checked, 'rank file')} (layout, keys, args) and "
                f"{plural(self.tensors_checked, 'tensor')} ({human(self.bytes_compared)}) compared with a fresh "
                "conversion of the input")
        return f"{what}: " + ("OK" if self.ok else f"{plural(len(self.problems), 'problem')}")

    def as_dict(self) -> dict:
        return {"ok": self.ok, "problems": [f"{w}: {m}" for w, m in self.problems],
                "files_checked": self.files_checked, "tensors_checked": self.tensors_checked,
                "bytes_compared": self.bytes_compared}


class _CompareWriter(FileWriter):
    """Compares the streamed expected bytes with where the format's reader says they are stored."""

    def __init__(self, rel: str, path: str, reader, report: VerifyReport):
        self.rel, self.reader, self.report = rel, reader, report
        fd = os.open(path, os.O_RDONLY)
        try:
            self.map = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self.cursor = self.end_at = self.start = 0
        self.entry = None
        self.bad = False

    def begin(self, entry):
        self.entry, self.bad = entry, False
        where = self.reader.locate(entry)
        if where is None:
            self.bad = True  # already reported by the structure check
            return
        self.start = self.cursor = where[0]
        self.end_at = where[0] + where[1]

    def write(self, mv):
        n = len(mv)
        if self.bad:
            return
        if self.cursor + n > self.end_at:
            self.report.add(self.rel, f"{self.entry.key}: stored data is shorter than expected")
            self.bad = True
            return
        got = np.frombuffer(self.map, dtype=np.uint8, count=n, offset=self.cursor)
        want = np.frombuffer(mv, dtype=np.uint8)
        if not np.array_equal(got, want):
            first = int(np.argmax(got != want))
            elem = (self.cursor - self.start + first) // self.entry.dtype.itemsize
            self.report.add(self.rel, f"{self.entry.key}: bytes differ from the source's conversion "
                                      f"(first at element {elem})")
            self.bad = True
        del got, want
        release(self.map, self.cursor, self.cursor + n)
        self.cursor += n
        self.report.bytes_compared += n

    def end(self, entry):
        self.report.tensors_checked += 1

    def finish(self) -> dict:
        return {}

    def close(self):
        try:
            self.map.close()
        except BufferError:  # pragma: no cover
            pass


def _check_layout(plan: Plan, report: VerifyReport) -> None:
    root = plan.options.save_dir
    for rel, data in plan.final_files:
        path = os.path.join(root, rel)
        if not os.path.isfile(path):
            report.add(rel, "missing: the checkpoint is incomplete (Megatron will not find it)")
            continue
        with open(path, "rb") as f:
            got = f.read(len(data) + 1)
        if got != data:
            report.add(rel, f"holds {got[:20]!r}, expected {data[:20]!r}")
    if os.path.exists(os.path.join(root, BOOKKEEPING)):
        report.add(BOOKKEEPING, "present: an interrupted streamconv run was never finished (use --resume)")
    want = {f.relpath for f in plan.files}
    it = os.path.join(root, ITERATION_DIR)
    for d, _, names in sorted(os.walk(it)) if os.path.isdir(it) else []:
        for name in sorted(names):
            if name.endswith(TEMP_SUFFIX):
                report.add(os.path.relpath(os.path.join(d, name), root), "leftover temporary file")
    seen = {rel for rel, _ in plan.final_files}  # checked above
    for _, rel in all_own_files(root):  # another format's files in the same directory are leftovers too
        if rel not in want and rel not in seen:
            report.add(rel, "rank file not expected for this TP/PP/EP layout and format (a leftover of "
                            "another conversion?)")
    for rel in sorted(want):
        if not os.path.isfile(os.path.join(root, rel)):
            report.add(rel, "missing")


def _detect_format(save_dir: str):
    for name in FORMATS:
        fmt = get_format(name)
        if fmt.own_files(save_dir):
            return fmt
    return get_format("torch")


def options_from_output(load_dir: str, save_dir: str, base: ConvertOptions | None = None) -> ConvertOptions:
    """Rebuild the conversion options from the ``args`` stored in the output."""
    if not os.path.isdir(save_dir):
        raise PathError(f"--save-dir {save_dir} does not exist")
    fmt = _detect_format(save_dir)
    args, keys = fmt.read_args(save_dir)
    if args is None:
        raise InputError(f"{save_dir}: no readable rank file under {ITERATION_DIR}/ to take the model configuration from")
    a = vars(args)
    o = base or ConvertOptions(load_dir=load_dir)
    o.load_dir, o.save_dir = load_dir, save_dir
    o.ckpt_format = fmt.name
    for field_name, arg in OPTIONS_IN_ARGS.items():
        if arg in a:
            setattr(o, field_name, a[arg])
    o.group_query_attention = bool(a.get("group_query_attention", False))
    impl = a.get("transformer_impl")
    if impl not in TransformerImpl.values():
        te = any(k.endswith("linear_qkv.layer_norm_weight") for k in keys or ())
        impl = (TransformerImpl.TRANSFORMER_ENGINE if te else TransformerImpl.LOCAL).value
    o.saver_transformer_impl = impl
    return o


def verify_plan(plan: Plan, progress: Progress | None = None) -> VerifyReport:
    """Compare the save directory of ``plan`` with a fresh conversion of its source."""
    with deferred():  # the stream hands work to a thread: interrupts are taken once per block
        return _verify_plan(plan)


def _verify_plan(plan: Plan) -> VerifyReport:
    from ..engine.stream import Streamer  # imports torch

    report = VerifyReport()
    _check_layout(plan, report)
    streamer = Streamer(plan.block_bytes, expect=plan.input_identity())
    try:
        for group in plan.groups:
            writers = {}
            for i, f in enumerate(group.files):
                path = os.path.join(plan.options.save_dir, f.relpath)
                if not os.path.isfile(path):
                    continue
                try:
                    reader = plan.format.open_reader(path, f)
                except Exception as e:  # noqa: BLE001 - any unreadable file is a finding, not a crash
                    report.add(f.relpath, f"unreadable as a {plan.format.name} checkpoint file ({type(e).__name__}: {e})")
                    continue
                report.files_checked += 1
                reader.check(f, plan.args, report)
                writers[i] = _CompareWriter(f.relpath, path, reader, report)
            if writers:
                streamer.run_group(group, writers)
            for w in writers.values():
                w.close()
    finally:
        streamer.close()
    return report


def _sampled(e) -> bool:
    """The entries :func:`sample_mismatch` compares: every 1-D tensor (norms, biases) and all of layer 0's."""
    return e.kind is EntryKind.TENSOR and (len(e.shape) == 1 or e.key.startswith(_LAYER0))


_LAYER0 = "decoder.layers.0."


def sample_mismatch(plan: Plan) -> str | None:
    """Compare a sample of every planned file's tensors with a fresh conversion of the input.

    The sample is every 1-D tensor (the norms and biases of every layer) and every
    tensor of each stage's first layer: the checkpoint a fine-tune (full, or
    adapters merged into every layer) made from the same base model, with the same
    file names and sizes, differs there. It reads a small part of the input.
    Returns the first difference, or None.
    """
    report = VerifyReport()
    with deferred():
        from ..engine.stream import Streamer  # imports torch

        streamer = Streamer(plan.block_bytes, expect=plan.input_identity())
        try:
            for group in plan.groups:
                steps = [[(i, e) for i, e in step if _sampled(e)] for step in group.steps]
                sub = StreamGroup(group.index, group.layers, group.files, [s for s in steps if s])
                writers = {}
                try:
                    for i, f in enumerate(group.files):
                        path = os.path.join(plan.options.save_dir, f.relpath)
                        writers[i] = _CompareWriter(f.relpath, path, plan.format.open_reader(path, f), report)
                    streamer.run_group(sub, writers)
                except Exception as e:  # noqa: BLE001 - an unreadable file is a difference, not a crash
                    if isinstance(e, InputError):
                        raise
                    report.add(group.files[0].relpath, f"unreadable ({type(e).__name__})")
                finally:
                    for w in writers.values():
                        w.close()
                if report.problems:
                    where, what = report.problems[0]
                    return f"{where}: {what}"
        finally:
            streamer.close()
    return None


def verify(load_dir: str, save_dir: str, base: ConvertOptions | None = None,
           progress: Progress | None = None) -> VerifyReport:
    o = options_from_output(load_dir, save_dir, base)
    plan = build_plan(o)
    report = verify_plan(plan, progress)
    report.peak_rss = memory.peak_rss()
    return report
