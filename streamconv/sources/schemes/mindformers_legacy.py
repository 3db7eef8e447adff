"""Older mindformers names (the Llama / Qwen2 path): ``model.layers.N.attention.wq``, ``feed_forward.w1``, ...

FORMAT.md §1 "Older mindformers naming". q/k/v and gate/up may be stored
separately (canonical ``self_attention.linear_q/k/v`` and
``mlp.linear_fc1_gate/up``, fused by the Megatron layout) or fused as
``w_qkv`` / ``w_gate_hidden``, which follow the same layout flags as the mcore
names. No rotary permutation differs from Megatron's.
"""

from __future__ import annotations

import re

from .base import LAYER_INDEX, InputScheme
from .mindformers_layouts import layout_notes


class MindformersLegacy(InputScheme):
    name = "mindformers-legacy"
    description = "legacy mindformers names"
    globals = {
        "embedding.word_embeddings.weight": "model.tok_embeddings.embedding_weight",
        "output_layer.weight": "lm_head.weight",
        "decoder.final_layernorm.weight": "model.norm_out.weight",
        "decoder.final_layernorm.bias": "model.norm_out.bias",
    }
    layer_suffixes = {
        "attention_norm.weight": "input_layernorm.weight",
        "attention_norm.bias": "input_layernorm.bias",
        "ffn_norm.weight": "pre_mlp_layernorm.weight",
        "ffn_norm.bias": "pre_mlp_layernorm.bias",
        "attention.wq.weight": "self_attention.linear_q.weight",
        "attention.wq.bias": "self_attention.linear_q.bias",
        "attention.wk.weight": "self_attention.linear_k.weight",
        "attention.wk.bias": "self_attention.linear_k.bias",
        "attention.wv.weight": "self_attention.linear_v.weight",
        "attention.wv.bias": "self_attention.linear_v.bias",
        "attention.w_qkv.weight": "self_attention.linear_qkv.weight",
        "attention.w_qkv.bias": "self_attention.linear_qkv.bias",
        "attention.wo.weight": "self_attention.linear_proj.weight",
        "attention.wo.bias": "self_attention.linear_proj.bias",
        "feed_forward.w1.weight": "mlp.linear_fc1_gate.weight",
        "feed_forward.w1.bias": "mlp.linear_fc1_gate.bias",
        "feed_forward.w3.weight": "mlp.linear_fc1_up.weight",
        "feed_forward.w3.bias": "mlp.linear_fc1_up.bias",
        "feed_forward.w_gate_hidden.weight": "mlp.linear_fc1.weight",
        "feed_forward.w_gate_hidden.bias": "mlp.linear_fc1.bias",
        "feed_forward.w2.weight": "mlp.linear_fc2.weight",
        "feed_forward.w2.bias": "mlp.linear_fc2.bias",
    }
    layer_pattern = re.compile(rf"model\.layers\.{LAYER_INDEX}\.(.+)")

    def notes(self, config, options) -> list:
        return layout_notes(config, options)
