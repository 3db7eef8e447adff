"""Shared by the MoE/MLA tests: the mindformers fixtures, their Hugging Face models, variants, and plumbing.

``fixtures/mindformers_moe/<model>/`` holds checkpoints written by mindformers 2.0
itself and the Hugging Face model (``hf/``) each was made from; its MANIFEST.json
records the relations between the two, checked numerically when the fixture was
made. The tests compute every expectation from the HF tensors, so nothing here
knows streamconv's rules.

Variants (``make_variant``) reshape a fixture where the real Megatron dumps need
another model: a fourth DeepSeek layer (an even PP 2 split), DeepSeek without
q_lora, DeepSeek with one MTP layer, a Qwen3-MoE whose layer 0 is dense. Each variant is written on both sides
(mindformers names and HF names) by the same elementwise operation on tensors
the MANIFEST relates, or by new tensors stored identically on both sides
(linear_q_proj = q_proj; a dense fc1 stored row-interleaved as mindformers does).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from helpers import DATA, FIXTURES_ROOT, run_cli_batches

MOE_FIXTURES = os.path.join(FIXTURES_ROOT, "mindformers_moe")
TRUTH = os.path.join(DATA, "megatron_truth")  # real Megatron r0.12 state-dict dumps (scripts/megatron_truth.py)

#: the mindformers inputs of each fixture, by the name the tests use
INPUTS = {
    "qwen3_moe": {
        "mf": "mf_qwen3_moe_model.safetensors",  # mindformers' training net, ms.save_checkpoint
        "legacy": "legacy_ckpt/rank_0",  # CheckpointMonitor output: + AdamW states, step counters, fi_accu
    },
    "deepseek_v3": {
        "mf": "mf_deepseek_v3_model.safetensors",
        "legacy": "legacy_ckpt/rank_0",
        "convert_out": "mf_convert_out",  # convert_weight.py output: flat param_name_map.json, stray mtp.output_layer
    },
}


def fixture_dir(model: str) -> str:
    return os.path.join(MOE_FIXTURES, model)


def hf_config(model: str) -> dict:
    return json.load(open(os.path.join(fixture_dir(model), "hf", "config.json")))


def hf_tensors(model: str) -> dict:
    """The Hugging Face model's tensors (F32) as torch tensors."""
    return {k: torch.from_numpy(v) for k, v in load_file(os.path.join(fixture_dir(model), "hf", "model.safetensors")).items()}


def _mf_tensors(model: str) -> dict:
    return load_file(os.path.join(fixture_dir(model), INPUTS[model]["mf"]))


def _interleave(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """mindformers' default fc1 storage: rows gate_0, up_0, gate_1, up_1, ... (FORMAT.md §1, MANIFEST relation)."""
    return np.stack([gate, up], axis=1).reshape(2 * gate.shape[0], -1)


def make_variant(name: str, root: str) -> dict:
    """Write variant ``name`` under ``root``: its mindformers file and HF config; return
    {model, load, config, hf: {name: torch tensor}}."""
    rng = np.random.default_rng(20251130)
    d = os.path.join(root, name)
    os.makedirs(d, exist_ok=True)
    if name in ("ds4", "ds4_noqlora", "ds4_mtp1"):
        model = "deepseek_v3"
        mf = dict(_mf_tensors(model))
        hf = {k: v.numpy() for k, v in hf_tensors(model).items()}
        cfg = hf_config(model)
        # layer 3 := -(layer 1) on both sides: negation commutes with every relation the MANIFEST checks
        for k in list(mf):
            if k.startswith("decoder.layers.1."):
                mf[k.replace("decoder.layers.1.", "decoder.layers.3.")] = -mf[k]
        for k in list(hf):
            if k.startswith("model.layers.1."):
                hf[k.replace("model.layers.1.", "model.layers.3.")] = -hf[k]
        cfg["num_hidden_layers"] = 4
        if name == "ds4_noqlora":
            for i in range(4):
                p, h = f"decoder.layers.{i}.self_attention.", f"model.layers.{i}.self_attn."
                for k in ("linear_q_down_proj.weight", "linear_q_up_proj.weight", "q_layernorm.weight"):
                    del mf[p + k]
                for k in ("q_a_proj.weight", "q_b_proj.weight", "q_a_layernorm.weight"):
                    del hf[h + k]
                q = (0.1 * rng.standard_normal((4 * 12, 32))).astype(np.float32)  # n_heads * (nope + rope), H
                mf[p + "linear_q_proj.weight"] = q
                hf[h + "q_proj.weight"] = q.copy()
            cfg["q_lora_rank"] = None
        if name == "ds4_mtp1":
            # one MTP layer: its transformer layer := 0.5 x layer 2 on both sides (mindformers
            # mtp.layers.0.transformer_layer.*, HF model.layers.4.*), its norms and eh_proj new and equal on both
            # sides (mindformers enorm, hnorm, eh_proj, final_layernorm = HF enorm, hnorm, eh_proj, shared_head.norm)
            for k in list(mf):
                if k.startswith("decoder.layers.2."):
                    mf[k.replace("decoder.layers.2.", "mtp.layers.0.transformer_layer.")] = 0.5 * mf[k]
            for k in list(hf):
                if k.startswith("model.layers.2."):
                    hf[k.replace("model.layers.2.", "model.layers.4.")] = 0.5 * hf[k]
            for mine, theirs, shape in (("enorm", "enorm", (32,)), ("hnorm", "hnorm", (32,)),
                                        ("final_layernorm", "shared_head.norm", (32,)), ("eh_proj", "eh_proj", (32, 64))):
                v = ((1.0 if len(shape) == 1 else 0.0) + 0.1 * rng.standard_normal(shape)).astype(np.float32)
                mf[f"mtp.layers.0.{mine}.weight"] = v
                hf[f"model.layers.4.{theirs}.weight"] = v.copy()
            cfg["num_nextn_predict_layers"] = 1
    elif name == "q3_dense0":
        model = "qwen3_moe"
        mf = dict(_mf_tensors(model))
        hf = {k: v.numpy() for k, v in hf_tensors(model).items()}
        cfg = hf_config(model)
        for k in [k for k in mf if k.startswith("decoder.layers.0.mlp.")]:
            del mf[k]
        for k in [k for k in hf if k.startswith("model.layers.0.mlp.")]:
            del hf[k]
        ffn = cfg["intermediate_size"]
        gate, up, down = ((0.1 * rng.standard_normal(s)).astype(np.float32) for s in ((ffn, 32), (ffn, 32), (32, ffn)))
        mf["decoder.layers.0.mlp.linear_fc1.weight"] = _interleave(gate, up)
        mf["decoder.layers.0.mlp.linear_fc2.weight"] = down
        hf.update({"model.layers.0.mlp.gate_proj.weight": gate.copy(), "model.layers.0.mlp.up_proj.weight": up.copy(),
                   "model.layers.0.mlp.down_proj.weight": down.copy()})
        cfg["mlp_only_layers"] = [0]
    else:
        raise KeyError(name)
    load = os.path.join(d, "model.safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in mf.items()}, load, metadata={"format": "ms"})
    config = os.path.join(d, "config.json")
    json.dump(cfg, open(config, "w"), indent=1)
    return dict(model=model, load=load, config=config, hf={k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in hf.items()},
                hf_config=cfg)


def convert_all(jobs: dict) -> dict:
    """name -> argv (without the 'convert' word); returns name -> None or the failure text."""
    done = run_cli_batches({n: ["convert", *argv] for n, argv in jobs.items()})
    return {n: None if code == 0 else f"streamconv convert {' '.join(jobs[n])} exited {code}:\n{text}"
            for n, (code, text) in done.items()}


# ---------------------------------------------------------------------------- reading rank files
def load_rank_file(path: str) -> dict:
    """A rank file as Megatron would read it: ``torch.load(weights_only=True)``, argparse.Namespace allowed."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def rank_dirs(save: str) -> list:
    it = open(os.path.join(save, "latest_checkpointed_iteration.txt")).read()
    assert it == "1", it
    return sorted(os.listdir(os.path.join(save, "iter_0000001")))


def rank_path(save: str, d: str) -> str:
    return os.path.join(save, "iter_0000001", d, "model_optim_rng.pt")


def dir_name(tp: int, pp: int, ep: int, pp_size: int, ep_size: int) -> str:
    """Megatron's get_checkpoint_name: mp_rank_TT, + _PPP when PP > 1, + _EEE when EP > 1."""
    return f"mp_rank_{tp:02d}" + (f"_{pp:03d}" if pp_size > 1 else "") + (f"_{ep:03d}" if ep_size > 1 else "")


def legacy_writers(tp: int, ep: int, etp: int) -> dict:
    """(tensor rank, expert rank) -> expert-tensor rank of every rank that writes a legacy file.

    Megatron r0.12 parallel_state orders expert ranks tp-cp-ep-dp-pp with ETP in the tp place, dense
    ranks tp-cp-dp-pp; save_checkpoint writes a legacy file only where the expert-data-parallel rank is 0,
    i.e. for global ranks r < ETP x EP (per pipeline stage).
    """
    return {(r % tp, (r // etp) % ep): r % etp for r in range(etp * ep)}
