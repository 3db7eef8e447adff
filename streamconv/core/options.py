"""Everything a user can ask of a conversion, independent of how it was asked.

The CLI fills :class:`ConvertOptions` from the official ``convert.py`` flags
(plus streamconv's own); library callers build it directly. Model-dimension
fields left as ``None``/``False`` are inferred from the checkpoint's shapes.
Choices are ``str`` enums, so they compare equal to the flag strings and
serialise as them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from enum import Enum


class Choice(str, Enum):
    """A flag value: equal to its string, listed by :meth:`values` for argparse."""

    @classmethod
    def values(cls) -> tuple:
        return tuple(m.value for m in cls)

    def __str__(self) -> str:
        return self.value

    __hash__ = str.__hash__  # a member and its string are the same dict key


class Fc1Layout(Choice):
    """Row layout of a fused gated ``linear_fc1`` in the source."""

    INTERLEAVED = "interleaved"  # gate_0, up_0, gate_1, ... (mindformers default)
    CONCAT = "concat"  # [gate; up] (Megatron's own)


class QkvLayout(Choice):
    """Row layout of a fused ``linear_qkv`` in the source."""

    GROUPED = "grouped"  # per query group [q heads; k; v] (Megatron's own, mindformers default)
    CONTIGUOUS = "contiguous"  # [all Q; all K; all V]


class TransformerImpl(Choice):
    """Megatron's layer spec, which decides the output key names."""

    LOCAL = "local"
    TRANSFORMER_ENGINE = "transformer_engine"


class CkptFormat(Choice):
    """Megatron's ``--ckpt-format``: the output container."""

    TORCH = "torch"  # legacy: one torch.save file per rank
    TORCH_DIST = "torch_dist"  # distributed: global tensors in chunks (torch Distributed Checkpoint)


# Kept for callers of the first version.
FC1_LAYOUTS = Fc1Layout.values()
QKV_LAYOUTS = QkvLayout.values()
TRANSFORMER_IMPLS = TransformerImpl.values()

#: options that do not change the output bytes (not part of a run's identity)
RUNTIME_FIELDS = ("save_dir", "max_memory", "overwrite", "resume", "verify", "quiet", "notices",
                  "loader_transformer_impl", "model_config", "provenance")


@dataclass
class ConvertOptions:
    load_dir: str
    save_dir: str | None = None
    target_tensor_parallel_size: int = 1
    target_pipeline_parallel_size: int = 1
    target_expert_parallel_size: int = 1
    saver_transformer_impl: str = TransformerImpl.TRANSFORMER_ENGINE.value
    loader_transformer_impl: str = TransformerImpl.LOCAL.value
    position_embedding_type: str = "rope"
    true_vocab_size: int | None = None
    padded_vocab_size: int | None = None
    make_vocab_size_divisible_by: int = 128
    vocab_file: str | None = None
    tokenizer_type: str = "HuggingFaceTokenizer"
    # Megatron's values in ``args`` that the weights cannot tell (defaults: what the official pipeline writes).
    # Megatron's --use-checkpoint-args takes them from the checkpoint, so e.g. Qwen3 needs --rotary-base 1000000.
    rotary_base: int | None = None  # None: from a model config beside the input, else 10000
    rotary_percent: float = 1.0
    rotary_interleaved: bool = False
    attention_dropout: float = 0.1
    hidden_dropout: float = 0.1
    num_layers: int | None = None
    seq_length: int | None = None  # None: from a model config, else 2048
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
    fc1_layout: str | None = None  # None: from a mindformers YAML, else interleaved (mindformers' default)
    qkv_layout: str | None = None  # None: from a mindformers YAML, else grouped
    max_memory: int | None = None
    overwrite: bool = False
    resume: bool = False
    verify: bool = False
    quiet: bool = False
    notices: list = field(default_factory=list)
    # -- added after the first release: part of a run's identity only when not at their default,
    # so that a first-version command line still produces byte-identical files --
    target_expert_tensor_parallel_size: int | None = None
    ckpt_format: str = CkptFormat.TORCH.value
    # values the weights cannot tell (Megatron's names); None: from a model config file, else Megatron's default
    norm_epsilon: float | None = None
    use_rope_scaling: bool | None = None  # Llama 3.1 rope scaling (config.json rope_scaling llama3)
    moe_router_topk: int | None = None
    moe_router_score_function: str | None = None
    moe_router_topk_scaling_factor: float | None = None
    moe_router_num_groups: int | None = None
    moe_router_group_topk: int | None = None
    moe_router_pre_softmax: bool | None = None
    moe_grouped_gemm: bool = False
    rotary_scaling_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    # MoE / MLA / MTP / uneven pipeline: the shapes decide these; a given value must agree with them
    num_experts: int | None = None
    moe_ffn_hidden_size: int | None = None
    moe_shared_expert_intermediate_size: int | None = None
    moe_router_enable_expert_bias: bool = False
    moe_layer_freq: object = None  # int or list, as Megatron's --moe-layer-freq
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_head_dim: int | None = None
    qk_pos_emb_head_dim: int | None = None
    v_head_dim: int | None = None
    multi_latent_attention: bool = False
    mtp_num_layers: int | None = None
    decoder_first_pipeline_num_layers: int | None = None
    decoder_last_pipeline_num_layers: int | None = None
    model_config: str | None = None  # --model-config: a config.json / mindformers YAML to take those values from
    provenance: dict = field(default_factory=dict)  # field -> where its value came from, if not a flag
    # per-rank training output: MindSpore's src_strategy_path (file or directory) and the step to take
    src_strategy_path: str | None = None
    step: int | None = None

    def source_of(self, name: str, flag: str) -> str:
        """How to name the origin of option ``name`` in a message: its flag, or the config key it came from."""
        return self.provenance.get(name, flag)

    def check(self) -> None:
        """Refuse flag values that are wrong whatever the checkpoint (before any header is read)."""
        from .errors import FlagError

        if self.saver_transformer_impl not in TransformerImpl.values():
            raise FlagError(f"--saver-transformer-impl {self.saver_transformer_impl!r}: choose local or transformer_engine")
        if self.fc1_layout is not None and self.fc1_layout not in Fc1Layout.values():
            raise FlagError(f"--fc1-layout {self.fc1_layout!r}: choose interleaved or concat")
        if self.qkv_layout is not None and self.qkv_layout not in QkvLayout.values():
            raise FlagError(f"--qkv-layout {self.qkv_layout!r}: choose grouped or contiguous")
        if self.make_vocab_size_divisible_by is None or self.make_vocab_size_divisible_by < 1:
            raise FlagError(f"--make-vocab-size-divisible-by {self.make_vocab_size_divisible_by}: must be a positive integer")
        if self.step is not None and self.step < 0:
            raise FlagError(f"--step {self.step}: must be a step number saved in the rank files (0 or more)")
        for flag, value in (("--target-tensor-parallel-size", self.target_tensor_parallel_size),
                            ("--target-pipeline-parallel-size", self.target_pipeline_parallel_size)):
            if value is None or value < 1:
                raise FlagError(f"{flag} {value}: must be a positive integer")

    def fingerprint(self) -> dict:
        """The options that decide the output bytes (compared by ``--resume``, seeding file ids)."""
        d = asdict(self)
        for k in RUNTIME_FIELDS:
            d.pop(k, None)
        for f in fields(self)[_FIRST_ADDED:]:
            if f.name in d and d[f.name] == f.default:
                d.pop(f.name)
        return d


_FIRST_ADDED = [f.name for f in fields(ConvertOptions)].index("target_expert_tensor_parallel_size")
