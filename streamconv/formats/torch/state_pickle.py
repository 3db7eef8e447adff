"""Build a rank file's ``data.pkl`` from shapes alone, exactly as ``torch.save`` would.

``torch.save`` pickles (protocol 2) the state dict with each tensor reduced to
``torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())``
and each storage replaced by the persistent id ``('storage', <Storage class>,
key, 'cpu', numel)``. None of that depends on the tensor data, so the pickle can
be produced before a single byte of data is converted: stand-in objects with the
same ``__reduce_ex__`` go through the standard pickler, which yields the same
bytes ``torch.save`` produces for real tensors (a test checks this). The result
references no Megatron class, so ``torch.load`` works without Megatron, and with
``weights_only=True`` once ``argparse.Namespace`` is allowed.
"""

from __future__ import annotations

import collections
import io
import pickle

from ...core.shapes import contiguous_strides, numel


class _StorageRef:
    __slots__ = ("key", "storage_type", "numel")

    def __init__(self, key: str, storage_type, numel: int):
        self.key, self.storage_type, self.numel = key, storage_type, numel


class _TensorRef:
    """Pickles as the tensor torch.save would write for a contiguous tensor of this shape."""

    __slots__ = ("storage", "shape")

    def __init__(self, storage: _StorageRef, shape: tuple):
        self.storage, self.shape = storage, tuple(shape)

    def __reduce_ex__(self, protocol):
        import torch

        # Fresh tuple objects, as torch.save makes from tensor.size(): equal shapes must not
        # share a pickle memo entry, or the bytes would differ from torch.save's.
        size = tuple(int(s) for s in self.shape)
        stride = tuple(int(s) for s in contiguous_strides(self.shape))
        return (
            torch._utils._rebuild_tensor_v2,
            (self.storage, 0, size, stride, False, collections.OrderedDict()),
        )


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


def _storage_types() -> dict:
    import torch  # imported late so that refusals before any work stay fast

    return {"bf16": torch.BFloat16Storage, "f32": torch.FloatStorage, "uint8": torch.ByteStorage}


def build_tensor_pickle(dtype: str, shape: tuple, storage_key: str = "0") -> bytes:
    """``data.pkl`` of ``torch.save(t)`` for one bare contiguous tensor ``t`` (not a dict).

    This is what a torch Distributed Checkpoint item holds: FileSystemWriter
    ``torch.save``s each chunk on its own.
    """
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(_TensorRef(_StorageRef(storage_key, _storage_types()[dtype], numel(shape)), shape))
    return buf.getvalue()


def build_pickle(args, model_entries: list) -> bytes:
    """``model_entries``: (key, None) or (key, dtype, shape, storage_key) in order."""
    storage_types = _storage_types()
    model = collections.OrderedDict()
    for e in model_entries:
        if e[1] is None:
            model[e[0]] = None
            continue
        key, dtype, shape, skey = e
        model[key] = _TensorRef(_StorageRef(skey, storage_types[dtype], numel(shape)), shape)
    state = {
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": 1,
        "model": model,
        "num_floating_point_operations_so_far": 0,
    }
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(state)
    return buf.getvalue()
