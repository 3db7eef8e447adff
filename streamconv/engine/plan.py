"""The planner: the whole conversion worked out from the safetensors headers alone.

A :class:`Plan` says, before any tensor data is read, every pipeline stage
with its layers, every output file with its exact size, every key of every
file with the source rectangles it is made of, how many bytes will be read and
written, the stream block size and the predicted peak memory under the budget,
the layouts assumed and what will be skipped. ``streamconv plan`` prints it;
``convert`` executes it; ``verify`` checks a save directory against it.

The plan is built in the order of the data flow: :mod:`~streamconv.sources`
(index) -> :mod:`~streamconv.model` (config) -> :mod:`~streamconv.megatron`
(rank coordinates, entries per rank) -> :mod:`~streamconv.formats` (files).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ..core.errors import FlagError, InputError
from ..core.options import ConvertOptions
from ..core.shapes import as_matrix
from ..formats import get_format
from ..formats.base import PlanInput, RankEntries, StagePlan
from ..megatron.args import megatron_args
from ..megatron.entries import resolve
from ..megatron.layout import stage_entries
from ..megatron.parallel import ParallelSizes, Rank, check_model, stage_ranks
from ..model import settings
from ..model.config import ModelConfig
from ..model.resolve import check_layers, resolve_config
from ..sources.hints import find_config, hf_config, read_hints
from ..sources.index import SourceIndex, index_checkpoint
from ..sources.schemes import layer_of
from . import memory


@dataclass
class Plan:
    options: ConvertOptions
    source: SourceIndex
    config: ModelConfig
    sizes: ParallelSizes
    format: object  # formats.base.OutputFormat
    groups: list  # formats.base.StreamGroup, one per pipeline stage
    final_files: list  # (relpath, bytes) written after every data file, the tracker last
    args: object
    budget: int
    budget_explicit: bool
    block_bytes: int
    floor: int
    predicted_peak: int
    notes: list
    input_fp: list = field(default_factory=list)  # input files, sizes, mtimes at planning time

    @property
    def stages(self) -> list:
        return self.groups

    @property
    def files(self) -> list:
        return [f for g in self.groups for f in g.files]

    @property
    def read_bytes(self) -> int:
        return sum(f.source_bytes for f in self.files)

    @property
    def write_bytes(self) -> int:
        """Bytes of the data files (the final files add a few bytes more)."""
        return sum(f.size for f in self.files)

    def input_identity(self) -> dict:
        """abspath -> (size, mtime_ns, inode) of every input file as planned (the stream checks it)."""
        return {f: tuple(ident) for f, *ident in self.input_fp}

    def fingerprint(self) -> dict:
        """What must be equal for ``--resume`` to continue a run."""
        opts = self.options.fingerprint()
        opts["load_dir"] = os.path.abspath(self.options.load_dir)
        if self.options.src_strategy_path is not None:
            opts["src_strategy_path"] = os.path.abspath(self.options.src_strategy_path)
        return {"options": opts, "input": self.input_fp,
                "files": {f.relpath: f.size for f in self.files}}


def _layer_source_bytes(index: SourceIndex) -> dict:
    out: dict = {}
    for k, t in index.tensors.items():
        i = layer_of(k)
        if i is not None:
            out[i] = out.get(i, 0) + t.nbytes
    return out


def _vocab_notes(cfg: ModelConfig, tp: int) -> list:
    v, p = cfg.source_vocab, cfg.padded_vocab_size
    if p > v:
        return [f"vocab padded from {v} to {p} rows by repeating the last row (Megatron's rule: "
                f"multiple of {tp} x make-vocab-size-divisible-by)"]
    if p < v:
        return [f"vocab trimmed from {v} to {p} rows (rows past the padded size are cut)"]
    return []


def build_plan(o: ConvertOptions, floor: int | None = None, on_source=None) -> Plan:
    """Index the checkpoint's headers, resolve the model and lay out every output file.

    ``on_source(index)`` is called once the headers are read and the model checked,
    before torch is imported (``convert`` starts prefetching the input there).
    """
    _resolve_vocab_file(o)
    fmt = get_format(o.ckpt_format)
    index = index_checkpoint(o.load_dir, o.src_strategy_path, o.step)
    config_file = find_config(o.load_dir, o.model_config)
    input_notes = []
    if index.scheme.needs_model_config:  # Hugging Face names: the architecture and dimensions from config.json
        drop, input_notes = hf_config.check_hf_input(config_file, index.tensors, o.load_dir)
        for name in drop:
            del index.tensors[name]
    hints = read_hints(config_file) if config_file else {}
    settings.apply(o, hints)
    o.check()
    cfg = resolve_config(index, o)
    settings.check_rope_scaling(o, cfg)
    input_notes += settings.mtp_note(hints, cfg)
    sizes = ParallelSizes.from_options(o)
    check_model(cfg, sizes)
    check_layers(index, cfg)
    if o.moe_grouped_gemm and o.saver_transformer_impl != "transformer_engine":
        raise FlagError("--moe-grouped-gemm needs --saver-transformer-impl transformer_engine (TEGroupedMLP); the "
                        "local spec's GroupedMLP stores experts differently and is not written")
    if on_source is not None:
        on_source(index)
    scheme = index.scheme
    layouts = scheme.source_layouts(o)
    args = megatron_args(cfg, o, sizes)
    input_fp = index.fingerprint()
    stages = []
    for p in range(sizes.pp):
        specs = stage_entries(cfg, index.tensors, p, sizes, o.saver_transformer_impl, layouts, o.moe_grouped_gemm)
        ranks = [RankEntries(c, [resolve(s, Rank(c, sizes)) for s in specs]) for c in stage_ranks(sizes, p)]
        stages.append(StagePlan(p, sizes.stage_layers(cfg.num_layers, p), ranks))
    # File ids derive from what the output is (its args; the format adds what each file holds), not from how the input
    # files or flags were spelled: the same weights under another naming scheme (a Hugging Face model and
    # the mindformers checkpoint made from it) converted to the same args give byte-identical files.
    seed = [sorted(vars(args).items())]
    fplan = fmt.plan(PlanInput(stages, sizes, args, seed))

    src = index.tensors
    largest_layer = max(_layer_source_bytes(index).values())
    largest_tensor = max(t.nbytes for t in src.values())
    max_row = 0
    for t in src.values():  # a row as read() returns it (an FP8 weight's row comes back as F32)
        max_row = max(max_row, as_matrix(t.shape)[1] * t.itemsize)
    floor = memory.floor_bytes() if floor is None else floor
    explicit = o.max_memory is not None
    budget = o.max_memory if explicit else memory.default_budget(largest_layer)
    block, predicted = memory.plan_blocks(budget, floor, max_row, largest_tensor, explicit, index.assembled)
    notes = []
    notes += input_notes
    notes += scheme.notes(cfg, o)
    notes += _vocab_notes(cfg, sizes.tp)
    if cfg.inferred:
        notes.append("inferred from shapes: " + ", ".join(cfg.inferred))
    if config_file:
        notes.append(f"model config: {config_file}")
    notes += settings.notes(o, cfg)
    notes += index.skipped.lines()
    notes += list(o.notices)
    return Plan(o, index, cfg, sizes, fmt, fplan.groups, fplan.final_files, args, budget, explicit, block,
                floor, predicted, notes, input_fp)


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
