"""What each tensor name in a MindSpore checkpoint means.

Every name is classified once, from the header, as one of:

* a model weight, given a *canonical* name (the mcore name of FORMAT.md §1, plus a
  few internal names for legacy tensors that are stored split, such as
  ``linear_q``/``linear_k``/``linear_v`` and ``linear_fc1_gate``/``linear_fc1_up``);
* an entry that carries no model weight (optimizer moments, step counters, loss
  scale, dropout placeholders), skipped and counted;
* unknown, which is refused: guessing would risk a silently wrong model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

OPTIMIZER_PREFIXES = ("adam_m.", "adam_v.", "moment1.", "moment2.", "accu_grads.")
STEP_ENTRIES = frozenset(
    {
        "beta1_power", "beta2_power", "global_step", "learning_rate", "scale_sense",
        "current_iterator_step", "last_overflow_iterator_step", "epoch_num", "step_num",
        "loss_scale", "global_batch_size",
    }
)

_GLOBAL_MCORE = {
    "embedding.word_embeddings.weight": "embedding.word_embeddings.weight",
    "output_layer.weight": "output_layer.weight",
    "decoder.final_layernorm.weight": "decoder.final_layernorm.weight",
    "decoder.final_layernorm.bias": "decoder.final_layernorm.bias",
}

#: per-layer suffixes of current mindformers (mcore) checkpoints
LAYER_MCORE = (
    "input_layernorm.weight", "input_layernorm.bias",
    "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
    "self_attention.q_layernorm.weight", "self_attention.q_layernorm.bias",
    "self_attention.k_layernorm.weight", "self_attention.k_layernorm.bias",
    "self_attention.linear_proj.weight", "self_attention.linear_proj.bias",
    "pre_mlp_layernorm.weight", "pre_mlp_layernorm.bias",
    "mlp.linear_fc1.weight", "mlp.linear_fc1.bias",
    "mlp.linear_fc2.weight", "mlp.linear_fc2.bias",
)

_GLOBAL_LEGACY = {
    "model.tok_embeddings.embedding_weight": "embedding.word_embeddings.weight",
    "lm_head.weight": "output_layer.weight",
    "model.norm_out.weight": "decoder.final_layernorm.weight",
    "model.norm_out.bias": "decoder.final_layernorm.bias",
}

#: legacy mindformers (Llama / Qwen2 path) per-layer suffix -> canonical suffix
_LAYER_LEGACY = {
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

# At most 6 digits: a million layers is far beyond any model; longer indices are unknown names.
_WRAPPED_MCORE = ("model.decoder.", "model.embedding.", "model.output_layer.")
_MCORE_LAYER_RE = re.compile(r"decoder\.layers\.(0|[1-9]\d{0,5})\.(.+)")
_LEGACY_LAYER_RE = re.compile(r"model\.layers\.(0|[1-9]\d{0,5})\.(.+)")


@dataclass(frozen=True)
class NameClass:
    kind: str  # "weight" | "optimizer" | "step" | "placeholder" | "unknown"
    canonical: str | None = None
    layer: int | None = None
    legacy: bool = False


def layer_key(layer: int, suffix: str) -> str:
    return f"decoder.layers.{layer}.{suffix}"


def classify(name: str) -> NameClass:
    """Say what the checkpoint entry ``name`` is (see module docstring)."""
    if name.startswith(OPTIMIZER_PREFIXES):
        return NameClass("optimizer")
    if name in STEP_ENTRIES:
        return NameClass("step")
    if "dropout" in name:
        return NameClass("placeholder")
    if name.startswith(_WRAPPED_MCORE):
        # some mindformers wrappers keep the mcore model under ``model.``; same weights
        name = name[len("model."):]
    if name in _GLOBAL_MCORE:
        return NameClass("weight", _GLOBAL_MCORE[name])
    if name in _GLOBAL_LEGACY:
        return NameClass("weight", _GLOBAL_LEGACY[name], legacy=True)
    m = _MCORE_LAYER_RE.fullmatch(name)
    if m and m.group(2) in LAYER_MCORE:
        i = int(m.group(1))
        return NameClass("weight", layer_key(i, m.group(2)), i)
    m = _LEGACY_LAYER_RE.fullmatch(name)
    if m and m.group(2) in _LAYER_LEGACY:
        i = int(m.group(1))
        return NameClass("weight", layer_key(i, _LAYER_LEGACY[m.group(2)]), i, legacy=True)
    return NameClass("unknown")
