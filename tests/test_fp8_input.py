"""FP8 block-quantized Hugging Face checkpoints (DeepSeek-V3 as released, Qwen3-FP8) convert directly.

The expectation never comes from streamconv: each weight is quantized here the
way DeepSeek's release stores it (F8_E4M3 with one F32 ``weight_scale_inv`` per
128 x 128 block, partial last blocks), and the same model is also written with
the dequantized weights ``q.float() * scale`` (computed here with plain
``repeat_interleave``) in F32. Both directories must convert to identical files:
the FP8 path may not differ from converting what ``fp8_cast_bf16.py`` would have
produced (its F32 product, rounded once to BF16).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from test_hf_input import convert, refusal, same_files, write_hf

BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize(w: torch.Tensor) -> tuple:
    """(q F8_E4M3, scale_inv F32 [ceil(R/128), ceil(C/128)]): per block, amax maps to the FP8 maximum."""
    rows, cols = w.shape
    nr, nc = -(-rows // BLOCK), -(-cols // BLOCK)
    scale = torch.ones(nr, nc)
    for i in range(nr):
        for j in range(nc):
            amax = w[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK].abs().max()
            if amax > 0:
                scale[i, j] = amax / FP8_MAX
    full = scale.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]
    return (w / full).to(torch.float8_e4m3fn), scale


def dequantized(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows, cols = q.shape
    return q.float() * scale.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]


def write_pair(root, tensors: dict, config_path: str, quantized) -> tuple:
    """(fp8 dir, reference dir): the FP8 model as released, and the same weights dequantized, in F32."""
    fp8, ref = {}, {}
    for name, t in tensors.items():
        if quantized(name, t):
            q, s = quantize(t.float())
            fp8[name], fp8[name + "_scale_inv"] = q, s
            ref[name] = dequantized(q, s)
        else:
            fp8[name] = ref[name] = t.contiguous()
    assert any(n.endswith("_scale_inv") for n in fp8)
    out = []
    for sub, sd in (("fp8", fp8), ("ref", ref)):
        d = os.path.join(str(root), sub)
        os.makedirs(d)
        save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        cfg = json.load(open(config_path))
        if sub == "fp8":
            cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                          "weight_block_size": [BLOCK, BLOCK]}
        json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
        out.append(d)
    return tuple(out)


def _linear(name: str, t: torch.Tensor) -> bool:
    return t.dim() == 2 and "embed_tokens" not in name and "lm_head" not in name and ".mlp.gate." not in name \
        and "norm" not in name


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    """Dimensions past one block with partial last blocks: hidden 320 = 2.5 blocks, ffn 200, q rows 320."""
    root = tmp_path_factory.mktemp("fp8_llama")
    src = str(root / "src")
    t = write_hf(src, "LlamaForCausalLM", layers=2, hidden=320, ffn=200, heads=4, kv=2, vocab=256, seed=7)
    return write_pair(root, t, os.path.join(src, "config.json"), _linear)


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2), (2, 1)])
def test_fp8_llama_converts_like_its_dequantized_weights(llama_pair, tmp_path, tp, pp):
    fp8, ref = llama_pair
    common = ["--target-tensor-parallel-size", str(tp), "--target-pipeline-parallel-size", str(pp),
              "--saver-transformer-impl", "local"]
    convert(["--load-dir", fp8, "--save-dir", str(tmp_path / "a"), *common])
    convert(["--load-dir", ref, "--save-dir", str(tmp_path / "b"), *common])
    same_files(str(tmp_path / "a"), str(tmp_path / "b"))


def test_fp8_llama_torch_dist_and_plan(llama_pair, tmp_path):
    fp8, ref = llama_pair
    common = ["--ckpt-format", "torch_dist", "--target-tensor-parallel-size", "2"]
    out = convert(["--load-dir", fp8, "--save-dir", str(tmp_path / "a"), *common])
    convert(["--load-dir", ref, "--save-dir", str(tmp_path / "b"), *common])
    same_files(str(tmp_path / "a"), str(tmp_path / "b"))
    from test_hf_input import streamconv

    code, out, err = streamconv(["plan", "--load-dir", fp8, "--save-dir", str(tmp_path / "c")])
    assert code == 0 and "14 FP8 weights dequantized with their 128x128 block scales" in out, out + err


@pytest.mark.parametrize("tp,pp,ep", [(2, 2, 2), (1, 1, 4)])
def test_fp8_deepseek_v3_with_experts_and_mtp(tmp_path, tp, pp, ep):
    """The ds4_mtp1 DeepSeek-V3 variant (MLA, dense then MoE layers, shared experts, one MTP layer), its linear
    weights quantized as the release does (not the embedding, head, router or norms)."""
    from moe_fixtures import make_variant

    v = make_variant("ds4_mtp1", str(tmp_path / "variant"))
    fp8, ref = write_pair(tmp_path, v["hf"], v["config"], _linear)
    common = ["--target-tensor-parallel-size", str(tp), "--target-pipeline-parallel-size", str(pp),
              "--target-expert-parallel-size", str(ep), "--saver-transformer-impl", "local"]
    convert(["--load-dir", fp8, "--save-dir", str(tmp_path / "a"), *common])
    convert(["--load-dir", ref, "--save-dir", str(tmp_path / "b"), *common])
    same_files(str(tmp_path / "a"), str(tmp_path / "b"))


def _edited(llama_pair, tmp_path, edit) -> str:
    from safetensors.torch import load_file

    d = str(tmp_path / "edited")
    shutil.copytree(llama_pair[0], d)
    sd = load_file(os.path.join(d, "model.safetensors"))
    edit(sd)
    save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    return d


def test_fp8_weight_without_its_scale_is_refused(llama_pair, tmp_path):
    d = _edited(llama_pair, tmp_path, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight_scale_inv"))
    line = refusal(["--load-dir", d, "--save-dir", str(tmp_path / "o")], "convert")
    assert "model.layers.1.mlp.up_proj.weight" in line and "F8_E4M3" in line and "_scale_inv" in line, line
    assert not (tmp_path / "o").exists()  # nothing written


def test_scale_of_an_unquantized_weight_is_refused(llama_pair, tmp_path):
    def edit(sd):
        sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(200, 320)
    line = refusal(["--load-dir", _edited(llama_pair, tmp_path, edit), "--save-dir", str(tmp_path / "o")], "convert")
    assert "model.layers.0.mlp.up_proj.weight_scale_inv" in line and "dtype F32" in line, line
    assert not (tmp_path / "o").exists()  # nothing written


def test_scale_of_the_wrong_shape_is_refused(llama_pair, tmp_path):
    def edit(sd):
        sd["model.layers.0.self_attn.o_proj.weight_scale_inv"] = torch.ones(3, 2)
    line = refusal(["--load-dir", _edited(llama_pair, tmp_path, edit), "--save-dir", str(tmp_path / "o")], "convert")
    assert "model.layers.0.self_attn.o_proj.weight_scale_inv" in line and "[3, 2]" in line and "[3, 3]" in line, line
    assert not (tmp_path / "o").exists()  # nothing written


@pytest.mark.parametrize("qc", [
    {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [64, 64]},
    {"quant_method": "gptq", "bits": 4},
])
def test_other_quantization_configs_are_refused(llama_pair, tmp_path, qc):
    d = str(tmp_path / "q")
    shutil.copytree(llama_pair[0], d)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["quantization_config"] = qc
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    line = refusal(["--load-dir", d, "--save-dir", str(tmp_path / "o")], "convert")
    assert "config.json" in line and "quantization_config" in line and qc["quant_method"] in line, line
    assert not (tmp_path / "o").exists()  # nothing written


def test_negative_control_scales_in_another_block_order_differ(llama_pair, tmp_path):
    """The comparison above would catch a converter that applied the scales to the wrong blocks: the same
    model dequantized with each row of block scales reversed converts to other bytes."""
    from safetensors.torch import load_file

    fp8 = load_file(os.path.join(llama_pair[0], "model.safetensors"))
    wrong = {}
    for name, t in fp8.items():
        if name.endswith("_scale_inv"):
            continue
        s = fp8.get(name + "_scale_inv")
        wrong[name] = t if s is None else dequantized(t, s.flip(1))
    d = tmp_path / "wrong"
    d.mkdir()
    save_file(wrong, str(d / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(llama_pair[1], "config.json"), d / "config.json")
    convert(["--load-dir", llama_pair[0], "--save-dir", str(tmp_path / "a")])
    convert(["--load-dir", str(d), "--save-dir", str(tmp_path / "b")])
    with pytest.raises(AssertionError, match="differs"):
        same_files(str(tmp_path / "a"), str(tmp_path / "b"))
