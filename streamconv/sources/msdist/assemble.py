"""From a strategy and every rank file's header: the pieces that tile each full tensor.

For every parameter with a layout this builds a :class:`FullTensor` (full
shape, dtype) and its :class:`Piece` list: which rank file, which tensor entry,
which box of the full tensor. One piece per distinct box; where several ranks
hold the same box (replicas), the lowest rank of the parameter's lowest stage
supplies it. Only headers are read.

``"remove_redundancy": "True"`` in a rank file's ``__metadata__`` means a
replicated slice was saved by only one rank of those holding it; the piece is
then found by looking through every rank that holds the same box (in any stage
that holds the parameter).

Skipped, as :mod:`streamconv.names` does for merged checkpoints: optimizer
states (``adam_m.*``, ...), step scalars, dropout placeholders. Entries of rank
files that have no layout are not weights (MindSpore's merge puts them in
``hyper_param.safetensors``); one that looks like a model weight is refused,
since it means the strategy is not this run's.

Refused, one line naming the parameter and rank: a rank file whose tensor shape
or dtype disagrees with the strategy, a tensor a non-deduplicated rank should
hold but does not, a box no rank holds, pieces that overlap or leave a gap, a
layout the slicing rule does not support, rank files that are not the
strategy's world (missing or extra ranks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...core.errors import InputError
from ..schemes import EntryClass, classify
from ..header import SafetensorsHeader, TensorInfo, read_header
from .boxes import full_shape_from_piece, rank_box
from .ranks import RankSet
from .strategy import Strategy

#: entries every input sets aside (optimizer states, step scalars, placeholders, runtime buffers)
_SKIP_KINDS = tuple(k for k in EntryClass if k not in (EntryClass.WEIGHT, EntryClass.UNKNOWN))


@dataclass(frozen=True)
class Piece:
    """One rank file's slice: ``info`` (in ``path``) holds ``box`` of the full tensor."""

    rank: int  # global rank
    path: str
    name: str  # entry name in the rank file (the full parameter name)
    info: TensorInfo
    box: tuple  # ((start, stop), ...) per dimension, in full-tensor coordinates

    @property
    def shape(self) -> tuple:
        return tuple(b - a for a, b in self.box)


@dataclass(frozen=True)
class FullTensor:
    """A full parameter as MindSpore's merge would write it, and the pieces tiling it."""

    name: str
    shape: tuple
    dtype: str
    stages: tuple  # pipeline stages holding it (several for a shared embedding)
    pieces: tuple  # Piece, ordered by box (row-major)

    @property
    def nbytes(self) -> int:
        return sum(p.info.nbytes for p in self.pieces)


@dataclass
class DistCheckpoint:
    """Everything the reader of a per-rank checkpoint needs, from headers alone."""

    ranks: RankSet
    strategy: Strategy
    headers: dict  # global rank -> SafetensorsHeader
    tensors: dict = field(default_factory=dict)  # name -> FullTensor, lowest stage first
    skipped: dict = field(default_factory=dict)  # kind -> count of distinct names ("optimizer", "step", ...)
    no_layout: list = field(default_factory=list)  # other rank-file entries without a layout (not weights)

    @property
    def bytes_to_read(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _read_headers(ranks: RankSet) -> dict:
    return {r: read_header(f.path) for r, f in sorted(ranks.files.items())}


def _check_world(ranks: RankSet, strategy: Strategy) -> None:
    world = strategy.world_size
    if ranks.world_size != world:
        if ranks.world_size < world:
            raise InputError(
                f"{ranks.checkpoint_dir}: rank {ranks.world_size} is missing: the strategy lays parameters out over "
                f"{world} ranks ({len(strategy.stages)} stage(s) x {strategy.stage_device_num} devices) but only "
                f"ranks 0..{ranks.world_size - 1} have files"
            )
        raise InputError(
            f"{ranks.checkpoint_dir}: rank {world} and above have files but the strategy lays parameters out over "
            f"{world} ranks ({len(strategy.stages)} stage(s) x {strategy.stage_device_num} devices); "
            "the strategy is not this run's"
        )


def _redundancy_removed(hdr: SafetensorsHeader) -> bool:
    return hdr.metadata.get("remove_redundancy", "False") == "True"


def _check_tiling(name: str, shape: tuple, boxes: list, owners: dict) -> None:
    """Distinct ``boxes`` must tile ``shape`` exactly: a grid of per-dimension partitions.

    Per dimension the distinct intervals must partition ``[0, size)``; then the
    boxes are cells of that grid, and as many distinct cells as the grid has
    cover it exactly once.
    """
    count = 1
    for d, full in enumerate(shape):
        ivs = sorted({b[d] for b in boxes})
        pos, prev = 0, None
        for iv in ivs:
            a, b = iv
            if a < pos:
                r1 = owners[next(x for x in boxes if x[d] == prev)]
                r2 = owners[next(x for x in boxes if x[d] == iv)]
                raise InputError(
                    f"parameter {name!r}: the pieces of rank {r1} ({list(prev)}) and rank {r2} ({list(iv)}) "
                    f"overlap in dimension {d}; the strategy does not match the rank files"
                )
            if a > pos:
                raise InputError(
                    f"parameter {name!r}: no rank holds [{pos}, {a}) of dimension {d} (size {full}); "
                    "the strategy does not match the rank files"
                )
            pos, prev = b, iv
        if pos != full:
            raise InputError(
                f"parameter {name!r}: no rank holds [{pos}, {full}) of dimension {d} (size {full}); "
                "the strategy does not match the rank files"
            )
        count *= len(ivs)
    if count != len(boxes):
        raise InputError(
            f"parameter {name!r}: its {len(boxes)} distinct pieces do not fill the {count}-cell grid their "
            "boundaries imply; the strategy does not match the rank files"
        )


def _assemble_one(name: str, strategy: Strategy, headers: dict, ranks: RankSet) -> FullTensor:
    per_stage = strategy.for_param(name)
    ndev = strategy.stage_device_num
    holders = [  # (global rank, local rank, layout, TensorInfo or None), lowest stage first
        (s * ndev + q, q, lay, headers[s * ndev + q].tensors.get(name))
        for s, lay in per_stage.items()
        for q in range(ndev)
    ]
    first = next((h for h in holders if h[3] is not None), None)
    if first is None:
        raise InputError(
            f"parameter {name!r} has a layout in the strategy but is in none of the rank files "
            f"(ranks of stage(s) {list(per_stage)}); the strategy is not this run's"
        )
    g0, q0, lay0, info0 = first
    primary = next(iter(per_stage))  # the lowest stage's ranks define the tiling
    shape = full_shape_from_piece(lay0, info0.shape, q0)
    if lay0.tensor_shape is not None and len(lay0.tensor_shape) == len(shape) and tuple(lay0.tensor_shape) != shape:
        raise InputError(
            f"parameter {name!r}: rank {g0}'s piece {list(info0.shape)} implies full shape {list(shape)} but the "
            f"strategy ({lay0.source}) records {list(lay0.tensor_shape)}"
        )
    candidates: dict = {}  # box -> [(global rank, info)], in holder order
    needed, owners = [], {}
    for g, q, lay, info in holders:
        box = rank_box(lay, shape, q)
        want = tuple(b - a for a, b in box)
        if info is not None:
            if info.shape != want:
                raise InputError(
                    f"parameter {name!r}, rank {g} ({ranks.files[g].path}): shape {list(info.shape)} but the "
                    f"strategy gives this rank a {list(want)} piece of {list(shape)}; the strategy does not "
                    "match the rank files"
                )
            if info.dtype != info0.dtype:
                raise InputError(
                    f"parameter {name!r}: rank {g} stores {info.dtype} but rank {g0} stores {info0.dtype}; "
                    "the rank files are not of one run"
                )
            candidates.setdefault(box, []).append((g, info))
        elif not _redundancy_removed(headers[g]):
            raise InputError(
                f"parameter {name!r}: rank {g}'s file {ranks.files[g].path} lacks it although its strategy "
                "lays it out there and the file was not saved with remove_redundancy"
            )
        if lay.stage == primary and box not in owners:
            needed.append(box)
            owners[box] = g
    _check_tiling(name, shape, needed, owners)
    pieces = []
    for box in sorted(needed):
        got = candidates.get(box)
        if not got:
            raise InputError(
                f"parameter {name!r}: no rank file holds its piece {[list(b) for b in box]} (rank {owners[box]} "
                "and the ranks replicating it saved it with remove_redundancy and none kept it); "
                "a rank file is missing or incomplete"
            )
        g, info = got[0]
        pieces.append(Piece(g, ranks.files[g].path, name, info, box))
    return FullTensor(name, shape, info0.dtype, tuple(per_stage), tuple(pieces))


def assemble(ranks: RankSet, strategy: Strategy, headers: dict | None = None) -> DistCheckpoint:
    """Build the :class:`DistCheckpoint` of ``ranks`` under ``strategy`` (reads headers unless given)."""
    _check_world(ranks, strategy)
    headers = headers if headers is not None else _read_headers(ranks)
    ckpt = DistCheckpoint(ranks, strategy, headers)
    ndev = strategy.stage_device_num
    for name in strategy.names():
        kind = classify(name).kind
        if kind in _SKIP_KINDS:
            ckpt.skipped[kind.value] = ckpt.skipped.get(kind.value, 0) + 1
            continue
        ckpt.tensors[name] = _assemble_one(name, strategy, headers, ranks)
    laid_out = set(strategy.names())
    seen_without = {}
    for g, hdr in sorted(headers.items()):
        stage = g // ndev
        for name in hdr.tensors:
            if name in laid_out:
                if stage not in strategy.for_param(name):
                    raise InputError(
                        f"parameter {name!r} is in rank {g}'s file ({ranks.files[g].path}) but the strategy of "
                        f"stage {stage} has no layout for it; the strategy is not this run's"
                    )
                continue
            if name in seen_without:
                continue
            seen_without[name] = g
            nc = classify(name)
            if nc.kind in _SKIP_KINDS:
                ckpt.skipped[nc.kind.value] = ckpt.skipped.get(nc.kind.value, 0) + 1
            elif nc.kind is EntryClass.WEIGHT:
                raise InputError(
                    f"parameter {name!r} is in rank {g}'s file ({ranks.files[g].path}) but has no layout in the "
                    "strategy; the strategy is not this run's (give the strategy the files were saved with)"
                )
            else:
                ckpt.no_layout.append(name)
    return ckpt


def open_distributed(load_dir: str, strategy_path: str | None = None, step: int | None = None) -> DistCheckpoint:
    """Discover the rank files under ``load_dir``, load the strategy, and assemble (headers only)."""
    from .ranks import discover
    from .strategy import load_strategy

    ranks = discover(load_dir, strategy_path, step)
    return assemble(ranks, load_strategy(ranks.strategy_path))
