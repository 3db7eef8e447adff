"""The resolved model: global dimensions plus one spec per layer.

Every value here was read from tensor shapes or given by a flag and checked
against the shapes. Layers carry their own attention and MLP specs because
real models mix kinds (DeepSeek-style: the first layers dense, the rest MoE);
the properties at the bottom give the single values Megatron's ``args`` want
for the common case where every layer has the same attention and dense MLP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class AttentionKind(Enum):
    STANDARD = "standard"  # one linear_qkv (grouped-query, multi-head or multi-query)
    MLA = "mla"  # multi-latent attention (DeepSeek): low-rank q and kv projections


class MlpKind(Enum):
    DENSE = "dense"  # linear_fc1 -> activation -> linear_fc2
    MOE = "moe"  # router + routed experts (+ shared experts)


class ExpertStorage(Enum):
    """How the routed experts' weights are stored in the source."""

    STACKED_TRANSPOSED = "stacked"  # mindformers: weight1 [E*H, 2F], weight2 [E*F, H], each expert [in, out]
    PER_EXPERT = "per_expert"  # one gate/up/down tensor per expert, [out, in] (Hugging Face)


class Normalization(str, Enum):
    RMSNORM = "RMSNorm"
    LAYERNORM = "LayerNorm"

    def __str__(self) -> str:
        return self.value

    __hash__ = str.__hash__


@dataclass(frozen=True)
class AttentionConfig:
    kind: AttentionKind
    num_heads: int
    num_query_groups: int
    head_dim: int
    qkv_bias: bool
    proj_bias: bool
    qk_layernorm: bool
    split: bool  # q/k/v stored as separate tensors (legacy wq/wk/wv)

    @property
    def group_query_attention(self) -> bool:
        return self.num_query_groups != self.num_heads


@dataclass(frozen=True)
class MlaConfig:
    """Multi-latent attention; ``q_lora_rank`` None: one linear_q_proj instead of q down/up projections."""

    kind: AttentionKind
    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_head_dim: int  # the no-rope part of a query/key head
    qk_pos_emb_head_dim: int  # the rope part
    v_head_dim: int
    layernorms: bool  # q (with q_lora) and kv layernorms present
    concat: bool  # mindformers' mla_qkv_concat form: linear_qkv = [q_a; c_kv; k_pe], linear_qb, linear_kvb
    qkv_bias: bool = False
    proj_bias: bool = False
    q_proj: str = "self_attention.linear_q_proj.weight"  # canonical name of the q projection without q_lora

    @property
    def qk_layernorm(self) -> bool:
        return self.layernorms

    @property
    def split(self) -> bool:
        return False


@dataclass(frozen=True)
class MlpConfig:
    kind: MlpKind
    ffn: int
    gated: bool  # SwiGLU: linear_fc1 holds [gate; up]
    bias: bool
    split: bool  # gate/up stored as separate tensors (legacy w1/w3)


@dataclass(frozen=True)
class MoeConfig:
    kind: MlpKind
    num_experts: int
    ffn: int  # per-expert intermediate size (moe_ffn_hidden_size)
    storage: ExpertStorage
    expert_bias: bool  # the router's score-correction bias (kept fp32)
    shared: MlpConfig | None  # shared experts as one gated MLP, or None
    reshaped: bool = False  # weight1 declared [H, E*2F] (mindformers 1.6): same bytes as [E*H, 2F]
    bias: bool = False
    split: bool = False

    @property
    def gated(self) -> bool:
        return True


@dataclass(frozen=True)
class LayerSpec:
    attention: object  # AttentionConfig | MlaConfig
    mlp: object  # MlpConfig | MoeConfig


@dataclass
class ModelConfig:
    num_layers: int
    hidden_size: int
    source_vocab: int
    padded_vocab_size: int
    normalization: Normalization
    tied: bool
    seq_length: int
    max_position_embeddings: int
    position_embedding_type: str
    layers: tuple  # LayerSpec per layer
    inferred: list = field(default_factory=list)  # notes on values taken from shapes
    mtp_layers: tuple = ()  # LayerSpec of each multi-token-prediction layer's transformer layer
    layer_refs: list = field(default_factory=list, repr=False, compare=False)  # reference layer of each layer

    @property
    def moe(self) -> MoeConfig | None:
        """The routed-expert config (every MoE layer has the same), or None for a dense model."""
        return next((s.mlp for s in self.layers if s.mlp.kind is MlpKind.MOE), None)

    @property
    def mla(self) -> MlaConfig | None:
        return self.attention if self.attention.kind is AttentionKind.MLA else None

    @property
    def moe_layer_pattern(self) -> list:
        """1 for a MoE layer, 0 for a dense one (Megatron's --moe-layer-freq list)."""
        return [int(s.mlp.kind is MlpKind.MOE) for s in self.layers]

    # -- views for the uniform case (every layer the same attention, one dense MLP shape) --
    @property
    def attention(self) -> AttentionConfig:
        return self.layers[0].attention

    @property
    def dense_mlp(self) -> MlpConfig | None:
        return next((s.mlp for s in self.layers if s.mlp.kind is MlpKind.DENSE), None)

    @property
    def norm_has_bias(self) -> bool:
        return self.normalization == Normalization.LAYERNORM

    @property
    def num_attention_heads(self) -> int:
        return self.attention.num_heads

    @property
    def num_query_groups(self) -> int:
        return self.attention.num_heads if self.mla else self.attention.num_query_groups

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.attention.num_heads if self.mla else self.attention.head_dim

    @property
    def group_query_attention(self) -> bool:
        return False if self.mla else self.attention.group_query_attention

    @property
    def qk_layernorm(self) -> bool:
        return self.attention.qk_layernorm

    @property
    def add_qkv_bias(self) -> bool:
        return self.attention.qkv_bias

    #: set by resolve_config when no layer is dense (the value only fills Megatron's args)
    dense_ffn_hint: int | None = None

    @property
    def ffn_hidden_size(self) -> int:
        if self.dense_mlp is not None:
            return self.dense_mlp.ffn
        return self.dense_ffn_hint or 4 * self.hidden_size

    @property
    def swiglu(self) -> bool:
        return self.dense_mlp.gated if self.dense_mlp is not None else True

    @property
    def add_bias_linear(self) -> bool:
        return self.attention.proj_bias
