"""Mapping rules on hand-computed index lists (table-driven).

Each source tensor is filled with its own element indices (``arange``), the
rule's pieces are applied with plain numpy slicing, and the result must equal
an expectation written by hand from Megatron's rules (FORMAT.md §2, §6): for
example "rank 1 of 2 of an interleaved gated fc1 with ffn 4 gets source rows
[4, 6, 5, 7]". Nothing here uses the rule classes to compute an expectation.
"""

from __future__ import annotations

import numpy as np
import pytest

from streamconv.megatron import rules as R
from streamconv.megatron.parallel import Axis, ParallelSizes, Rank, RankCoord, stage_ranks
from streamconv.megatron.pieces import Ref
from streamconv.sources.header import TensorInfo
from streamconv.sources.tensor import SourceTensor


def src(name, *shape):
    n = int(np.prod(shape))
    return SourceTensor(name, name, "/nonexistent", TensorInfo(name, "F32", tuple(shape), 0, 4 * n))


def values(t):
    return np.arange(int(np.prod(t.shape))).reshape(t.shape[0], -1)


def apply(pieces):
    """Output matrix of source element indices: the semantics of a piece, in numpy slicing."""
    blocks = []
    for p in pieces:
        m = values(p.src)[p.start:p.stop:p.step, p.col0:p.col1]
        if p.transpose:
            m = m.T
        blocks.append(np.repeat(m, p.repeat, axis=0))
    return np.concatenate(blocks, axis=0)


def rank(tp=0, TP=1, ep=0, EP=1, etp=0, ETP=None):
    return Rank(RankCoord(tp=tp, ep=ep, etp=etp), ParallelSizes(tp=TP, ep=EP, etp=ETP))


W = src("w", 8, 3)  # 8 rows of 3
V = values(W)
B = src("b", 8)
VB = values(B)

CASES = [
    # rule, rank, expected (source element indices, by hand)
    ("whole", R.Whole(W), rank(1, 2), V),
    ("rows r0/2", R.Chunk(W), rank(0, 2), V[[0, 1, 2, 3]]),
    ("rows r1/2", R.Chunk(W), rank(1, 2), V[[4, 5, 6, 7]]),
    ("cols r1/3", R.Chunk(W, dim=1), rank(1, 3), V[:, [1]]),
    ("bias rows r3/4", R.Chunk(B), rank(3, 4), VB[[6, 7]]),
    # gated fc1, ffn 4: concat = [g0 g1 g2 g3 u0 u1 u2 u3]; interleaved = [g0 u0 g1 u1 ...]
    ("gated concat r1/2", R.GatedFused(W, 4, "concat"), rank(1, 2), V[[2, 3, 6, 7]]),
    ("gated interleaved r0/2", R.GatedFused(W, 4, "interleaved"), rank(0, 2), V[[0, 2, 1, 3]]),
    ("gated interleaved r1/2", R.GatedFused(W, 4, "interleaved"), rank(1, 2), V[[4, 6, 5, 7]]),
    ("gated interleaved r0/1", R.GatedFused(W, 4, "interleaved"), rank(0, 1), V[[0, 2, 4, 6, 1, 3, 5, 7]]),
    # vocab: 8 rows padded to 12 over 2 ranks: rank 1 = rows 6, 7 then row 7 four times
    ("vocab pad r1/2", R.VocabChunk(W, 12), rank(1, 2), V[[6, 7, 7, 7, 7, 7]]),
    ("vocab trim r1/2", R.VocabChunk(W, 6), rank(1, 2), V[[3, 4, 5]]),
    ("vocab pad r0/4", R.VocabChunk(W, 16), rank(0, 4), V[[0, 1, 2, 3]]),
    ("vocab pad r3/4", R.VocabChunk(W, 16), rank(3, 4), V[[7, 7, 7, 7]]),
]

# qkv: 4 heads, 2 groups, head dim 1: grouped rows = [q0 q1 k0 v0 | q2 q3 k1 v1];
# contiguous rows = [q0 q1 q2 q3 k0 k1 v0 v1]
QKV = src("qkv", 8, 2)
VQ = values(QKV)
CASES += [
    ("qkv grouped r1/2", R.QkvFused(QKV, 4, 2, 1, "grouped"), rank(1, 2), VQ[[4, 5, 6, 7]]),
    ("qkv contiguous r0/1", R.QkvFused(QKV, 4, 2, 1, "contiguous"), rank(0, 1), VQ[[0, 1, 4, 6, 2, 3, 5, 7]]),
    ("qkv contiguous r1/2", R.QkvFused(QKV, 4, 2, 1, "contiguous"), rank(1, 2), VQ[[2, 3, 5, 7]]),
]
Q, K, Vt = src("q", 4, 2), src("k", 2, 2), src("v", 2, 2)
CASES += [
    ("qkv parts r1/2", R.QkvParts(Q, K, Vt, 4, 2, 1), rank(1, 2),
     np.concatenate([values(Q)[[2, 3]], values(K)[[1]], values(Vt)[[1]]])),
]
G, U = src("g", 4, 3), src("u", 4, 3)
CASES += [
    ("gated parts r1/2", R.GatedParts(G, U, 4), rank(1, 2), np.concatenate([values(G)[[2, 3]], values(U)[[2, 3]]])),
]

# Experts: 4 experts stacked, each stored transposed [in=2, out=2F=4] (mindformers weight1 [E*H, 2F]).
# Expert e is rows [2e, 2e+2) of the stack; Megatron's fc1 of expert e is that block transposed, [4, 2].
STACK = src("weight1", 8, 4)
VS = values(STACK)


def expert_fc1(e):
    return VS[2 * e:2 * e + 2].T  # [2F=4, H=2]: rows gate0 gate1 up0 up1


CASES += [
    # EP 2: rank ep 1 holds experts 2, 3; its local expert 1 is global expert 3
    ("expert local1 ep1/2 whole", R.Whole(R.ExpertRef(STACK, 4, 1, transposed=True)), rank(ep=1, EP=2), expert_fc1(3)),
    ("expert local0 ep0/4 whole", R.Whole(R.ExpertRef(STACK, 4, 0, transposed=True)), rank(ep=0, EP=4), expert_fc1(0)),
    # ETP 2 on a gated expert (F = 2): etp rank 1 gets [gate row 1; up row 1]
    ("expert gated etp1/2", R.GatedFused(R.ExpertRef(STACK, 4, 0, transposed=True), 2, "concat", Axis.ETP),
     rank(ep=1, EP=2, etp=1, ETP=2, TP=2), expert_fc1(2)[[1, 3]]),
    # fc2 of an expert, ETP split by columns of the [out, in] matrix
    ("expert cols etp0/2", R.Chunk(R.ExpertRef(STACK, 4, 1, transposed=True), Axis.ETP, dim=1),
     rank(ep=0, EP=1, etp=0, ETP=2, TP=2), expert_fc1(1)[:, [0]]),
    # a non-transposed stack (per-expert blocks already [out, in])
    ("expert plain ep1/2", R.Chunk(R.ExpertRef(STACK, 4, 0), Axis.ETP), rank(ep=1, EP=2, etp=1, ETP=2, TP=2),
     VS[[5]]),
]


@pytest.mark.parametrize("name,rule,at,want", CASES, ids=[c[0] for c in CASES])
def test_rule(name, rule, at, want):
    got = apply(rule.pieces(at))
    assert got.shape == want.shape and (got == want).all(), f"{name}:\n{got}\n!=\n{want}"


def test_transposed_ref_addresses_logical_rows_and_columns():
    ref = Ref(STACK, 2, 2, transposed=True)  # expert 1: source rows 2..3, seen as [4, 2]
    assert ref.shape == (4, 2)
    assert (apply([ref.select(1, 3, col0=1, col1=2)]) == VS[2:4].T[1:3, 1:2]).all()


@pytest.mark.parametrize("tp,ep,etp,want", [
    # (tp, ep) of every legacy file of a stage, by hand from Megatron's rank generators
    (2, 1, None, [(0, 0), (1, 0)]),
    (1, 4, None, [(0, 0), (0, 1), (0, 2), (0, 3)]),
    (2, 2, None, [(0, 0), (0, 1), (1, 0), (1, 1)]),
    # FORMAT.md §6: TP2 EP4 ETP1 -> mp_rank_00_*_000, _002, mp_rank_01_*_001, _003
    (2, 4, 1, [(0, 0), (0, 2), (1, 1), (1, 3)]),
])
def test_stage_ranks_follow_megatron(tp, ep, etp, want):
    got = [(c.tp, c.ep) for c in stage_ranks(ParallelSizes(tp=tp, pp=1, ep=ep, etp=etp), 0)]
    assert got == want


# -- placements: where a rank's rows sit in the whole parameter (what torch_dist stores) ---------------

# (rule, rank, [(start, stop, whole shape, offset, main)]), by hand from FORMAT.md §7's chunk table
PLACEMENTS = [
    ("whole tp0", R.Whole(W), rank(0, 2), [(0, 8, (8, 3), (0, 0), True)]),
    ("whole tp1 is a replica", R.Whole(W), rank(1, 2), [(0, 8, (8, 3), (0, 0), False)]),
    ("whole bias", R.Whole(B), rank(0, 1), [(0, 8, (8, 1), (0, 0), True)]),
    ("rows r1/2", R.Chunk(W), rank(1, 2), [(0, 4, (8, 3), (4, 0), True)]),
    ("cols r2/3", R.Chunk(src("w9", 2, 9), dim=1), rank(2, 3), [(0, 2, (2, 9), (0, 6), True)]),
    ("vocab pad r1/2", R.VocabChunk(W, 12), rank(1, 2), [(0, 6, (12, 3), (6, 0), True)]),
    ("qkv grouped r1/2", R.QkvFused(QKV, 4, 2, 1, "grouped"), rank(1, 2), [(0, 4, (8, 2), (4, 0), True)]),
    ("qkv contiguous r1/2", R.QkvFused(QKV, 4, 2, 1, "contiguous"), rank(1, 2), [(0, 4, (8, 2), (4, 0), True)]),
    ("qkv parts r0/2", R.QkvParts(Q, K, Vt, 4, 2, 1), rank(0, 2), [(0, 4, (8, 2), (0, 0), True)]),
    # gated fc1, ffn 4, TP 2: rank 1's [gate_1; up_1] = rows 2..3 and 6..7 of [gate; up]
    ("gated r1/2", R.GatedFused(W, 4, "interleaved"), rank(1, 2),
     [(0, 2, (8, 3), (2, 0), True), (2, 4, (8, 3), (6, 0), True)]),
    ("gated parts r0/2", R.GatedParts(G, U, 4), rank(0, 2),
     [(0, 2, (8, 3), (0, 0), True), (2, 4, (8, 3), (4, 0), True)]),
    # EP 2 x TP 1: the ep 1 rank is dense data-parallel rank 1, so its dense copies are replicas
    ("dense on ep1 is a replica", R.Chunk(W), rank(ep=1, EP=2), [(0, 8, (8, 3), (0, 0), False)]),
    # experts: one expert's [2F, H] matrix; EP picks the expert (the key level adds that axis)
    ("expert whole ep1", R.Whole(R.ExpertRef(STACK, 4, 1, transposed=True)), rank(ep=1, EP=2),
     [(0, 4, (4, 2), (0, 0), True)]),
    ("expert gated etp1/2", R.GatedFused(R.ExpertRef(STACK, 4, 0, transposed=True), 2, "concat", Axis.ETP),
     rank(ep=1, EP=2, etp=1, ETP=2, TP=2), [(0, 1, (4, 2), (1, 0), True), (1, 2, (4, 2), (3, 0), True)]),
    ("expert whole on etp1 is a replica", R.Whole(R.ExpertRef(STACK, 4, 0)), rank(etp=1, ETP=2, TP=2),
     [(0, 2, (2, 4), (0, 0), False)]),
]


@pytest.mark.parametrize("name,rule,at,want", PLACEMENTS, ids=[c[0] for c in PLACEMENTS])
def test_placements(name, rule, at, want):
    got = [(p.start, p.stop, tuple(p.shape), tuple(p.offset), p.main) for p in rule.placements(at)]
    assert got == want, name


DENSE_RULES = [
    R.Whole(W), R.Chunk(W), R.Chunk(src("w12", 3, 12), dim=1), R.VocabChunk(W, 16), R.VocabChunk(W, 4),
    R.QkvFused(QKV, 4, 2, 1, "grouped"), R.QkvFused(QKV, 4, 2, 1, "contiguous"), R.QkvParts(Q, K, Vt, 4, 2, 1),
    R.GatedFused(W, 4, "interleaved"), R.GatedFused(W, 4, "concat"), R.GatedParts(G, U, 4), R.Chunk(B),
]


@pytest.mark.parametrize("rule", DENSE_RULES, ids=[type(r).__name__ + str(i) for i, r in enumerate(DENSE_RULES)])
@pytest.mark.parametrize("n", [1, 2])
def test_main_placements_tile_the_whole_parameter_once(rule, n):
    """At TP n, the rows each rank holds are the blocks of the TP-1 tensor its placements name,
    and the main blocks of all ranks cover it exactly once (by element indices)."""
    whole = apply(rule.pieces(rank(0, 1)))
    count = np.zeros(whole.shape, dtype=int)
    for r in range(n):
        at = rank(r, n)
        mine = apply(rule.pieces(at))
        for p in rule.placements(at):
            assert tuple(p.shape) == whole.shape
            (r0, c0), rows = p.offset, p.stop - p.start
            block = whole[r0:r0 + rows, c0:c0 + mine.shape[1]]
            assert (mine[p.start:p.stop] == block).all()
            if p.main:
                count[r0:r0 + rows, c0:c0 + mine.shape[1]] += 1
    assert (count == 1).all()
