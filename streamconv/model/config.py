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


class MlpKind(Enum):
    DENSE = "dense"  # linear_fc1 -> activation -> linear_fc2


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
class MlpConfig:
    kind: MlpKind
    ffn: int
    gated: bool  # SwiGLU: linear_fc1 holds [gate; up]
    bias: bool
    split: bool  # gate/up stored as separate tensors (legacy w1/w3)


@dataclass(frozen=True)
class LayerSpec:
    attention: AttentionConfig
    mlp: MlpConfig


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
        return self.attention.num_query_groups

    @property
    def kv_channels(self) -> int:
        return self.attention.head_dim

    @property
    def group_query_attention(self) -> bool:
        return self.attention.group_query_attention

    @property
    def qk_layernorm(self) -> bool:
        return self.attention.qk_layernorm

    @property
    def add_qkv_bias(self) -> bool:
        return self.attention.qkv_bias

    @property
    def ffn_hidden_size(self) -> int:
        return self.dense_mlp.ffn

    @property
    def swiglu(self) -> bool:
        return self.dense_mlp.gated

    @property
    def add_bias_linear(self) -> bool:
        return self.attention.proj_bias
