"""Hugging Face ``transformers`` names: Llama, Qwen2/2.5 (qkv bias), Qwen3 (q/k norm).

``model.embed_tokens``, ``model.layers.N.self_attn.{q,k,v,o}_proj``,
``self_attn.{q,k}_norm``, ``input_layernorm``, ``post_attention_layernorm``,
``mlp.{gate,up,down}_proj``, ``model.norm``, ``lm_head``. HF stores q/k/v and
gate/up as separate tensors, so they map to the split canonical names
(``self_attention.linear_q/k/v``, ``mlp.linear_fc1_gate/up``) that the Megatron
layout fuses with the ``QkvParts`` / ``GatedParts`` rules while streaming: no
fused copy is made, and no row layout has to be assumed (unlike mindformers'
fused tensors, FORMAT.md §1 "Row layouts"), so this scheme prints no ASSUMED
warning and ignores ``--qkv-layout`` / ``--fc1-layout``.

Rotary embedding: no row permutation. ``transformers``' Llama/Qwen2/Qwen3
attention applies ``q * cos + rotate_half(q) * sin`` with ``rotate_half(x) =
cat(-x[d/2:], x[:d/2])`` and ``cos``/``sin`` of ``cat(freqs, freqs)``
(modeling_llama.py; Meta's interleaved pairs are permuted into this order by
transformers' own convert_llama_weights_to_hf.py). Megatron core_r0.12.0 with
``rotary_interleaved=False`` does the same: ``_rotate_half`` is ``chunk(2)`` ->
``cat(-x2, x1)`` (rope_utils.py) and ``RotaryEmbedding.forward`` builds
``cat(freqs, freqs)`` (rotary_pos_embedding.py). Megatron's own HF loader
(tools/checkpoint/loader_llama_mistral.py) likewise copies ``q_proj``/``k_proj``
rows per query group without permuting them. Qwen3's q/k norm is applied per
head before rope on both sides (Megatron's ``q_layernorm``/``k_layernorm``).

MoE and MLA names (Qwen3-MoE, Qwen2-MoE, DeepSeek-V3) are recognised and refused
in one line for now: :data:`PENDING` lists them. To read them, router, shared
experts and MLA projections become rows of :attr:`HuggingFace.layer_suffixes`
(canonical names as the mindformers mcore scheme has them), and the per-expert
``mlp.experts.E.{gate,up,down}_proj`` need canonical per-expert names with a
layout rule that takes one source tensor per expert (mindformers stores them
stacked, ``mlp.experts.weight1/2``, read through ``ExpertRef``).
"""

from __future__ import annotations

import re

from ...core.options import Fc1Layout, QkvLayout
from .base import LAYER_INDEX, EntryClass, InputScheme, NameClass, SourceLayouts

#: per-layer weights that need MoE / MLA support: (pattern on the per-layer suffix, what they are)
PENDING = (
    (re.compile(r"mlp\.experts\.\d+\.(gate|up|down)_proj\.weight"), "routed experts (MoE)"),
    (re.compile(r"mlp\.gate\.(weight|e_score_correction_bias)"), "MoE router"),
    (re.compile(r"mlp\.shared_experts?\.(gate|up|down)_proj\.weight"), "shared experts (MoE)"),
    (re.compile(r"mlp\.shared_expert_gate\.weight"), "shared-expert gate (MoE)"),
    (re.compile(r"self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|q_a_layernorm|kv_a_layernorm)\.weight"),
     "multi-latent attention (MLA)"),
)


class HuggingFace(InputScheme):
    name = "hf"
    description = "Hugging Face names"
    globals = {
        "embedding.word_embeddings.weight": "model.embed_tokens.weight",
        "output_layer.weight": "lm_head.weight",
        "decoder.final_layernorm.weight": "model.norm.weight",
    }
    layer_suffixes = {
        "input_layernorm.weight": "input_layernorm.weight",
        "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
        "self_attn.q_proj.weight": "self_attention.linear_q.weight",
        "self_attn.q_proj.bias": "self_attention.linear_q.bias",
        "self_attn.k_proj.weight": "self_attention.linear_k.weight",
        "self_attn.k_proj.bias": "self_attention.linear_k.bias",
        "self_attn.v_proj.weight": "self_attention.linear_v.weight",
        "self_attn.v_proj.bias": "self_attention.linear_v.bias",
        "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
        "self_attn.o_proj.bias": "self_attention.linear_proj.bias",  # Llama attention_bias
        "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",  # Qwen3
        "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
        "mlp.gate_proj.weight": "mlp.linear_fc1_gate.weight",
        "mlp.gate_proj.bias": "mlp.linear_fc1_gate.bias",  # Llama mlp_bias
        "mlp.up_proj.weight": "mlp.linear_fc1_up.weight",
        "mlp.up_proj.bias": "mlp.linear_fc1_up.bias",
        "mlp.down_proj.weight": "mlp.linear_fc2.weight",
        "mlp.down_proj.bias": "mlp.linear_fc2.bias",
    }
    layer_pattern = re.compile(rf"model\.layers\.{LAYER_INDEX}\.(.+)")
    exclusive = True  # fused mindformers tensors beside HF ones would need layout flags this scheme ignores
    needs_model_config = True  # Gemma, Mistral, ... use these names with other maths; config.json tells

    def canonical(self, name: str) -> NameClass | None:
        m = self.layer_pattern.fullmatch(name)
        if m and m.group(2) == "self_attn.rotary_emb.inv_freq":
            # a buffer older transformers versions saved: recomputed from rope_theta, not a weight
            return NameClass(EntryClass.PLACEHOLDER)
        return super().canonical(name)

    def source_layouts(self, options) -> SourceLayouts:
        # Nothing is stored fused; the layout flags describe mindformers' fused tensors only.
        return SourceLayouts(QkvLayout.GROUPED, Fc1Layout.CONCAT)

    def refusal(self, name: str) -> str | None:
        m = self.layer_pattern.fullmatch(name)
        if not m:
            return None
        for pattern, what in PENDING:
            if pattern.fullmatch(m.group(2)):
                return (f"tensor {name!r} is a Hugging Face {what} weight; streamconv converts dense Hugging Face "
                        "models only for now (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM), not MoE or MLA "
                        "ones (convert the mindformers checkpoint made from it instead)")
        return None

    def notes(self, config, options) -> list:
        return ["Hugging Face q_proj/k_proj/v_proj are fused into Megatron's per-group linear_qkv and "
                "gate_proj/up_proj into linear_fc1 = [gate; up] while streaming (no layout to assume)"]
