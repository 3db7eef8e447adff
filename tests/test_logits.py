"""Converted checkpoints compute the same function as the source model.

For small synthetic mindformers checkpoints (scripts/synth.py) the logits of a
short random token sequence are computed twice, in float32 from BF16-rounded
weights, and must agree:

(a) ``reference_logits``: a plain forward pass of the SOURCE model, written from
    mindformers semantics. It reads the safetensors file directly and interprets
    each stored row layout itself (fc1 ``interleaved`` / ``concat``, qkv
    ``grouped`` / ``contiguous``, legacy ``wq/wk/wv``, ``w1/w3`` names).
(b) ``megatron_logits``: a forward pass that reads ONLY the converted Megatron
    rank files (``torch.load`` of every TP/PP shard) and computes the model the
    way Megatron's tensor-parallel layers do: vocab-parallel embedding, per-rank
    column-parallel ``linear_qkv`` holding whole query groups as [q; k; v] per
    group, attention per rank, row-parallel ``linear_proj``/``linear_fc2`` partial
    sums, per-rank ``linear_fc1`` = [gate_r; up_r], layers stage after stage.

Neither side imports streamconv; the converter runs through its CLI (``python -m
streamconv convert ...``; several runs per interpreter via runpy, so torch is
imported once per batch). Shared code is only the arithmetic (norms, rope,
causal attention); every weight-layout decision is made separately on each side. Negative controls convert with a wrong
``--fc1-layout`` / ``--qkv-layout`` and require the logits to disagree, which
shows the comparison can fail.
"""

from __future__ import annotations

import glob
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from synth import ModelSpec, write_checkpoint  # noqa: E402

from helpers import run_cli_batches  # noqa: E402

EPS = 1e-5
ROPE_BASE = 10000.0
ATOL = 1e-4  # float32 logits of order 1; only summation order differs between (a) and (b)
RTOL = 1e-4
SEQ = 16

# ---------------------------------------------------------------------------- cases
# scale=0.2 makes activations O(1) (softmax far from uniform, MLP output comparable to
# the residual), so a layout mistake anywhere moves the logits by O(0.1..1).
CASES = {
    # Qwen3-like: GQA 8/2, head_dim 16 != hidden/heads, qk-layernorm, all linear biases,
    # SwiGLU stored interleaved (mindformers default), untied, 300 rows cut to 256 (true 250)
    "gqa_interleaved_bias_qkln": dict(
        spec=ModelSpec(layers=4, hidden=64, ffn=96, heads=8, groups=2, head_dim=16, vocab=300, bias=True,
                       qk_layernorm=True, fc1_layout="interleaved", scale=0.2, seed=11),
        tp=2, pp=2, true_vocab=250),
    # fc1 [gate; up], qkv (and its bias) [all Q; all K; all V], tied embeddings with PP>1, F16 source,
    # Qwen2-style qkv bias, true vocab 190 (not a multiple of 128): 200 rows padded to 256
    "concat_contiguous_tied": dict(
        spec=ModelSpec(layers=2, hidden=64, ffn=80, heads=8, groups=2, vocab=200, tied=True, dtype="F16",
                       qkv_bias=True, fc1_layout="concat", qkv_layout="contiguous", scale=0.2, seed=12),
        tp=2, pp=2, true_vocab=190),
    # LayerNorm (weight + bias) + GELU, non-gated MLP, biases, MHA, untied, vocab kept as is
    "layernorm_gelu": dict(
        spec=ModelSpec(layers=2, hidden=64, ffn=128, heads=4, groups=4, vocab=256, norm="LayerNorm",
                       swiglu=False, bias=True, scale=0.2, seed=13),
        tp=2, pp=2, true_vocab=None,
        extra=["--normalization", "LayerNorm", "--add-bias-linear"]),
    # legacy mindformers names (model.layers.N.attention.wq/wk/wv, feed_forward.w1/w2/w3,
    # model.norm_out, lm_head), qkv bias only, BF16 source, vocab kept as is
    "legacy_qkvbias": dict(
        spec=ModelSpec(layers=2, hidden=64, ffn=96, heads=8, groups=2, vocab=256, legacy=True, qkv_bias=True,
                       dtype="BF16", scale=0.2, seed=14),
        tp=2, pp=2, true_vocab=None),
    # TP1 PP1: tied embeddings (no output_layer.weight), MQA (1 group), 100 rows padded to 128
    "tp1pp1_tied_mqa": dict(
        spec=ModelSpec(layers=2, hidden=32, ffn=64, heads=4, groups=1, vocab=100, tied=True, scale=0.2, seed=15),
        tp=1, pp=1, true_vocab=100),
}
# negative controls: (source case, wrong layout flags)
WRONG = {
    "wrong_fc1_layout": ("gqa_interleaved_bias_qkln", ["--fc1-layout", "concat"]),
    "wrong_qkv_layout": ("concat_contiguous_tied", ["--qkv-layout", "grouped"]),
}


def _argv(case: dict, src: str, dst: str, layout_flags: list | None = None) -> list:
    s: ModelSpec = case["spec"]
    argv = ["--load-dir", src, "--save-dir", dst,
            "--target-tensor-parallel-size", str(case["tp"]), "--target-pipeline-parallel-size", str(case["pp"]),
            "--saver-transformer-impl", "local", "--quiet",
            "--num-attention-heads", str(s.heads), "--num-query-groups", str(s.groups)]
    if layout_flags is None:
        layout_flags = ["--fc1-layout", s.fc1_layout, "--qkv-layout", s.qkv_layout]
    argv += layout_flags + case.get("extra", [])
    if case["true_vocab"] is not None:
        argv += ["--true-vocab-size", str(case["true_vocab"])]
    return argv


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Write every source checkpoint and convert it with the CLI; name -> (src, out, error or None)."""
    root = tmp_path_factory.mktemp("logits")
    jobs = {}
    for name, case in CASES.items():
        src, out = str(root / name / "src"), str(root / name / "out")
        write_checkpoint(src, case["spec"])
        jobs[name] = (src, out, ["convert", *_argv(case, src, out)])
    for name, (base, flags) in WRONG.items():
        src, out = jobs[base][0], str(root / name / "out")
        jobs[name] = (src, out, ["convert", *_argv(CASES[base], src, out, flags)])
    result = {}
    for n, (code, text) in run_cli_batches({n: argv for n, (_, _, argv) in jobs.items()}).items():
        src, out, argv = jobs[n]
        result[n] = (src, out, None if code == 0 else f"streamconv {' '.join(argv)} exited {code}:\n{text}")
    return result


# ---------------------------------------------------------------------------- arithmetic shared by (a) and (b)
def rms_norm(x, w, eps=EPS):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def layer_norm(x, w, b, eps=EPS):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def rope(x, base=ROPE_BASE):
    """Non-interleaved rotary embedding (HF Llama rotate_half). x: [seq, heads, d]."""
    s, _, d = x.shape
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = torch.outer(torch.arange(s, dtype=torch.float32), inv_freq)
    emb = torch.cat([ang, ang], -1)[:, None, :]
    rotated = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * emb.cos() + rotated * emb.sin()


def causal_attention(q, k, v):
    """q, k, v: [seq, heads, d] (k/v already one per query head) -> [seq, heads * d]."""
    s, n, d = q.shape
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(s, n * d)


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(torch.float32)


# ---------------------------------------------------------------------------- (a) source model, mindformers semantics
def read_source(src_dir: str) -> dict:
    out = {}
    for path in sorted(glob.glob(os.path.join(src_dir, "*.safetensors"))):
        with safe_open(path, framework="pt") as f:
            for k in f.keys():
                out[k] = bf16(f.get_tensor(k))  # the converter's BF16 rounding of the stored value
    return out


def _split_qkv(w, s: ModelSpec):
    """Stored fused linear_qkv rows (or bias) -> per-head q [nq*d], k [ng*d], v [ng*d], head order."""
    nq, ng, d = s.heads, s.groups, s.d
    rest = w.shape[1:]
    if s.qkv_layout == "contiguous":  # [all Q; all K; all V]
        return w.split([nq * d, ng * d, ng * d])
    hpg = nq // ng  # grouped: per query group [q of its hpg heads; k; v]
    g = w.reshape(ng, hpg + 2, d, *rest)
    return (g[:, :hpg].reshape(nq * d, *rest), g[:, hpg].reshape(ng * d, *rest), g[:, hpg + 1].reshape(ng * d, *rest))


def _split_fc1(w, s: ModelSpec):
    """Stored gated linear_fc1 rows (or bias) -> (gate, up)."""
    ffn, rest = w.shape[0] // 2, w.shape[1:]
    if s.fc1_layout == "interleaved":  # gate_0, up_0, gate_1, up_1, ...
        pair = w.reshape(ffn, 2, *rest)
        return pair[:, 0], pair[:, 1]
    return w[:ffn], w[ffn:]  # [gate; up]


def source_layer(t: dict, i: int, s: ModelSpec) -> dict:
    """Layer i's weights under plain names: q/k/v in head order, gate/up or fc1, norms, biases."""
    L = {}
    if s.legacy:
        p = f"model.layers.{i}."
        g = lambda n: t.get(p + n)  # noqa: E731
        L.update(in_w=g("attention_norm.weight"), in_b=g("attention_norm.bias"),
                 q=g("attention.wq.weight"), k=g("attention.wk.weight"), v=g("attention.wv.weight"),
                 qb=g("attention.wq.bias"), kb=g("attention.wk.bias"), vb=g("attention.wv.bias"),
                 proj=g("attention.wo.weight"), proj_b=g("attention.wo.bias"),
                 mlp_w=g("ffn_norm.weight"), mlp_b=g("ffn_norm.bias"),
                 gate=g("feed_forward.w1.weight"), up=g("feed_forward.w3.weight"),
                 gate_b=g("feed_forward.w1.bias"), up_b=g("feed_forward.w3.bias"),
                 fc2=g("feed_forward.w2.weight"), fc2_b=g("feed_forward.w2.bias"))
        return L
    p = f"decoder.layers.{i}."
    g = lambda n: t.get(p + n)  # noqa: E731
    L.update(in_w=g("input_layernorm.weight"), in_b=g("input_layernorm.bias"),
             q_norm=g("self_attention.q_layernorm.weight"), k_norm=g("self_attention.k_layernorm.weight"),
             proj=g("self_attention.linear_proj.weight"), proj_b=g("self_attention.linear_proj.bias"),
             mlp_w=g("pre_mlp_layernorm.weight"), mlp_b=g("pre_mlp_layernorm.bias"),
             fc2=g("mlp.linear_fc2.weight"), fc2_b=g("mlp.linear_fc2.bias"))
    L["q"], L["k"], L["v"] = _split_qkv(g("self_attention.linear_qkv.weight"), s)
    qkv_b = g("self_attention.linear_qkv.bias")
    if qkv_b is not None:
        L["qb"], L["kb"], L["vb"] = _split_qkv(qkv_b, s)
    fc1, fc1_b = g("mlp.linear_fc1.weight"), g("mlp.linear_fc1.bias")
    if s.swiglu:
        L["gate"], L["up"] = _split_fc1(fc1, s)
        if fc1_b is not None:
            L["gate_b"], L["up_b"] = _split_fc1(fc1_b, s)
    else:
        L["fc1"], L["fc1_b"] = fc1, fc1_b
    return L


def _lin(x, w, b=None):
    y = x @ w.T
    return y if b is None else y + b


def reference_logits(src_dir: str, s: ModelSpec, tokens: torch.Tensor, true_vocab: int) -> torch.Tensor:
    t = read_source(src_dir)
    norm = (lambda x, w, b: rms_norm(x, w)) if s.norm == "RMSNorm" else layer_norm
    nq, ng, d, n = s.heads, s.groups, s.d, len(tokens)
    emb = t["model.tok_embeddings.embedding_weight" if s.legacy else "embedding.word_embeddings.weight"]
    x = emb[tokens]
    for i in range(s.layers):
        L = source_layer(t, i, s)
        h = norm(x, L["in_w"], L.get("in_b"))
        q = _lin(h, L["q"], L.get("qb")).view(n, nq, d)
        k = _lin(h, L["k"], L.get("kb")).view(n, ng, d)
        v = _lin(h, L["v"], L.get("vb")).view(n, ng, d)
        if L.get("q_norm") is not None:  # Qwen3: RMSNorm over the head dim, per head, before rope
            q, k = rms_norm(q, L["q_norm"]), rms_norm(k, L["k_norm"])
        q, k = rope(q), rope(k)
        rep = nq // ng  # query head j uses kv head j // rep
        ctx = causal_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))
        x = x + _lin(ctx, L["proj"], L.get("proj_b"))
        h = norm(x, L["mlp_w"], L.get("mlp_b"))
        if s.swiglu:
            a = F.silu(_lin(h, L["gate"], L.get("gate_b"))) * _lin(h, L["up"], L.get("up_b"))
        else:
            a = F.gelu(_lin(h, L["fc1"], L.get("fc1_b")))
        x = x + _lin(a, L["fc2"], L.get("fc2_b"))
    fin = "model.norm_out." if s.legacy else "decoder.final_layernorm."
    x = norm(x, t[fin + "weight"], t.get(fin + "bias"))
    out = emb if s.tied else t["lm_head.weight" if s.legacy else "output_layer.weight"]
    return x @ out[:true_vocab].T


# ---------------------------------------------------------------------------- (b) Megatron rank files, TP/PP semantics
class TrackedState(dict):
    """A rank's ``model`` dict that remembers which keys the forward pass read."""

    def __init__(self, *a):
        super().__init__(*a)
        self.used = set()

    def __getitem__(self, k):
        self.used.add(k)
        return super().__getitem__(k).float()

    def opt(self, k):
        return self[k] if k in self else None


def load_megatron(save_dir: str):
    """-> (args, shards[pp][tp]) from latest_checkpointed_iteration.txt and every rank file."""
    it = int(open(os.path.join(save_dir, "latest_checkpointed_iteration.txt")).read())
    it_dir = os.path.join(save_dir, f"iter_{it:07d}")
    first = sorted(os.listdir(it_dir))[0]
    args = torch.load(os.path.join(it_dir, first, "model_optim_rng.pt"), map_location="cpu", weights_only=False)["args"]
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    names = [[f"mp_rank_{r:02d}" + (f"_{p:03d}" if pp > 1 else "") for r in range(tp)] for p in range(pp)]
    assert sorted(os.listdir(it_dir)) == sorted(n for row in names for n in row)
    shards = []
    for row in names:
        stage = []
        for n in row:
            sd = torch.load(os.path.join(it_dir, n, "model_optim_rng.pt"), map_location="cpu", weights_only=False)
            for k, v in sd["model"].items():
                assert k.endswith("_extra_state") or v.dtype == torch.bfloat16, (n, k, v.dtype)
            stage.append(TrackedState((k, v) for k, v in sd["model"].items() if not k.endswith("_extra_state")))
        shards.append(stage)
    return args, shards


def _replicated(ranks, key):
    """A tensor every TP rank holds a full copy of (norms, row-parallel biases): copies must agree."""
    if key not in ranks[0]:
        assert all(key not in sd for sd in ranks), key
        return None
    vals = [sd[key] for sd in ranks]
    assert all(torch.equal(vals[0], v) for v in vals[1:]), f"TP copies of {key} differ"
    return vals[0]


def megatron_logits(args, shards, tokens: torch.Tensor) -> torch.Tensor:
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    nq = args.num_attention_heads
    ng = args.num_query_groups if args.group_query_attention else nq
    d, hpg = args.kv_channels, nq // ng
    ng_r = ng // tp
    n = len(tokens)
    base = float(getattr(args, "rotary_base", ROPE_BASE))
    eps = float(getattr(args, "norm_epsilon", EPS))  # Megatron's layernorm_epsilon (default 1e-5)
    assert args.position_embedding_type == "rope" and getattr(args, "rotary_percent", 1.0) == 1.0
    assert not getattr(args, "rotary_interleaved", False) and not getattr(args, "use_rope_scaling", False)

    def norm(x, sd, prefix):
        if args.normalization == "RMSNorm":
            return rms_norm(x, sd[prefix + ".weight"], eps)
        return layer_norm(x, sd[prefix + ".weight"], sd[prefix + ".bias"], eps)

    # VocabParallelEmbedding: rank r owns rows [r*V/tp, (r+1)*V/tp); partial lookups are summed
    x = 0
    lo = 0
    for sd in shards[0]:
        w = sd["embedding.word_embeddings.weight"]
        mine = (tokens >= lo) & (tokens < lo + w.shape[0])
        x = x + w[torch.where(mine, tokens - lo, 0)] * mine[:, None]
        lo += w.shape[0]
    assert lo == args.padded_vocab_size

    n_layers = 0
    for stage in shards:
        local = sorted({int(k.split(".")[2]) for k in stage[0] if k.startswith("decoder.layers.")})
        assert local == list(range(len(local))), local  # renumbered from 0 inside each stage
        for i in local:
            p = f"decoder.layers.{i}."
            # attention: column-parallel qkv (whole query groups), per-rank attention, row-parallel proj
            attn = 0
            for sd in stage:
                h = norm(x, sd, p + "input_layernorm")
                qkv = _lin(h, sd[p + "self_attention.linear_qkv.weight"], sd.opt(p + "self_attention.linear_qkv.bias"))
                q, k, v = qkv.view(n, ng_r, (hpg + 2) * d).split([hpg * d, d, d], -1)
                q, k, v = q.reshape(n, ng_r * hpg, d), k.reshape(n, ng_r, d), v.reshape(n, ng_r, d)
                if getattr(args, "qk_layernorm", False):
                    q, k = norm(q, sd, p + "self_attention.q_layernorm"), norm(k, sd, p + "self_attention.k_layernorm")
                q, k = rope(q, base), rope(k, base)
                ctx = causal_attention(q, k.repeat_interleave(hpg, 1), v.repeat_interleave(hpg, 1))
                attn = attn + ctx @ sd[p + "self_attention.linear_proj.weight"].T
            b = _replicated(stage, p + "self_attention.linear_proj.bias")
            x = x + (attn if b is None else attn + b)
            # MLP: column-parallel fc1 ([gate_r; up_r] when gated), row-parallel fc2
            mlp = 0
            for sd in stage:
                h = norm(x, sd, p + "pre_mlp_layernorm")
                a = _lin(h, sd[p + "mlp.linear_fc1.weight"], sd.opt(p + "mlp.linear_fc1.bias"))
                if args.swiglu:
                    gate, up = a.chunk(2, -1)
                    a = F.silu(gate) * up
                else:
                    a = F.gelu(a)
                mlp = mlp + a @ sd[p + "mlp.linear_fc2.weight"].T
            b = _replicated(stage, p + "mlp.linear_fc2.bias")
            x = x + (mlp if b is None else mlp + b)
            n_layers += 1
    assert n_layers == args.num_layers

    # final norm on the last stage, then the column-parallel output layer, gathered over TP
    logits = []
    for r, sd in enumerate(shards[-1]):
        h = norm(x, sd, "decoder.final_layernorm")
        if "output_layer.weight" in sd:
            w = sd["output_layer.weight"]
        else:  # tied embeddings, one stage: the output layer is the word embedding shard
            assert pp == 1 and not args.untie_embeddings_and_output_weights
            w = shards[0][r]["embedding.word_embeddings.weight"]
        logits.append(h @ w.T)
    out = torch.cat(logits, -1)
    assert out.shape[-1] == args.padded_vocab_size
    for stage in shards:
        for sd in stage:
            assert set(sd) == sd.used, f"tensors the forward pass never read: {sorted(set(sd) - sd.used)}"
    return out


# ---------------------------------------------------------------------------- tests
def _tokens(true_vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, true_vocab, (SEQ,), generator=g)
    t[0], t[-1] = 0, true_vocab - 1  # both vocab ends (first and last TP shard)
    return t


def _check_args(args, case: dict) -> None:
    """The args Megatron builds its model from describe the source model (fields the forward pass above
    does not need, such as ffn_hidden_size, would still break a real Megatron load)."""
    s: ModelSpec = case["spec"]
    tp = case["tp"]
    tv = case["true_vocab"]
    padded = s.vocab if tv is None else -(-tv // (128 * tp)) * 128 * tp
    want = dict(num_layers=s.layers, hidden_size=s.hidden, ffn_hidden_size=s.ffn, num_attention_heads=s.heads,
                num_query_groups=s.groups, kv_channels=s.d, group_query_attention=s.groups != s.heads,
                normalization=s.norm, swiglu=s.swiglu, add_bias_linear=s.bias, add_qkv_bias=s.bias or s.qkv_bias,
                qk_layernorm=s.qk_layernorm, untie_embeddings_and_output_weights=not s.tied,
                padded_vocab_size=padded, tensor_model_parallel_size=tp, pipeline_model_parallel_size=case["pp"],
                position_embedding_type="rope", bf16=True)
    got = {k: getattr(args, k, False if k == "qk_layernorm" else "<absent>") for k in want}
    assert got == want, {k: (got[k], want[k]) for k in want if got[k] != want[k]}


def _both(converted, case_name, run_name):
    src, out, err = converted[run_name]
    assert err is None, err
    case = CASES[case_name]
    s = case["spec"]
    tv = case["true_vocab"] or s.vocab
    tokens = _tokens(tv, s.seed)
    ref = reference_logits(src, s, tokens, tv)
    args, shards = load_megatron(out)
    if case_name == run_name:
        _check_args(args, case)
    got = megatron_logits(args, shards, tokens)[:, :tv]
    return ref, got


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_source(converted, name):
    ref, got = _both(converted, name, name)
    assert ref.abs().max() > 0.5  # the logits carry signal, not ~0
    diff = (ref - got).abs().max().item()
    assert torch.allclose(got, ref, atol=ATOL, rtol=RTOL), f"{name}: max |diff| {diff:.3e}"


@pytest.mark.parametrize("name", list(WRONG))
def test_wrong_layout_changes_logits(converted, name):
    """Negative control: the same source converted with the wrong layout flag must not match."""
    base = WRONG[name][0]
    ref, got = _both(converted, base, name)
    diff = (ref - got).abs().max().item()
    assert diff > 1000 * ATOL, f"{name}: wrong layout went unnoticed (max |diff| {diff:.3e})"
