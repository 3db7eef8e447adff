"""Input naming schemes, one module each, and the registry that classifies every stored name.

To read a new checkpoint family, add a module with an
:class:`~.base.InputScheme` subclass and list an instance in :data:`SCHEMES`.
Order matters only where two schemes claim the same name for the same weight
(``lm_head.weight``: older mindformers and Hugging Face): such a name is marked
``shared`` and does not decide which scheme a checkpoint uses.
"""

from __future__ import annotations

from .base import (EntryClass, InputScheme, NameClass, SourceLayouts, layer_indices, layer_key, layer_of,
                   non_weight_class)
from .hf import HuggingFace
from .mindformers_legacy import MindformersLegacy
from .mindformers_mcore import MindformersMcore

SCHEMES: tuple = (MindformersMcore(), MindformersLegacy(), HuggingFace())


def classify(name: str) -> NameClass:
    """Say what the checkpoint entry ``name`` is: a weight of some scheme, a non-weight, or unknown."""
    kind = non_weight_class(name)
    if kind is not None:
        return NameClass(kind)
    found = [c for c in (scheme.canonical(name) for scheme in SCHEMES) if c is not None]
    if not found:
        return NameClass(EntryClass.UNKNOWN)
    first = found[0]
    if len(found) > 1:
        if any(c.canonical != first.canonical for c in found[1:]):  # pragma: no cover - a registry bug
            raise AssertionError(f"schemes disagree about {name!r}")
        return NameClass(first.kind, first.canonical, first.layer, first.scheme, shared=True)
    return first


def refusal(name: str) -> str | None:
    """Why an unknown ``name`` cannot be converted, when a scheme recognises it as a family's weight."""
    for scheme in SCHEMES:
        why = scheme.refusal(name)
        if why:
            return why
    return None


__all__ = ["SCHEMES", "classify", "refusal", "EntryClass", "InputScheme", "NameClass", "SourceLayouts",
           "layer_indices", "layer_key", "layer_of"]
