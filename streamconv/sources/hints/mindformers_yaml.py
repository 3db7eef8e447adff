"""Hints from a mindformers training YAML (``model: model_config: ...``).

mindformers 2.x names most values as Megatron does (``moe_router_topk``,
``moe_router_score_function``, ``moe_router_topk_scaling_factor``, ...), older
ones as Hugging Face does (``rope_theta``, ``num_experts_per_tok``); both are
read. Two of its flags matter more than any other value here, because nothing
in the checkpoint records them and a wrong guess gives a silently scrambled
model: ``use_interleaved_weight_layout_mlp`` (-> ``--fc1-layout``) and
``use_contiguous_weight_layout_attention`` (-> ``--qkv-layout``).
"""

from __future__ import annotations

import os

from ...core.errors import InputError
from . import Hint

#: option field -> YAML keys that may hold it (first present wins)
KEYS = {
    "rotary_base": ("rotary_base", "rope_theta", "theta"),
    "seq_length": ("seq_length",),
    "max_position_embeddings": ("max_position_embeddings",),
    "norm_epsilon": ("norm_epsilon", "layernorm_epsilon", "rms_norm_eps"),
    "moe_router_topk": ("moe_router_topk", "num_experts_per_tok"),
    "moe_router_score_function": ("moe_router_score_function",),
    "moe_router_topk_scaling_factor": ("moe_router_topk_scaling_factor", "routed_scaling_factor"),
    "moe_router_num_groups": ("moe_router_num_groups", "n_group"),
    "moe_router_group_topk": ("moe_router_group_topk", "topk_group"),
    "num_attention_heads": ("num_attention_heads", "num_heads"),
    "num_query_groups": ("num_query_groups", "n_kv_heads", "num_key_value_heads"),
}


def read(path: str) -> dict:
    import yaml

    try:
        with open(path, "r", encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f"{path}: cannot read the mindformers YAML ({str(e).splitlines()[0]}); fix it or name "
                         "another file with --model-config") from None
    model = doc.get("model") if isinstance(doc, dict) else None
    mc = model.get("model_config") if isinstance(model, dict) else None
    if not isinstance(mc, dict):
        raise InputError(f"{path}: no model: model_config: section; is this a mindformers training YAML?")
    name = os.path.basename(path)
    out: dict = {}
    for field, keys in KEYS.items():
        for k in keys:
            if mc.get(k) is not None:
                out[field] = Hint(mc[k], f"{name} {k}")
                break
    if (out.get("moe_router_num_groups") and out["moe_router_num_groups"].value <= 1):
        out.pop("moe_router_num_groups")
        out.pop("moe_router_group_topk", None)
    if "use_interleaved_weight_layout_mlp" in mc:
        v = bool(mc["use_interleaved_weight_layout_mlp"])
        out["fc1_layout"] = Hint("interleaved" if v else "concat", f"{name} use_interleaved_weight_layout_mlp: {v}")
    if "use_contiguous_weight_layout_attention" in mc:
        v = bool(mc["use_contiguous_weight_layout_attention"])
        out["qkv_layout"] = Hint("contiguous" if v else "grouped",
                                 f"{name} use_contiguous_weight_layout_attention: {v}")
    return out
