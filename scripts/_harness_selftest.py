#!/usr/bin/env python3
"""Self-test of scripts/check_megatron_moe.py: show that build/load/forward/compare works and can fail.

Test scaffolding for the harness only (not a converter, not part of CI; runs in the
venv of scripts/megatron_truth.py). streamconv cannot convert MoE/MLA yet, so the
MoE/MLA and torch_dist checkpoints the harness is exercised on are made here:

* Megatron itself builds the model at the SAVE layout (bf16, as in training; the
  routers' ``expert_bias`` kept fp32 as Megatron keeps it after a forward), every
  tensor is filled from the Hugging Face weights, and Megatron's own
  ``save_checkpoint`` writes it (legacy ``torch`` or ``torch_dist``; the torch_dist
  writer needs the two stand-ins of ``_mcore_cpu.patch_writer``), without the RNG and
  rerun-state entries a converter would not write either (``real_save(converter_like=True)``).
* The filling uses a small in-memory mapping from HF names to Megatron's GLOBAL
  (unsharded) tensors, keyed by the ShardedTensor keys of ``model.sharded_state_dict()``;
  each rank then copies the part its ShardedTensors describe (global offset, local
  shape; the gated fc1 factories give the [gate; up] halves), so Megatron's own
  sharding decides what lands on which rank. Every parameter is first set to NaN
  and checked to be fully written.
* The checkpoint is then loaded by ``check_megatron_moe.check`` at one or more LOAD
  layouts (legacy: the same layout; torch_dist: also other TP/PP/EP/ETP) and compared
  with transformers.
* Negative controls use a deliberately wrong mapping (two experts swapped, gate/up
  swapped in the experts, DeepSeek's kv_down rows [k_pe; c_kv]); the harness must load
  them and report a mismatch.
* MTP: the fixture HF model has no MTP layer, so the MTP case fills the MTP weights
  with seeded random values; they must load strictly and leave the main logits alone.
* ``--streamconv-python PY`` adds the dense plumbing cases: the Qwen2 fixture
  converted by the streamconv CLI, loaded at its layout.

    MEGATRON_LM=/tmp/mlm /work/venv-mcore/bin/python scripts/_harness_selftest.py [--cases a,b] [--list]
        [--streamconv-python /work/main/.venv/bin/python] [--keep DIR]

Exit code 0 only if every positive case passes and every negative control loads and
fails the comparison.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import _mcore_cpu as M  # noqa: E402
import check_megatron_moe as C  # noqa: E402

FIX = "/work/shared/fixtures"
QWEN3_MOE = f"{FIX}/mindformers_moe/qwen3_moe/hf"
DSV3 = f"{FIX}/mindformers_moe/deepseek_v3/hf"
QWEN2 = f"{FIX}/hf_pairs/qwen2"

L = dict  # layout
# name -> (hf dir, format, save layout, [load layouts], options); options: mutation, mtp_layers, negative
CASES = {
    "qwen3_moe_torch_tp2_ep2": (QWEN3_MOE, "torch", L(tp=2, ep=2), [L(tp=2, ep=2)], {}),
    "qwen3_moe_torch_tp2_ep2_etp1": (QWEN3_MOE, "torch", L(tp=2, ep=2, etp=1), [L(tp=2, ep=2, etp=1)], {}),
    "qwen3_moe_dist_tp2_ep2": (QWEN3_MOE, "torch_dist", L(tp=2, ep=2),
                               [L(tp=2, ep=2), L(tp=1, ep=4), L(tp=2, ep=2, etp=1), L(tp=1, pp=2, ep=2)], {}),
    "deepseek_v3_torch_tp2_ep2": (DSV3, "torch", L(tp=2, ep=2), [L(tp=2, ep=2)], {}),
    "deepseek_v3_dist_tp2_ep2": (DSV3, "torch_dist", L(tp=2, ep=2),
                                 [L(tp=1, pp=2, ep=2, first_stage_layers=1), L(tp=2, ep=4), L(tp=1, ep=1)], {}),
    "deepseek_v3_mtp_dist_tp1_pp2_ep2": (DSV3, "torch_dist", L(tp=1, pp=2, ep=2, first_stage_layers=1),
                                         [L(tp=2, ep=2)], dict(mtp_layers=1)),
    "deepseek_v3_noqlora_torch_tp2": (DSV3, "torch", L(tp=2), [L(tp=2)], dict(overrides={"q_lora_rank": None})),
    # negative controls: must load and must NOT match
    "neg_qwen3_moe_swapped_experts": (QWEN3_MOE, "torch", L(tp=1, ep=2), [L(tp=1, ep=2)],
                                      dict(mutation="swap_experts", negative=True)),
    "neg_qwen3_moe_gate_up_swapped": (QWEN3_MOE, "torch_dist", L(tp=2, ep=2), [L(tp=1, ep=2)],
                                      dict(mutation="gate_up", negative=True)),
    "neg_deepseek_v3_kv_down_rows": (DSV3, "torch_dist", L(tp=1, ep=2), [L(tp=1, ep=2)],
                                     dict(mutation="kv_down", negative=True)),
}
STREAMCONV_CASES = {  # dense plumbing: the lead's CLI converts, the harness loads (legacy only)
    "qwen2_streamconv_tp2": L(tp=2, pp=1),
    "qwen2_streamconv_tp1_pp2": L(tp=1, pp=2),
}


# ----------------------------------------------------------------------------- HF -> Megatron global tensors

class GlobalWeights:
    """Megatron's global (unsharded) tensor for a ShardedTensor key, made from HF weights."""

    def __init__(self, hf_dir: str, cfg: dict, padded_vocab: int, mutation: str = None):
        from safetensors.torch import load_file

        files = [f for f in os.listdir(hf_dir) if f.endswith(".safetensors")]
        self.w = {}
        for f in files:
            self.w.update(load_file(os.path.join(hf_dir, f)))
        self.cfg, self.vp, self.mutation = cfg, padded_vocab, mutation

    def _pad_vocab(self, t):
        return torch.cat([t, t.new_zeros(self.vp - t.shape[0], *t.shape[1:])]) if t.shape[0] < self.vp else t

    def _qkv(self, p, what):
        c = self.cfg
        ng = c.get("num_key_value_heads") or c["num_attention_heads"]
        q, k, v = (self.w[f"{p}self_attn.{x}_proj.{what}"] for x in "qkv")
        tail = q.shape[1:]
        q = q.reshape(ng, -1, *tail)
        k = k.reshape(ng, -1, *tail)
        v = v.reshape(ng, -1, *tail)
        return torch.cat([q, k, v], 1).reshape(-1, *tail)

    def _fc1(self, p, expert=False):
        gate, up = self.w[f"{p}gate_proj.weight"], self.w[f"{p}up_proj.weight"]
        if expert and self.mutation == "gate_up":
            gate, up = up, gate
        return torch.cat([gate, up])

    def layer(self, i: int, name: str, lead: list):
        p = f"model.layers.{i}."
        w = self.w
        simple = {
            "input_layernorm.weight": "input_layernorm.weight",
            "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
            "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
            "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
            "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
            "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
            "self_attention.kv_layernorm.weight": "self_attn.kv_a_layernorm.weight",
            "self_attention.linear_kv_up_proj.layer_norm_weight": "self_attn.kv_a_layernorm.weight",
            "self_attention.linear_q_down_proj.weight": "self_attn.q_a_proj.weight",
            "self_attention.linear_q_up_proj.weight": "self_attn.q_b_proj.weight",
            "self_attention.linear_q_up_proj.layer_norm_weight": "self_attn.q_a_layernorm.weight",
            "self_attention.linear_q_proj.weight": "self_attn.q_proj.weight",
            "self_attention.linear_kv_up_proj.weight": "self_attn.kv_b_proj.weight",
            "mlp.linear_fc2.weight": "mlp.down_proj.weight",
            "mlp.router.weight": "mlp.gate.weight",
            "mlp.router.expert_bias": "mlp.gate.e_score_correction_bias",
            "mlp.shared_experts.linear_fc2.weight": "mlp.shared_experts.down_proj.weight",
        }
        if name in simple:
            return w[p + simple[name]]
        if name == "self_attention.q_layernorm.weight":  # Qwen3 q_norm; MLA q_a_layernorm
            return w.get(p + "self_attn.q_norm.weight", w.get(p + "self_attn.q_a_layernorm.weight"))
        if name in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
            return self._qkv(p, name.rsplit(".", 1)[1])
        if name == "self_attention.linear_kv_down_proj.weight":
            t = w[p + "self_attn.kv_a_proj_with_mqa.weight"]
            if self.mutation == "kv_down":
                r = self.cfg["kv_lora_rank"]
                t = torch.cat([t[r:], t[:r]])
            return t
        if name == "mlp.linear_fc1.weight":
            return self._fc1(p + "mlp.")
        if name == "mlp.shared_experts.linear_fc1.weight":
            return self._fc1(p + "mlp.shared_experts.")
        if name.startswith("mlp.experts.experts.linear_fc"):
            (e,) = lead
            if self.mutation == "swap_experts" and e in (0, 1):
                e = 1 - e
            if name == "mlp.experts.experts.linear_fc1.weight":
                return self._fc1(f"{p}mlp.experts.{e}.", expert=True)
            if name == "mlp.experts.experts.linear_fc2.weight":
                return w[f"{p}mlp.experts.{e}.down_proj.weight"]
        raise KeyError(name)

    def get(self, key: str, offsets: list, prepend: int, global_shape: list):
        """The global tensor the ShardedTensor ``key`` is a chunk of (without its prepended axes)."""
        if key == "embedding.word_embeddings.weight":
            return self._pad_vocab(self.w["model.embed_tokens.weight"])
        if key == "output_layer.weight":
            return self._pad_vocab(self.w["lm_head.weight"])
        if key == "decoder.final_layernorm.weight":
            return self.w["model.norm.weight"]
        if key.startswith("mtp."):  # no MTP layer in the fixture: seeded random, identical on every rank
            g = torch.Generator().manual_seed(zlib.crc32(f"{key}{offsets[:prepend]}".encode()))
            return torch.randn(*global_shape[prepend:], generator=g) * 0.05
        if key.startswith("decoder.layers."):
            rest = key[len("decoder.layers."):]
            head = rest.split(".", 1)[0]
            if head.isdigit():  # per-layer keys (heterogeneous layers): no layer axis
                return self.layer(int(head), rest[len(head) + 1:], list(offsets[:prepend]))
            return self.layer(offsets[0], rest, list(offsets[1:prepend]))  # stacked: axis 0 is the layer
        raise KeyError(key)


# ----------------------------------------------------------------------------- save side

def save_worker(rank, world, port, argv, hf_dir, cfg, fmt, save_dir, mutation):
    M.add_megatron_lm(None)
    M.apply_cpu_shims()
    args = M.init_megatron(argv, rank, world, port)
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
    from megatron.core.transformer.moe.router import TopKRouter

    wrapped, (model,) = M.build_model()
    for m in model.modules():
        if isinstance(m, TopKRouter):
            m._maintain_float32_expert_bias()  # what the first forward does: a trained checkpoint has it fp32
    gw = GlobalWeights(hf_dir, cfg, args.padded_vocab_size, mutation)
    with torch.no_grad():
        for t in model.state_dict(keep_vars=True).values():
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t.fill_(float("nan"))
        sd = model.sharded_state_dict()
        apply_factories(sd)
        for sh in _flat(sd):
            if not isinstance(sh, ShardedTensor):
                continue
            p = sh.prepend_axis_num
            g = gw.get(sh.key, list(sh.global_offset), p, list(sh.global_shape))
            if list(g.shape) != list(sh.global_shape[p:]):
                raise RuntimeError(f"{sh.key}: HF mapping gives {list(g.shape)}, Megatron's global shape is "
                                   f"{list(sh.global_shape)} (prepend {p})")
            idx = tuple(slice(o, o + n) for o, n in zip(sh.global_offset[p:], sh.local_shape))
            sh.data.copy_(g[idx])
        left = [k for k, t in model.state_dict().items() if isinstance(t, torch.Tensor) and
                t.is_floating_point() and torch.isnan(t).any()]
        if left:
            raise RuntimeError(f"rank {rank}: not filled from HF: {left}")
    M.real_save(args, wrapped, fmt, save_dir, converter_like=True)
    M.teardown()


def _flat(d):
    if isinstance(d, dict):
        for v in d.values():
            yield from _flat(v)
    elif isinstance(d, list):
        for v in d:
            yield from _flat(v)
    else:
        yield d


def make_checkpoint(hf_dir, fmt, layout, save_dir, opts):
    import torch.multiprocessing as mp

    cfg = dict(M.load_json(os.path.join(hf_dir, "config.json")), **opts.get("overrides", {}))
    argv = M.hf_to_megatron_argv(cfg, mtp_layers=opts.get("mtp_layers"))
    argv += M.layout_argv(layout["tp"], layout.get("pp", 1), layout.get("ep", 1), layout.get("etp"), moe=True,
                          first_stage_layers=layout.get("first_stage_layers"))
    argv += M.RUN_ARGV
    world = M.world_size_for(layout["tp"], layout.get("pp", 1), layout.get("ep", 1), layout.get("etp"))
    mp.spawn(save_worker, args=(world, M.free_port(), argv, hf_dir, cfg, fmt, save_dir, opts.get("mutation")),
             nprocs=world, join=True)


def hf_dir_for(hf_dir, opts, work):
    """The HF model to compare with: the fixture, or a copy with config overrides (e.g. no q_lora)."""
    ov = opts.get("overrides")
    if not ov:
        return hf_dir
    import json

    from transformers import AutoModelForCausalLM

    # the overridden config changes the architecture: build it from the fixture's weights where names agree,
    # and take the rest (e.g. q_proj without q_lora) from a seeded model, then save it as the reference
    cfg = dict(M.load_json(os.path.join(hf_dir, "config.json")), **ov)
    out = os.path.join(work, "hf_" + "_".join(f"{k}" for k in ov))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f)
    torch.manual_seed(0)
    from transformers import AutoConfig

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out), dtype=torch.float32)
    from safetensors.torch import load_file

    src = load_file(os.path.join(hf_dir, "model.safetensors"))
    sd = model.state_dict()
    for k in sd:
        if k in src and src[k].shape == sd[k].shape:
            sd[k] = src[k]
    model.load_state_dict(sd)
    model.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------- driver

def run_case(name, work, streamconv_python=None):
    results = []
    if name in STREAMCONV_CASES:
        lay = STREAMCONV_CASES[name]
        save = os.path.join(work, name)
        shutil.rmtree(save, ignore_errors=True)
        cfg = M.load_json(os.path.join(QWEN2, "config.json"))
        cmd = [streamconv_python, "-m", "streamconv", "convert", "--load-dir",
               os.path.join(QWEN2, "mindformers_legacy_split.safetensors"), "--save-dir", save,
               "--num-attention-heads", str(cfg["num_attention_heads"]),
               "--num-query-groups", str(cfg["num_key_value_heads"]), "--rotary-base", str(int(cfg["rope_theta"])),
               "--saver-transformer-impl", "local", "--target-tensor-parallel-size", str(lay["tp"]),
               "--target-pipeline-parallel-size", str(lay["pp"]), "--quiet"]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=tempfile.gettempdir())
        if p.returncode:
            print(f"[{name}] streamconv convert failed: {(p.stdout + p.stderr).strip()[-500:]}")
            return [False]
        # streamconv writes decoder.final_layernorm._extra_state (a TE-built norm's value); the local spec's
        # torch norm has none, so strict loading needs it dropped (reported in the line)
        r = C.check(save, QWEN2, lay["tp"], lay["pp"], name=name, drop_keys=("decoder.final_layernorm._extra_state",))
        return [r["ok"]]
    hf_dir, fmt, save_layout, load_layouts, opts = CASES[name]
    save = os.path.join(work, name)
    shutil.rmtree(save, ignore_errors=True)
    ref_dir = hf_dir_for(hf_dir, opts, work)  # the HF model both the checkpoint and the reference come from
    try:
        make_checkpoint(ref_dir, fmt, save_layout, save, opts)
    except Exception as e:  # noqa: BLE001 - one line per case
        print(f"[{name}] making the checkpoint failed: {str(e).strip().splitlines()[-1]}")
        return [False]
    for lay in load_layouts:
        r = C.check(save, ref_dir, lay.get("tp", 1), lay.get("pp", 1), lay.get("ep", 1), lay.get("etp"),
                    lay.get("first_stage_layers"), name=name, verbose=False)
        if opts.get("negative"):
            good = r["error"] is None and not r["ok"]
            print(f"{r['line']}  [negative control: {'mismatch detected, OK' if good else 'NOT detected'}]",
                  flush=True)
        else:
            good = r["ok"]
            print(r["line"], flush=True)
        results.append(good)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", help="comma-separated case names (default: all)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--streamconv-python", help="a Python with streamconv installed: adds the dense CLI cases")
    ap.add_argument("--keep", help="keep the checkpoints in this directory")
    ap.add_argument("--megatron-lm", help=f"Megatron-LM source tree at core_r0.12.0 (default ${M.MLM_ENV})")
    a = ap.parse_args(argv)
    names = list(CASES) + (list(STREAMCONV_CASES) if a.streamconv_python else [])
    if a.list:
        print("\n".join(list(CASES) + list(STREAMCONV_CASES)))
        return 0
    if a.cases:
        names = a.cases.split(",")
        unknown = [n for n in names if n not in CASES and n not in STREAMCONV_CASES]
        if unknown:
            raise SystemExit(f"unknown cases {unknown}; --list shows them")
        if any(n in STREAMCONV_CASES for n in names) and not a.streamconv_python:
            raise SystemExit("the qwen2_streamconv_* cases need --streamconv-python")
    M.add_megatron_lm(a.megatron_lm)
    work = a.keep or tempfile.mkdtemp(prefix="harness_selftest_")
    os.makedirs(work, exist_ok=True)
    ok = []
    try:
        for n in names:
            ok += run_case(n, work, a.streamconv_python)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"self-test: {sum(ok)} of {len(ok)} checks as expected")
    return 0 if ok and all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
