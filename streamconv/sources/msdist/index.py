"""Index per-rank training output: canonical name -> composite tensor, from headers and strategy.

What :func:`streamconv.sources.index.index_checkpoint` does for a merged
checkpoint, done for a per-rank one: :func:`.assemble.open_distributed` finds the
rank files of one step, reads the strategy and every header and checks that the
slices tile each parameter; the parameter names then go through the same naming
schemes (:func:`streamconv.sources.schemes.classify`) as any input, and every
weight becomes a :class:`~.composite.CompositeTensor` over its slices.

Optimizer states and step scalars are skipped and counted as usual; rank-file
entries with no layout that are neither (MindSpore's merge would put them in
``hyper_param.safetensors``) are skipped and named. A parameter with a layout
that no scheme knows is refused, as for any input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ...core.errors import InputError
from ...core.sizes import human
from ..schemes import EntryClass, classify, refusal
from .assemble import DistCheckpoint, open_distributed
from .composite import composite

#: plan lists at most this many rank files one per line (then a count of the rest)
MAX_LISTED_RANKS = 16


@dataclass
class DistIndex:
    """What :class:`~streamconv.sources.index.SourceIndex` needs of a per-rank checkpoint."""

    checkpoint: DistCheckpoint
    tensors: dict  # canonical name -> CompositeTensor
    schemes: set  # names of the schemes whose (unshared) names occur
    files: list  # every rank file, in rank order
    strategy_files: list  # every strategy file read
    details: list = field(default_factory=list)  # (label, text) lines for plan

    @property
    def layout(self) -> str:
        ck = self.checkpoint
        strat = ck.strategy
        stages = len(strat.stages)
        return (f"per-rank training output, {ck.ranks.world_size} ranks"
                + (f" in {stages} pipeline stages" if stages > 1 else "")
                + f", epoch {ck.ranks.epoch} step {ck.ranks.step}")


def index_distributed(load_dir: str, strategy_path: str | None, step: int | None, skipped) -> DistIndex:
    """Assemble the per-rank checkpoint under ``load_dir``; count what is skipped into ``skipped``."""
    ck = open_distributed(load_dir, strategy_path, step)
    tensors: dict = {}
    used = set()
    unknown = []
    for name, full in ck.tensors.items():
        cls = classify(name)
        if cls.kind is not EntryClass.WEIGHT:  # assemble() already set optimizer/step/... entries aside
            why = refusal(name)
            if why:
                p = full.pieces[0]
                raise InputError(f"{p.path} (rank {p.rank}): {why}")
            unknown.append(full)
            continue
        if cls.canonical in tensors:
            other = tensors[cls.canonical]
            raise InputError(
                f"parameters {other.name!r} and {name!r} of the rank files in {ck.ranks.checkpoint_dir} are the "
                f"same weight ({cls.canonical}); the checkpoint mixes two naming schemes"
            )
        if not cls.shared:  # a name several schemes use (lm_head.weight) does not tell the scheme
            used.add(cls.scheme.name)
        tensors[cls.canonical] = composite(cls.canonical, full, ck.ranks.checkpoint_dir, cls.scheme.name)
    if unknown:
        full = unknown[0]
        p = full.pieces[0]
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise InputError(
            f"parameter {full.name!r}{more}, rank {p.rank} ({p.path}): has a layout in the strategy but is neither a "
            "GPT model weight nor a known optimizer/step entry; streamconv converts Llama/Qwen-style GPT "
            "checkpoints only"
        )
    if not tensors:
        raise InputError(f"{ck.ranks.checkpoint_dir}: the rank files hold no model weights (only optimizer or step entries)")
    _count_skipped(ck, skipped)
    files = [f.path for _, f in sorted(ck.ranks.files.items())]
    strategy_files = [sf.path for sf in ck.strategy.files]
    out = DistIndex(ck, tensors, used, files, strategy_files)
    out.details = _details(ck, tensors, strategy_path, step)
    return out


def _count_skipped(ck: DistCheckpoint, skipped) -> None:
    """Entries set aside, each distinct name once (as a merged checkpoint counts them)."""
    names = dict.fromkeys(ck.strategy.names())
    for hdr in ck.headers.values():
        names.update(dict.fromkeys(hdr.tensors))
    kinds = {name: classify(name).kind for name in names}  # once per name, not once per rank file
    for hdr in ck.headers.values():
        for name, info in hdr.tensors.items():
            if kinds[name] is EntryClass.OPTIMIZER:
                skipped.optimizer_bytes += info.nbytes
    for name, kind in kinds.items():
        skipped.set_aside(kind, name)
    if ck.no_layout:
        skipped.other.append((
            f"{len(ck.no_layout)} rank-file entries without a layout (not weights; MindSpore's merge puts them in "
            "hyper_param.safetensors)", ck.no_layout))


def _details(ck: DistCheckpoint, tensors: dict, strategy_path, step) -> list:
    ranks = ck.ranks
    world = ranks.world_size
    sizes = {r: os.path.getsize(f.path) for r, f in ranks.files.items()}
    supplied: dict = {}
    for t in tensors.values():
        for s in t.slices:
            n, b = supplied.get(s.rank, (0, 0))
            supplied[s.rank] = (n + 1, b + s.info.nbytes)
    why = f"--step {step}" if step is not None else "the newest step every rank saved"
    out = [("ranks", f"{world} rank files of epoch {ranks.epoch} step {ranks.step} ({why}) in {ranks.checkpoint_dir}, "
                     f"{human(sum(sizes.values()))}")]
    shown = sorted(ranks.files)
    if len(shown) > MAX_LISTED_RANKS:
        shown = shown[:MAX_LISTED_RANKS // 2] + shown[-MAX_LISTED_RANKS // 2:]
    prev = None
    for r in shown:
        if prev is not None and r != prev + 1:
            out.append(("", f"  ... {r - prev - 1} more rank files"))
        n, b = supplied.get(r, (0, 0))
        rel = os.path.relpath(ranks.files[r].path, ranks.checkpoint_dir)
        out.append(("", f"  rank {r}: {rel} ({human(sizes[r])}), slices of {n} weights ({human(b)}) read from it"))
        prev = r
    strat = ck.strategy
    forms = sorted({sf.form for sf in strat.files})
    scope = "merged" if all(sf.merged for sf in strat.files) else (
        "one per rank" if all(sf.rank is not None for sf in strat.files) else "per stage")
    where = strategy_path if strategy_path is not None else ranks.strategy_path
    names = ", ".join(os.path.basename(sf.path) for sf in strat.files[:4]) + (
        f", ... ({len(strat.files)} files)" if len(strat.files) > 4 else "")
    out.append(("strategy", f"{where}: {len(strat.files)} file(s), {'/'.join(forms)}, {scope}; pipeline stages "
                            f"{strat.stages}, {strat.stage_device_num} devices per stage ({names})"))
    weight_bytes = sum(t.nbytes for t in tensors.values())
    out.append(("slices", f"{len(tensors)} weights from {sum(len(t.slices) for t in tensors.values())} slices, "
                          f"{human(weight_bytes)} of the rank files' {human(sum(sizes.values()))} "
                          "(the rest: optimizer states, replicas, step entries)"))
    return out
