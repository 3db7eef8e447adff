"""Megatron's legacy ``torch`` format: one ``torch.save`` file per rank (FORMAT.md §2, §5).

``zipwriter`` writes the zip container record by record, ``state_pickle``
builds ``data.pkl`` from shapes, ``reader`` reads a file's structure back
without loading tensors, and ``format`` ties them into the
:class:`~streamconv.formats.base.OutputFormat` the engine uses.
"""

from .format import FORMAT, TorchFormat  # noqa: F401
