"""``verify``: recompute every output tensor from the source and compare bytes.

The model configuration comes from the output's own ``args``; the plan is
rebuilt from the source headers exactly as ``convert`` would build it, and the
same stream (same memory budget) feeds a comparing sink instead of a writer.
Besides tensor bytes it checks the layout (tracker, the set of rank files, no
leftovers), every rank file's top-level values, the key list and order, the
``_extra_state`` values and the load-path ``args``. Every mismatch is reported
by rank file and key.
"""

from __future__ import annotations

import mmap
import os
import zipfile
from dataclasses import dataclass, field

import numpy as np

from . import memory
from .errors import InputError, PathError
from .megatron_args import megatron_args
from .options import ConvertOptions
from .plan import ITERATION_DIR, RANK_FILE, TRACKER, Plan, build_plan
from .progress import Progress
from .rankfile_reader import RankFileReader, TensorRecord
from .savedir import MANIFEST, TEMP_SUFFIX
from .stream import Sink, Streamer

TOP_LEVEL = ("args", "checkpoint_version", "iteration", "model", "num_floating_point_operations_so_far")


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

    def as_dict(self) -> dict:
        return {"ok": self.ok, "problems": [f"{w}: {m}" for w, m in self.problems],
                "files_checked": self.files_checked, "tensors_checked": self.tensors_checked,
                "bytes_compared": self.bytes_compared}


class _CompareSink(Sink):
    """Compares the streamed expected bytes with the rank file's storage records."""

    def __init__(self, rel: str, reader: RankFileReader, report: VerifyReport):
        self.rel, self.reader, self.report = rel, reader, report
        fd = os.open(reader.path, os.O_RDONLY)
        try:
            self.map = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self.cursor = self.end_at = 0
        self.entry = None
        self.bad = False

    def begin(self, entry):
        self.entry, self.bad = entry, False
        rec = self.reader.state["model"].get(entry.key)
        if not isinstance(rec, TensorRecord):
            self.bad = True  # already reported by the structure check
            return
        off, size, _ = self.reader.record(rec.storage.key)
        self.start = self.cursor = off + rec.offset * rec.storage.itemsize
        self.end_at = off + size

    def data(self, mv):
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
            elem = (self.cursor - self.start + first) // 2
            self.report.add(self.rel, f"{self.entry.key}: bytes differ from the source's conversion "
                                      f"(first at element {elem})")
            self.bad = True
        del got, want
        page = mmap.PAGESIZE
        lo = (self.cursor // page) * page
        self.map.madvise(mmap.MADV_DONTNEED, lo, min(len(self.map), self.cursor + n) - lo)
        self.cursor += n
        self.report.bytes_compared += n

    def end(self, entry):
        self.report.tensors_checked += 1

    def close(self):
        try:
            self.map.close()
        except BufferError:  # pragma: no cover
            pass


def _same(a, b) -> bool:
    return type(a) is type(b) and a == b


def _check_structure(rel: str, reader: RankFileReader, rf, args_expected, report: VerifyReport) -> None:
    st = reader.state
    if not isinstance(st, dict):
        report.add(rel, "top level is not a dict")
        return
    for k in TOP_LEVEL:
        if k not in st:
            report.add(rel, f"top-level key {k!r} missing")
    extra = set(st) - set(TOP_LEVEL) - {"rerun_state_machine"}
    if extra:
        report.add(rel, f"unexpected top-level keys {sorted(extra)}")
    for k, v in (("checkpoint_version", 3.0), ("iteration", 1), ("num_floating_point_operations_so_far", 0)):
        if k in st and not _same(st[k], v):
            report.add(rel, f"{k} is {st[k]!r}, expected {v!r}")
    args = st.get("args")
    if args is not None:
        got = vars(args)
        for k, v in vars(args_expected).items():
            if k not in got:
                report.add(rel, f"args.{k} missing (expected {v!r})")
            elif not _same(got[k], v):
                report.add(rel, f"args.{k} is {got[k]!r}, expected {v!r}")
    model = st.get("model")
    if not isinstance(model, dict):
        report.add(rel, "model is not a dict")
        return
    want_keys = [e.key for e in rf.entries]
    if list(model.keys()) != want_keys:
        missing = [k for k in want_keys if k not in model]
        unexpected = [k for k in model if k not in want_keys]
        if missing:
            report.add(rel, f"missing keys: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            report.add(rel, f"unexpected keys: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if not missing and not unexpected:
            report.add(rel, "keys are in a different order than Megatron's")
    for e in rf.entries:
        v = model.get(e.key, "<missing>")
        if isinstance(v, str):
            continue
        if e.kind == "none":
            if v is not None:
                report.add(rel, f"{e.key}: expected None")
            continue
        if not isinstance(v, TensorRecord):
            report.add(rel, f"{e.key}: expected a tensor, found {type(v).__name__}")
            continue
        if v.storage.dtype != e.dtype:
            report.add(rel, f"{e.key}: dtype {v.storage.dtype}, expected {e.dtype}")
        if v.shape != tuple(e.shape):
            report.add(rel, f"{e.key}: shape {list(v.shape)}, expected {list(e.shape)}")
        if not v.contiguous:
            report.add(rel, f"{e.key}: not contiguous")
        try:
            off, size, _ = reader.record(v.storage.key)
            if (v.offset + v.numel) * v.storage.itemsize > size:
                report.add(rel, f"{e.key}: storage record too small")
        except KeyError:
            report.add(rel, f"{e.key}: storage record data/{v.storage.key} missing")
            continue
        if e.kind == "bytes":
            with open(reader.path, "rb") as f:
                f.seek(off + v.offset)
                if f.read(len(e.data)) != e.data or v.numel != len(e.data):
                    report.add(rel, f"{e.key}: value differs from Megatron's _extra_state")


def _check_layout(plan: Plan, report: VerifyReport) -> None:
    root = plan.options.save_dir
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        report.add(TRACKER, "missing: the checkpoint is incomplete (Megatron will not find it)")
    elif open(tracker, "rb").read() != b"1":
        report.add(TRACKER, f"holds {open(tracker, 'rb').read()[:20]!r}, expected '1'")
    if os.path.exists(os.path.join(root, MANIFEST)):
        report.add(MANIFEST, "present: an interrupted streamconv run was never finished (use --resume)")
    want = {f.relpath for f in plan.files}
    it = os.path.join(root, ITERATION_DIR)
    if os.path.isdir(it):
        for d in sorted(os.listdir(it)):
            for name in sorted(os.listdir(os.path.join(it, d))) if os.path.isdir(os.path.join(it, d)) else []:
                rel = f"{ITERATION_DIR}/{d}/{name}"
                if name.endswith(TEMP_SUFFIX):
                    report.add(rel, "leftover temporary file")
                elif rel not in want and name == RANK_FILE:
                    report.add(rel, "rank file not expected for this TP/PP")
    for rel in sorted(want):
        if not os.path.isfile(os.path.join(root, rel)):
            report.add(rel, "missing")


def options_from_output(load_dir: str, save_dir: str, base: ConvertOptions | None = None) -> ConvertOptions:
    """Rebuild the conversion options from the ``args`` stored in the output."""
    it = os.path.join(save_dir, ITERATION_DIR)
    candidates = []
    if os.path.isdir(it):
        for d in sorted(os.listdir(it)):
            p = os.path.join(it, d, RANK_FILE)
            if os.path.isfile(p):
                candidates.append(p)
    if not os.path.isdir(save_dir):
        raise PathError(f"--save-dir {save_dir} does not exist")
    args = keys = None
    for p in candidates:
        try:
            st = RankFileReader(p).state
            args, keys = st["args"], list(st["model"].keys())
            break
        except Exception:  # noqa: BLE001 - try the next rank file
            continue
    if args is None:
        raise InputError(f"{save_dir}: no readable rank file under {ITERATION_DIR}/ to take the model configuration from")
    a = vars(args)
    o = base or ConvertOptions(load_dir=load_dir)
    o.load_dir, o.save_dir = load_dir, save_dir
    o.target_tensor_parallel_size = a.get("tensor_model_parallel_size", 1)
    o.target_pipeline_parallel_size = a.get("pipeline_model_parallel_size", 1)
    o.num_layers = a.get("num_layers")
    o.hidden_size = a.get("hidden_size")
    o.ffn_hidden_size = a.get("ffn_hidden_size")
    o.num_attention_heads = a.get("num_attention_heads")
    o.num_query_groups = a.get("num_query_groups")
    o.kv_channels = a.get("kv_channels")
    o.seq_length = a.get("seq_length")
    o.max_position_embeddings = a.get("max_position_embeddings")
    o.position_embedding_type = a.get("position_embedding_type", "rope")
    o.normalization = a.get("normalization")
    o.make_vocab_size_divisible_by = a.get("make_vocab_size_divisible_by", 128)
    o.tokenizer_type = a.get("tokenizer_type", "HuggingFaceTokenizer")
    for k in ("rotary_base", "rotary_percent", "rotary_interleaved", "attention_dropout", "hidden_dropout"):
        if k in a:
            setattr(o, k, a[k])
    o.group_query_attention = bool(a.get("group_query_attention", False))
    o.padded_vocab_override = a.get("padded_vocab_size")
    impl = a.get("transformer_impl")
    if impl not in ("local", "transformer_engine"):
        impl = "transformer_engine" if any(k.endswith("linear_qkv.layer_norm_weight") for k in keys) else "local"
    o.saver_transformer_impl = impl
    return o


def verify_plan(plan: Plan, progress: Progress | None = None) -> VerifyReport:
    """Compare the save directory of ``plan`` with a fresh conversion of its source."""
    report = VerifyReport()
    _check_layout(plan, report)
    args_expected = megatron_args(plan.config, plan.options)
    streamer = Streamer(plan.block_bytes)
    try:
        for stage in plan.stages:
            readers, sinks, files = [], [], []
            for rf in stage.files:
                path = os.path.join(plan.options.save_dir, rf.relpath)
                if not os.path.isfile(path):
                    continue
                try:
                    reader = RankFileReader(path)
                except (OSError, zipfile.BadZipFile, ValueError, EOFError, Exception) as e:  # noqa: BLE001
                    report.add(rf.relpath, f"unreadable as a torch checkpoint ({type(e).__name__}: {e})")
                    continue
                report.files_checked += 1
                _check_structure(rf.relpath, reader, rf, args_expected, report)
                readers.append(reader)
                files.append(rf)
                sinks.append(_CompareSink(rf.relpath, reader, report))
            if files:
                streamer.run_stage(files, sinks)
            for s in sinks:
                s.close()
    finally:
        streamer.close()
    return report


def verify(load_dir: str, save_dir: str, base: ConvertOptions | None = None,
           progress: Progress | None = None) -> VerifyReport:
    o = options_from_output(load_dir, save_dir, base)
    plan = build_plan(o)
    report = verify_plan(plan, progress)
    report.peak_rss = memory.peak_rss()
    return report
