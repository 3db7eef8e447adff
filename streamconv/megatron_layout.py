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
    """Entries of source layer ``i_src``, written as layer ``i_out`` of its PP stage."""
    S = lambda s: src[layer_key(i_src, s)]  # noqa: E731
    K = lambda s: layer_key(i_out, s)  # noqa: E731
    te = impl == "transformer_engine"
    bias = cfg.add_bias_linear
    nb = cfg.norm_has_bias
    out: list = []

    def rep(s):
        t = S(s)
        return lambda r, R, t=t: M.replicated(t, r, R)

    def norm(local_name, te_name):
        w = _t(K(te_name + "_weight") if te else K(local_name + ".weight"), rep(local_name + ".weight"), 1)
        res = [w]
        if nb:
            res.append(_t(K(te_name + "_bias") if te else K(local_name + ".bias"), rep(local_name + ".bias"), 1))
        return res

    # -- attention ----------------------------------------------------------
    if not te:
        out += norm("input_layernorm", "")
    else:
        out.append(_bytes(K("self_attention.core_attention._extra_state"), TE_MODULE_EXTRA_STATE))
    proj = S("self_attention.linear_proj.weight")
    out.append(_t(K("self_attention.linear_proj.weight"), lambda r, R, t=proj: M.split_cols(t, r, R), 2))
    if bias:
        out.append(_t(K("self_attention.linear_proj.bias"), rep("self_attention.linear_proj.bias"), 1))
    out.append(_bytes(K("self_attention.linear_proj._extra_state"), TE_MODULE_EXTRA_STATE) if te
               else _none(K("self_attention.linear_proj._extra_state")))
    if te:
        out.append(_t(K("self_attention.linear_qkv.layer_norm_weight"), rep("input_layernorm.weight"), 1))
        if nb:
            out.append(_t(K("self_attention.linear_qkv.layer_norm_bias"), rep("input_layernorm.bias"), 1))
    for part, ndim in (("weight", 2), ("bias", 1)):
        if part == "bias" and not cfg.add_qkv_bias:
            continue
        if cfg.qkv_split:
            q, k, v = (S(f"self_attention.linear_{x}.{part}") for x in "qkv")
            rule = lambda r, R, q=q, k=k, v=v: M.qkv_split(q, k, v, cfg, r, R)  # noqa: E731
        else:
            t = S(f"self_attention.linear_qkv.{part}")
            rule = lambda r, R, t=t: M.qkv_fused(t, cfg, qkv_layout, r, R)  # noqa: E731
        out.append(_t(K(f"self_attention.linear_qkv.{part}"), rule, ndim))
    out.append(_bytes(K("self_attention.linear_qkv._extra_state"), TE_MODULE_EXTRA_STATE) if te
               else _none(K("self_attention.linear_qkv._extra_state")))
    if cfg.qk_layernorm:
        for which in ("q_layernorm", "k_layernorm"):
            out.append(_t(K(f"self_attention.{which}.weight"), rep(f"self_attention.{which}.weight"), 1))
            if nb:
                out.append(_t(K(f"self_attention.{which}.bias"), rep(f"self_attention.{which}.bias"), 1))
            if te:
                out.append(_bytes(K(f"self_attention.{which}._extra_state"), TE_NORM_EXTRA_STATE))

    # -- MLP ----------------------------------------------------------------
    if not te:
        out += norm("pre_mlp_layernorm", "")
    else:
        out.append(_t(K("mlp.linear_fc1.layer_norm_weight"), rep("pre_mlp_layernorm.weight"), 1))
        if nb:
            out.append(_t(K("mlp.linear_fc1.layer_norm_bias"), rep("pre_mlp_layernorm.bias"), 1))
    ffn = cfg.ffn_hidden_size
    for part, ndim in (("weight", 2), ("bias", 1)):
        if part == "bias" and not bias:
            continue
        if cfg.fc1_split:
            g, u = S(f"mlp.linear_fc1_gate.{part}"), S(f"mlp.linear_fc1_up.{part}")
            rule = lambda r, R, g=g, u=u: M.fc1_split(g, u, ffn, r, R)  # noqa: E731
        elif cfg.swiglu:
            t = S(f"mlp.linear_fc1.{part}")
            rule = lambda r, R, t=t: M.fc1_gated(t, ffn, fc1_layout, r, R)  # noqa: E731
        else:
            t = S(f"mlp.linear_fc1.{part}")
            rule = lambda r, R, t=t: M.split_rows(t, r, R)  # noqa: E731
        out.append(_t(K(f"mlp.linear_fc1.{part}"), rule, ndim))
    out.append(_bytes(K("mlp.linear_fc1._extra_state"), TE_MODULE_EXTRA_STATE) if te
               else _none(K("mlp.linear_fc1._extra_state")))
    fc2 = S("mlp.linear_fc2.weight")
    out.append(_t(K("mlp.linear_fc2.weight"), lambda r, R, t=fc2: M.split_cols(t, r, R), 2))
    if bias:
        out.append(_t(K("mlp.linear_fc2.bias"), rep("mlp.linear_fc2.bias"), 1))
    out.append(_bytes(K("mlp.linear_fc2._extra_state"), TE_MODULE_EXTRA_STATE) if te
               else _none(K("mlp.linear_fc2._extra_state")))
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
