"""Work out the model from tensor shapes, and check the flags against them.

Shapes decide everything they can decide unambiguously (layers, hidden, ffn,
vocab, biases, gated MLP, qk-layernorm, tied output). A flag that was given must
agree with the shapes; a disagreement is an error that names both. What shapes
cannot tell (the head count when the head dim is unknown, the sequence length)
must come from flags. Each concern lives in its own module; this one calls them
in reading order, so the notes of what was inferred read like a description.
"""

from __future__ import annotations

from dataclasses import replace

from ..core.errors import FlagError, InputError
from ..core.options import ConvertOptions
from ..sources.header import FLOAT_WEIGHT_DTYPES
from . import attention, layers, mlp, norms, vocab
from .config import LayerSpec, ModelConfig
from .tensors import Tensors
from .vocab import padded_vocab  # noqa: F401  (re-exported: Megatron's padding rule)


def resolve_config(index, o: ConvertOptions) -> ModelConfig:
    """Return the model configuration, or raise naming the conflicting flag/tensor."""
    notes: list = []
    if o.position_embedding_type not in ("rope", "none"):
        raise FlagError(
            f"--position-embedding-type {o.position_embedding_type}: mindformers GPT checkpoints have no "
            "learned position embeddings; use rope (or none)"
        )
    for tensor in index.tensors.values():
        if tensor.dtype not in FLOAT_WEIGHT_DTYPES:
            raise InputError(f"{tensor.path}: weight {tensor.name!r} has dtype {tensor.dtype}; expected F32, F16 or BF16")

    t = Tensors(index)
    source_vocab, h = vocab.embedding(t, o)
    n_layers = layers.count(t, o, notes)

    l0 = t.layer(0)
    att = attention.infer(l0, h, o, notes)
    dense = mlp.infer_dense(l0, h, o, notes)
    dense = mlp.infer_gating(l0, dense, h, o, notes)
    att, dense = _linear_biases(l0, att, dense, o, notes)
    norm = norms.infer(l0, o, notes)
    tied = vocab.output_layer(t, o)

    if not o.seq_length or o.seq_length < 1:
        raise FlagError(f"--seq-length {o.seq_length}: must be a positive integer")
    # The official loader's --max-position-embeddings defaults to 2048 and must be >= seq_length.
    max_pos = o.max_position_embeddings or max(2048, o.seq_length)
    if max_pos < o.seq_length:
        raise FlagError(f"--max-position-embeddings {max_pos} is smaller than --seq-length {o.seq_length}")
    padded = vocab.padded_size(source_vocab, o)

    spec = LayerSpec(att, dense)
    return ModelConfig(
        num_layers=n_layers, hidden_size=h, source_vocab=source_vocab, padded_vocab_size=padded,
        normalization=norm, tied=tied, seq_length=o.seq_length, max_position_embeddings=max_pos,
        position_embedding_type=o.position_embedding_type, layers=(spec,) * n_layers, inferred=notes,
    )


def check_layers(index, cfg: ModelConfig) -> None:
    """Every layer against its spec, and nothing left over (after the parallel checks, as before)."""
    layers.check_all(Tensors(index), cfg)


def _linear_biases(lt, att, dense, o, notes):
    """Megatron's add_bias_linear covers linear_proj, linear_fc1 and linear_fc2 together; qkv has its own."""
    lin_bias = [lt.has("self_attention.linear_proj.bias")] + mlp.has_fc_biases(lt, dense)
    qkv_bias = attention.has_qkv_bias(lt, att)
    if any(lin_bias) and not all(lin_bias):
        raise InputError(
            "layer 0 has biases on some linear layers but not all (linear_proj, linear_fc1, linear_fc2); "
            "Megatron's add_bias_linear needs all of them"
        )
    add_bias = all(lin_bias)
    if o.add_bias_linear and not add_bias:
        raise FlagError("--add-bias-linear given, but the checkpoint has no linear_proj/linear_fc1/linear_fc2 biases")
    if o.add_qkv_bias and not qkv_bias:
        raise FlagError("--add-qkv-bias given, but the checkpoint has no linear_qkv bias")
    if add_bias and not qkv_bias:
        raise InputError("the checkpoint has linear biases but no linear_qkv bias; Megatron's add_bias_linear needs it")
    if add_bias and not o.add_bias_linear:
        notes.append("add_bias_linear")
    return replace(att, qkv_bias=qkv_bias, proj_bias=add_bias), replace(dense, bias=add_bias)
