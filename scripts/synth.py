#!/usr/bin/env python3
"""Write synthetic MindSpore-Transformers-format safetensors checkpoints, of any size, in bounded memory.

Used by the demo, the tests and the benchmark. The file looks like what MindSpore
writes: standard safetensors with ``{"format": "ms"}`` metadata, tensors packed
back to back with no alignment padding, mcore parameter names (or the legacy
mindformers Llama names), F32/BF16/F16 weights, optionally optimizer states and
step counters. The header is written first (offsets follow from the shapes), then
every tensor is generated and written in row blocks, so a 15 GB checkpoint needs
only a few tens of MB of RAM.

Values are deterministic: tensor ``name`` with ``seed`` always gets the same bytes
(:func:`tensor_values` regenerates any row range), so tests and the benchmark can
recompute expectations independently of streamconv.

    python scripts/synth.py OUT_DIR --preset demo
    python scripts/synth.py OUT_DIR --layers 4 --hidden 8192 --ffn 28672 --heads 64 --groups 8 --vocab 128256
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import sys
from dataclasses import asdict, dataclass, field

import numpy as np

DTYPE_SIZE = {"F32": 4, "BF16": 2, "F16": 2, "I32": 4, "I64": 8}
CHUNK_ELEMS = 4 * 2**20  # elements generated per write
ROW_BLOCK = 64  # rows per independent generator


@dataclass
class ModelSpec:
    layers: int = 2
    hidden: int = 64
    ffn: int = 128
    heads: int = 4
    groups: int = 2
    head_dim: int | None = None  # default hidden // heads
    vocab: int = 256
    dtype: str = "F32"
    bias: bool = False  # linear biases (and qkv bias)
    qkv_bias: bool = False  # qkv bias only (Qwen2 style)
    norm: str = "RMSNorm"
    swiglu: bool = True
    tied: bool = False
    qk_layernorm: bool = False
    fc1_layout: str = "interleaved"  # how a *gated* fc1 is stored: interleaved | concat
    qkv_layout: str = "grouped"  # grouped | contiguous
    legacy: bool = False  # model.layers.N.attention.wq ... names
    optimizer: bool = False  # adam_m./adam_v. states + global_step
    misalign: bool = False  # put a 6-byte entry first so F32 data is not 4-byte aligned
    dropout_keys: bool = False
    files: int = 1
    # mixture of experts (mindformers layout: stacked weight1 [E*H, 2F] / weight2 [E*F, H], each expert
    # stored [in, out]); layers [0, dense_layers) stay dense
    experts: int = 0
    moe_ffn: int = 0
    shared_ffn: int = 0  # shared experts' intermediate size (0: none)
    expert_bias: bool = False  # router score-correction bias (always F32, as mindformers saves it)
    dense_layers: int = 0
    # multi-latent attention (DeepSeek): q_lora 0 means one linear_q_proj
    mla: bool = False
    q_lora: int = 0
    kv_lora: int = 0
    qk_nope: int = 0
    qk_rope: int = 0
    v_head: int = 0
    seed: int = 1234
    scale: float = 0.02
    extra: dict = field(default_factory=dict)

    @property
    def d(self) -> int:
        return self.head_dim or self.hidden // self.heads


PRESETS = {
    # the README demo: small GQA + SwiGLU + untied output, mindformers' default layouts
    "demo": ModelSpec(layers=4, hidden=256, ffn=688, heads=8, groups=4, vocab=1000, tied=False),
    # Llama-3-70B layer shapes (use --layers to choose how many)
    "llama70b": ModelSpec(layers=4, hidden=8192, ffn=28672, heads=64, groups=8, vocab=128256),
    "mid": ModelSpec(layers=4, hidden=2048, ffn=5632, heads=16, groups=4, vocab=32000),
    # DeepSeek-V3 layer shapes (MLA + a dense layer + MoE layers with shared experts); choose --layers/--experts
    "deepseek_v3": ModelSpec(layers=3, hidden=7168, ffn=18432, heads=128, groups=128, vocab=129280, dtype="BF16",
                             experts=16, moe_ffn=2048, shared_ffn=2048, expert_bias=True, dense_layers=1, mla=True,
                             q_lora=1536, kv_lora=512, qk_nope=128, qk_rope=64, v_head=128),
}


def weight_shapes(s: ModelSpec) -> dict:
    """Canonical (mcore) name -> shape, in the model's logical order."""
    h, d, nq, ng, ffn = s.hidden, s.d, s.heads, s.groups, s.ffn
    out = {"embedding.word_embeddings.weight": (s.vocab, h)}
    for i in range(s.layers):
        p = f"decoder.layers.{i}."
        if s.mla or (s.experts and i >= s.dense_layers):
            out.update(_moe_mla_layer(s, p, i))
            continue
        out[p + "input_layernorm.weight"] = (h,)
        if s.norm == "LayerNorm":
            out[p + "input_layernorm.bias"] = (h,)
        out[p + "self_attention.linear_qkv.weight"] = ((nq + 2 * ng) * d, h)
        if s.bias or s.qkv_bias:
            out[p + "self_attention.linear_qkv.bias"] = ((nq + 2 * ng) * d,)
        if s.qk_layernorm:
            out[p + "self_attention.q_layernorm.weight"] = (d,)
            if s.norm == "LayerNorm":
                out[p + "self_attention.q_layernorm.bias"] = (d,)
            out[p + "self_attention.k_layernorm.weight"] = (d,)
            if s.norm == "LayerNorm":
                out[p + "self_attention.k_layernorm.bias"] = (d,)
        out[p + "self_attention.linear_proj.weight"] = (h, nq * d)
        if s.bias:
            out[p + "self_attention.linear_proj.bias"] = (h,)
        out[p + "pre_mlp_layernorm.weight"] = (h,)
        if s.norm == "LayerNorm":
            out[p + "pre_mlp_layernorm.bias"] = (h,)
        rows = 2 * ffn if s.swiglu else ffn
        out[p + "mlp.linear_fc1.weight"] = (rows, h)
        if s.bias:
            out[p + "mlp.linear_fc1.bias"] = (rows,)
        out[p + "mlp.linear_fc2.weight"] = (h, ffn)
        if s.bias:
            out[p + "mlp.linear_fc2.bias"] = (h,)
    out["decoder.final_layernorm.weight"] = (h,)
    if s.norm == "LayerNorm":
        out["decoder.final_layernorm.bias"] = (h,)
    if not s.tied:
        out["output_layer.weight"] = (s.vocab, h)
    return out


def _moe_mla_layer(s: ModelSpec, p: str, i: int) -> dict:
    """One layer with MLA attention and/or MoE MLP, mindformers names (FORMAT.md §6)."""
    h, n = s.hidden, s.heads
    out = {p + "input_layernorm.weight": (h,)}
    if s.mla:
        if s.q_lora:
            out[p + "self_attention.linear_q_down_proj.weight"] = (s.q_lora, h)
            out[p + "self_attention.q_layernorm.weight"] = (s.q_lora,)
            out[p + "self_attention.linear_q_up_proj.weight"] = (n * (s.qk_nope + s.qk_rope), s.q_lora)
        else:
            out[p + "self_attention.linear_q_proj.weight"] = (n * (s.qk_nope + s.qk_rope), h)
        out[p + "self_attention.linear_kv_down_proj.weight"] = (s.kv_lora + s.qk_rope, h)
        out[p + "self_attention.kv_layernorm.weight"] = (s.kv_lora,)
        out[p + "self_attention.linear_kv_up_proj.weight"] = (n * (s.qk_nope + s.v_head), s.kv_lora)
        out[p + "self_attention.linear_proj.weight"] = (h, n * s.v_head)
    else:
        nq, ng, d = s.heads, s.groups, s.d
        out[p + "self_attention.linear_qkv.weight"] = ((nq + 2 * ng) * d, h)
        out[p + "self_attention.linear_proj.weight"] = (h, nq * d)
    out[p + "pre_mlp_layernorm.weight"] = (h,)
    if s.experts and i >= s.dense_layers:
        e, f = s.experts, s.moe_ffn
        out[p + "mlp.router.weight"] = (e, h)
        if s.expert_bias:
            out[p + "mlp.router.expert_bias"] = (e,)
        out[p + "mlp.experts.weight1"] = (e * h, 2 * f)
        out[p + "mlp.experts.weight2"] = (e * f, h)
        if s.shared_ffn:
            out[p + "mlp.shared_experts.linear_fc1.weight"] = (2 * s.shared_ffn, h)
            out[p + "mlp.shared_experts.linear_fc2.weight"] = (h, s.shared_ffn)
    else:
        out[p + "mlp.linear_fc1.weight"] = (2 * s.ffn, h)
        out[p + "mlp.linear_fc2.weight"] = (h, s.ffn)
    return out


_LEGACY = {
    "input_layernorm.weight": "attention_norm.weight",
    "input_layernorm.bias": "attention_norm.bias",
    "pre_mlp_layernorm.weight": "ffn_norm.weight",
    "pre_mlp_layernorm.bias": "ffn_norm.bias",
    "self_attention.linear_proj.weight": "attention.wo.weight",
    "self_attention.linear_proj.bias": "attention.wo.bias",
    "mlp.linear_fc2.weight": "feed_forward.w2.weight",
    "mlp.linear_fc2.bias": "feed_forward.w2.bias",
}


def stored_tensors(s: ModelSpec) -> dict:
    """Name as stored in the file -> shape (legacy models store q/k/v and w1/w3 separately)."""
    shapes = weight_shapes(s)
    if not s.legacy:
        return dict(shapes)
    h, d, nq, ng, ffn = s.hidden, s.d, s.heads, s.groups, s.ffn
    out = {}
    for name, shape in shapes.items():
        if name == "embedding.word_embeddings.weight":
            out["model.tok_embeddings.embedding_weight"] = shape
        elif name == "output_layer.weight":
            out["lm_head.weight"] = shape
        elif name.startswith("decoder.final_layernorm."):
            out["model.norm_out." + name.rsplit(".", 1)[1]] = shape
        else:
            i, suffix = name.split(".", 3)[2], name.split(".", 3)[3]
            p = f"model.layers.{i}."
            if suffix == "self_attention.linear_qkv.weight":
                out[p + "attention.wq.weight"] = (nq * d, h)
                out[p + "attention.wk.weight"] = (ng * d, h)
                out[p + "attention.wv.weight"] = (ng * d, h)
            elif suffix == "self_attention.linear_qkv.bias":
                out[p + "attention.wq.bias"] = (nq * d,)
                out[p + "attention.wk.bias"] = (ng * d,)
                out[p + "attention.wv.bias"] = (ng * d,)
            elif suffix == "mlp.linear_fc1.weight":
                if s.swiglu:
                    out[p + "feed_forward.w1.weight"] = (ffn, h)
                    out[p + "feed_forward.w3.weight"] = (ffn, h)
                else:
                    raise ValueError("legacy names are for gated (SwiGLU) models")
            elif suffix == "mlp.linear_fc1.bias":
                out[p + "feed_forward.w1.bias"] = (ffn,)
                out[p + "feed_forward.w3.bias"] = (ffn,)
            elif suffix in _LEGACY:
                out[p + _LEGACY[suffix]] = shape
            else:
                raise ValueError(f"no legacy name for {suffix}")
    return out


def _seed_for(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def tensor_values(name: str, shape: tuple, seed: int, scale: float, start: int = 0, stop: int | None = None) -> np.ndarray:
    """float32 values of rows [start, stop) of tensor ``name`` (deterministic, chunk-independent).

    Row r of a tensor is generated from its own seed, so any row range can be
    recomputed without generating the rows before it. Norm weights are around 1.
    """
    rows = shape[0] if shape else 1
    cols = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    stop = rows if stop is None else stop
    base = _seed_for(name, seed)
    is_norm = "layernorm" in name or "norm" in name.split(".")[-2]
    out = np.empty((stop - start, cols), dtype=np.float32)
    if cols == 1:
        # 1-D tensors: one generator for the whole vector, sliced
        g = np.random.Generator(np.random.PCG64(base))
        out[:, 0] = g.random(rows, dtype=np.float32)[start:stop]
    else:
        # rows come in fixed blocks of ROW_BLOCK, each from its own generator, so any
        # row range can be regenerated without the rows before it
        b0, b1 = start // ROW_BLOCK, -(-stop // ROW_BLOCK)
        for blk in range(b0, b1):
            lo, hi = blk * ROW_BLOCK, min(rows, (blk + 1) * ROW_BLOCK)
            g = np.random.Generator(np.random.PCG64(base + blk))
            vals = g.random((hi - lo, cols), dtype=np.float32)
            a, b = max(lo, start), min(hi, stop)
            out[a - start:b - start] = vals[a - lo:b - lo]
    out -= 0.5  # uniform in [-0.5, 0.5): fast to generate, fine for weights
    out *= 2 * scale
    if is_norm and not name.endswith("bias"):
        out += 1.0
    return out


def _encode(values: np.ndarray, dtype: str) -> bytes:
    if dtype == "F32":
        return values.astype("<f4").tobytes()
    if dtype == "F16":
        return values.astype("<f2").tobytes()
    if dtype == "BF16":
        import torch

        return torch.from_numpy(np.ascontiguousarray(values)).to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    raise ValueError(dtype)


def _stored_value_rows(s: ModelSpec, name: str, shape: tuple, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the tensor as stored on disk."""
    perm = stored_row_source(s, name, shape)
    if perm is None:
        return tensor_values(name, shape, s.seed, s.scale, start, stop)
    logical = perm[start:stop]
    cols = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    out = np.empty((stop - start, cols), dtype=np.float32)
    order = np.argsort(logical, kind="stable")
    sorted_rows = logical[order]
    # contiguous runs of logical rows are generated in one call each
    breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
    for run_idx in np.split(np.arange(len(sorted_rows)), breaks):
        if len(run_idx) == 0:
            continue
        lo, hi = int(sorted_rows[run_idx[0]]), int(sorted_rows[run_idx[-1]]) + 1
        out[order[run_idx]] = tensor_values(name, shape, s.seed, s.scale, lo, hi)
    return out


def stored_row_source(s: ModelSpec, name: str, shape: tuple):
    """For stored row i, the logical (Megatron-order) row it holds; None when identical."""
    if s.legacy:
        return None
    if name.endswith(("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")) and s.swiglu and s.fc1_layout == "interleaved":
        ffn = shape[0] // 2
        perm = np.empty(2 * ffn, dtype=np.int64)
        perm[0::2] = np.arange(ffn)  # gate_j
        perm[1::2] = ffn + np.arange(ffn)  # up_j
        return perm
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias")) and s.qkv_layout == "contiguous":
        nq, ng, d = s.heads, s.groups, s.d
        hpg = nq // ng
        q_rows, k_rows, v_rows = [], [], []
        for g in range(ng):
            base = g * (hpg + 2) * d
            q_rows += list(range(base, base + hpg * d))
            k_rows += list(range(base + hpg * d, base + (hpg + 1) * d))
            v_rows += list(range(base + (hpg + 1) * d, base + (hpg + 2) * d))
        return np.asarray(q_rows + k_rows + v_rows, dtype=np.int64)
    return None


def stored_dtype(s: ModelSpec, name: str) -> str:
    """The dtype a weight is saved in: the spec's, except the router's expert bias (mindformers keeps it F32)."""
    return "F32" if name.endswith("router.expert_bias") else s.dtype


def write_checkpoint(out_dir: str, s: ModelSpec, quiet: bool = True) -> list:
    """Write the checkpoint for ``s`` into ``out_dir``; return the file paths."""
    os.makedirs(out_dir, exist_ok=True)
    tensors = stored_tensors(s)
    entries = [(n, shape, stored_dtype(s, n)) for n, shape in tensors.items()]
    if s.optimizer:
        entries += [(f"adam_m.{n}", shape, "F32") for n, shape in tensors.items()]
        entries += [(f"adam_v.{n}", shape, "F32") for n, shape in tensors.items()]
        entries += [("global_step", (1,), "I32"), ("learning_rate", (), "F32")]
    if s.dropout_keys:
        entries += [(f"decoder.layers.{i}.self_attention.core_attention.attention_dropout.weight", (1,), "F32")
                    for i in range(s.layers)]
    # split across files by cumulative size, keeping order
    total = sum(int(np.prod(sh)) * DTYPE_SIZE[dt] for _, sh, dt in entries)
    per_file = total / max(1, s.files)
    groups, acc, cur = [], 0, []
    for e in entries:
        cur.append(e)
        acc += int(np.prod(e[1])) * DTYPE_SIZE[e[2]]
        if acc >= per_file * (len(groups) + 1) and len(groups) < s.files - 1:
            groups.append(cur)
            cur = []
    groups.append(cur)
    groups = [g for g in groups if g]
    paths = []
    for fi, group in enumerate(groups):
        name = "model.safetensors" if len(groups) == 1 else f"model-{fi + 1:05d}-of-{len(groups):05d}.safetensors"
        path = os.path.join(out_dir, name)
        if fi == 0 and s.misalign:
            group = [("loss_scale", (3,), "BF16")] + group  # 6 bytes first: later F32 data is unaligned
        # MindSpore groups by element size, larger first, then by name; misalign entry stays first
        head = group[:1] if (fi == 0 and s.misalign) else []
        rest = group[len(head):]
        rest = sorted(rest, key=lambda e: (-DTYPE_SIZE[e[2]], e[0]))
        ordered = head + rest
        header, off = {}, 0
        for n, sh, dt in ordered:
            nb = int(np.prod(sh)) * DTYPE_SIZE[dt]
            header[n] = {"dtype": dt, "shape": list(sh), "data_offsets": [off, off + nb]}
            off += nb
        header["__metadata__"] = {"format": "ms"}
        hb = json.dumps(header, separators=(",", ":")).encode()
        with open(path + ".tmp", "wb") as f:
            f.write(struct.pack("<Q", len(hb)))
            f.write(hb)
            for n, sh, dt in ordered:
                _write_tensor(f, s, n, sh, dt)
        os.replace(path + ".tmp", path)
        paths.append(path)
        if not quiet:
            print(f"wrote {path} ({os.path.getsize(path) / 2**30:.2f} GiB)", file=sys.stderr)
    if len(paths) > 1:
        wm = {}
        for p in paths:
            with open(p, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                for k in json.loads(f.read(n)):
                    if k != "__metadata__":
                        wm[k] = os.path.basename(p)
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": wm}, f, indent=1)
    with open(os.path.join(out_dir, "synth_spec.json"), "w") as f:
        json.dump(asdict(s), f, indent=1)
    return paths


def _write_tensor(f, s: ModelSpec, name: str, shape: tuple, dtype: str) -> None:
    if dtype == "I32":
        f.write(np.ones(shape, dtype="<i4").tobytes())
        return
    if name == "learning_rate":
        f.write(np.asarray(1e-4, dtype="<f4").tobytes())
        return
    if name == "loss_scale":
        f.write(b"\x00" * 6)
        return
    if "attention_dropout" in name:
        f.write(np.zeros(shape, dtype="<f4").tobytes())
        return
    rows = shape[0] if shape else 1
    cols = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    per = max(1, CHUNK_ELEMS // cols)
    for a in range(0, rows, per):
        b = min(rows, a + per)
        vals = _stored_value_rows(s, name, shape, a, b)
        f.write(_encode(vals.reshape(-1), dtype))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None)
    for fld in ("layers", "hidden", "ffn", "heads", "groups", "head_dim", "vocab", "files", "seed", "experts"):
        p.add_argument(f"--{fld.replace('_', '-')}", type=int)
    p.add_argument("--dtype", choices=["F32", "BF16", "F16"])
    p.add_argument("--norm", choices=["RMSNorm", "LayerNorm"])
    p.add_argument("--fc1-layout", choices=["interleaved", "concat"])
    p.add_argument("--qkv-layout", choices=["grouped", "contiguous"])
    for flag in ("bias", "qkv-bias", "tied", "qk-layernorm", "legacy", "optimizer", "misalign", "no-swiglu"):
        p.add_argument(f"--{flag}", action="store_true")
    a = p.parse_args(argv)
    s = ModelSpec(**asdict(PRESETS[a.preset])) if a.preset else ModelSpec()
    for fld in ("layers", "hidden", "ffn", "heads", "groups", "head_dim", "vocab", "files", "seed", "dtype", "norm", "experts"):
        v = getattr(a, fld)
        if v is not None:
            setattr(s, fld, v)
    if a.fc1_layout:
        s.fc1_layout = a.fc1_layout
    if a.qkv_layout:
        s.qkv_layout = a.qkv_layout
    for flag in ("bias", "qkv_bias", "tied", "qk_layernorm", "legacy", "optimizer", "misalign"):
        if getattr(a, flag):
            setattr(s, flag, True)
    if a.no_swiglu:
        s.swiglu = False
    paths = write_checkpoint(a.out_dir, s, quiet=False)
    total = sum(os.path.getsize(x) for x in paths)
    print(f"synthetic MindSpore checkpoint: {a.out_dir} ({len(paths)} file(s), {total / 2**30:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
