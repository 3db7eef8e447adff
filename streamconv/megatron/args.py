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
    "norm_epsilon": "norm_epsilon",
    "use_rope_scaling": "use_rope_scaling",
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
    fields = [
        ("num_layers", cfg.num_layers),
        ("hidden_size", cfg.hidden_size),
        ("num_attention_heads", cfg.num_attention_heads),
        ("add_position_embedding", True),
        ("max_position_embeddings", cfg.max_position_embeddings),
        ("make_vocab_size_divisible_by", o.make_vocab_size_divisible_by),
        ("padded_vocab_size", cfg.padded_vocab_size),
        ("tokenizer_type", o.tokenizer_type),
        ("data_parallel_random_init", False),
        ("tensor_model_parallel_size", sizes.tp),
        ("pipeline_model_parallel_size", sizes.pp),
        ("consumed_train_samples", 0),
        ("skipped_train_samples", 0),
        ("consumed_valid_samples", 0),
        ("ffn_hidden_size", ffn),
        ("seq_length", cfg.seq_length),
        ("num_query_groups", groups),
        ("group_query_attention", cfg.group_query_attention or o.group_query_attention),
        ("kv_channels", cfg.kv_channels),
        ("position_embedding_type", cfg.position_embedding_type),
        ("use_rotary_position_embeddings", False),
        ("rotary_base", o.rotary_base),
        ("rotary_percent", o.rotary_percent),
        ("rotary_interleaved", o.rotary_interleaved),
        ("add_bias_linear", cfg.add_bias_linear),
        ("add_qkv_bias", cfg.add_qkv_bias or cfg.add_bias_linear),
        ("squared_relu", False),
        ("swiglu", cfg.swiglu),
        ("untie_embeddings_and_output_weights", not cfg.tied),
        ("apply_layernorm_1p", False),
        ("normalization", str(cfg.normalization.value)),
        ("apply_query_key_layer_scaling", False),
        ("attention_dropout", o.attention_dropout),
        ("hidden_dropout", o.hidden_dropout),
        ("hybrid_override_pattern", None),
        ("spec", None),
        ("hybrid_attention_ratio", 0.0),
        ("hybrid_mlp_ratio", 0.0),
        ("num_experts", None),
        ("moe_layer_freq", 1),
        ("moe_ffn_hidden_size", ffn),
        ("moe_router_topk", 2),
        ("moe_token_dispatcher_type", "allgather"),
        ("moe_router_pre_softmax", False),
        ("moe_grouped_gemm", False),
        ("moe_shared_expert_intermediate_size", None),
        ("mamba_state_dim", 128),
        ("mamba_head_dim", 64),
        ("mamba_num_groups", 8),
        ("is_hybrid_model", False),
        ("heterogeneous_layers_config_path", None),
        ("heterogeneous_layers_config_encoded_json", None),
        ("tokenizer_model", None),
        ("tiktoken_pattern", None),
        ("ckpt_format", "torch"),
        ("virtual_pipeline_model_parallel_size", None),
        ("num_layers_per_virtual_pipeline_stage", None),
        ("expert_model_parallel_size", 1),
        ("fp16", False),
        ("bf16", True),
    ]
    if cfg.qk_layernorm:
        fields.append(("qk_layernorm", True))
    # Known only from a model config (config.json); Megatron's load path does not read them (the user passes
    # --norm-epsilon / --use-rope-scaling), but the official pipeline's full args carry both, so they are recorded.
    if o.norm_epsilon is not None:
        fields.append(("norm_epsilon", o.norm_epsilon))
    if o.use_rope_scaling:
        fields.append(("use_rope_scaling", True))
    fields.append(("transformer_impl", o.saver_transformer_impl))
    ns = argparse.Namespace()
    for k, v in fields:
        setattr(ns, k, v)
    return ns
