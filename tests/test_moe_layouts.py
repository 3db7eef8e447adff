"""MoE and MLA layouts, bit for bit, from the Hugging Face tensors by Megatron r0.12's rules written by hand.

The mindformers fixtures (Qwen3-MoE, DeepSeek-V3: written by mindformers 2.0
itself, also as CheckpointMonitor output with optimizer states and runtime
buffers, and as convert_weight.py output with its flat param_name_map.json) are
converted through the CLI at several TP / PP / EP / ETP, local and
transformer_engine specs. Every rank file is read with ``torch.load(weights_only=True)``
and every tensor compared with the expectation computed here from the HF model
the fixture was made from (FORMAT.md §2, §6):

* expert e on EP rank r is global expert r*E/EP + i (local i); its fc1 is
  [gate_e; up_e], ETP rank t holding [gate rows chunk t; up rows chunk t], fc2 columns chunk t;
* router weight whole on every rank; ``expert_bias`` FP32, exactly ``e_score_correction_bias``;
* shared experts and dense fc1 [gate chunk; up chunk] by TP, fc2 columns by TP;
* MLA q_down / q_up / kv_down / kv_up (and q_proj) rows chunked by TP, linear_proj columns;
* Qwen3 linear_qkv per query group [q heads; k; v], whole groups per TP rank; norms whole;
* BF16 = ``torch.tensor(fp32).to(torch.bfloat16)``; vocab padded by repeating the last row.

Key names and order per file follow Megatron's module registration order; where a
real Megatron r0.12 dump of the same layout exists (tests/data/megatron_truth/,
scripts/megatron_truth.py) the file list, the key order, shapes and dtypes must equal it.
The ``args`` fields are checked against values read by hand from the fixtures' configs.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re

import pytest
import torch

from moe_fixtures import (INPUTS, TRUTH, convert_all, fixture_dir, hf_config, hf_tensors,
                          legacy_writers, load_rank_file, make_variant, rank_dirs, rank_path)

NONE, TE_LINEAR, TE_NORM = "None", "TE linear/attention extra state", "TE norm extra state"
TE_NORM_BYTES = pickle.dumps({}, protocol=4)  # what a TE ops-based norm returns from get_extra_state()

# ---------------------------------------------------------------------------- the models, by hand from hf/config.json
#   qwen3_moe: 2 layers, hidden 32, 4 heads / 2 KV groups, head dim 8, 4 experts top-2 of ffn 16, vocab 64, untied
#   deepseek_v3: 3 layers (layer 0 dense ffn 40), hidden 32, 4 heads, q_lora 24, kv_lora 16, nope 8, rope 4, v 6,
#                4 experts top-2 of ffn 12 + 1 shared expert of 12, sigmoid routing, expert bias, scaling 2.5
MODELS = {
    "qwen3_moe": dict(H=32, heads=4, groups=2, d=8, E=4, F=16, S=None, dense=(), layers=2, V=64),
    "deepseek_v3": dict(H=32, heads=4, q_lora=24, kv_lora=16, nope=8, rope=4, v=6, E=4, F=12, S=12, ffn=40,
                        dense=(0,), layers=3, V=64),
}

# ---------------------------------------------------------------------------- cases
# input: a fixture input name (moe_fixtures.INPUTS) or a variant (moe_fixtures.make_variant);
# dirs: the rank directories Megatron writes for this layout (FORMAT.md §6), listed by hand;
# truth: the real-Megatron dump of the same layout, when one exists.
CASES = {
    "q3_mf_tp1_local": dict(model="qwen3_moe", input="mf", tp=1, pp=1, ep=1, impl="local",
                            dirs=["mp_rank_00"]),
    "q3_mf_tp2_ep2_local": dict(model="qwen3_moe", input="mf", tp=2, pp=1, ep=2, impl="local", vocab=64,
                                dirs=["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"],
                                truth="qwen3_moe_tp2_ep2"),
    "q3_legacy_tp2_ep2_etp1_local": dict(model="qwen3_moe", input="legacy", tp=2, pp=1, ep=2, etp=1, impl="local",
                                         vocab=64, dirs=["mp_rank_00_000", "mp_rank_01_001"],
                                         truth="qwen3_moe_tp2_ep2_etp1"),
    "q3_mf_tp1_ep4_local": dict(model="qwen3_moe", input="mf", tp=1, pp=1, ep=4, impl="local", vocab=64,
                                dirs=["mp_rank_00_000", "mp_rank_00_001", "mp_rank_00_002", "mp_rank_00_003"],
                                truth="qwen3_moe_tp1_ep4"),
    "q3_dense0_tp1_ep2_local": dict(model="qwen3_moe", input="q3_dense0", tp=1, pp=1, ep=2, impl="local", vocab=64,
                                    dirs=["mp_rank_00_000", "mp_rank_00_001"], truth="qwen3_moe_list_freq_tp1_ep2"),
    # FORMAT.md §6's example: TP2 EP4 ETP1 PP2
    "q3_legacy_tp2_pp2_ep4_etp1_te": dict(
        model="qwen3_moe", input="legacy", tp=2, pp=2, ep=4, etp=1, impl="transformer_engine",
        dirs=["mp_rank_00_000_000", "mp_rank_00_000_002", "mp_rank_01_000_001", "mp_rank_01_000_003",
              "mp_rank_00_001_000", "mp_rank_00_001_002", "mp_rank_01_001_001", "mp_rank_01_001_003"]),
    "q3_mf_tp2_ep2_te_grouped": dict(model="qwen3_moe", input="mf", tp=2, pp=1, ep=2, impl="transformer_engine",
                                     grouped=True, vocab=64,
                                     dirs=["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]),
    "q3_mf_tp2_etp2_te": dict(model="qwen3_moe", input="mf", tp=2, pp=1, ep=1, etp=2, impl="transformer_engine",
                              dirs=["mp_rank_00", "mp_rank_01"]),
    "ds_mf_tp1_local": dict(model="deepseek_v3", input="mf", tp=1, pp=1, ep=1, impl="local", dirs=["mp_rank_00"]),
    # the fixture's own 3 layers on 2 stages: the dense layer alone first (Megatron's uneven split)
    "ds_mf_tp2_pp2_ep2_first1_local": dict(
        model="deepseek_v3", input="mf", tp=2, pp=2, ep=2, first=1, impl="local", vocab=64,
        dirs=["mp_rank_00_000_000", "mp_rank_00_000_001", "mp_rank_01_000_000", "mp_rank_01_000_001",
              "mp_rank_00_001_000", "mp_rank_00_001_001", "mp_rank_01_001_000", "mp_rank_01_001_001"]),
    "ds_legacy_tp1_pp2_ep2_first1_local": dict(
        model="deepseek_v3", input="legacy", tp=1, pp=2, ep=2, first=1, impl="local", vocab=64,
        dirs=["mp_rank_00_000_000", "mp_rank_00_000_001", "mp_rank_00_001_000", "mp_rank_00_001_001"],
        truth="deepseek_v3_3layers_tp1_pp2_ep2"),
    "ds_convert_out_tp2_ep4_etp1_te": dict(
        model="deepseek_v3", input="convert_out", tp=2, pp=1, ep=4, etp=1, impl="transformer_engine",
        dirs=["mp_rank_00_000", "mp_rank_00_002", "mp_rank_01_001", "mp_rank_01_003"]),
    "ds_legacy_tp4_ep2_te_grouped": dict(
        model="deepseek_v3", input="legacy", tp=4, pp=1, ep=2, impl="transformer_engine", grouped=True,
        dirs=[f"mp_rank_{t:02d}_{e:03d}" for t in range(4) for e in range(2)]),
    "ds_mf_tp2_pp2_last2_te": dict(
        model="deepseek_v3", input="mf", tp=2, pp=2, ep=1, last=2, impl="transformer_engine", vocab=64,
        dirs=["mp_rank_00_000", "mp_rank_01_000", "mp_rank_00_001", "mp_rank_01_001"]),
    # four layers (variant): the even TP2 PP2 EP2 split real Megatron was run at
    "ds4_tp2_pp2_ep2_local": dict(
        model="deepseek_v3", input="ds4", tp=2, pp=2, ep=2, impl="local", vocab=64,
        dirs=["mp_rank_00_000_000", "mp_rank_00_000_001", "mp_rank_01_000_000", "mp_rank_01_000_001",
              "mp_rank_00_001_000", "mp_rank_00_001_001", "mp_rank_01_001_000", "mp_rank_01_001_001"],
        truth="deepseek_v3_tp2_pp2_ep2"),
    "ds4_noqlora_tp2_pp2_ep2_local": dict(
        model="deepseek_v3", input="ds4_noqlora", tp=2, pp=2, ep=2, impl="local", vocab=64,
        dirs=["mp_rank_00_000_000", "mp_rank_00_000_001", "mp_rank_01_000_000", "mp_rank_01_000_001",
              "mp_rank_00_001_000", "mp_rank_00_001_001", "mp_rank_01_001_000", "mp_rank_01_001_001"],
        truth="deepseek_v3_noqlora_tp2_pp2_ep2"),
    "ds4_noqlora_tp2_ep2_te": dict(
        model="deepseek_v3", input="ds4_noqlora", tp=2, pp=1, ep=2, impl="transformer_engine",
        dirs=["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]),
    # one multi-token-prediction layer (variant): on the last stage with the embedding, after the final norm
    "ds4_mtp1_tp2_pp2_ep2_local": dict(
        model="deepseek_v3", input="ds4_mtp1", tp=2, pp=2, ep=2, impl="local", vocab=64,
        dirs=["mp_rank_00_000_000", "mp_rank_00_000_001", "mp_rank_01_000_000", "mp_rank_01_000_001",
              "mp_rank_00_001_000", "mp_rank_00_001_001", "mp_rank_01_001_000", "mp_rank_01_001_001"],
        truth="deepseek_v3_mtp1_tp2_pp2_ep2"),
    "ds4_mtp1_tp2_ep2_etp1_te_grouped": dict(
        model="deepseek_v3", input="ds4_mtp1", tp=2, pp=1, ep=2, etp=1, impl="transformer_engine", grouped=True,
        dirs=["mp_rank_00_000", "mp_rank_01_001"]),
    "ds_mf_pp3_ep2_local": dict(
        model="deepseek_v3", input="mf", tp=1, pp=3, ep=2, impl="local",
        dirs=[f"mp_rank_00_{p:03d}_{e:03d}" for p in range(3) for e in range(2)]),
}
VARIANTS = ("ds4", "ds4_noqlora", "ds4_mtp1", "q3_dense0")


def _argv(case: dict, load: str, config: str, save: str) -> list:
    argv = ["--load-dir", load, "--save-dir", save, "--model-config", config, "--quiet",
            "--target-tensor-parallel-size", str(case["tp"]), "--target-pipeline-parallel-size", str(case["pp"]),
            "--target-expert-parallel-size", str(case["ep"]), "--saver-transformer-impl", case["impl"]]
    if "etp" in case:
        argv += ["--target-expert-tensor-parallel-size", str(case["etp"])]
    if case.get("grouped"):
        argv.append("--moe-grouped-gemm")
    if "first" in case:
        argv += ["--decoder-first-pipeline-num-layers", str(case["first"])]
    if "last" in case:
        argv += ["--decoder-last-pipeline-num-layers", str(case["last"])]
    if "vocab" in case:
        argv += ["--true-vocab-size", str(case["vocab"])]
    return argv


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Convert every case; name -> dict(save, hf, hf_config, model, error)."""
    root = tmp_path_factory.mktemp("moe_layouts")
    variants = {v: make_variant(v, str(root / "variants")) for v in VARIANTS}
    jobs, out = {}, {}
    for name, case in CASES.items():
        if case["input"] in variants:
            v = variants[case["input"]]
            load, config, hf, cfg = v["load"], v["config"], v["hf"], v["hf_config"]
        else:
            m = case["model"]
            load = os.path.join(fixture_dir(m), INPUTS[m][case["input"]])
            config = os.path.join(fixture_dir(m), "hf", "config.json")
            hf, cfg = None, hf_config(m)
        save = str(root / name)
        jobs[name] = _argv(case, load, config, save)
        out[name] = dict(save=save, hf=hf, hf_config=cfg)
    errors = convert_all(jobs)
    cache = {}
    for name, r in out.items():
        r["error"] = errors[name]
        if r["hf"] is None:
            m = CASES[name]["model"]
            r["hf"] = cache[m] = cache.get(m) or hf_tensors(m)
    return out


# ---------------------------------------------------------------------------- the expectation, by hand
def _rows(t, n, i):
    """Chunk i of n along dim 0 (column-parallel)."""
    c = t.shape[0] // n
    assert c * n == t.shape[0]
    return t[i * c:(i + 1) * c]


def _cols(t, n, i):
    """Chunk i of n along dim 1 (row-parallel)."""
    c = t.shape[1] // n
    assert c * n == t.shape[1]
    return t[:, i * c:(i + 1) * c]


def _gated(gate, up, n, i):
    """Megatron's gated fc1 on rank i of n: [gate rows chunk i; up rows chunk i]."""
    return torch.cat([_rows(gate, n, i), _rows(up, n, i)])


def _vocab(table, padded, n, i):
    if padded > table.shape[0]:
        table = torch.cat([table, table[-1:].expand(padded - table.shape[0], -1)])
    return _rows(table[:padded], n, i)


def stage_layers(case: dict, num_layers: int) -> list:
    """Megatron's pipeline split: --decoder-first/last-pipeline-num-layers set apart, the rest even."""
    pp = case["pp"]
    counts = [None] * pp
    if pp > 1 and "first" in case:
        counts[0] = case["first"]
    if pp > 1 and "last" in case:
        counts[-1] = case["last"]
    rest = num_layers - sum(c for c in counts if c)
    free = counts.count(None)
    counts = [c if c is not None else rest // free for c in counts]
    starts = [sum(counts[:p]) for p in range(pp)]
    return [list(range(s, s + c)) for s, c in zip(starts, counts)]


def expected_file(case: dict, m: dict, hf: dict, cfg: dict, tp: int, pp: int, ep: int, etp: int) -> dict:
    """key -> expected value (a torch tensor, or NONE / TE_LINEAR / TE_NORM for _extra_state), in Megatron's order."""
    te = case["impl"] == "transformer_engine"
    TP, EP = case["tp"], case["ep"]
    ETP = case.get("etp", TP)
    grouped = case.get("grouped", False)
    E = m["E"]
    mla = "q_lora" in m
    n_layers = cfg["num_hidden_layers"]
    dense = set(cfg.get("mlp_only_layers", [])) | set(range(cfg.get("first_k_dense_replace", 0)))
    V = hf["model.embed_tokens.weight"].shape[0]
    padded = V if "vocab" not in case else math.ceil(case["vocab"] / (128 * TP)) * 128 * TP
    x: dict = {}
    lin_extra = TE_LINEAR if te else NONE

    def linear(key, w):
        x[key + ".weight"] = w
        x[key + "._extra_state"] = lin_extra

    def te_norm(key, w):
        x[key + ".weight"] = w
        x[key + "._extra_state"] = TE_NORM

    def plain(key, w):
        x[key + ".weight"] = w

    def layer(i, h, o):
        """Layer i of the HF model (keys under ``h``) as Megatron's layer keys under ``o``."""
        a = h + "self_attn."
        if mla:
            # TransformerLayer(input_layernorm, self_attention=MLASelfAttention(core_attention, linear_proj,
            # linear_q_proj | linear_q_down_proj + linear_q_up_proj, linear_kv_down_proj, linear_kv_up_proj,
            # q_layernorm, kv_layernorm)); TE fuses q/kv layernorm into the up projections
            if te:
                te_norm(o + "input_layernorm", hf[h + "input_layernorm.weight"])
                x[o + "self_attention.core_attention._extra_state"] = TE_LINEAR
            else:
                x[o + "input_layernorm.weight"] = hf[h + "input_layernorm.weight"]
            linear(o + "self_attention.linear_proj", _cols(hf[a + "o_proj.weight"], TP, tp))
            q_lora = a + "q_a_proj.weight" in hf
            if q_lora:
                linear(o + "self_attention.linear_q_down_proj", _rows(hf[a + "q_a_proj.weight"], TP, tp))
                if te:
                    x[o + "self_attention.linear_q_up_proj.layer_norm_weight"] = hf[a + "q_a_layernorm.weight"]
                linear(o + "self_attention.linear_q_up_proj", _rows(hf[a + "q_b_proj.weight"], TP, tp))
            else:
                linear(o + "self_attention.linear_q_proj", _rows(hf[a + "q_proj.weight"], TP, tp))
            linear(o + "self_attention.linear_kv_down_proj", _rows(hf[a + "kv_a_proj_with_mqa.weight"], TP, tp))
            if te:
                x[o + "self_attention.linear_kv_up_proj.layer_norm_weight"] = hf[a + "kv_a_layernorm.weight"]
            linear(o + "self_attention.linear_kv_up_proj", _rows(hf[a + "kv_b_proj.weight"], TP, tp))
            if not te:
                if q_lora:
                    x[o + "self_attention.q_layernorm.weight"] = hf[a + "q_a_layernorm.weight"]
                x[o + "self_attention.kv_layernorm.weight"] = hf[a + "kv_a_layernorm.weight"]
        else:
            # SelfAttention(core_attention, linear_proj, linear_qkv, q_layernorm, k_layernorm)
            nq, ng, d = m["heads"], m["groups"], m["d"]
            hpg = nq // ng
            q, k, v = hf[a + "q_proj.weight"], hf[a + "k_proj.weight"], hf[a + "v_proj.weight"]
            qkv = []
            for g in range(tp * ng // TP, (tp + 1) * ng // TP):  # whole query groups, each [q heads; k; v]
                qkv += [q[g * hpg * d:(g + 1) * hpg * d], k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
            if te:
                x[o + "self_attention.core_attention._extra_state"] = TE_LINEAR
            else:
                x[o + "input_layernorm.weight"] = hf[h + "input_layernorm.weight"]
            linear(o + "self_attention.linear_proj", _cols(hf[a + "o_proj.weight"], TP, tp))
            if te:
                x[o + "self_attention.linear_qkv.layer_norm_weight"] = hf[h + "input_layernorm.weight"]
            linear(o + "self_attention.linear_qkv", torch.cat(qkv))
            for mine, theirs in (("q_layernorm", "q_norm"), ("k_layernorm", "k_norm")):
                if te:
                    te_norm(o + f"self_attention.{mine}", hf[a + f"{theirs}.weight"])
                else:
                    x[o + f"self_attention.{mine}.weight"] = hf[a + f"{theirs}.weight"]
        mlp = h + "mlp."
        if i in dense:
            # MLP(linear_fc1 [gate; up] by TP, linear_fc2 columns); TE fuses pre_mlp_layernorm into fc1
            if te:
                x[o + "mlp.linear_fc1.layer_norm_weight"] = hf[h + "post_attention_layernorm.weight"]
            else:
                x[o + "pre_mlp_layernorm.weight"] = hf[h + "post_attention_layernorm.weight"]
            linear(o + "mlp.linear_fc1", _gated(hf[mlp + "gate_proj.weight"], hf[mlp + "up_proj.weight"], TP, tp))
            linear(o + "mlp.linear_fc2", _cols(hf[mlp + "down_proj.weight"], TP, tp))
            return
        # MoE layer: pre_mlp_layernorm (a TENorm of its own under TE), MoELayer(router, experts, shared_experts)
        if te:
            te_norm(o + "pre_mlp_layernorm", hf[h + "post_attention_layernorm.weight"])
        else:
            x[o + "pre_mlp_layernorm.weight"] = hf[h + "post_attention_layernorm.weight"]
        x[o + "mlp.router.weight"] = hf[mlp + "gate.weight"]
        if mlp + "gate.e_score_correction_bias" in hf:
            x[o + "mlp.router.expert_bias"] = ("fp32", hf[mlp + "gate.e_score_correction_bias"])
        local = E // EP
        fc1, fc2 = [], []
        for li in range(local):
            e = ep * local + li  # local expert li of EP rank ep
            ex = f"{mlp}experts.{e}."
            fc1.append(_gated(hf[ex + "gate_proj.weight"], hf[ex + "up_proj.weight"], ETP, etp))
            fc2.append(_cols(hf[ex + "down_proj.weight"], ETP, etp))
        if grouped:  # TEGroupedMLP: one grouped linear per projection, weight<i> per local expert
            for li in range(local):
                x[o + f"mlp.experts.linear_fc1.weight{li}"] = fc1[li]
            x[o + "mlp.experts.linear_fc1._extra_state"] = TE_LINEAR
            for li in range(local):
                x[o + f"mlp.experts.linear_fc2.weight{li}"] = fc2[li]
            x[o + "mlp.experts.linear_fc2._extra_state"] = TE_LINEAR
        else:  # SequentialMLP
            for li in range(local):
                linear(o + f"mlp.experts.local_experts.{li}.linear_fc1", fc1[li])
                linear(o + f"mlp.experts.local_experts.{li}.linear_fc2", fc2[li])
        if m["S"]:
            sh = mlp + "shared_experts."
            linear(o + "mlp.shared_experts.linear_fc1",
                   _gated(hf[sh + "gate_proj.weight"], hf[sh + "up_proj.weight"], TP, tp))
            linear(o + "mlp.shared_experts.linear_fc2", _cols(hf[sh + "down_proj.weight"], TP, tp))

    last = pp == case["pp"] - 1
    n_mtp = cfg.get("num_nextn_predict_layers", 0)
    if pp == 0 or (last and n_mtp):  # Megatron builds the embedding where the MTP layers are too
        x["embedding.word_embeddings.weight"] = _vocab(hf["model.embed_tokens.weight"], padded, TP, tp)
    for j, i in enumerate(stage_layers(case, n_layers)[pp]):
        layer(i, f"model.layers.{i}.", f"decoder.layers.{j}.")
    if last:
        x["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
        if te:  # the local MoE block spec's final norm has no extra state (FORMAT.md §6)
            x["decoder.final_layernorm._extra_state"] = TE_NORM
        for k in range(n_mtp):
            # MultiTokenPredictionLayer(enorm, hnorm, eh_proj column-parallel [H/TP, 2H], transformer_layer,
            # final_layernorm); HF keeps it as layer L + k with shared_head.norm
            h, o = f"model.layers.{n_layers + k}.", f"mtp.layers.{k}."
            (te_norm if te else plain)(o + "enorm", hf[h + "enorm.weight"])
            (te_norm if te else plain)(o + "hnorm", hf[h + "hnorm.weight"])
            linear(o + "eh_proj", _rows(hf[h + "eh_proj.weight"], TP, tp))
            layer(n_layers + k, h, o + "transformer_layer.")
            (te_norm if te else plain)(o + "final_layernorm", hf[h + "shared_head.norm.weight"])
        x["output_layer.weight"] = _vocab(hf["lm_head.weight"], padded, TP, tp)
        x["output_layer._extra_state"] = NONE  # GPTModel's own ColumnParallelLinear under both specs
    return x


def _check_value(where, got, want):
    if want == NONE:
        assert got is None, (where, got)
    elif want == TE_LINEAR:
        assert isinstance(got, torch.Tensor) and got.dtype == torch.uint8 and got.numel() == 0, (where, got)
    elif want == TE_NORM:
        assert isinstance(got, torch.Tensor) and got.dtype == torch.uint8, (where, got)
        assert bytes(got.tolist()) == TE_NORM_BYTES, (where, got)
    elif isinstance(want, tuple):  # ("fp32", tensor): a buffer Megatron keeps in fp32, bit for bit
        assert got.dtype == torch.float32, (where, got.dtype)
        assert torch.equal(got, want[1]), (where, got, want[1])
    else:
        w = want.to(torch.bfloat16)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.bfloat16, (where, type(got), getattr(got, "dtype", None))
        assert tuple(got.shape) == tuple(w.shape), (where, tuple(got.shape), tuple(w.shape))
        assert torch.equal(got.view(torch.int16), w.view(torch.int16)), f"{where}: values differ"


def _coords(case: dict, d: str) -> tuple:
    """(tp, pp, ep, etp) of a rank directory: tp/pp/ep from Megatron's name, etp from the rank generators."""
    parts = [int(p) for p in d[len("mp_rank_"):].split("_")]
    tp = parts[0]
    pp = parts[1] if case["pp"] > 1 else 0
    ep = parts[-1] if case["ep"] > 1 else 0
    etp = legacy_writers(case["tp"], case["ep"], case.get("etp", case["tp"]))[(tp, ep)]
    return tp, pp, ep, etp


@pytest.mark.parametrize("name", list(CASES))
def test_every_tensor_matches_the_hf_model(runs, name):
    case, r = CASES[name], runs[name]
    assert r["error"] is None, r["error"]
    dirs = rank_dirs(r["save"])
    assert dirs == sorted(case["dirs"]), dirs
    m = MODELS[case["model"]]
    for d in dirs:
        tp, pp, ep, etp = _coords(case, d)
        sd = load_rank_file(rank_path(r["save"], d))
        want = expected_file(case, m, r["hf"], r["hf_config"], tp, pp, ep, etp)
        got = sd["model"]
        assert list(got) == list(want), (d, [k for k in got if k not in want], [k for k in want if k not in got])
        for k, w in want.items():
            _check_value(f"{name} {d} {k}", got[k], w)
        assert sd["checkpoint_version"] == 3.0 and sd["iteration"] == 1


# ---------------------------------------------------------------------------- against real Megatron's own files
def _truth(name: str):
    path = os.path.join(TRUTH, name + ".json")
    if not os.path.isfile(path):
        pytest.skip(f"no real-Megatron dump {path}")
    return json.load(open(path))


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if "truth" in c])
def test_key_order_shapes_and_files_equal_real_megatron(runs, name):
    case, r = CASES[name], runs[name]
    assert r["error"] is None, r["error"]
    t = _truth(case["truth"])
    argv = t["megatron_argv"]
    # the dump is of this layout
    for flag, value in (("--tensor-model-parallel-size", case["tp"]), ("--pipeline-model-parallel-size", case["pp"]),
                        ("--expert-model-parallel-size", case["ep"]), ("--transformer-impl", case["impl"])):
        assert f"{flag} {value}" in argv, (flag, value, argv)
    if "etp" in case:
        assert f"--expert-tensor-parallel-size {case['etp']}" in argv
    written = {}
    for rank in t["ranks"]:
        leg = rank["legacy"]
        if leg["writes"]:
            d = leg["file"].split("/")[1]
            c = rank["coords"]
            written[d] = leg
            assert _coords(case, d) == (c["tp"], c["pp"], c["ep"], c["etp"]), (d, c)
    assert sorted(written) == rank_dirs(r["save"])
    for d, leg in written.items():
        model = load_rank_file(rank_path(r["save"], d))["model"]
        after_forward = leg.get("dtype_after_forward", {})  # buffers Megatron casts back to fp32 when it runs
        want = []
        for key, shape, dtype, *_ in leg["state_dict"]:
            want.append((key, shape, after_forward.get(key, dtype)))
        got = [(k, list(v.shape), str(v.dtype).replace("torch.", "")) if v is not None else (k, None, "NoneType")
               for k, v in model.items()]
        assert got == want, (d, [g for g, w in zip(got, want) if g != w][:3], len(got), len(want))


# ---------------------------------------------------------------------------- args, by hand from the configs
def _expected_args(case: dict, cfg: dict) -> dict:
    TP, EP = case["tp"], case["ep"]
    common = dict(tensor_model_parallel_size=TP, pipeline_model_parallel_size=case["pp"],
                  expert_model_parallel_size=EP, expert_tensor_parallel_size=case.get("etp", TP),
                  num_layers=cfg["num_hidden_layers"], hidden_size=32, num_attention_heads=4, num_experts=4,
                  moe_router_topk=2, norm_epsilon=1e-6, rotary_base=10000, max_position_embeddings=64,
                  untie_embeddings_and_output_weights=True, swiglu=True, normalization="RMSNorm",
                  add_bias_linear=False, qk_layernorm=True, bf16=True, position_embedding_type="rope",
                  moe_grouped_gemm=case.get("grouped", False), transformer_impl=case["impl"],
                  padded_vocab_size=64 if "vocab" not in case else -(-64 // (128 * TP)) * 128 * TP,
                  decoder_first_pipeline_num_layers=case.get("first"), decoder_last_pipeline_num_layers=case.get("last"))
    if case["model"] == "qwen3_moe":
        dense = cfg.get("mlp_only_layers", [])
        return dict(common, num_query_groups=2, group_query_attention=True, kv_channels=8, moe_ffn_hidden_size=16,
                    moe_layer_freq=1 if not dense else [0 if i in dense else 1 for i in range(2)],
                    moe_shared_expert_intermediate_size=None, moe_router_score_function="softmax",
                    moe_router_pre_softmax=False,  # norm_topk_prob: true
                    moe_router_enable_expert_bias=False, moe_router_topk_scaling_factor=None,
                    moe_router_num_groups=None, moe_router_group_topk=None, multi_latent_attention=False)
    n = cfg["num_hidden_layers"]
    return dict(common, ffn_hidden_size=40, moe_ffn_hidden_size=12, moe_layer_freq=[0] + [1] * (n - 1),
                moe_shared_expert_intermediate_size=12, moe_router_score_function="sigmoid",
                moe_router_enable_expert_bias=True, moe_router_topk_scaling_factor=2.5,
                moe_router_num_groups=None, moe_router_group_topk=None,  # n_group 1: no group-limited routing
                multi_latent_attention=True, q_lora_rank=cfg["q_lora_rank"], kv_lora_rank=16, qk_head_dim=8,
                qk_pos_emb_head_dim=4, v_head_dim=6, rotary_scaling_factor=1.0,
                mtp_num_layers=cfg.get("num_nextn_predict_layers") or None)


#: what Megatron r0.12's argparse gives a field the checkpoint leaves out (load_args_from_checkpoint keeps it)
MEGATRON_DEFAULTS = dict(multi_latent_attention=False, mtp_num_layers=None, decoder_first_pipeline_num_layers=None,
                         decoder_last_pipeline_num_layers=None)


@pytest.mark.parametrize("name", list(CASES))
def test_args(runs, name):
    case, r = CASES[name], runs[name]
    assert r["error"] is None, r["error"]
    want = _expected_args(case, r["hf_config"])
    for d in rank_dirs(r["save"]):
        a = load_rank_file(rank_path(r["save"], d))["args"]
        got = {k: getattr(a, k, MEGATRON_DEFAULTS.get(k, "<absent>")) for k in want}
        bad = {k: (got[k], want[k]) for k in want if got[k] != want[k] or type(got[k]) is not type(want[k])}
        assert not bad, (d, bad)


@pytest.mark.parametrize("model", list(INPUTS))
def test_optimizer_states_and_runtime_buffers_are_skipped_and_counted(model, tmp_path):
    """CheckpointMonitor output: every adam_m/adam_v state and every router expert_load/fi_accu is left out
    (the exact key sets above) and the run says how many of each it skipped (counted here from the header)."""
    from safetensors import safe_open

    from helpers import run_cli

    load = os.path.join(fixture_dir(model), INPUTS[model]["legacy"])
    (path,) = [os.path.join(load, f) for f in os.listdir(load) if f.endswith(".safetensors")]
    with safe_open(path, "np") as f:
        names = list(f.keys())
    n_opt = sum(n.startswith(("adam_m.", "adam_v.")) for n in names)
    n_buf = sum(n.endswith(("router.expert_load", "router.fi_accu")) for n in names)
    assert n_opt and n_buf
    p = run_cli(["convert", "--load-dir", load, "--save-dir", str(tmp_path / "out"),
                 "--model-config", os.path.join(fixture_dir(model), "hf", "config.json")])
    lines = (p.stdout + p.stderr).splitlines()
    assert any("skipped" in x and re.search(rf"\b{n_opt}\b", x) and "optimizer" in x for x in lines), lines
    assert any("skipped" in x and re.search(rf"\b{n_buf}\b", x) and "router" in x for x in lines), lines
