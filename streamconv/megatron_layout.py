"""The keys of a Megatron-LM core rank file, in Megatron's order, and how each is made.

``model`` in a legacy checkpoint is ``GPTModel.state_dict()``: module
registration order, each module's parameters then its ``_extra_state``. For the
``local`` spec a layer is ``input_layernorm, self_attention (linear_proj,
linear_qkv, q/k_layernorm), pre_mlp_layernorm, mlp (linear_fc1, linear_fc2)``;
``transformer_engine`` fuses the two layer norms into ``linear_qkv`` and
``linear_fc1`` (``layer_norm_weight``/``layer_norm_bias``) and adds
``core_attention._extra_state``. The official pipeline's values for
``_extra_state``: ``None`` for local linear layers; TE modules return an empty
uint8 tensor (linear layers, attention) or the pickled empty state dict ``{}``
(ops-based TE norms, which is also what ``decoder.final_layernorm`` is whenever
Transformer Engine is installed). See FORMAT.md §2.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import mapping as M
from .config import ModelConfig
from .names import layer_key

#: pickle.dumps({}, protocol=4): what a TE ops-based norm stores as _extra_state
TE_NORM_EXTRA_STATE = b"\x80\x04}\x94."
#: what a TE 2.x linear/attention module stores without FP8: an empty uint8 tensor
TE_MODULE_EXTRA_STATE = b""


@dataclass(frozen=True)
class EntrySpec:
    """One key of ``model``: a BF16 tensor built from pieces, ``None``, or a small uint8 tensor."""

    key: str
    kind: str  # "tensor" | "none" | "bytes"
    rule: object = None  # callable(r, R) -> list[Piece] for "tensor"
    ndim: int = 2
    data: bytes = b""


def _t(key, rule, src_ndim):
    return EntrySpec(key, "tensor", rule, src_ndim)


def _none(key):
    return EntrySpec(key, "none")


def _bytes(key, data):
    return EntrySpec(key, "bytes", data=data)


def layer_entries(cfg: ModelConfig, src: dict, i_src: int, i_out: int, impl: str,
                  fc1_layout: str, qkv_layout: str) -> list:
    """Entries of source layer ``i_src``, written as layer ``i_out`` of its PP stage, in Megatron's order."""
    S = lambda s: src[layer_key(i_src, s)]  # noqa: E731  source tensor of this layer
    K = lambda s: layer_key(i_out, s)  # noqa: E731  output key of this layer
    te = impl == "transformer_engine"
    ffn = cfg.ffn_hidden_size

    def replicated(suffix):
        t = S(suffix)
        return lambda r, R, t=t: M.replicated(t, r, R)

    def extra_state(module):
        key = K(f"{module}._extra_state")
        return _bytes(key, TE_MODULE_EXTRA_STATE) if te else _none(key)

    def norm(module, has_bias, out_module=None, te_extra=False):
        """A norm's weight (+ bias); TE fuses input/pre-MLP norms into the next linear layer."""
        out_w, out_b = (f"{out_module}.layer_norm_weight", f"{out_module}.layer_norm_bias") if out_module \
            else (f"{module}.weight", f"{module}.bias")
        ents = [_t(K(out_w), replicated(f"{module}.weight"), 1)]
        if has_bias:
            ents.append(_t(K(out_b), replicated(f"{module}.bias"), 1))
        if te_extra:
            ents.append(_bytes(K(f"{module}._extra_state"), TE_NORM_EXTRA_STATE))
        return ents

    def column_parallel(module, rule_for, has_bias):
        """linear_qkv / linear_fc1: rows split per rank by the given rule, bias likewise."""
        ents = [_t(K(f"{module}.weight"), rule_for("weight"), 2)]
        if has_bias:
            ents.append(_t(K(f"{module}.bias"), rule_for("bias"), 1))
        return ents + [extra_state(module)]

    def row_parallel(module):
        """linear_proj / linear_fc2: columns split per rank; the bias is added once, so it is replicated."""
        w = S(f"{module}.weight")
        ents = [_t(K(f"{module}.weight"), lambda r, R, t=w: M.split_cols(t, r, R), 2)]
        if cfg.add_bias_linear:
            ents.append(_t(K(f"{module}.bias"), replicated(f"{module}.bias"), 1))
        return ents + [extra_state(module)]

    def qkv_rule(part):
        if cfg.qkv_split:  # legacy wq / wk / wv
            q, k, v = (S(f"self_attention.linear_{x}.{part}") for x in "qkv")
            return lambda r, R: M.qkv_split(q, k, v, cfg, r, R)
        t = S(f"self_attention.linear_qkv.{part}")
        return lambda r, R: M.qkv_fused(t, cfg, qkv_layout, r, R)

    def fc1_rule(part):
        if cfg.fc1_split:  # legacy w1 / w3
            g, u = S(f"mlp.linear_fc1_gate.{part}"), S(f"mlp.linear_fc1_up.{part}")
            return lambda r, R: M.fc1_split(g, u, ffn, r, R)
        t = S(f"mlp.linear_fc1.{part}")
        if cfg.swiglu:
            return lambda r, R: M.fc1_gated(t, ffn, fc1_layout, r, R)
        return lambda r, R: M.split_rows(t, r, R)

    nb = cfg.norm_has_bias
    out: list = []
    # TransformerLayer: input_layernorm, self_attention(core_attention, linear_proj, linear_qkv,
    # q_layernorm, k_layernorm), pre_mlp_layernorm, mlp(linear_fc1, linear_fc2)
    if te:
        out.append(_bytes(K("self_attention.core_attention._extra_state"), TE_MODULE_EXTRA_STATE))
    else:
        out += norm("input_layernorm", nb)
    out += row_parallel("self_attention.linear_proj")
    if te:
        out += norm("input_layernorm", nb, out_module="self_attention.linear_qkv")
    out += column_parallel("self_attention.linear_qkv", qkv_rule, cfg.add_qkv_bias)
    if cfg.qk_layernorm:
        out += norm("self_attention.q_layernorm", nb, te_extra=te)
        out += norm("self_attention.k_layernorm", nb, te_extra=te)
    if te:
        out += norm("pre_mlp_layernorm", nb, out_module="mlp.linear_fc1")
    else:
        out += norm("pre_mlp_layernorm", nb)
    out += column_parallel("mlp.linear_fc1", fc1_rule, cfg.add_bias_linear)
    out += row_parallel("mlp.linear_fc2")
    return out


def stage_entries(cfg: ModelConfig, src: dict, stage: int, impl: str, fc1_layout: str, qkv_layout: str) -> list:
    """All entries of PP stage ``stage`` (identical key lists on every TP rank)."""
    P = cfg.pp
    per = cfg.num_layers // P
    first, last = stage == 0, stage == P - 1
    padded = cfg.padded_vocab_size
    emb = src["embedding.word_embeddings.weight"]
    vocab_rule = lambda r, R, t=emb: M.vocab_rows(t, padded, r, R)  # noqa: E731
    out: list = []
    if first:
        out.append(_t("embedding.word_embeddings.weight", vocab_rule, 2))
    for j in range(per):
        out += layer_entries(cfg, src, stage * per + j, j, impl, fc1_layout, qkv_layout)
    if last:
        fin = src["decoder.final_layernorm.weight"]
        out.append(_t("decoder.final_layernorm.weight", lambda r, R, t=fin: M.replicated(t, r, R), 1))
        if cfg.norm_has_bias:
            fb = src["decoder.final_layernorm.bias"]
            out.append(_t("decoder.final_layernorm.bias", lambda r, R, t=fb: M.replicated(t, r, R), 1))
        out.append(_bytes("decoder.final_layernorm._extra_state", TE_NORM_EXTRA_STATE))
        if not cfg.tied:
            outw = src["output_layer.weight"]
            out.append(_t("output_layer.weight", lambda r, R, t=outw: M.vocab_rows(t, padded, r, R), 2))
        elif P > 1:
            # Megatron keeps a copy of the (padded) word embeddings on the last stage.
            out.append(_t("output_layer.weight", vocab_rule, 2))
        # GPTModel's output layer is Megatron's own ColumnParallelLinear under both specs.
        out.append(_none("output_layer._extra_state"))
    return out
