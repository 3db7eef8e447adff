"""Hugging Face ``transformers`` names: Llama, Qwen2/2.5 (qkv bias), Qwen3 (q/k norm), Qwen3-MoE, DeepSeek-V3.

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

MoE: the router ``mlp.gate`` (+ DeepSeek's ``e_score_correction_bias``, kept
fp32), shared experts as a split gated MLP, and one gate/up/down tensor per
routed expert, named ``mlp.experts.E.linear_fc1_gate/up``, ``linear_fc2``
canonically and picked per EP rank by the ``ExpertOf`` rule (mindformers stacks
them instead, read through ``ExpertRef``). MLA: DeepSeek's projections are
Megatron's own tensors, unchanged, and need no rope permutation either
(``rope_interleave`` is undone inside both attentions). What Megatron r0.12
cannot load or streamconv does not read from HF names is refused in one line:
:data:`PENDING` lists it.

Multi-token prediction (DeepSeek-V3's ``num_nextn_predict_layers``): HF stores the
MTP module as one more decoder layer after the last, ``model.layers.L.*``, holding
a whole transformer layer plus ``enorm``, ``hnorm``, ``eh_proj`` and
``shared_head.norm`` (Megatron's ``mtp.layers.0.{enorm, hnorm, eh_proj,
final_layernorm}``, the same tensors: both concatenate [enorm(embedding);
hnorm(hidden)] before ``eh_proj``). Its ``embed_tokens`` and ``shared_head.head``
are copies of the model's embedding and output head, which Megatron's MTP uses
directly; they are set aside. A layer is recognised as MTP by holding those
tensors (:meth:`HuggingFace.regroup`), not by its index, so a model config is not
needed to tell.
"""

from __future__ import annotations

import re
from dataclasses import replace

from ...core.errors import InputError
from ...core.options import Fc1Layout, QkvLayout
from ..fp8 import SCALE_SUFFIX
from .base import LAYER_INDEX, EntryClass, InputScheme, NameClass, SourceLayouts, layer_key, layer_of

#: per-layer weights streamconv cannot convert from HF names: (pattern on the per-layer suffix, what they are)
PENDING = (
    (re.compile(r"mlp\.shared_expert_gate\.weight"), "shared-expert gate (Megatron r0.12 cannot load one)"),
    (re.compile(r"mlp\.shared_expert\.(gate|up|down)_proj\.weight"), "Qwen2-MoE shared expert"),
)
#: a multi-token-prediction layer's own tensors (HF suffix -> Megatron's mtp.layers.K.<suffix>)
MTP_OWN = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
           "shared_head.norm.weight": "final_layernorm.weight"}
#: in an MTP layer, copies of the model's embedding and output head (Megatron's MTP uses the model's own)
MTP_COPIES = {"embed_tokens.weight": "embedding.word_embeddings.weight", "shared_head.head.weight": "output_layer.weight"}
#: canonical suffix marking an MTP layer's own tensors until :meth:`HuggingFace.regroup` moves the layer
_MTP_MARK = "nextn."
#: routed experts, one tensor each: mlp.experts.E.{gate,up,down}_proj -> streamconv's per-expert canonical names
_EXPERT_RE = re.compile(r"mlp\.experts\.(0|[1-9]\d{0,5})\.(gate|up|down)_proj\.weight")
_EXPERT_CANONICAL = {"gate": "linear_fc1_gate", "up": "linear_fc1_up", "down": "linear_fc2"}


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
        # mixture of experts (Qwen3-MoE, DeepSeek-V3): router, score-correction bias, shared experts
        "mlp.gate.weight": "mlp.router.weight",
        "mlp.gate.e_score_correction_bias": "mlp.router.expert_bias",
        "mlp.shared_experts.gate_proj.weight": "mlp.shared_experts.linear_fc1_gate.weight",
        "mlp.shared_experts.up_proj.weight": "mlp.shared_experts.linear_fc1_up.weight",
        "mlp.shared_experts.down_proj.weight": "mlp.shared_experts.linear_fc2.weight",
        # multi-latent attention (DeepSeek): the same tensors as Megatron's, no row reordering (FORMAT.md §6);
        # without q_lora, q_proj is MLA's linear_q_proj (read under the linear_q name)
        "self_attn.q_a_proj.weight": "self_attention.linear_q_down_proj.weight",
        "self_attn.q_a_layernorm.weight": "self_attention.q_layernorm.weight",
        "self_attn.q_b_proj.weight": "self_attention.linear_q_up_proj.weight",
        "self_attn.kv_a_proj_with_mqa.weight": "self_attention.linear_kv_down_proj.weight",
        "self_attn.kv_a_layernorm.weight": "self_attention.kv_layernorm.weight",
        "self_attn.kv_b_proj.weight": "self_attention.linear_kv_up_proj.weight",
    }
    layer_pattern = re.compile(rf"model\.layers\.{LAYER_INDEX}\.(.+)")
    exclusive = True  # fused mindformers tensors beside HF ones would need layout flags this scheme ignores
    needs_model_config = True  # Gemma, Mistral, ... use these names with other maths; config.json tells

    def canonical(self, name: str) -> NameClass | None:
        if name.endswith(".weight" + SCALE_SUFFIX):  # an FP8 weight's block scales (sources/fp8.py)
            of = self.canonical(name[:-len(SCALE_SUFFIX)])
            if of is not None and of.kind is EntryClass.WEIGHT:
                return NameClass(EntryClass.SCALE, of.canonical, of.layer, self)
            return None
        m = self.layer_pattern.fullmatch(name)
        if m and m.group(2) == "self_attn.rotary_emb.inv_freq":
            # a buffer older transformers versions saved: recomputed from rope_theta, not a weight
            return NameClass(EntryClass.PLACEHOLDER)
        if m and m.group(2) in MTP_OWN:
            i = int(m.group(1))
            return NameClass(EntryClass.WEIGHT, layer_key(i, _MTP_MARK + MTP_OWN[m.group(2)]), i, self)
        if m and m.group(2) in MTP_COPIES:
            return NameClass(EntryClass.COPY, MTP_COPIES[m.group(2)], int(m.group(1)), self)
        e = _EXPERT_RE.fullmatch(m.group(2)) if m else None
        if e:
            i = int(m.group(1))
            suffix = f"mlp.experts.{int(e.group(1))}.{_EXPERT_CANONICAL[e.group(2)]}.weight"
            return NameClass(EntryClass.WEIGHT, layer_key(i, suffix), i, self)
        return super().canonical(name)

    def regroup(self, tensors: dict) -> dict:
        """Move the layers holding MTP tensors (the last ones) to ``mtp.layers.K.*``."""
        layer = {k: layer_of(k) for k in tensors}
        own = {k for k, i in layer.items() if i is not None and k.split(".", 3)[3].startswith(_MTP_MARK)}
        mtp = sorted({layer[k] for k in own})
        if not mtp:
            return tensors
        last = max(i for i in layer.values() if i is not None)
        first = last - len(mtp) + 1
        if mtp[0] < first:
            t = next(tensors[k] for k in own if layer[k] == mtp[0])
            raise InputError(
                f"{t.path}: {t.name!r} makes model.layers.{mtp[0]} a multi-token-prediction (MTP) layer, but "
                f"decoder layers follow it up to model.layers.{last}; MTP layers come after the last decoder "
                "layer: the checkpoint is damaged or not a DeepSeek-V3 model")
        out = {}
        for key, t in tensors.items():
            i = layer[key]
            if i is None or i < first:
                out[key] = t
                continue
            suffix = key.split(".", 3)[3]
            new = f"mtp.layers.{i - first}." + (suffix[len(_MTP_MARK):] if key in own else f"transformer_layer.{suffix}")
            out[new] = replace(t, canonical=new)
        return out

    def source_layouts(self, options) -> SourceLayouts:
        # Nothing is stored fused; the layout flags describe mindformers' fused tensors only.
        return SourceLayouts(QkvLayout.GROUPED, Fc1Layout.CONCAT)

    def refusal(self, name: str) -> str | None:
        m = self.layer_pattern.fullmatch(name)
        if not m:
            return None
        for pattern, what in PENDING:
            if pattern.fullmatch(m.group(2)):
                return (f"tensor {name!r} is a Hugging Face {what} weight, which streamconv does not convert "
                        "from Hugging Face names (convert the mindformers checkpoint made from it instead)")
        return None

    def notes(self, config, options) -> list:
        return ["Hugging Face q_proj/k_proj/v_proj are fused into Megatron's per-group linear_qkv and "
                "gate_proj/up_proj into linear_fc1 = [gate; up] while streaming (no layout to assume)"]
