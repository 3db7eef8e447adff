"""Element counts and strides of shapes, in one place.

Shapes are plain tuples of ints everywhere in streamconv (headers, plans,
pickles, DCP metadata); these helpers keep the arithmetic on them identical.
"""

from __future__ import annotations

import math


def numel(shape) -> int:
    """Number of elements of ``shape`` (1 for a scalar)."""
    return math.prod(shape)


def contiguous_strides(shape) -> tuple:
    """Row-major strides, as ``torch.empty(shape).stride()`` gives them."""
    out, acc = [], 1
    for s in reversed(tuple(shape)):
        out.append(acc)
        acc *= s
    return tuple(reversed(out))


def as_matrix(shape) -> tuple:
    """(rows, columns) of a tensor seen as a matrix: dim 0 x the rest; a 1-D tensor is a column."""
    shape = tuple(shape)
    if not shape:
        return 1, 1
    return shape[0], numel(shape[1:])
