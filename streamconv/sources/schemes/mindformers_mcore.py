"""Current mindformers ("mcore") names: Megatron-core's own, optionally under a ``model.`` prefix.

FORMAT.md §1 "Names". These are already canonical; the only work is
recognising them (and the ``model.`` wrapper some mindformers models add).
"""

from __future__ import annotations

import re

from .base import LAYER_INDEX, InputScheme
from .mindformers_layouts import layout_notes

#: per-layer suffixes of current mindformers (mcore) checkpoints
LAYER_SUFFIXES = (
    "input_layernorm.weight", "input_layernorm.bias",
    "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
    "self_attention.q_layernorm.weight", "self_attention.q_layernorm.bias",
    "self_attention.k_layernorm.weight", "self_attention.k_layernorm.bias",
    "self_attention.linear_proj.weight", "self_attention.linear_proj.bias",
    "pre_mlp_layernorm.weight", "pre_mlp_layernorm.bias",
    "mlp.linear_fc1.weight", "mlp.linear_fc1.bias",
    "mlp.linear_fc2.weight", "mlp.linear_fc2.bias",
)

_WRAPPED = ("model.decoder.", "model.embedding.", "model.output_layer.")


class MindformersMcore(InputScheme):
    name = "mindformers-mcore"
    description = "mindformers mcore names"
    globals = {
        "embedding.word_embeddings.weight": "embedding.word_embeddings.weight",
        "output_layer.weight": "output_layer.weight",
        "decoder.final_layernorm.weight": "decoder.final_layernorm.weight",
        "decoder.final_layernorm.bias": "decoder.final_layernorm.bias",
    }
    layer_suffixes = {s: s for s in LAYER_SUFFIXES}
    layer_pattern = re.compile(rf"decoder\.layers\.{LAYER_INDEX}\.(.+)")

    def normalize(self, name: str) -> str:
        # some mindformers wrappers keep the mcore model under ``model.``; same weights
        return name[len("model."):] if name.startswith(_WRAPPED) else name

    def notes(self, config, options) -> list:
        return layout_notes(config, options)
