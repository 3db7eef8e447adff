"""Every golden case, run with the official command line (program name swapped), must
reproduce the official pipeline's output: layout, tracker, keys in order, tensor bytes,
``_extra_state`` values, top-level scalars and the 61 load-path ``args`` fields."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from helpers import GOLDEN, golden_cases, needs_shared, official_argv, run_cli, tree

pytestmark = needs_shared


def _extra_state_repr(v) -> str:
    if v is None:
        return "None"
    assert isinstance(v, torch.Tensor) and v.dtype == torch.uint8
    return f"uint8[{v.numel()}] {v.tolist()}"


@pytest.mark.parametrize("case", golden_cases())
def test_golden_case(case, tmp_path):
    save = str(tmp_path / "out")
    argv = official_argv(case, save)
    if "--fc1-layout" not in argv:
        argv += ["--fc1-layout", "concat"]  # golden inputs store fc1 as [gate; up] (FORMAT.md §4)
    run_cli(argv)
    exp_root = os.path.join(GOLDEN, case, "expected")
    layout = json.load(open(os.path.join(exp_root, "layout.json")))
    assert tree(save) == sorted(layout["files"] + ["latest_checkpointed_iteration.txt"])
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt"), "rb").read() == layout["tracker"].encode()
    for rel in layout["files"]:
        rank_dir = os.path.join(exp_root, os.path.dirname(rel))
        meta = json.load(open(os.path.join(rank_dir, "meta.json")))
        expected = load_file(os.path.join(rank_dir, "model.safetensors"))
        sd = torch.load(os.path.join(save, rel), map_location="cpu", weights_only=False)
        assert set(sd) == set(meta["top_level_keys"]) - {"rerun_state_machine"}, rel
        for k, v in meta["top_level"].items():
            assert sd[k] == v and type(sd[k]) is type(v), (rel, k)
        model = sd["model"]
        assert list(model) == meta["model_keys_in_order"], rel
        for k, want in meta["extra_state_keys"].items():
            assert _extra_state_repr(model[k]) == want, (rel, k)
        tensors = {k: v for k, v in model.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
        assert set(tensors) == set(expected), rel
        for k, want in expected.items():
            got = tensors[k]
            assert got.dtype == want.dtype == torch.bfloat16, (rel, k)
            assert tuple(got.shape) == tuple(want.shape), (rel, k, got.shape, want.shape)
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (rel, k)
        args = vars(sd["args"])
        for k, want in meta["args"].items():
            if want == "<absent>":
                assert k not in args, (rel, k)
            else:
                assert k in args, (rel, k)
                assert args[k] == want and type(args[k]) is type(want), (rel, k, args[k], want)
