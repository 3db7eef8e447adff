"""One declarative mapping per parameter kind: which source rows make each TP rank's tensor.

Every transformation this converter does — mindformers layout fixes (qkv
regrouping, fc1 de-interleaving, legacy split q/k/v and w1/w3), the TP split, the
vocab trim/pad — is a *selection of source rows* (plus, for row-parallel
weights, a column range). A mapping therefore answers, for rank ``r`` of ``R``,
"which :class:`Piece` s, concatenated along dim 0, form my output tensor?",
without touching data. The stream executor reads exactly those rows, block by
block. This keeps all layout knowledge in one readable place and makes the
rules testable on hand-computed index lists.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig
from .source import SourceTensor


@dataclass(frozen=True)
class Piece:
    """Rows ``range(start, stop, step)`` of ``src`` (columns ``col0:col1``), each repeated ``repeat`` times.

    ``repeat > 1`` only occurs for vocab padding, where a single row (the last
    real one) fills the padded rows.
    """

    src: SourceTensor
    start: int
    stop: int
    step: int = 1
    col0: int = 0
    col1: int | None = None
    repeat: int = 1

    @property
    def src_rows(self) -> int:
        return len(range(self.start, self.stop, self.step))

    @property
    def nrows(self) -> int:
        return self.src_rows * self.repeat

    @property
    def ncols(self) -> int:
        shape = self.src.shape
        cols = 1
        for s in shape[1:]:
            cols *= s
        return (self.col1 if self.col1 is not None else cols) - self.col0


def _merge(pieces: list) -> list:
    """Join pieces that continue each other (same source, contiguous rows), for fewer reads."""
    out: list = []
    for p in pieces:
        q = out[-1] if out else None
        if (
            q is not None and q.src is p.src and q.step == 1 and p.step == 1 and q.repeat == 1
            and p.repeat == 1 and q.stop == p.start and q.col0 == p.col0 and q.col1 == p.col1
        ):
            out[-1] = Piece(q.src, q.start, p.stop, 1, q.col0, q.col1)
        else:
            out.append(p)
    return out


# -- split rules ------------------------------------------------------------------

def replicated(src: SourceTensor, r: int, R: int) -> list:
    """Norm weights, q/k layernorm, row-parallel biases: the whole tensor on every rank."""
    return [Piece(src, 0, src.shape[0])]


def split_rows(src: SourceTensor, r: int, R: int) -> list:
    """Column-parallel weight/bias without special layout: contiguous chunk of dim 0."""
    n = src.shape[0] // R
    return [Piece(src, r * n, (r + 1) * n)]


def split_cols(src: SourceTensor, r: int, R: int) -> list:
    """Row-parallel weight (linear_proj, linear_fc2): contiguous chunk of dim 1."""
    n = src.shape[1] // R
    return [Piece(src, 0, src.shape[0], 1, r * n, (r + 1) * n)]


def vocab_rows(src: SourceTensor, padded: int, r: int, R: int) -> list:
    """Embedding / output layer: rank r's share of the table trimmed or padded to ``padded`` rows.

    Megatron's rule: rows past ``padded`` are cut; missing rows repeat the last source row.
    """
    have = src.shape[0]
    n = padded // R
    a, b = r * n, (r + 1) * n
    pieces = []
    if a < have:
        pieces.append(Piece(src, a, min(b, have)))
    pad = b - max(a, have)
    if pad > 0:
        pieces.append(Piece(src, have - 1, have, 1, 0, None, pad))
    return pieces


def qkv_fused(src: SourceTensor, cfg: ModelConfig, layout: str, r: int, R: int) -> list:
    """linear_qkv weight or bias stored as one tensor, in mindformers' ``grouped`` or ``contiguous`` layout.

    Megatron's layout, which rank r receives a contiguous slice of, is per query
    group ``[q heads of g; k of g; v of g]``. ``contiguous`` (``[all Q; all K; all V]``)
    is regrouped here.
    """
    nq, ng, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    per_group = (nq // ng + 2) * d
    gpr = ng // R
    if layout == "grouped":
        return [Piece(src, r * gpr * per_group, (r + 1) * gpr * per_group)]
    q_rows = (nq // ng) * d
    pieces = []
    for g in range(r * gpr, (r + 1) * gpr):
        pieces.append(Piece(src, g * q_rows, (g + 1) * q_rows))
        pieces.append(Piece(src, nq * d + g * d, nq * d + (g + 1) * d))
        pieces.append(Piece(src, nq * d + ng * d + g * d, nq * d + ng * d + (g + 1) * d))
    return _merge(pieces)


def qkv_split(q: SourceTensor, k: SourceTensor, v: SourceTensor, cfg: ModelConfig, r: int, R: int) -> list:
    """Legacy separate wq/wk/wv: interleave them per query group into Megatron's layout."""
    nq, ng, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    q_rows = (nq // ng) * d
    gpr = ng // R
    pieces = []
    for g in range(r * gpr, (r + 1) * gpr):
        pieces.append(Piece(q, g * q_rows, (g + 1) * q_rows))
        pieces.append(Piece(k, g * d, (g + 1) * d))
        pieces.append(Piece(v, g * d, (g + 1) * d))
    return pieces


def fc1_gated(src: SourceTensor, ffn: int, layout: str, r: int, R: int) -> list:
    """Gated linear_fc1 (weight or bias) stored fused: rank r gets ``[gate chunk r; up chunk r]``.

    ``concat``: source is ``[gate; up]``. ``interleaved`` (mindformers' default):
    source rows alternate gate_0, up_0, gate_1, up_1, ... so gate row j is source
    row 2j and up row j is 2j + 1.
    """
    c = ffn // R
    if layout == "concat":
        return [Piece(src, r * c, (r + 1) * c), Piece(src, ffn + r * c, ffn + (r + 1) * c)]
    return [Piece(src, 2 * r * c, 2 * (r + 1) * c, 2), Piece(src, 2 * r * c + 1, 2 * (r + 1) * c, 2)]


def fc1_split(gate: SourceTensor, up: SourceTensor, ffn: int, r: int, R: int) -> list:
    """Legacy separate w1 (gate) / w3 (up)."""
    c = ffn // R
    return [Piece(gate, r * c, (r + 1) * c), Piece(up, r * c, (r + 1) * c)]
