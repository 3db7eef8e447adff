"""Everything a user can ask of a conversion, independent of how it was asked.

The CLI fills :class:`ConvertOptions` from the official ``convert.py`` flags
(plus streamconv's own); library callers build it directly. Model-dimension
fields left as ``None``/``False`` are inferred from the checkpoint's shapes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

FC1_LAYOUTS = ("interleaved", "concat")
QKV_LAYOUTS = ("grouped", "contiguous")
TRANSFORMER_IMPLS = ("local", "transformer_engine")


@dataclass
class ConvertOptions:
    load_dir: str
    save_dir: str | None = None
    target_tensor_parallel_size: int = 1
    target_pipeline_parallel_size: int = 1
    target_expert_parallel_size: int = 1
    saver_transformer_impl: str = "transformer_engine"
    loader_transformer_impl: str = "local"
    position_embedding_type: str = "rope"
    true_vocab_size: int | None = None
    padded_vocab_size: int | None = None
    make_vocab_size_divisible_by: int = 128
    vocab_file: str | None = None
    tokenizer_type: str = "HuggingFaceTokenizer"
    # Megatron's values in ``args`` that the weights cannot tell (defaults: what the official pipeline writes).
    # Megatron's --use-checkpoint-args takes them from the checkpoint, so e.g. Qwen3 needs --rotary-base 1000000.
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    rotary_interleaved: bool = False
    attention_dropout: float = 0.1
    hidden_dropout: float = 0.1
    num_layers: int | None = None
    seq_length: int = 2048
    max_position_embeddings: int | None = None
    hidden_size: int | None = None
    ffn_hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_query_groups: int | None = None
    kv_channels: int | None = None
    normalization: str | None = None
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    swiglu: bool = False
    qk_layernorm: bool = False
    untie_embeddings_and_output_weights: bool = False
    group_query_attention: bool = False
    padded_vocab_override: int | None = None  # verify: the output's own padded_vocab_size
    fc1_layout: str = "interleaved"
    qkv_layout: str = "grouped"
    max_memory: int | None = None
    overwrite: bool = False
    resume: bool = False
    verify: bool = False
    quiet: bool = False
    notices: list = field(default_factory=list)

    def fingerprint(self) -> dict:
        """The options that decide the output bytes (compared by ``--resume``)."""
        d = asdict(self)
        for k in ("save_dir", "max_memory", "overwrite", "resume", "verify", "quiet", "notices",
                  "loader_transformer_impl"):
            d.pop(k, None)
        return d
