"""``--ckpt-format torch_dist`` end to end, against independent expectations.

(1) Each model is converted twice: to the legacy format at TP x PP, and to
torch_dist chunked at TP x PP and at another layout. The torch_dist output is
read back with STOCK ``torch.distributed.checkpoint`` (no process group, torch's
own reader and planner) into whole global tensors; the legacy files are read
with plain ``torch.load`` and put together by hand with FORMAT.md §2's split
rules and §7's key names (written out below, not taken from streamconv). The
two must agree bit for bit, key for key, object for object.

(2) Every output's ``.metadata`` chunks tile every tensor exactly once (checked
by painting elements here); a run killed at several points leaves neither
``metadata.json`` nor the tracker and ``--resume`` finishes byte-identical to an
uninterrupted run; ``verify`` finds a flipped byte, a missing item and a
hostile ``.metadata`` (which is never unpickled beyond its allowed classes).

(3) With /work/venv-mcore (megatron-core 0.12), real Megatron loads the
checkpoint at a layout other than the one it was chunked for and its logits
equal the source model's (scripts/check_megatron_load.py); skipped elsewhere.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

import synth
from helpers import REPO, file_bytes, golden_cases, kill_when, official_argv, tree
from streamconv.cli import main as cli_main

ITER = "iter_0000001"


def convert(argv: list) -> None:
    """The CLI, in this process (torch is imported once for the whole module)."""
    code = cli_main(["convert", *argv, "--quiet"])
    assert code == 0, argv


def _with(argv: list, **flags) -> list:
    """``argv`` with some ``--flag value`` pairs replaced or added."""
    out = list(argv)
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if flag in out:
            i = out.index(flag)
            del out[i:i + 2]
        out += [flag, str(value)]
    return out


# -- the legacy side, by hand ------------------------------------------------------------------

def _load(path: str):
    """torch.load with weights_only, allowing only the args Namespace (no global state changed)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, weights_only=True)

_REPLICATED = re.compile(r".*(layernorm\.|layer_norm_)(weight|bias)|.*linear_(proj|fc2)\.bias")
_ROW_PARALLEL = re.compile(r".*linear_(proj|fc2)\.weight")
_LOCAL_TO_DIST = (("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
                  ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"))


def legacy_globals(save: str):
    """-> (args, {global key: tensor}, {object unique key: value}) from the legacy rank files.

    FORMAT.md §2: stage p holds layers [p*L/P, (p+1)*L/P); TP splits embedding/output/qkv/
    non-gated fc1 along dim 0, gated fc1 as [gate_r; up_r], proj/fc2 weights along dim 1;
    norms and row-parallel biases are copies. §7: layers stacked on a leading axis, local
    norm names as the TE ones, each _extra_state an object ``<key>/shard_<l>_<L>``.
    """
    it = os.path.join(save, ITER)
    files = {}
    for d in sorted(os.listdir(it)):
        m = re.fullmatch(r"mp_rank_(\d\d)(?:_(\d\d\d))?", d)
        files[(int(m.group(1)), int(m.group(2) or 0))] = _load(os.path.join(it, d, "model_optim_rng.pt"))
    args = next(iter(files.values()))["args"]
    tp, pp, L = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.num_layers
    assert set(files) == {(t, p) for t in range(tp) for p in range(pp)}
    layers, tensors, objects = {}, {}, {}
    for p in range(pp):
        models = [files[(t, p)]["model"] for t in range(tp)]
        for key in models[0]:
            vals = [m[key] for m in models]
            m = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", key)
            g, name = (p * (L // pp) + int(m.group(1)), m.group(2)) if m else (None, key)
            if name.endswith("_extra_state"):
                if key == "output_layer._extra_state":
                    continue  # GPTModel's sharded state dict drops it
                for v in vals[1:]:
                    assert (v is None and vals[0] is None) or torch.equal(v, vals[0]), key
                uk = f"decoder.layers.{name}/shard_{g}_{L}" if g is not None else f"{key}/shard_0_1"
                objects[uk] = vals[0]
                continue
            if _REPLICATED.fullmatch(name):
                for v in vals[1:]:
                    assert torch.equal(v, vals[0]), key
                full = vals[0]
            elif _ROW_PARALLEL.fullmatch(name):
                full = torch.cat(vals, 1)
            elif re.fullmatch(r".*linear_fc1\.(weight|bias)", name) and args.swiglu:
                half = vals[0].shape[0] // 2
                full = torch.cat([v[:half] for v in vals] + [v[half:] for v in vals], 0)
            else:
                full = torch.cat(vals, 0)
            if g is None:
                tensors[key] = full
                continue
            if args.transformer_impl == "local":
                for old, new in _LOCAL_TO_DIST:
                    if name.startswith(old):
                        name = new + name[len(old):]
            layers.setdefault(name, {})[g] = full
    for name, per in layers.items():
        assert sorted(per) == list(range(L)), name
        tensors[f"decoder.layers.{name}"] = torch.stack([per[g] for g in range(L)])
    if not args.untie_embeddings_and_output_weights and "output_layer.weight" in tensors:
        # tied with PP > 1: the last stage's copy of the embeddings is not a tensor of its own
        assert torch.equal(tensors.pop("output_layer.weight"), tensors["embedding.word_embeddings.weight"])
    return args, tensors, objects


# -- the torch_dist side, with stock torch -------------------------------------------------------

def dist_globals(save: str):
    """-> (common.pt dict, {key: tensor}, {unique key: value}, Metadata) via torch's own DCP reader."""
    d = os.path.join(save, ITER)
    md = FileSystemReader(d).read_metadata()
    sd = {}
    for k, m in md.state_dict_metadata.items():
        if isinstance(m, TensorStorageMetadata):
            sd[k] = torch.full(tuple(m.size), float("nan"), dtype=m.properties.dtype)
        else:
            sd[k] = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
        dcp.load(sd, storage_reader=FileSystemReader(d), no_dist=True)
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    objects = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            assert isinstance(v, list) and len(v) == 1, k  # Megatron's list of one local object
            objects[k] = v[0]
    common = _load(os.path.join(d, "common.pt"))
    return common, tensors, objects, md


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t.view(torch.int32)


def _vocab_rows(args, true_vocab, tp):
    """Megatron's padded vocab at a TP (FORMAT.md §2), or the table as is without a true vocab size."""
    if true_vocab is None:
        return None
    m = args.make_vocab_size_divisible_by * tp
    return -(-true_vocab // m) * m


def assert_same_model(legacy: str, dist: str, true_vocab=None):
    largs, lt, lo = legacy_globals(legacy)
    common, dt, do, md = dist_globals(dist)
    dargs = common["args"]
    assert set(dt) == set(lt), (sorted(set(dt) ^ set(lt)))
    for k, want in lt.items():
        got = dt[k]
        assert got.dtype == want.dtype, k
        if k in ("embedding.word_embeddings.weight", "output_layer.weight") and got.shape != want.shape:
            # another TP pads the vocab to another multiple; rows both have are the same rows
            assert got.shape[0] == _vocab_rows(dargs, true_vocab, dargs.tensor_model_parallel_size), k
            n = min(got.shape[0], want.shape[0])
            got, want = got[:n], want[:n]
        assert got.shape == want.shape, (k, got.shape, want.shape)
        assert torch.equal(_bits(got), _bits(want)), k
    if largs.transformer_impl == "local":
        # the legacy files keep it for TE-installed loads; Megatron's local-spec sharded state has none
        lo.pop("decoder.final_layernorm._extra_state/shard_0_1", None)
    assert set(do) == set(lo), sorted(set(do) ^ set(lo))
    for k, want in lo.items():
        got = do[k]
        assert (got is None and want is None) or (torch.is_tensor(got) and torch.equal(got, want)), k
    # common.pt: the legacy args, plus what a torch_dist load needs
    la, da = vars(largs), vars(dargs)
    assert da.pop("ckpt_format") == "torch_dist" and da.pop("no_save_optim") is True and da.pop("no_save_rng") is True
    la.pop("ckpt_format")
    for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "padded_vocab_size"):
        la.pop(k), da.pop(k)
    assert da == la
    assert {k: v for k, v in common.items() if k != "args"} == {
        "checkpoint_version": 3.0, "iteration": 1, "num_floating_point_operations_so_far": 0}
    return md


def paint_coverage(md) -> list:
    """Keys whose chunks do not cover every element exactly once (counted element by element)."""
    bad = []
    for k, m in md.state_dict_metadata.items():
        if not isinstance(m, TensorStorageMetadata):
            continue
        count = np.zeros(tuple(m.size), dtype=np.int32)
        for c in m.chunks:
            count[tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes))] += 1
        if not (count == 1).all():
            bad.append(k)
    return bad


def final_layout(save: str, n_data: int) -> None:
    files = tree(save)
    assert files[-1] == "latest_checkpointed_iteration.txt"
    data = [f for f in files if f.endswith(".distcp")]
    assert len(data) == n_data, data
    assert set(files) == set(data) | {f"{ITER}/.metadata", f"{ITER}/common.pt", f"{ITER}/metadata.json",
                                      "latest_checkpointed_iteration.txt"}
    assert json.load(open(os.path.join(save, ITER, "metadata.json"))) == {
        "sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
        "common_backend_version": 1}


# -- (1) golden cases ---------------------------------------------------------------------------

def _tp_pp(argv):
    return int(argv[argv.index("--target-tensor-parallel-size") + 1]), \
        int(argv[argv.index("--target-pipeline-parallel-size") + 1])


def _true_vocab(argv):
    return int(argv[argv.index("--true-vocab-size") + 1]) if "--true-vocab-size" in argv else None


#: another layout per golden case, allowed by its dimensions (heads, groups, ffn, layers, vocab)
OTHER = {"a_doc__argfix": (1, 2), "b_tp4": (2, 2), "c_pp4": (2, 1), "d_vocab_pad": (1, 1), "f_layernorm_gelu": (1, 2)}


@pytest.mark.parametrize("case", golden_cases())
def test_golden_case_same_tensors_as_legacy(case, tmp_path):
    legacy = str(tmp_path / "legacy")
    argv = official_argv(case, legacy)
    convert(argv)
    tp, pp = _tp_pp(argv)
    same = str(tmp_path / "same")
    convert(_with(official_argv(case, same), ckpt_format="torch_dist"))
    md = assert_same_model(legacy, same, _true_vocab(argv))
    assert paint_coverage(md) == []
    final_layout(same, tp * pp)
    otp, opp = OTHER[case]
    other = str(tmp_path / "other")
    convert(_with(official_argv(case, other), ckpt_format="torch_dist", target_tensor_parallel_size=otp,
                  target_pipeline_parallel_size=opp))
    assert_same_model(legacy, other, _true_vocab(argv))
    final_layout(other, otp * opp)


# -- (1) synthetic models: every layout feature, both key namings ----------------------------------

SPECS = {
    # GQA, head dim != hidden/heads, q/k layernorm, all biases, interleaved fc1, untied
    "qkln_bias": synth.ModelSpec(layers=4, hidden=64, ffn=96, heads=8, groups=2, head_dim=16, vocab=300, bias=True,
                                 qk_layernorm=True, fc1_layout="interleaved", seed=11),
    # contiguous qkv with qkv bias, [gate; up] fc1, tied embeddings, F16 source
    "tied_contiguous": synth.ModelSpec(layers=4, hidden=64, ffn=80, heads=8, groups=2, vocab=200, tied=True,
                                       dtype="F16", qkv_bias=True, fc1_layout="concat", qkv_layout="contiguous", seed=12),
    # LayerNorm + GELU, non-gated fc1, biases, MHA
    "layernorm_gelu": synth.ModelSpec(layers=2, hidden=64, ffn=128, heads=4, groups=4, vocab=256, norm="LayerNorm",
                                      swiglu=False, bias=True, seed=13),
}
EXTRA = {"layernorm_gelu": ["--normalization", "LayerNorm", "--add-bias-linear"]}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    out = {}
    for name, spec in SPECS.items():
        d = str(tmp_path_factory.mktemp(name))
        synth.write_checkpoint(d, spec)
        out[name] = d
    return out


def _argv(name, src, save, tp, pp, impl="local", fmt="torch", true_vocab=None):
    s = SPECS[name]
    argv = ["--load-dir", src, "--save-dir", save, "--target-tensor-parallel-size", str(tp),
            "--target-pipeline-parallel-size", str(pp), "--saver-transformer-impl", impl,
            "--num-attention-heads", str(s.heads), "--num-query-groups", str(s.groups),
            "--fc1-layout", s.fc1_layout, "--qkv-layout", s.qkv_layout, "--ckpt-format", fmt, *EXTRA.get(name, [])]
    if true_vocab:
        argv += ["--true-vocab-size", str(true_vocab)]
    return argv


SYNTH_CASES = [
    # name, legacy (tp, pp), torch_dist layouts, saver impl, true vocab
    ("qkln_bias", (2, 2), [(2, 2), (1, 4), (2, 1)], "local", 250),
    ("qkln_bias", (2, 1), [(2, 4)], "transformer_engine", None),
    ("tied_contiguous", (2, 2), [(2, 2), (1, 1), (2, 4)], "local", 190),
    ("tied_contiguous", (1, 2), [(2, 1)], "transformer_engine", None),
    ("layernorm_gelu", (2, 1), [(4, 2), (1, 1)], "local", None),
]


@pytest.mark.parametrize("name,legacy_layout,layouts,impl,true_vocab", SYNTH_CASES,
                         ids=[f"{c[0]}-{c[3]}-tp{c[1][0]}pp{c[1][1]}" for c in SYNTH_CASES])
def test_synthetic_same_tensors_as_legacy(name, legacy_layout, layouts, impl, true_vocab, sources, tmp_path):
    src = sources[name]
    legacy = str(tmp_path / "legacy")
    convert(_argv(name, src, legacy, *legacy_layout, impl, "torch", true_vocab))
    for tp, pp in layouts:
        out = str(tmp_path / f"dist_tp{tp}_pp{pp}")
        convert(_argv(name, src, out, tp, pp, impl, "torch_dist", true_vocab))
        md = assert_same_model(legacy, out, true_vocab)
        assert paint_coverage(md) == []
        final_layout(out, tp * pp)


def test_te_names_carry_te_extra_state(sources, tmp_path):
    """TE spec: core_attention and q/k layernorm objects, uint8 tensor values; local: None values."""
    src = sources["qkln_bias"]
    out = str(tmp_path / "te")
    convert(_argv("qkln_bias", src, out, 2, 2, "transformer_engine", "torch_dist"))
    _, _, objects, _ = dist_globals(out)
    assert isinstance(objects["decoder.layers.self_attention.core_attention._extra_state/shard_3_4"], torch.Tensor)
    assert objects["decoder.layers.self_attention.q_layernorm._extra_state/shard_0_4"].tolist() == \
        list(pickle.dumps({}, protocol=4))
    assert objects["decoder.layers.mlp.linear_fc2._extra_state/shard_2_4"].numel() == 0
    assert objects["decoder.final_layernorm._extra_state/shard_0_1"].dtype == torch.uint8
    out = str(tmp_path / "local")
    convert(_argv("qkln_bias", src, out, 2, 2, "local", "torch_dist"))
    _, _, objects, _ = dist_globals(out)
    assert objects["decoder.layers.mlp.linear_fc2._extra_state/shard_2_4"] is None
    assert not any("core_attention" in k for k in objects)


TRUTH = os.path.join(os.path.dirname(__file__), "data", "megatron_truth")
MOE = os.path.join(os.path.dirname(__file__), "data", "fixtures", "mindformers_moe")


#: truth case -> tests/moe_fixtures.py variant its model is (None: the fixture as shipped)
_TRUTH_VARIANTS = {"deepseek_v3_tp2_pp2_ep2": "ds4", "deepseek_v3_noqlora_tp2_pp2_ep2": "ds4_noqlora",
                   "deepseek_v3_mtp1_tp2_pp2_ep2": "ds4_mtp1", "qwen3_moe_list_freq_tp1_ep2": "q3_dense0"}


def _truth_source(case: str, d: str) -> list:
    """Write the model of Megatron truth dump ``case``; return the input flags for it."""
    if case.startswith("dense_"):
        spec = synth.ModelSpec(layers=4 if "qwen2" in case else 2, hidden=32, ffn=48, heads=4, groups=2, head_dim=8,
                               vocab=128, qkv_bias="qwen2" in case, qk_layernorm="qkln" in case, seed=3)
        synth.write_checkpoint(d, spec)
        return ["--load-dir", d, "--num-attention-heads", "4", "--num-query-groups", "2", "--kv-channels", "8",
                "--true-vocab-size", "128"]
    variant = _TRUTH_VARIANTS.get(case)
    if variant is not None:
        import moe_fixtures

        v = moe_fixtures.make_variant(variant, d)
        load, config = v["load"], v["config"]
    else:
        model = "qwen3_moe" if case.startswith("qwen3") else "deepseek_v3"
        load = os.path.join(MOE, model, f"mf_{model}_model.safetensors")
        config = os.path.join(MOE, model, "hf", "config.json")
    return ["--load-dir", load, "--model-config", config, "--true-vocab-size", "64"]


def _truth_cases():
    """Every real-Megatron dump shipped in tests/data, but the local spec's grouped gemm: that is Megatron's
    legacy GroupedMLP, which streamconv refuses to write (tests/test_moe_refusals.py checks the refusal)."""
    return sorted(n[:-5] for n in os.listdir(TRUTH) if n.endswith(".json") and not n.startswith("te_spec")
                  and "grouped_gemm" not in n)


@pytest.mark.parametrize("case", _truth_cases())
def test_same_shards_as_megatron_saves(case, tmp_path):
    """Keys, global shapes, chunk offsets/sizes and object keys equal the main replicas real Megatron r0.12
    saved for the same model and layout (tests/data/megatron_truth, made by scripts/megatron_truth.py).

    Megatron's RNG and rerun-state objects aside (a conversion has neither).
    """
    t = json.load(open(os.path.join(TRUTH, case + ".json")))
    argv = t["megatron_argv"].split()

    def flag(name, default=None):
        return argv[argv.index(name) + 1] if name in argv else default

    flags = _truth_source(case, str(tmp_path / "src"))
    flags += ["--save-dir", str(tmp_path / "out"), "--saver-transformer-impl", flag("--transformer-impl"),
              "--ckpt-format", "torch_dist", "--target-tensor-parallel-size", flag("--tensor-model-parallel-size", "1"),
              "--target-pipeline-parallel-size", flag("--pipeline-model-parallel-size", "1")]
    for theirs, ours in (("--expert-model-parallel-size", "--target-expert-parallel-size"),
                         ("--expert-tensor-parallel-size", "--target-expert-tensor-parallel-size"),
                         ("--decoder-first-pipeline-num-layers", "--decoder-first-pipeline-num-layers"),
                         ("--decoder-last-pipeline-num-layers", "--decoder-last-pipeline-num-layers")):
        if theirs in argv:
            flags += [ours, flag(theirs)]
    convert(flags)
    want_t, want_o = {}, set()
    for r in t["ranks"]:
        for x in r["dist"]["tensors"]:
            if x["main"]:
                assert x["flattened_range"] is None
                chunk = (tuple(x["global_offset"]), (1,) * x["prepend_axis_num"] + tuple(x["local_shape"]))
                shape, chunks = want_t.setdefault(x["key"], (tuple(x["global_shape"]), set()))
                assert shape == tuple(x["global_shape"]) and chunk not in chunks
                chunks.add(chunk)
        want_o |= {x["unique_key"] for x in r["dist"]["objects"] if x["main"]}
    want_o = {k for k in want_o if not k.startswith(("rng_state/", "rerun_state_machine_state/"))}
    md = FileSystemReader(str(tmp_path / "out" / ITER)).read_metadata()
    got_t, got_o = {}, set()
    for k, m in md.state_dict_metadata.items():
        if isinstance(m, TensorStorageMetadata):
            got_t[k] = (tuple(m.size), {(tuple(c.offsets), tuple(c.sizes)) for c in m.chunks})
        else:
            got_o.add(k)
    assert sorted(set(got_t) ^ set(want_t)) == []
    for k in want_t:
        assert got_t[k] == want_t[k], k
    assert sorted(got_o ^ want_o) == []


# -- (1) MoE and MLA: the mindformers fixtures against the Hugging Face models they were made from ------------

def _hf(model: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(MOE, model, "hf", "model.safetensors"))


def _padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Megatron's vocab padding: missing rows repeat the last row (FORMAT.md §2)."""
    return torch.cat([t, t[-1:].expand(rows - t.shape[0], -1)]) if rows > t.shape[0] else t[:rows]


def hf_globals(model: str, padded: int) -> dict:
    """The torch_dist global tensors (local spec) written out by hand from the HF model (FORMAT.md §6, §7)."""
    hf, cfg = _hf(model), json.load(open(os.path.join(MOE, model, "hf", "config.json")))
    bf = {k: (v if "e_score_correction_bias" in k else v.to(torch.bfloat16)) for k, v in hf.items()}
    out = {"embedding.word_embeddings.weight": _padded(bf["model.embed_tokens.weight"], padded),
           "output_layer.weight": _padded(bf["lm_head.weight"], padded),
           "decoder.final_layernorm.weight": bf["model.norm.weight"]}
    L, E = cfg["num_hidden_layers"], cfg.get("num_experts") or cfg.get("n_routed_experts")
    per_layer = {}
    for i in range(L):
        h = f"model.layers.{i}."
        d = {}
        if model == "qwen3_moe":
            nq, ng, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
            q = bf[h + "self_attn.q_proj.weight"].view(ng, nq // ng * hd, -1)
            k, v = (bf[h + f"self_attn.{x}_proj.weight"].view(ng, hd, -1) for x in "kv")
            d["self_attention.linear_qkv.weight"] = torch.cat([q, k, v], 1).reshape(-1, q.shape[-1])
            d["self_attention.linear_qkv.layer_norm_weight"] = bf[h + "input_layernorm.weight"]
            d["self_attention.linear_proj.weight"] = bf[h + "self_attn.o_proj.weight"]
            d["self_attention.q_layernorm.weight"] = bf[h + "self_attn.q_norm.weight"]
            d["self_attention.k_layernorm.weight"] = bf[h + "self_attn.k_norm.weight"]
            d["mlp.linear_fc1.layer_norm_weight"] = bf[h + "post_attention_layernorm.weight"]  # local keys map
        else:  # MLA: each Megatron weight is its HF tensor; the local spec keeps the norms' own names
            for ours, theirs in (("input_layernorm", "input_layernorm"), ("pre_mlp_layernorm", "post_attention_layernorm"),
                                 ("self_attention.linear_q_down_proj", "self_attn.q_a_proj"),
                                 ("self_attention.q_layernorm", "self_attn.q_a_layernorm"),
                                 ("self_attention.linear_q_up_proj", "self_attn.q_b_proj"),
                                 ("self_attention.linear_kv_down_proj", "self_attn.kv_a_proj_with_mqa"),
                                 ("self_attention.kv_layernorm", "self_attn.kv_a_layernorm"),
                                 ("self_attention.linear_kv_up_proj", "self_attn.kv_b_proj"),
                                 ("self_attention.linear_proj", "self_attn.o_proj")):
                d[f"{ours}.weight"] = bf[f"{h}{theirs}.weight"]
        if h + "mlp.gate.weight" in bf:
            d["mlp.router.weight"] = bf[h + "mlp.gate.weight"]
            if h + "mlp.gate.e_score_correction_bias" in bf:
                d["mlp.router.expert_bias"] = bf[h + "mlp.gate.e_score_correction_bias"]  # fp32
            x = h + "mlp.experts.{}.{}_proj.weight"
            d["mlp.experts.experts.linear_fc1.weight"] = torch.stack(
                [torch.cat([bf[x.format(e, "gate")], bf[x.format(e, "up")]]) for e in range(E)])
            d["mlp.experts.experts.linear_fc2.weight"] = torch.stack([bf[x.format(e, "down")] for e in range(E)])
            if h + "mlp.shared_experts.gate_proj.weight" in bf:
                sh = h + "mlp.shared_experts."
                d["mlp.shared_experts.linear_fc1.weight"] = torch.cat([bf[sh + "gate_proj.weight"], bf[sh + "up_proj.weight"]])
                d["mlp.shared_experts.linear_fc2.weight"] = bf[sh + "down_proj.weight"]
        else:
            d["mlp.linear_fc1.weight"] = torch.cat([bf[h + "mlp.gate_proj.weight"], bf[h + "mlp.up_proj.weight"]])
            d["mlp.linear_fc2.weight"] = bf[h + "mlp.down_proj.weight"]
        per_layer[i] = d
    if model == "qwen3_moe":  # every layer MoE: Megatron stacks them (--moe-layer-freq 1)
        for name in per_layer[0]:
            out[f"decoder.layers.{name}"] = torch.stack([per_layer[i][name] for i in range(L)])
    else:  # dense then MoE: per-layer keys
        out.update({f"decoder.layers.{i}.{n}": t for i, d in per_layer.items() for n, t in d.items()})
    return out


MOE_CASES = [
    # model, TP, PP, EP, ETP, extra flags
    ("qwen3_moe", 2, 1, 2, None, []),
    ("qwen3_moe", 2, 2, 2, 1, []),
    ("qwen3_moe", 1, 1, 4, None, []),
    ("deepseek_v3", 2, 1, 2, None, []),
    ("deepseek_v3", 1, 2, 4, None, ["--decoder-first-pipeline-num-layers", "1"]),
    ("deepseek_v3", 2, 2, 2, 1, ["--decoder-first-pipeline-num-layers", "2"]),
]


@pytest.mark.parametrize("model,tp,pp,ep,etp,extra", MOE_CASES,
                         ids=[f"{c[0]}-tp{c[1]}pp{c[2]}ep{c[3]}etp{c[4]}" for c in MOE_CASES])
def test_moe_and_mla_same_tensors_as_hugging_face(model, tp, pp, ep, etp, extra, tmp_path):
    out = str(tmp_path / "out")
    flags = ["--load-dir", os.path.join(MOE, model, f"mf_{model}_model.safetensors"),
             "--model-config", os.path.join(MOE, model, "hf", "config.json"), "--save-dir", out,
             "--target-tensor-parallel-size", str(tp), "--target-pipeline-parallel-size", str(pp),
             "--target-expert-parallel-size", str(ep), "--saver-transformer-impl", "local",
             "--ckpt-format", "torch_dist", "--true-vocab-size", "64", *extra]
    if etp is not None:
        flags += ["--target-expert-tensor-parallel-size", str(etp)]
    convert(flags)
    _, tensors, objects, md = dist_globals(out)
    want = hf_globals(model, -(-64 // (128 * tp)) * 128 * tp)
    assert sorted(set(tensors) ^ set(want)) == []
    for k, t in want.items():
        assert tensors[k].dtype == t.dtype and tensors[k].shape == t.shape, (k, tensors[k].shape, t.shape)
        assert torch.equal(_bits(tensors[k]), _bits(t)), k
    assert paint_coverage(md) == []
    assert all(v is None for v in objects.values())  # local spec: every _extra_state is None
    assert cli_main(["verify", "--load-dir", flags[1], "--save-dir", out, "--quiet"]) == 0


# -- (2) resume, verify ------------------------------------------------------------------------------

RESUME_SPEC = synth.ModelSpec(layers=8, hidden=512, ffn=1024, heads=8, groups=4, vocab=4000, files=3)
RESUME_FLAGS = ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "4",
                "--num-attention-heads", "8", "--saver-transformer-impl", "local", "--quiet", "--ckpt-format", "torch_dist"]
#: the killed runs are separate processes with a tight budget (small blocks: more moments to be killed in);
#: the budget is not part of a run's identity, and in this process (pytest, torch loaded) it would be too tight
SUBPROCESS_BUDGET = ["--max-memory", "400MB"]


@pytest.fixture(scope="module")
def resume_source(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("rsrc"))
    synth.write_checkpoint(d, RESUME_SPEC)
    return d


@pytest.fixture(scope="module")
def resume_reference(resume_source, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("rref") / "out")
    convert(["--load-dir", resume_source, "--save-dir", out, *RESUME_FLAGS])
    return out


def _start(source, save, extra=()):
    return subprocess.Popen([sys.executable, "-m", "streamconv", "convert", "--load-dir", source, "--save-dir", save,
                             *RESUME_FLAGS, *SUBPROCESS_BUDGET, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=REPO))


def _done(save):
    d = os.path.join(save, ".streamconv", "done")
    return len(os.listdir(d)) if os.path.isdir(d) else 0


def _partial(save):
    it = os.path.join(save, ITER)
    return os.path.isdir(it) and any(n.endswith(".streamconv-partial") for n in os.listdir(it))


@pytest.mark.parametrize("when", ["mid_file", "after_two_files"])
def test_kill_then_resume_is_byte_identical(when, resume_source, resume_reference, tmp_path):
    save = str(tmp_path / "out")
    cond = (lambda: _partial(save)) if when == "mid_file" else (lambda: _done(save) >= 2)
    p = _start(resume_source, save)
    if not kill_when(p, cond):
        pytest.skip("the run finished before the kill point")
    files = tree(save)
    assert "latest_checkpointed_iteration.txt" not in files
    assert f"{ITER}/metadata.json" not in files and f"{ITER}/.metadata" not in files
    assert cli_main(["convert", "--load-dir", resume_source, "--save-dir", save, *RESUME_FLAGS]) == 2  # needs --resume
    convert(["--load-dir", resume_source, "--save-dir", save, *RESUME_FLAGS, "--resume"])
    assert file_bytes(save) == file_bytes(resume_reference)


def test_two_torchrun_workers_write_what_one_process_writes(resume_source, resume_reference, tmp_path):
    """Scale-out (run/distributed.py) is format-agnostic: the data files are dealt to workers, the coordinator
    writes common.pt, .metadata, metadata.json and the tracker; the bytes equal one process's."""
    save = str(tmp_path / "out")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "streamconv", "convert", "--load-dir", resume_source, "--save-dir", save, *RESUME_FLAGS,
                        *SUBPROCESS_BUDGET], capture_output=True, text=True, timeout=600, cwd=str(tmp_path),
                       env=dict(os.environ, PYTHONPATH=REPO))
    assert p.returncode == 0, p.stderr[-2000:]
    assert file_bytes(save) == file_bytes(resume_reference)


def test_rerun_is_byte_identical(resume_source, resume_reference, tmp_path):
    save = str(tmp_path / "again")
    convert(["--load-dir", resume_source, "--save-dir", save, *RESUME_FLAGS])
    assert file_bytes(save) == file_bytes(resume_reference)


def test_resume_rewrites_a_damaged_finished_file(resume_source, resume_reference, tmp_path):
    save = str(tmp_path / "out")
    p = _start(resume_source, save)
    if not kill_when(p, lambda: _done(save) >= 3):
        pytest.skip("the run finished before the kill point")
    done = [f for f in tree(save) if f.endswith(".distcp")]
    victim = os.path.join(save, done[0])
    with open(victim, "r+b") as f:
        f.seek(os.path.getsize(victim) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    convert(["--load-dir", resume_source, "--save-dir", save, *RESUME_FLAGS, "--resume"])
    assert file_bytes(save) == file_bytes(resume_reference)


@pytest.fixture()
def verified_copy(resume_source, resume_reference, tmp_path):
    save = str(tmp_path / "copy")
    shutil.copytree(resume_reference, save)
    return save


def _verify(source, save):
    from streamconv.run.verify import verify

    return verify(source, save)


def test_verify_passes_and_reads_only_its_metadata(resume_source, verified_copy):
    r = _verify(resume_source, verified_copy)
    assert r.ok, r.problems
    assert r.files_checked == 8 and r.tensors_checked > 0


def _items(save):
    md = FileSystemReader(os.path.join(save, ITER)).read_metadata()
    return md


def test_verify_finds_a_flipped_byte(resume_source, verified_copy):
    md = _items(verified_copy)
    idx, info = next((i, s) for i, s in md.storage_data.items()
                     if i.fqn == "decoder.layers.self_attention.linear_qkv.weight" and tuple(i.offset)[0] == 5)
    path = os.path.join(verified_copy, ITER, info.relative_path)
    at = info.offset + info.length - 2000  # inside the chunk's data (the tail is zip bookkeeping)
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x01]))
    r = _verify(resume_source, verified_copy)
    assert not r.ok
    assert any(info.relative_path in w and "linear_qkv.weight at [5," in m and "bytes differ" in m
               for w, m in r.problems), r.problems


def test_verify_finds_a_missing_item(resume_source, verified_copy):
    """.metadata rewritten without one chunk (as torch would pickle it): a hole Megatron would load as garbage."""
    p = os.path.join(verified_copy, ITER, ".metadata")
    md = pickle.load(open(p, "rb"))
    key = "decoder.layers.mlp.linear_fc1.weight"
    gone = md.state_dict_metadata[key].chunks.pop(3)
    del md.storage_data[next(i for i in md.storage_data if i.fqn == key and tuple(i.offset) == tuple(gone.offsets))]
    with open(p, "wb") as f:
        pickle.dump(md, f)
    r = _verify(resume_source, verified_copy)
    text = "\n".join(f"{w}: {m}" for w, m in r.problems)
    assert "a region was never written" in text and key in text
    assert f"{key} at {list(gone.offsets)}: not in .metadata" in text


def test_verify_finds_a_missing_data_file(resume_source, verified_copy):
    os.remove(os.path.join(verified_copy, ITER, "__3_0.distcp"))
    r = _verify(resume_source, verified_copy)
    assert (f"{ITER}/__3_0.distcp", "missing") in r.problems


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {_Boom.marker}",))


def test_verify_refuses_a_hostile_metadata(resume_source, verified_copy, tmp_path):
    _Boom.marker = str(tmp_path / "pwned")
    with open(os.path.join(verified_copy, ITER, ".metadata"), "wb") as f:
        pickle.dump({"x": _Boom()}, f)
    r = _verify(resume_source, verified_copy)
    assert not r.ok
    assert not os.path.exists(_Boom.marker)
    text = "\n".join(f"{w}: {m}" for w, m in r.problems)
    assert "refusing to unpickle posix.system" in text


def test_verify_cli_on_torch_dist(resume_source, verified_copy):
    assert cli_main(["verify", "--load-dir", resume_source, "--save-dir", verified_copy, "--quiet"]) == 0


def test_plan_prints_exact_sizes(resume_source, resume_reference, capsys):
    assert cli_main(["plan", "--load-dir", resume_source, "--save-dir", "/nonexistent/x", *RESUME_FLAGS]) == 0
    text = capsys.readouterr().out
    for rel in tree(resume_reference):
        if rel.endswith(".distcp"):
            assert f"{rel}  {os.path.getsize(os.path.join(resume_reference, rel))} bytes" in text


# -- (3) real Megatron -------------------------------------------------------------------------------

MCORE_PY = "/work/venv-mcore/bin/python"


@pytest.mark.skipif(not os.path.exists(MCORE_PY), reason="no megatron-core venv at /work/venv-mcore")
@pytest.mark.parametrize("case,load", [
    ("gqa_interleaved_bias_qkln", (1, 2)),  # chunked TP2 PP2, loaded TP1 PP2
    ("concat_contiguous_tied", (2, 1)),  # tied embeddings: chunked PP2, loaded PP1
    ("tp1pp1_tied_mqa", (1, 2)),  # chunked TP1 PP1, loaded PP2 (the last stage reads the embedding)
    pytest.param("layernorm_gelu", (4, 1), marks=pytest.mark.slow),  # chunked TP2 PP2, loaded TP4
    pytest.param("wrong_fc1_layout", (1, 2), marks=pytest.mark.slow),  # negative control: must NOT match
])
def test_real_megatron_loads_at_another_layout(case, load, tmp_path):
    """Chunked at the case's TP x PP, loaded by Megatron's dist_checkpointing at another; logits = source's."""
    p = subprocess.run([MCORE_PY, os.path.join(REPO, "scripts", "check_megatron_load.py"), "--cases", case,
                        "--ckpt-format", "torch_dist", "--load-tp", str(load[0]), "--load-pp", str(load[1]),
                        "--work", str(tmp_path), "--streamconv-python", sys.executable],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [x for x in p.stdout.splitlines() if "Megatron logits vs source reference" in x]
    assert len(lines) == 1, p.stdout
    assert ("-> MISMATCH" if case.startswith("wrong_") else "-> MATCH") in lines[0], p.stdout
    assert f"loaded at TP{load[0]} PP{load[1]}" in lines[0]


# -- experts: EP / ETP chunking, end to end through the format and the stream --------------------------

def _moe_run(tmp_path, sizes, E=4, H=8, F=6, L=2, freq=1, ranks=None):
    """Stream a hand-made 2-layer MoE stage layout (rules as the MoE layout will use them) into torch_dist.

    The layout (keys, rules) is written here by hand; what is under test is the sharded view, the
    format's items, files and .metadata, and the stream, at EP / ETP / PP splits.
    """
    from safetensors.torch import save_file

    from streamconv.engine.stream import Streamer
    from streamconv.formats.base import PlanInput, RankEntries, StagePlan
    from streamconv.formats.torch_dist import FORMAT
    from streamconv.megatron import rules as R
    from streamconv.megatron.entries import OutDtype, none, resolve, tensor
    from streamconv.megatron.parallel import Axis, Rank, stage_ranks
    from streamconv.sources.header import read_header
    from streamconv.sources.tensor import SourceTensor

    g = torch.Generator().manual_seed(5)
    src = {}
    for i in range(L):
        p = f"decoder.layers.{i}."
        src[p + "pre_mlp_layernorm.weight"] = torch.randn(H, generator=g)
        src[p + "mlp.router.weight"] = torch.randn(E, H, generator=g)
        src[p + "mlp.router.expert_bias"] = torch.randn(E, generator=g)
        src[p + "mlp.experts.weight1"] = torch.randn(E * H, 2 * F, generator=g)  # per expert [in, gate|up]
        src[p + "mlp.experts.weight2"] = torch.randn(E * F, H, generator=g)  # per expert [in, out]
        src[p + "mlp.shared_experts.linear_fc2.weight"] = torch.randn(H, 2 * F, generator=g)  # dense, TP columns
    path = str(tmp_path / "moe.safetensors")
    save_file(src, path)
    hdr = read_header(path)
    S = {k: SourceTensor(k, k, path, hdr.tensors[k]) for k in src}
    per = L // sizes.pp
    stages = []
    for pp in range(sizes.pp):
        specs = []
        for j in range(per):
            i = pp * per + j

            def s(x):
                return S[f"decoder.layers.{i}.{x}"]

            k = f"decoder.layers.{j}."
            specs += [tensor(k + "pre_mlp_layernorm.weight", R.Whole(s("pre_mlp_layernorm.weight")), 1),
                      tensor(k + "mlp.router.weight", R.Whole(s("mlp.router.weight")), 2),
                      tensor(k + "mlp.router.expert_bias", R.Whole(s("mlp.router.expert_bias")), 1, OutDtype.F32),
                      tensor(k + "mlp.shared_experts.linear_fc2.weight",
                             R.Chunk(s("mlp.shared_experts.linear_fc2.weight"), dim=1), 2)]
            for e in range(E // sizes.ep):
                le = f"{k}mlp.experts.local_experts.{e}."
                specs += [
                    tensor(le + "linear_fc1.weight", R.GatedFused(R.ExpertRef(s("mlp.experts.weight1"), E, e, True),
                                                                  F, "concat", Axis.ETP), 2),
                    none(le + "linear_fc1._extra_state"),
                    tensor(le + "linear_fc2.weight", R.Chunk(R.ExpertRef(s("mlp.experts.weight2"), E, e, True),
                                                             Axis.ETP, dim=1), 2),
                    none(le + "linear_fc2._extra_state")]
        coords = (ranks or stage_ranks)(sizes, pp)
        ranks_ = [RankEntries(c, [resolve(sp, Rank(c, sizes)) for sp in specs]) for c in coords]
        stages.append(StagePlan(pp, range(pp * per, (pp + 1) * per), ranks_))
    args = argparse.Namespace(num_layers=L, transformer_impl="local", untie_embeddings_and_output_weights=True,
                              moe_layer_freq=freq, num_experts=E)
    fplan = FORMAT.plan(PlanInput(stages, sizes, args, ["moe"]))
    out = tmp_path / "out"
    streamer = Streamer(1 << 16)
    try:
        for group in fplan.groups:
            fds, writers = [], {}
            for n, f in enumerate(group.files):
                os.makedirs(out / ITER, exist_ok=True)
                fd = os.open(out / f.relpath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                fds.append(fd)
                writers[n] = FORMAT.open_writer(f, fd)
            streamer.run_group(group, writers)
            for n, f in enumerate(group.files):
                writers[n].finish()
                os.close(fds[n])
    finally:
        streamer.close()
    for rel, data in fplan.final_files:
        (out / rel).write_bytes(data)
    return src, fplan, str(out)


@pytest.mark.parametrize("tp,pp,ep,etp,freq", [(2, 1, 2, None, 1), (2, 2, 4, 1, 1), (1, 1, 2, None, [1, 1]),
                                                (2, 1, 2, 1, 1), (1, 2, 4, None, 1), (4, 1, 2, 2, [1, 1])])
def test_experts_chunked_by_ep_and_etp_reassemble(tp, pp, ep, etp, freq, tmp_path):
    from streamconv.megatron.parallel import ParallelSizes

    E, H, F, L = 4, 8, 6, 2
    sizes = ParallelSizes(tp=tp, pp=pp, ep=ep, etp=etp)
    src, fplan, out = _moe_run(tmp_path, sizes, E, H, F, L, freq)
    _, tensors, objects, md = dist_globals(out)
    assert paint_coverage(md) == []

    def bf(t):
        return t.to(torch.bfloat16)

    def layer_key(i, name):
        return f"decoder.layers.{name}" if freq == 1 else f"decoder.layers.{i}.{name}"

    # by hand: expert e of layer i is block e of the stack, transposed to Megatron's [out, in]
    want = {}
    for i in range(L):
        p = f"decoder.layers.{i}."
        fc1 = torch.stack([src[p + "mlp.experts.weight1"].reshape(E, H, 2 * F)[e].T for e in range(E)])
        fc2 = torch.stack([src[p + "mlp.experts.weight2"].reshape(E, F, H)[e].T for e in range(E)])
        want.setdefault("mlp.linear_fc1.layer_norm_weight", []).append(bf(src[p + "pre_mlp_layernorm.weight"]))
        want.setdefault("mlp.router.weight", []).append(bf(src[p + "mlp.router.weight"]))
        want.setdefault("mlp.router.expert_bias", []).append(src[p + "mlp.router.expert_bias"])  # stays fp32
        want.setdefault("mlp.experts.experts.linear_fc1.weight", []).append(bf(fc1))
        want.setdefault("mlp.experts.experts.linear_fc2.weight", []).append(bf(fc2))
        want.setdefault("mlp.shared_experts.linear_fc2.weight", []).append(bf(src[p + "mlp.shared_experts.linear_fc2.weight"]))
    expect = {}
    for name, per_layer in want.items():
        if freq == 1:
            expect[f"decoder.layers.{name}"] = torch.stack(per_layer)
        else:
            for i, t in enumerate(per_layer):
                expect[f"decoder.layers.{i}.{name}"] = t
    assert set(tensors) == set(expect)
    for k, t in expect.items():
        assert tensors[k].dtype == t.dtype and torch.equal(_bits(tensors[k]), _bits(t)), k
    shard = (lambda i, e: f"shard_{i}.{e}_{L}.{E}") if freq == 1 else (lambda i, e: f"shard_{e}_{E}")
    want_objects = {f"{layer_key(i, f'mlp.experts.experts.{m}._extra_state')}/{shard(i, e)}"
                    for i in range(L) for e in range(E) for m in ("linear_fc1", "linear_fc2")}
    assert set(objects) == want_objects and all(v is None for v in objects.values())
    # one file per writing rank with anything to write; with EP > 1 the dense copies live on EP rank 0 only
    names = sorted(os.path.basename(f.relpath) for f in fplan.files)
    assert len(names) == len(set(names))


def _all_tp_ranks_but_one(sizes, pp):
    from streamconv.megatron.parallel import stage_ranks

    return stage_ranks(sizes, pp)[:-1]


def test_a_writer_set_that_misses_dense_shards_is_refused(tmp_path):
    """If the ranks handed to the format ever missed a dense shard (a layout whose legacy writers do not
    hold every TP shard), the plan's coverage check refuses instead of writing a hole."""
    from streamconv.core.errors import FlagError
    from streamconv.megatron.parallel import ParallelSizes

    with pytest.raises(FlagError, match="leaves the checkpoint incomplete.*never written"):
        _moe_run(tmp_path, ParallelSizes(tp=2, pp=1, ep=2), ranks=_all_tp_ranks_but_one)


MLM = os.environ.get("MEGATRON_LM")


@pytest.mark.skipif(not (os.path.exists(MCORE_PY) and MLM and os.path.isdir(os.path.join(MLM or "", "megatron", "training"))),
                    reason="needs /work/venv-mcore and $MEGATRON_LM (a Megatron-LM core_r0.12.0 source tree)")
@pytest.mark.parametrize("model,chunked,load", [
    ("qwen2", ["--target-tensor-parallel-size", "2"], ["--tp", "1", "--pp", "2"]),
    ("qwen3_moe", ["--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2"], ["--tp", "1", "--ep", "4"]),
    ("qwen3_moe", ["--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2",
                   "--target-expert-tensor-parallel-size", "1"], ["--tp", "2", "--ep", "2"]),
    ("deepseek_v3", ["--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2"],
     ["--tp", "1", "--pp", "2", "--ep", "2", "--first-stage-layers", "1"]),
    ("deepseek_v3", ["--target-pipeline-parallel-size", "2", "--decoder-first-pipeline-num-layers", "1",
                     "--target-expert-parallel-size", "4"], ["--tp", "2", "--ep", "1"]),
])
def test_real_megatron_load_checkpoint_moe_at_another_layout(model, chunked, load, tmp_path):
    """Megatron's own load_checkpoint (raise_all strictness) loads the output (dense, MoE, MLA) at another
    TP/PP/EP; logits equal the Hugging Face model's (scripts/check_megatron_moe.py)."""
    out = str(tmp_path / "out")
    if model == "qwen2":  # dense: mindformers' legacy-named checkpoint made from the HF Qwen2 beside it
        hf = os.path.join(os.path.dirname(MOE), "hf_pairs", "qwen2")
        inp = ["--load-dir", os.path.join(hf, "mindformers_legacy_split.safetensors"), "--true-vocab-size", "128"]
    else:
        hf = os.path.join(MOE, model, "hf")
        inp = ["--load-dir", os.path.join(MOE, model, f"mf_{model}_model.safetensors"), "--true-vocab-size", "64"]
    convert([*inp, "--model-config", os.path.join(hf, "config.json"), "--save-dir", out,
             "--saver-transformer-impl", "local", "--ckpt-format", "torch_dist", *chunked])
    p = subprocess.run([MCORE_PY, os.path.join(REPO, "scripts", "check_megatron_moe.py"), "--save-dir", out,
                        "--hf-dir", hf, *load], capture_output=True, text=True,
                       timeout=900, env=dict(os.environ, MEGATRON_LM=MLM))
    assert p.returncode == 0 and "-> PASS" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
