"""Self-attention: heads, query groups and head dim from the shapes of one layer.

``linear_proj`` [hidden, heads x head_dim] and ``linear_qkv`` [(heads + 2 x
groups) x head_dim, hidden] (or separate q/k/v) fix heads x head_dim and
groups x head_dim; the head dim itself comes from the q-layernorm size when the
model has one, else from ``--kv-channels``, ``--num-attention-heads`` or
``--num-query-groups``. Biases are decided with the MLP's (see
:func:`linear_biases`) because Megatron's ``add_bias_linear`` spans both.
"""

from __future__ import annotations

from ..core.errors import FlagError, InputError
from .config import AttentionConfig, AttentionKind
from .tensors import LayerTensors, check_flag


def infer(lt: LayerTensors, h: int, o, notes: list) -> AttentionConfig:
    """The attention of layer ``lt`` (biases filled in by :func:`with_biases`)."""
    split = lt.shape("self_attention.linear_qkv.weight") is None and lt.shape("self_attention.linear_q.weight") is not None
    proj = lt.need("self_attention.linear_proj.weight")
    if len(proj.shape) != 2 or proj.shape[0] != h:
        raise InputError(f"{proj.path}: {proj.name} has shape {list(proj.shape)}; expected [{h}, heads*head_dim]")
    q_total = proj.shape[1]
    if split:  # legacy wq / wk / wv
        wq = lt.need("self_attention.linear_q.weight")
        wk = lt.need("self_attention.linear_k.weight")
        if wq.shape[0] != q_total:
            raise InputError(f"{wq.path}: {wq.name} has {wq.shape[0]} rows but {proj.name} has {q_total} columns")
        kv_total = wk.shape[0]
    else:
        qkv = lt.need("self_attention.linear_qkv.weight")
        rows = qkv.shape[0]
        if len(qkv.shape) != 2 or qkv.shape[1] != h or rows <= q_total or (rows - q_total) % 2:
            raise InputError(
                f"{qkv.path}: {qkv.name} has shape {list(qkv.shape)}, which does not fit "
                f"(heads + 2*groups)*head_dim rows with heads*head_dim = {q_total} (from {proj.name})"
            )
        kv_total = (rows - q_total) // 2

    qln = lt.shape("self_attention.q_layernorm.weight")
    qk_ln = qln is not None
    if o.qk_layernorm and not qk_ln:
        raise FlagError(f"--qk-layernorm given, but {lt.tensors.index.load_path} has no self_attention.q_layernorm weights")
    head_dim = None
    if qk_ln:
        head_dim = qln[0]
        if not o.qk_layernorm:
            notes.append("qk_layernorm")
    if head_dim is None and o.kv_channels:
        head_dim = o.kv_channels
    if head_dim is None and o.num_attention_heads:
        if q_total % o.num_attention_heads:
            raise FlagError(f"--num-attention-heads {o.num_attention_heads} does not divide {proj.name}'s {q_total} columns")
        head_dim = q_total // o.num_attention_heads
    if head_dim is None and o.num_query_groups:
        if kv_total % o.num_query_groups:
            raise FlagError(f"--num-query-groups {o.num_query_groups} does not divide the {kv_total} key rows of layer 0")
        head_dim = kv_total // o.num_query_groups
    if head_dim is None:
        raise FlagError(
            "cannot tell the number of attention heads from the shapes alone; pass --num-attention-heads "
            "(and --num-query-groups for GQA)"
        )
    if o.kv_channels is not None and o.kv_channels != head_dim:
        raise FlagError(f"--kv-channels {o.kv_channels} contradicts the checkpoint: the q_layernorm size gives head dim {head_dim}")
    if q_total % head_dim or kv_total % head_dim:
        raise FlagError(
            f"head dim {head_dim} does not divide the query ({q_total}) and key ({kv_total}) rows; "
            "check --num-attention-heads / --num-query-groups"
        )
    nq, ng = q_total // head_dim, kv_total // head_dim
    check_flag(o.source_of("num_attention_heads", "--num-attention-heads"), o.num_attention_heads, nq, f"with head dim {head_dim}, {proj.name} {list(proj.shape)} gives a head count of")
    check_flag(o.source_of("num_query_groups", "--num-query-groups"), o.num_query_groups, ng, f"with head dim {head_dim}, layer 0's key/value rows give a query-group count of")
    if nq % ng:
        raise InputError(f"{nq} attention heads are not a multiple of {ng} query groups; the checkpoint is not a GQA model")
    if nq * head_dim != h:
        notes.append(
            f"heads x head dim = {nq} x {head_dim} = {nq * head_dim}, not the hidden size {h} (normal for Qwen3; "
            "if this file is one rank's slice of per-rank training output, merge it first)"
        )
    if o.num_attention_heads is None:
        notes.append(f"num_attention_heads={nq}")
    if o.num_query_groups is None and ng != nq:
        notes.append(f"num_query_groups={ng}")
    return AttentionConfig(AttentionKind.STANDARD, nq, ng, head_dim, qkv_bias=False, proj_bias=False,
                           qk_layernorm=qk_ln, split=split)


def has_qkv_bias(lt: LayerTensors, att: AttentionConfig) -> bool:
    return lt.has("self_attention.linear_q.bias") if att.split else lt.has("self_attention.linear_qkv.bias")


def expected_shapes(a: AttentionConfig, h: int, norm_bias: bool) -> dict:
    """Per-layer suffix -> source shape of every attention tensor this config implies."""
    d, nq, ng = a.head_dim, a.num_heads, a.num_query_groups
    s = {"self_attention.linear_proj.weight": (h, nq * d)}
    if a.split:
        s["self_attention.linear_q.weight"] = (nq * d, h)
        s["self_attention.linear_k.weight"] = (ng * d, h)
        s["self_attention.linear_v.weight"] = (ng * d, h)
        if a.qkv_bias:
            s["self_attention.linear_q.bias"] = (nq * d,)
            s["self_attention.linear_k.bias"] = (ng * d,)
            s["self_attention.linear_v.bias"] = (ng * d,)
    else:
        s["self_attention.linear_qkv.weight"] = ((nq + 2 * ng) * d, h)
        if a.qkv_bias:
            s["self_attention.linear_qkv.bias"] = ((nq + 2 * ng) * d,)
    if a.qk_layernorm:
        s["self_attention.q_layernorm.weight"] = (d,)
        s["self_attention.k_layernorm.weight"] = (d,)
        if norm_bias:
            s["self_attention.q_layernorm.bias"] = (d,)
            s["self_attention.k_layernorm.bias"] = (d,)
    if a.proj_bias:
        s["self_attention.linear_proj.bias"] = (h,)
    return s
