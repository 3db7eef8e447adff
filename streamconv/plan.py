"""The planner: the whole conversion worked out from the safetensors headers alone.

A :class:`Plan` says, before any tensor data is read, every PP stage with its
layers, every rank file with its exact size, every key of every rank file with
the source rows it is made of, how many bytes will be read and written, the
stream block size and the predicted peak memory under the budget, the layouts
assumed and what will be skipped. ``streamconv plan`` prints it; ``convert``
executes it; ``verify`` checks a save directory against it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from . import memory
from .checkpoint_pickle import ITEMSIZE, build_pickle
from .config import ModelConfig, resolve_config
from .errors import FlagError, InputError
from .megatron_args import megatron_args
from .megatron_layout import stage_entries
from .options import ConvertOptions
from .sizes import human
from .source import SourceIndex, index_checkpoint
from .torchzip import archive_size

ITERATION_DIR = "iter_0000001"
TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
ARCHIVE_PREFIX = "model_optim_rng"


@dataclass
class OutputEntry:
    """One key of one rank file."""

    key: str
    kind: str  # "tensor" | "none" | "bytes"
    pieces: list = field(default_factory=list)
    shape: tuple = ()
    dtype: str = "bf16"
    data: bytes = b""
    storage_key: str | None = None

    @property
    def nbytes(self) -> int:
        if self.kind == "none":
            return 0
        if self.kind == "bytes":
            return len(self.data)
        n = 1
        for s in self.shape:
            n *= s
        return n * ITEMSIZE[self.dtype]

    @property
    def source_bytes(self) -> int:
        return sum(p.src_rows * p.ncols * p.src.info.itemsize for p in self.pieces)


@dataclass
class RankFile:
    tp: int
    pp: int
    relpath: str
    entries: list
    pickle: bytes
    size: int
    serialization_id: str

    @property
    def data_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def source_bytes(self) -> int:
        return sum(e.source_bytes for e in self.entries)


@dataclass
class Stage:
    index: int
    first_layer: int
    last_layer: int  # exclusive
    files: list


@dataclass
class Plan:
    options: ConvertOptions
    source: SourceIndex
    config: ModelConfig
    stages: list
    budget: int
    budget_explicit: bool
    block_bytes: int
    floor: int
    predicted_peak: int
    notes: list
    input_fp: list = field(default_factory=list)  # input files, sizes, mtimes at planning time

    @property
    def files(self) -> list:
        return [f for s in self.stages for f in s.files]

    @property
    def read_bytes(self) -> int:
        return sum(f.source_bytes for f in self.files)

    @property
    def write_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def fingerprint(self) -> dict:
        """What must be equal for ``--resume`` to continue a run."""
        opts = self.options.fingerprint()
        opts["load_dir"] = os.path.abspath(self.options.load_dir)
        return {"options": opts, "input": self.input_fp,
                "files": {f.relpath: f.size for f in self.files}}


def rank_relpath(tp: int, pp: int, pp_size: int) -> str:
    d = f"mp_rank_{tp:02d}" if pp_size == 1 else f"mp_rank_{tp:02d}_{pp:03d}"
    return f"{ITERATION_DIR}/{d}/{RANK_FILE}"


def _serialization_id(seed: str) -> str:
    """torch.save writes a 40-digit id; ours is derived from the plan so reruns are byte-identical."""
    digits = str(int(hashlib.sha256(seed.encode()).hexdigest(), 16))
    return digits[:40].rjust(40, "0")


def _entry_shape(spec, pieces) -> tuple:
    rows = sum(p.nrows for p in pieces)
    if spec.ndim == 1:
        return (rows,)
    cols = {p.ncols for p in pieces}
    if len(cols) != 1:  # pragma: no cover - mapping bug guard
        raise AssertionError(f"{spec.key}: pieces of different widths")
    return (rows, cols.pop())


def _layer_source_bytes(index: SourceIndex, layer: int) -> int:
    prefix = f"decoder.layers.{layer}."
    return sum(t.info.nbytes for k, t in index.tensors.items() if k.startswith(prefix))


def _layout_notes(cfg: ModelConfig, o: ConvertOptions) -> list:
    notes = []
    if cfg.swiglu and not cfg.fc1_split:
        if o.fc1_layout == "interleaved":
            notes.append(
                "ASSUMED fc1 layout 'interleaved' (mindformers default use_interleaved_weight_layout_mlp: True): "
                "linear_fc1 rows are gate_0, up_0, gate_1, ... and are de-interleaved. If your model was trained "
                "with use_interleaved_weight_layout_mlp: False, rerun with --fc1-layout concat"
            )
        else:
            notes.append("fc1 layout 'concat' (--fc1-layout concat): linear_fc1 is [gate; up], copied as is")
    if not cfg.qkv_split:
        if o.qkv_layout == "grouped":
            notes.append(
                "ASSUMED qkv layout 'grouped' (mindformers default use_contiguous_weight_layout_attention: False): "
                "linear_qkv is [q, k, v] per query group, Megatron's layout. If your model used "
                "use_contiguous_weight_layout_attention: True (mindformers 1.6 default), rerun with --qkv-layout contiguous"
            )
        else:
            notes.append("qkv layout 'contiguous' (--qkv-layout contiguous): linear_qkv [all Q; all K; all V] is regrouped per query group")
    if cfg.qkv_split:
        notes.append("legacy separate wq/wk/wv are fused into Megatron's per-group linear_qkv")
    if cfg.fc1_split:
        notes.append("legacy separate w1 (gate) / w3 (up) are fused into linear_fc1 = [gate; up]")
    return notes


def _vocab_notes(cfg: ModelConfig) -> list:
    v, p = cfg.source_vocab, cfg.padded_vocab_size
    if p > v:
        return [f"vocab padded from {v} to {p} rows by repeating the last row (Megatron's rule: "
                f"multiple of {cfg.tp} x make-vocab-size-divisible-by)"]
    if p < v:
        return [f"vocab trimmed from {v} to {p} rows (rows past the padded size are cut)"]
    return []


def build_plan(o: ConvertOptions, floor: int | None = None, on_source=None) -> Plan:
    """Index the checkpoint's headers, resolve the model and lay out every rank file.

    ``on_source(index)`` is called once the headers are read and the model checked,
    before torch is imported (``convert`` starts prefetching the input there).
    """
    _resolve_vocab_file(o)
    if o.target_expert_parallel_size not in (None, 1):
        raise FlagError(f"--target-expert-parallel-size {o.target_expert_parallel_size}: these are dense models; use 1")
    index = index_checkpoint(o.load_dir)
    cfg = resolve_config(index, o)
    if on_source is not None:
        on_source(index)
    src = index.tensors
    input_fp = index.fingerprint()
    seed_opts = {k: v for k, v in o.fingerprint().items() if k != "load_dir"}
    stages = []
    per = cfg.num_layers // cfg.pp
    for p in range(cfg.pp):
        specs = stage_entries(cfg, src, p, o.saver_transformer_impl, o.fc1_layout, o.qkv_layout)
        files = []
        for r in range(cfg.tp):
            entries, model_entries, storage_sizes = [], [], []
            for spec in specs:
                if spec.kind == "none":
                    entries.append(OutputEntry(spec.key, "none"))
                    model_entries.append((spec.key, None))
                    continue
                skey = str(len(storage_sizes))
                if spec.kind == "bytes":
                    e = OutputEntry(spec.key, "bytes", shape=(len(spec.data),), dtype="uint8",
                                    data=spec.data, storage_key=skey)
                else:
                    pieces = spec.rule(r, cfg.tp)
                    e = OutputEntry(spec.key, "tensor", pieces, _entry_shape(spec, pieces), "bf16", storage_key=skey)
                entries.append(e)
                model_entries.append((e.key, e.dtype, e.shape, skey))
                storage_sizes.append(e.nbytes)
            args = megatron_args(cfg, o)
            pkl = build_pickle(args, model_entries)
            relpath = rank_relpath(r, p, cfg.pp)
            seed = json.dumps([relpath, seed_opts, [(os.path.basename(f), sz) for f, sz, _ in input_fp]],
                              sort_keys=True, default=str)
            sid = _serialization_id(seed)
            size = archive_size(ARCHIVE_PREFIX, len(pkl), storage_sizes, len(sid))
            files.append(RankFile(r, p, relpath, entries, pkl, size, sid))
        stages.append(Stage(p, p * per, (p + 1) * per, files))

    largest_layer = max(_layer_source_bytes(index, i) for i in range(cfg.num_layers))
    largest_tensor = max(t.info.nbytes for t in src.values())
    max_row = 0
    for t in src.values():
        rows = t.shape[0] if t.shape else 1
        max_row = max(max_row, t.info.nbytes // max(rows, 1))
    floor = memory.floor_bytes() if floor is None else floor
    explicit = o.max_memory is not None
    budget = o.max_memory if explicit else memory.default_budget(largest_layer)
    block, predicted = memory.plan_blocks(budget, floor, max_row, largest_tensor, explicit)
    notes = []
    notes += _layout_notes(cfg, o)
    notes += _vocab_notes(cfg)
    if cfg.inferred:
        notes.append("inferred from shapes: " + ", ".join(cfg.inferred))
    notes += index.skipped.lines()
    notes += list(o.notices)
    return Plan(o, index, cfg, stages, budget, explicit, block, floor, predicted, notes, input_fp)


def _resolve_vocab_file(o: ConvertOptions) -> None:
    """``--vocab-file`` (a JSON vocabulary) gives the true vocab size, as in the official loader."""
    if not o.vocab_file:
        return
    try:
        with open(o.vocab_file, "r", encoding="utf-8") as f:
            n = len(json.load(f))
    except (OSError, ValueError) as e:
        raise InputError(f"--vocab-file {o.vocab_file}: cannot read a JSON vocabulary ({e})") from None
    if o.true_vocab_size is not None and o.true_vocab_size != n:
        raise FlagError(f"--true-vocab-size {o.true_vocab_size} contradicts --vocab-file {o.vocab_file} with {n} entries")
    o.true_vocab_size = n


def describe(plan: Plan) -> str:
    """The human-readable schedule printed by ``streamconv plan``."""
    c, o = plan.config, plan.options
    lines = [
        f"input    {plan.source.load_path} ({plan.source.layout}"
        f"{', legacy mindformers names' if plan.source.legacy_names else ''}, {len(plan.source.files)} file(s), "
        f"{len(plan.source.tensors)} weights, {human(plan.source.total_bytes)})",
        f"model    {c.num_layers} layers, hidden {c.hidden_size}, ffn {c.ffn_hidden_size}, heads {c.num_attention_heads}, "
        f"groups {c.num_query_groups}, head dim {c.kv_channels}, vocab {c.source_vocab} -> {c.padded_vocab_size}, "
        f"{c.normalization}, {'swiglu' if c.swiglu else 'gelu'}, "
        f"{'biases' if c.add_bias_linear else ('qkv bias' if c.add_qkv_bias else 'no biases')}, "
        f"{'qk-layernorm, ' if c.qk_layernorm else ''}{'tied' if c.tied else 'untied'} output",
        f"target   TP {c.tp} x PP {c.pp}, BF16, {o.saver_transformer_impl} names -> {o.save_dir}",
    ]
    for st in plan.stages:
        lines.append(f"stage {st.index}: layers {st.first_layer}..{st.last_layer - 1}"
                     + (" + embedding" if st.index == 0 else "")
                     + (" + final norm + output layer" if st.index == c.pp - 1 else ""))
        for f in st.files:
            lines.append(f"  {f.relpath}  {f.size} bytes ({human(f.size)}), {len(f.entries)} keys, "
                         f"reads {human(f.source_bytes)}")
    lines.append(f"read     {human(plan.read_bytes)}   write {human(plan.write_bytes)}")
    lines.append(
        f"memory   budget {human(plan.budget)}{'' if plan.budget_explicit else ' (default: ~one layer)'}, "
        f"floor {human(plan.floor)}, block {human(plan.block_bytes)}, predicted peak {human(plan.predicted_peak)}"
    )
    for n in plan.notes:
        lines.append(f"note     {n}")
    return "\n".join(lines)
