#!/usr/bin/env python3
"""Write a DeepSeek-V3-shaped Hugging Face checkpoint as deepseek-ai releases it: FP8 with block scales.

For the benchmark (``scripts/benchmark.py``): the MLA projections, dense MLP,
routed and shared experts are ``F8_E4M3`` with an F32 ``weight_scale_inv`` per
128 x 128 block; the embedding, output head and norms BF16, the router F32 and
its ``e_score_correction_bias`` F32, as in the release; a ``config.json`` with
its ``quantization_config``. Values are random (finite FP8 codes, scales near
1/448), written a chunk at a time so memory stays small whatever the shapes.
Sizes come from a :class:`synth.ModelSpec` with ``mla`` and ``experts`` set.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from dataclasses import asdict, replace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import synth  # noqa: E402

BLOCK = 128
CHUNK = 64 * 2**20  # bytes generated at a time
SIZES = {"F8_E4M3": 1, "BF16": 2, "F32": 4}


def hf_tensors(s: synth.ModelSpec) -> list:
    """[(name, shape, dtype)] in HF names, the quantized weights each followed by their scale."""
    h, n = s.hidden, s.heads
    out = [("model.embed_tokens.weight", (s.vocab, h), "BF16")]

    def linear(name, rows, cols):
        out.append((name, (rows, cols), "F8_E4M3"))
        out.append((name + "_scale_inv", (-(-rows // BLOCK), -(-cols // BLOCK)), "F32"))

    for i in range(s.layers):
        p = f"model.layers.{i}."
        out.append((p + "input_layernorm.weight", (h,), "BF16"))
        linear(p + "self_attn.q_a_proj.weight", s.q_lora, h)
        out.append((p + "self_attn.q_a_layernorm.weight", (s.q_lora,), "BF16"))
        linear(p + "self_attn.q_b_proj.weight", n * (s.qk_nope + s.qk_rope), s.q_lora)
        linear(p + "self_attn.kv_a_proj_with_mqa.weight", s.kv_lora + s.qk_rope, h)
        out.append((p + "self_attn.kv_a_layernorm.weight", (s.kv_lora,), "BF16"))
        linear(p + "self_attn.kv_b_proj.weight", n * (s.qk_nope + s.v_head), s.kv_lora)
        linear(p + "self_attn.o_proj.weight", h, n * s.v_head)
        out.append((p + "post_attention_layernorm.weight", (h,), "BF16"))
        if i < s.dense_layers:
            linear(p + "mlp.gate_proj.weight", s.ffn, h)
            linear(p + "mlp.up_proj.weight", s.ffn, h)
            linear(p + "mlp.down_proj.weight", h, s.ffn)
            continue
        out.append((p + "mlp.gate.weight", (s.experts, h), "F32"))
        out.append((p + "mlp.gate.e_score_correction_bias", (s.experts,), "F32"))
        for e in range(s.experts):
            linear(p + f"mlp.experts.{e}.gate_proj.weight", s.moe_ffn, h)
            linear(p + f"mlp.experts.{e}.up_proj.weight", s.moe_ffn, h)
            linear(p + f"mlp.experts.{e}.down_proj.weight", h, s.moe_ffn)
        linear(p + "mlp.shared_experts.gate_proj.weight", s.shared_ffn, h)
        linear(p + "mlp.shared_experts.up_proj.weight", s.shared_ffn, h)
        linear(p + "mlp.shared_experts.down_proj.weight", h, s.shared_ffn)
    out.append(("model.norm.weight", (h,), "BF16"))
    out.append(("lm_head.weight", (s.vocab, h), "BF16"))
    return out


def config(s: synth.ModelSpec) -> dict:
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": s.vocab,
        "hidden_size": s.hidden, "intermediate_size": s.ffn, "moe_intermediate_size": s.moe_ffn,
        "num_hidden_layers": s.layers, "num_attention_heads": s.heads, "num_key_value_heads": s.heads,
        "n_shared_experts": s.shared_ffn // s.moe_ffn, "n_routed_experts": s.experts, "routed_scaling_factor": 2.5,
        "kv_lora_rank": s.kv_lora, "q_lora_rank": s.q_lora, "qk_rope_head_dim": s.qk_rope, "v_head_dim": s.v_head,
        "qk_nope_head_dim": s.qk_nope, "n_group": 8 if s.experts % 8 == 0 else 1, "topk_group": 4 if s.experts % 8 == 0 else 1,
        "num_experts_per_tok": 8 if s.experts >= 8 else 2, "first_k_dense_replace": s.dense_layers,
        "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6, "rope_theta": 10000, "rope_scaling": None, "tie_word_embeddings": False,
        "attention_bias": False, "torch_dtype": "bfloat16",
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [BLOCK, BLOCK]},
    }


def _values(rng, dtype: str, count: int) -> bytes:
    if dtype == "F8_E4M3":  # finite e4m3 codes: exponent field below all-ones, either sign
        return (rng.integers(0, 0x78, count, dtype=np.uint8) | (rng.integers(0, 2, count, dtype=np.uint8) << 7)).tobytes()
    if dtype == "BF16":  # 1 +- small, a plausible norm/embedding magnitude
        return ((rng.standard_normal(count, dtype=np.float32) * 0.02 + 1).view(np.uint32) >> 16).astype("<u2").tobytes()
    return (rng.random(count, dtype=np.float32) * (2 / 448)).astype("<f4").tobytes()


def write(out_dir: str, s: synth.ModelSpec, files: int = 4, quiet: bool = True) -> list:
    os.makedirs(out_dir, exist_ok=True)
    entries = hf_tensors(s)
    total = sum(int(np.prod(sh)) * SIZES[dt] for _, sh, dt in entries)
    groups, cur, acc = [], [], 0
    for e in entries:
        cur.append(e)
        acc += int(np.prod(e[1])) * SIZES[e[2]]
        if acc >= total / files * (len(groups) + 1) and len(groups) < files - 1:
            groups.append(cur)
            cur = []
    groups = [g for g in groups + [cur] if g]
    rng = np.random.default_rng(s.seed)
    paths, weight_map = [], {}
    for fi, group in enumerate(groups):
        name = f"model-{fi + 1:05d}-of-{len(groups):05d}.safetensors"
        path = os.path.join(out_dir, name)
        header, off = {}, 0
        for n, sh, dt in group:
            nb = int(np.prod(sh)) * SIZES[dt]
            header[n] = {"dtype": dt, "shape": list(sh), "data_offsets": [off, off + nb]}
            off += nb
            weight_map[n] = name
        header["__metadata__"] = {"format": "pt"}
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        with open(path + ".tmp", "wb") as f:
            f.write(struct.pack("<Q", len(hb)) + hb)
            for n, sh, dt in group:
                left = int(np.prod(sh))
                per = CHUNK // SIZES[dt]
                while left:
                    k = min(per, left)
                    f.write(_values(rng, dt, k))
                    left -= k
        os.replace(path + ".tmp", path)
        paths.append(path)
        if not quiet:
            print(f"wrote {path} ({os.path.getsize(path) / 2**30:.2f} GiB)", file=sys.stderr)
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config(s), f, indent=1)
    with open(os.path.join(out_dir, "synth_spec.json"), "w") as f:
        json.dump({"hf_fp8": asdict(s)}, f, indent=1)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--experts", type=int, default=16)
    a = p.parse_args(argv)
    write(a.out_dir, replace(synth.PRESETS["deepseek_v3"], layers=a.layers, experts=a.experts), quiet=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
