"""The slicing rule: which box of a full tensor one rank holds (FORMAT.md §8).

All ranks here are *local*: a rank's index inside its pipeline stage (global
rank minus ``stage * prod(dev_matrix)``). A box is one ``(start, stop)`` per
tensor dimension.

The rule, as MindSpore applies it when saving with ``integrated_save=False``
and undoes it in ``unified_safetensors``:

1. The rank's coordinates in ``dev_matrix`` are its index unravelled row-major.
2. Each tensor dimension is split by the device axes its ``tensor_map`` entry
   names (counted from the right of ``dev_matrix``); with several axes the first
   listed is the outermost (MindSpore's ``_expand_layout``). The rank holds chunk
   ``index`` of ``n`` equal chunks, or, for an uneven dimension 0, the chunk
   ``[indices_offset[i], indices_offset[i] + param_split_shape[i])``.
3. Optimizer (weight) sharding then splits dimension 0 of that slice again.
   The ranks holding the same slice, in rank order, are cut into consecutive
   groups of ``opt_weight_shard_size`` (-1: one group of all of them); the
   rank's position in its group picks its share. MindSpore records the rank
   distance inside a group as ``opt_weight_shard_step``; we recompute it and
   refuse a layout where it differs, since our idea of the group would then be
   wrong (MindSpore's ``CreateGroupForOptShard`` / ``_construct_tensor_layout_helper``).

Anything this rule cannot place (``field`` splits, shares that do not divide) is
refused, naming the parameter and rank.
"""

from __future__ import annotations

import math

from ...core.errors import InputError
from .strategy import ParamLayout


def device_coords(rank: int, dev_matrix) -> tuple:
    """Coordinates of ``rank`` in ``dev_matrix`` (row-major: the last axis varies fastest)."""
    coords = []
    for size in reversed(dev_matrix):
        coords.append(rank % size)
        rank //= size
    return tuple(reversed(coords))


def _axis_index(dev_matrix, axis: int) -> int:
    """tensor_map axes count from the right of dev_matrix."""
    return len(dev_matrix) - 1 - axis


def dim_splits(layout: ParamLayout) -> tuple:
    """Number of slices along each tensor dimension (before optimizer sharding)."""
    dev = layout.dev_matrix
    return tuple(math.prod(dev[_axis_index(dev, a)] for a in axes) for axes in layout.tensor_map)


def slice_index(layout: ParamLayout, rank: int) -> tuple:
    """Per dimension, which of its ``dim_splits`` slices local ``rank`` holds."""
    dev = layout.dev_matrix
    c = device_coords(rank, dev)
    out = []
    for axes in layout.tensor_map:
        i = 0
        for a in axes:  # first axis outermost
            k = _axis_index(dev, a)
            i = i * dev[k] + c[k]
        out.append(i)
    return tuple(out)


def _where(layout: ParamLayout, rank: int) -> str:
    return f"parameter {layout.name!r}, rank {rank} of stage {layout.stage} ({layout.source})"


def opt_shard(layout: ParamLayout, rank: int) -> tuple:
    """(share, shares): local ``rank``'s part of dimension 0 under optimizer sharding; (0, 1) if none."""
    size, step = layout.opt_weight_shard_size, layout.opt_weight_shard_step
    if size == 0 or step == 0:  # how MindSpore reads "no optimizer sharding"
        return 0, 1
    dev = layout.dev_matrix
    split_axes = {_axis_index(dev, a) for axes in layout.tensor_map for a in axes}
    repeated = [k for k in range(len(dev)) if k not in split_axes]  # axes holding copies of one slice
    c = device_coords(rank, dev)
    group_len = math.prod(dev[k] for k in repeated)
    if size == -1:
        size = group_len
    if size < 1 or group_len % size:
        raise InputError(
            f"{_where(layout, rank)}: opt_weight_shard_size {layout.opt_weight_shard_size} does not divide the "
            f"{group_len} ranks holding each slice; unsupported layout"
        )
    if size == 1:
        return 0, 1
    # position among the ranks holding the same slice = row-major over the repeated axes
    pos = 0
    for k in repeated:
        pos = pos * dev[k] + c[k]

    def rank_at(p: int) -> int:
        cc = list(c)
        for k in reversed(repeated):
            cc[k] = p % dev[k]
            p //= dev[k]
        r = 0
        for k, size_k in enumerate(dev):
            r = r * size_k + cc[k]
        return r

    first = pos // size * size
    derived_step = (rank_at(first + size - 1) - rank_at(first)) // (size - 1)
    if derived_step != step:
        raise InputError(
            f"{_where(layout, rank)}: opt_weight_shard_step {step} does not match the optimizer shard group "
            f"implied by dev_matrix {list(dev)} and tensor_map (step {derived_step}); unsupported layout"
        )
    return pos % size, size


def _dim0_slice(layout: ParamLayout, full0: int, n0: int, i0: int, rank: int) -> tuple:
    if layout.param_split_shape:
        if len(layout.param_split_shape) != n0:
            raise InputError(
                f"{_where(layout, rank)}: param_split_shape has {len(layout.param_split_shape)} entries but "
                f"dimension 0 is split {n0} ways; unsupported layout"
            )
        start, length = layout.indices_offset[i0], layout.param_split_shape[i0]
        if start < 0 or length < 0:
            raise InputError(f"{_where(layout, rank)}: negative param_split_shape/indices_offset; damaged strategy")
        return start, start + length
    return _even(full0, n0, i0, 0, layout, rank)


def _even(full: int, n: int, i: int, dim: int, layout: ParamLayout, rank: int) -> tuple:
    if full % n:
        raise InputError(
            f"{_where(layout, rank)}: dimension {dim} of size {full} cannot be split into {n} equal slices; "
            "unsupported layout"
        )
    step = full // n
    return i * step, (i + 1) * step


def check_supported(layout: ParamLayout, ndim: int, rank: int) -> None:
    """Refuse layouts the rule does not cover, before any arithmetic on them."""
    if layout.field:
        raise InputError(f"{_where(layout, rank)}: field-split layout (field {layout.field}) is not supported")
    if len(layout.tensor_map) != ndim:
        raise InputError(
            f"{_where(layout, rank)}: tensor_map has {len(layout.tensor_map)} entries but the tensor has {ndim} "
            "dimensions; unsupported layout or a strategy of another model"
        )
    if layout.param_split_shape and ndim == 0:
        raise InputError(f"{_where(layout, rank)}: param_split_shape on a scalar; damaged strategy")


def rank_box(layout: ParamLayout, full_shape, rank: int) -> tuple:
    """The box ``((start, stop), ...)`` of the full tensor that local ``rank`` holds."""
    check_supported(layout, len(full_shape), rank)
    n, idx = dim_splits(layout), slice_index(layout, rank)
    box = []
    for d, (full, nd, i) in enumerate(zip(full_shape, n, idx)):
        box.append(_dim0_slice(layout, full, nd, i, rank) if d == 0 else _even(full, nd, i, d, layout, rank))
    share, shares = opt_shard(layout, rank)
    if shares > 1:
        if not box:
            raise InputError(f"{_where(layout, rank)}: optimizer sharding of a scalar; unsupported layout")
        start, stop = box[0]
        rows = stop - start
        if rows % shares:
            raise InputError(
                f"{_where(layout, rank)}: its {rows}-row slice cannot be split into {shares} optimizer shards; "
                "unsupported layout"
            )
        part = rows // shares
        box[0] = (start + share * part, start + (share + 1) * part)
    return tuple(box)


def full_shape_from_piece(layout: ParamLayout, piece_shape, rank: int) -> tuple:
    """The full tensor's shape implied by local ``rank`` holding a piece of ``piece_shape``."""
    check_supported(layout, len(piece_shape), rank)
    n = dim_splits(layout)
    full = [p * nd for p, nd in zip(piece_shape, n)]
    if full:
        _, shares = opt_shard(layout, rank)
        if layout.param_split_shape:
            ends = [o + s for o, s in zip(layout.indices_offset, layout.param_split_shape)]
            full[0] = max(ends) if ends else 0
        else:
            full[0] = piece_shape[0] * shares * n[0]
    return tuple(full)
