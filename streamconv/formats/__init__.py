"""Stage 4 of the flow: output containers, one sub-package per Megatron ``--ckpt-format``.

Every format implements :class:`~.base.OutputFormat`: it groups the resolved
per-rank entries into files with exact sizes, writes a file from the stream of
its entries' bytes, checks a finished file, and reads one back for verify. The
planner, the stream and the save directory only talk to this interface; a new
format is a new sub-package listed in :data:`FORMATS`.
"""

from __future__ import annotations

import importlib

from ..core.errors import FlagError

#: --ckpt-format value -> module holding its FORMAT object
FORMATS = {
    "torch": "streamconv.formats.torch",
    "torch_dist": "streamconv.formats.torch_dist",
}


def get_format(name: str):
    """The :class:`~.base.OutputFormat` for a ``--ckpt-format`` value."""
    if name not in FORMATS:
        raise FlagError(f"--ckpt-format {name!r}: choose one of {', '.join(FORMATS)}")
    return importlib.import_module(FORMATS[name]).FORMAT
