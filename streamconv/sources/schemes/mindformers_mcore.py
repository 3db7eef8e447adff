"""Current mindformers ("mcore") names: Megatron-core's own, optionally under a ``model.`` prefix.

FORMAT.md §1 "Names". These are already canonical; the only work is
recognising them (and the ``model.`` wrapper some mindformers models add).
"""

from __future__ import annotations

import re

from .base import LAYER_INDEX, EntryClass, InputScheme, NameClass
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
    # multi-latent attention (DeepSeek); mindformers' mla_qkv_concat form adds linear_qb / linear_kvb and
    # reuses linear_qkv (rows [q_a; c_kv; k_pe]) and k_layernorm (the kv_a norm)
    "self_attention.linear_q_proj.weight",
    "self_attention.linear_q_down_proj.weight", "self_attention.linear_q_up_proj.weight",
    "self_attention.linear_kv_down_proj.weight", "self_attention.linear_kv_up_proj.weight",
    "self_attention.kv_layernorm.weight",
    "self_attention.linear_qb.weight", "self_attention.linear_kvb.weight",
    # mixture of experts: router, stacked routed experts ([E*in, out], transposed vs Megatron), shared experts
    "mlp.router.weight", "mlp.router.expert_bias",
    "mlp.experts.weight1", "mlp.experts.weight2",
    "mlp.shared_experts.linear_fc1.weight", "mlp.shared_experts.linear_fc2.weight",
    "mlp.shared_experts.shared_experts_gate.weight",
)

#: per-MTP-layer suffixes besides its transformer_layer (mtp.layers.K.transformer_layer.<layer suffix>)
MTP_SUFFIXES = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "final_layernorm.weight")

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

    mtp_pattern = re.compile(rf"mtp\.layers\.{LAYER_INDEX}\.(.+)")

    def normalize(self, name: str) -> str:
        # some mindformers wrappers keep the mcore model under ``model.``; same weights
        return name[len("model."):] if name.startswith(_WRAPPED) else name

    def canonical(self, name: str):
        found = super().canonical(name)
        if found is not None:
            return found
        m = self.mtp_pattern.fullmatch(self.normalize(name))
        if m:
            suffix = m.group(2)
            inner = suffix[len("transformer_layer."):] if suffix.startswith("transformer_layer.") else None
            if suffix in MTP_SUFFIXES or inner in self.layer_suffixes:
                return NameClass(EntryClass.WEIGHT, f"mtp.layers.{int(m.group(1))}.{suffix}", None, self)
        return None

    def notes(self, config, options) -> list:
        return layout_notes(config, options)
