"""The ``args`` namespace stored in every rank file.

Megatron's load path (``check_checkpoint_args``, ``load_args_from_checkpoint``,
the checkpoint tools) reads 61 fields of it. We write those fields with the
values and types the official pipeline (core_r0.12.0 ``convert.py --loader
core_mf --saver core``) writes: model dimensions and flags from the conversion,
Megatron's argparse defaults for the rest. Where the official pipeline writes a
value that misdescribes the model (no ``group_query_attention`` for GQA, tied
embeddings for an untied model, ``kv_channels = hidden // heads`` when the head
dim differs) we write the true value, as the official pipeline does once its
missing arguments are supplied (the ``__argfix`` golden cases).
"""

from __future__ import annotations

import argparse

from ..core.options import ConvertOptions
from .parallel import ParallelSizes


#: option field -> the ``args`` field that records it: how verify rebuilds a conversion's options from its output
OPTIONS_IN_ARGS = {
    "target_tensor_parallel_size": "tensor_model_parallel_size",
    "target_pipeline_parallel_size": "pipeline_model_parallel_size",
    "num_layers": "num_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_query_groups",
    "kv_channels": "kv_channels",
    "seq_length": "seq_length",
    "max_position_embeddings": "max_position_embeddings",
    "position_embedding_type": "position_embedding_type",
    "normalization": "normalization",
    "make_vocab_size_divisible_by": "make_vocab_size_divisible_by",
    "tokenizer_type": "tokenizer_type",
    "rotary_base": "rotary_base",
    "rotary_percent": "rotary_percent",
    "rotary_interleaved": "rotary_interleaved",
    "attention_dropout": "attention_dropout",
    "hidden_dropout": "hidden_dropout",
    "padded_vocab_override": "padded_vocab_size",
    "target_expert_parallel_size": "expert_model_parallel_size",
    "target_expert_tensor_parallel_size": "expert_tensor_parallel_size",
    "moe_router_topk": "moe_router_topk",
    "moe_router_score_function": "moe_router_score_function",
    "moe_router_topk_scaling_factor": "moe_router_topk_scaling_factor",
    "moe_router_num_groups": "moe_router_num_groups",
    "moe_router_group_topk": "moe_router_group_topk",
    "moe_router_pre_softmax": "moe_router_pre_softmax",
    "moe_grouped_gemm": "moe_grouped_gemm",
    "rotary_scaling_factor": "rotary_scaling_factor",
    "mscale": "mscale",
    "mscale_all_dim": "mscale_all_dim",
    "norm_epsilon": "norm_epsilon",
    "use_rope_scaling": "use_rope_scaling",
    "decoder_first_pipeline_num_layers": "decoder_first_pipeline_num_layers",
    "decoder_last_pipeline_num_layers": "decoder_last_pipeline_num_layers",
}


def megatron_args(cfg, o: ConvertOptions, sizes: ParallelSizes) -> argparse.Namespace:
    """``cfg``: the resolved model (streamconv.model.config.ModelConfig)."""
    ffn = cfg.ffn_hidden_size
    if o.num_query_groups is not None or o.group_query_attention:
        groups = o.num_query_groups or cfg.num_query_groups
    else:
        # The official loader keeps the flag's value (None when omitted); for GQA the
        # true group count is needed for the model to load.
        groups = cfg.num_query_groups if cfg.group_query_attention else None
    fields = {  # in the order Megatron's own saver pickles them (the rank files' bytes depend on it)
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "add_position_embedding": True,
        "max_position_embeddings": cfg.max_position_embeddings,
        "make_vocab_size_divisible_by": o.make_vocab_size_divisible_by,
        "padded_vocab_size": cfg.padded_vocab_size,
        "tokenizer_type": o.tokenizer_type,
        "data_parallel_random_init": False,
        "tensor_model_parallel_size": sizes.tp,
        "pipeline_model_parallel_size": sizes.pp,
        "consumed_train_samples": 0,
        "skipped_train_samples": 0,
        "consumed_valid_samples": 0,
        "ffn_hidden_size": ffn,
        "seq_length": cfg.seq_length,
        "num_query_groups": groups,
        "group_query_attention": cfg.group_query_attention or o.group_query_attention,
        "kv_channels": cfg.kv_channels,
        "position_embedding_type": cfg.position_embedding_type,
        "use_rotary_position_embeddings": False,
        "rotary_base": o.rotary_base,
        "rotary_percent": o.rotary_percent,
        "rotary_interleaved": o.rotary_interleaved,
        "add_bias_linear": cfg.add_bias_linear,
        "add_qkv_bias": cfg.add_qkv_bias or cfg.add_bias_linear,
        "squared_relu": False,
        "swiglu": cfg.swiglu,
        "untie_embeddings_and_output_weights": not cfg.tied,
        "apply_layernorm_1p": False,
        "normalization": str(cfg.normalization.value),
        "apply_query_key_layer_scaling": False,
        "attention_dropout": o.attention_dropout,
        "hidden_dropout": o.hidden_dropout,
        "hybrid_override_pattern": None,
        "spec": None,
        "hybrid_attention_ratio": 0.0,
        "hybrid_mlp_ratio": 0.0,
        "num_experts": None,
        "moe_layer_freq": 1,
        "moe_ffn_hidden_size": ffn,
        "moe_router_topk": 2,
        "moe_token_dispatcher_type": "allgather",
        "moe_router_pre_softmax": False,
        "moe_grouped_gemm": False,
        "moe_shared_expert_intermediate_size": None,
        "mamba_state_dim": 128,
        "mamba_head_dim": 64,
        "mamba_num_groups": 8,
        "is_hybrid_model": False,
        "heterogeneous_layers_config_path": None,
        "heterogeneous_layers_config_encoded_json": None,
        "tokenizer_model": None,
        "tiktoken_pattern": None,
        "ckpt_format": "torch",
        "virtual_pipeline_model_parallel_size": None,
        "num_layers_per_virtual_pipeline_stage": None,
        "expert_model_parallel_size": 1,
        "fp16": False,
        "bf16": True,
    }
    if cfg.qk_layernorm:
        fields["qk_layernorm"] = True
    fields["transformer_impl"] = o.saver_transformer_impl
    _moe_fields(fields, cfg, o, sizes)
    fields.update(_mla_fields(cfg, o))
    fields.update(_other_fields(cfg, o, sizes))
    return argparse.Namespace(**fields)


def _moe_fields(fields: dict, cfg, o, sizes) -> None:
    """MoE values: the shapes' (experts, ffn, layer pattern, shared size, expert bias) and the routing settings.

    ``moe_layer_freq`` is 1 when every layer has experts, else the per-layer list: in torch_dist the spelling
    decides whether layers are stacked, so it must say what the keys are (FORMAT.md §6).
    """
    moe = cfg.moe
    if moe is None:
        return
    pattern = cfg.moe_layer_pattern
    # set in place: these keep the positions the dense defaults above give them
    fields.update(
        num_experts=moe.num_experts,
        moe_layer_freq=1 if all(pattern) else pattern,
        moe_ffn_hidden_size=moe.ffn,
        moe_router_topk=o.moe_router_topk if o.moe_router_topk is not None else 2,
        moe_router_pre_softmax=bool(o.moe_router_pre_softmax),
        moe_grouped_gemm=bool(o.moe_grouped_gemm),
        moe_shared_expert_intermediate_size=moe.shared.ffn if moe.shared else None,
        expert_model_parallel_size=sizes.ep,
    )
    fields.update(
        expert_tensor_parallel_size=sizes.count_etp(),
        moe_router_score_function=o.moe_router_score_function or "softmax",
        moe_router_enable_expert_bias=moe.expert_bias,
        moe_router_topk_scaling_factor=o.moe_router_topk_scaling_factor,
        moe_router_num_groups=o.moe_router_num_groups,
        moe_router_group_topk=o.moe_router_group_topk,
    )


def _mla_fields(cfg, o) -> dict:
    a = cfg.mla
    if a is None:
        return {}
    return {
        "multi_latent_attention": True,
        "q_lora_rank": a.q_lora_rank,
        "kv_lora_rank": a.kv_lora_rank,
        "qk_head_dim": a.qk_head_dim,
        "qk_pos_emb_head_dim": a.qk_pos_emb_head_dim,
        "v_head_dim": a.v_head_dim,
        "rotary_scaling_factor": o.rotary_scaling_factor if o.rotary_scaling_factor is not None else 1.0,
        "mscale": o.mscale if o.mscale is not None else 1.0,
        "mscale_all_dim": o.mscale_all_dim if o.mscale_all_dim is not None else 0.0,
    }


def _other_fields(cfg, o, sizes) -> dict:
    out = {}
    if cfg.mtp_layers:
        out["mtp_num_layers"] = len(cfg.mtp_layers)
    if sizes.first_stage_layers is not None:
        out["decoder_first_pipeline_num_layers"] = sizes.first_stage_layers
    if sizes.last_stage_layers is not None:
        out["decoder_last_pipeline_num_layers"] = sizes.last_stage_layers
    if o.norm_epsilon is not None:
        out["norm_epsilon"] = o.norm_epsilon
    if o.use_rope_scaling:  # Llama 3.1's rope scaling; left out otherwise, as Megatron's default is off
        out["use_rope_scaling"] = True
    return out
