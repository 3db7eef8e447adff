"""Rank coordinates and parallel sizes, and Megatron's divisibility rules.

A rank of the output is a :class:`RankCoord` (tensor, pipeline, expert and
expert-tensor parallel indices); with its :class:`ParallelSizes` it is a
:class:`Rank`, which is all a mapping rule needs to pick its share. Which
coordinates exist follows Megatron's rank generators (parallel_state): dense
ranks are ordered tp-cp-dp-pp, expert ranks tp-cp-ep-dp-pp with ETP in the tp
place; a legacy checkpoint file is written by every rank whose
expert-data-parallel index is 0 (FORMAT.md §6).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

from ..core.errors import FlagError


class Axis(Enum):
    TP = "tp"  # tensor parallel: dense and attention weights
    PP = "pp"  # pipeline stage: which layers
    EP = "ep"  # expert parallel: which experts
    ETP = "etp"  # expert tensor parallel: the split inside an expert


@dataclass(frozen=True)
class ParallelSizes:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None  # None: same as tp (Megatron's default)

    def count(self, axis: Axis) -> int:
        if axis is Axis.ETP:
            return self.tp if self.etp is None else self.etp
        return getattr(self, axis.value)

    @classmethod
    def from_options(cls, o) -> "ParallelSizes":
        return cls(o.target_tensor_parallel_size, o.target_pipeline_parallel_size,
                   o.target_expert_parallel_size or 1, o.target_expert_tensor_parallel_size)


@dataclass(frozen=True)
class RankCoord:
    tp: int = 0
    pp: int = 0
    ep: int = 0
    etp: int = 0

    def index(self, axis: Axis) -> int:
        return getattr(self, axis.value)


@dataclass(frozen=True)
class Rank:
    """A coordinate together with the sizes it is a coordinate of."""

    coord: RankCoord
    sizes: ParallelSizes = field(default_factory=ParallelSizes)

    def of(self, axis: Axis) -> tuple:
        """(index, count) along ``axis``."""
        return self.coord.index(axis), self.sizes.count(axis)

    @property
    def stage_index(self) -> int:
        """This rank's place among its pipeline stage's ranks (expert order etp-ep, edp 0: a writer)."""
        return self.coord.etp + self.sizes.count(Axis.ETP) * self.coord.ep

    @property
    def dense_dp(self) -> int:
        """Megatron's data-parallel index for dense (non-expert) parameters.

        Dense ranks are ordered tp-dp: ranks that differ only in their EP index hold
        the same dense shard as different data-parallel replicas.
        """
        return self.stage_index // self.sizes.tp

    def is_main(self, expert: bool, split: tuple = ()) -> bool:
        """Whether this rank's copy of a parameter is the one Megatron saves (replica id all zeros).

        ``split``: the axes along which the parameter is cut (each rank's share is its
        own); along any other axis of its parallel group the copies are replicas and
        only index 0 is the main one. Dense parameters: TP, then dense DP (which
        spans EP). Expert parameters: ETP; EP always cuts (experts), and writers are
        expert-data-parallel index 0.
        """
        if expert:
            return Axis.ETP in split or self.coord.etp == 0
        return (Axis.TP in split or self.coord.tp == 0) and self.dense_dp == 0


def stage_world(sizes: ParallelSizes) -> int:
    """Ranks per pipeline stage: the smallest world that fits both the dense and the expert rank order."""
    return math.lcm(sizes.tp, sizes.count(Axis.ETP) * sizes.ep)


def stage_ranks(sizes: ParallelSizes, pp: int) -> list:
    """The coordinates that write a legacy file in pipeline stage ``pp``, sorted by (tp, ep).

    The stage's world is the smallest that fits both rank orders; a rank writes when
    its expert-data-parallel index is 0 (with EP = 1 and ETP = TP: every TP rank once).
    """
    tp, ep, etp = sizes.tp, sizes.ep, sizes.count(Axis.ETP)
    world = stage_world(sizes)
    out = {}
    for r in range(world):
        e_tp, e_ep, e_dp = r % etp, (r // etp) % ep, r // (etp * ep)
        if e_dp:
            continue
        c = RankCoord(tp=r % tp, pp=pp, ep=e_ep, etp=e_tp)
        if (c.tp, c.ep) in out:  # pragma: no cover - Megatron's layouts never collide
            raise FlagError(f"TP {tp} x EP {ep} x ETP {etp}: two ranks would write the same checkpoint file")
        out[(c.tp, c.ep)] = c
    return [out[k] for k in sorted(out)]


def check_model(cfg, sizes: ParallelSizes) -> None:
    """Megatron's divisibility rules for the dense parts (refused before anything is written)."""
    tp, pp = sizes.tp, sizes.pp
    if cfg.num_query_groups % tp:
        raise FlagError(f"--target-tensor-parallel-size {tp} does not divide the {cfg.num_query_groups} query groups; choose a TP that does")
    if cfg.num_attention_heads % tp:
        raise FlagError(f"--target-tensor-parallel-size {tp} does not divide the {cfg.num_attention_heads} attention heads")
    if cfg.ffn_hidden_size % tp:
        raise FlagError(f"--target-tensor-parallel-size {tp} does not divide ffn hidden size {cfg.ffn_hidden_size}")
    if cfg.padded_vocab_size % tp:
        raise FlagError(
            f"--target-tensor-parallel-size {tp} does not divide the vocabulary of {cfg.padded_vocab_size} rows; "
            "pass --true-vocab-size to pad it"
        )
    if cfg.num_layers % pp:
        raise FlagError(f"--target-pipeline-parallel-size {pp} does not divide the {cfg.num_layers} layers")
