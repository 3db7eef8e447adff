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


def all_own_files(root: str) -> list:
    """[(format, relpath)]: files under ``root`` named like some format's output, each once (first format wins).

    A save directory may hold another format's files (an earlier conversion): the
    save-dir checks and verify look at every format's, not just the plan's.
    """
    out, seen = [], set()
    for name in FORMATS:
        fmt = get_format(name)
        for rel in fmt.own_files(root):
            if rel not in seen:
                seen.add(rel)
                out.append((fmt, rel))
    return out
