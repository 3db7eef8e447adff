"""Input naming schemes, one module each, and the registry that classifies every stored name.

To read a new checkpoint family, add a module with an
:class:`~.base.InputScheme` subclass and list an instance in :data:`SCHEMES`.
Order matters only where two schemes could claim the same name (none do).
"""

from __future__ import annotations

from .base import EntryClass, InputScheme, NameClass, SourceLayouts, layer_key, layer_of, non_weight_class
from .mindformers_legacy import MindformersLegacy
from .mindformers_mcore import MindformersMcore

SCHEMES: tuple = (MindformersMcore(), MindformersLegacy())


def classify(name: str) -> NameClass:
    """Say what the checkpoint entry ``name`` is: a weight of some scheme, a non-weight, or unknown."""
    kind = non_weight_class(name)
    if kind is not None:
        return NameClass(kind)
    for scheme in SCHEMES:
        c = scheme.canonical(name)
        if c is not None:
            return c
    return NameClass(EntryClass.UNKNOWN)


__all__ = ["SCHEMES", "classify", "EntryClass", "InputScheme", "NameClass", "SourceLayouts", "layer_key",
           "layer_of"]
