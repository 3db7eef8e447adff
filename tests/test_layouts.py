"""Hand-computed layouts: every output tensor equals the expected rows of the source model.

The synthetic generator produces each weight's values in Megatron's logical row
order and stores them in mindformers' layout (interleaved fc1, contiguous qkv,
legacy split tensors). The expectations here are written from FORMAT.md's rules
directly on those logical values; they share no code with streamconv's mapping.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import synth
from streamconv import ConvertOptions, convert


def _bf16(values: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    if dtype == "F16":
        t = t.to(torch.float16)
    return t.to(torch.bfloat16)


def _logical(spec, name, shape):
    return synth.tensor_values(name, shape, spec.seed, spec.scale)


def _load(save, tp, pp, r, p):
    d = f"mp_rank_{r:02d}" if pp == 1 else f"mp_rank_{r:02d}_{p:03d}"
    return torch.load(os.path.join(save, "iter_0000001", d, "model_optim_rng.pt"), weights_only=False)["model"]


def _expected_rank_tensors(spec, tp, pp, r, p, padded_vocab):
    """Expected BF16 tensors of rank (r, p) per FORMAT.md §2, from logical values."""
    h, d, nq, ng, ffn = spec.hidden, spec.d, spec.heads, spec.groups, spec.ffn
    shapes = synth.weight_shapes(spec)
    per = spec.layers // pp
    exp = {}

    def val(name):
        if spec.legacy:
            return None
        return _logical(spec, name, shapes[name])

    def vocab_slice(name):
        v = val(name) if not spec.legacy else _legacy_val(spec, name)
        rows = v.shape[0]
        if padded_vocab > rows:
            v = np.concatenate([v, np.repeat(v[-1:], padded_vocab - rows, axis=0)])
        v = v[:padded_vocab]
        n = padded_vocab // tp
        return v[r * n:(r + 1) * n]

    if p == 0:
        exp["embedding.word_embeddings.weight"] = vocab_slice("embedding.word_embeddings.weight")
    for j in range(per):
        i = p * per + j
        src = f"decoder.layers.{i}."
        out = f"decoder.layers.{j}."
        if spec.legacy:
            q = _legacy(spec, i, "attention.wq.weight", (nq * d, h))
            k = _legacy(spec, i, "attention.wk.weight", (ng * d, h))
            v = _legacy(spec, i, "attention.wv.weight", (ng * d, h))
            hpg = nq // ng
            rows = []
            for g in range(r * ng // tp, (r + 1) * ng // tp):
                rows += [q[g * hpg * d:(g + 1) * hpg * d], k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
            exp[out + "self_attention.linear_qkv.weight"] = np.concatenate(rows)
            gate = _legacy(spec, i, "feed_forward.w1.weight", (ffn, h))
            up = _legacy(spec, i, "feed_forward.w3.weight", (ffn, h))
            c = ffn // tp
            exp[out + "mlp.linear_fc1.weight"] = np.concatenate([gate[r * c:(r + 1) * c], up[r * c:(r + 1) * c]])
            exp[out + "self_attention.linear_proj.weight"] = np.split(
                _legacy(spec, i, "attention.wo.weight", (h, nq * d)), tp, axis=1)[r]
            exp[out + "mlp.linear_fc2.weight"] = np.split(_legacy(spec, i, "feed_forward.w2.weight", (h, ffn)), tp, axis=1)[r]
            exp[out + "input_layernorm.weight"] = _legacy(spec, i, "attention_norm.weight", (h,))[:, 0]
            exp[out + "pre_mlp_layernorm.weight"] = _legacy(spec, i, "ffn_norm.weight", (h,))[:, 0]
            continue
        # Megatron's qkv layout (what synth calls logical) split in whole query groups
        qkv = val(src + "self_attention.linear_qkv.weight")
        exp[out + "self_attention.linear_qkv.weight"] = np.split(qkv, tp)[r]
        if spec.bias or spec.qkv_bias:
            exp[out + "self_attention.linear_qkv.bias"] = np.split(val(src + "self_attention.linear_qkv.bias")[:, 0], tp)[r]
        fc1 = val(src + "mlp.linear_fc1.weight")
        if spec.swiglu:
            c = ffn // tp
            exp[out + "mlp.linear_fc1.weight"] = np.concatenate([fc1[r * c:(r + 1) * c], fc1[ffn + r * c:ffn + (r + 1) * c]])
        else:
            exp[out + "mlp.linear_fc1.weight"] = np.split(fc1, tp)[r]
        exp[out + "self_attention.linear_proj.weight"] = np.split(val(src + "self_attention.linear_proj.weight"), tp, axis=1)[r]
        exp[out + "mlp.linear_fc2.weight"] = np.split(val(src + "mlp.linear_fc2.weight"), tp, axis=1)[r]
        norms = ["input_layernorm.weight", "pre_mlp_layernorm.weight"]
        if spec.norm == "LayerNorm":
            norms += ["input_layernorm.bias", "pre_mlp_layernorm.bias"]
        for n in norms:
            exp[out + n] = val(src + n)[:, 0]
        if spec.qk_layernorm:
            for n in ("self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"):
                exp[out + n] = val(src + n)[:, 0]
        if spec.bias:
            b1 = val(src + "mlp.linear_fc1.bias")[:, 0]
            if spec.swiglu:
                c = ffn // tp
                exp[out + "mlp.linear_fc1.bias"] = np.concatenate([b1[r * c:(r + 1) * c], b1[ffn + r * c:ffn + (r + 1) * c]])
            else:
                exp[out + "mlp.linear_fc1.bias"] = np.split(b1, tp)[r]
            exp[out + "self_attention.linear_proj.bias"] = val(src + "self_attention.linear_proj.bias")[:, 0]
            exp[out + "mlp.linear_fc2.bias"] = val(src + "mlp.linear_fc2.bias")[:, 0]
    if p == pp - 1:
        fin = "decoder.final_layernorm.weight"
        exp[fin] = (val(fin) if not spec.legacy else _legacy_val(spec, fin))[:, 0]
        if spec.norm == "LayerNorm":
            exp["decoder.final_layernorm.bias"] = val("decoder.final_layernorm.bias")[:, 0]
        if not spec.tied:
            exp["output_layer.weight"] = vocab_slice("output_layer.weight")
        elif pp > 1:
            exp["output_layer.weight"] = vocab_slice("embedding.word_embeddings.weight")
    return exp


def _legacy(spec, i, suffix, shape):
    return synth.tensor_values(f"model.layers.{i}.{suffix}", shape, spec.seed, spec.scale)


def _legacy_val(spec, mcore_name):
    h = spec.hidden
    name = {"embedding.word_embeddings.weight": "model.tok_embeddings.embedding_weight",
            "output_layer.weight": "lm_head.weight",
            "decoder.final_layernorm.weight": "model.norm_out.weight"}[mcore_name]
    shape = (spec.vocab, h) if "norm" not in name else (h,)
    return synth.tensor_values(name, shape, spec.seed, spec.scale)


CASES = {
    # name: (spec kwargs, tp, pp, extra options)
    "interleaved_fc1_gqa_tp2_pp2": (dict(layers=4, hidden=64, ffn=96, heads=8, groups=4, vocab=200), 2, 2, {}),
    "concat_fc1_tp4": (dict(layers=2, hidden=64, ffn=128, heads=4, groups=4, vocab=256, fc1_layout="concat"), 4, 1,
                       dict(fc1_layout="concat")),
    "contiguous_qkv_tp2": (dict(layers=2, hidden=64, ffn=64, heads=8, groups=2, vocab=130, qkv_layout="contiguous"), 2, 1,
                           dict(qkv_layout="contiguous", true_vocab_size=130)),
    "bias_qkln_tied_pp2_bf16": (dict(layers=2, hidden=32, ffn=48, heads=4, groups=2, vocab=128, bias=True, tied=True,
                                     qk_layernorm=True, head_dim=16, dtype="BF16"), 2, 2, {}),
    "layernorm_gelu_f16_tp2": (dict(layers=2, hidden=32, ffn=64, heads=4, groups=4, vocab=64, norm="LayerNorm",
                                    swiglu=False, bias=True, dtype="F16"), 2, 1, dict(true_vocab_size=60)),
    "legacy_names_tp2_pp2": (dict(layers=2, hidden=32, ffn=48, heads=4, groups=2, vocab=96, legacy=True), 2, 2,
                             dict(true_vocab_size=300)),
    "vocab_trim_tp1": (dict(layers=1, hidden=32, ffn=32, heads=2, groups=2, vocab=300), 1, 1, dict(true_vocab_size=100)),
    "misaligned_tp1": (dict(layers=1, hidden=32, ffn=40, heads=2, groups=1, vocab=50, misalign=True, optimizer=True), 1, 1, {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_layout(case, tmp_path):
    kw, tp, pp, extra = CASES[case]
    spec = synth.ModelSpec(**kw)
    src = tmp_path / "src"
    synth.write_checkpoint(str(src), spec)
    save = tmp_path / "out"
    o = ConvertOptions(load_dir=str(src), save_dir=str(save), target_tensor_parallel_size=tp,
                       target_pipeline_parallel_size=pp, num_attention_heads=spec.heads,
                       saver_transformer_impl="local", **extra)
    summary = convert(o)
    tv = extra.get("true_vocab_size")
    if tv is not None:
        m = 128 * tp
        padded = -(-tv // m) * m
    else:
        padded = spec.vocab
    for p in range(pp):
        for r in range(tp):
            model = _load(str(save), tp, pp, r, p)
            exp = _expected_rank_tensors(spec, tp, pp, r, p, padded)
            got = {k: v for k, v in model.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
            assert set(got) == set(exp), (r, p, sorted(set(got) ^ set(exp)))
            for k, v in exp.items():
                want = _bf16(v, spec.dtype)
                assert tuple(got[k].shape) == tuple(want.shape), (k, got[k].shape, want.shape)
                assert torch.equal(got[k].view(torch.int16), want.view(torch.int16)), (case, r, p, k)
    assert summary["files_written"]


def test_misaligned_source_through_staging_copy(tmp_path):
    """Misaligned F32 data (MindSpore packs without padding) is read into the aligned staging block: same bytes."""
    kw, tp, pp, extra = CASES["misaligned_tp1"]
    spec = synth.ModelSpec(**kw)
    src = tmp_path / "src"
    paths = synth.write_checkpoint(str(src), spec)
    from streamconv.sources.header import read_header

    infos = [t for t in read_header(paths[0]).tensors.values() if t.dtype == "F32"]
    assert any(t.start % 4 for t in infos), "the fixture must really be misaligned"
    convert(ConvertOptions(load_dir=str(src), save_dir=str(tmp_path / "out"), num_attention_heads=spec.heads,
                           saver_transformer_impl="local"))
    model = _load(str(tmp_path / "out"), 1, 1, 0, 0)
    for k, v in _expected_rank_tensors(spec, 1, 1, 0, 0, spec.vocab).items():
        assert torch.equal(model[k].view(torch.int16), _bf16(v, spec.dtype).view(torch.int16)), k
