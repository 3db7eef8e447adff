"""Hugging Face checkpoints in: Llama, Qwen2 (qkv bias), Qwen3 (q/k norm), with their config.json.

Expectations never come from streamconv:

* byte identity: the tiny Qwen2 in ``fixtures/hf_pairs/qwen2`` (written by transformers) and the
  mindformers checkpoint mindformers 2.0 made from the same weights convert to the same files, byte
  for byte, at TP1/PP1, TP2/PP1 and TP1/PP2 (the mindformers run gets as flags what config.json says);
* synthetic HF Llama (GQA, no bias, untied) and Qwen3 (q/k norm, head dim != hidden/heads, tied)
  models written here with safetensors: every rank's tensors are built by hand with torch from the
  HF tensors in Megatron's layout (per query group [q heads; k; v], fc1 = [gate_r; up_r], row- and
  column-parallel splits, FORMAT.md §2), and the args from config.json;
* logits: a forward pass written from transformers' Llama/Qwen semantics over the HF tensors agrees
  with ``test_logits.megatron_logits`` over the converted rank files (a negative control with an
  interleaved rope shows the comparison would catch a rotary permutation);
* refusals: one line each, naming config.json and the key (or the tensor).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from helpers import FIXTURES_ROOT, contents, tree
from test_logits import bf16, causal_attention, load_megatron, megatron_logits, rms_norm, rope

QWEN2 = os.path.join(FIXTURES_ROOT, "hf_pairs", "qwen2")
QWEN3_MOE = os.path.join(FIXTURES_ROOT, "mindformers_moe", "qwen3_moe", "hf")


def streamconv(argv: list) -> tuple:
    """Run the command line in this process: (exit code, stdout, stderr)."""
    from streamconv.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def convert(argv: list) -> str:
    code, out, err = streamconv(["convert", *argv, "--quiet"])
    assert code == 0, f"streamconv {argv} exited {code}:\n{out}\n{err}"
    return out


def refusal(argv: list, command: str = "plan") -> str:
    code, out, err = streamconv([command, *argv])
    assert code == 2, f"expected a refusal, got exit {code}:\n{out}\n{err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamconv: error: "), err
    return lines[0]


def same_files(a: str, b: str) -> None:
    assert tree(a) == tree(b)
    for rel in tree(a):
        assert contents(os.path.join(a, rel)) == contents(os.path.join(b, rel)), f"{rel} differs"


def rank_files(save: str, tp: int, pp: int) -> dict:
    out = {}
    for p in range(pp):
        for r in range(tp):
            name = f"mp_rank_{r:02d}" + (f"_{p:03d}" if pp > 1 else "")
            out[(p, r)] = torch.load(os.path.join(save, "iter_0000001", name, "model_optim_rng.pt"),
                                     map_location="cpu", weights_only=False)
    assert sorted(os.listdir(os.path.join(save, "iter_0000001"))) == sorted(
        f"mp_rank_{r:02d}" + (f"_{p:03d}" if pp > 1 else "") for p, r in out)
    return out


# ---------------------------------------------------------------------------- byte identity with mindformers
def _hf_dir(tmp_path) -> str:
    d = tmp_path / "hf"
    d.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(QWEN2, name), d / name)
    return str(d)


def _mf_dir(tmp_path) -> str:
    d = tmp_path / "mf"  # no config.json beside it: every value comes from flags
    d.mkdir()
    shutil.copy(os.path.join(QWEN2, "mindformers_legacy_split.safetensors"), d)
    return str(d)


def _config_as_flags(cfg: dict) -> list:
    """What config.json tells that the mindformers weights cannot, as the flags a user would pass."""
    return ["--num-attention-heads", str(cfg["num_attention_heads"]),
            "--num-query-groups", str(cfg["num_key_value_heads"]),
            "--rotary-base", str(int(cfg["rope_theta"])),
            "--max-position-embeddings", str(cfg["max_position_embeddings"]),
            "--seq-length", str(min(2048, cfg["max_position_embeddings"])),
            "--norm-epsilon", repr(cfg["rms_norm_eps"])]


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_qwen2_hf_equals_mindformers_conversion(tmp_path, tp, pp):
    cfg = json.load(open(os.path.join(QWEN2, "config.json")))
    common = ["--target-tensor-parallel-size", str(tp), "--target-pipeline-parallel-size", str(pp)]
    hf_out, mf_out = str(tmp_path / "hf_out"), str(tmp_path / "mf_out")
    convert(["--load-dir", _hf_dir(tmp_path), "--save-dir", hf_out, *common])
    convert(["--load-dir", _mf_dir(tmp_path), "--save-dir", mf_out, *common, *_config_as_flags(cfg)])
    same_files(hf_out, mf_out)
    args = rank_files(hf_out, tp, pp)[(0, 0)]["args"]
    assert (args.rotary_base, args.max_position_embeddings, args.seq_length, args.norm_epsilon) == (
        10000, 64, 64, 1e-6)
    assert (args.num_attention_heads, args.num_query_groups, args.kv_channels, args.add_qkv_bias) == (4, 2, 8, True)
    assert args.untie_embeddings_and_output_weights is True


def test_qwen2_hf_with_every_flag_given_equals_mindformers(tmp_path):
    """Flags equal to config.json leave the output unchanged (local names, TP2 x PP2 this time)."""
    cfg = json.load(open(os.path.join(QWEN2, "config.json")))
    common = ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
              "--saver-transformer-impl", "local", *_config_as_flags(cfg)]
    hf_out, mf_out = str(tmp_path / "hf_out"), str(tmp_path / "mf_out")
    convert(["--load-dir", _hf_dir(tmp_path), "--save-dir", hf_out, *common])
    convert(["--load-dir", _mf_dir(tmp_path), "--save-dir", mf_out, *common])
    same_files(hf_out, mf_out)


def test_hf_plan_notes_config_values_and_assumes_no_layout(tmp_path):
    code, out, err = streamconv(["plan", "--load-dir", _hf_dir(tmp_path), "--save-dir", str(tmp_path / "o")])
    assert code == 0, err
    assert "Hugging Face names" in out
    # Hugging Face tensors are stored split: no row layout is assumed (the only assumption left is a value
    # config.json does not give: the sequence length, said loudly)
    assert "fc1 layout" not in out and "qkv layout" not in out
    assumed = [x for x in out.splitlines() if "ASSUMED" in x]
    assert len(assumed) == 1 and "seq_length=64" in assumed[0], out
    for part in ("rotary_base=10000 from config.json rope_theta",
                 "max_position_embeddings=64 from config.json max_position_embeddings",
                 "norm_epsilon=1e-06 from config.json rms_norm_eps"):
        assert part in out, (part, out)
    assert "Megatron does not read norm_epsilon back from the checkpoint (--use-checkpoint-args): run it with " \
           "--norm-epsilon 1e-06" in out


# ---------------------------------------------------------------------------- synthetic HF models
def write_hf(d: str, arch: str, *, layers: int, hidden: int, ffn: int, heads: int, kv: int, vocab: int,
             head_dim: int | None = None, tied: bool = False, qkv_bias: bool = False, qk_norm: bool = False,
             rope_theta: float = 10000.0, eps: float = 1e-6, max_pos: int = 4096, seed: int = 0,
             extra: dict | None = None, shards: int = 1, write_head_when_tied: bool = False,
             inv_freq: bool = False) -> dict:
    """A random HF model as transformers' save_pretrained lays it out; returns name -> tensor."""
    g = torch.Generator().manual_seed(seed)
    d_ = head_dim or hidden // heads

    def w(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def norm(n):
        return 1.0 + 0.2 * torch.randn(n, generator=g)

    t = {"model.embed_tokens.weight": w(vocab, hidden, scale=1.0)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm(hidden)
        t[p + "self_attn.q_proj.weight"] = w(heads * d_, hidden)
        t[p + "self_attn.k_proj.weight"] = w(kv * d_, hidden)
        t[p + "self_attn.v_proj.weight"] = w(kv * d_, hidden)
        if qkv_bias:
            t[p + "self_attn.q_proj.bias"] = w(heads * d_)
            t[p + "self_attn.k_proj.bias"] = w(kv * d_)
            t[p + "self_attn.v_proj.bias"] = w(kv * d_)
        t[p + "self_attn.o_proj.weight"] = w(hidden, heads * d_)
        if qk_norm:
            t[p + "self_attn.q_norm.weight"] = norm(d_)
            t[p + "self_attn.k_norm.weight"] = norm(d_)
        t[p + "post_attention_layernorm.weight"] = norm(hidden)
        t[p + "mlp.gate_proj.weight"] = w(ffn, hidden)
        t[p + "mlp.up_proj.weight"] = w(ffn, hidden)
        t[p + "mlp.down_proj.weight"] = w(hidden, ffn)
        if inv_freq:  # a buffer transformers < 4.31 saved with the weights
            t[p + "self_attn.rotary_emb.inv_freq"] = 1.0 / rope_theta ** (torch.arange(0, d_, 2).float() / d_)
    t["model.norm.weight"] = norm(hidden)
    if not tied or write_head_when_tied:
        t["lm_head.weight"] = w(vocab, hidden)
    cfg = {"architectures": [arch], "model_type": arch[:-len("ForCausalLM")].lower(), "vocab_size": vocab,
           "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": kv, "max_position_embeddings": max_pos,
           "rope_theta": rope_theta, "rms_norm_eps": eps, "tie_word_embeddings": tied, "hidden_act": "silu",
           "rope_scaling": None, "attention_dropout": 0.0, "torch_dtype": "float32"}
    if head_dim is not None:
        cfg["head_dim"] = head_dim
    if arch != "Qwen2ForCausalLM":
        cfg["attention_bias"] = qkv_bias
    cfg.update(extra or {})
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    names = list(t)
    if shards == 1:
        save_file(t, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        per = math.ceil(len(names) / shards)
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: t[n] for n in names[s * per:(s + 1) * per]}
            save_file(part, os.path.join(d, fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    return t


def expected_rank(t: dict, cfg: dict, tp: int, pp: int, r: int, p: int) -> dict:
    """Megatron's local-spec state dict of rank (p, r), built by hand from the HF tensors (BF16)."""
    nq, ng, h = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    d = cfg.get("head_dim") or h // nq
    hpg, ng_r = nq // ng, ng // tp
    L = cfg["num_hidden_layers"]
    per = L // pp
    tied = cfg["tie_word_embeddings"]
    out = {}
    if p == 0:
        out["embedding.word_embeddings.weight"] = t["model.embed_tokens.weight"].chunk(tp, 0)[r]
    for j, i in enumerate(range(p * per, (p + 1) * per)):
        H, P = f"model.layers.{i}.", f"decoder.layers.{j}."
        out[P + "input_layernorm.weight"] = t[H + "input_layernorm.weight"]
        out[P + "self_attention.linear_proj.weight"] = t[H + "self_attn.o_proj.weight"].chunk(tp, 1)[r]
        for part in ("weight", "bias"):
            if H + f"self_attn.q_proj.{part}" not in t:
                continue
            q = t[H + f"self_attn.q_proj.{part}"].reshape(nq, d, -1)
            k = t[H + f"self_attn.k_proj.{part}"].reshape(ng, d, -1)
            v = t[H + f"self_attn.v_proj.{part}"].reshape(ng, d, -1)
            rows = []
            for grp in range(r * ng_r, (r + 1) * ng_r):  # this rank's query groups: [its q heads; k; v]
                rows += [q[grp * hpg:(grp + 1) * hpg].reshape(hpg * d, -1), k[grp], v[grp]]
            qkv = torch.cat(rows)
            out[P + f"self_attention.linear_qkv.{part}"] = qkv if part == "weight" else qkv.reshape(-1)
        if H + "self_attn.q_norm.weight" in t:
            out[P + "self_attention.q_layernorm.weight"] = t[H + "self_attn.q_norm.weight"]
            out[P + "self_attention.k_layernorm.weight"] = t[H + "self_attn.k_norm.weight"]
        out[P + "pre_mlp_layernorm.weight"] = t[H + "post_attention_layernorm.weight"]
        out[P + "mlp.linear_fc1.weight"] = torch.cat([t[H + "mlp.gate_proj.weight"].chunk(tp, 0)[r],
                                                      t[H + "mlp.up_proj.weight"].chunk(tp, 0)[r]])
        out[P + "mlp.linear_fc2.weight"] = t[H + "mlp.down_proj.weight"].chunk(tp, 1)[r]
    if p == pp - 1:
        out["decoder.final_layernorm.weight"] = t["model.norm.weight"]
        if not tied:
            out["output_layer.weight"] = t["lm_head.weight"].chunk(tp, 0)[r]
        elif pp > 1:  # Megatron keeps a copy of the word embeddings on the last stage
            out["output_layer.weight"] = t["model.embed_tokens.weight"].chunk(tp, 0)[r]
    return {k: v.to(torch.bfloat16) for k, v in out.items()}


def check_against_hand_layout(save: str, t: dict, cfg: dict, tp: int, pp: int) -> None:
    files = rank_files(save, tp, pp)
    for (p, r), sd in files.items():
        want = expected_rank(t, cfg, tp, pp, r, p)
        got = {k: v for k, v in sd["model"].items() if not k.endswith("_extra_state")}
        assert list(got) == list(want), (p, r, list(got), list(want))
        for k, v in want.items():
            assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], v), (p, r, k)


def check_args(args, cfg: dict, tp: int, pp: int) -> None:
    nq, ng = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    want = dict(num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
                ffn_hidden_size=cfg["intermediate_size"], num_attention_heads=nq,
                num_query_groups=ng if ng != nq else None, group_query_attention=ng != nq,
                kv_channels=cfg.get("head_dim") or cfg["hidden_size"] // nq,
                rotary_base=int(cfg["rope_theta"]), max_position_embeddings=cfg["max_position_embeddings"],
                seq_length=min(2048, cfg["max_position_embeddings"]), norm_epsilon=cfg["rms_norm_eps"],
                untie_embeddings_and_output_weights=not cfg["tie_word_embeddings"],
                qk_layernorm=cfg["architectures"][0] == "Qwen3ForCausalLM", swiglu=True, normalization="RMSNorm",
                add_bias_linear=False, padded_vocab_size=cfg["vocab_size"], position_embedding_type="rope",
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    got = {k: getattr(args, k, False if k == "qk_layernorm" else "<absent>") for k in want}
    assert got == want, {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not hasattr(args, "use_rope_scaling")


LLAMA = dict(arch="LlamaForCausalLM", layers=4, hidden=64, ffn=96, heads=8, kv=2, vocab=256, tied=False,
             rope_theta=500000.0, eps=1e-5, max_pos=8192, seed=1)
QWEN3 = dict(arch="Qwen3ForCausalLM", layers=2, hidden=32, ffn=48, heads=4, kv=2, head_dim=16, vocab=128, tied=True,
             qk_norm=True, rope_theta=1000000.0, eps=1e-6, max_pos=40960, seed=2)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, spec in (("llama", LLAMA), ("qwen3", QWEN3)):
        d = str(root / name)
        spec = dict(spec)
        t = write_hf(d, spec.pop("arch"), **spec)
        out[name] = (d, t, json.load(open(os.path.join(d, "config.json"))))
    return out


RUNS = [("llama", 2, 2), ("llama", 2, 1), ("llama", 1, 1), ("qwen3", 2, 2), ("qwen3", 1, 1)]


@pytest.fixture(scope="module")
def converted(hf_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_out")
    out = {}
    for name, tp, pp in RUNS:
        save = str(root / f"{name}_tp{tp}_pp{pp}")
        convert(["--load-dir", hf_models[name][0], "--save-dir", save, "--saver-transformer-impl", "local",
                 "--target-tensor-parallel-size", str(tp), "--target-pipeline-parallel-size", str(pp)])
        out[(name, tp, pp)] = save
    return out


@pytest.mark.parametrize("name,tp,pp", RUNS)
def test_synthetic_hf_matches_hand_layout(hf_models, converted, name, tp, pp):
    _, t, cfg = hf_models[name]
    save = converted[(name, tp, pp)]
    check_against_hand_layout(save, t, cfg, tp, pp)
    check_args(rank_files(save, tp, pp)[(0, 0)]["args"], cfg, tp, pp)


def test_transformer_engine_names_carry_the_same_tensors(hf_models, tmp_path):
    """The TE spec fuses the two layer norms into linear_qkv / linear_fc1; the tensors are the same."""
    d, t, cfg = hf_models["qwen3"]
    save = str(tmp_path / "te")
    convert(["--load-dir", d, "--save-dir", save, "--target-tensor-parallel-size", "2"])
    sd = rank_files(save, 2, 1)[(0, 1)]["model"]
    want = expected_rank(t, cfg, 2, 1, 1, 0)
    for i in range(cfg["num_hidden_layers"]):
        P = f"decoder.layers.{i}."
        assert torch.equal(sd[P + "self_attention.linear_qkv.layer_norm_weight"], want[P + "input_layernorm.weight"])
        assert torch.equal(sd[P + "mlp.linear_fc1.layer_norm_weight"], want[P + "pre_mlp_layernorm.weight"])
        for k in ("self_attention.linear_qkv.weight", "self_attention.q_layernorm.weight", "mlp.linear_fc1.weight"):
            assert torch.equal(sd[P + k], want[P + k]), k


def test_sharded_hf_checkpoint_converts_like_one_file(hf_models, converted, tmp_path):
    spec = dict(LLAMA)
    d = str(tmp_path / "sharded")
    write_hf(d, spec.pop("arch"), shards=3, **spec)
    assert sorted(os.listdir(d))[-1] == "model.safetensors.index.json"
    save = str(tmp_path / "out")
    convert(["--load-dir", d, "--save-dir", save, "--saver-transformer-impl", "local",
             "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2"])
    same_files(save, converted[("llama", 2, 2)])


def test_saved_rotary_inv_freq_buffers_are_skipped(converted, tmp_path):
    spec = dict(LLAMA)
    d = str(tmp_path / "inv_freq")
    t = write_hf(d, spec.pop("arch"), inv_freq=True, **spec)
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" in t
    save = str(tmp_path / "out")
    convert(["--load-dir", d, "--save-dir", save, "--saver-transformer-impl", "local"])
    same_files(save, converted[("llama", 1, 1)])
    _, plan_out, _ = streamconv(["plan", "--load-dir", d, "--save-dir", str(tmp_path / "p")])
    assert "skipped 4 placeholder entries without weights (dropout, rotary inv_freq)" in plan_out


def test_load_dir_may_name_config_json(hf_models, converted, tmp_path):
    save = str(tmp_path / "out")
    convert(["--load-dir", os.path.join(hf_models["qwen3"][0], "config.json"), "--save-dir", save,
             "--saver-transformer-impl", "local"])
    same_files(save, converted[("qwen3", 1, 1)])


def test_verify_accepts_the_hf_conversion(hf_models, converted):
    code, out, err = streamconv(["verify", "--load-dir", hf_models["llama"][0],
                                 "--save-dir", converted[("llama", 2, 2)]])
    assert code == 0, out + err
    assert out.strip().endswith("OK")


def test_tied_model_with_a_stored_lm_head_ignores_it_like_transformers(hf_models, converted, tmp_path):
    spec = dict(QWEN3)
    d = str(tmp_path / "tied_head")
    t = write_hf(d, spec.pop("arch"), write_head_when_tied=True, **spec)
    assert "lm_head.weight" in t
    save = str(tmp_path / "out")
    convert(["--load-dir", d, "--save-dir", save, "--saver-transformer-impl", "local",
             "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2"])
    same_files(save, converted[("qwen3", 2, 2)])  # the same weights otherwise (same seed)
    _, plan_out, _ = streamconv(["plan", "--load-dir", d, "--save-dir", str(tmp_path / "p")])
    assert "lm_head.weight is not converted" in plan_out


def test_flags_given_override_config_json(hf_models, tmp_path):
    d = hf_models["qwen3"][0]
    save = str(tmp_path / "out")
    convert(["--load-dir", d, "--save-dir", save, "--rotary-base", "10000", "--seq-length", "4096",
             "--norm-epsilon", "1e-5"])
    args = rank_files(save, 1, 1)[(0, 0)]["args"]
    # given flags win, even a value equal to streamconv's default; the rest still comes from config.json
    assert (args.rotary_base, args.seq_length, args.norm_epsilon, args.max_position_embeddings) == (
        10000, 4096, 1e-5, 40960)
    code, out, _ = streamconv(["plan", "--load-dir", d, "--save-dir", str(tmp_path / "p"), "--rotary-base", "10000"])
    assert "rotary_base=" not in out  # a value given as a flag needs no word on where it came from
    assert "max_position_embeddings=40960 from config.json max_position_embeddings" in out


def test_model_config_flag_names_a_config_elsewhere(hf_models, tmp_path):
    d, _, cfg = hf_models["llama"]
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(os.path.join(d, "model.safetensors"), weights)
    line = refusal(["--load-dir", str(weights), "--save-dir", str(tmp_path / "o")])
    assert "without a config.json" in line and "--model-config" in line
    code, out, err = streamconv(["plan", "--load-dir", str(weights), "--save-dir", str(tmp_path / "o"),
                                 "--model-config", os.path.join(d, "config.json")])
    assert code == 0, err
    assert "rotary_base=500000 from config.json rope_theta" in out


def test_llama31_rope_scaling_is_recorded(tmp_path):
    spec = dict(LLAMA, layers=2)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    d = str(tmp_path / "l31")
    write_hf(d, spec.pop("arch"), extra={"rope_scaling": scaling}, **spec)
    save = str(tmp_path / "out")
    convert(["--load-dir", d, "--save-dir", save])
    args = rank_files(save, 1, 1)[(0, 0)]["args"]
    assert args.use_rope_scaling is True and args.rotary_base == 500000
    _, plan_out, _ = streamconv(["plan", "--load-dir", d, "--save-dir", str(tmp_path / "p")])
    assert "--use-rope-scaling" in plan_out


def test_transformers5_rope_parameters(tmp_path):
    spec = dict(QWEN3)
    d = str(tmp_path / "v5")
    write_hf(d, spec.pop("arch"), **spec)
    cfg = json.load(open(os.path.join(d, "config.json")))
    del cfg["rope_theta"], cfg["rope_scaling"]
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0}
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    code, out, err = streamconv(["plan", "--load-dir", d, "--save-dir", str(tmp_path / "p")])
    assert code == 0, err
    assert "rotary_base=1000000 from config.json rope_parameters.rope_theta" in out


# ---------------------------------------------------------------------------- logits
def hf_reference_logits(t: dict, cfg: dict, tokens: torch.Tensor, interleaved_rope: bool = False) -> torch.Tensor:
    """transformers' LlamaForCausalLM / Qwen2 / Qwen3 forward, written out over the HF tensors."""
    t = {k: bf16(v) for k, v in t.items()}  # the converter's BF16 rounding
    eps, theta = cfg["rms_norm_eps"], float(cfg["rope_theta"])
    nq, ng, h = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    d, n = cfg.get("head_dim") or h // nq, len(tokens)

    def lin(x, name):
        b = t.get(name + ".bias")
        y = x @ t[name + ".weight"].T
        return y if b is None else y + b

    def rotary(x):
        if not interleaved_rope:
            return rope(x, theta)  # rotate_half: pairs (i, i + d/2)
        s = x.shape[0]  # negative control: GPT-J pairs (2i, 2i+1), what a wrong row permutation would amount to
        inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
        ang = torch.outer(torch.arange(s, dtype=torch.float32), inv)[:, None, :]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], -1).flatten(-2)

    x = t["model.embed_tokens.weight"][tokens]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = rms_norm(x, t[p + "input_layernorm.weight"], eps)
        q = lin(a, p + "self_attn.q_proj").view(n, nq, d)
        k = lin(a, p + "self_attn.k_proj").view(n, ng, d)
        v = lin(a, p + "self_attn.v_proj").view(n, ng, d)
        if p + "self_attn.q_norm.weight" in t:  # Qwen3: per-head RMSNorm before rope
            q = rms_norm(q, t[p + "self_attn.q_norm.weight"], eps)
            k = rms_norm(k, t[p + "self_attn.k_norm.weight"], eps)
        q, k = rotary(q), rotary(k)
        rep = nq // ng  # repeat_kv
        x = x + lin(causal_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)), p + "self_attn.o_proj")
        a = rms_norm(x, t[p + "post_attention_layernorm.weight"], eps)
        x = x + lin(F.silu(lin(a, p + "mlp.gate_proj")) * lin(a, p + "mlp.up_proj"), p + "mlp.down_proj")
    x = rms_norm(x, t["model.norm.weight"], eps)
    head = t["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else t["lm_head.weight"]
    return x @ head.T


def _tokens(vocab: int, seed: int) -> torch.Tensor:
    tok = torch.randint(0, vocab, (16,), generator=torch.Generator().manual_seed(seed))
    tok[0], tok[-1] = 0, vocab - 1
    return tok


@pytest.mark.parametrize("name,tp,pp", [("llama", 2, 2), ("qwen3", 2, 2), ("qwen3", 1, 1)])
def test_logits_match_hf_forward(hf_models, converted, name, tp, pp):
    _, t, cfg = hf_models[name]
    tokens = _tokens(cfg["vocab_size"], 7)
    ref = hf_reference_logits(t, cfg, tokens)
    args, shards = load_megatron(converted[(name, tp, pp)])
    got = megatron_logits(args, shards, tokens)
    assert ref.abs().max() > 0.5
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()
    wrong = hf_reference_logits(t, cfg, tokens, interleaved_rope=True)
    assert (wrong - got).abs().max() > 0.1  # the comparison sees a rotary convention mistake


def test_qwen2_fixture_logits_match_hf_forward(tmp_path):
    """The transformers-written Qwen2 (qkv bias) through the whole path, TP2 x PP2."""
    from safetensors.torch import load_file

    cfg = json.load(open(os.path.join(QWEN2, "config.json")))
    t = load_file(os.path.join(QWEN2, "model.safetensors"))
    save = str(tmp_path / "out")
    convert(["--load-dir", _hf_dir(tmp_path), "--save-dir", save, "--saver-transformer-impl", "local",
             "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2"])
    tokens = _tokens(cfg["vocab_size"], 3)
    args, shards = load_megatron(save)
    got, ref = megatron_logits(args, shards, tokens), hf_reference_logits(t, cfg, tokens)
    assert ref.abs().max() > 0.05
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()


# ---------------------------------------------------------------------------- refusals
def _edited(hf_models, tmp_path, name: str, **changes) -> str:
    src = hf_models[name][0]
    d = tmp_path / f"{name}_edited"
    shutil.copytree(src, d)
    cfg = json.load(open(d / "config.json"))
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    json.dump(cfg, open(d / "config.json", "w"))
    return str(d)


def test_unsupported_architecture_is_named_with_the_supported_ones(hf_models, tmp_path):
    d = _edited(hf_models, tmp_path, "llama", architectures=["MistralForCausalLM"], model_type="mistral")
    line = refusal(["--load-dir", d, "--save-dir", str(tmp_path / "o")])
    assert "config.json" in line and "MistralForCausalLM is not supported" in line
    assert all(a in line for a in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "DeepseekV3ForCausalLM"))


MOE_FIXTURES = os.path.join(FIXTURES_ROOT, "mindformers_moe")


@pytest.mark.parametrize("model,mf_file", [("qwen3_moe", "mf_qwen3_moe_model.safetensors"),
                                           ("deepseek_v3", "mf_deepseek_v3_model.safetensors")])
@pytest.mark.parametrize("tp,pp,ep,extra", [(2, 1, 2, []), (1, 1, 4, []), (1, 2, 2, ["--decoder-first-pipeline-num-layers", "1"])])
def test_hf_moe_equals_mindformers_conversion(tmp_path, model, mf_file, tp, pp, ep, extra):
    """Issue 13: a HF MoE/MLA model and the mindformers checkpoint made from it convert to the same bytes.

    The mindformers file is mindformers' own conversion of hf/ (FORMAT.md §6); its fused shared-expert and
    dense fc1 are interleaved (mindformers' default), its experts stacked and transposed.
    """
    if model == "qwen3_moe" and extra:
        extra = []  # 2 layers: an even split
    d = os.path.join(MOE_FIXTURES, model)
    common = ["--target-tensor-parallel-size", str(tp), "--target-pipeline-parallel-size", str(pp),
              "--target-expert-parallel-size", str(ep), "--saver-transformer-impl", "local", *extra]
    hf_out, mf_out = str(tmp_path / "hf_out"), str(tmp_path / "mf_out")
    convert(["--load-dir", os.path.join(d, "hf"), "--save-dir", hf_out, *common])
    convert(["--load-dir", os.path.join(d, mf_file), "--model-config", os.path.join(d, "hf", "config.json"),
             "--save-dir", mf_out, *common])
    same_files(hf_out, mf_out)


@pytest.mark.parametrize("key,value,named", [
    ("num_hidden_layers", 3, "num_hidden_layers 3"),
    ("hidden_size", 48, "hidden_size 48"),
    ("vocab_size", 300, "vocab_size 300"),
    ("intermediate_size", 64, "intermediate_size 64"),
    ("num_key_value_heads", 4, "num_key_value_heads 4"),
    ("head_dim", 8, "head_dim 8"),
    ("tie_word_embeddings", False, "tie_word_embeddings is false"),
    ("attention_bias", True, "attention_bias"),
])
def test_config_json_contradicting_the_shapes(hf_models, tmp_path, key, value, named):
    d = _edited(hf_models, tmp_path, "qwen3", **{key: value})
    line = refusal(["--load-dir", d, "--save-dir", str(tmp_path / "o")])
    assert "config.json" in line and named in line, line


@pytest.mark.parametrize("changes,named", [
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
     "rope_scaling"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}), "rope_scaling"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(use_sliding_window=True), "use_sliding_window"),
    (dict(rope_theta=10000.5), "rope_theta"),
])
def test_config_json_megatron_cannot_express(hf_models, tmp_path, changes, named):
    d = _edited(hf_models, tmp_path, "llama", **changes)
    line = refusal(["--load-dir", d, "--save-dir", str(tmp_path / "o")])
    assert "config.json" in line and named in line, line


def test_yarn_scaling_is_refused_for_standard_attention(tmp_path):
    """Megatron r0.12 applies yarn only in multi-latent attention: a dense model's yarn config is refused
    (here a mindformers checkpoint named with a config.json that asks for it)."""
    cfg = json.load(open(os.path.join(QWEN2, "config.json")))
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    path = tmp_path / "yarn.json"
    json.dump(cfg, open(path, "w"))
    line = refusal(["--load-dir", _mf_dir(tmp_path), "--save-dir", str(tmp_path / "o"), "--model-config", str(path)])
    assert "yarn.json rope_scaling.factor 4.0" in line and "multi-latent attention" in line


def test_mixed_hf_and_mindformers_names_are_refused(hf_models, tmp_path):
    d = tmp_path / "mixed"
    shutil.copytree(hf_models["qwen3"][0], d)
    # a fused mindformers fc1 beside HF's gate/up: its row layout would need flags the HF scheme ignores
    save_file({"decoder.layers.0.mlp.linear_fc1.weight": torch.zeros(96, 32)}, str(d / "extra.safetensors"))
    line = refusal(["--load-dir", str(d), "--save-dir", str(tmp_path / "o")])
    assert "mixes Hugging Face names with mindformers mcore names" in line


def test_help_mentions_hugging_face_input():
    p = subprocess.run([sys.executable, "-m", "streamconv", "convert", "--help"], capture_output=True, text=True)
    assert p.returncode == 0
    assert "Hugging Face" in p.stdout and "--model-config" in p.stdout and "--norm-epsilon" in p.stdout


def _hf_mtp_dir(tmp_path, edit=None) -> tuple:
    """DeepSeek-V3 with one MTP layer under HF names, as deepseek-ai ships it: model.layers.4 after the 4 decoder
    layers holds the MTP module (enorm, hnorm, eh_proj, shared_head.norm, a whole MoE layer) and copies of the
    embedding and output head. Returns (hf dir, the same model's mindformers file, its config.json)."""
    from moe_fixtures import make_variant

    v = make_variant("ds4_mtp1", str(tmp_path / "variant"))
    hf = dict(v["hf"])
    hf["model.layers.4.embed_tokens.weight"] = hf["model.embed_tokens.weight"].clone()
    hf["model.layers.4.shared_head.head.weight"] = hf["lm_head.weight"].clone()
    if edit:
        edit(hf)
    d = tmp_path / "hf_mtp"
    d.mkdir()
    save_file({k: t.contiguous() for k, t in hf.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(v["config"], d / "config.json")
    return str(d), v["load"], v["config"]


@pytest.mark.parametrize("tp,pp,ep", [(2, 2, 2), (1, 1, 4)])
def test_hf_deepseek_mtp_layer_equals_mindformers_conversion(tmp_path, tp, pp, ep):
    """HF's model.layers.L (L = num_hidden_layers) is Megatron's mtp.layers.0: the HF model converts to the bytes of
    the mindformers checkpoint holding the same MTP weights (whose conversion the real-Megatron dumps check)."""
    hf_dir, mf_file, config = _hf_mtp_dir(tmp_path)
    common = ["--target-tensor-parallel-size", str(tp), "--target-pipeline-parallel-size", str(pp),
              "--target-expert-parallel-size", str(ep), "--saver-transformer-impl", "local"]
    hf_out, mf_out = str(tmp_path / "hf_out"), str(tmp_path / "mf_out")
    code, out, err = streamconv(["plan", "--load-dir", hf_dir, "--save-dir", hf_out, *common])
    assert code == 0 and "model.layers.4.embed_tokens.weight, model.layers.4.shared_head.head.weight" in out, out + err
    convert(["--load-dir", hf_dir, "--save-dir", hf_out, *common])
    convert(["--load-dir", mf_file, "--model-config", config, "--save-dir", mf_out, *common])
    same_files(hf_out, mf_out)


def test_hf_mtp_layer_before_a_decoder_layer_is_refused(tmp_path):
    def move(hf):  # the MTP module's own tensors on layer 2, with layers 3 and 4 after it
        for k in [k for k in hf if k.startswith("model.layers.4.") and k.split(".", 3)[3] in
                  ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight")]:
            hf[k.replace("model.layers.4.", "model.layers.2.")] = hf.pop(k)
    hf_dir, _, _ = _hf_mtp_dir(tmp_path, move)
    line = refusal(["--load-dir", hf_dir, "--save-dir", str(tmp_path / "o")], "convert")
    assert "model.layers.2" in line and "multi-token-prediction" in line and "model.layers.4" in line, line
    assert not (tmp_path / "o").exists()  # nothing written


def test_hf_mtp_copy_of_another_shape_is_refused(tmp_path):
    def cut(hf):
        hf["model.layers.4.embed_tokens.weight"] = hf["model.layers.4.embed_tokens.weight"][:-1].clone()
    hf_dir, _, _ = _hf_mtp_dir(tmp_path, cut)
    line = refusal(["--load-dir", hf_dir, "--save-dir", str(tmp_path / "o")], "convert")
    assert "model.layers.4.embed_tokens.weight" in line and "embedding.word_embeddings.weight" in line, line
    assert not (tmp_path / "o").exists()  # nothing written



def test_hf_deepseek_saved_without_its_mtp_layer_converts_and_says_so(tmp_path):
    """transformers leaves model.layers.L out when it saves DeepSeek-V3 but keeps num_nextn_predict_layers."""
    def drop(hf):
        for k in [k for k in hf if k.startswith("model.layers.4.")]:
            del hf[k]
    hf_dir, _, _ = _hf_mtp_dir(tmp_path, drop)
    code, out, err = streamconv(["plan", "--load-dir", hf_dir, "--save-dir", str(tmp_path / "o")])
    assert code == 0, out + err
    assert "config.json num_nextn_predict_layers 1, but the weights hold no MTP layer" in out, out


def test_hf_config_counting_other_mtp_layers_is_refused(tmp_path):
    hf_dir, _, _ = _hf_mtp_dir(tmp_path)
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    cfg["num_nextn_predict_layers"] = 2
    json.dump(cfg, open(os.path.join(hf_dir, "config.json"), "w"))
    line = refusal(["--load-dir", hf_dir, "--save-dir", str(tmp_path / "o")], "convert")
    assert "config.json num_nextn_predict_layers 2 contradicts the weights" in line and "1 multi-token" in line, line
    assert not (tmp_path / "o").exists()  # nothing written
