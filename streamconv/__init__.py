"""streamconv: stream a MindSpore Transformers checkpoint into a Megatron-LM core checkpoint.

Library use::

    from streamconv import ConvertOptions, convert
    summary = convert(ConvertOptions(load_dir="ckpt/", save_dir="out/",
                                     target_tensor_parallel_size=2, seq_length=4096))

See ``streamconv --help``, the README for every option and ARCHITECTURE.md for
the flow. The names below are imported on first use, so that ``import
streamconv.cli`` (and a refusal that needs nothing else) stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

_LAZY = {
    "ConvertOptions": "streamconv.core.options",
    "StreamconvError": "streamconv.core.errors",
    "InputError": "streamconv.core.errors",
    "FlagError": "streamconv.core.errors",
    "PathError": "streamconv.core.errors",
    "WriteError": "streamconv.core.errors",
    "build_plan": "streamconv.engine.plan",
    "describe": "streamconv.engine.describe",
    "convert": "streamconv.run.convert",
    "verify": "streamconv.run.verify",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'streamconv' has no attribute {name!r}")
