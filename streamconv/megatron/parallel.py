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
    first_stage_layers: int | None = None  # Megatron's --decoder-first-pipeline-num-layers
    last_stage_layers: int | None = None  # --decoder-last-pipeline-num-layers

    def count_etp(self) -> int:
        return self.count(Axis.ETP)

    def count(self, axis: Axis) -> int:
        if axis is Axis.ETP:
            return self.tp if self.etp is None else self.etp
        return getattr(self, axis.value)

    @classmethod
    def from_options(cls, o) -> "ParallelSizes":
        for flag, value in (("--target-expert-parallel-size", o.target_expert_parallel_size),
                            ("--target-expert-tensor-parallel-size", o.target_expert_tensor_parallel_size),
                            ("--decoder-first-pipeline-num-layers", o.decoder_first_pipeline_num_layers),
                            ("--decoder-last-pipeline-num-layers", o.decoder_last_pipeline_num_layers)):
            if value is not None and value < 1:
                raise FlagError(f"{flag} {value}: must be a positive integer")
        return cls(o.target_tensor_parallel_size, o.target_pipeline_parallel_size,
                   o.target_expert_parallel_size or 1, o.target_expert_tensor_parallel_size,
                   o.decoder_first_pipeline_num_layers, o.decoder_last_pipeline_num_layers)

    def layers_per_stage(self, num_layers: int) -> list:
        """Megatron's split of the decoder layers over pipeline stages (first/last may be set apart)."""
        counts = [None] * self.pp
        rest, free = num_layers, self.pp
        if self.pp > 1 and self.first_stage_layers is not None:
            counts[0], rest, free = self.first_stage_layers, rest - self.first_stage_layers, free - 1
        if self.pp > 1 and self.last_stage_layers is not None:
            counts[-1], rest, free = self.last_stage_layers, rest - self.last_stage_layers, free - 1
        uneven = self.first_stage_layers is not None or self.last_stage_layers is not None
        if rest < 0 or (free and rest % free) or (not free and rest):
            if not uneven:
                raise FlagError(f"--target-pipeline-parallel-size {self.pp} does not divide the {num_layers} layers")
            raise FlagError(
                f"--decoder-first/last-pipeline-num-layers ({self.first_stage_layers}, {self.last_stage_layers}) "
                f"leave {rest} of the {num_layers} layers for {free} middle stage(s), which does not divide evenly"
            )
        return [c if c is not None else rest // free for c in counts]

    def stage_layers(self, num_layers: int, stage: int) -> range:
        counts = self.layers_per_stage(num_layers)
        start = sum(counts[:stage])
        return range(start, start + counts[stage])


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
    needed = set()  # (tp, ep) of every rank: the file each one loads
    for r in range(world):
        e_tp, e_ep, e_dp = r % etp, (r // etp) % ep, r // (etp * ep)
        needed.add((r % tp, e_ep))
        if e_dp:
            continue
        c = RankCoord(tp=r % tp, pp=pp, ep=e_ep, etp=e_tp)
        if (c.tp, c.ep) in out:
            raise FlagError(
                f"--target-expert-tensor-parallel-size {etp} with --target-expert-parallel-size {ep} and "
                f"--target-tensor-parallel-size {tp}: two ranks (expert tensor ranks {out[(c.tp, c.ep)].etp} and "
                f"{e_tp}) would write the same legacy file mp_rank_{c.tp:02d}_..._{c.ep:03d}; Megatron cannot save "
                "or load this layout in the torch format (use an ETP that does not exceed TP)"
            )
        out[(c.tp, c.ep)] = c
    missing = sorted(needed - set(out))
    if missing:
        t, e = missing[0]
        raise FlagError(
            f"--target-expert-tensor-parallel-size {etp} with --target-expert-parallel-size {ep} and "
            f"--target-tensor-parallel-size {tp}: the ranks of tensor rank {t} and expert rank {e} have "
            "expert-data-parallel rank > 0, so Megatron writes no legacy file for them and cannot load this "
            "layout in the torch format (choose ETP x EP as a multiple of TP)"
        )
    return [out[k] for k in sorted(out)]


def check_model(cfg, sizes: ParallelSizes) -> None:
    """Megatron's divisibility rules for the dense parts (refused before anything is written)."""
    tp = sizes.tp
    if cfg.num_query_groups % tp:
        raise FlagError(f"--target-tensor-parallel-size {tp} does not divide the {cfg.num_query_groups} query groups; choose a TP that does")
    if cfg.num_attention_heads % tp:
        raise FlagError(f"--target-tensor-parallel-size {tp} does not divide the {cfg.num_attention_heads} attention heads")
    if cfg.dense_mlp is not None and cfg.ffn_hidden_size % tp:
        raise FlagError(f"--target-tensor-parallel-size {tp} does not divide ffn hidden size {cfg.ffn_hidden_size}")
    if cfg.padded_vocab_size % tp:
        raise FlagError(
            f"--target-tensor-parallel-size {tp} does not divide the vocabulary of {cfg.padded_vocab_size} rows; "
            "pass --true-vocab-size to pad it"
        )
    sizes.layers_per_stage(cfg.num_layers)
    a = cfg.attention
    if cfg.mla is not None:
        for what, n in (("q_lora_rank", a.q_lora_rank), ("kv_lora_rank + qk_pos_emb_head_dim",
                                                         a.kv_lora_rank + a.qk_pos_emb_head_dim)):
            if n is not None and n % tp:
                raise FlagError(f"--target-tensor-parallel-size {tp} does not divide the MLA {what} {n}")
    moe = cfg.moe
    if moe is not None:
        ep, etp = sizes.ep, sizes.count(Axis.ETP)
        if moe.num_experts % ep:
            raise FlagError(f"--target-expert-parallel-size {ep} does not divide the {moe.num_experts} experts; "
                            "choose an EP that does")
        if moe.ffn % etp:
            raise FlagError(f"--target-expert-tensor-parallel-size {etp} does not divide the expert ffn size "
                            f"{moe.ffn}")
        if moe.shared is not None and moe.shared.ffn % tp:
            raise FlagError(f"--target-tensor-parallel-size {tp} does not divide the shared-expert intermediate "
                            f"size {moe.shared.ffn}")
    elif sizes.ep > 1 or sizes.etp is not None:
        flag = "--target-expert-parallel-size" if sizes.ep > 1 else "--target-expert-tensor-parallel-size"
        raise FlagError(f"{flag} given, but the checkpoint is a dense model (no experts)")
