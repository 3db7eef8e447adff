"""FP8 block-quantized weights, dequantized while they are read.

DeepSeek-V3/R1 and the ``-FP8`` Qwen3 releases store most linear weights as
``F8_E4M3`` with a ``<name>_scale_inv`` F32 tensor beside each: one factor per
128 x 128 block (``quantization_config.weight_block_size``), the last block of a
dimension partial. The real weight is ``w[i, j] = q[i, j] * scale_inv[i // 128,
j // 128]``, computed in F32 (what DeepSeek's ``inference/fp8_cast_bf16.py``
does before it stores BF16). :class:`Fp8BlockTensor` has the members of a
:class:`~streamconv.sources.tensor.SourceTensor` and returns those F32 rows, so
the rules and the stream see an F32 weight and cast it to BF16 like any other:
nothing is written to disk in between and nothing larger than a read chunk is
held (one byte per element read, four returned).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.errors import InputError
from ..core.shapes import as_matrix
from .header import TensorInfo
from .mapped import byte_span, read_rows
from .tensor import SourceTensor

#: quantized dtypes a weight may have when a block scale comes with it
FP8_DTYPES = ("F8_E4M3",)
#: the block DeepSeek-V3/R1 and Qwen3-FP8 use (quantization_config.weight_block_size)
BLOCK = 128
#: the stored name of a weight's block scale
SCALE_SUFFIX = "_scale_inv"


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Fp8BlockTensor:
    """An FP8 weight and its block scales, seen as the F32 weight they stand for."""

    canonical: str
    weight: SourceTensor
    scale: SourceTensor
    scheme: str = ""
    block: int = BLOCK

    @property
    def name(self) -> str:
        return self.weight.name

    @property
    def path(self) -> str:
        return self.weight.path

    @property
    def info(self) -> TensorInfo:
        return self.weight.info

    @property
    def shape(self) -> tuple:
        return self.weight.shape

    dtype = "F32"  # what read() returns
    itemsize = 4
    stored_itemsize = 1  # an F8 code; the scales add 1/16384 of that

    @property
    def nbytes(self) -> int:
        """Bytes stored: the FP8 weight and its scales."""
        return self.weight.nbytes + self.scale.nbytes

    def spans(self, start: int, stop: int) -> list:
        """The FP8 rows and the scale rows of their blocks."""
        if stop <= start:
            return []
        b0, b1 = start // self.block, (stop - 1) // self.block + 1
        return [(self.weight.path, *byte_span(self.weight.info, start, stop)),
                (self.scale.path, *byte_span(self.scale.info, b0, b1))]

    def block_end(self, start: int, stop: int) -> int:
        return stop

    def read(self, files, start: int, stop: int, step: int = 1, col0: int = 0, col1=None, staging=None):
        """Rows ``start:stop:step``, columns ``col0:col1``, dequantized to F32 (in ``staging`` when it fits)."""
        import torch

        col1 = as_matrix(self.shape)[1] if col1 is None else col1
        q = read_rows(files, self.weight.path, self.weight.info, start, stop, step, col0, col1)  # uint8 view
        n = q.shape[0]
        need = n * (col1 - col0) * 4
        out = (staging[:need] if staging is not None and staging.nbytes >= need else np.empty(need, np.uint8))
        out = out.view(np.float32).reshape(n, col1 - col0)
        t = torch.from_numpy(out)
        t.copy_(torch.from_numpy(q).view(torch.float8_e4m3fn))
        if n == 0:
            return out
        b0 = start // self.block
        scales = torch.from_numpy(read_rows(files, self.scale.path, self.scale.info, b0,
                                            (start + (n - 1) * step) // self.block + 1))
        col_blocks = torch.arange(col0, col1) // self.block  # each column's block: one factor per column
        lo = 0
        while lo < n:  # output rows lo:hi come from source rows of one row block
            rb = (start + lo * step) // self.block
            hi = min(n, -(-((rb + 1) * self.block - start) // step))
            t[lo:hi].mul_(scales[rb - b0, col_blocks])
            lo = hi
        return out


def attach_scales(tensors: dict, scales: list) -> dict:
    """{canonical: tensor} with each FP8 weight replaced by its dequantizing view; refuse loose ends.

    ``scales`` lists (canonical of the weight, SourceTensor of its scale).
    """
    out = dict(tensors)
    by_weight = {}
    for canonical, scale in scales:
        w = tensors.get(canonical)
        if w is None or w.dtype not in FP8_DTYPES:
            what = "is absent" if w is None else f"has dtype {w.dtype}"
            raise InputError(f"{scale.path}: {scale.name!r} is an FP8 block scale, but the weight it scales "
                             f"{what}; the checkpoint is damaged or mixes two exports")
        rows, cols = as_matrix(w.shape)
        want = (_ceil(rows, BLOCK), _ceil(cols, BLOCK)) if len(w.shape) == 2 else None
        if want is None or tuple(scale.shape) != want or scale.dtype != "F32":
            raise InputError(f"{scale.path}: {scale.name!r} is {scale.dtype} {list(scale.shape)}; a block scale of "
                             f"{w.name!r} {list(w.shape)} is F32 {list(want) if want else '(2-D weights only)'} "
                             f"({BLOCK} x {BLOCK} blocks)")
        by_weight[canonical] = scale
    for canonical, w in tensors.items():
        if w.dtype in FP8_DTYPES:
            if canonical not in by_weight:
                raise InputError(f"{w.path}: weight {w.name!r} is {w.dtype} without its {w.name + SCALE_SUFFIX!r}; "
                                 "FP8 weights convert with their block scales only")
            out[canonical] = Fp8BlockTensor(canonical, w, by_weight[canonical], w.scheme)
    return out
