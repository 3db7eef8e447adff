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
from ..formats import get_format
from ..formats.base import PlanInput, RankEntries, StagePlan
from ..megatron.args import megatron_args
from ..megatron.entries import resolve
from ..megatron.layout import stage_entries, stage_layers
from ..megatron.parallel import ParallelSizes, Rank, check_model, stage_ranks
from ..model.config import ModelConfig
from ..model.resolve import check_layers, resolve_config
from ..sources.hints import hf_config
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

    def fingerprint(self) -> dict:
        """What must be equal for ``--resume`` to continue a run."""
        opts = self.options.fingerprint()
        opts["load_dir"] = os.path.abspath(self.options.load_dir)
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
    if o.target_expert_parallel_size not in (None, 1):
        raise FlagError(f"--target-expert-parallel-size {o.target_expert_parallel_size}: these are dense models; use 1")
    fmt = get_format(o.ckpt_format)
    model_config = _read_model_config(o)  # before the weights: an unsupported architecture is named first
    index = index_checkpoint(o.load_dir)
    o.check()
    config_notes = _apply_model_config(o, index, model_config)
    cfg = resolve_config(index, o)
    sizes = ParallelSizes.from_options(o)
    check_model(cfg, sizes)
    check_layers(index, cfg)
    if on_source is not None:
        on_source(index)
    scheme = index.scheme
    layouts = scheme.source_layouts(o)
    args = megatron_args(cfg, o, sizes)
    input_fp = index.fingerprint()
    stages = []
    for p in range(sizes.pp):
        specs = stage_entries(cfg, index.tensors, p, sizes.pp, o.saver_transformer_impl, layouts)
        ranks = [RankEntries(c, [resolve(s, Rank(c, sizes)) for s in specs]) for c in stage_ranks(sizes, p)]
        stages.append(StagePlan(p, stage_layers(cfg, sizes.pp, p), ranks))
    # File ids derive from what the output is (its args and the weights it holds), not from how the input
    # files or flags were spelled: the same weights under another naming scheme (a Hugging Face model and
    # the mindformers checkpoint made from it) converted to the same args give byte-identical files.
    seed = [sorted(vars(args).items()), sorted((k, list(t.shape)) for k, t in index.tensors.items())]
    fplan = fmt.plan(PlanInput(stages, sizes, args, seed))

    src = index.tensors
    largest_layer = max(_layer_source_bytes(index).values())
    largest_tensor = max(t.nbytes for t in src.values())
    max_row = 0
    for t in src.values():
        rows = t.shape[0] if t.shape else 1
        max_row = max(max_row, t.nbytes // max(rows, 1))
    floor = memory.floor_bytes() if floor is None else floor
    explicit = o.max_memory is not None
    budget = o.max_memory if explicit else memory.default_budget(largest_layer)
    block, predicted = memory.plan_blocks(budget, floor, max_row, largest_tensor, explicit)
    notes = []
    notes += config_notes
    notes += scheme.notes(cfg, o)
    notes += _vocab_notes(cfg, sizes.tp)
    if cfg.inferred:
        notes.append("inferred from shapes: " + ", ".join(cfg.inferred))
    notes += index.skipped.lines()
    notes += list(o.notices)
    return Plan(o, index, cfg, sizes, fmt, fplan.groups, fplan.final_files, args, budget, explicit, block,
                floor, predicted, notes, input_fp)


def _read_model_config(o: ConvertOptions):
    """The Hugging Face config.json named by --model-config or beside the input (None if there is none)."""
    if not os.path.exists(o.load_dir):
        return None  # locate names the missing path
    path = hf_config.find(o.load_dir, o.model_config)
    return None if path is None else hf_config.load(path, explicit=bool(o.model_config))


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _apply_model_config(o: ConvertOptions, index: SourceIndex, mc) -> list:
    """Fill the option fields the user did not set from the model config; return the notes saying so.

    Stand-in for the generic "flag given > config file > default" plumbing (issue 8 item 12): the
    hints are ``option field -> (value, origin)`` from :meth:`HfConfig.collect`.
    """
    if mc is None:
        if index.scheme.needs_model_config:
            raise InputError(
                f"{o.load_dir}: {index.scheme.description} without a config.json beside them; streamconv needs the "
                "model's config.json to tell the architecture (other models share these names) and the values the "
                "weights cannot tell: put it beside the weights or pass --model-config FILE"
            )
        return []
    hints, drop, notes = mc.collect(index.tensors)
    for name in drop:
        index.tensors.pop(name, None)
    taken, kept = [], []
    for fld, (value, origin) in hints.items():
        if o.was_given(fld):
            if getattr(o, fld) != value:
                kept.append(f"{_flag(fld)} {getattr(o, fld)} (given) instead of {origin} {value}")
            continue
        setattr(o, fld, value)
        taken.append(f"{fld}={value} ({origin.split(' ', 1)[1]})")
    if o.max_position_embeddings is not None and o.max_position_embeddings < o.seq_length \
            and not o.was_given("max_position_embeddings"):
        raise FlagError(f"--seq-length {o.seq_length} is longer than {mc.name} max_position_embeddings "
                        f"{o.max_position_embeddings}; pass a shorter --seq-length (or --max-position-embeddings)")
    out = [f"from {mc.path} ({mc.architecture}): " + (", ".join(taken) if taken else "nothing (all given)")]
    out += kept
    # recorded in args, but Megatron's load_args_from_checkpoint does not read them back
    unread = {}
    if o.norm_epsilon is not None:
        unread["norm_epsilon"] = f"--norm-epsilon {o.norm_epsilon:g}"
    if o.use_rope_scaling:
        unread["use_rope_scaling"] = "--use-rope-scaling"
    if unread:
        out.append(f"Megatron does not read {' or '.join(unread)} from the checkpoint (--use-checkpoint-args): "
                   f"run it with {' '.join(unread.values())}")
    return out + notes


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
