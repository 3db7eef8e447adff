"""Converted MoE / MLA checkpoints compute the Hugging Face model's logits.

For the mindformers fixtures (Qwen3-MoE, DeepSeek-V3) the logits of a short token
sequence are computed twice, in float32 on BF16-rounded weights, and must agree
within 1e-4 of max |logit|:

(a) ``hf_logits``: the HF model the fixture was made from, written from the HF
    (transformers 4.57) semantics and read from ``hf/model.safetensors``:
    Qwen3-MoE q/k RMSNorm per head, GQA, rotate-half rope, softmax top-k routing
    with ``norm_topk_prob``; DeepSeek-V3 MLA with q_a / kv_a layernorms, rope on the
    rope part in HF's interleaved convention (``rope_interleave: true``), sigmoid
    routing with ``e_score_correction_bias`` used for selection only (kept fp32),
    ``n_group`` / ``topk_group``, ``norm_topk_prob``, ``routed_scaling_factor``, shared
    experts, ``first_k_dense_replace`` dense layers.
(b) ``megatron_logits``: a forward pass that reads ONLY the converted rank files
    (``torch.load`` of every file) and computes as Megatron r0.12 does: vocab-parallel
    embedding, column-parallel projections per TP rank, row-parallel partial sums, MLA
    down projections gathered over TP then normed, rope de-interleaved x[0::2], x[1::2]
    (Megatron's multi_latent_attention convention), routing by
    ``topk_softmax_with_capacity`` semantics from ``args`` (softmax with or without
    pre-softmax, sigmoid + expert bias + normalisation + scaling factor), local expert i
    of EP rank e = global expert e*E/EP + i, each ETP rank's [gate_t; up_t] fc1 and
    fc2 column shard, shared experts by TP, layers stage after stage (uneven stages
    from ``args``), TE or local key names and TEGroupedMLP ``weight<i>`` from ``args``.

Neither side imports streamconv; the converter runs through its CLI. Negative
controls corrupt a converted checkpoint in memory the way a wrong rule would (two
experts swapped, gate and up swapped, kv_down rows reordered) and require the logits
to move by far more than the tolerance.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from moe_fixtures import (INPUTS, convert_all, dir_name, fixture_dir, hf_config, hf_tensors, legacy_writers,
                          load_rank_file, make_variant, rank_dirs, rank_path)

SEQ = 16
REL_TOL = 1e-4  # of max |logit|
NEG_MIN = 10 * REL_TOL  # a negative control must fail the comparison by a wide margin

CASES = {
    "q3_tp2_ep2_etp1_local": dict(model="qwen3_moe", input="mf", flags=dict(tp=2, ep=2, etp=1, impl="local")),
    "q3_legacy_tp2_pp2_ep4_etp1_te": dict(model="qwen3_moe", input="legacy",
                                          flags=dict(tp=2, pp=2, ep=4, etp=1, impl="transformer_engine")),
    "q3_tp1_ep2_te_grouped": dict(model="qwen3_moe", input="mf",
                                  flags=dict(tp=1, ep=2, impl="transformer_engine", grouped=True)),
    "q3_dense0_tp2_ep2": dict(model="qwen3_moe", input="q3_dense0", flags=dict(tp=2, ep=2, impl="local")),
    "ds_tp2_pp2_ep2_first1_local": dict(model="deepseek_v3", input="mf",
                                        flags=dict(tp=2, pp=2, ep=2, first=1, impl="local")),
    "ds_convert_out_tp2_ep4_etp1_te": dict(model="deepseek_v3", input="convert_out",
                                           flags=dict(tp=2, ep=4, etp=1, impl="transformer_engine")),
    "ds_legacy_tp4_ep2_te_grouped": dict(model="deepseek_v3", input="legacy",
                                         flags=dict(tp=4, ep=2, impl="transformer_engine", grouped=True)),
    "ds4_noqlora_tp2_pp2_ep2_local": dict(model="deepseek_v3", input="ds4_noqlora",
                                          flags=dict(tp=2, pp=2, ep=2, impl="local")),
}


def _argv(f: dict, load: str, config: str, save: str) -> list:
    argv = ["--load-dir", load, "--save-dir", save, "--model-config", config, "--quiet",
            "--target-tensor-parallel-size", str(f["tp"]), "--target-pipeline-parallel-size", str(f.get("pp", 1)),
            "--target-expert-parallel-size", str(f["ep"]), "--saver-transformer-impl", f["impl"]]
    if "etp" in f:
        argv += ["--target-expert-tensor-parallel-size", str(f["etp"])]
    if f.get("grouped"):
        argv.append("--moe-grouped-gemm")
    if "first" in f:
        argv += ["--decoder-first-pipeline-num-layers", str(f["first"])]
    return argv


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_logits")
    variants = {}
    jobs, out = {}, {}
    for name, case in CASES.items():
        m, which = case["model"], case["input"]
        if which in INPUTS[m]:
            load = os.path.join(fixture_dir(m), INPUTS[m][which])
            config = os.path.join(fixture_dir(m), "hf", "config.json")
            hf, cfg = None, hf_config(m)
        else:
            v = variants.get(which) or variants.setdefault(which, make_variant(which, str(root / "variants")))
            load, config, hf, cfg = v["load"], v["config"], v["hf"], v["hf_config"]
        save = str(root / name)
        jobs[name] = _argv(case["flags"], load, config, save)
        out[name] = dict(save=save, hf=hf if hf is not None else hf_tensors(m), cfg=cfg)
    errors = convert_all(jobs)
    for name in out:
        out[name]["error"] = errors[name]
    return out


# ---------------------------------------------------------------------------- arithmetic shared by (a) and (b)
def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate_half(x):
    d = x.shape[-1]
    return torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)


def rope_tables(n, dim, base):
    """cos, sin [n, dim] of the usual rotary embedding (frequencies repeated for the two halves)."""
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    ang = torch.outer(torch.arange(n, dtype=torch.float32), inv_freq)
    emb = torch.cat([ang, ang], -1)
    return emb.cos(), emb.sin()


def causal_attention(q, k, v, scale):
    """q, k: [seq, heads, dk], v: [seq, heads, dv] -> [seq, heads * dv]."""
    s = q.shape[0]
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out.reshape(s, -1)


def bf16(t):
    return t.to(torch.bfloat16).to(torch.float32)


# ---------------------------------------------------------------------------- (a) the Hugging Face model
def hf_logits(hf: dict, cfg: dict, tokens) -> torch.Tensor:
    """HF Qwen3MoeForCausalLM / DeepseekV3ForCausalLM semantics; weights BF16-rounded, the expert score
    correction bias kept fp32 (as Megatron keeps its expert_bias)."""
    w = {k: (v.float() if k.endswith("e_score_correction_bias") else bf16(v)) for k, v in hf.items()}
    eps = cfg["rms_norm_eps"]
    ds = cfg["model_type"] == "deepseek_v3"
    x = w["model.embed_tokens.weight"][tokens]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        x = x + (_hf_mla(w, p + "self_attn.", cfg, h, eps) if ds else _hf_gqa(w, p + "self_attn.", cfg, h, eps))
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        if ds:
            dense = i < cfg["first_k_dense_replace"]
        else:
            dense = i in cfg.get("mlp_only_layers", []) or (i + 1) % cfg["decoder_sparse_step"] != 0
        m = p + "mlp."
        if dense:
            x = x + _hf_mlp(w, m, h)
        elif ds:
            x = x + _hf_deepseek_moe(w, m, cfg, h)
        else:
            x = x + _hf_qwen3_moe(w, m, cfg, h)
    x = rms_norm(x, w["model.norm.weight"], eps)
    return x @ w["lm_head.weight"].T


def _hf_mlp(w, p, h):
    return (F.silu(h @ w[p + "gate_proj.weight"].T) * (h @ w[p + "up_proj.weight"].T)) @ w[p + "down_proj.weight"].T


def _hf_gqa(w, p, cfg, h, eps):
    n, nq, ng, d = len(h), cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    q = (h @ w[p + "q_proj.weight"].T).view(n, nq, d)
    k = (h @ w[p + "k_proj.weight"].T).view(n, ng, d)
    v = (h @ w[p + "v_proj.weight"].T).view(n, ng, d)
    q, k = rms_norm(q, w[p + "q_norm.weight"], eps), rms_norm(k, w[p + "k_norm.weight"], eps)
    cos, sin = rope_tables(n, d, cfg["rope_theta"])
    cos, sin = cos[:, None], sin[:, None]
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    rep = nq // ng
    ctx = causal_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), d ** -0.5)
    return ctx @ w[p + "o_proj.weight"].T


def _hf_rope_interleave(x, cos, sin):
    """transformers' apply_rotary_pos_emb_interleave: view pairs (d/2, 2), transpose, then rotate-half."""
    s, nh, d = x.shape
    x = x.view(s, nh, d // 2, 2).transpose(-1, -2).reshape(s, nh, d)
    return x * cos + rotate_half(x) * sin


def _hf_mla(w, p, cfg, h, eps):
    n, nh = len(h), cfg["num_attention_heads"]
    nope, rope, vd, kv_lora = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    assert cfg.get("rope_interleave", True) and cfg.get("rope_scaling") is None
    if cfg.get("q_lora_rank") is None:
        q = h @ w[p + "q_proj.weight"].T
    else:
        q = rms_norm(h @ w[p + "q_a_proj.weight"].T, w[p + "q_a_layernorm.weight"], eps) @ w[p + "q_b_proj.weight"].T
    q = q.view(n, nh, nope + rope)
    q_pass, q_rot = q.split([nope, rope], -1)
    ckv = h @ w[p + "kv_a_proj_with_mqa.weight"].T
    k_pass, k_rot = ckv.split([kv_lora, rope], -1)
    kv = (rms_norm(k_pass, w[p + "kv_a_layernorm.weight"], eps) @ w[p + "kv_b_proj.weight"].T).view(n, nh, nope + vd)
    k_pass, value = kv.split([nope, vd], -1)
    cos, sin = rope_tables(n, rope, cfg["rope_theta"])
    cos, sin = cos[:, None], sin[:, None]
    q_rot = _hf_rope_interleave(q_rot, cos, sin)
    k_rot = _hf_rope_interleave(k_rot.view(n, 1, rope), cos, sin).expand(n, nh, rope)
    query, key = torch.cat([q_pass, q_rot], -1), torch.cat([k_pass, k_rot], -1)
    ctx = causal_attention(query, key, value, (nope + rope) ** -0.5)
    return ctx @ w[p + "o_proj.weight"].T


def _hf_qwen3_moe(w, p, cfg, h):
    E, k = cfg["num_experts"], cfg["num_experts_per_tok"]
    probs = (h @ w[p + "gate.weight"].T).softmax(-1)
    top_w, top_i = probs.topk(k, -1)
    if cfg["norm_topk_prob"]:
        top_w = top_w / top_w.sum(-1, keepdim=True)
    out = torch.zeros_like(h)
    for e in range(E):
        sel = (top_i == e)
        weight = (top_w * sel).sum(-1, keepdim=True)
        out = out + weight * _hf_mlp(w, p + f"experts.{e}.", h)
    return out


def _hf_deepseek_moe(w, p, cfg, h):
    E, k = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    ng, tg = cfg["n_group"], cfg["topk_group"]
    scores = (h @ w[p + "gate.weight"].T).sigmoid()
    choice = scores + w[p + "gate.e_score_correction_bias"]
    group_scores = choice.view(-1, ng, E // ng).topk(2, -1)[0].sum(-1)
    group_idx = group_scores.topk(tg, -1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask[:, :, None].expand(-1, ng, E // ng).reshape(-1, E)
    top_i = choice.masked_fill(~score_mask.bool(), 0.0).topk(k, -1, sorted=False)[1]
    top_w = scores.gather(1, top_i)
    if cfg["norm_topk_prob"]:
        top_w = top_w / (top_w.sum(-1, keepdim=True) + 1e-20)
    top_w = top_w * cfg["routed_scaling_factor"]
    out = torch.zeros_like(h)
    for e in range(E):
        weight = (top_w * (top_i == e)).sum(-1, keepdim=True)
        out = out + weight * _hf_mlp(w, p + f"experts.{e}.", h)
    return out + _hf_mlp(w, p + "shared_experts.", h)


# ---------------------------------------------------------------------------- (b) Megatron rank files
class Tracked(dict):
    """A rank's ``model`` dict that remembers which keys were read."""

    def __init__(self, *a):
        super().__init__(*a)
        self.used = set()

    def get_t(self, k):
        self.used.add(k)
        v = dict.__getitem__(self, k)
        assert v.dtype == (torch.float32 if k.endswith("expert_bias") else torch.bfloat16), (k, v.dtype)
        return v.float()


class MegatronCheckpoint:
    """Every rank file of a legacy checkpoint, addressed by Megatron's coordinates."""

    def __init__(self, save: str):
        dirs = rank_dirs(save)
        a = load_rank_file(rank_path(save, dirs[0]))["args"]
        self.args = a
        self.tp, self.pp, self.ep = a.tensor_model_parallel_size, a.pipeline_model_parallel_size, a.expert_model_parallel_size
        self.etp = getattr(a, "expert_tensor_parallel_size", None) or self.tp
        self.etp_of = legacy_writers(self.tp, self.ep, self.etp)  # (tp, ep) -> etp of the writing rank
        self.files = {}
        for p in range(self.pp):
            for (t, e) in self.etp_of:
                sd = load_rank_file(rank_path(save, dir_name(t, p, e, self.pp, self.ep)))
                assert vars(sd["args"]) == vars(a), "args differ between rank files"
                self.files[(p, t, e)] = Tracked(sd["model"])
        assert sorted(dirs) == sorted(dir_name(t, p, e, self.pp, self.ep) for (p, t, e) in self.files)

    def dense(self, p, t, key):
        """A dense / attention / norm / router tensor of TP rank t: every EP file of (p, t) holds the same copy."""
        copies = [sd.get_t(key) for (pp, tt, _), sd in self.files.items() if pp == p and tt == t]
        assert copies and all(torch.equal(copies[0], c) for c in copies[1:]), key
        return copies[0]

    def replicated(self, p, key):
        """A tensor every TP rank holds whole (norms, router): all copies must agree."""
        copies = [self.dense(p, t, key) for t in range(self.tp)]
        assert all(torch.equal(copies[0], c) for c in copies[1:]), key
        return copies[0]

    def expert(self, p, e, et, key):
        """Expert-parallel rank e, expert-tensor rank et: the one file that holds that shard."""
        (sd,) = [sd for (pp, t, ee), sd in self.files.items() if pp == p and ee == e and self.etp_of[(t, ee)] == et]
        return sd.get_t(key)

    def check_all_read(self):
        for where, sd in self.files.items():
            unread = sorted(k for k in set(sd) - sd.used if not k.endswith("_extra_state"))
            assert not unread, f"{where}: tensors the forward pass never read: {unread}"


def _stage_counts(a, num_layers):
    pp = a.pipeline_model_parallel_size
    counts = [None] * pp
    first, last = getattr(a, "decoder_first_pipeline_num_layers", None), getattr(a, "decoder_last_pipeline_num_layers", None)
    if pp > 1 and first is not None:
        counts[0] = first
    if pp > 1 and last is not None:
        counts[-1] = last
    rest = num_layers - sum(c for c in counts if c is not None)
    free = counts.count(None)
    return [c if c is not None else rest // free for c in counts]


def megatron_logits(ck: MegatronCheckpoint, tokens) -> torch.Tensor:
    a = ck.args
    te = a.transformer_impl == "transformer_engine"
    eps = getattr(a, "norm_epsilon", 1e-5)
    assert a.normalization == "RMSNorm" and a.swiglu and not a.add_bias_linear
    assert a.position_embedding_type == "rope" and not a.rotary_interleaved and a.rotary_percent == 1.0
    freq = a.moe_layer_freq
    pattern = [1 if i % freq == 0 else 0 for i in range(a.num_layers)] if isinstance(freq, int) else list(freq)
    assert len(pattern) == a.num_layers

    # VocabParallelEmbedding: TP rank r owns rows [r V/tp, (r+1) V/tp); partial lookups summed
    x, lo = 0, 0
    for t in range(ck.tp):
        w = ck.dense(0, t, "embedding.word_embeddings.weight")
        mine = (tokens >= lo) & (tokens < lo + w.shape[0])
        x = x + w[torch.where(mine, tokens - lo, 0)] * mine[:, None]
        lo += w.shape[0]
    assert lo == a.padded_vocab_size

    g = 0  # global layer index
    for p, count in enumerate(_stage_counts(a, a.num_layers)):
        local = sorted({int(k.split(".")[2]) for k in ck.files[(p, 0, 0)] if k.startswith("decoder.layers.")})
        assert local == list(range(count)), (p, local, count)
        for j in range(count):
            pre = f"decoder.layers.{j}."
            x = x + (_mg_mla(ck, p, pre, x, eps, te) if getattr(a, "multi_latent_attention", False) else _mg_gqa(ck, p, pre, x, eps, te))
            if pattern[g]:
                x = x + _mg_moe(ck, p, pre, x, eps)
            else:
                x = x + _mg_dense_mlp(ck, p, pre, x, eps, te)
            g += 1
    assert g == a.num_layers

    last = ck.pp - 1
    logits = []
    for t in range(ck.tp):
        h = rms_norm(x, ck.dense(last, t, "decoder.final_layernorm.weight"), eps)
        logits.append(h @ ck.dense(last, t, "output_layer.weight").T)  # column-parallel, gathered
    out = torch.cat(logits, -1)
    assert out.shape[-1] == a.padded_vocab_size
    ck.check_all_read()
    return out


def _mg_gqa(ck, p, pre, x, eps, te):
    a = ck.args
    nq, ng, d = a.num_attention_heads, a.num_query_groups, a.kv_channels
    hpg, ng_r, n = nq // ng, ng // ck.tp, len(x)
    cos, sin = rope_tables(n, d, float(a.rotary_base))
    cos, sin = cos[:, None], sin[:, None]
    s = pre + "self_attention."
    out = 0
    for t in range(ck.tp):
        ln = ck.dense(p, t, s + "linear_qkv.layer_norm_weight" if te else pre + "input_layernorm.weight")
        qkv = rms_norm(x, ln, eps) @ ck.dense(p, t, s + "linear_qkv.weight").T
        q, k, v = qkv.view(n, ng_r, (hpg + 2) * d).split([hpg * d, d, d], -1)  # whole groups [q heads; k; v]
        q, k, v = q.reshape(n, ng_r * hpg, d), k.reshape(n, ng_r, d), v.reshape(n, ng_r, d)
        q = rms_norm(q, ck.dense(p, t, s + "q_layernorm.weight"), eps)
        k = rms_norm(k, ck.dense(p, t, s + "k_layernorm.weight"), eps)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        ctx = causal_attention(q, k.repeat_interleave(hpg, 1), v.repeat_interleave(hpg, 1), d ** -0.5)
        out = out + ctx @ ck.dense(p, t, s + "linear_proj.weight").T  # row-parallel partial sums
    return out


def _mg_rope(x, cos, sin):
    """Megatron's rope with multi_latent_attention: x[..., 0::2] then x[..., 1::2], then rotate-half."""
    x = torch.cat([x[..., 0::2], x[..., 1::2]], -1)
    return x * cos + rotate_half(x) * sin


def _mg_mla(ck, p, pre, x, eps, te):
    a = ck.args
    nh, qk, rope, vd = a.num_attention_heads, a.qk_head_dim, a.qk_pos_emb_head_dim, a.v_head_dim
    assert a.rotary_scaling_factor == 1.0  # yarn with factor 1: plain rope, mscale 1
    n, nh_r = len(x), nh // ck.tp
    s = pre + "self_attention."
    h = rms_norm(x, ck.replicated(p, pre + "input_layernorm.weight"), eps)
    if a.q_lora_rank is not None:
        # column-parallel down projection, output gathered over TP, then q_layernorm on the whole
        qc = torch.cat([h @ ck.dense(p, t, s + "linear_q_down_proj.weight").T for t in range(ck.tp)], -1)
        assert qc.shape[-1] == a.q_lora_rank
        qc = rms_norm(qc, ck.replicated(p, s + ("linear_q_up_proj.layer_norm_weight" if te else "q_layernorm.weight")), eps)
    kvc = torch.cat([h @ ck.dense(p, t, s + "linear_kv_down_proj.weight").T for t in range(ck.tp)], -1)
    c_kv, k_pe = kvc.split([a.kv_lora_rank, rope], -1)
    c_kv = rms_norm(c_kv, ck.replicated(p, s + ("linear_kv_up_proj.layer_norm_weight" if te else "kv_layernorm.weight")), eps)
    cos, sin = rope_tables(n, rope, float(a.rotary_base))
    cos, sin = cos[:, None], sin[:, None]
    k_pe = _mg_rope(k_pe.view(n, 1, rope), cos, sin)
    out = 0
    for t in range(ck.tp):
        if a.q_lora_rank is not None:
            q = qc @ ck.dense(p, t, s + "linear_q_up_proj.weight").T
        else:
            q = h @ ck.dense(p, t, s + "linear_q_proj.weight").T
        q_nope, q_pe = q.view(n, nh_r, qk + rope).split([qk, rope], -1)
        k_nope, v = (c_kv @ ck.dense(p, t, s + "linear_kv_up_proj.weight").T).view(n, nh_r, qk + vd).split([qk, vd], -1)
        query = torch.cat([q_nope, _mg_rope(q_pe, cos, sin)], -1)
        key = torch.cat([k_nope, k_pe.expand(n, nh_r, rope)], -1)
        ctx = causal_attention(query, key, v, 1.0 / math.sqrt(qk + rope))
        out = out + ctx @ ck.dense(p, t, s + "linear_proj.weight").T
    return out


def _swiglu(h, fc1, fc2):
    gate, up = (h @ fc1.T).chunk(2, -1)  # a rank's fc1 is [gate shard; up shard]
    return (F.silu(gate) * up) @ fc2.T


def _mg_dense_mlp(ck, p, pre, x, eps, te):
    out = 0
    for t in range(ck.tp):
        ln = ck.dense(p, t, pre + ("mlp.linear_fc1.layer_norm_weight" if te else "pre_mlp_layernorm.weight"))
        out = out + _swiglu(rms_norm(x, ln, eps), ck.dense(p, t, pre + "mlp.linear_fc1.weight"),
                            ck.dense(p, t, pre + "mlp.linear_fc2.weight"))
    return out


def _mg_route(a, logits, bias):
    """topk_softmax_with_capacity (r0.12, no capacity): dense [tokens, E] map of the routing weights."""
    k = a.moe_router_topk
    assert not getattr(a, "moe_router_group_topk", None), "group-limited routing is not exercised by the fixtures"
    if a.moe_router_score_function == "softmax":
        assert bias is None
        if a.moe_router_pre_softmax:
            probs, idx = logits.softmax(-1).topk(k, -1)
        else:
            top, idx = logits.topk(k, -1)
            probs = top.softmax(-1)
    else:
        scores = logits.sigmoid()
        if bias is not None:
            idx = (scores + bias).topk(k, -1)[1]
            top = scores.gather(1, idx)
        else:
            top, idx = scores.topk(k, -1)
        probs = top / (top.sum(-1, keepdim=True) + 1e-20) if k > 1 else top
    if a.moe_router_topk_scaling_factor:
        probs = probs * a.moe_router_topk_scaling_factor
    return torch.zeros_like(logits).scatter(1, idx, probs)


def _mg_moe(ck, p, pre, x, eps):
    a = ck.args
    E, EP, ETP = a.num_experts, ck.ep, ck.etp
    h = rms_norm(x, ck.replicated(p, pre + "pre_mlp_layernorm.weight"), eps)
    bias = ck.replicated(p, pre + "mlp.router.expert_bias") if a.moe_router_enable_expert_bias else None
    gates = _mg_route(a, h @ ck.replicated(p, pre + "mlp.router.weight").T, bias)
    per_rank = E // EP
    out = 0
    for e in range(E):
        rank, i = divmod(e, per_rank)  # local expert i of EP rank `rank` is global expert rank*E/EP + i
        if a.moe_grouped_gemm:
            k1, k2 = f"mlp.experts.linear_fc1.weight{i}", f"mlp.experts.linear_fc2.weight{i}"
        else:
            k1, k2 = f"mlp.experts.local_experts.{i}.linear_fc1.weight", f"mlp.experts.local_experts.{i}.linear_fc2.weight"
        y = sum(_swiglu(h, ck.expert(p, rank, t, pre + k1), ck.expert(p, rank, t, pre + k2)) for t in range(ETP))
        out = out + gates[:, e:e + 1] * y
    if a.moe_shared_expert_intermediate_size:
        for t in range(ck.tp):
            out = out + _swiglu(h, ck.dense(p, t, pre + "mlp.shared_experts.linear_fc1.weight"),
                                ck.dense(p, t, pre + "mlp.shared_experts.linear_fc2.weight"))
    return out


# ---------------------------------------------------------------------------- tests
def _tokens(seed=7):
    t = torch.randint(0, 64, (SEQ,), generator=torch.Generator().manual_seed(seed))
    t[0], t[-1] = 0, 63  # both vocab ends (first and last TP shard)
    return t


def _compare(r, corrupt=None):
    ck = MegatronCheckpoint(r["save"])
    if corrupt is not None:
        corrupt(ck)
    tokens = _tokens()
    ref = hf_logits(r["hf"], r["cfg"], tokens)
    got = megatron_logits(ck, tokens)[:, :ref.shape[-1]]
    scale = ref.abs().max().item()
    return (ref - got).abs().max().item() / scale, ref


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_the_hf_model(runs, name):
    r = runs[name]
    assert r["error"] is None, r["error"]
    rel, ref = _compare(r)
    assert ref.std() > 0 and torch.isfinite(ref).all()
    print(f"{name}: max |diff| = {rel:.2e} of max |logit| {ref.abs().max().item():.3f}")
    assert rel <= REL_TOL, f"{name}: max |diff| = {rel:.2e} of max |logit| (allowed {REL_TOL})"


# negative controls: what a wrong rule would have written, applied to a converted checkpoint in memory
def _swap(sd, k1, k2):
    sd[k1], sd[k2] = dict.__getitem__(sd, k2), dict.__getitem__(sd, k1)


def swap_two_experts(ck):
    """Local experts 0 and 1 of EP rank 0 exchanged in every layer (an off-by-one expert selection)."""
    for (p, t, e), sd in ck.files.items():
        if e != 0:
            continue
        for k in [k for k in sd if ".local_experts.0." in k or k.endswith("linear_fc1.weight0")
                  or k.endswith("linear_fc2.weight0")]:
            other = k.replace(".local_experts.0.", ".local_experts.1.")
            if other == k:
                other = k[:-1] + "1"
            _swap(sd, k, other)


def swap_gate_up(ck):
    """Every routed expert's fc1 stored [up; gate] instead of [gate; up]."""
    for sd in ck.files.values():
        for k in [k for k in sd if ".experts." in k and "linear_fc1.weight" in k]:
            w = dict.__getitem__(sd, k)
            sd[k] = torch.cat(w.chunk(2)[::-1])


def reorder_kv_down(ck):
    """linear_kv_down_proj rows [k_pe; c_kv] instead of [c_kv; k_pe] (then split by TP as usual)."""
    a = ck.args
    for p in range(ck.pp):
        keys = {k for (pp, _, _), sd in ck.files.items() if pp == p for k in sd if k.endswith("linear_kv_down_proj.weight")}
        for k in keys:
            full = torch.cat([ck.dense(p, t, k) for t in range(ck.tp)]).to(torch.bfloat16)
            full = torch.cat([full[a.kv_lora_rank:], full[:a.kv_lora_rank]])
            for (pp, t, _), sd in ck.files.items():
                if pp == p:
                    sd[k] = full.chunk(ck.tp)[t].clone()


NEGATIVE = {
    "q3_swap_two_experts": ("q3_tp2_ep2_etp1_local", swap_two_experts),
    "q3_swap_gate_up": ("q3_tp1_ep2_te_grouped", swap_gate_up),
    "ds_swap_two_experts": ("ds_legacy_tp4_ep2_te_grouped", swap_two_experts),
    "ds_swap_gate_up": ("ds_tp2_pp2_ep2_first1_local", swap_gate_up),
    "ds_reorder_kv_down": ("ds_tp2_pp2_ep2_first1_local", reorder_kv_down),
    "ds_noqlora_reorder_kv_down": ("ds4_noqlora_tp2_pp2_ep2_local", reorder_kv_down),
}


@pytest.mark.parametrize("name", list(NEGATIVE))
def test_negative_control_moves_the_logits(runs, name):
    base, corrupt = NEGATIVE[name]
    r = runs[base]
    assert r["error"] is None, r["error"]
    rel, _ = _compare(r, corrupt)
    print(f"{name}: max |diff| = {rel:.2e} of max |logit|")
    assert rel > NEG_MIN, f"{name}: the corruption went unnoticed (max |diff| = {rel:.2e} of max |logit|)"
