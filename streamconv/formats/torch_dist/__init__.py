"""Container-level pieces of Megatron's ``torch_dist`` checkpoint (torch Distributed Checkpoint).

Written from one process with no process group: each stored item is streamed
(:mod:`.item`), ``.metadata`` is built from the merged chunk lists and read back
with a restricted unpickler (:mod:`.metadata`), and the small side files
``common.pt`` / ``metadata.json`` are produced as Megatron core_r0.12 writes them
(:mod:`.common`). :mod:`.format` lays a conversion out as items, files and
``.metadata`` from Megatron's sharded view (:mod:`streamconv.megatron.sharded`);
:mod:`.reader` reads a checkpoint back for verify and ``--resume``.
"""

from .format import FORMAT, TorchDistFormat  # noqa: E402,F401
