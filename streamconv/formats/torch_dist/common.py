"""``common.pt`` and ``metadata.json`` of a torch_dist checkpoint, as Megatron core_r0.12 writes them.

``common.pt`` (Megatron ``TorchCommonSaveStrategy.save_common``): rank 0's
``torch.save(common_state_dict, <dir>/common.pt)``, where the common state dict
is the training state dict with every sharded value (all model weights and
``_extra_state`` objects) taken out. For a checkpoint holding only the model,
saved with ``--no-save-optim --no-save-rng`` at iteration 1, that is
``args``, ``checkpoint_version`` 3.0, ``iteration`` 1 and
``num_floating_point_operations_so_far`` 0 (``generate_state_dict`` order).
What loading needs from it: ``load_checkpoint`` reads
``state_dict['args'].tensor_model_parallel_size`` and ``.pipeline_model_parallel_size``
unconditionally, ``iteration`` (unless finetuning), and the ``no_save_optim``/``no_save_rng``
flags in ``args`` decide whether optimizer and RNG shards are requested.
Megatron's own save also leaves ``rerun_state_machine: {'mode': ...}`` there;
it is deliberately NOT written: when present, a load at the same TP/PP asks for
the rerun state's ShardedObject, which a converted checkpoint does not have.

The archive is named after the file (``common/...``), as ``torch.save`` to a
path names it, and carries torch's serialization id, so the bytes equal
``torch.save(common_state(args), '<dir>/common.pt')``.

``metadata.json`` (Megatron ``save_config``): ``json.dump`` of
``CheckpointingConfig('torch_dist', 1)`` — no newline. Its presence marks the
directory as a distributed checkpoint, so it is written last.
"""

from __future__ import annotations

import io
import json
import pickle

from ..torch.zipwriter import TorchZipWriter
from .item import finish_like_torch

COMMON_FILE = "common.pt"
METADATA_JSON_FILE = "metadata.json"
#: torch.save to ``<dir>/common.pt`` names the archive after the file's stem
COMMON_PREFIX = "common"
#: Megatron's CheckpointingConfig for the torch_dist backend, field order kept
CHECKPOINTING_CONFIG = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}


def metadata_json_bytes() -> bytes:
    return json.dumps(CHECKPOINTING_CONFIG).encode()


def common_state(args) -> dict:
    """The dict Megatron keeps in ``common.pt`` for a model-only checkpoint at iteration 1."""
    return {
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": 1,
        "num_floating_point_operations_so_far": 0,
    }


class _NoTensorPickler(pickle.Pickler):
    """torch.save's pickler minus storages: ``args`` must not hold tensors (it never does)."""

    def persistent_id(self, obj):
        import torch

        if isinstance(obj, (torch.Tensor, torch.storage.TypedStorage, torch.UntypedStorage)):
            raise ValueError("common.pt: args must not hold tensors")
        return None


def common_pt_bytes(args) -> bytes:
    """Bytes of ``common.pt`` for these Megatron ``args`` (an ``argparse.Namespace``)."""
    buf = io.BytesIO()
    _NoTensorPickler(buf, protocol=2).dump(common_state(args))
    pk = buf.getvalue()
    out = io.BytesIO()
    w = TorchZipWriter(out, COMMON_PREFIX, pk)
    finish_like_torch(w, pk, [])
    return out.getvalue()
