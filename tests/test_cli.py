"""The command line: the official flags, ``plan`` (headers only, exact sizes), summaries."""

from __future__ import annotations

import argparse
import json
import os
import re

import pytest
import torch

import synth
from helpers import run_cli, tree

SPEC = synth.ModelSpec(layers=2, hidden=64, ffn=96, heads=4, groups=2, vocab=300, tied=True)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("src"))
    synth.write_checkpoint(d, SPEC)
    return d


OFFICIAL = ["--megatron-path", "/opt/Megatron-LM", "--model-type", "GPT", "--loader", "core_mf", "--saver", "core",
            "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
            "--loader-transformer-impl", "local", "--saver-transformer-impl", "local",
            "--position-embedding-type", "rope", "--true-vocab-size", "300", "--padded-vocab-size", "300",
            "--num-layers", "2", "--seq-length", "4096", "--hidden-size", "64", "--ffn-hidden-size", "96",
            "--num-attention-heads", "4", "--num-query-groups", "2", "--normalization", "RMSNorm", "--swiglu",
            "--ms2torch-ckpt-path", "./ms2pt_checkpoint"]


def test_plan_writes_nothing_and_predicts_exact_sizes(source, tmp_path):
    save = str(tmp_path / "out")
    p = run_cli(["plan", "--load-dir", source, "--save-dir", save, *OFFICIAL])
    assert not os.path.exists(save)
    assert not os.path.exists("./ms2pt_checkpoint")
    sizes = {rel: int(n) for rel, n in re.findall(r"(iter_0000001/\S+)\s+(\d+) bytes", p.stdout)}
    assert len(sizes) == 4
    assert "predicted peak" in p.stdout and "fc1 layout 'interleaved'" in p.stdout
    # exact byte sizes: compare with the json summary of a real run
    summary = tmp_path / "s.json"
    run_cli(["--load-dir", source, "--save-dir", save, *OFFICIAL, "--quiet", "--json-summary", str(summary)])
    s = json.load(open(summary))
    assert sizes == {rel: os.path.getsize(os.path.join(save, rel)) for rel in sizes}
    assert s["output_bytes"] == sum(os.path.getsize(os.path.join(save, f)) for f in tree(save)) - 1
    assert s["peak_rss_bytes"] <= s["budget_bytes"]
    assert s["peak_rss_bytes"] <= 1.10 * s["predicted_peak_bytes"]


def test_official_command_line_works_unchanged(source, tmp_path):
    save = str(tmp_path / "out")
    p = run_cli(["--load-dir", source, "--save-dir", save, *OFFICIAL])
    assert "--megatron-path is not needed" in p.stderr
    assert "--ms2torch-ckpt-path ignored" in p.stderr
    assert "done in" in p.stdout
    assert not os.path.exists("ms2pt_checkpoint")
    sd = torch.load(os.path.join(save, "iter_0000001/mp_rank_01_001/model_optim_rng.pt"), weights_only=False)
    a = sd["args"]
    assert a.seq_length == 4096 and a.max_position_embeddings == 4096
    assert a.padded_vocab_size == 512 and a.group_query_attention is True and a.num_query_groups == 2
    # tied embeddings with PP > 1: the last stage holds the padded embedding shard
    first = torch.load(os.path.join(save, "iter_0000001/mp_rank_01_000/model_optim_rng.pt"), weights_only=False)
    assert torch.equal(sd["model"]["output_layer.weight"], first["model"]["embedding.word_embeddings.weight"])


def test_weights_only_load_of_a_real_rank_file(source, tmp_path):
    save = str(tmp_path / "out")
    run_cli(["convert", "--load-dir", source, "--save-dir", save, "--num-attention-heads", "4", "--quiet",
             "--saver-transformer-impl", "transformer_engine"])
    path = os.path.join(save, "iter_0000001/mp_rank_00/model_optim_rng.pt")
    with torch.serialization.safe_globals([argparse.Namespace]):
        sd = torch.load(path, weights_only=True)
    m = sd["model"]
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in m
    assert "decoder.layers.0.input_layernorm.weight" not in m
    assert m["decoder.layers.0.self_attention.core_attention._extra_state"].numel() == 0
    assert sd["args"].transformer_impl == "transformer_engine"


def test_library_api_returns_summary(source, tmp_path):
    from streamconv import ConvertOptions, build_plan, convert, describe

    o = ConvertOptions(load_dir=source, save_dir=str(tmp_path / "o"), num_attention_heads=4)
    text = describe(build_plan(o))
    assert "mp_rank_00/model_optim_rng.pt" in text
    s = convert(o)
    assert s["files_written"] == ["iter_0000001/mp_rank_00/model_optim_rng.pt"]
    assert s["read_bytes"] > 0 and s["wall_seconds"] > 0


def test_library_call_gives_the_caller_its_torch_thread_count_back(source, tmp_path):
    """The stream converts on one torch thread; a program that calls convert() keeps its own setting."""
    from streamconv import ConvertOptions, convert, verify

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        o = ConvertOptions(load_dir=source, save_dir=str(tmp_path / "o"), num_attention_heads=4)
        convert(o)
        assert torch.get_num_threads() == 3
        assert not verify(source, o.save_dir).problems
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_transformer_engine_key_order(tmp_path):
    """TE spec order (Megatron's module registration order; TE LayerNormLinear registers its norm first)."""
    spec = synth.ModelSpec(layers=2, hidden=32, ffn=48, heads=4, groups=2, vocab=128, norm="LayerNorm",
                           bias=True, qk_layernorm=True, head_dim=8)
    src = str(tmp_path / "src")
    synth.write_checkpoint(src, spec)
    save = str(tmp_path / "out")
    run_cli(["convert", "--load-dir", src, "--save-dir", save, "--quiet", "--target-pipeline-parallel-size", "2",
             "--saver-transformer-impl", "transformer_engine"])
    m = torch.load(os.path.join(save, "iter_0000001/mp_rank_00_001/model_optim_rng.pt"), weights_only=False)["model"]
    layer = [
        "self_attention.core_attention._extra_state",
        "self_attention.linear_proj.weight", "self_attention.linear_proj.bias", "self_attention.linear_proj._extra_state",
        "self_attention.linear_qkv.layer_norm_weight", "self_attention.linear_qkv.layer_norm_bias",
        "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias", "self_attention.linear_qkv._extra_state",
        "self_attention.q_layernorm.weight", "self_attention.q_layernorm.bias", "self_attention.q_layernorm._extra_state",
        "self_attention.k_layernorm.weight", "self_attention.k_layernorm.bias", "self_attention.k_layernorm._extra_state",
        "mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1.layer_norm_bias",
        "mlp.linear_fc1.weight", "mlp.linear_fc1.bias", "mlp.linear_fc1._extra_state",
        "mlp.linear_fc2.weight", "mlp.linear_fc2.bias", "mlp.linear_fc2._extra_state",
    ]
    want = ["decoder.layers.0." + k for k in layer] + [
        "decoder.final_layernorm.weight", "decoder.final_layernorm.bias", "decoder.final_layernorm._extra_state",
        "output_layer.weight", "output_layer._extra_state"]
    assert list(m) == want
    empty = torch.empty(0, dtype=torch.uint8)
    for k in ("self_attention.core_attention._extra_state", "self_attention.linear_qkv._extra_state"):
        assert torch.equal(m["decoder.layers.0." + k], empty)
    pickled_empty_dict = torch.tensor([128, 4, 125, 148, 46], dtype=torch.uint8)  # pickle.dumps({}, protocol=4)
    assert torch.equal(m["decoder.layers.0.self_attention.q_layernorm._extra_state"], pickled_empty_dict)
    assert torch.equal(m["decoder.final_layernorm._extra_state"], pickled_empty_dict)
    assert m["output_layer._extra_state"] is None
    src_w = synth.tensor_values("decoder.layers.1.input_layernorm.weight", (32,), spec.seed, spec.scale)[:, 0]
    assert torch.equal(m["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"],
                       torch.from_numpy(src_w).to(torch.bfloat16))


def test_args_the_weights_cannot_tell(source, tmp_path):
    """Megatron's --use-checkpoint-args takes rope settings from the file: they must be settable."""
    save = str(tmp_path / "out")
    run_cli(["convert", "--load-dir", source, "--save-dir", save, "--num-attention-heads", "4", "--quiet",
             "--rotary-base", "1000000", "--attention-dropout", "0.0", "--hidden-dropout", "0.0"])
    a = torch.load(os.path.join(save, "iter_0000001/mp_rank_00/model_optim_rng.pt"), weights_only=False)["args"]
    assert a.rotary_base == 1000000 and type(a.rotary_base) is int
    assert a.attention_dropout == 0.0 and a.hidden_dropout == 0.0 and a.rotary_percent == 1.0
    p = run_cli(["verify", "--load-dir", source, "--save-dir", save])
    assert "OK" in p.stdout
