"""One key of a rank's state dict, as Megatron's layout declares it.

An :class:`EntrySpec` is what Megatron keeps under a key: a tensor made by a
mapping rule, the value ``None`` (a local-spec ``_extra_state``) or a fixed
small uint8 tensor (a Transformer Engine ``_extra_state``). The planner
resolves each spec at every rank into concrete pieces and shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class EntryKind(Enum):
    TENSOR = "tensor"  # data made from source pieces
    NONE = "none"  # the value None
    BYTES = "bytes"  # a fixed uint8 tensor


class OutDtype(str, Enum):
    """Dtypes the output stores: BF16 weights, fp32 buffers Megatron keeps in fp32, uint8 extra state."""

    BF16 = "bf16"
    F32 = "f32"
    UINT8 = "uint8"

    __hash__ = str.__hash__  # a member and its string are the same dict key

    @property
    def itemsize(self) -> int:
        return {"bf16": 2, "f32": 4, "uint8": 1}[self.value]


#: pickle.dumps({}, protocol=4): what a TE ops-based norm stores as _extra_state
TE_NORM_EXTRA_STATE = b"\x80\x04}\x94."
#: what a TE 2.x linear/attention module stores without FP8: an empty uint8 tensor
TE_MODULE_EXTRA_STATE = b""


@dataclass(frozen=True)
class EntrySpec:
    key: str
    kind: EntryKind
    rule: object = None  # for TENSOR: a rule from .rules with pieces(rank)
    ndim: int = 2
    data: bytes = b""
    dtype: OutDtype = OutDtype.BF16


def tensor(key: str, rule, ndim: int, dtype: OutDtype = OutDtype.BF16) -> EntrySpec:
    return EntrySpec(key, EntryKind.TENSOR, rule, ndim, dtype=dtype)


def none(key: str) -> EntrySpec:
    return EntrySpec(key, EntryKind.NONE)


def fixed_bytes(key: str, data: bytes) -> EntrySpec:
    return EntrySpec(key, EntryKind.BYTES, data=data, ndim=1, dtype=OutDtype.UINT8)


@dataclass(frozen=True)
class Entry:
    """An :class:`EntrySpec` resolved at one rank: the concrete pieces and the shape they make."""

    key: str
    kind: EntryKind
    pieces: tuple = ()
    shape: tuple = ()
    dtype: OutDtype = OutDtype.BF16
    data: bytes = b""
    # the rule that made ``pieces``: a sharded format asks it where they sit (rules.Placement)
    rule: object = field(default=None, compare=False, repr=False)

    @property
    def has_data(self) -> bool:
        """Whether the entry is stored as bytes in the file (everything but ``None``)."""
        return self.kind is not EntryKind.NONE

    @property
    def nbytes(self) -> int:
        if self.kind is EntryKind.NONE:
            return 0
        if self.kind is EntryKind.BYTES:
            return len(self.data)
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize

    @property
    def source_bytes(self) -> int:
        return sum(p.source_bytes for p in self.pieces)


def resolve(spec: EntrySpec, rank) -> Entry:
    """The entry ``spec`` describes at ``rank`` (a :class:`~.parallel.Rank`)."""
    if spec.kind is EntryKind.NONE:
        return Entry(spec.key, spec.kind)
    if spec.kind is EntryKind.BYTES:
        return Entry(spec.key, spec.kind, shape=(len(spec.data),), dtype=OutDtype.UINT8, data=spec.data)
    pieces = tuple(spec.rule.pieces(rank))
    rows = sum(p.nrows for p in pieces)
    if spec.ndim == 1:
        shape = (rows,)
    else:
        cols = {p.ncols for p in pieces}
        if len(cols) != 1:  # pragma: no cover - a rule bug guard
            raise AssertionError(f"{spec.key}: pieces of different widths")
        shape = (rows, cols.pop())
    return Entry(spec.key, spec.kind, pieces, shape, spec.dtype, rule=spec.rule)
