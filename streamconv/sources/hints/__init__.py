"""Values the weights cannot tell, read from a model config file beside the checkpoint.

A checkpoint's tensors fix its shapes but not its rope base, sequence length,
norm epsilon, MoE routing (top-k, score function, scaling, group-limited
routing) or, for mindformers, which row layout its fused tensors use. A Hugging
Face ``config.json`` or a mindformers training YAML next to the weights (or
named with ``--model-config``) records them. Each reader turns its file into
:class:`Hint` s keyed by :class:`~streamconv.core.options.ConvertOptions` field
names, each carrying where it came from ("config.json rope_theta"), so that
``plan`` and the run's notes can say where every value came from. Flags always
win over hints (``model/settings.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ...core.errors import InputError, PathError


@dataclass(frozen=True)
class Hint:
    value: object
    origin: str  # "config.json rope_theta"


#: file names looked for beside the checkpoint, in order
CONFIG_NAMES = ("config.json",)
YAML_SUFFIXES = (".yaml", ".yml")


def find_config(load_path: str, explicit: str | None = None) -> str | None:
    """The model config file for ``load_path``: ``explicit`` (``--model-config``), else one beside it."""
    if explicit:
        if not os.path.isfile(explicit):
            raise PathError(f"--model-config {explicit} is not a file; give a Hugging Face config.json or a "
                            "mindformers YAML")
        return explicit
    d = load_path if os.path.isdir(load_path) else os.path.dirname(os.path.abspath(load_path))
    try:
        names = sorted(os.listdir(d))
    except OSError:
        return None
    for n in CONFIG_NAMES:
        if n in names and os.path.isfile(os.path.join(d, n)):
            return os.path.join(d, n)
    yamls = [n for n in names if n.endswith(YAML_SUFFIXES) and os.path.isfile(os.path.join(d, n))]
    if len(yamls) == 1:
        return os.path.join(d, yamls[0])
    return None  # none, or several YAML files: the user names one with --model-config


def read_hints(path: str) -> dict:
    """Field name -> :class:`Hint` from the config file at ``path`` (JSON: Hugging Face; YAML: mindformers)."""
    if path.endswith(YAML_SUFFIXES):
        from .mindformers_yaml import read

        return read(path)
    if path.endswith(".json"):
        from .hf_config import read

        return read(path)
    raise InputError(f"--model-config {path}: not a .json (Hugging Face config) or .yaml (mindformers) file")


def load_json(path: str) -> dict:
    import json

    try:
        with open(path, "r", encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise InputError(f"{path}: cannot read the model config ({e}); fix or remove it, or name another with "
                         "--model-config") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: the model config is not a JSON object")
    return obj
