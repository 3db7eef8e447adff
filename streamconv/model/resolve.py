"""Work out the model from tensor shapes, and check the flags against them.

Shapes decide everything they can decide unambiguously (layers, hidden, ffn,
vocab, biases, gated MLP, qk-layernorm, tied output, experts, latent ranks).
A flag (or a value from the model config beside the checkpoint) that was given
must agree with the shapes; a disagreement is an error that names both. What
shapes cannot tell (the head count when the head dim is unknown, the sequence
length) must come from flags or the config. Each concern lives in its own
module; this one calls them in reading order, so the notes of what was
inferred read like a description.
"""

from __future__ import annotations

from dataclasses import replace

from ..core.errors import FlagError, InputError
from ..core.options import ConvertOptions
from ..sources.header import FLOAT_WEIGHT_DTYPES
from . import attention, layers, mlp, norms, vocab
from .config import AttentionKind, LayerSpec, MlpKind, ModelConfig
from .tensors import Tensors


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
            fp8 = " (FP8: dequantize to BF16 first)" if tensor.dtype.startswith("F8") else ""
            raise InputError(f"{tensor.path}: weight {tensor.name!r} has dtype {tensor.dtype}; expected F32, F16 "
                             f"or BF16{fp8}")

    t = Tensors(index)
    source_vocab, h = vocab.embedding(t, o)
    n_layers = layers.count(t, o, notes)
    n_mtp = layers.count_mtp(t, o)
    specs, refs = layers.infer_all([t.layer(i) for i in range(n_layers)] + [t.mtp_layer(k) for k in range(n_mtp)],
                                   h, o, notes)
    specs = _linear_biases(t, specs, refs, o, notes)
    _check_layer_freq(specs[:n_layers], o)
    norm = norms.infer(t.layer(0), o, notes)
    tied = vocab.output_layer(t, o)

    if not o.seq_length or o.seq_length < 1:
        raise FlagError(f"--seq-length {o.seq_length}: must be a positive integer")
    # The official loader's --max-position-embeddings defaults to 2048 and must be >= seq_length.
    max_pos = o.max_position_embeddings or max(2048, o.seq_length)
    if max_pos < o.seq_length:
        raise FlagError(f"--max-position-embeddings {max_pos} is smaller than --seq-length {o.seq_length}")
    padded = vocab.padded_size(source_vocab, o)

    cfg = ModelConfig(
        num_layers=n_layers, hidden_size=h, source_vocab=source_vocab, padded_vocab_size=padded,
        normalization=norm, tied=tied, seq_length=o.seq_length, max_position_embeddings=max_pos,
        position_embedding_type=o.position_embedding_type, layers=tuple(specs[:n_layers]), inferred=notes,
        mtp_layers=tuple(specs[n_layers:]),
    )
    cfg.dense_ffn_hint = o.ffn_hidden_size
    cfg.layer_refs = refs
    return cfg


def check_layers(index, cfg: ModelConfig) -> None:
    """Every layer against its spec, and nothing left over (after the parallel checks, as before)."""
    n = cfg.num_layers
    layers.check_all(Tensors(index), cfg, cfg.layer_refs[:n], cfg.layer_refs[n:])


def _check_layer_freq(specs: list, o) -> None:
    """--moe-layer-freq, if given, must say which layers the checkpoint has experts in."""
    if o.moe_layer_freq is None:
        return
    found = [int(s.mlp.kind is MlpKind.MOE) for s in specs]
    f = o.moe_layer_freq
    want = [1 if i % f == 0 else 0 for i in range(len(specs))] if isinstance(f, int) else list(f)
    if want != found:
        raise FlagError(f"{o.source_of('moe_layer_freq', '--moe-layer-freq')} {f} contradicts the checkpoint: "
                        f"its layers with experts are {found}")


def _linear_biases(t, specs: list, refs: list, o, notes: list) -> list:
    """Megatron's add_bias_linear covers linear_proj, linear_fc1 and linear_fc2 together; qkv has its own.

    Decided on layer 0 (and the first dense layer for the MLP), then applied to every layer's spec.
    """
    l0 = t.layer(0)
    att0 = specs[0].attention
    dense_i = next((i for i, s in enumerate(specs) if s.mlp.kind is MlpKind.DENSE), None)
    standard = att0.kind is AttentionKind.STANDARD
    lin_bias = [l0.has("self_attention.linear_proj.bias")]
    if dense_i is not None:
        lin_bias += mlp.has_fc_biases(refs[dense_i], specs[dense_i].mlp)
    qkv_bias = attention.has_qkv_bias(l0, att0) if standard else False
    if any(lin_bias) and not all(lin_bias):
        raise InputError(
            "layer 0 has biases on some linear layers but not all (linear_proj, linear_fc1, linear_fc2); "
            "Megatron's add_bias_linear needs all of them"
        )
    add_bias = all(lin_bias)
    if add_bias and any(s.mlp.kind is MlpKind.MOE for s in specs):
        raise InputError("the checkpoint has linear biases in a mixture-of-experts model; streamconv converts "
                         "bias-free MoE models only (Megatron's add_bias_linear would need expert biases)")
    if o.add_bias_linear and not add_bias:
        raise FlagError("--add-bias-linear given, but the checkpoint has no linear_proj/linear_fc1/linear_fc2 biases")
    if o.add_qkv_bias and not qkv_bias:
        raise FlagError("--add-qkv-bias given, but the checkpoint has no linear_qkv bias")
    if add_bias and not qkv_bias:
        raise InputError("the checkpoint has linear biases but no linear_qkv bias; Megatron's add_bias_linear needs it")
    if add_bias and not o.add_bias_linear:
        notes.append("add_bias_linear")
    out = []
    for s in specs:
        att, m = s.attention, s.mlp
        if att.kind is AttentionKind.STANDARD:
            att = replace(att, qkv_bias=qkv_bias, proj_bias=add_bias)
        if m.kind is MlpKind.DENSE:
            m = replace(m, bias=add_bias)
        out.append(LayerSpec(att, m))
    return out
