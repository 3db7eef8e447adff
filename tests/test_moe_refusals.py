"""MoE / MLA inputs and flags Megatron r0.12 cannot take: one line, exit 2, nothing written.

Run through the CLI with test_refusals.refuse, which checks the exit status, the
single ``streamconv: error:`` line naming the flag or tensor, no traceback, no save
directory, the input unchanged and nothing written anywhere else. Inputs are the
mindformers fixtures (read only) or copies of them with one tensor removed or added.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from moe_fixtures import INPUTS, fixture_dir
from test_refusals import refuse, ws  # noqa: F401 - ws is a fixture

Q3 = os.path.join(fixture_dir("qwen3_moe"), INPUTS["qwen3_moe"]["mf"])
DS = os.path.join(fixture_dir("deepseek_v3"), INPUTS["deepseek_v3"]["mf"])
Q3_CONFIG = os.path.join(fixture_dir("qwen3_moe"), "hf", "config.json")
DS_CONFIG = os.path.join(fixture_dir("deepseek_v3"), "hf", "config.json")


def _argv(ws, load, config, *flags):
    return ["--load-dir", load, "--save-dir", ws.save, "--model-config", config, *flags]


# qwen3_moe: 4 experts of ffn 16, 4 heads / 2 groups, 2 layers all MoE
# deepseek_v3: 4 experts of ffn 12, shared 12, layer 0 dense, 3 layers, MLA q_lora 24
FLAG_CASES = {
    "ep-does-not-divide-experts": (Q3, ["--target-expert-parallel-size", "3"], ["--target-expert-parallel-size"]),
    "etp-does-not-divide-expert-ffn": (DS, ["--target-expert-tensor-parallel-size", "5"],
                                       ["--target-expert-tensor-parallel-size"]),
    "etp-does-not-divide-expert-ffn-tp2": (Q3, ["--target-tensor-parallel-size", "2",
                                                "--target-expert-tensor-parallel-size", "3"],
                                           ["--target-expert-tensor-parallel-size"]),
    # TP1 EP2 ETP2: ranks 0 and 1 (expert tensor ranks 0 and 1 of EP rank 0) both write mp_rank_00_000
    "etp-ep-tp-files-collide": (Q3, ["--target-expert-parallel-size", "2", "--target-expert-tensor-parallel-size", "2"],
                                ["--target-expert-tensor-parallel-size"]),
    "etp-ep-tp-files-collide-deepseek": (DS, ["--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2",
                                              "--target-expert-tensor-parallel-size", "4"],
                                         ["--target-expert-tensor-parallel-size"]),
    # TP2 EP1 ETP1: rank 1 has expert-data-parallel rank 1, so Megatron writes no mp_rank_01 at all
    "etp-ep-tp-file-never-written": (Q3, ["--target-tensor-parallel-size", "2", "--target-expert-tensor-parallel-size", "1"],
                                     ["--target-expert-tensor-parallel-size"]),
    "num-experts-contradicts-router": (Q3, ["--num-experts", "8"], ["--num-experts", "router"]),
    "moe-ffn-contradicts-experts": (Q3, ["--moe-ffn-hidden-size", "8"], ["--moe-ffn-hidden-size"]),
    "shared-size-contradicts": (DS, ["--moe-shared-expert-intermediate-size", "24"],
                                ["--moe-shared-expert-intermediate-size"]),
    "moe-layer-freq-1-but-layer-0-dense": (DS, ["--moe-layer-freq", "1"], ["--moe-layer-freq"]),
    "moe-layer-freq-list-too-long": (DS, ["--moe-layer-freq", "[0]*1+[1]*3"], ["--moe-layer-freq"]),
    "moe-layer-freq-2-but-all-moe": (Q3, ["--moe-layer-freq", "2"], ["--moe-layer-freq"]),
    "grouped-gemm-with-local-spec": (Q3, ["--moe-grouped-gemm", "--saver-transformer-impl", "local"],
                                     ["--moe-grouped-gemm", "local"]),
    "expert-bias-flag-without-bias": (Q3, ["--moe-router-enable-expert-bias"], ["--moe-router-enable-expert-bias"]),
    "q-lora-rank-contradicts": (DS, ["--q-lora-rank", "12"], ["--q-lora-rank"]),
    "kv-lora-rank-contradicts": (DS, ["--kv-lora-rank", "20"], ["--kv-lora-rank"]),
}


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_flag_refused(ws, case):  # noqa: F811
    load, flags, names = FLAG_CASES[case]
    config = Q3_CONFIG if load == Q3 else DS_CONFIG
    refuse(ws, _argv(ws, load, config, *flags), names=names, watch=[load])


def _copy_with(ws, src, drop=(), add=None) -> str:
    """ws.inp/model.safetensors: ``src`` without the tensors in ``drop``, plus ``add``."""
    t = {k: v for k, v in load_file(src).items() if k not in drop}
    assert all(k in load_file(src) for k in drop)
    t.update(add or {})
    os.makedirs(ws.inp, exist_ok=True)
    path = str(ws.inp / "model.safetensors")
    save_file(t, path, metadata={"format": "ms"})
    return path


@pytest.mark.parametrize("model,layer", [("qwen3_moe", 0), ("qwen3_moe", 1), ("deepseek_v3", 1), ("deepseek_v3", 2)])
def test_router_without_experts(ws, model, layer):  # noqa: F811
    """The first MoE layer of a kind is refused for its router; a later one for the experts its kind needs."""
    src, config = (Q3, Q3_CONFIG) if model == "qwen3_moe" else (DS, DS_CONFIG)
    p = f"decoder.layers.{layer}.mlp."
    load = _copy_with(ws, src, drop=(p + "experts.weight1", p + "experts.weight2"))
    refuse(ws, _argv(ws, load, config), any_of=[p + "router.weight", p + "experts.weight1"], watch=[ws.inp])


def test_router_with_only_half_the_experts(ws):  # noqa: F811
    load = _copy_with(ws, Q3, drop=("decoder.layers.0.mlp.experts.weight2",))
    refuse(ws, _argv(ws, load, Q3_CONFIG), names=["decoder.layers.0.mlp.experts.weight2"], watch=[ws.inp])


def test_shared_expert_gate(ws):  # noqa: F811
    """r0.12's MoE layer spec builds SharedExpertMLP with gate=False: a gated shared expert cannot be loaded."""
    gate = "decoder.layers.1.mlp.shared_experts.shared_experts_gate.weight"
    load = _copy_with(ws, DS, add={gate: np.full((1, 32), 0.01, np.float32)})
    refuse(ws, _argv(ws, load, DS_CONFIG), names=[gate], watch=[ws.inp])


def test_expert_bias_with_the_wrong_length(ws):  # noqa: F811
    bias = "decoder.layers.2.mlp.router.expert_bias"
    load = _copy_with(ws, DS, drop=(bias,), add={bias: np.zeros(5, np.float32)})
    refuse(ws, _argv(ws, load, DS_CONFIG), names=[bias], watch=[ws.inp])


def test_ep_on_a_dense_model(ws):  # noqa: F811
    """A Qwen3-MoE copy with every router and expert removed is dense: expert parallelism makes no sense."""
    drop = [k for k in load_file(Q3) if ".mlp." in k]
    load = _copy_with(ws, Q3, drop=drop, add={
        # config.json's intermediate_size (48) is the dense ffn, checked against the shapes like a flag
        **{f"decoder.layers.{i}.mlp.linear_fc1.weight": np.zeros((96, 32), np.float32) for i in range(2)},
        **{f"decoder.layers.{i}.mlp.linear_fc2.weight": np.zeros((32, 48), np.float32) for i in range(2)}})
    cfg = json.load(open(Q3_CONFIG))
    for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "mlp_only_layers", "decoder_sparse_step"):
        cfg.pop(k, None)  # the config of the dense model this copy now is
    dense_config = os.path.join(str(ws.inp) + "_cfg", "config.json")
    os.makedirs(os.path.dirname(dense_config), exist_ok=True)
    json.dump(cfg, open(dense_config, "w"))
    refuse(ws, _argv(ws, load, dense_config, "--target-expert-parallel-size", "2"),
           names=["--target-expert-parallel-size"], watch=[ws.inp])


def test_rank_0_beside_another_rank_is_still_refused(ws):  # noqa: F811
    """A lone rank_0 is a one-device run (whole weights); with a rank_1 beside it, it holds slices."""
    import shutil

    src = os.path.join(fixture_dir("qwen3_moe"), "legacy_ckpt")
    shutil.copytree(src, ws.inp)
    shutil.copytree(ws.inp / "rank_0", ws.inp / "rank_1")
    refuse(ws, _argv(ws, str(ws.inp / "rank_0"), Q3_CONFIG), names=["rank_0"], watch=[ws.inp])
