"""Hints from a Hugging Face ``config.json`` (Llama, Qwen2/3, Qwen3-MoE, DeepSeek-V3 families).

Key mapping (FORMAT.md §6 "HF config -> Megatron flags", checked against real
Megatron r0.12 and transformers): ``rope_theta`` -> rotary_base,
``max_position_embeddings``, ``rms_norm_eps`` -> norm_epsilon,
``num_experts_per_tok`` -> moe_router_topk; DeepSeek-V3 routes with sigmoid
scores, ``routed_scaling_factor`` and, with ``n_group`` > 1, group-limited
top-k (``n_group``/``topk_group``); Qwen3-MoE uses softmax, where
``norm_topk_prob: false`` means Megatron's ``--moe-router-pre-softmax``. Yarn
``rope_scaling`` maps to rotary_scaling_factor / mscale / mscale_all_dim with
max_position_embeddings = ``original_max_position_embeddings``. Model
dimensions are hints too, checked against the shapes like flags.
"""

from __future__ import annotations

import os

from ...core.errors import InputError
from . import Hint, load_json

SIGMOID_ROUTED = ("deepseek_v3",)


def read(path: str) -> dict:
    cfg = load_json(path)
    name = os.path.basename(path)
    out: dict = {}

    def put(field, key, value=None, transform=None):
        v = cfg.get(key) if value is None else value
        if v is None:
            return
        out[field] = Hint(transform(v) if transform else v, f"{name} {key}")

    put("rotary_base", "rope_theta", transform=lambda v: int(v) if float(v).is_integer() else float(v))
    put("max_position_embeddings", "max_position_embeddings", transform=int)
    eps_key = "rms_norm_eps" if "rms_norm_eps" in cfg else "layer_norm_eps"
    put("norm_epsilon", eps_key, transform=float)
    put("num_layers", "num_hidden_layers", transform=int)
    put("hidden_size", "hidden_size", transform=int)
    put("num_attention_heads", "num_attention_heads", transform=int)
    put("num_query_groups", "num_key_value_heads", transform=int)
    model_type = cfg.get("model_type", "")
    if "head_dim" in cfg and model_type not in SIGMOID_ROUTED:  # DeepSeek's head_dim is the rope dim
        put("kv_channels", "head_dim", transform=int)
    if cfg.get("tie_word_embeddings") is False:
        out["untie_embeddings_and_output_weights"] = Hint(True, f"{name} tie_word_embeddings")

    experts = cfg.get("num_experts") or cfg.get("n_routed_experts")
    if experts:
        put("moe_router_topk", "num_experts_per_tok", transform=int)
        if model_type in SIGMOID_ROUTED or cfg.get("scoring_func") == "sigmoid":
            out["moe_router_score_function"] = Hint("sigmoid", f"{name} model_type {model_type}")
            put("moe_router_topk_scaling_factor", "routed_scaling_factor", transform=float)
            if (cfg.get("n_group") or 1) > 1:
                put("moe_router_num_groups", "n_group", transform=int)
                put("moe_router_group_topk", "topk_group", transform=int)
            if cfg.get("norm_topk_prob") is False and (cfg.get("num_experts_per_tok") or 1) > 1:
                raise InputError(f"{path}: norm_topk_prob false with sigmoid routing is not expressible in "
                                 "Megatron r0.12 (it always normalises the top-k sigmoid scores)")
        else:
            out["moe_router_score_function"] = Hint("softmax", f"{name} model_type {model_type}")
            if "norm_topk_prob" in cfg:
                out["moe_router_pre_softmax"] = Hint(not cfg["norm_topk_prob"], f"{name} norm_topk_prob")
    rs = cfg.get("rope_scaling")
    if isinstance(rs, dict):
        kind = rs.get("type") or rs.get("rope_type")
        if kind == "yarn":
            out["rotary_scaling_factor"] = Hint(float(rs.get("factor", 1.0)), f"{name} rope_scaling.factor")
            for src_key, field in (("mscale", "mscale"), ("mscale_all_dim", "mscale_all_dim")):
                if rs.get(src_key) is not None:
                    out[field] = Hint(float(rs[src_key]), f"{name} rope_scaling.{src_key}")
            if rs.get("original_max_position_embeddings"):
                out["max_position_embeddings"] = Hint(int(rs["original_max_position_embeddings"]),
                                                      f"{name} rope_scaling.original_max_position_embeddings")
        elif kind not in (None, "default"):
            out["_rope_scaling_unsupported"] = Hint(kind, f"{name} rope_scaling.type")
    archs = cfg.get("architectures")
    if isinstance(archs, list) and archs:
        out["_architecture"] = Hint(str(archs[0]), f"{name} architectures")
    return out
