"""Read and validate a safetensors header, treating it as untrusted input.

The planner works from headers alone, so a lying header must be caught here,
before any data is touched: a truncated file, a header length past the end of
the file, JSON that does not parse, an unknown dtype, offsets out of range or
overlapping, or a shape whose byte size differs from its span. Nothing is
allocated from a size the header claims except the header itself, which is
bounded by the file size and by :data:`MAX_HEADER_BYTES` (the same cap as the
reference ``safetensors`` implementation).
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass, field

from ..core.errors import InputError
from ..core.shapes import numel
from .ckpt import ckpt_advice, looks_like_ckpt

MAX_HEADER_BYTES = 100 * 1000 * 1000

#: element sizes of every dtype the safetensors format defines
DTYPE_SIZES = {
    "F64": 8, "I64": 8, "U64": 8,
    "F32": 4, "I32": 4, "U32": 4,
    "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}

#: dtypes a model weight may have (everything is converted to BF16)
FLOAT_WEIGHT_DTYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class TensorInfo:
    """One header entry; offsets are absolute positions in the file."""

    name: str
    dtype: str
    shape: tuple
    start: int  # absolute file offset of the first byte
    nbytes: int

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def numel(self) -> int:
        return numel(self.shape)


@dataclass
class SafetensorsHeader:
    path: str
    file_size: int
    data_start: int
    tensors: dict = field(default_factory=dict)  # name -> TensorInfo, in header order
    metadata: dict = field(default_factory=dict)


#: no real tensor has more dimensions; a header claiming more is damaged (and
#: multiplying thousands of dimensions would cost time, not just memory)
MAX_DIMS = 64


def _byte_size(shape: list, itemsize: int, limit: int):
    """Bytes of ``shape`` x ``itemsize``, or None once it exceeds ``limit`` (no huge numbers built)."""
    if 0 in shape:
        return 0
    n = itemsize
    for s in shape:
        n *= s
        if n > limit:
            return None
    return n


def _reject_duplicates(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise ValueError(f"key {k!r} appears twice")
        seen[k] = v
    return seen


def _not_safetensors(path: str, message: str) -> InputError:
    """The refusal for a file that is not safetensors: MindSpore .ckpt advice when it is one."""
    if looks_like_ckpt(path):
        return InputError(ckpt_advice(path))
    if path.endswith(".ckpt"):
        return InputError(ckpt_advice(path, recognised=False))
    return InputError(message)


def read_header(path: str) -> SafetensorsHeader:
    """Parse and fully validate the header of the safetensors file at ``path``."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e}); check the path and permissions") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: is not a regular file (a device, FIFO or socket?); point at the checkpoint's files")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise _not_safetensors(path, f"{path}: truncated safetensors file ({size} bytes, not even the "
                                             "8-byte header length); re-copy or re-export it")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise _not_safetensors(path, f"{path}: safetensors header length {n} runs past the end of the "
                                             f"file ({size} bytes): the file is truncated or not safetensors; re-copy it")
            if n > MAX_HEADER_BYTES:
                raise _not_safetensors(path, f"{path}: safetensors header of {n} bytes exceeds the "
                                             f"{MAX_HEADER_BYTES}-byte limit; the file is damaged or not safetensors")
            raw = f.read(n)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e}); check the path and permissions") from None
    if len(raw) != n:
        raise InputError(f"{path}: truncated while reading the header; re-copy the file")
    try:
        text = raw.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_reject_duplicates)
    except RecursionError:
        raise InputError(
            f"{path}: safetensors header is not valid JSON (nested too deeply); the file is damaged or not safetensors"
        ) from None
    except (UnicodeDecodeError, ValueError) as e:
        raise _not_safetensors(
            path, f"{path}: safetensors header is not valid JSON ({e}); the file is damaged or not safetensors"
        ) from None
    if not isinstance(obj, dict):
        raise _not_safetensors(path, f"{path}: safetensors header is not a JSON object; the file is damaged")

    data_start = 8 + n
    data_size = size - data_start
    hdr = SafetensorsHeader(path=path, file_size=size, data_start=data_start)
    meta = obj.pop("__metadata__", None)
    if meta is not None:
        if not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
        ):
            raise InputError(f"{path}: safetensors __metadata__ must map strings to strings")
        hdr.metadata = meta

    spans = []
    for name, entry in obj.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise InputError(f"{where}: header entry is not an object; the file is damaged")
        dtype = entry.get("dtype")
        shape = entry.get("shape")
        offs = entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise InputError(
                f"{where}: unknown dtype {dtype!r} (known: {', '.join(sorted(DTYPE_SIZES))}); "
                "the file is damaged or from an unsupported writer"
            )
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
        ):
            shown = repr(shape) if len(repr(shape)) < 80 else repr(shape)[:77] + "..."
            raise InputError(
                f"{where}: shape {shown} is not a list of at most {MAX_DIMS} non-negative integers; "
                "the header is damaged"
            )
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        ):
            raise InputError(f"{where}: data_offsets {offs!r} is not a pair of integers")
        begin, end = offs
        if not (0 <= begin <= end <= data_size):
            raise InputError(
                f"{where}: data_offsets [{begin}, {end}) lie outside the {data_size}-byte data "
                "section: the file is truncated or damaged; re-copy it"
            )
        expected = _byte_size(shape, DTYPE_SIZES[dtype], data_size)
        if expected != end - begin:
            claim = f"{expected} bytes" if expected is not None else f"more than the {data_size}-byte data section"
            raise InputError(
                f"{where}: shape x {dtype} is {claim} but its data span is "
                f"{end - begin} bytes; the header is damaged"
            )
        info = TensorInfo(name, dtype, tuple(shape), data_start + begin, end - begin)
        hdr.tensors[name] = info
        spans.append((begin, end, name))

    spans.sort()
    prev_end, prev_name = 0, None
    for begin, end, name in spans:
        if begin < prev_end:
            raise InputError(
                f"{path}: tensors {prev_name!r} and {name!r} overlap in the data section; "
                "the header is damaged"
            )
        prev_end, prev_name = max(prev_end, end), name
    # Gaps between tensors or bytes after the last one are tolerated: they cannot
    # make a read go wrong, and a file shorter than its header claims is caught above.
    return hdr
