"""Recognise a MindSpore ``.ckpt`` file, so that offering one gets the right advice.

MindSpore's older checkpoint format is a serialized protobuf (``checkpoint.proto``)::

    message Checkpoint { message Value { required string tag = 1;
                                         oneof value { TensorProto tensor = 2; MapTensorProto maptensor = 3; } }
                         repeated Value value = 1; }
    message TensorProto { repeated int64 dims = 1; required string tensor_type = 2; required bytes tensor_content = 3; }

Read as safetensors, its first bytes make an absurd header length, and the
user would be told the file is truncated. :func:`looks_like_ckpt` checks the
first bytes for that message's wire encoding instead — the first ``value``
(field 1, length-delimited) opening with its ``tag`` (a short UTF-8 parameter
name) followed by a ``tensor`` or ``maptensor`` — and :func:`ckpt_advice`
says how to convert it: ``mindspore.ckpt_to_safetensors`` (MindSpore 2.4+).
Only a file that is not valid safetensors is ever asked.
"""

from __future__ import annotations

import os

_HEAD = 4096
_MAX_TAG = 1024


def _varint(buf: bytes, i: int):
    """(value, next index) of the base-128 varint at ``buf[i]``, or (None, i) if it does not end in time."""
    n = shift = 0
    while i < len(buf) and shift < 64:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, i
        shift += 7
    return None, i


def looks_like_ckpt(path: str) -> bool:
    """Whether the file starts like a serialized MindSpore ``Checkpoint`` protobuf message."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            buf = f.read(_HEAD)
    except OSError:
        return False
    if len(buf) < 6 or buf[0] != 0x0A:  # field 1 (value), length-delimited
        return False
    vlen, i = _varint(buf, 1)
    if vlen is None or vlen < 4 or i + vlen > size:
        return False
    end = i + vlen
    if buf[i] != 0x0A:  # Value.tag: field 1, length-delimited
        return False
    tlen, j = _varint(buf, i + 1)
    if tlen is None or not 0 < tlen <= _MAX_TAG or j + tlen > min(len(buf), end):
        return False
    try:
        tag = buf[j:j + tlen].decode("utf-8")
    except UnicodeDecodeError:
        return False
    if not tag.isprintable():
        return False
    k = j + tlen
    if k >= len(buf) or buf[k] not in (0x12, 0x1A):  # Value.tensor (2) or Value.maptensor (3)
        return False
    mlen, m = _varint(buf, k + 1)
    return mlen is not None and m + mlen <= end


def ckpt_advice(path: str, recognised: bool = True, found: list | None = None) -> str:
    """The one-line refusal for a .ckpt input (a file, or a directory holding ``found``), with the conversion."""
    if found:
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        what = f"holds MindSpore .ckpt checkpoints (protobuf: {found[0]}{more}), not safetensors"
    elif recognised:
        what = "is a MindSpore .ckpt checkpoint (protobuf), not safetensors"
    else:
        what = "is not safetensors; by its name a MindSpore .ckpt checkpoint (encrypted or damaged?)"
    target, rename = path, ""
    if not (path.endswith(".ckpt") or found):  # MindSpore converts only files named *.ckpt
        target = os.path.splitext(path)[0] + ".ckpt"
        rename = f"rename it to {target} and "
    return (f"{path}: {what}. streamconv reads safetensors: {rename}convert it first with MindSpore 2.4+, "
            f"python -c \"import mindspore as ms; ms.ckpt_to_safetensors('{target}', save_path='DIR')\", "
            "then point --load-dir at DIR")
