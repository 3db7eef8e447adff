"""Multi-latent attention (DeepSeek-V2/V3): every dimension from the shapes of one layer.

Megatron's MLA (FORMAT.md §6) has, per head, a query/key of ``qk_head_dim``
(no rope) + ``qk_pos_emb_head_dim`` (rope) and a value of ``v_head_dim``:

* ``linear_q_down_proj`` [q_lora, H] -> ``q_layernorm`` -> ``linear_q_up_proj`` [n (qk + r), q_lora]
  (or, without q_lora, one ``linear_q_proj`` [n (qk + r), H]);
* ``linear_kv_down_proj`` [kv_lora + r, H] (rows [c_kv; k_pe]) -> ``kv_layernorm`` ->
  ``linear_kv_up_proj`` [n (qk + v), kv_lora];
* ``linear_proj`` [H, n v].

Three equations fix the three unknowns: n r = q_up - kv_up + proj, then
qk = (kv_up - proj) / n and v = proj / n. mindformers' ``mla_qkv_concat`` form
stores the two down projections as one ``linear_qkv`` ([q_a; c_kv; k_pe]) and
the up projections as ``linear_qb`` / ``linear_kvb``, with ``k_layernorm`` as the
kv norm.
"""

from __future__ import annotations

from ..core.errors import InputError
from .config import AttentionKind, MlaConfig
from .tensors import LayerTensors, check_flag


def is_mla(lt: LayerTensors) -> bool:
    return lt.has("self_attention.linear_kv_down_proj.weight") or lt.has("self_attention.linear_kvb.weight")


def _rows(t, cols: int | None = None):
    if len(t.shape) != 2 or (cols is not None and t.shape[1] != cols):
        want = f"[rows, {cols}]" if cols is not None else "2-D"
        raise InputError(f"{t.path}: {t.name} has shape {list(t.shape)}; expected {want}")
    return t.shape[0]


def infer(lt: LayerTensors, h: int, o, notes: list) -> MlaConfig:
    concat = lt.has("self_attention.linear_kvb.weight")
    proj = lt.need("self_attention.linear_proj.weight")
    if len(proj.shape) != 2 or proj.shape[0] != h:
        raise InputError(f"{proj.path}: {proj.name} has shape {list(proj.shape)}; expected [{h}, heads*v_head_dim]")
    proj_cols = proj.shape[1]
    if concat:
        qkv = lt.need("self_attention.linear_qkv.weight")
        qb, kvb = lt.need("self_attention.linear_qb.weight"), lt.need("self_attention.linear_kvb.weight")
        q_lora, kv_lora = qb.shape[1], kvb.shape[1]
        rope = _rows(qkv, h) - q_lora - kv_lora
        q_up_rows, kv_up_rows = _rows(qb, q_lora), _rows(kvb, kv_lora)
        layernorms = lt.has("self_attention.q_layernorm.weight")
        where = qkv
    else:
        kv_down = lt.need("self_attention.linear_kv_down_proj.weight")
        kv_up = lt.need("self_attention.linear_kv_up_proj.weight")
        kv_lora = kv_up.shape[1] if len(kv_up.shape) == 2 else -1
        rope = _rows(kv_down, h) - kv_lora
        kv_up_rows = _rows(kv_up)
        if lt.has("self_attention.linear_q_down_proj.weight"):
            q_down = lt.need("self_attention.linear_q_down_proj.weight")
            q_lora = _rows(q_down, h)
            q_up_rows = _rows(lt.need("self_attention.linear_q_up_proj.weight"), q_lora)
        else:
            q_lora = None
            q_proj = "self_attention.linear_q_proj.weight"
            if not lt.has(q_proj) and lt.has("self_attention.linear_q.weight"):
                q_proj = "self_attention.linear_q.weight"  # Hugging Face q_proj
            q_up_rows = _rows(lt.need(q_proj), h)
        layernorms = lt.has("self_attention.kv_layernorm.weight")
        where = kv_down
    if rope <= 0 or (q_up_rows - kv_up_rows + proj_cols) % rope:
        raise InputError(
            f"{where.path}: {where.name} {list(where.shape)} and the up projections do not fit multi-latent "
            f"attention (rope part {rope}); the checkpoint is damaged or not an MLA model"
        )
    n = (q_up_rows - kv_up_rows + proj_cols) // rope
    if n <= 0 or (kv_up_rows - proj_cols) % n or proj_cols % n or q_up_rows % n:
        raise InputError(f"{where.path}: the MLA projections of {where.name} do not give a whole number of heads")
    qk, v = (kv_up_rows - proj_cols) // n, proj_cols // n
    if q_up_rows != n * (qk + rope) or qk <= 0 or v <= 0:
        raise InputError(f"{where.path}: the MLA query rows ({q_up_rows}) do not fit {n} heads of {qk}+{rope}")
    for name, flag, found in (
        ("num_attention_heads", "--num-attention-heads", n), ("q_lora_rank", "--q-lora-rank", q_lora),
        ("kv_lora_rank", "--kv-lora-rank", kv_lora), ("qk_head_dim", "--qk-head-dim", qk),
        ("qk_pos_emb_head_dim", "--qk-pos-emb-head-dim", rope), ("v_head_dim", "--v-head-dim", v),
    ):
        check_flag(o.source_of(name, flag), getattr(o, name, None), found,
                   f"layer {lt.i}'s multi-latent attention shapes give {name.replace('_', ' ')}")
    notes.append(f"multi-latent attention: {n} heads, q_lora_rank={q_lora}, kv_lora_rank={kv_lora}, "
                 f"qk_head_dim={qk}, qk_pos_emb_head_dim={rope}, v_head_dim={v}")
    q_name = q_proj if not concat and q_lora is None else "self_attention.linear_q_proj.weight"
    return MlaConfig(AttentionKind.MLA, n, q_lora, kv_lora, qk, rope, v, layernorms, concat, q_proj=q_name)


def expected_shapes(a: MlaConfig, h: int, norm_bias: bool) -> dict:
    """Per-layer suffix -> source shape of every attention tensor this config implies."""
    n, qh, vh = a.num_heads, a.qk_head_dim + a.qk_pos_emb_head_dim, a.qk_head_dim + a.v_head_dim
    s = {"self_attention.linear_proj.weight": (h, n * a.v_head_dim)}
    if a.concat:
        s["self_attention.linear_qkv.weight"] = (a.q_lora_rank + a.kv_lora_rank + a.qk_pos_emb_head_dim, h)
        s["self_attention.linear_qb.weight"] = (n * qh, a.q_lora_rank)
        s["self_attention.linear_kvb.weight"] = (n * vh, a.kv_lora_rank)
        if a.layernorms:
            s["self_attention.q_layernorm.weight"] = (a.q_lora_rank,)
            s["self_attention.k_layernorm.weight"] = (a.kv_lora_rank,)
        return s
    if a.q_lora_rank is None:
        s[a.q_proj] = (n * qh, h)
    else:
        s["self_attention.linear_q_down_proj.weight"] = (a.q_lora_rank, h)
        s["self_attention.linear_q_up_proj.weight"] = (n * qh, a.q_lora_rank)
        if a.layernorms:
            s["self_attention.q_layernorm.weight"] = (a.q_lora_rank,)
    s["self_attention.linear_kv_down_proj.weight"] = (a.kv_lora_rank + a.qk_pos_emb_head_dim, h)
    s["self_attention.linear_kv_up_proj.weight"] = (n * vh, a.kv_lora_rank)
    if a.layernorms:
        s["self_attention.kv_layernorm.weight"] = (a.kv_lora_rank,)
    return s
