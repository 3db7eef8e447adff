"""What an input naming scheme is, and the entries every scheme skips.

A scheme turns the names of one checkpoint family into streamconv's *canonical*
names (Megatron-core names, FORMAT.md §1, plus a few for weights some families
store split, such as ``self_attention.linear_q``), says which row layouts its
fused tensors may have (the rule choice) and what to tell the user about them.
Entries that carry no weights (optimizer moments, step counters, dropout
placeholders) look the same in every MindSpore checkpoint and are classified
here, before any scheme is asked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from ...core.options import Fc1Layout, QkvLayout

OPTIMIZER_PREFIXES = ("adam_m.", "adam_v.", "moment1.", "moment2.", "accu_grads.")
STEP_ENTRIES = frozenset(
    {
        "beta1_power", "beta2_power", "global_step", "learning_rate", "scale_sense",
        "current_iterator_step", "last_overflow_iterator_step", "epoch_num", "step_num",
        "loss_scale", "global_batch_size",
    }
)

#: At most 6 digits: a million layers is far beyond any model; longer indices are unknown names.
LAYER_INDEX = r"(0|[1-9]\d{0,5})"


class EntryClass(Enum):
    WEIGHT = "weight"
    OPTIMIZER = "optimizer"
    STEP = "step"
    PLACEHOLDER = "placeholder"  # dropout entries: no weights
    BUFFER = "buffer"  # runtime counters saved beside the weights (MoE router load statistics)
    ARTIFACT = "artifact"  # tensors a converter writes that no model has
    COPY = "copy"  # a copy of another weight the model shares (canonical: the weight it copies)
    SCALE = "scale"  # the block scales of an FP8 weight (canonical: the weight's)
    UNKNOWN = "unknown"


#: MoE routers' runtime statistics (FORMAT.md §6): zeros or counts, never weights
BUFFER_SUFFIXES = (".router.expert_load", ".router.fi_accu")
#: mindformers' convert_weight writes this when a model has *no* MTP layer (an inverted condition)
ARTIFACTS = frozenset({"mtp.output_layer.weight"})


@dataclass(frozen=True)
class NameClass:
    kind: EntryClass
    canonical: str | None = None
    layer: int | None = None
    scheme: "InputScheme | None" = None
    shared: bool = False  # several schemes use this name (``lm_head.weight``): it does not tell the scheme


def non_weight_class(name: str) -> EntryClass | None:
    """The class of an entry that holds no model weight, or None."""
    if name.startswith(OPTIMIZER_PREFIXES):
        return EntryClass.OPTIMIZER
    if name in STEP_ENTRIES:
        return EntryClass.STEP
    if "dropout" in name:
        return EntryClass.PLACEHOLDER
    if name.endswith(BUFFER_SUFFIXES):
        return EntryClass.BUFFER
    if name in ARTIFACTS:
        return EntryClass.ARTIFACT
    return None


def layer_key(layer: int, suffix: str) -> str:
    """Canonical name of a per-layer weight."""
    return f"decoder.layers.{layer}.{suffix}"


def layer_of(canonical: str) -> int | None:
    """Layer index of a canonical per-layer name (the inverse of :func:`layer_key`)."""
    if not canonical.startswith("decoder.layers."):
        return None
    return int(canonical.split(".", 3)[2])


def layer_indices(canonical_names) -> list:
    """The sorted layer indices the canonical names cover."""
    return sorted({i for i in (layer_of(k) for k in canonical_names) if i is not None})


@dataclass(frozen=True)
class SourceLayouts:
    """How this input stores the tensors whose layout the checkpoint does not record."""

    qkv: QkvLayout
    fc1: Fc1Layout


class InputScheme:
    """One checkpoint naming family. Subclasses fill the tables and may override the hooks."""

    #: short id shown in ``plan``
    name = ""
    #: what the user reads in ``plan``: "older mindformers Llama names", ...
    description = ""
    #: canonical name -> name as stored, for global weights
    globals: dict = {}
    #: per-layer suffix as stored -> canonical suffix
    layer_suffixes: dict = {}
    #: regex with the layer index as group 1 and the suffix as group 2
    layer_pattern: re.Pattern = re.compile(r"$^")
    #: a checkpoint with this scheme's names may hold no other scheme's (whose layouts and notes would differ)
    exclusive = False
    #: the names alone do not tell the architecture: a model config (config.json) must come with the weights
    needs_model_config = False

    def __init__(self):
        self._globals_by_stored = {v: k for k, v in self.globals.items()}

    def canonical(self, name: str) -> NameClass | None:
        """The canonical weight ``name`` stands for in this scheme, or None."""
        name = self.normalize(name)
        if name in self._globals_by_stored:
            return NameClass(EntryClass.WEIGHT, self._globals_by_stored[name], None, self)
        m = self.layer_pattern.fullmatch(name)
        if m and m.group(2) in self.layer_suffixes:
            i = int(m.group(1))
            return NameClass(EntryClass.WEIGHT, layer_key(i, self.layer_suffixes[m.group(2)]), i, self)
        return None

    def normalize(self, name: str) -> str:
        """Undo wrappers around names (e.g. a ``model.`` prefix); identity by default."""
        return name

    def regroup(self, tensors: dict) -> dict:
        """{canonical: SourceTensor} with names only the whole checkpoint can settle (which layers are MTP) settled."""
        return tensors

    def source_layouts(self, options) -> SourceLayouts:
        """Row layouts of this scheme's fused tensors (mindformers: what the layout flags say)."""
        return SourceLayouts(QkvLayout(options.qkv_layout), Fc1Layout(options.fc1_layout))

    def notes(self, config, options) -> list:
        """What the user must know about how this input was read (assumed layouts, fusions)."""
        return []

    def refusal(self, name: str) -> str | None:
        """A one-line refusal for a name of this family that streamconv cannot convert yet, or None."""
        return None
