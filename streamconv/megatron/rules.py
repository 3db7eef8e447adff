"""Declarative mapping rules: which source rectangles make a parameter's share at a rank.

Every transformation this converter does — mindformers layout fixes (qkv
regrouping, fc1 de-interleaving, legacy split q/k/v and gate/up, stacked and
transposed experts), the TP/ETP split, expert selection by EP rank, the vocab
trim/pad — is a selection of source rows and columns. A rule is a small frozen
object that answers, for a :class:`~.parallel.Rank`, "which pieces,
concatenated along dim 0, form my tensor?", without touching data. Rules take
their source as a :class:`~.pieces.Ref` or as an :class:`ExpertRef`, which
resolves to one expert of a stacked tensor at the rank's EP index.

Each rule also knows its split (as Megatron-Bridge's per-parameter mappings do):
:meth:`placements` says where the rows of a rank's tensor sit in the whole
parameter (one layer, one expert) and whether that copy is the main replica,
which is what a sharded format (torch_dist) stores. Each placement is a block of
the rank's output rows, because Megatron's shards are: a gated fc1's share is
two shards, gate rows and up rows, at different global offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.options import Fc1Layout, QkvLayout
from ..sources.tensor import SourceTensor
from .parallel import Axis, Rank
from .pieces import Ref, merge


@dataclass(frozen=True)
class ExpertRef:
    """Local expert ``local`` of a stack of ``experts`` [E x rows, cols] blocks: global expert ep x E/EP + local."""

    src: SourceTensor
    experts: int
    local: int
    transposed: bool = False

    def at(self, rank: Rank) -> Ref:
        e, n = rank.of(Axis.EP)
        g = e * (self.experts // n) + self.local
        rows = self.src.shape[0] // self.experts
        return Ref(self.src, g * rows, rows, self.transposed)


@dataclass(frozen=True)
class ExpertOf:
    """Local expert ``local`` among per-expert tensors ``choices`` (one per global expert, Hugging Face style)."""

    choices: tuple
    local: int

    def at(self, rank: Rank) -> Ref:
        e, n = rank.of(Axis.EP)
        return Ref(self.choices[e * (len(self.choices) // n) + self.local])


@dataclass(frozen=True)
class Placement:
    """Rows ``[start, stop)`` of a rank's tensor, as a block of the whole parameter.

    ``shape``: the whole parameter as a matrix (rows, columns), one layer and one
    expert of it; ``offset``: (row, column) where the block starts in it. ``main``:
    this rank's copy is the one Megatron saves (replica id all zeros); the other
    ranks holding the same block hold replicas.
    """

    start: int
    stop: int
    shape: tuple
    offset: tuple
    main: bool


def _is_expert(axis, *srcs) -> bool:
    return axis in (Axis.EP, Axis.ETP) or any(isinstance(s, (ExpertRef, ExpertOf)) for s in srcs)


def _ref(x, rank: Rank) -> Ref:
    """A rule's source as a Ref at ``rank``.

    Rank-dependent references (:class:`ExpertRef`, :class:`ExpertOf`) resolve
    with ``at(rank)``; anything else is a source tensor, stored whole
    (``SourceTensor``) or as per-rank slices (``CompositeTensor``), seen whole.
    """
    if isinstance(x, Ref):
        return x
    at = getattr(x, "at", None)
    return at(rank) if at is not None else Ref(x)


@dataclass(frozen=True)
class Whole:
    """Norm weights, q/k layernorm, row-parallel biases, routers: the whole tensor on every rank."""

    src: object

    def pieces(self, rank: Rank) -> list:
        ref = _ref(self.src, rank)
        return [ref.select(0, ref.shape[0])]

    def placements(self, rank: Rank) -> list:
        rows, cols = _ref(self.src, rank).shape
        return [Placement(0, rows, (rows, cols), (0, 0), rank.is_main(_is_expert(None, self.src)))]


@dataclass(frozen=True)
class Chunk:
    """Contiguous chunk along ``dim`` (0: rows, column-parallel; 1: columns, row-parallel) by ``axis``."""

    src: object
    axis: Axis = Axis.TP
    dim: int = 0

    def pieces(self, rank: Rank) -> list:
        ref = _ref(self.src, rank)
        r, n = rank.of(self.axis)
        rows, cols = ref.shape
        if self.dim == 0:
            c = rows // n
            return [ref.select(r * c, (r + 1) * c)]
        c = cols // n
        return [ref.select(0, rows, 1, r * c, (r + 1) * c)]

    def placements(self, rank: Rank) -> list:
        rows, cols = _ref(self.src, rank).shape
        r, n = rank.of(self.axis)
        main = rank.is_main(_is_expert(self.axis, self.src), (self.axis,))
        if self.dim == 0:
            c = rows // n
            return [Placement(0, c, (rows, cols), (r * c, 0), main)]
        return [Placement(0, rows, (rows, cols), (0, r * (cols // n)), main)]


@dataclass(frozen=True)
class VocabChunk:
    """Embedding / output layer: the rank's share of the table trimmed or padded to ``padded`` rows.

    Megatron's rule: rows past ``padded`` are cut; missing rows repeat the last source row.
    """

    src: object
    padded: int
    axis: Axis = Axis.TP

    def pieces(self, rank: Rank) -> list:
        ref = _ref(self.src, rank)
        r, n = rank.of(self.axis)
        have = ref.shape[0]
        c = self.padded // n
        a, b = r * c, (r + 1) * c
        out = []
        if a < have:
            out.append(ref.select(a, min(b, have)))
        pad = b - max(a, have)
        if pad > 0:
            out.append(ref.select(have - 1, have, repeat=pad))
        return out

    def placements(self, rank: Rank) -> list:
        cols = _ref(self.src, rank).shape[1]
        r, n = rank.of(self.axis)
        c = self.padded // n
        main = rank.is_main(_is_expert(self.axis, self.src), (self.axis,))
        return [Placement(0, c, (self.padded, cols), (r * c, 0), main)]


def _qkv_placements(rank: Rank, axis, heads: int, groups: int, head_dim: int, cols: int, *srcs) -> list:
    """A rank holds whole query groups, each [q heads; k; v] rows: a contiguous block of the whole."""
    r, n = rank.of(axis)
    per_rank = (groups // n) * (heads // groups + 2) * head_dim
    total = groups * (heads // groups + 2) * head_dim
    return [Placement(0, per_rank, (total, cols), (r * per_rank, 0),
                      rank.is_main(_is_expert(axis, *srcs), (axis,)))]


@dataclass(frozen=True)
class QkvFused:
    """linear_qkv weight or bias stored as one tensor, ``grouped`` or ``contiguous``.

    Megatron's layout, of which a rank holds a contiguous share of whole query
    groups, is per group ``[q heads of g; k of g; v of g]``; ``contiguous``
    (``[all Q; all K; all V]``) is regrouped here.
    """

    src: object
    heads: int
    groups: int
    head_dim: int
    layout: QkvLayout = QkvLayout.GROUPED
    axis: Axis = Axis.TP

    def pieces(self, rank: Rank) -> list:
        ref = _ref(self.src, rank)
        r, n = rank.of(self.axis)
        nq, ng, d = self.heads, self.groups, self.head_dim
        per_group = (nq // ng + 2) * d
        gpr = ng // n
        if self.layout == QkvLayout.GROUPED:
            return [ref.select(r * gpr * per_group, (r + 1) * gpr * per_group)]
        q_rows = (nq // ng) * d
        out = []
        for g in range(r * gpr, (r + 1) * gpr):
            out.append(ref.select(g * q_rows, (g + 1) * q_rows))
            out.append(ref.select(nq * d + g * d, nq * d + (g + 1) * d))
            out.append(ref.select(nq * d + ng * d + g * d, nq * d + ng * d + (g + 1) * d))
        return merge(out)

    def placements(self, rank: Rank) -> list:
        cols = _ref(self.src, rank).shape[1]
        return _qkv_placements(rank, self.axis, self.heads, self.groups, self.head_dim, cols, self.src)


@dataclass(frozen=True)
class QkvParts:
    """Separate q / k / v tensors, interleaved per query group into Megatron's layout."""

    q: object
    k: object
    v: object
    heads: int
    groups: int
    head_dim: int
    axis: Axis = Axis.TP

    def pieces(self, rank: Rank) -> list:
        q, k, v = (_ref(x, rank) for x in (self.q, self.k, self.v))
        r, n = rank.of(self.axis)
        d = self.head_dim
        q_rows = (self.heads // self.groups) * d
        gpr = self.groups // n
        out = []
        for g in range(r * gpr, (r + 1) * gpr):
            out.append(q.select(g * q_rows, (g + 1) * q_rows))
            out.append(k.select(g * d, (g + 1) * d))
            out.append(v.select(g * d, (g + 1) * d))
        return out

    def placements(self, rank: Rank) -> list:
        cols = _ref(self.q, rank).shape[1]
        return _qkv_placements(rank, self.axis, self.heads, self.groups, self.head_dim, cols,
                               self.q, self.k, self.v)


def _gated_placements(rank: Rank, axis, ffn: int, cols: int, *srcs) -> list:
    """A rank's [gate_r; up_r] is two blocks of the whole [gate; up]: Megatron shards them apart."""
    r, n = rank.of(axis)
    c = ffn // n
    main = rank.is_main(_is_expert(axis, *srcs), (axis,))
    return [Placement(0, c, (2 * ffn, cols), (r * c, 0), main),
            Placement(c, 2 * c, (2 * ffn, cols), (ffn + r * c, 0), main)]


@dataclass(frozen=True)
class GatedFused:
    """Gated linear_fc1 (weight or bias) stored as one tensor: a rank gets ``[gate chunk; up chunk]``.

    ``concat``: the source is ``[gate; up]``. ``interleaved`` (mindformers'
    default): rows alternate gate_0, up_0, gate_1, ... so gate row j is source
    row 2j and up row j is 2j + 1.
    """

    src: object
    ffn: int
    layout: Fc1Layout = Fc1Layout.CONCAT
    axis: Axis = Axis.TP

    def pieces(self, rank: Rank) -> list:
        ref = _ref(self.src, rank)
        r, n = rank.of(self.axis)
        c, f = self.ffn // n, self.ffn
        if self.layout == Fc1Layout.CONCAT:
            return [ref.select(r * c, (r + 1) * c), ref.select(f + r * c, f + (r + 1) * c)]
        return [ref.select(2 * r * c, 2 * (r + 1) * c, 2), ref.select(2 * r * c + 1, 2 * (r + 1) * c, 2)]

    def placements(self, rank: Rank) -> list:
        return _gated_placements(rank, self.axis, self.ffn, _ref(self.src, rank).shape[1], self.src)


@dataclass(frozen=True)
class GatedParts:
    """Separate gate / up tensors (legacy w1 / w3, Hugging Face gate_proj / up_proj)."""

    gate: object
    up: object
    ffn: int
    axis: Axis = Axis.TP

    def pieces(self, rank: Rank) -> list:
        gate, up = _ref(self.gate, rank), _ref(self.up, rank)
        r, n = rank.of(self.axis)
        c = self.ffn // n
        return [gate.select(r * c, (r + 1) * c), up.select(r * c, (r + 1) * c)]

    def placements(self, rank: Rank) -> list:
        return _gated_placements(rank, self.axis, self.ffn, _ref(self.gate, rank).shape[1], self.gate, self.up)
