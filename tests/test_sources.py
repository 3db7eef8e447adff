"""Every way a MindSpore checkpoint sits on disk converts to the same output.

The reference is the conversion of the same weights from one plain file; the
layouts under test are built here by hand (unified directory with its
hyper_param trap, HF-style index, mindformers' iteration output, a single file
given directly). Real MindSpore-written files are checked value by value.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as np_load, save_file as np_save

import synth
from helpers import FIXTURES, run_cli, tree

SPEC = synth.ModelSpec(layers=2, hidden=64, ffn=96, heads=4, groups=2, vocab=256)
FLAGS = ["--num-attention-heads", "4", "--target-tensor-parallel-size", "2", "--quiet"]


def _outputs(root):
    """Every rank file's content (keys in order, exact tensor bits, args) and the tracker."""
    out = {}
    for rel in tree(root):
        path = os.path.join(root, rel)
        if rel.endswith(".pt"):
            sd = torch.load(path, weights_only=False)
            out[rel] = (vars(sd["args"]), [(k, None if v is None else (v.dtype, tuple(v.shape), v.view(torch.uint8).flatten().tolist()))
                                           for k, v in sd["model"].items()])
        else:
            out[rel] = open(path, "rb").read()
    return out


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    d = tmp_path_factory.mktemp("plain")
    synth.write_checkpoint(str(d / "src"), SPEC)
    run_cli(["convert", "--load-dir", str(d / "src"), "--save-dir", str(d / "out"), *FLAGS])
    return np_load(str(d / "src" / "model.safetensors")), _outputs(str(d / "out"))


def _split(tensors: dict, parts: int) -> list:
    names = sorted(tensors)
    return [{n: tensors[n] for n in names[i::parts]} for i in range(parts)]


def _write_shards(d, tensors: dict, parts: int, name, index: str, **save_kw) -> None:
    """Spread ``tensors`` over ``parts`` files named ``name(i)`` and write the ``index`` weight map."""
    weight_map = {}
    for i, part in enumerate(_split(tensors, parts)):
        np_save(part, str(d / name(i)), **save_kw)
        weight_map.update({n: name(i) for n in part})
    json.dump({"metadata": {}, "weight_map": weight_map}, open(d / index, "w"))


def test_unified_directory_with_hyper_param_trap(plain, tmp_path):
    tensors, expected = plain
    d = tmp_path / "unified"
    d.mkdir()
    _write_shards(d, tensors, 3, lambda i: f"part{i}.safetensors", "param_name_map.json", metadata={"format": "ms"})
    # rank-0 slices under full names: must never be read as weights
    trap = {n: np.zeros((max(1, v.shape[0] // 2),) + v.shape[1:], dtype=v.dtype) for n, v in tensors.items()}
    np_save(trap, str(d / "hyper_param.safetensors"))
    out = tmp_path / "out"
    p = run_cli(["convert", "--load-dir", str(d), "--save-dir", str(out), *FLAGS[:-1]])
    assert "hyper_param.safetensors" in p.stderr  # reported as skipped
    assert _outputs(str(out)) == expected


def test_hf_index_and_single_file_path(plain, tmp_path):
    tensors, expected = plain
    d = tmp_path / "hf"
    d.mkdir()
    _write_shards(d, tensors, 2, lambda i: f"model-{i + 1:05d}-of-00002.safetensors", "model.safetensors.index.json")
    run_cli(["convert", "--load-dir", str(d), "--save-dir", str(tmp_path / "a"), *FLAGS])
    assert _outputs(str(tmp_path / "a")) == expected
    # the index file itself as --load-dir
    run_cli(["convert", "--load-dir", str(d / "model.safetensors.index.json"), "--save-dir", str(tmp_path / "b"), *FLAGS])
    assert _outputs(str(tmp_path / "b")) == expected
    # one file given directly
    one = tmp_path / "one"
    one.mkdir()
    np_save(tensors, str(one / "weights.safetensors"))
    run_cli(["convert", "--load-dir", str(one / "weights.safetensors"), "--save-dir", str(tmp_path / "c"), *FLAGS])
    assert _outputs(str(tmp_path / "c")) == expected


def test_mindformers_iteration_output(plain, tmp_path):
    tensors, expected = plain
    root = tmp_path / "train_out"
    it = root / "iteration_00000200"
    it.mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text("200")
    (root / "iteration_00000100").mkdir()  # an older iteration, not the latest: must be ignored
    parts = _split(tensors, 2)
    for i, part in enumerate(parts):
        np_save(part, str(it / f"model-{i:07d}.safetensors"))
    np_save({f"adam_m.{n}": v for n, v in parts[0].items()}, str(it / "opt-0000000.safetensors"))
    (it / "common.json").write_text("{}")
    p = run_cli(["convert", "--load-dir", str(root), "--save-dir", str(tmp_path / "a"), *FLAGS[:-1]])
    assert "opt-0000000.safetensors" in p.stderr
    assert _outputs(str(tmp_path / "a")) == expected
    run_cli(["convert", "--load-dir", str(it), "--save-dir", str(tmp_path / "b"), *FLAGS])
    assert _outputs(str(tmp_path / "b")) == expected


def _bf16(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(torch.bfloat16)


@pytest.mark.parametrize("fixture", ["tiny_gpt_fp32", "tiny_gpt_bf16", "tiny_gpt_fp32_qkvbias",
                                     "tiny_gpt_train_adamw", "tiny_gpt_train_adam_losscale"])
def test_files_written_by_mindspore(fixture, tmp_path):
    """Real MindSpore files (unpadded, optimizer states): values checked against the file, by hand."""
    from safetensors import safe_open

    path = os.path.join(FIXTURES, f"{fixture}.safetensors")
    out = tmp_path / "out"
    p = run_cli(["convert", "--load-dir", path, "--save-dir", str(out), "--num-attention-heads", "4",
                 "--num-query-groups", "2", "--target-tensor-parallel-size", "2", "--saver-transformer-impl", "local"])
    if "train" in fixture:
        assert "optimizer-state tensors" in p.stderr
    with safe_open(path, "pt") as f:
        src = {k: f.get_tensor(k).float().numpy() for k in f.keys() if k.startswith(("decoder", "embedding", "output"))}
    ffn, d = 48, 8
    for r in range(2):
        m = torch.load(out / f"iter_0000001/mp_rank_{r:02d}/model_optim_rng.pt", weights_only=False)["model"]
        fc1 = src["decoder.layers.1.mlp.linear_fc1.weight"]
        gate, up = fc1[0::2], fc1[1::2]  # mindformers' default interleaved layout
        c = ffn // 2
        want = np.concatenate([gate[r * c:(r + 1) * c], up[r * c:(r + 1) * c]])
        assert torch.equal(m["decoder.layers.1.mlp.linear_fc1.weight"], _bf16(want))
        qkv = src["decoder.layers.0.self_attention.linear_qkv.weight"]  # 2 groups of [2 q heads; k; v]
        assert torch.equal(m["decoder.layers.0.self_attention.linear_qkv.weight"], _bf16(qkv[r * 4 * d:(r + 1) * 4 * d]))
        proj = src["decoder.layers.1.self_attention.linear_proj.weight"]
        assert torch.equal(m["decoder.layers.1.self_attention.linear_proj.weight"], _bf16(proj[:, r * 16:(r + 1) * 16]))
        emb = src["embedding.word_embeddings.weight"]
        assert torch.equal(m["embedding.word_embeddings.weight"], _bf16(emb[r * 64:(r + 1) * 64]))
        if "train" in fixture:
            qn = src["decoder.layers.0.self_attention.q_layernorm.weight"]
            assert torch.equal(m["decoder.layers.0.self_attention.q_layernorm.weight"], _bf16(qn))
            assert sd_args(out, r).qk_layernorm is True
        if "qkvbias" in fixture:
            b = src["decoder.layers.0.self_attention.linear_qkv.bias"]
            assert torch.equal(m["decoder.layers.0.self_attention.linear_qkv.bias"], _bf16(b[r * 32:(r + 1) * 32]))
            assert sd_args(out, r).add_qkv_bias is True and sd_args(out, r).add_bias_linear is False


def sd_args(out, r):
    return torch.load(out / f"iter_0000001/mp_rank_{r:02d}/model_optim_rng.pt", weights_only=False)["args"]


def test_legacy_fused_names(plain, tmp_path):
    """Older mindformers names with qkv_concat (w_qkv, w_gate_hidden) read like their mcore twins."""
    tensors, expected = plain
    rename = {
        "embedding.word_embeddings.weight": "model.tok_embeddings.embedding_weight",
        "output_layer.weight": "lm_head.weight",
        "decoder.final_layernorm.weight": "model.norm_out.weight",
    }
    suffixes = {
        "input_layernorm.weight": "attention_norm.weight",
        "pre_mlp_layernorm.weight": "ffn_norm.weight",
        "self_attention.linear_qkv.weight": "attention.w_qkv.weight",
        "self_attention.linear_proj.weight": "attention.wo.weight",
        "mlp.linear_fc1.weight": "feed_forward.w_gate_hidden.weight",
        "mlp.linear_fc2.weight": "feed_forward.w2.weight",
    }
    legacy = {}
    for name, value in tensors.items():
        if name in rename:
            legacy[rename[name]] = value
        else:
            _, _, i, suffix = name.split(".", 3)
            legacy[f"model.layers.{i}.{suffixes[suffix]}"] = value
    d = tmp_path / "legacy"
    d.mkdir()
    np_save(legacy, str(d / "model.safetensors"))
    run_cli(["convert", "--load-dir", str(d), "--save-dir", str(tmp_path / "out"), *FLAGS])
    assert _outputs(str(tmp_path / "out")) == expected


def test_mcore_names_under_a_model_prefix(plain, tmp_path):
    tensors, expected = plain
    d = tmp_path / "wrapped"
    d.mkdir()
    np_save({f"model.{n}": v for n, v in tensors.items()}, str(d / "model.safetensors"))
    run_cli(["convert", "--load-dir", str(d), "--save-dir", str(tmp_path / "out"), *FLAGS])
    assert _outputs(str(tmp_path / "out")) == expected
