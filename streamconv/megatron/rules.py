"""Declarative mapping rules: which source rectangles make a parameter's share at a rank.

Every transformation this converter does — mindformers layout fixes (qkv
regrouping, fc1 de-interleaving, legacy split q/k/v and gate/up, stacked and
transposed experts), the TP/ETP split, expert selection by EP rank, the vocab
trim/pad — is a selection of source rows and columns. A rule is a small frozen
object that answers, for a :class:`~.parallel.Rank`, "which pieces,
concatenated along dim 0, form my tensor?", without touching data. Rules take
their source as a :class:`~.pieces.Ref` or as an :class:`ExpertRef`, which
resolves to one expert of a stacked tensor at the rank's EP index.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.options import Fc1Layout, QkvLayout
from ..sources.tensor import SourceTensor
from .parallel import Axis, Rank
from .pieces import Piece, Ref, merge


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
